/* Handle and TimerHandle: the C counterparts of asyncio.Handle and
 * asyncio.TimerHandle, created by call_soon/call_later/call_at and by
 * add_reader/add_writer.
 *
 * A handle belongs to its loop's thread: it is created, run and (usually)
 * cancelled there with the GIL held.  The one exception is `node`, which
 * links a handle made by call_soon_threadsafe() into the loop's MPSC queue;
 * that queue owns one reference until the loop drains it. */
#ifndef MT_HANDLE_H
#define MT_HANDLE_H

#include "pyext/compat.h"
#include "io_threads/mpsc_queue.h"

typedef struct mt_loop mt_loop;

typedef struct mt_handle {
    PyObject_HEAD
    mt_mpsc_node node;           /* link in the call_soon_threadsafe queue */
    mt_loop *loop;               /* strong reference */
    PyObject *callback;          /* NULL once cancelled */
    PyObject *args;              /* a tuple; NULL once cancelled */
    PyObject *context;           /* a contextvars.Context, or any object with run() */
    PyObject *source_traceback;  /* list of frames in debug mode, else NULL */
    PyObject *repr;              /* repr kept at cancel() in debug mode */
    PyObject *weakreflist;
    char cancelled;
} mt_handle;

typedef struct mt_timer_handle {
    mt_handle base;
    double when;
    char scheduled;              /* still in the loop's timer heap */
} mt_timer_handle;

extern PyTypeObject mt_HandleType;
extern PyTypeObject mt_TimerHandleType;

#define mt_handle_check(op) PyObject_TypeCheck(op, &mt_HandleType)

/* New handle for callback(*args) (args: array of nargs), in context (NULL:
 * a copy of the current one).  Returns a new reference or NULL. */
mt_handle *mt_handle_new(mt_loop *loop, PyObject *callback, PyObject *const *args,
                         Py_ssize_t nargs, PyObject *context);
mt_timer_handle *mt_timer_handle_new(mt_loop *loop, double when, PyObject *callback,
                                     PyObject *const *args, Py_ssize_t nargs,
                                     PyObject *context);

/* Runs the callback.  An ordinary exception goes to the loop's exception
 * handler and 0 is returned; -1 (with the error set) means an exception that
 * must stop the loop: SystemExit, KeyboardInterrupt, or a failure of the
 * exception handler itself to do so. */
int mt_handle_run(mt_handle *h);

/* Marks the handle cancelled and drops its callback and arguments. */
int mt_handle_cancel(mt_handle *h);

int mt_handle_types_init(PyObject *module);

#endif
