/* Building and running asyncio handles from C.  See handle.h. */
#include "loop/handle.h"

#include <descrobject.h>
#include <structmember.h>

#include "loop/loop.h"

mt_handle_layout mt_handles;

static int slot_offset(PyTypeObject *type, const char *name, Py_ssize_t *offset)
{
    PyObject *descr = PyObject_GetAttrString((PyObject *)type, name);
    if (descr == NULL)
        return -1;
    int ok = Py_IS_TYPE(descr, &PyMemberDescr_Type) &&
             ((PyMemberDescrObject *)descr)->d_member->type == T_OBJECT_EX;
    if (ok)
        *offset = ((PyMemberDescrObject *)descr)->d_member->offset;
    Py_DECREF(descr);
    if (!ok) {
        PyErr_Format(PyExc_ImportError,
                     "mtloop needs %s.%s to be a __slots__ member", type->tp_name, name);
        return -1;
    }
    return 0;
}

int mt_handles_init(void)
{
    PyObject *events = PyImport_ImportModule("asyncio.events");
    if (events == NULL)
        return -1;
    mt_handles.handle_type = (PyTypeObject *)PyObject_GetAttrString(events, "Handle");
    mt_handles.timer_type = (PyTypeObject *)PyObject_GetAttrString(events, "TimerHandle");
    Py_DECREF(events);
    if (mt_handles.handle_type == NULL || mt_handles.timer_type == NULL)
        return -1;
    /* The module keeps these references for the life of the process. */
    PyTypeObject *h = mt_handles.handle_type, *t = mt_handles.timer_type;
    if (slot_offset(h, "_callback", &mt_handles.callback) < 0 ||
        slot_offset(h, "_args", &mt_handles.args) < 0 ||
        slot_offset(h, "_cancelled", &mt_handles.cancelled) < 0 ||
        slot_offset(h, "_loop", &mt_handles.loop) < 0 ||
        slot_offset(h, "_source_traceback", &mt_handles.source_traceback) < 0 ||
        slot_offset(h, "_repr", &mt_handles.repr) < 0 ||
        slot_offset(h, "_context", &mt_handles.context) < 0 ||
        slot_offset(t, "_when", &mt_handles.when) < 0 ||
        slot_offset(t, "_scheduled", &mt_handles.scheduled) < 0)
        return -1;
    return 0;
}

static PyObject *handle_alloc(PyTypeObject *type, mt_loop *loop, PyObject *callback,
                              PyObject *const *args, Py_ssize_t nargs, PyObject *context)
{
    PyObject *tuple = PyTuple_New(nargs);
    if (tuple == NULL)
        return NULL;
    for (Py_ssize_t i = 0; i < nargs; i++)
        PyTuple_SET_ITEM(tuple, i, Py_NewRef(args[i]));
    if (context == NULL || context == Py_None)
        context = PyContext_CopyCurrent();
    else
        Py_INCREF(context);
    if (context == NULL) {
        Py_DECREF(tuple);
        return NULL;
    }
    /* The slots of a fresh object are NULL: fill them, stealing the refs. */
    PyObject *h = type->tp_alloc(type, 0);
    if (h == NULL) {
        Py_DECREF(tuple);
        Py_DECREF(context);
        return NULL;
    }
    MT_SLOT(h, mt_handles.callback) = Py_NewRef(callback);
    MT_SLOT(h, mt_handles.args) = tuple;
    MT_SLOT(h, mt_handles.context) = context;
    MT_SLOT(h, mt_handles.loop) = Py_NewRef((PyObject *)loop);
    MT_SLOT(h, mt_handles.cancelled) = Py_NewRef(Py_False);
    MT_SLOT(h, mt_handles.repr) = Py_NewRef(Py_None);
    PyObject *tb = loop->debug ? mt_loop_source_traceback(loop) : Py_NewRef(Py_None);
    if (tb == NULL) {
        Py_DECREF(h);
        return NULL;
    }
    MT_SLOT(h, mt_handles.source_traceback) = tb;
    return h;
}

