/* DatagramCore: the loop-thread half of datagram endpoints.  See
 * datagram_core.h; the Python half is mtloop/_datagram.py, the I/O half
 * datagram_io.c. */
#include "transport/datagram_core.h"

#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <string.h>
#include <structmember.h>
#include <unistd.h>

#include "pyext/module.h"
#include "transport/sockaddr.h"

#define DEFAULT_HIGH_WATER (64 * 1024)


/* Senders' addresses, as Python objects: a datagram from an address seen
 * lately gets the same tuple as the last one (no inet_ntop(), no new
 * tuple), and a reply sendto() with that tuple finds its sockaddr without
 * parsing it.  Direct-mapped by the sockaddr's bytes, and by the object's
 * address for the way back; IP addresses only.  Each entry holds its
 * object, so an object found by address is the entry's own. */
#define ADDR_CACHE 256 /* 32 senders collided often in 64: ~10 KiB, made on first use */

typedef struct addr_entry {
    PyObject *obj;                /* strong, or NULL */
    socklen_t len;
    struct sockaddr_in6 sa;       /* the largest IP sockaddr */
} addr_entry;

typedef struct addr_cache {
    addr_entry entry[ADDR_CACHE];
    uint16_t by_obj[ADDR_CACHE]; /* 1 + the entry whose object hashes here; 0 none */
} addr_cache;

typedef struct mt_dgram_core {
    PyObject_HEAD
    mt_loop *loop;               /* strong */
    mt_dgram *dgram;             /* a reference until release() */
    PyObject *transport;         /* strong until RELEASED is dispatched */
    PyObject *protocol;
    PyObject *datagram_received; /* bound method, cached; cleared by set_protocol() */
    PyObject *address;           /* the connected peer (sendto's default), or None */
    PyObject *last_host;         /* the last sender's host string */
    struct addr_cache *addrs;    /* NULL until a datagram comes from an IP address */
    int family;
    bool sends_empty;            /* sendto(b"") sends (newer asyncio) or drops */
    bool closing, closed;
    int conn_lost;
    mt_out_view out;             /* write accounting over the record's marks */
} mt_dgram_core;

static const mt_loop_ops dgram_loop_ops;
static PyObject *sendto_slow_name; /* interned "_mt_sendto_slow" */

static void signal_dgram(mt_dgram_core *self, uint32_t bits)
{
    if (self->dgram != NULL)
        (void)mt_record_signal(&self->dgram->rec, bits); /* a stopped pool released it */
}

static void release_dgram(mt_dgram_core *self)
{
    mt_dgram *d = self->dgram;
    if (d == NULL)
        return;
    mt_loop_unlink(self->loop, &d->rec);
    d->rec.owner = NULL;
    self->dgram = NULL;
    mt_dgram_drop_fd(d);
    mt_record_decref(&d->rec);
}

/* ---- calling into Python ------------------------------------------------------ */

/* Reports a failed call; -1 for what must leave the run loop. */
static int call_failed(mt_dgram_core *self)
{
    return mt_report_failed_call(self->transport ? self->transport : (PyObject *)self);
}

static int call_transport(mt_dgram_core *self, const char *method, PyObject *arg)
{
    if (self->transport == NULL)
        return 0;
    PyObject *name = PyUnicode_FromString(method);
    if (name == NULL)
        return call_failed(self);
    PyObject *args[2] = {self->transport, arg};
    PyObject *res = PyObject_VectorcallMethod(name, args,
                                              (arg ? 2 : 1) | PY_VECTORCALL_ARGUMENTS_OFFSET, NULL);
    Py_DECREF(name);
    if (res == NULL)
        return call_failed(self);
    Py_DECREF(res);
    return 0;
}

/* A protocol callback raised: as the stock loop reports an exception of
 * its _read_ready() callback, through the exception handler, and the
 * endpoint stays open. */
static int protocol_raised(mt_dgram_core *self)
{
    if (mt_exception_must_propagate())
        return -1;
    PyObject *exc = mt_fetch_exception();
    int rc = call_transport(self, "_mt_callback_error", exc);
    Py_DECREF(exc);
    return rc;
}

/* ---- write-side accounting ---------------------------------------------------- */

static uint64_t write_buffer_size(mt_dgram_core *self)
{
    if (self->closed || self->dgram == NULL)
        return 0;
    return mt_out_size(&self->out, &self->dgram->marks);
}

