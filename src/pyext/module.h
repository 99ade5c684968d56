/* Module-wide glue shared by the C types of mtloop._mtloop. */
#ifndef MT_MODULE_H
#define MT_MODULE_H

#include "pyext/compat.h"

/* Calls mtloop._helpers.<name>(*args): the cold paths kept in Python
 * (formatting, logging).  Returns a new reference or NULL. */
PyObject *mt_call_helper(const char *name, PyObject *const *args, size_t nargs);

#endif
