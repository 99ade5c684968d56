/* StreamCore: the loop-thread half of stream transports.  See
 * stream_core.h; the Python half is mtloop/_transports.py. */
#include "transport/stream_core.h"

#include <errno.h>
#include <structmember.h>
#include <sys/socket.h>

#include "pyext/module.h"

static PyObject *buffered_protocol_type; /* asyncio.BufferedProtocol */

#define DEFAULT_HIGH_WATER (64 * 1024)

static int64_t unconsumed_sub(mt_stream *s, size_t n)
{
    return atomic_fetch_sub_explicit(&s->unconsumed, (int64_t)n, memory_order_seq_cst) -
           (int64_t)n;
}

static void post(mt_stream_core *self, mt_cmd_kind kind)
{
    mt_cmd *cmd = mt_cmd_new(kind, &self->stream->obj, 0);
    if (cmd == NULL) {
        /* 64 bytes short: the command is lost, say so loudly. */
        PyErr_NoMemory();
        PyErr_WriteUnraisable((PyObject *)self);
        return;
    }
    mt_loop_post(self->stream->obj.io, cmd);
}

/* The loop consumed `n` delivered bytes: give the credit back and restart
 * a starved reader once half of the credit is free again. */
static void return_credit(mt_stream_core *self, size_t n)
{
    mt_stream *s = self->stream;
    if (unconsumed_sub(s, n) >= MT_READ_CREDIT / 2)
        return;
    if (atomic_load_explicit(&s->read_starved, memory_order_seq_cst) &&
        atomic_exchange(&s->read_starved, false) && !self->closed)
        post(self, MT_CMD_STREAM_CREDIT);
}

static void free_done(mt_stream_core *self, mt_done *done)
{
    if (done->kind == MT_DONE_DATA && self->stream != NULL)
        return_credit(self, done->len);
    mt_done_free(done);
}

static void drop_deferred(mt_stream_core *self)
{
    while (self->deferred_head != NULL) {
        mt_done *d = self->deferred_head;
        self->deferred_head = MT_CONTAINER_OF(
            atomic_load_explicit(&d->node.next, memory_order_relaxed), mt_done, node);
        if (d == self->deferred_tail)
            self->deferred_head = NULL;
        free_done(self, d);
    }
    self->deferred_tail = NULL;
}

static void defer(mt_stream_core *self, mt_done *done)
{
    atomic_store_explicit(&done->node.next, NULL, memory_order_relaxed);
    if (self->deferred_tail)
        atomic_store_explicit(&self->deferred_tail->node.next, &done->node,
                              memory_order_relaxed);
    else
        self->deferred_head = done;
    self->deferred_tail = done;
}

static mt_done *undefer(mt_stream_core *self)
{
    mt_done *d = self->deferred_head;
    if (d == NULL)
        return NULL;
    if (d == self->deferred_tail) {
        self->deferred_head = self->deferred_tail = NULL;
    } else {
        self->deferred_head = MT_CONTAINER_OF(
            atomic_load_explicit(&d->node.next, memory_order_relaxed), mt_done, node);
    }
    return d;
}

static uint64_t write_buffer_size(mt_stream_core *self)
{
    if (self->closed || self->stream == NULL)
        return 0;
    uint64_t flushed = self->protocol_paused
                           ? self->flushed_seen
                           : atomic_load_explicit(&self->stream->flushed, memory_order_acquire);
    return self->queued > flushed ? self->queued - flushed : 0;
}

/* ---- calling into Python ---------------------------------------------------- */

static bool must_propagate(void)
{
    return PyErr_ExceptionMatches(PyExc_SystemExit) ||
           PyErr_ExceptionMatches(PyExc_KeyboardInterrupt);
}

/* Reports a failed call made for the transport; -1 for what must leave
 * the run loop. */
static int call_failed(mt_stream_core *self)
{
    if (must_propagate())
        return -1;
    PyErr_WriteUnraisable(self->transport ? self->transport : (PyObject *)self);
    return 0;
}

static int call_transport(mt_stream_core *self, const char *method, const char *fmt, ...)
{
    if (self->transport == NULL)
        return 0;
    va_list va;
    va_start(va, fmt);
    PyObject *func = PyObject_GetAttrString(self->transport, method);
    PyObject *args = func ? Py_VaBuildValue(fmt, va) : NULL;
    va_end(va);
    PyObject *res = NULL;
    if (args != NULL) {
        res = PyObject_Call(func, args, NULL);
        Py_DECREF(args);
    }
    Py_XDECREF(func);
    if (res == NULL)
        return call_failed(self);
    Py_DECREF(res);
    return 0;
}

