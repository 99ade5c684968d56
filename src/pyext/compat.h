/* Small shims over the CPython C API differences between 3.11 and 3.13. */
#ifndef MT_COMPAT_H
#define MT_COMPAT_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>

/* The raised exception as one object (normalized, traceback attached), with
 * the error indicator cleared.  Never NULL when an exception was set. */
static inline PyObject *mt_fetch_exception(void)
{
#if PY_VERSION_HEX >= 0x030C0000
    return PyErr_GetRaisedException();
#else
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    PyErr_NormalizeException(&type, &value, &tb);
    if (tb != NULL) {
        PyException_SetTraceback(value, tb);
        Py_DECREF(tb);
    }
    Py_XDECREF(type);
    return value;
#endif
}

static inline void mt_restore_exception(PyObject *exc)
{
#if PY_VERSION_HEX >= 0x030C0000
    PyErr_SetRaisedException(exc);
#else
    PyObject *tb = PyException_GetTraceback(exc);
    PyErr_Restore(Py_NewRef((PyObject *)Py_TYPE(exc)), exc, tb);
#endif
}

#endif
