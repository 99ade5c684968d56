/* mtloop._mtloop: module initialisation and the glue shared by its types. */
#include "pyext/module.h"

#include <event2/event.h>

#include "loop/handle.h"
#include "loop/loop.h"

static PyObject *helpers; /* mtloop._helpers, imported on first use */

PyObject *mt_call_helper(const char *name, PyObject *const *args, size_t nargs)
{
    if (helpers == NULL) {
        helpers = PyImport_ImportModule("mtloop._helpers");
        if (helpers == NULL)
            return NULL;
    }
    PyObject *func = PyObject_GetAttrString(helpers, name);
    if (func == NULL)
        return NULL;
    PyObject *res = PyObject_Vectorcall(func, args, nargs, NULL);
    Py_DECREF(func);
    return res;
}

/* libevent reports problems on stderr by default; every failure that
 * matters to a caller already comes back as an error code, turned into a
 * Python exception, so its messages are dropped. */
static void quiet_libevent_log(int severity, const char *msg)
{
    (void)severity;
    (void)msg;
}

static PyObject *libevent_version(PyObject *Py_UNUSED(m), PyObject *Py_UNUSED(a))
{
    return PyUnicode_FromString(event_get_version());
}

static PyMethodDef module_methods[] = {
    {"libevent_version", libevent_version, METH_NOARGS, "The libevent version in use."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef mtloop_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "mtloop._mtloop",
    .m_doc = "The C core of mtloop.",
    .m_size = -1,
    .m_methods = module_methods,
};

PyMODINIT_FUNC PyInit__mtloop(void)
{
    event_set_log_callback(quiet_libevent_log);
    PyObject *m = PyModule_Create(&mtloop_module);
    if (m == NULL)
        return NULL;
    if (mt_handles_init() < 0 || mt_loop_type_init(m) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