/* A protocol method raised: asyncio's _fatal_error() path. */
static int protocol_failed(mt_stream_core *self, const char *message)
{
    if (must_propagate())
        return -1;
    PyObject *exc = mt_fetch_exception();
    int rc = call_transport(self, "_fatal_error", "(Os)", exc, message);
    Py_DECREF(exc);
    return rc;
}

static PyObject *cached_method(PyObject **slot, PyObject *protocol, const char *name)
{
    if (*slot == NULL)
        *slot = PyObject_GetAttrString(protocol, name);
    return *slot;
}

static int deliver_buffered(mt_stream_core *self, const char *data, size_t n)
{
    static const char get_failed[] = "Fatal error: protocol.get_buffer() call failed.";
    while (n > 0) {
        PyObject *get_buffer = cached_method(&self->get_buffer, self->protocol, "get_buffer");
        PyObject *buf = NULL;
        if (get_buffer != NULL) {
            PyObject *hint = PyLong_FromLong(-1);
            buf = hint ? PyObject_CallOneArg(get_buffer, hint) : NULL;
            Py_XDECREF(hint);
        }
        if (buf == NULL)
            return protocol_failed(self, get_failed);
        Py_buffer view;
        int rc = PyObject_GetBuffer(buf, &view, PyBUF_WRITABLE);
        Py_DECREF(buf);
        if (rc < 0)
            return protocol_failed(self, get_failed);
        if (view.len == 0) {
            PyBuffer_Release(&view);
            PyErr_SetString(PyExc_RuntimeError, "get_buffer() returned an empty buffer");
            return protocol_failed(self, get_failed);
        }
        size_t k = (size_t)view.len < n ? (size_t)view.len : n;
        memcpy(view.buf, data, k);
        PyBuffer_Release(&view);
        data += k;
        n -= k;
        PyObject *updated =
            cached_method(&self->buffer_updated, self->protocol, "buffer_updated");
        PyObject *nbytes = updated ? PyLong_FromSize_t(k) : NULL;
        PyObject *res = nbytes ? PyObject_CallOneArg(updated, nbytes) : NULL;
        Py_XDECREF(nbytes);
        if (res == NULL)
            return protocol_failed(self, "Fatal error: protocol.buffer_updated() call failed.");
        Py_DECREF(res);
        if (self->closing)
            break; /* the protocol closed the transport: the rest is dropped */
    }
    return 0;
}

static int deliver_data(mt_stream_core *self, mt_done *done)
{
    int rc = 0;
    if (!self->buffered) {
        PyObject *bytes = PyBytes_FromStringAndSize(done->data, (Py_ssize_t)done->len);
        free_done(self, done);
        if (bytes == NULL)
            return protocol_failed(self, "Fatal error: out of memory for received data.");
        PyObject *cb = cached_method(&self->data_received, self->protocol, "data_received");
        PyObject *res = cb ? PyObject_CallOneArg(cb, bytes) : NULL;
        Py_DECREF(bytes);
        if (res == NULL)
            return protocol_failed(self, "Fatal error: protocol.data_received() call failed.");
        Py_DECREF(res);
        return 0;
    }
    rc = deliver_buffered(self, done->data, done->len);
    free_done(self, done);
    return rc;
}

/* One read-side completion (data, EOF or a read error), in order. */
static int deliver_read(mt_stream_core *self, mt_done *done)
{
    switch (done->kind) {
    case MT_DONE_DATA:
        return deliver_data(self, done);
    case MT_DONE_EOF:
        free_done(self, done);
        return call_transport(self, "_mt_eof", "()");
    default: {
        int err = done->err;
        free_done(self, done);
        return call_transport(self, "_mt_read_error", "(i)", err);
    }
    }
}

static bool reading_held(mt_stream_core *self)
{
    return self->reading_paused || self->deferred_head != NULL;
}

/* ---- write-side accounting ----------------------------------------------- */

static void push_own(mt_stream_core *self, mt_done_kind kind)
{
    mt_done *done = mt_done_new(kind, &self->stream->obj, 0);
    if (done != NULL)
        mt_sink_push(self->loop->sink, done, done);
}

/* While the protocol is paused, asks the I/O thread for DRAINED once the
 * buffer is down to the low-water mark. */
static void arm_resume(mt_stream_core *self)
{
    mt_stream *s = self->stream;
    uint64_t low = (uint64_t)self->low_water;
    uint64_t mark = self->queued > low ? self->queued - low : 1;
    atomic_store_explicit(&s->resume_at, mark, memory_order_seq_cst);
    if (atomic_load_explicit(&s->flushed, memory_order_seq_cst) >= mark) {
        uint64_t expected = mark;
        if (atomic_compare_exchange_strong(&s->resume_at, &expected, 0))
            push_own(self, MT_DONE_DRAINED);
    }
}