/* Reports DRAINED from the loop thread: the mark was reached already. */
static void push_drained(mt_dgram_core *self)
{
    mt_msg *msg = mt_msg_new(MT_DGRAM_DRAINED, &self->dgram->rec, 0);
    if (msg != NULL)
        mt_sink_push(self->loop->sink, msg, msg, true);
}

static int on_blocked(mt_dgram_core *self)
{
    if (self->closing || !mt_out_blocked_pauses(&self->out, &self->dgram->marks))
        return 0;
    return call_transport(self, "_maybe_pause_protocol", NULL);
}

static int on_drained(mt_dgram_core *self)
{
    if (!self->out.paused || self->conn_lost || self->dgram == NULL)
        return 0;
    bool report_now;
    if (mt_out_drained_resumes(&self->out, &self->dgram->marks, &report_now))
        return call_transport(self, "_maybe_resume_protocol", NULL);
    if (report_now)
        push_drained(self);
    return 0;
}

/* ---- the address cache ----------------------------------------------------------- */

static unsigned sockaddr_slot(const void *sa, socklen_t len)
{
    uint32_t h = 2166136261u; /* FNV-1a */
    for (socklen_t i = 0; i < len; i++)
        h = (h ^ ((const uint8_t *)sa)[i]) * 16777619u;
    return (h ^ (h >> 16)) % ADDR_CACHE;
}

static unsigned object_slot(PyObject *obj)
{
    uintptr_t p = (uintptr_t)obj;
    return (unsigned)((p >> 4) ^ (p >> 12)) % ADDR_CACHE;
}

/* The Python address for a sender: new reference, or NULL. */
static PyObject *sender_address(mt_dgram_core *self, const struct sockaddr *sa, socklen_t len)
{
    if ((sa->sa_family != AF_INET && sa->sa_family != AF_INET6) ||
        len > sizeof(struct sockaddr_in6))
        return mt_sockaddr_to_py(&self->last_host, sa, len);
    if (self->addrs == NULL && (self->addrs = PyMem_Calloc(1, sizeof(addr_cache))) == NULL)
        return mt_sockaddr_to_py(&self->last_host, sa, len);
    addr_entry *e = &self->addrs->entry[sockaddr_slot(sa, len)];
    if (e->obj != NULL && e->len == len && memcmp(&e->sa, sa, len) == 0)
        return Py_NewRef(e->obj);
    PyObject *obj = mt_sockaddr_to_py(&self->last_host, sa, len);
    if (obj == NULL)
        return NULL;
    Py_XSETREF(e->obj, Py_NewRef(obj));
    e->len = len;
    memcpy(&e->sa, sa, len);
    self->addrs->by_obj[object_slot(obj)] = (uint16_t)(1 + (e - self->addrs->entry));
    return obj;
}

/* The sockaddr of an address object the cache handed out, or NULL. */
static const addr_entry *known_address(mt_dgram_core *self, PyObject *obj)
{
    if (self->addrs == NULL)
        return NULL;
    unsigned i = self->addrs->by_obj[object_slot(obj)];
    if (i == 0 || self->addrs->entry[i - 1].obj != obj)
        return NULL;
    return &self->addrs->entry[i - 1];
}

static void clear_addresses(mt_dgram_core *self)
{
    addr_cache *c = self->addrs;
    if (c == NULL)
        return;
    self->addrs = NULL;
    for (int i = 0; i < ADDR_CACHE; i++)
        Py_CLEAR(c->entry[i].obj);
    PyMem_Free(c);
}

/* ---- sendto ------------------------------------------------------------------- */


/* Queues one datagram for the I/O thread.  (Sending it from the loop
 * thread when the I/O thread sleeps, as a byte stream's direct send does,
 * was measured and dropped: tools/bench.py --udp put the threaded echo of
 * 1 KiB x32 at 0.69x the queued build's datagrams/s and 1.65x its loop
 * thread's CPU per datagram, and inline I/O gained nothing over sendmmsg()
 * at the end of the iteration.) */
