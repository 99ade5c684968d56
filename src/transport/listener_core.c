/* Listener: the loop-thread half of servers.  See listener_core.h. */
#include "transport/listener_core.h"

#include "pyext/module.h"
#include "transport/sockaddr.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <stddef.h>
#include <string.h>
#include <sys/un.h>
#include <unistd.h>

typedef struct {
    PyObject_HEAD
    mt_loop *loop;          /* strong */
    mt_listener *listener;  /* a reference until closed; its rec.io accepts */
    PyObject *on_accept;    /* on_accept(fd, address) */
    PyObject *on_error;     /* on_error(errno) */
    PyObject *last_host;    /* the previous peer's host string, shared with
                               the next peer from the same host */
    bool closed;
} mt_listener_obj;

/* ---- completion dispatch (the loop's ops) ------------------------------------ */

static void listener_discard(mt_msg *msg)
{
    if (msg->op == MT_LISTENER_ACCEPT) {
        mt_accepted *a = mt_msg_data(msg);
        if (a->fd >= 0)
            close(a->fd); /* accepted, never handed over */
    }
    mt_msg_free(msg);
}

static void signal_listener(mt_listener_obj *self, uint32_t bits)
{
    (void)mt_record_signal(&self->listener->rec, bits);
}

static int listener_dispatch(mt_loop *loop, mt_msg *msg)
{
    (void)loop;
    mt_listener *l = (mt_listener *)msg->rec;
    mt_listener_obj *self = l->rec.owner;
    if (msg->op == MT_LISTENER_ACCEPT && mt_listener_consumed(l, 1) && self != NULL &&
        !self->closed)
        signal_listener(self, MT_LISTENER_CREDIT);
    if (self == NULL || self->closed || msg->op == MT_OP_RELEASED) {
        listener_discard(msg);
        return 0;
    }
    Py_INCREF(self);
    PyObject *res = NULL;
    if (msg->op == MT_LISTENER_ACCEPT) {
        mt_accepted *a = mt_msg_data(msg);
        PyObject *addr = mt_sockaddr_to_py(&self->last_host, (struct sockaddr *)&a->addr, a->addrlen);
        if (addr != NULL) {
            int fd = a->fd;
            a->fd = -1; /* the callback owns it now */
            res = PyObject_CallFunction(self->on_accept, "iO", fd, addr);
            Py_DECREF(addr);
        }
    } else {
        res = PyObject_CallFunction(self->on_error, "i", msg->err);
    }
    listener_discard(msg);
    int rc = res == NULL ? mt_report_failed_call((PyObject *)self) : 0;
    Py_XDECREF(res);
    Py_DECREF(self);
    return rc;
}

static void release_listener(mt_listener_obj *self)
{
    mt_listener *l = self->listener;
    if (l == NULL)
        return;
    mt_loop_unlink(self->loop, &l->rec);
    l->rec.owner = NULL;
    self->listener = NULL;
    mt_record_decref(&l->rec);
}

static void listener_detach(mt_loop *loop, mt_record *rec)
{
    (void)loop;
    mt_listener_obj *self = rec->owner;
    Py_INCREF(self);
    self->closed = true;
    release_listener(self);
    Py_DECREF(self);
}

static const mt_loop_ops listener_loop_ops = {
    .dispatch = listener_dispatch,
    .discard = listener_discard,
    .detach = listener_detach,
};

/* ---- the type ------------------------------------------------------------------ */