static int maybe_pause(mt_stream_core *self)
{
    uint64_t size = write_buffer_size(self);
    uint64_t high = (uint64_t)self->high_water;
    if (self->protocol_paused || size <= high)
        return 0;
    uint64_t cap = high * MT_WRITE_CAP_FACTOR;
    if (cap < MT_WRITE_CAP_MIN)
        cap = MT_WRITE_CAP_MIN;
    if (size <= cap) {
        /* Over the mark, but the kernel may still take it all: pause once
         * the I/O thread finds the socket full with that much waiting. */
        atomic_store_explicit(&self->stream->blocked_mark, high + 1, memory_order_release);
        return 0;
    }
    return call_transport(self, "_maybe_pause_protocol", "()");
}

/* BLOCKED: the socket refused output with more than the mark waiting. */
static int on_blocked(mt_stream_core *self)
{
    if (self->protocol_paused || self->closing ||
        write_buffer_size(self) <= (uint64_t)self->high_water)
        return 0;
    return call_transport(self, "_maybe_pause_protocol", "()");
}

/* Sends a small write from the loop thread when that saves a wakeup and
 * nothing else waits for the loop: the owning I/O thread sleeps, holds no
 * earlier output of this stream (all of it was sent or dropped, so nothing
 * can be reordered), and the loop has no completion or callback queued.
 * The fd stays open until the loop itself closes or aborts the transport.
 * Returns the bytes sent; the rest (all of it on EAGAIN or an error) goes
 * to the I/O thread, which reports any error the usual way.
 *
 * Measured on the development VM with the load generator against
 * tools/bench_server.py: a 1 KiB ping-pong's p50 drops by about 14% (one
 * of its three context switches per request goes).  Sending directly whenever the I/O thread slept, without the
 * idle-loop condition, cost 35% at 32 busy connections, because the loop
 * thread then did the sends of whole bursts itself. */
static size_t direct_send(mt_stream_core *self, const char *buf, size_t len)
{
    mt_stream *s = self->stream;
    mt_loop *loop = self->loop;
    if (len > MT_DIRECT_SEND_MAX || self->closing || self->closed)
        return 0;
    if (mt_ready_queue_len(&loop->ready) != 0 || !mt_mpsc_queue_is_empty(&loop->sink->queue))
        return 0;
    if (atomic_load_explicit(&s->flushed, memory_order_acquire) != self->queued)
        return 0;
    if (!mt_io_thread_sleeping(s->obj.io) || mt_io_thread_stopped(s->obj.io))
        return 0;
    ssize_t n = send(s->fd, buf, len, MSG_NOSIGNAL | MSG_DONTWAIT);
    if (n > 0)
        return (size_t)n;
    if (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR &&
        errno != ENOTSOCK) {
        /* A hard error: write() fails now, as asyncio's does.  The error
         * may be the socket's pending one (a reset), which this send()
         * consumed: left to the I/O thread, a later read would see a clean
         * EOF instead. */
        int none = 0;
        atomic_compare_exchange_strong(&s->write_err, &none, errno);
    }
    return 0;
}

/* The stream saw a hard send error (here or on its I/O thread): the write
 * is dropped and the transport fails with that error, once, as asyncio's
 * write() fails when send() does.  Without this, a writer that never
 * yields would write into a dead connection forever, the I/O thread
 * dropping each write as it came. */
static bool write_broken(mt_stream_core *self, PyObject **res)
{
    int err = atomic_load_explicit(&self->stream->write_err, memory_order_acquire);
    if (err == 0)
        return false;
    *res = call_transport(self, "_mt_write_error", "(i)", err) < 0 ? NULL : Py_NewRef(Py_None);
    return true;
}

