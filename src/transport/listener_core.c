/* Listener: the loop-thread half of servers.  See listener_core.h. */
#include "transport/listener_core.h"

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
    mt_listener *listener;  /* a reference; its obj.io is the accepting thread */
    PyObject *on_accept;    /* on_accept(fd, address) */
    PyObject *on_error;     /* on_error(errno) */
    PyObject *last_host;    /* the previous peer's host string, shared with
                               the next peer from the same host */
    bool closed;
} mt_listener_obj;

/* The host string for `text`: the previous peer's object when it is the
 * same host (many connections come from few hosts; each string is about
 * 60 bytes a connection kept in peername).  New reference or NULL. */
static PyObject *peer_host(mt_listener_obj *self, const char *text)
{
    const char *prev = self->last_host != NULL ? PyUnicode_AsUTF8(self->last_host) : NULL;
    if (prev != NULL && strcmp(prev, text) == 0)
        return Py_NewRef(self->last_host);
    PyErr_Clear(); /* an unencodable previous host only means no sharing */
    PyObject *host = PyUnicode_FromString(text);
    if (host != NULL)
        Py_XSETREF(self->last_host, Py_NewRef(host));
    return host;
}

/* A socket address as the socket module returns it, or NULL. */
static PyObject *sockaddr_to_py(mt_listener_obj *self, const struct sockaddr *sa, socklen_t len)
{
    char text[INET6_ADDRSTRLEN];
    PyObject *host, *addr;
    switch (sa->sa_family) {
    case AF_INET: {
        const struct sockaddr_in *in = (const struct sockaddr_in *)sa;
        inet_ntop(AF_INET, &in->sin_addr, text, sizeof(text));
        if ((host = peer_host(self, text)) == NULL)
            return NULL;
        addr = Py_BuildValue("(Oi)", host, ntohs(in->sin_port));
        Py_DECREF(host);
        return addr;
    }
    case AF_INET6: {
        const struct sockaddr_in6 *in6 = (const struct sockaddr_in6 *)sa;
        inet_ntop(AF_INET6, &in6->sin6_addr, text, sizeof(text));
        if ((host = peer_host(self, text)) == NULL)
            return NULL;
        addr = Py_BuildValue("(OiII)", host, ntohs(in6->sin6_port),
                             (unsigned)ntohl(in6->sin6_flowinfo), (unsigned)in6->sin6_scope_id);
        Py_DECREF(host);
        return addr;
    }
    case AF_UNIX: {
        const struct sockaddr_un *un = (const struct sockaddr_un *)sa;
        size_t off = offsetof(struct sockaddr_un, sun_path);
        if (len <= off)
            return PyUnicode_FromString("");
        size_t n = len - off;
        if (un->sun_path[0] == '\0') /* Linux abstract namespace */
            return PyBytes_FromStringAndSize(un->sun_path, (Py_ssize_t)n);
        return PyUnicode_DecodeFSDefaultAndSize(un->sun_path,
                                                (Py_ssize_t)strnlen(un->sun_path, n));
    }
    default:
        return Py_BuildValue("(iy#)", sa->sa_family, (const char *)sa, (Py_ssize_t)len);
    }
}

static int call_failed(PyObject *ctx)
{
    if (PyErr_ExceptionMatches(PyExc_SystemExit) ||
        PyErr_ExceptionMatches(PyExc_KeyboardInterrupt))
        return -1;
    PyErr_WriteUnraisable(ctx);
    return 0;
}

int mt_listener_core_dispatch(mt_loop *loop, mt_done *done)
{
    (void)loop;
    mt_listener *l = (mt_listener *)done->source;
    mt_listener_obj *self = l->core;
    if (self == NULL || self->closed) {
        mt_done_free(done); /* closes an accepted fd */
        return 0;
    }
    Py_INCREF(self);
    int rc = 0;
    PyObject *res = NULL;
    if (done->kind == MT_DONE_ACCEPT) {
        PyObject *addr = sockaddr_to_py(self, (struct sockaddr *)done->addr, done->addrlen);
        if (addr != NULL) {
            int fd = done->fd;
            done->fd = -1; /* the callback owns it now */
            res = PyObject_CallFunction(self->on_accept, "iO", fd, addr);
            Py_DECREF(addr);
        }
    } else {
        res = PyObject_CallFunction(self->on_error, "i", done->err);
    }
    mt_done_free(done);
    if (res == NULL)
        rc = call_failed((PyObject *)self);
    Py_XDECREF(res);
    Py_DECREF(self);
    return rc;
}

static void post(mt_listener_obj *self, mt_cmd_kind kind)
{
    mt_cmd *cmd = mt_cmd_new(kind, &self->listener->obj, 0);
    if (cmd == NULL) {
        PyErr_NoMemory();
        PyErr_WriteUnraisable((PyObject *)self);
        return;
    }
    mt_loop_post(self->listener->obj.io, cmd);
}

static PyObject *listener_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"loop", "fd", "backlog", "on_accept", "on_error", NULL};
    PyObject *loop_obj, *on_accept, *on_error;
    int fd, backlog;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O!iiOO:Listener", kwlist, &mt_LoopCoreType,
                                     &loop_obj, &fd, &backlog, &on_accept, &on_error))
        return NULL;
    mt_loop *loop = (mt_loop *)loop_obj;
    mt_io_thread *io = mt_loop_pick_io(loop);
    if (io == NULL)
        return NULL;
    int dup_fd = fcntl(fd, F_DUPFD_CLOEXEC, 0);
    if (dup_fd < 0)
        return PyErr_SetFromErrno(PyExc_OSError);
    mt_listener_obj *self = (mt_listener_obj *)type->tp_alloc(type, 0);
    if (self == NULL) {
        close(dup_fd);
        return NULL;
    }
    self->listener = mt_listener_new(loop->sink, io, dup_fd, backlog);
    if (self->listener == NULL) {
        close(dup_fd);
        Py_DECREF(self);
        return PyErr_NoMemory();
    }
    self->listener->core = self;
    self->loop = (mt_loop *)Py_NewRef(loop_obj);
    self->on_accept = Py_NewRef(on_accept);
    self->on_error = Py_NewRef(on_error);
    post(self, MT_CMD_LISTEN);
    return (PyObject *)self;
}

static PyObject *listener_close(mt_listener_obj *self, PyObject *Py_UNUSED(a))
{
    if (!self->closed) {
        self->closed = true;
        if (mt_loop_check_usable(self->loop) == 0)
            post(self, MT_CMD_UNLISTEN);
        PyErr_Clear();
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
    if (self->listener != NULL) {
        if (self->loop != NULL)
            listener_close(self, NULL);
        self->listener->core = NULL;
        mt_io_obj_decref(&self->listener->obj);
    }
    listener_clear(self);
    Py_CLEAR(self->loop);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *listener_get_io_thread(mt_listener_obj *self, void *Py_UNUSED(c))
{
    return PyLong_FromLong(mt_io_thread_index(self->listener->obj.io));
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