static PyObject *queue_send(mt_dgram_core *self, const void *buf, size_t len,
                            const struct sockaddr *sa, socklen_t salen)
{
    mt_msg *msg = mt_dgram_send_new(&self->dgram->rec, sa, salen, len);
    if (msg == NULL)
        return PyErr_NoMemory();
    memcpy(mt_dgram_bytes(msg), buf, len);
    self->out.queued += mt_dgram_units(self->dgram, len);
    /* The marks are set before the datagram goes: the I/O thread may find
     * the socket full with it at once. */
    int rc = 0;
    if (self->out.paused) {
        if (mt_out_arm_low(&self->out, &self->dgram->marks)) /* the mark moves with the buffer */
            push_drained(self);
    } else if (mt_out_must_pause(&self->out, &self->dgram->marks)) {
        rc = call_transport(self, "_maybe_pause_protocol", NULL);
    }
    if (!mt_io_thread_post(self->dgram->rec.io, msg, msg))
        mt_msg_free(msg); /* the pool stopped: RELEASED is on its way */
    if (rc < 0)
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *send_view(mt_dgram_core *self, PyObject *data, const void *buf, size_t len,
                           PyObject *addr)
{
    if (!self->sends_empty && len == 0)
        Py_RETURN_NONE;
    if (self->address != Py_None) {
        if (addr != Py_None && addr != self->address) {
            int eq = PyObject_RichCompareBool(addr, self->address, Py_EQ);
            if (eq < 0)
                return NULL;
            if (!eq)
                return PyErr_Format(PyExc_ValueError, "Invalid address: must be None or %S",
                                    self->address);
        }
        if (self->conn_lost || self->dgram == NULL)
            return mt_count_lost_write(&self->conn_lost);
        return queue_send(self, buf, len, NULL, 0);
    }
    if (self->conn_lost || self->dgram == NULL)
        return mt_count_lost_write(&self->conn_lost);
    const addr_entry *known = known_address(self, addr);
    if (known != NULL)
        return queue_send(self, buf, len, (const struct sockaddr *)&known->sa, known->len);
    struct sockaddr_storage ss;
    socklen_t sslen;
    if (addr == Py_None || mt_sockaddr_from_py(self->family, addr, &ss, &sslen) != 1) {
        /* A name to resolve, or an address socket.sendto() would refuse:
         * Python resolves it, or fails as the stock loop fails. */
        PyObject *args[3] = {self->transport, data, addr};
        if (self->transport == NULL)
            Py_RETURN_NONE;
        return PyObject_VectorcallMethod(sendto_slow_name, args, 3, NULL);
    }
    return queue_send(self, buf, len, (struct sockaddr *)&ss, sslen);
}

static PyObject *core_sendto(mt_dgram_core *self, PyObject *const *args, Py_ssize_t nargs,
                             PyObject *kwnames)
{
    static const char *const names[] = {"data", "addr"};
    PyObject *argv[2] = {NULL, Py_None};
    Py_ssize_t nkw = kwnames ? PyTuple_GET_SIZE(kwnames) : 0;
    if (nargs > 2)
        return PyErr_Format(PyExc_TypeError, "sendto() takes at most 2 arguments (%zd given)",
                            nargs + nkw);
    for (Py_ssize_t i = 0; i < nargs; i++)
        argv[i] = args[i];
    for (Py_ssize_t k = 0; k < nkw; k++) {
        const char *name = PyUnicode_AsUTF8(PyTuple_GET_ITEM(kwnames, k));
        int i = name == NULL ? -1 : strcmp(name, names[0]) == 0 ? 0 : strcmp(name, names[1]) == 0 ? 1 : -1;
        if (i < 0 || (i < nargs))
            return PyErr_Format(PyExc_TypeError, "sendto() got an unexpected or repeated "
                                "keyword argument %R", PyTuple_GET_ITEM(kwnames, k));
        argv[i] = args[nargs + k];
    }
    if (argv[0] == NULL)
        return PyErr_Format(PyExc_TypeError, "sendto() missing required argument 'data'");
    PyObject *data = argv[0], *addr = argv[1];
    if (!PyBytes_Check(data) && !PyByteArray_Check(data) && !PyMemoryView_Check(data))
        return PyErr_Format(PyExc_TypeError,
                            "data argument must be a bytes-like object, not '%.200s'",
                            Py_TYPE(data)->tp_name);
    if (mt_loop_check_fork(self->loop) < 0)
        return NULL;
    if (PyBytes_Check(data))
        return send_view(self, data, PyBytes_AS_STRING(data), (size_t)PyBytes_GET_SIZE(data),
                         addr);
    Py_buffer view;
    if (PyObject_GetBuffer(data, &view, PyBUF_SIMPLE) < 0)
        return NULL;
    PyObject *res = send_view(self, data, view.buf, (size_t)view.len, addr);
    PyBuffer_Release(&view);
    return res;
}

/* sendto_resolved(data, addr): the slow path's second half, with an
 * address it made numeric. */
static PyObject *core_sendto_resolved(mt_dgram_core *self, PyObject *const *args,
                                      Py_ssize_t nargs)
{
    if (nargs != 2)
        return PyErr_Format(PyExc_TypeError, "sendto_resolved() takes 2 arguments");
    struct sockaddr_storage ss;
    socklen_t sslen;
    if (mt_sockaddr_from_py(self->family, args[1], &ss, &sslen) != 1)
        return PyErr_Format(PyExc_TypeError, "not a numeric address for this socket: %R",
                            args[1]);
    if (self->conn_lost || self->dgram == NULL)
        return mt_count_lost_write(&self->conn_lost);
    Py_buffer view;
    if (PyObject_GetBuffer(args[0], &view, PyBUF_SIMPLE) < 0)
        return NULL;
    PyObject *res = queue_send(self, view.buf, (size_t)view.len, (struct sockaddr *)&ss, sslen);
    PyBuffer_Release(&view);
    return res;
}

/* ---- completions ---------------------------------------------------------------- */

static int deliver(mt_dgram_core *self, mt_msg *msg)
{
    struct sockaddr_storage ss;
    socklen_t sslen = mt_dgram_addrlen(msg);
    if (sslen > sizeof(ss))
        sslen = sizeof(ss);
    memcpy(&ss, mt_dgram_addr(msg), sslen);
    PyObject *data = PyBytes_FromStringAndSize(mt_dgram_bytes(msg), (Py_ssize_t)mt_dgram_size(msg));
    PyObject *addr = data ? sender_address(self, (struct sockaddr *)&ss, sslen) : NULL;
    if (addr == NULL) {
        Py_XDECREF(data);
        return protocol_raised(self);
    }
    if (self->datagram_received == NULL)
        self->datagram_received = PyObject_GetAttrString(self->protocol, "datagram_received");
    PyObject *method = Py_XNewRef(self->datagram_received);
    PyObject *res = NULL;
    if (method != NULL) {
        PyObject *args[2] = {data, addr};
        res = PyObject_Vectorcall(method, args, 2, NULL);
        Py_DECREF(method);
    }
    Py_DECREF(data);
    Py_DECREF(addr);
    if (res == NULL)
        return protocol_raised(self);
    Py_DECREF(res);
    return 0;
}

static int deliver_error(mt_dgram_core *self, int err)
{
    PyObject *exc = PyObject_CallFunction(PyExc_OSError, "is", err, strerror(err));
    PyObject *res = exc ? PyObject_CallMethod(self->protocol, "error_received", "O", exc) : NULL;
    Py_XDECREF(exc);
    if (res == NULL)
        return protocol_raised(self);
    Py_DECREF(res);
    return 0;
}

static int on_released(mt_dgram_core *self, int err)
{
    self->closed = true;
    self->closing = true;
    PyObject *code = PyLong_FromLong(err);
    int rc = code ? call_transport(self, "_mt_closed", code) : call_failed(self);
    Py_XDECREF(code);
    Py_CLEAR(self->transport);
    mt_loop_unlink(self->loop, &self->dgram->rec);
    return rc;
}

static int dgram_dispatch(mt_loop *loop, mt_msg *msg)
{
    (void)loop;
    mt_dgram *d = (mt_dgram *)msg->rec;
    mt_dgram_core *self = d->rec.owner;
    if (msg->op == MT_DGRAM_RECEIVED && mt_dgram_consumed(d, mt_dgram_size(msg)) &&
        self != NULL && !self->closed)
        signal_dgram(self, MT_DGRAM_CREDIT);
    if (self == NULL || self->transport == NULL) {
        mt_msg_free(msg);
        return 0;
    }
    Py_INCREF(self);
    int rc = 0;
    uint8_t op = msg->op;
    int err = msg->err;
    switch (op) {
    case MT_DGRAM_RECEIVED:
        /* After close() the stock transport reads nothing more. */
        if (!self->closing && self->protocol != Py_None)
            rc = deliver(self, msg);
        break;
    case MT_DGRAM_ERROR:
        if (!self->conn_lost && self->protocol != Py_None)
            rc = deliver_error(self, err);
        break;
    case MT_DGRAM_DRAINED:
        rc = on_drained(self);
        break;
    case MT_DGRAM_BLOCKED:
        rc = on_blocked(self);
        break;
    case MT_OP_RELEASED:
        rc = on_released(self, err);
        break;
    }
    mt_msg_free(msg);
    Py_DECREF(self);
    return rc;
}

static void dgram_discard(mt_msg *msg)
{
    mt_msg_free(msg); /* no payload owns anything */
}

/* The loop is closing with the endpoint open: the I/O thread has closed its
 * copy of the socket; the transport closes the socket object now. */
static void dgram_detach(mt_loop *loop, mt_record *rec)
{
    mt_dgram_core *self = rec->owner;
    Py_INCREF(self);
    self->closed = true;
    self->closing = true;
    if (self->transport != NULL && loop->fork_generation == mt_fork_generation()) {
        PyObject *res = PyObject_CallMethod(self->transport, "_mt_loop_closed", NULL);
        if (res == NULL)
            PyErr_WriteUnraisable(self->transport);
        Py_XDECREF(res);
    }
    Py_CLEAR(self->transport);
    release_dgram(self);
    Py_DECREF(self);
}

static const mt_loop_ops dgram_loop_ops = {
    .dispatch = dgram_dispatch,
    .discard = dgram_discard,
    .detach = dgram_detach,
};

/* ---- methods ------------------------------------------------------------------------ */

static PyObject *core_start_reading(mt_dgram_core *self, PyObject *Py_UNUSED(a))
{
    if (mt_loop_check_fork(self->loop) < 0)
        return NULL;
    if (!self->closing)
        signal_dgram(self, MT_DGRAM_READ);
    Py_RETURN_NONE;
}

static PyObject *core_close(mt_dgram_core *self, PyObject *Py_UNUSED(a))
{
    if (mt_loop_check_fork(self->loop) < 0)
        return NULL;
    if (!self->closing) {
        self->closing = true;
        signal_dgram(self, MT_DGRAM_CLOSE);
    }
    Py_RETURN_NONE;
}

static PyObject *core_abort(mt_dgram_core *self, PyObject *Py_UNUSED(a))
{
    if (mt_loop_check_fork(self->loop) < 0)
        return NULL;
    self->closing = true;
    if (!self->closed) {
        signal_dgram(self, MT_DGRAM_ABORT);
        if (self->dgram != NULL)
            mt_out_forget(&self->out, &self->dgram->marks); /* dropped: the size is 0 */
    }
    Py_RETURN_NONE;
}

static PyObject *core_release(mt_dgram_core *self, PyObject *Py_UNUSED(a))
{
    if (mt_loop_check_fork(self->loop) < 0)
        return NULL;
    if (!self->closed && self->dgram != NULL)
        signal_dgram(self, MT_DGRAM_ABORT);
    self->closed = true;
    self->closing = true;
    release_dgram(self);
    Py_RETURN_NONE;
}

static PyObject *core_get_write_buffer_size(mt_dgram_core *self, PyObject *Py_UNUSED(a))
{
    return PyLong_FromUnsignedLongLong(write_buffer_size(self));
}

static PyObject *core_set_protocol(mt_dgram_core *self, PyObject *protocol)
{
    Py_XSETREF(self->protocol, Py_NewRef(protocol));
    Py_CLEAR(self->datagram_received);
    Py_RETURN_NONE;
}

/* ---- lifetime ---------------------------------------------------------------------- */

static PyObject *core_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"loop", "fd", "transport", "protocol", "family", "address",
                             "sends_empty", "header_size", "dup", NULL};
    PyObject *loop_obj, *transport, *protocol, *address = Py_None;
    int fd, family, sends_empty = 1, dup = 1;
    unsigned int header_size = 8;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O!iOOi|OpIp:DatagramCore", kwlist,
                                     &mt_LoopCoreType, &loop_obj, &fd, &transport, &protocol,
                                     &family, &address, &sends_empty, &header_size, &dup))
        return NULL;
    if (fd < 0) {
        PyErr_SetString(PyExc_ValueError, "invalid file descriptor");
        return NULL;
    }
    mt_loop *loop = (mt_loop *)loop_obj;
    mt_io_thread *io = mt_loop_pick_io(loop);
    if (io == NULL)
        return NULL;
    mt_dgram_core *self = (mt_dgram_core *)type->tp_alloc(type, 0);
    if (self == NULL)
        return NULL;
    self->loop = (mt_loop *)Py_NewRef(loop_obj);
    self->protocol = Py_NewRef(protocol);
    self->address = Py_NewRef(address);
    self->family = family;
    self->sends_empty = sends_empty;
    mt_out_view_init(&self->out, DEFAULT_HIGH_WATER);
    /* A socket object's descriptor is copied (dup=True): the object stays
     * the caller's, closed when the connection is lost, and no Python code
     * can close the record's fd under the I/O thread.  With dup=False the
     * record takes `fd` over, once it is made. */
    int own = dup ? fcntl(fd, F_DUPFD_CLOEXEC, 0) : fd;
    if (own < 0) {
        Py_DECREF(self);
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    self->dgram = mt_dgram_new(&dgram_loop_ops, loop->sink, io, own, family, header_size);
    if (self->dgram == NULL) {
        if (dup)
            close(own);
        Py_DECREF(self);
        return PyErr_NoMemory();
    }
    self->dgram->rec.owner = self;
    self->transport = Py_NewRef(transport);
    mt_loop_link(loop, &self->dgram->rec);
    signal_dgram(self, MT_DGRAM_ATTACH);
    return (PyObject *)self;
}