static PyObject *queue_output(mt_stream_core *self, const void *buf, size_t len)
{
    PyObject *res;
    if (write_broken(self, &res))
        return res;
    size_t sent = direct_send(self, buf, len);
    if (sent == len)
        Py_RETURN_NONE;
    if (write_broken(self, &res))
        return res;
    buf = (const char *)buf + sent;
    len -= sent;
    mt_cmd *cmd = mt_cmd_new(MT_CMD_STREAM_WRITE, &self->stream->obj, len);
    if (cmd == NULL)
        return PyErr_NoMemory();
    memcpy(cmd->data, buf, len);
    self->queued += len;
    mt_loop_post(self->stream->obj.io, cmd);
    if (self->protocol_paused)
        arm_resume(self); /* the buffer grew: the mark moves with it */
    else if (maybe_pause(self) < 0)
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *lost_write(mt_stream_core *self)
{
    if (self->conn_lost >= 5) {
        PyObject *msg = PyUnicode_FromString("socket.send() raised exception.");
        if (msg == NULL)
            return NULL;
        PyObject *res = mt_call_helper("log_warning", &msg, 1);
        Py_DECREF(msg);
        if (res == NULL)
            return NULL;
        Py_DECREF(res);
    }
    self->conn_lost++;
    Py_RETURN_NONE;
}

static int check_writable(mt_stream_core *self, const char *what)
{
    if (self->eof) {
        PyErr_Format(PyExc_RuntimeError, "Cannot call %s() after write_eof()", what);
        return -1;
    }
    if (self->sendfile_waiter != NULL) {
        PyErr_Format(PyExc_RuntimeError, "unable to %s; sendfile is in progress", what);
        return -1;
    }
    return 0;
}

/* ---- methods ----------------------------------------------------------------- */

static PyObject *core_write(mt_stream_core *self, PyObject *data)
{
    if (!PyBytes_Check(data) && !PyByteArray_Check(data) && !PyMemoryView_Check(data)) {
        PyErr_Format(PyExc_TypeError, "data argument must be a bytes-like object, not '%.200s'",
                     Py_TYPE(data)->tp_name);
        return NULL;
    }
    if (check_writable(self, "write") < 0)
        return NULL;
    if (PyBytes_Check(data)) {
        Py_ssize_t n = PyBytes_GET_SIZE(data);
        if (n == 0)
            Py_RETURN_NONE;
        if (self->conn_lost)
            return lost_write(self);
        return queue_output(self, PyBytes_AS_STRING(data), (size_t)n);
    }
    Py_buffer view;
    if (PyObject_GetBuffer(data, &view, PyBUF_SIMPLE) < 0)
        return NULL;
    PyObject *res;
    if (view.len == 0)
        res = Py_NewRef(Py_None);
    else if (self->conn_lost)
        res = lost_write(self);
    else
        res = queue_output(self, view.buf, (size_t)view.len);
    PyBuffer_Release(&view);
    return res;
}

static PyObject *core_writelines(mt_stream_core *self, PyObject *seq)
{
    if (check_writable(self, "writelines") < 0)
        return NULL;
    PyObject *empty = PyBytes_FromStringAndSize(NULL, 0);
    if (empty == NULL)
        return NULL;
    PyObject *data = PyObject_CallMethod(empty, "join", "(O)", seq);
    Py_DECREF(empty);
    if (data == NULL)
        return NULL;
    PyObject *res = core_write(self, data);
    Py_DECREF(data);
    return res;
}

static PyObject *core_start_reading(mt_stream_core *self, PyObject *Py_UNUSED(a))
{
    if (!self->reading_started) {
        self->reading_started = true;
        if (!self->reading_paused && !self->closing)
            post(self, MT_CMD_STREAM_READ_ON);
    }
    Py_RETURN_NONE;
}

static PyObject *core_pause_reading(mt_stream_core *self, PyObject *Py_UNUSED(a))
{
    if (!self->reading_paused) {
        self->reading_paused = true;
        if (self->reading_started)
            post(self, MT_CMD_STREAM_READ_OFF);
    }
    Py_RETURN_NONE;
}

static PyObject *core_redeliver(mt_stream_core *self, PyObject *Py_UNUSED(a))
{
    self->redelivery_scheduled = false;
    Py_INCREF(self);
    int rc = 0;
    mt_done *d;
    while (rc == 0 && !self->reading_paused && !self->closing &&
           (d = undefer(self)) != NULL)
        rc = deliver_read(self, d);
    Py_DECREF(self);
    if (rc < 0)
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *core_resume_reading(mt_stream_core *self, PyObject *Py_UNUSED(a))
{
    if (!self->reading_paused)
        Py_RETURN_NONE;
    self->reading_paused = false;
    if (self->reading_started)
        post(self, MT_CMD_STREAM_READ_ON);
    if (self->deferred_head != NULL && !self->redelivery_scheduled) {
        /* Held data goes out on the next iteration, as it would once a
         * resumed reader is polled again. */
        PyObject *cb = PyObject_GetAttrString((PyObject *)self, "_redeliver");
        PyObject *res = cb ? PyObject_CallMethod((PyObject *)self->loop, "call_soon", "O", cb)
                           : NULL;
        Py_XDECREF(cb);
        if (res == NULL)
            return NULL;
        Py_DECREF(res);
        self->redelivery_scheduled = true;
    }
    Py_RETURN_NONE;
}

static PyObject *core_shutdown_write(mt_stream_core *self, PyObject *Py_UNUSED(a))
{
    self->eof = true;
    post(self, MT_CMD_STREAM_SHUT_WR);
    Py_RETURN_NONE;
}

static PyObject *core_close(mt_stream_core *self, PyObject *Py_UNUSED(a))
{
    self->closing = true;
    drop_deferred(self);
    if (!self->closed)
        post(self, MT_CMD_STREAM_CLOSE);
    Py_RETURN_NONE;
}

static PyObject *core_abort(mt_stream_core *self, PyObject *Py_UNUSED(a))
{
    self->closing = true;
    drop_deferred(self);
    if (!self->closed) {
        /* The output is gone from this side's point of view at once. */
        if (self->stream != NULL)
            self->queued = self->flushed_seen = atomic_load(&self->stream->flushed);
        post(self, MT_CMD_STREAM_ABORT);
    }
    Py_RETURN_NONE;
}

static PyObject *core_give_fd(mt_stream_core *self, PyObject *Py_UNUSED(a))
{
    if (self->closed) {
        PyErr_SetString(PyExc_RuntimeError, "the I/O thread has already released the fd");
        return NULL;
    }
    post(self, MT_CMD_STREAM_OWN_FD);
    Py_RETURN_NONE;
}

static PyObject *core_sendfile(mt_stream_core *self, PyObject *args)
{
    int fd;
    long long offset;
    Py_ssize_t count;
    PyObject *waiter;
    if (!PyArg_ParseTuple(args, "iLnO:sendfile", &fd, &offset, &count, &waiter))
        return NULL;
    if (self->sendfile_waiter != NULL) {
        PyErr_SetString(PyExc_RuntimeError, "a sendfile is already in progress");
        return NULL;
    }
    mt_cmd *cmd = mt_cmd_new(MT_CMD_STREAM_SENDFILE, &self->stream->obj, 0);
    if (cmd == NULL)
        return PyErr_NoMemory();
    cmd->file_fd = fd;
    cmd->offset = offset;
    cmd->len = (size_t)count;
    self->sendfile_waiter = Py_NewRef(waiter);
    mt_loop_post(self->stream->obj.io, cmd);
    Py_RETURN_NONE;
}

static PyObject *core_get_write_buffer_size(mt_stream_core *self, PyObject *Py_UNUSED(a))
{
    return PyLong_FromUnsignedLongLong(write_buffer_size(self));
}

static int set_protocol(mt_stream_core *self, PyObject *protocol)
{
    int buffered = 0;
    if (protocol != Py_None) {
        buffered = PyObject_IsInstance(protocol, buffered_protocol_type);
        if (buffered < 0)
            return -1;
    }
    Py_XSETREF(self->protocol, Py_NewRef(protocol));
    Py_CLEAR(self->data_received);
    Py_CLEAR(self->get_buffer);
    Py_CLEAR(self->buffer_updated);
    self->buffered = buffered;
    return 0;
}

static PyObject *core_set_protocol(mt_stream_core *self, PyObject *protocol)
{
    if (set_protocol(self, protocol) < 0)
        return NULL;
    Py_RETURN_NONE;
}

/* ---- completion dispatch ---------------------------------------------------- */

static void unlink_live(mt_stream_core *self)
{
    mt_loop *loop = self->loop;
    if (self->live_prev)
        self->live_prev->live_next = self->live_next;
    else if (loop->live == self)
        loop->live = self->live_next;
    else
        return; /* not linked */
    if (self->live_next)
        self->live_next->live_prev = self->live_prev;
    self->live_prev = self->live_next = NULL;
    Py_DECREF(self); /* the list's reference */
}

static int on_drained(mt_stream_core *self)
{
    if (!self->protocol_paused || self->conn_lost)
        return 0;
    self->flushed_seen = atomic_load_explicit(&self->stream->flushed, memory_order_acquire);
    if (write_buffer_size(self) > (uint64_t)self->low_water) {
        arm_resume(self);
        return 0;
    }
    return call_transport(self, "_maybe_resume_protocol", "()");
}

static int on_sendfile(mt_stream_core *self, int err, size_t sent)
{
    PyObject *waiter = self->sendfile_waiter;
    if (waiter == NULL)
        return 0;
    self->sendfile_waiter = NULL;
    int rc = call_transport(self, "_mt_sendfile_done", "(Oin)", waiter, err, (Py_ssize_t)sent);
    Py_DECREF(waiter);
    return rc;
}

static int on_closed(mt_stream_core *self, int err)
{
    self->closed = true;
    self->closing = true;
    drop_deferred(self);
    int rc = 0;
    if (self->sendfile_waiter != NULL)
        rc = on_sendfile(self, ECONNABORTED, 0);
    if (rc == 0)
        rc = call_transport(self, "_mt_closed", "(i)", err);
    Py_CLEAR(self->transport);
    unlink_live(self);
    return rc;
}

int mt_stream_core_dispatch(mt_loop *loop, mt_done *done)
{
    (void)loop;
    mt_stream *s = (mt_stream *)done->source;
    mt_stream_core *self = s->core;
    if (self == NULL || self->transport == NULL) {
        if (done->kind == MT_DONE_DATA)
            unconsumed_sub(s, done->len);
        mt_done_free(done);
        return 0;
    }
    Py_INCREF(self);
    int rc = 0;
    switch (done->kind) {
    case MT_DONE_DATA:
    case MT_DONE_EOF:
    case MT_DONE_READ_ERROR:
        if (self->closing)
            free_done(self, done);
        else if (reading_held(self))
            defer(self, done);
        else
            rc = deliver_read(self, done);
        break;
    case MT_DONE_WRITE_ERROR: {
        int err = done->err;
        mt_done_free(done);
        rc = call_transport(self, "_mt_write_error", "(i)", err);
        break;
    }
    case MT_DONE_DRAINED:
        mt_done_free(done);
        rc = on_drained(self);
        break;
    case MT_DONE_BLOCKED:
        mt_done_free(done);
        rc = on_blocked(self);
        break;
    case MT_DONE_SENDFILE: {
        int err = done->err;
        size_t sent = done->len;
        mt_done_free(done);
        rc = on_sendfile(self, err, sent);
        break;
    }
    case MT_DONE_CLOSED: {
        int err = done->err;
        mt_done_free(done);
        rc = on_closed(self, err);
        break;
    }
    default:
        mt_done_free(done);
    }
    Py_DECREF(self);
    return rc;
}

void mt_stream_core_detach_all(mt_loop *loop)
{
    mt_stream_core *self;
    while ((self = loop->live) != NULL) {
        Py_INCREF(self);
        unlink_live(self);
        self->closed = true;
        self->closing = true;
        drop_deferred(self);
        Py_CLEAR(self->sendfile_waiter);
        Py_CLEAR(self->transport);
        Py_DECREF(self);
    }
}

/* ---- lifetime ------------------------------------------------------------------ */

static PyObject *core_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"loop", "fd", "transport", "protocol", NULL};
    PyObject *loop_obj, *transport, *protocol;
    int fd;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O!iOO:StreamCore", kwlist, &mt_LoopCoreType,
                                     &loop_obj, &fd, &transport, &protocol))
        return NULL;
    if (fd < 0) {
        PyErr_SetString(PyExc_ValueError, "invalid file descriptor");
        return NULL;
    }
    mt_loop *loop = (mt_loop *)loop_obj;
    mt_io_thread *io = mt_loop_pick_io(loop);
    if (io == NULL)
        return NULL;
    mt_stream_core *self = (mt_stream_core *)type->tp_alloc(type, 0);
    if (self == NULL)
        return NULL;
    self->loop = (mt_loop *)Py_NewRef(loop_obj);
    self->high_water = DEFAULT_HIGH_WATER;
    self->low_water = DEFAULT_HIGH_WATER / 4;
    if (set_protocol(self, protocol) < 0) {
        Py_DECREF(self);
        return NULL;
    }
    self->stream = mt_stream_new(loop->sink, io, fd);
    if (self->stream == NULL) {
        Py_DECREF(self);
        return PyErr_NoMemory();
    }
    self->stream->core = self;
    self->transport = Py_NewRef(transport);
    post(self, MT_CMD_STREAM_ATTACH);
    /* The loop's list keeps an open transport alive, as a selector's
     * registration does for the stock loop's. */
    self->live_next = loop->live;
    if (loop->live)
        loop->live->live_prev = self;
    loop->live = (mt_stream_core *)Py_NewRef(self);
    return (PyObject *)self;
}

