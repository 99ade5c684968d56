/* Module-wide glue shared by the C types of mtloop._mtloop. */
#ifndef MT_MODULE_H
#define MT_MODULE_H

#include "pyext/compat.h"

#include <stdbool.h>

/* Calls mtloop._helpers.<name>(*args): the cold paths kept in Python
 * (formatting, logging).  Returns a new reference or NULL. */
PyObject *mt_call_helper(const char *name, PyObject *const *args, size_t nargs);

/* True when the raised exception must leave the run loop (SystemExit,
 * KeyboardInterrupt) rather than be reported. */
bool mt_exception_must_propagate(void);
/* A call made for `ctx` (a transport, a server) raised: -1 for what must
 * leave the run loop, else reported as unraisable and 0. */
int mt_report_failed_call(PyObject *ctx);
/* A write after the connection was lost: counted in *conn_lost, with
 * asyncio's warning from the fifth on.  None, or NULL if logging raised. */
PyObject *mt_count_lost_write(int *conn_lost);

/* Where a transport class keeps its C core: the `_core` slot's offset in
 * the last class seen, so a method of the transport written in C reads one
 * pointer instead of looking the attribute up (which cost as much as the
 * Python method it replaces).  One cache per call site. */
typedef struct mt_core_slot {
    PyTypeObject *type; /* strong */
    Py_ssize_t offset;  /* 0: look the attribute up */
} mt_core_slot;

/* The transport's `_core` if it is a `core_type`: a new reference, or NULL
 * with TypeError. */
PyObject *mt_transport_core(mt_core_slot *cache, PyObject *transport, PyTypeObject *core_type);

#endif