static int core_traverse(mt_dgram_core *self, visitproc visit, void *arg)
{
    Py_VISIT(self->loop);
    Py_VISIT(self->transport);
    Py_VISIT(self->protocol);
    Py_VISIT(self->datagram_received);
    Py_VISIT(self->address);
    Py_VISIT(self->last_host);
    for (int i = 0; self->addrs != NULL && i < ADDR_CACHE; i++)
        Py_VISIT(self->addrs->entry[i].obj);
    return 0;
}

static int core_clear(mt_dgram_core *self)
{
    clear_addresses(self);
    Py_CLEAR(self->transport);
    Py_CLEAR(self->protocol);
    Py_CLEAR(self->datagram_received);
    Py_CLEAR(self->address);
    Py_CLEAR(self->last_host);
    return 0;
}

static void core_dealloc(mt_dgram_core *self)
{
    PyObject_GC_UnTrack(self);
    PyObject *exc = PyErr_Occurred() ? mt_fetch_exception() : NULL;
    if (self->dgram != NULL) {
        /* Not linked: the loop's list would have kept this object. */
        if (!self->closed && self->loop->fork_generation == mt_fork_generation())
            signal_dgram(self, MT_DGRAM_ABORT);
        mt_dgram *d = self->dgram;
        d->rec.owner = NULL;
        self->dgram = NULL;
        mt_dgram_drop_fd(d);
        mt_record_decref(&d->rec);
    }
    core_clear(self);
    Py_CLEAR(self->loop);
    Py_TYPE(self)->tp_free((PyObject *)self);
    if (exc != NULL)
        mt_restore_exception(exc);
}