static int core_traverse(mt_stream_core *self, visitproc visit, void *arg)
{
    Py_VISIT(self->loop);
    Py_VISIT(self->transport);
    Py_VISIT(self->protocol);
    Py_VISIT(self->data_received);
    Py_VISIT(self->get_buffer);
    Py_VISIT(self->buffer_updated);
    Py_VISIT(self->sendfile_waiter);
    return 0;
}

static int core_clear(mt_stream_core *self)
{
    Py_CLEAR(self->transport);
    Py_CLEAR(self->protocol);
    Py_CLEAR(self->data_received);
    Py_CLEAR(self->get_buffer);
    Py_CLEAR(self->buffer_updated);
    Py_CLEAR(self->sendfile_waiter);
    return 0;
}

static void core_dealloc(mt_stream_core *self)
{
    PyObject_GC_UnTrack(self);
    if (self->stream != NULL) {
        drop_deferred(self);
        self->stream->core = NULL;
        if (!self->closed && self->loop != NULL && mt_loop_check_usable(self->loop) == 0)
            post(self, MT_CMD_STREAM_ABORT);
        PyErr_Clear();
        mt_io_obj_decref(&self->stream->obj);
        self->stream = NULL;
    }
    core_clear(self);
    Py_CLEAR(self->loop);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* ---- attributes -------------------------------------------------------------- */

static PyObject *get_protocol(mt_stream_core *self, void *Py_UNUSED(c))
{
    return Py_NewRef(self->protocol ? self->protocol : Py_None);
}

static PyObject *get_paused_flag(mt_stream_core *self, void *Py_UNUSED(c))
{
    return PyBool_FromLong(self->protocol_paused);
}

static int set_paused_flag(mt_stream_core *self, PyObject *v, void *Py_UNUSED(c))
{
    int b = v ? PyObject_IsTrue(v) : 0;
    if (b < 0)
        return -1;
    if (self->stream == NULL) {
        self->protocol_paused = b;
        return 0;
    }
    if (b && !self->protocol_paused)
        self->flushed_seen = atomic_load_explicit(&self->stream->flushed, memory_order_acquire);
    self->protocol_paused = b;
    if (b)
        arm_resume(self); /* DRAINED tells when to look at the buffer again */
    else
        atomic_store(&self->stream->resume_at, 0);
    return 0;
}

static PyObject *get_fd(mt_stream_core *self, void *Py_UNUSED(c))
{
    return PyLong_FromLong(self->stream ? self->stream->fd : -1);
}

static PyObject *get_io_thread(mt_stream_core *self, void *Py_UNUSED(c))
{
    return PyLong_FromLong(mt_io_thread_index(self->stream->obj.io));
}

static PyGetSetDef core_getset[] = {
    {"protocol", (getter)get_protocol, NULL, "The protocol data is delivered to.", NULL},
    {"protocol_paused", (getter)get_paused_flag, (setter)set_paused_flag,
     "Whether pause_writing() was called and resume_writing() not yet.", NULL},
    {"fd", (getter)get_fd, NULL, "The socket's file descriptor.", NULL},
    {"io_thread", (getter)get_io_thread, NULL, "Index of the owning I/O thread.", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyMemberDef core_members[] = {
    {"closing", T_BOOL, offsetof(mt_stream_core, closing), 0, NULL},
    {"eof", T_BOOL, offsetof(mt_stream_core, eof), 0, NULL},
    {"reading_paused", T_BOOL, offsetof(mt_stream_core, reading_paused), READONLY, NULL},
    {"closed", T_BOOL, offsetof(mt_stream_core, closed), READONLY, NULL},
    {"conn_lost", T_INT, offsetof(mt_stream_core, conn_lost), 0, NULL},
    {"high_water", T_PYSSIZET, offsetof(mt_stream_core, high_water), 0, NULL},
    {"low_water", T_PYSSIZET, offsetof(mt_stream_core, low_water), 0, NULL},
    {NULL, 0, 0, 0, NULL},
};

static PyMethodDef core_methods[] = {
    {"write", (PyCFunction)core_write, METH_O, "Queue bytes for the I/O thread."},
    {"writelines", (PyCFunction)core_writelines, METH_O, "Queue the concatenation."},
    {"start_reading", (PyCFunction)core_start_reading, METH_NOARGS, NULL},
    {"pause_reading", (PyCFunction)core_pause_reading, METH_NOARGS, NULL},
    {"resume_reading", (PyCFunction)core_resume_reading, METH_NOARGS, NULL},
    {"_redeliver", (PyCFunction)core_redeliver, METH_NOARGS, NULL},
    {"shutdown_write", (PyCFunction)core_shutdown_write, METH_NOARGS, NULL},
    {"close", (PyCFunction)core_close, METH_NOARGS, "Flush, then release the socket."},
    {"abort", (PyCFunction)core_abort, METH_NOARGS, "Drop the output, release the socket."},
    {"give_fd", (PyCFunction)core_give_fd, METH_NOARGS,
     "The socket object was detached: the I/O thread closes the fd once released."},
    {"sendfile", (PyCFunction)core_sendfile, METH_VARARGS,
     "sendfile(fd, offset, count, waiter): sendfile() on the I/O thread after the output."},
    {"get_write_buffer_size", (PyCFunction)core_get_write_buffer_size, METH_NOARGS, NULL},
    {"set_protocol", (PyCFunction)core_set_protocol, METH_O, NULL},
    {NULL, NULL, 0, NULL},
};

PyTypeObject mt_StreamCoreType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "mtloop._mtloop.StreamCore",
    .tp_doc = "The loop-thread half of a stream transport.",
    .tp_basicsize = sizeof(mt_stream_core),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_new = core_new,
    .tp_dealloc = (destructor)core_dealloc,
    .tp_traverse = (traverseproc)core_traverse,
    .tp_clear = (inquiry)core_clear,
    .tp_methods = core_methods,
    .tp_getset = core_getset,
    .tp_members = core_members,
};

/* ---- the transport's write methods ------------------------------------------
 *
 * A field-less base class of mtloop's Python transport.  Its write() and
 * writelines() are method descriptors, so `transport.write(data)` calls C
 * directly, with no Python frame and no bound-method object kept per
 * connection (a per-instance bound method cost 72 bytes of every idle
 * connection). */

static PyObject *core_attr; /* interned "_core" */

/* Where the `_core` slot sits in instances of the last transport class
 * seen: a member descriptor's offset, so the hot path reads one pointer
 * instead of looking the attribute up (which cost as much as the Python
 * method this replaces).  0: look it up. */
static PyTypeObject *core_slot_type; /* strong */
static Py_ssize_t core_slot_offset;

static Py_ssize_t core_slot(PyTypeObject *type)
{
    if (type == core_slot_type)
        return core_slot_offset;
    PyObject *descr = PyObject_GetAttr((PyObject *)type, core_attr);
    Py_ssize_t offset = 0;
    if (descr != NULL && Py_IS_TYPE(descr, &PyMemberDescr_Type) &&
        ((PyMemberDescrObject *)descr)->d_member->type == T_OBJECT_EX)
        offset = ((PyMemberDescrObject *)descr)->d_member->offset;
    Py_XDECREF(descr);
    PyErr_Clear();
    Py_XSETREF(core_slot_type, (PyTypeObject *)Py_NewRef((PyObject *)type));
    core_slot_offset = offset;
    return offset;
}

static mt_stream_core *transport_core(PyObject *transport)
{
    Py_ssize_t offset = core_slot(Py_TYPE(transport));
    if (offset > 0) {
        PyObject *core = *(PyObject **)((char *)transport + offset);
        if (core != NULL && Py_IS_TYPE(core, &mt_StreamCoreType))
            return (mt_stream_core *)Py_NewRef(core);
    }
    PyObject *core = PyObject_GetAttr(transport, core_attr);
    if (core != NULL && !PyObject_TypeCheck(core, &mt_StreamCoreType)) {
        PyErr_SetString(PyExc_TypeError, "transport has no stream core");
        Py_CLEAR(core);
    }
    return (mt_stream_core *)core;
}

static PyObject *transport_write(PyObject *transport, PyObject *data)
{
    mt_stream_core *core = transport_core(transport);
    if (core == NULL)
        return NULL;
    PyObject *res = core_write(core, data);
    Py_DECREF(core);
    return res;
}

static PyObject *transport_writelines(PyObject *transport, PyObject *seq)
{
    mt_stream_core *core = transport_core(transport);
    if (core == NULL)
        return NULL;
    PyObject *res = core_writelines(core, seq);
    Py_DECREF(core);
    return res;
}

static PyMethodDef transport_methods[] = {
    {"write", (PyCFunction)transport_write, METH_O,
     "write(data): queue bytes-like data to be sent to the socket."},
    {"writelines", (PyCFunction)transport_writelines, METH_O,
     "writelines(list_of_data): write the items, joined."},
    {NULL, NULL, 0, NULL},
};

PyTypeObject mt_StreamWriteMethodsType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "mtloop._mtloop.StreamWriteMethods",
    .tp_doc = "write() and writelines() of mtloop's stream transport, in C.",
    .tp_basicsize = sizeof(PyObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE,
    .tp_new = PyType_GenericNew,
    .tp_methods = transport_methods,
};

int mt_stream_core_type_init(PyObject *module)
{
    core_attr = PyUnicode_InternFromString("_core");
    if (core_attr == NULL || PyType_Ready(&mt_StreamWriteMethodsType) < 0 ||
        PyModule_AddObjectRef(module, "StreamWriteMethods",
                              (PyObject *)&mt_StreamWriteMethodsType) < 0)
        return -1;
    PyObject *asyncio = PyImport_ImportModule("asyncio");
    if (asyncio == NULL)
        return -1;
    buffered_protocol_type = PyObject_GetAttrString(asyncio, "BufferedProtocol");
    Py_DECREF(asyncio);
    if (buffered_protocol_type == NULL || PyType_Ready(&mt_StreamCoreType) < 0)
        return -1;
    return PyModule_AddObjectRef(module, "StreamCore", (PyObject *)&mt_StreamCoreType);
}