PyObject *mt_handle_new(mt_loop *loop, PyObject *callback, PyObject *const *args,
                        Py_ssize_t nargs, PyObject *context)
{
    return handle_alloc(mt_handles.handle_type, loop, callback, args, nargs, context);
}

PyObject *mt_timer_handle_new(mt_loop *loop, double when, PyObject *callback,
                              PyObject *const *args, Py_ssize_t nargs, PyObject *context)
{
    PyObject *h = handle_alloc(mt_handles.timer_type, loop, callback, args, nargs, context);
    if (h == NULL)
        return NULL;
    MT_SLOT(h, mt_handles.scheduled) = Py_NewRef(Py_False);
    if ((MT_SLOT(h, mt_handles.when) = PyFloat_FromDouble(when)) == NULL) {
        Py_DECREF(h);
        return NULL;
    }
    return h;
}

int mt_handle_check_cancelled(PyObject *h)
{
    if (mt_handle_is_native(h))
        return mt_handle_is_cancelled(h);
    PyObject *c = PyObject_GetAttrString(h, "_cancelled");
    if (c == NULL)
        return -1;
    int cancelled = PyObject_IsTrue(c);
    Py_DECREF(c);
    return cancelled;
}

static PyObject *call_in_context(PyObject *context, PyObject *callback, PyObject *args)
{
    PyObject *const *items = &PyTuple_GET_ITEM(args, 0);
    Py_ssize_t n = PyTuple_GET_SIZE(args);
    if (PyContext_CheckExact(context)) {
        if (PyContext_Enter(context) < 0)
            return NULL;
        PyObject *res = PyObject_Vectorcall(callback, items, n, NULL);
        if (PyContext_Exit(context) < 0) {
            Py_XDECREF(res);
            return NULL;
        }
        return res;
    }
    /* Any other object: do what Handle._run() does and call its run(). */
    PyObject *run = PyObject_GetAttrString(context, "run");
    if (run == NULL)
        return NULL;
    PyObject *full = PyTuple_New(n + 1);
    if (full == NULL) {
        Py_DECREF(run);
        return NULL;
    }
    PyTuple_SET_ITEM(full, 0, Py_NewRef(callback));
    for (Py_ssize_t i = 0; i < n; i++)
        PyTuple_SET_ITEM(full, i + 1, Py_NewRef(items[i]));
    PyObject *res = PyObject_Call(run, full, NULL);
    Py_DECREF(run);
    Py_DECREF(full);
    return res;
}

int mt_handle_run(mt_loop *loop, PyObject *h)
{
    if (!mt_handle_is_native(h)) {
        PyObject *res = PyObject_CallMethod(h, "_run", NULL);
        Py_XDECREF(res);
        return res == NULL ? -1 : 0;
    }
    PyObject *callback = MT_SLOT(h, mt_handles.callback);
    PyObject *args = MT_SLOT(h, mt_handles.args);
    PyObject *context = MT_SLOT(h, mt_handles.context);
    if (callback == NULL || args == NULL || !PyTuple_Check(args) || context == NULL) {
        PyErr_Format(PyExc_RuntimeError, "malformed handle %R", h);
        return -1;
    }
    /* The callback may cancel its own handle, which clears these slots. */
    Py_INCREF(callback);
    Py_INCREF(args);
    Py_INCREF(context);
    PyObject *res = call_in_context(context, callback, args);
    Py_DECREF(callback);
    Py_DECREF(args);
    Py_DECREF(context);
    if (res != NULL) {
        Py_DECREF(res);
        return 0;
    }
    if (PyErr_ExceptionMatches(PyExc_SystemExit) ||
        PyErr_ExceptionMatches(PyExc_KeyboardInterrupt))
        return -1;
    return mt_loop_report_callback_error(loop, h, mt_fetch_exception());
}

int mt_handle_cancel(PyObject *h)
{
    PyObject *res = PyObject_CallMethod(h, "cancel", NULL);
    Py_XDECREF(res);
    return res == NULL ? -1 : 0;
}
