/* Handle and TimerHandle types.  See handle.h. */
#include "loop/handle.h"

#include <structmember.h>

#include "loop/loop.h"
#include "pyext/module.h"

static mt_handle *handle_alloc(PyTypeObject *type, mt_loop *loop, PyObject *callback,
                               PyObject *const *args, Py_ssize_t nargs, PyObject *context)
{
    mt_handle *h = PyObject_GC_New(mt_handle, type);
    if (h == NULL)
        return NULL;
    atomic_init(&h->node.next, NULL);
    h->loop = (mt_loop *)Py_NewRef((PyObject *)loop);
    h->callback = Py_NewRef(callback);
    h->args = PyTuple_New(nargs);
    if (h->args != NULL) {
        for (Py_ssize_t i = 0; i < nargs; i++)
            PyTuple_SET_ITEM(h->args, i, Py_NewRef(args[i]));
    }
    h->source_traceback = NULL;
    h->repr = NULL;
    h->weakreflist = NULL;
    h->cancelled = 0;
    if (context == NULL || context == Py_None)
        h->context = PyContext_CopyCurrent();
    else
        h->context = Py_NewRef(context);
    if (type == &mt_TimerHandleType) {
        ((mt_timer_handle *)h)->when = 0.0;
        ((mt_timer_handle *)h)->scheduled = 0;
    }
    PyObject_GC_Track(h);
    if (h->args == NULL || h->context == NULL) {
        Py_DECREF(h);
        return NULL;
    }
    if (loop->debug) {
        h->source_traceback = mt_loop_source_traceback(loop);
        if (h->source_traceback == NULL) {
            Py_DECREF(h);
            return NULL;
        }
    }
    return h;
}

mt_handle *mt_handle_new(mt_loop *loop, PyObject *callback, PyObject *const *args,
                         Py_ssize_t nargs, PyObject *context)
{
    return handle_alloc(&mt_HandleType, loop, callback, args, nargs, context);
}

mt_timer_handle *mt_timer_handle_new(mt_loop *loop, double when, PyObject *callback,
                                     PyObject *const *args, Py_ssize_t nargs,
                                     PyObject *context)
{
    mt_timer_handle *t = (mt_timer_handle *)handle_alloc(&mt_TimerHandleType, loop, callback,
                                                         args, nargs, context);
    if (t != NULL)
        t->when = when;
    return t;
}

static PyObject *call_in_context(mt_handle *h)
{
    PyObject *const *items = &PyTuple_GET_ITEM(h->args, 0);
    Py_ssize_t n = PyTuple_GET_SIZE(h->args);
    if (PyContext_CheckExact(h->context)) {
        if (PyContext_Enter(h->context) < 0)
            return NULL;
        PyObject *res = PyObject_Vectorcall(h->callback, items, n, NULL);
        if (PyContext_Exit(h->context) < 0) {
            Py_XDECREF(res);
            return NULL;
        }
        return res;
    }
    /* A context-like object: behave as asyncio does and call its run(). */
    PyObject *run = PyObject_GetAttrString(h->context, "run");
    if (run == NULL)
        return NULL;
    PyObject *full = PyTuple_New(n + 1);
    if (full == NULL) {
        Py_DECREF(run);
        return NULL;
    }
    PyTuple_SET_ITEM(full, 0, Py_NewRef(h->callback));
    for (Py_ssize_t i = 0; i < n; i++)
        PyTuple_SET_ITEM(full, i + 1, Py_NewRef(items[i]));
    PyObject *res = PyObject_Call(run, full, NULL);
    Py_DECREF(run);
    Py_DECREF(full);
    return res;
}

int mt_handle_run(mt_handle *h)
{
    if (h->cancelled)
        return 0;
    /* The callback may cancel its own handle, which drops these. */
    PyObject *callback = Py_NewRef(h->callback);
    PyObject *args = Py_NewRef(h->args);
    Py_INCREF(h);
    PyObject *res = call_in_context(h);
    Py_DECREF(callback);
    Py_DECREF(args);
    int rc = 0;
    if (res != NULL) {
        Py_DECREF(res);
    } else if (PyErr_ExceptionMatches(PyExc_SystemExit) ||
               PyErr_ExceptionMatches(PyExc_KeyboardInterrupt)) {
        rc = -1;
    } else {
        rc = mt_loop_report_callback_error(h->loop, (PyObject *)h, mt_fetch_exception());
    }
    Py_DECREF(h);
    return rc;
}

