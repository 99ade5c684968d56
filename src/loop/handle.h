/* Handles: the loop makes genuine asyncio.Handle and asyncio.TimerHandle
 * objects, so isinstance() checks and every method of theirs behave exactly
 * as on the stock loop, but it builds and runs them from C.
 *
 * Both classes keep their state in __slots__, whose storage sits at fixed
 * offsets in the object.  mt_handles_init() reads those offsets from the
 * slot descriptors once; creating a handle is then an allocation and a few
 * stores (no __init__ call), and running one reads its slots directly.
 * cancel(), repr() and the comparisons stay asyncio's own Python code.
 *
 * A handle belongs to its loop's thread: it is created, run and cancelled
 * with the GIL held. */
#ifndef MT_HANDLE_H
#define MT_HANDLE_H

#include "pyext/compat.h"

#include <stdbool.h>

typedef struct mt_loop mt_loop;

typedef struct mt_handle_layout {
    PyTypeObject *handle_type;  /* asyncio.events.Handle */
    PyTypeObject *timer_type;   /* asyncio.events.TimerHandle */
    Py_ssize_t callback, args, cancelled, loop, source_traceback, repr, context;
    Py_ssize_t when, scheduled; /* TimerHandle only */
} mt_handle_layout;

extern mt_handle_layout mt_handles;

/* The slot at `offset` of a handle: a borrowed reference, may be NULL. */
#define MT_SLOT(obj, offset) (*(PyObject **)((char *)(obj) + (offset)))

/* An asyncio Handle or TimerHandle exactly (not a subclass that might
 * override _run()). */
static inline bool mt_handle_is_native(PyObject *h)
{
    return Py_IS_TYPE(h, mt_handles.handle_type) || Py_IS_TYPE(h, mt_handles.timer_type);
}

static inline bool mt_handle_is_cancelled(PyObject *h)
{
    return MT_SLOT(h, mt_handles.cancelled) == Py_True;
}

static inline void mt_slot_set(PyObject *h, Py_ssize_t offset, PyObject *value)
{
    Py_XSETREF(MT_SLOT(h, offset), Py_XNewRef(value));
}

/* New Handle for callback(*args) in context (NULL or None: a copy of the
 * current one).  Returns a new reference or NULL. */
PyObject *mt_handle_new(mt_loop *loop, PyObject *callback, PyObject *const *args,
                        Py_ssize_t nargs, PyObject *context);
/* New TimerHandle, not yet marked scheduled. */
PyObject *mt_timer_handle_new(mt_loop *loop, double when, PyObject *callback,
                              PyObject *const *args, Py_ssize_t nargs, PyObject *context);

/* Whether any handle-like object is cancelled: 1, 0, or -1 on error. */
int mt_handle_check_cancelled(PyObject *h);

/* Runs the handle as Handle._run() does.  An ordinary exception goes to the
 * loop's exception handler and 0 is returned; -1 (with the error set) means
 * an exception that must stop the loop: SystemExit, KeyboardInterrupt, or
 * one the exception handler let through. */
int mt_handle_run(mt_loop *loop, PyObject *h);

/* h.cancel(). */
int mt_handle_cancel(PyObject *h);

/* Finds the slot offsets; call once at module init. */
int mt_handles_init(void);

#endif