/* ---- attributes ------------------------------------------------------------------ */

static PyObject *get_protocol(mt_dgram_core *self, void *Py_UNUSED(c))
{
    return Py_NewRef(self->protocol ? self->protocol : Py_None);
}

static PyObject *get_paused_flag(mt_dgram_core *self, void *Py_UNUSED(c))
{
    return PyBool_FromLong(self->out.paused);
}

static int set_paused_flag(mt_dgram_core *self, PyObject *v, void *Py_UNUSED(c))
{
    int b = v ? PyObject_IsTrue(v) : 0;
    if (b < 0)
        return -1;
    if (self->dgram == NULL || self->closed)
        self->out.paused = b;
    else if (mt_out_set_paused(&self->out, &self->dgram->marks, b))
        push_drained(self);
    return 0;
}

static PyObject *get_io_thread(mt_dgram_core *self, void *Py_UNUSED(c))
{
    if (self->dgram == NULL)
        Py_RETURN_NONE;
    return PyLong_FromLong(mt_io_thread_index(self->dgram->rec.io));
}

static PyObject *get_fd(mt_dgram_core *self, void *Py_UNUSED(c))
{
    return PyLong_FromLong(self->dgram ? self->dgram->fd : -1);
}

static PyGetSetDef core_getset[] = {
    {"protocol", (getter)get_protocol, NULL, "The protocol datagrams are delivered to.", NULL},
    {"fd", (getter)get_fd, NULL, "The record's descriptor while this half holds it; -1 after.",
     NULL},
    {"protocol_paused", (getter)get_paused_flag, (setter)set_paused_flag,
     "Whether pause_writing() was called and resume_writing() not yet.", NULL},
    {"io_thread", (getter)get_io_thread, NULL, "Index of the owning I/O thread.", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyMemberDef core_members[] = {
    {"closing", T_BOOL, offsetof(mt_dgram_core, closing), 0, NULL},
    {"closed", T_BOOL, offsetof(mt_dgram_core, closed), READONLY, NULL},
    {"conn_lost", T_INT, offsetof(mt_dgram_core, conn_lost), 0, NULL},
    {"high_water", T_PYSSIZET, offsetof(mt_dgram_core, out.high_water), 0, NULL},
    {"low_water", T_PYSSIZET, offsetof(mt_dgram_core, out.low_water), 0, NULL},
    {NULL, 0, 0, 0, NULL},
};

static PyMethodDef core_methods[] = {
    {"sendto", (PyCFunction)(void (*)(void))core_sendto, METH_FASTCALL | METH_KEYWORDS,
     "sendto(data, addr=None): queue a datagram for the I/O thread."},
    {"sendto_resolved", (PyCFunction)(void (*)(void))core_sendto_resolved, METH_FASTCALL,
     "sendto_resolved(data, addr): queue a datagram to a numeric address."},
    {"start_reading", (PyCFunction)core_start_reading, METH_NOARGS, NULL},
    {"close", (PyCFunction)core_close, METH_NOARGS, "Stop receiving; release once sent."},
    {"abort", (PyCFunction)core_abort, METH_NOARGS, "Drop the output, release now."},
    {"release", (PyCFunction)core_release, METH_NOARGS,
     "Let go of the record (connection_lost)."},
    {"get_write_buffer_size", (PyCFunction)core_get_write_buffer_size, METH_NOARGS, NULL},
    {"set_protocol", (PyCFunction)core_set_protocol, METH_O, NULL},
    {NULL, NULL, 0, NULL},
};

PyTypeObject mt_DatagramCoreType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "mtloop._mtloop.DatagramCore",
    .tp_doc = "The loop-thread half of a datagram endpoint.",
    .tp_basicsize = sizeof(mt_dgram_core),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_new = core_new,
    .tp_dealloc = (destructor)core_dealloc,
    .tp_traverse = (traverseproc)core_traverse,
    .tp_clear = (inquiry)core_clear,
    .tp_methods = core_methods,
    .tp_getset = core_getset,
    .tp_members = core_members,
};

/* ---- the transport's sendto, in C --------------------------------------------------
 *
 * As StreamWriteMethods for streams: a field-less base class whose sendto()
 * is a method descriptor, so a protocol's transport.sendto(data, addr) runs
 * no Python frame. */

static mt_core_slot sendto_slot;

static PyObject *transport_sendto(PyObject *transport, PyObject *const *args, Py_ssize_t nargs,
                                  PyObject *kwnames)
{
    mt_dgram_core *core =
        (mt_dgram_core *)mt_transport_core(&sendto_slot, transport, &mt_DatagramCoreType);
    if (core == NULL)
        return NULL;
    PyObject *res = core_sendto(core, args, nargs, kwnames);
    Py_DECREF(core);
    return res;
}

static PyMethodDef transport_methods[] = {
    {"sendto", (PyCFunction)(void (*)(void))transport_sendto, METH_FASTCALL | METH_KEYWORDS,
     "sendto(data, addr=None): send a datagram to addr (the peer, when connected)."},
    {NULL, NULL, 0, NULL},
};

PyTypeObject mt_DatagramSendMethodsType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "mtloop._mtloop.DatagramSendMethods",
    .tp_doc = "sendto() of mtloop's datagram transport, in C.",
    .tp_basicsize = sizeof(PyObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE,
    .tp_new = PyType_GenericNew,
    .tp_methods = transport_methods,
};

int mt_datagram_core_type_init(PyObject *module)
{
    sendto_slow_name = PyUnicode_InternFromString("_mt_sendto_slow");
    if (sendto_slow_name == NULL || PyType_Ready(&mt_DatagramCoreType) < 0 || PyType_Ready(&mt_DatagramSendMethodsType) < 0 ||
        PyModule_AddObjectRef(module, "DatagramCore", (PyObject *)&mt_DatagramCoreType) < 0)
        return -1;
    return PyModule_AddObjectRef(module, "DatagramSendMethods",
                                 (PyObject *)&mt_DatagramSendMethodsType);
}