int mt_handle_cancel(mt_handle *h)
{
    if (h->cancelled)
        return 0;
    if (Py_IS_TYPE(h, &mt_TimerHandleType) && ((mt_timer_handle *)h)->scheduled)
        h->loop->timer_cancelled_count++;
    if (h->loop->debug && h->repr == NULL) {
        /* Keep the description of what was cancelled for debugging. */
        h->repr = PyObject_Repr((PyObject *)h);
        if (h->repr == NULL)
            return -1;
    }
    h->cancelled = 1;
    Py_CLEAR(h->callback);
    Py_CLEAR(h->args);
    return 0;
}

/* ---- Python methods ---------------------------------------------------- */

static PyObject *handle_cancel(mt_handle *self, PyObject *Py_UNUSED(ignored))
{
    if (mt_handle_cancel(self) < 0)
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *handle_cancelled(mt_handle *self, PyObject *Py_UNUSED(ignored))
{
    return PyBool_FromLong(self->cancelled);
}

static PyObject *handle_get_context(mt_handle *self, PyObject *Py_UNUSED(ignored))
{
    return Py_NewRef(self->context);
}

static PyObject *handle_run_method(mt_handle *self, PyObject *Py_UNUSED(ignored))
{
    if (mt_handle_run(self) < 0)
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *handle_repr(mt_handle *self)
{
    if (self->repr != NULL)
        return Py_NewRef(self->repr);
    PyObject *arg = (PyObject *)self;
    return mt_call_helper("handle_repr", &arg, 1);
}

static int handle_traverse(mt_handle *self, visitproc visit, void *arg)
{
    Py_VISIT(self->loop);
    Py_VISIT(self->callback);
    Py_VISIT(self->args);
    Py_VISIT(self->context);
    Py_VISIT(self->source_traceback);
    return 0;
}

static int handle_clear(mt_handle *self)
{
    Py_CLEAR(self->callback);
    Py_CLEAR(self->args);
    Py_CLEAR(self->context);
    Py_CLEAR(self->source_traceback);
    Py_CLEAR(self->repr);
    Py_CLEAR(self->loop);
    return 0;
}

static void handle_dealloc(mt_handle *self)
{
    PyObject_GC_UnTrack(self);
    if (self->weakreflist != NULL)
        PyObject_ClearWeakRefs((PyObject *)self);
    handle_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *get_or_none(PyObject *v)
{
    return Py_NewRef(v != NULL ? v : Py_None);
}

static PyObject *handle_get_callback(mt_handle *self, void *Py_UNUSED(c)) { return get_or_none(self->callback); }
static PyObject *handle_get_args(mt_handle *self, void *Py_UNUSED(c)) { return get_or_none(self->args); }
static PyObject *handle_get_loop(mt_handle *self, void *Py_UNUSED(c)) { return get_or_none((PyObject *)self->loop); }
static PyObject *handle_get_ctx(mt_handle *self, void *Py_UNUSED(c)) { return get_or_none(self->context); }
static PyObject *handle_get_cancelled(mt_handle *self, void *Py_UNUSED(c)) { return PyBool_FromLong(self->cancelled); }
static PyObject *handle_get_tb(mt_handle *self, void *Py_UNUSED(c)) { return get_or_none(self->source_traceback); }
static PyObject *handle_get_repr(mt_handle *self, void *Py_UNUSED(c)) { return get_or_none(self->repr); }

static PyMethodDef handle_methods[] = {
    {"cancel", (PyCFunction)handle_cancel, METH_NOARGS, "Cancel the call."},
    {"cancelled", (PyCFunction)handle_cancelled, METH_NOARGS, "Whether the call was cancelled."},
    {"get_context", (PyCFunction)handle_get_context, METH_NOARGS, "The contextvars.Context the callback runs in."},
    {"_run", (PyCFunction)handle_run_method, METH_NOARGS, NULL},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef handle_getset[] = {
    {"_callback", (getter)handle_get_callback, NULL, NULL, NULL},
    {"_args", (getter)handle_get_args, NULL, NULL, NULL},
    {"_loop", (getter)handle_get_loop, NULL, NULL, NULL},
    {"_context", (getter)handle_get_ctx, NULL, NULL, NULL},
    {"_cancelled", (getter)handle_get_cancelled, NULL, NULL, NULL},
    {"_source_traceback", (getter)handle_get_tb, NULL, NULL, NULL},
    {"_repr", (getter)handle_get_repr, NULL, NULL, NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

PyTypeObject mt_HandleType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "mtloop.Handle",
    .tp_doc = "A callback scheduled on an mtloop loop (like asyncio.Handle).",
    .tp_basicsize = sizeof(mt_handle),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_BASETYPE,
    .tp_dealloc = (destructor)handle_dealloc,
    .tp_traverse = (traverseproc)handle_traverse,
    .tp_clear = (inquiry)handle_clear,
    .tp_repr = (reprfunc)handle_repr,
    .tp_methods = handle_methods,
    .tp_getset = handle_getset,
    .tp_weaklistoffset = offsetof(mt_handle, weakreflist),
};

/* ---- TimerHandle ------------------------------------------------------- */

static PyObject *timer_when(mt_timer_handle *self, PyObject *Py_UNUSED(ignored))
{
    return PyFloat_FromDouble(self->when);
}

static PyObject *timer_get_when(mt_timer_handle *self, void *Py_UNUSED(c))
{
    return PyFloat_FromDouble(self->when);
}

static PyObject *timer_get_scheduled(mt_timer_handle *self, void *Py_UNUSED(c))
{
    return PyBool_FromLong(self->scheduled);
}

static Py_hash_t timer_hash(mt_timer_handle *self)
{
    PyObject *f = PyFloat_FromDouble(self->when);
    if (f == NULL)
        return -1;
    Py_hash_t h = PyObject_Hash(f);
    Py_DECREF(f);
    return h;
}

static PyObject *timer_richcompare(PyObject *a, PyObject *b, int op)
{
    if (!PyObject_TypeCheck(b, &mt_TimerHandleType))
        Py_RETURN_NOTIMPLEMENTED;
    mt_timer_handle *x = (mt_timer_handle *)a, *y = (mt_timer_handle *)b;
    if (op == Py_EQ || op == Py_NE) {
        int eq = x->when == y->when && x->base.cancelled == y->base.cancelled;
        if (eq && x != y) {
            PyObject *l = x->base.callback ? x->base.callback : Py_None;
            PyObject *r = y->base.callback ? y->base.callback : Py_None;
            eq = PyObject_RichCompareBool(l, r, Py_EQ);
            if (eq > 0) {
                l = x->base.args ? x->base.args : Py_None;
                r = y->base.args ? y->base.args : Py_None;
                eq = PyObject_RichCompareBool(l, r, Py_EQ);
            }
            if (eq < 0)
                return NULL;
        }
        return PyBool_FromLong(op == Py_EQ ? eq : !eq);
    }
    Py_RETURN_RICHCOMPARE(x->when, y->when, op);
}

static PyObject *timer_cancel(mt_timer_handle *self, PyObject *Py_UNUSED(ignored))
{
    if (mt_handle_cancel(&self->base) < 0)
        return NULL;
    Py_RETURN_NONE;
}

static PyMethodDef timer_methods[] = {
    {"when", (PyCFunction)timer_when, METH_NOARGS, "The loop time the callback is scheduled for."},
    {"cancel", (PyCFunction)timer_cancel, METH_NOARGS, "Cancel the call."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef timer_getset[] = {
    {"_when", (getter)timer_get_when, NULL, NULL, NULL},
    {"_scheduled", (getter)timer_get_scheduled, NULL, NULL, NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

PyTypeObject mt_TimerHandleType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "mtloop.TimerHandle",
    .tp_doc = "A callback scheduled for a time on an mtloop loop (like asyncio.TimerHandle).",
    .tp_basicsize = sizeof(mt_timer_handle),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_base = &mt_HandleType,
    .tp_traverse = (traverseproc)handle_traverse,
    .tp_clear = (inquiry)handle_clear,
    .tp_hash = (hashfunc)timer_hash,
    .tp_richcompare = timer_richcompare,
    .tp_methods = timer_methods,
    .tp_getset = timer_getset,
};

int mt_handle_types_init(PyObject *module)
{
    if (PyType_Ready(&mt_HandleType) < 0 || PyType_Ready(&mt_TimerHandleType) < 0)
        return -1;
    if (PyModule_AddObjectRef(module, "Handle", (PyObject *)&mt_HandleType) < 0 ||
        PyModule_AddObjectRef(module, "TimerHandle", (PyObject *)&mt_TimerHandleType) < 0)
        return -1;
    return 0;
}