static PyObject *listener_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"loop", "fd", "backlog", "on_accept", "on_error", "nodelay", NULL};
    PyObject *loop_obj, *on_accept, *on_error;
    int fd, backlog, nodelay = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O!iiOO|p:Listener", kwlist, &mt_LoopCoreType,
                                     &loop_obj, &fd, &backlog, &on_accept, &on_error, &nodelay))
        return NULL;
    mt_loop *loop = (mt_loop *)loop_obj;
    mt_io_thread *io = mt_loop_pick_io(loop);
    if (io == NULL)
        return NULL;
    mt_listener_obj *self = (mt_listener_obj *)type->tp_alloc(type, 0);
    if (self == NULL)
        return NULL;
    self->loop = (mt_loop *)Py_NewRef(loop_obj);
    self->on_accept = Py_NewRef(on_accept);
    self->on_error = Py_NewRef(on_error);
    int dup_fd = fcntl(fd, F_DUPFD_CLOEXEC, 0);
    if (dup_fd < 0) {
        Py_DECREF(self);
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    self->listener = mt_listener_new(&listener_loop_ops, loop->sink, io, dup_fd, backlog,
                                     nodelay);
    if (self->listener == NULL) {
        close(dup_fd);
        Py_DECREF(self);
        return PyErr_NoMemory();
    }
    self->listener->rec.owner = self;
    mt_loop_link(loop, &self->listener->rec);
    signal_listener(self, MT_LISTENER_LISTEN);
    return (PyObject *)self;
}

static PyObject *listener_close(mt_listener_obj *self, PyObject *Py_UNUSED(a))
{
    if (mt_loop_check_fork(self->loop) < 0)
        return NULL;
    if (!self->closed) {
        self->closed = true;
        if (self->listener != NULL)
            signal_listener(self, MT_LISTENER_UNLISTEN);
        release_listener(self);
    }
    Py_RETURN_NONE;
}

static int listener_traverse(mt_listener_obj *self, visitproc visit, void *arg)
{
    Py_VISIT(self->loop);
    Py_VISIT(self->on_accept);
    Py_VISIT(self->on_error);
    Py_VISIT(self->last_host);
    return 0;
}

static int listener_clear(mt_listener_obj *self)
{
    Py_CLEAR(self->on_accept);
    Py_CLEAR(self->on_error);
    Py_CLEAR(self->last_host);
    return 0;
}

static void listener_dealloc(mt_listener_obj *self)
{
    PyObject_GC_UnTrack(self);
    /* As for transports: an exception in flight must survive this. */
    PyObject *exc = PyErr_Occurred() ? mt_fetch_exception() : NULL;
    if (self->listener != NULL) {
        /* Not linked (the loop's list would have kept this object). */
        if (!self->closed && self->loop->fork_generation == mt_fork_generation())
            signal_listener(self, MT_LISTENER_UNLISTEN);
        self->listener->rec.owner = NULL;
        mt_record_decref(&self->listener->rec);
        self->listener = NULL;
    }
    listener_clear(self);
    Py_CLEAR(self->loop);
    Py_TYPE(self)->tp_free((PyObject *)self);
    if (exc != NULL)
        mt_restore_exception(exc);
}

static PyObject *listener_get_io_thread(mt_listener_obj *self, void *Py_UNUSED(c))
{
    if (self->listener == NULL)
        Py_RETURN_NONE;
    return PyLong_FromLong(mt_io_thread_index(self->listener->rec.io));
}

static PyGetSetDef listener_getset[] = {
    {"io_thread", (getter)listener_get_io_thread, NULL, "Index of the accepting I/O thread.", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyMethodDef listener_methods[] = {
    {"close", (PyCFunction)listener_close, METH_NOARGS,
     "Stop accepting; the I/O thread closes its copy of the socket."},
    {NULL, NULL, 0, NULL},
};

PyTypeObject mt_ListenerType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "mtloop._mtloop.Listener",
    .tp_doc = "A server socket accepted on by an I/O thread.",
    .tp_basicsize = sizeof(mt_listener_obj),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_new = listener_new,
    .tp_dealloc = (destructor)listener_dealloc,
    .tp_traverse = (traverseproc)listener_traverse,
    .tp_clear = (inquiry)listener_clear,
    .tp_methods = listener_methods,
    .tp_getset = listener_getset,
};

int mt_listener_core_type_init(PyObject *module)
{
    if (PyType_Ready(&mt_ListenerType) < 0)
        return -1;
    return PyModule_AddObjectRef(module, "Listener", (PyObject *)&mt_ListenerType);
}
