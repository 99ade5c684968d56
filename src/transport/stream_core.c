/* StreamCore: the loop-thread half of flows.  See stream_core.h; the
 * Python half is mtloop/_transports.py, the I/O half flow_pump.c. */
#include "transport/stream_core.h"

#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <structmember.h>
#include <unistd.h>

#include "pyext/module.h"
#include "transport/tls_core.h"

static PyObject *buffered_protocol_type; /* asyncio.BufferedProtocol */

#define DEFAULT_HIGH_WATER (64 * 1024)

_Static_assert(sizeof(ssize_t) == sizeof(Py_ssize_t),
               "the write-buffer limits are Python members (T_PYSSIZET)");

typedef struct mt_stream_core {
    PyObject_HEAD
    mt_loop *loop;              /* strong */
    mt_flow *flow;              /* a reference until release(); its rec.io
                                   is the owning thread */
    PyObject *transport;        /* strong until RELEASED is dispatched */
    PyObject *protocol;
    PyObject *data_received;    /* bound methods, cached; cleared by
                                   set_protocol() */
    PyObject *get_buffer;
    PyObject *buffer_updated;
    PyObject *sendfile_waiter;  /* future of a running sendfile, or NULL */
    bool buffered;

    /* asyncio's transport state, shared with the Python class. */
    bool closing, eof, reading_paused, reading_started;
    bool closed;                /* the I/O thread released the flow */
    bool sendfile_running;      /* a SENDFILE is out, its DONE not back yet */
    bool redelivery_scheduled;  /* a callback will hand deferred_* over */
    bool close_pending;         /* close() found output queued: CLOSE goes
                                   once the buffer is empty, after
                                   resume_writing() had its chance to write
                                   more, as the stock transport closes */
    bool keep_held;             /* hand_over(): what the flow read and did
                                   not deliver stays, for take_held() */
    int conn_lost;
    mt_out_view out;            /* write accounting over the flow's marks
                                   (bytes handed to WRITE messages) */

    /* Read completions held back while reading is paused. */
    mt_msg *deferred_head, *deferred_tail;
} mt_stream_core;

static const mt_loop_ops stream_loop_ops;

/* ---- talking to the I/O thread ------------------------------------------- */

/* In a child of fork(), the flow, its I/O thread and the peer are the
 * parent's: every entry point refuses. */
static int check_fork(mt_stream_core *self)
{
    return mt_loop_check_fork(self->loop);
}

static void signal_flow(mt_stream_core *self, uint32_t bits)
{
    if (self->flow != NULL)
        (void)mt_record_signal(&self->flow->rec, bits); /* a stopped pool
                                                           released it */
}

static mt_msg *next_msg(mt_msg *msg)
{
    mt_mpsc_node *next = atomic_load_explicit(&msg->node.next, memory_order_relaxed);
    return next ? MT_CONTAINER_OF(next, mt_msg, node) : NULL;
}

/* Frees a message the loop made or got back; a WRITE_REF (or its
 * REF_DONE) lets go of the object its bytes are in.  GIL held. */
static void free_loop_msg(mt_msg *m)
{
    if (m->op == MT_FLOW_WRITE_REF || m->op == MT_FLOW_REF_DONE)
        Py_DECREF((PyObject *)((mt_flow_write_ref *)mt_msg_data(m))->owner);
    mt_msg_free(m);
}

static void free_chain(mt_msg *m)
{
    while (m != NULL) {
        mt_msg *next = next_msg(m);
        free_loop_msg(m);
        m = next;
    }
}

/* Posts messages linked first..last. */
static void post_chain(mt_stream_core *self, mt_msg *first, mt_msg *last)
{
    if (!mt_io_thread_post(self->flow->rec.io, first, last))
        free_chain(first); /* the pool stopped: RELEASED is on its way */
}

/* The loop consumed `n` delivered bytes: give the credit back, restarting
 * a reader that stopped for it. */
static void return_credit(mt_stream_core *self, size_t n)
{
    if (mt_flow_consumed(self->flow, n) && !self->closed)
        signal_flow(self, MT_FLOW_CREDIT);
}

static void free_msg(mt_stream_core *self, mt_msg *msg)
{
    if (msg->op == MT_FLOW_DATA && self->flow != NULL)
        return_credit(self, msg->len);
    mt_msg_free(msg);
}

static void drop_deferred(mt_stream_core *self)
{
    mt_msg *m = self->deferred_head;
    self->deferred_head = self->deferred_tail = NULL;
    while (m != NULL) {
        mt_msg *next = next_msg(m);
        free_msg(self, m);
        m = next;
    }
}

static void defer(mt_stream_core *self, mt_msg *msg)
{
    atomic_store_explicit(&msg->node.next, NULL, memory_order_relaxed);
    if (self->deferred_tail)
        atomic_store_explicit(&self->deferred_tail->node.next, &msg->node,
                              memory_order_relaxed);
    else
        self->deferred_head = msg;
    self->deferred_tail = msg;
}

/* Puts back a message undefer() took, ahead of the rest. */
static void defer_front(mt_stream_core *self, mt_msg *msg)
{
    atomic_store_explicit(&msg->node.next,
                          self->deferred_head ? &self->deferred_head->node : NULL,
                          memory_order_relaxed);
    self->deferred_head = msg;
    if (self->deferred_tail == NULL)
        self->deferred_tail = msg;
}

static mt_msg *undefer(mt_stream_core *self)
{
    mt_msg *m = self->deferred_head;
    if (m != NULL) {
        self->deferred_head = next_msg(m);
        if (self->deferred_head == NULL)
            self->deferred_tail = NULL;
    }
    return m;
}

/* Lets go of the flow for good: its fd closes once the I/O thread has let
 * go too.  The I/O thread was told to close or abort before. */
static void release_flow(mt_stream_core *self)
{
    mt_flow *f = self->flow;
    if (f == NULL)
        return;
    drop_deferred(self);
    mt_loop_unlink(self->loop, &f->rec);
    f->rec.owner = NULL;
    self->flow = NULL;
    mt_flow_drop_fd(f);
    mt_record_decref(&f->rec);
}

static uint64_t write_buffer_size(mt_stream_core *self)
{
    if (self->closed || self->flow == NULL)
        return 0;
    return mt_out_size(&self->out, &self->flow->marks);
}

/* ---- calling into Python ---------------------------------------------------- */

static int call_failed(mt_stream_core *self)
{
    return mt_report_failed_call(self->transport ? self->transport : (PyObject *)self);
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
    if (mt_exception_must_propagate())
        return -1;
    PyObject *exc = mt_fetch_exception();
    int rc = call_transport(self, "_fatal_error", "(Os)", exc, message);
    Py_DECREF(exc);
    return rc;
}

/* The protocol's method, cached until set_protocol() changes it: a new
 * reference, since the call may change the protocol and drop the cache. */
static PyObject *protocol_method(PyObject **slot, PyObject *protocol, const char *name)
{
    if (*slot == NULL)
        *slot = PyObject_GetAttrString(protocol, name);
    return Py_XNewRef(*slot);
}

static PyObject *call_method_with(PyObject **slot, PyObject *protocol, const char *name,
                                  PyObject *arg)
{
    PyObject *method = protocol_method(slot, protocol, name);
    if (method == NULL)
        return NULL;
    PyObject *res = PyObject_CallOneArg(method, arg);
    Py_DECREF(method);
    return res;
}

static const char no_memory_for_data[] = "Fatal error: out of memory for received data.";

/* protocol.data_received(bytes), taking the reference. */
static int deliver_object(mt_stream_core *self, PyObject *bytes)
{
    PyObject *res = call_method_with(&self->data_received, self->protocol, "data_received",
                                     bytes);
    Py_DECREF(bytes);
    if (res == NULL)
        return protocol_failed(self, "Fatal error: protocol.data_received() call failed.");
    Py_DECREF(res);
    return 0;
}

static int deliver_bytes(mt_stream_core *self, const char *data, size_t n)
{
    PyObject *bytes = PyBytes_FromStringAndSize(data, (Py_ssize_t)n);
    if (bytes == NULL)
        return protocol_failed(self, no_memory_for_data);
    return deliver_object(self, bytes);
}

/* 1: `view` holds the protocol's next buffer (get_buffer(-1)), writable
 * and not empty.  Otherwise the protocol failed: protocol_failed()'s
 * result, and the caller stops. */
static int protocol_buffer(mt_stream_core *self, Py_buffer *view)
{
    static const char get_failed[] = "Fatal error: protocol.get_buffer() call failed.";
    PyObject *hint = PyLong_FromLong(-1);
    PyObject *buf = hint ? call_method_with(&self->get_buffer, self->protocol, "get_buffer",
                                            hint)
                         : NULL;
    Py_XDECREF(hint);
    if (buf == NULL)
        return protocol_failed(self, get_failed);
    int rc = PyObject_GetBuffer(buf, view, PyBUF_WRITABLE);
    Py_DECREF(buf);
    if (rc < 0)
        return protocol_failed(self, get_failed);
    if (view->len == 0) {
        PyBuffer_Release(view);
        PyErr_SetString(PyExc_RuntimeError, "get_buffer() returned an empty buffer");
        return protocol_failed(self, get_failed);
    }
    return 1;
}

/* 1, or protocol_failed()'s result. */
static int buffer_updated(mt_stream_core *self, size_t n)
{
    PyObject *nbytes = PyLong_FromSize_t(n);
    PyObject *res = nbytes ? call_method_with(&self->buffer_updated, self->protocol,
                                              "buffer_updated", nbytes)
                           : NULL;
    Py_XDECREF(nbytes);
    if (res == NULL)
        return protocol_failed(self, "Fatal error: protocol.buffer_updated() call failed.");
    Py_DECREF(res);
    return 1;
}

/* Fills the protocol's buffers, `*done` counting the bytes they took.
 * When the protocol changes on the way (set_protocol() in
 * buffer_updated), the rest goes to the new one the way it reads, as
 * asyncio switches read paths with the protocol; pause_reading() there
 * stops it. */
static int deliver_buffered(mt_stream_core *self, const char *data, size_t n, size_t *done)
{
    while (n > 0 && !self->closing && !self->reading_paused) {
        if (!self->buffered)
            return self->protocol == Py_None ? 0 : deliver_bytes(self, data, n);
        Py_buffer view;
        int rc = protocol_buffer(self, &view);
        if (rc <= 0)
            return rc;
        size_t k = (size_t)view.len < n ? (size_t)view.len : n;
        memcpy(view.buf, data, k);
        PyBuffer_Release(&view);
        data += k;
        n -= k;
        *done += k;
        if ((rc = buffer_updated(self, k)) <= 0)
            return rc;
    }
    return 0;
}

static int deliver_data(mt_stream_core *self, mt_msg *msg)
{
    if (!self->buffered) {
        int rc = deliver_bytes(self, mt_msg_data(msg), msg->len);
        free_msg(self, msg);
        return rc;
    }
    size_t done = 0;
    int rc = deliver_buffered(self, mt_msg_data(msg), msg->len, &done);
    if (rc == 0 && done < msg->len && self->reading_paused && !self->closing &&
        self->flow != NULL) {
        /* Paused inside buffer_updated(): the rest waits for
         * resume_reading(), as asyncio reads no more while paused. */
        size_t left = msg->len - done;
        memmove(mt_msg_data(msg), (char *)mt_msg_data(msg) + done, left);
        if (mt_flow_consumed_part(self->flow, msg->len, left) && !self->closed)
            signal_flow(self, MT_FLOW_CREDIT);
        msg->len = left;
        defer_front(self, msg);
        return 0;
    }
    free_msg(self, msg);
    return rc;
}

/* One read-side completion (data, EOF or a read error), in order. */
static int deliver_read(mt_stream_core *self, mt_msg *msg)
{
    switch (msg->op) {
    case MT_FLOW_DATA:
        return deliver_data(self, msg);
    case MT_FLOW_EOF:
        free_msg(self, msg);
        return call_transport(self, "_mt_eof", "()");
    default: {
        int err = msg->err;
        free_msg(self, msg);
        return call_transport(self, "_mt_read_error", "(i)", err);
    }
    }
}

static bool reading_held(mt_stream_core *self)
{
    return self->reading_paused || self->deferred_head != NULL;
}

/* An inline flow's protocol reads straight from the fd (flow.h, direct
 * reads): always into a BufferedProtocol's buffers, into data_received()'s
 * bytes while the reads are large; never while hand_over() keeps what the
 * flow reads for take_held(). */
static void update_read_direct(mt_stream_core *self)
{
    if (self->flow != NULL)
        mt_flow_set_read_direct(self->flow, self->keep_held ? MT_READ_DIRECT_OFF
                                            : self->buffered ? MT_READ_DIRECT_ALWAYS
                                                             : MT_READ_DIRECT_LARGE);
}

/* A direct read whose block has shrunk to this size (the flow's reads
 * got small while it read directly) goes through a buffer on the stack
 * and is copied into a bytes object of its own size, as uvloop reads:
 * allocating a block-sized object and shrinking it cost 1.10x the CPU per
 * request at 1 KiB x1 (tools/bench.py --full -k protocol, inline). */
#define MT_READ_COPY_MAX ((size_t)16 * 1024)

/* A direct read for data_received(): what read() returns, the bytes object
 * in *out when positive, *room the size offered; -2 with a MemoryError set
 * when there was no memory for the object (the bytes read are lost then:
 * the caller fails the connection).  A large read goes into a new object
 * sized as the flow's records are (less the object's header, so that the
 * allocation is the block), cut to what the read returned, as asyncio's
 * selector transport reads (recv() into a new object of max_size, then
 * shrunk): the bytes are copied once, by the kernel. */
static ssize_t read_into_bytes(mt_flow *f, PyObject **out, size_t *room)
{
    size_t block = mt_flow_read_block(f);
    ssize_t n;
    if (block <= MT_READ_COPY_MAX) {
        char buf[MT_READ_COPY_MAX];
        *room = sizeof(buf);
        n = mt_flow_read_direct(f, buf, sizeof(buf));
        if (n <= 0)
            return n;
        (void)mt_flow_read_sized(f, (size_t)n, *room);
        return (*out = PyBytes_FromStringAndSize(buf, n)) == NULL ? -2 : n;
    }
    *room = block - offsetof(PyBytesObject, ob_sval) - 1;
    PyObject *bytes = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)*room);
    if (bytes == NULL)
        return -2;
    n = mt_flow_read_direct(f, PyBytes_AS_STRING(bytes), *room);
    if (n <= 0) {
        int err = errno;
        Py_DECREF(bytes);
        errno = err;
        return n;
    }
    (void)mt_flow_read_sized(f, (size_t)n, *room);
    if ((size_t)n < *room && _PyBytes_Resize(&bytes, n) < 0)
        return -2;
    *out = bytes;
    return n;
}

/* READABLE: reads until the fd has no more, into the protocol's buffers
 * (as asyncio's BufferedProtocol path reads) or into the bytes objects
 * data_received() gets, with the end of the stream or an error reported
 * after the data before it.  Anything that stops it (pause_reading(),
 * close(), a new protocol) leaves the rest in the kernel, and the
 * level-triggered watch reports it again. */
static int read_direct(mt_stream_core *self)
{
    for (int round = 0; round < MT_READS_PER_EVENT; round++) {
        /* read_direct follows hand_over() (update_read_direct). */
        mt_flow *f = self->flow;
        if (f == NULL || f->read_direct == MT_READ_DIRECT_OFF || self->closed || self->closing ||
            reading_held(self))
            return 0;
        int rc;
        ssize_t n;
        size_t room;
        int err;
        if (!self->buffered) {
            PyObject *bytes = NULL;
            n = read_into_bytes(f, &bytes, &room);
            err = errno;
            if (n == -2)
                return protocol_failed(self, no_memory_for_data);
            if (n > 0 && (rc = deliver_object(self, bytes)) < 0)
                return rc;
        } else {
            Py_buffer view;
            if ((rc = protocol_buffer(self, &view)) <= 0)
                return rc;
            room = (size_t)view.len;
            n = mt_flow_read_direct(f, view.buf, room);
            err = errno;
            PyBuffer_Release(&view);
            if (n > 0 && (rc = buffer_updated(self, (size_t)n)) <= 0)
                return rc;
        }
        if (n > 0) {
            if ((size_t)n < room)
                return 0;
            continue;
        }
        if (n == 0)
            return call_transport(self, "_mt_eof", "()");
        if (err == EAGAIN || err == EWOULDBLOCK)
            return 0;
        return call_transport(self, "_mt_read_error", "(i)", err);
    }
    return 0;
}

/* ---- write-side accounting ----------------------------------------------- */

static void push_own(mt_stream_core *self, uint8_t op)
{
    mt_msg *msg = mt_msg_new(op, &self->flow->rec, 0);
    if (msg != NULL)
        mt_sink_push(self->loop->sink, msg, msg, true);
}

static void arm_drained_at(mt_stream_core *self, uint64_t mark)
{
    if (mt_flow_arm_resume(self->flow, mark))
        push_own(self, MT_FLOW_DRAINED);
}

/* While the protocol is paused, asks the I/O thread for DRAINED once the
 * buffer is down to the low-water mark. */
static void arm_resume(mt_stream_core *self)
{
    if (mt_out_arm_low(&self->out, &self->flow->marks))
        push_own(self, MT_FLOW_DRAINED);
}

/* BLOCKED: the fd refused output with more than the mark waiting. */
static int on_blocked(mt_stream_core *self)
{
    if (self->closing || !mt_out_blocked_pauses(&self->out, &self->flow->marks))
        return 0;
    return call_transport(self, "_maybe_pause_protocol", "()");
}

/* Sends a small write from the loop thread when that saves a wakeup and
 * nothing else waits for the loop: the owning I/O thread sleeps, holds no
 * earlier output of this flow (all of it was sent or dropped, and no
 * sendfile is out, so nothing can be reordered), and the loop has no
 * completion or callback queued.  The fd stays open while this half holds
 * the flow.  Returns the bytes sent; the rest (all of it on EAGAIN or an
 * error) goes to the I/O thread, which reports any error the usual way.
 *
 * Measured on the development VM with the load generator against
 * tools/bench_server.py: a 1 KiB ping-pong's p50 drops by about 14% (one
 * of its three context switches per request goes).  Sending directly
 * whenever the I/O thread slept, without the idle-loop condition, cost
 * 35% at 32 busy connections, because the loop thread then did the sends
 * of whole bursts itself. */
static size_t direct_send(mt_stream_core *self, const char *buf, size_t len)
{
    mt_flow *f = self->flow;
    /* With inline I/O (io_threads=0) this thread is the flow's I/O thread:
     * every write is tried at once, whatever its size, as asyncio's is. */
    bool inline_io = mt_io_thread_is_inline(f->rec.io);
    if ((len > MT_DIRECT_SEND_MAX && !inline_io) || self->closing || self->closed ||
        self->sendfile_running || !f->fd_ops->loop_may_write)
        return 0;
    if (!mt_loop_may_send_directly(self->loop, f->rec.io))
        return 0;
    if (atomic_load_explicit(&f->marks.flushed, memory_order_acquire) != self->out.queued)
        return 0;
    struct iovec iov = {.iov_base = (void *)buf, .iov_len = len};
    ssize_t n = f->fd_ops->writev(f, &iov, 1);
    if (inline_io && (n >= 0 ? (size_t)n < len : errno == EAGAIN || errno == EWOULDBLOCK)) {
        /* The kernel refused output, seen by the flow's own thread (this
         * one): the protocol pauses at once if what is left passes the
         * high-water mark, as asyncio's write() pauses it. */
        atomic_store_explicit(&f->marks.output_full, true, memory_order_seq_cst);
    }
    if (n > 0) {
        mt_io_stats *stats = mt_io_thread_stats(f->rec.io);
        if (inline_io) /* this thread writes the inline runtime's counters */
            mt_counter_add(&stats->bytes_written, (uint64_t)n);
        else /* other loops may send on the same I/O thread's records */
            atomic_fetch_add_explicit(&stats->bytes_sent_direct, (uint64_t)n,
                                      memory_order_relaxed);
        return (size_t)n;
    }
    if (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR) {
        /* A hard error: write() fails now, as asyncio's does.  The error
         * may be the socket's pending one (a reset), which this send()
         * consumed: left to the I/O thread, a later read would see a clean
         * EOF instead. */
        int none = 0;
        atomic_compare_exchange_strong(&f->write_err, &none, errno);
    }
    return 0;
}

/* The flow saw a hard write error (here or on its I/O thread): the write
 * is dropped and the transport fails with that error, once, as asyncio's
 * write() fails when send() does.  Without this, a writer that never
 * yields would write into a dead connection forever, the I/O thread
 * dropping each write as it came. */
static bool write_broken(mt_stream_core *self, PyObject **res)
{
    int err = atomic_load_explicit(&self->flow->write_err, memory_order_acquire);
    if (err == 0)
        return false;
    *res = call_transport(self, "_mt_write_error", "(i)", err) < 0 ? NULL : Py_NewRef(Py_None);
    return true;
}

/* A WRITE is cut into messages of at most one pool block each: a large
 * write then reuses blocks the threads keep cached, where one message of
 * its own size was a malloc() of its own (with glibc's defaults, an mmap()
 * and a page fault per 4 KiB touched, every time: 1 GiB through `cat` in
 * 256 KiB writes cost the loop thread 8% of its samples in page faults). */
#define MT_WRITE_MSG_MAX ((size_t)(128 * 1024) - sizeof(mt_msg))

/* Writes at least this large out of a bytes object are sent from the
 * object itself (WRITE_REF), held until the I/O thread hands the message
 * back (quietly: flow_pump.c's out_done): a copy costs the loop thread
 * more than that completion.  Measured with 256 KiB writes through `cat`
 * (tools/bench.py --procs): the copy was a fifth of the loop thread's
 * CPU. */
#define MT_WRITE_REF_MIN ((size_t)4 * 1024)

/* The WRITE messages carrying buf[0:len] in order, linked through their
 * nodes (the last in *last_out); NULL when out of memory.  With `owner`
 * (the immutable object buf lies in) and len >= MT_WRITE_REF_MIN, one
 * WRITE_REF that holds it instead. */
static mt_msg *write_chain(mt_stream_core *self, const char *buf, size_t len, PyObject *owner,
                           mt_msg **last_out)
{
    if (owner != NULL && len >= MT_WRITE_REF_MIN) {
        mt_msg *m = mt_msg_new(MT_FLOW_WRITE_REF, &self->flow->rec, sizeof(mt_flow_write_ref));
        if (m == NULL)
            return NULL;
        mt_flow_write_ref *ref = mt_msg_data(m);
        ref->data = buf;
        ref->owner = Py_NewRef(owner);
        m->len = len; /* what the pump sends and counts */
        *last_out = m;
        return m;
    }
    mt_msg *first = NULL, *last = NULL;
    do {
        size_t n = len < MT_WRITE_MSG_MAX ? len : MT_WRITE_MSG_MAX;
        mt_msg *m = mt_msg_new(MT_FLOW_WRITE, &self->flow->rec, n);
        if (m == NULL) {
            free_chain(first);
            return NULL;
        }
        memcpy(mt_msg_data(m), buf, n);
        if (last != NULL)
            atomic_store_explicit(&last->node.next, &m->node, memory_order_relaxed);
        else
            first = m;
        last = m;
        buf += n;
        len -= n;
    } while (len > 0);
    *last_out = last;
    return first;
}

/* Queues buf[0:len] for the I/O thread; `owner`: the immutable object buf
 * lies in, or NULL (the bytes are copied). */
static PyObject *queue_output(mt_stream_core *self, const void *buf, size_t len, PyObject *owner)
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
    mt_msg *last;
    mt_msg *first = write_chain(self, buf, len, owner, &last);
    if (first == NULL)
        return PyErr_NoMemory();
    self->out.queued += len;
    /* The marks are set before the bytes go: the I/O thread may find the
     * fd full with them at once.  Over the high-water mark the kernel may
     * still take it all: the protocol pauses once the I/O thread finds the
     * fd full with that much waiting (BLOCKED), or now if it has already. */
    int rc = 0;
    if (self->out.paused)
        arm_resume(self); /* the buffer grew: the mark moves with it */
    else if (mt_out_must_pause(&self->out, &self->flow->marks))
        rc = call_transport(self, "_maybe_pause_protocol", "()");
    if (self->close_pending && !self->out.paused)
        arm_drained_at(self, self->out.queued);
    post_chain(self, first, last);
    if (rc < 0)
        return NULL;
    Py_RETURN_NONE;
}


static int check_writable(mt_stream_core *self, const char *what)
{
    if (check_fork(self) < 0)
        return -1;
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

static PyObject *write_view(mt_stream_core *self, const void *buf, size_t len, PyObject *owner)
{
    if (len == 0)
        Py_RETURN_NONE;
    if (self->conn_lost || self->flow == NULL)
        return mt_count_lost_write(&self->conn_lost);
    return queue_output(self, buf, len, owner);
}

static PyObject *core_write(mt_stream_core *self, PyObject *data)
{
    if (!PyBytes_Check(data) && !PyByteArray_Check(data) && !PyMemoryView_Check(data)) {
        PyErr_Format(PyExc_TypeError, "data argument must be a bytes-like object, not '%.200s'",
                     Py_TYPE(data)->tp_name);
        return NULL;
    }
    if (check_writable(self, "write") < 0)
        return NULL;
    if (PyBytes_Check(data))
        return write_view(self, PyBytes_AS_STRING(data), (size_t)PyBytes_GET_SIZE(data), data);
    Py_buffer view;
    if (PyObject_GetBuffer(data, &view, PyBUF_SIMPLE) < 0)
        return NULL;
    PyObject *res = write_view(self, view.buf, (size_t)view.len, NULL);
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

static void set_want_read(mt_stream_core *self, bool on)
{
    if (self->flow == NULL)
        return;
    atomic_store_explicit(&self->flow->want_read, on, memory_order_relaxed);
    signal_flow(self, MT_FLOW_READING);
}

static PyObject *core_start_reading(mt_stream_core *self, PyObject *Py_UNUSED(a))
{
    if (check_fork(self) < 0)
        return NULL;
    if (!self->reading_started) {
        self->reading_started = true;
        if (!self->reading_paused && !self->closing)
            set_want_read(self, true);
    }
    Py_RETURN_NONE;
}

/* pause_reading() and resume_reading() return whether they changed
 * anything, for the debug log. */
static PyObject *core_pause_reading(mt_stream_core *self, PyObject *Py_UNUSED(a))
{
    if (check_fork(self) < 0)
        return NULL;
    if (self->closing || self->reading_paused)
        Py_RETURN_FALSE;
    self->reading_paused = true;
    if (self->reading_started)
        set_want_read(self, false);
    Py_RETURN_TRUE;
}

static PyObject *core_redeliver(mt_stream_core *self, PyObject *Py_UNUSED(a))
{
    self->redelivery_scheduled = false;
    Py_INCREF(self);
    int rc = 0;
    mt_msg *m;
    while (rc == 0 && !self->reading_paused && !self->closing && (m = undefer(self)) != NULL)
        rc = deliver_read(self, m);
    Py_DECREF(self);
    if (rc < 0)
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *core_resume_reading(mt_stream_core *self, PyObject *Py_UNUSED(a))
{
    if (check_fork(self) < 0)
        return NULL;
    if (self->closing || !self->reading_paused)
        Py_RETURN_FALSE;
    self->reading_paused = false;
    if (self->reading_started)
        set_want_read(self, true);
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
    Py_RETURN_TRUE;
}

static PyObject *core_shutdown_write(mt_stream_core *self, PyObject *Py_UNUSED(a))
{
    if (check_fork(self) < 0)
        return NULL;
    self->eof = true;
    signal_flow(self, MT_FLOW_SHUT_WR);
    Py_RETURN_NONE;
}

/* Reading stops at once.  With output queued, the I/O thread flushes it
 * and this half signals CLOSE when DRAINED finds the buffer empty after
 * resume_writing() ran: a protocol may write from resume_writing() after
 * close() (asyncio's SSL protocol sends its close_notify so), and the stock
 * transport sends that too before it closes. */
static void begin_close(mt_stream_core *self)
{
    self->closing = true;
    if (!self->keep_held)
        drop_deferred(self);
    if (self->closed || self->flow == NULL)
        return;
    if (write_buffer_size(self) == 0) {
        signal_flow(self, MT_FLOW_CLOSE);
        return;
    }
    self->close_pending = true;
    set_want_read(self, false);
    if (!self->out.paused)
        arm_drained_at(self, self->out.queued); /* paused: the resume mark comes first */
}

static PyObject *core_close(mt_stream_core *self, PyObject *Py_UNUSED(a))
{
    if (check_fork(self) < 0)
        return NULL;
    begin_close(self);
    Py_RETURN_NONE;
}

/* start_tls() on the I/O thread (mtloop/_streams.py): the flow ends as
 * close() ends it, its output sent first, and RELEASED calls the
 * transport's _mt_closed(); but what it read and did not deliver (held
 * while reading was paused, or still on its way) is kept: it is the start
 * of the TLS stream, for take_held(). */
static PyObject *core_hand_over(mt_stream_core *self, PyObject *Py_UNUSED(a))
{
    if (check_fork(self) < 0)
        return NULL;
    if (self->closing || self->closed || self->flow == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "the transport is closing");
        return NULL;
    }
    self->keep_held = true;
    update_read_direct(self);
    set_want_read(self, false);
    begin_close(self);
    Py_RETURN_NONE;
}

/* After hand_over() and RELEASED: the bytes the flow read and did not
 * deliver, in order (an end of stream or a read error among them is
 * dropped: the socket reports it again to whoever reads it next). */
static PyObject *core_take_held(mt_stream_core *self, PyObject *Py_UNUSED(a))
{
    if (!self->keep_held) {
        PyErr_SetString(PyExc_RuntimeError, "take_held() without hand_over()");
        return NULL;
    }
    Py_ssize_t total = 0;
    for (mt_msg *m = self->deferred_head; m != NULL; m = next_msg(m))
        if (m->op == MT_FLOW_DATA)
            total += (Py_ssize_t)m->len;
    PyObject *held = PyBytes_FromStringAndSize(NULL, total);
    if (held == NULL)
        return NULL;
    char *p = PyBytes_AS_STRING(held);
    for (mt_msg *m = self->deferred_head; m != NULL; m = next_msg(m)) {
        if (m->op == MT_FLOW_DATA) {
            memcpy(p, mt_msg_data(m), m->len);
            p += m->len;
        }
    }
    self->keep_held = false;
    drop_deferred(self);
    return held;
}

static PyObject *core_abort(mt_stream_core *self, PyObject *Py_UNUSED(a))
{
    if (check_fork(self) < 0)
        return NULL;
    self->closing = true;
    drop_deferred(self);
    self->close_pending = false;
    if (!self->closed && self->flow != NULL) {
        /* The output is gone from this side's point of view at once. */
        mt_out_forget(&self->out, &self->flow->marks);
        signal_flow(self, MT_FLOW_ABORT);
    }
    Py_RETURN_NONE;
}

static PyObject *core_release(mt_stream_core *self, PyObject *Py_UNUSED(a))
{
    if (check_fork(self) < 0)
        return NULL;
    if (self->flow != NULL && !self->closed && !self->closing)
        signal_flow(self, MT_FLOW_ABORT); /* never released without a word */
    self->closing = true;
    Py_CLEAR(self->transport);
    release_flow(self);
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
    if (check_fork(self) < 0)
        return NULL;
    if (self->sendfile_waiter != NULL || self->sendfile_running) {
        PyErr_SetString(PyExc_RuntimeError, "a sendfile is already in progress");
        return NULL;
    }
    if (self->flow == NULL || self->closed) {
        PyErr_SetString(PyExc_ConnectionError, "the transport is closed");
        return NULL;
    }
    /* The flow sends from its own descriptor: the caller's may be closed,
     * and its number reused, as soon as the await is abandoned. */
    int own = fcntl(fd, F_DUPFD_CLOEXEC, 0);
    if (own < 0)
        return PyErr_SetFromErrno(PyExc_OSError);
    mt_msg *msg = mt_msg_new(MT_FLOW_SENDFILE, &self->flow->rec, sizeof(mt_flow_sendfile));
    if (msg == NULL) {
        close(own);
        return PyErr_NoMemory();
    }
    mt_flow_sendfile *sf = mt_msg_data(msg);
    sf->fd = own;
    sf->offset = offset;
    sf->count = (size_t)count;
    if (!mt_io_thread_post(self->flow->rec.io, msg, msg)) {
        close(own);
        mt_msg_free(msg);
        PyErr_SetString(PyExc_ConnectionAbortedError, "mtloop's I/O threads have stopped");
        return NULL;
    }
    self->sendfile_waiter = Py_NewRef(waiter);
    self->sendfile_running = true;
    Py_RETURN_NONE;
}

static PyObject *core_sendfile_cancel(mt_stream_core *self, PyObject *Py_UNUSED(a))
{
    if (check_fork(self) < 0)
        return NULL;
    if (self->sendfile_waiter != NULL) {
        Py_CLEAR(self->sendfile_waiter);
        signal_flow(self, MT_FLOW_SF_CANCEL);
    }
    Py_RETURN_NONE;
}

static PyObject *core_get_write_buffer_size(mt_stream_core *self, PyObject *Py_UNUSED(a))
{
    if (check_fork(self) < 0)
        return NULL;
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
    update_read_direct(self);
    Py_RETURN_NONE;
}

/* ---- completion dispatch (the loop's ops) ------------------------------------ */

static int on_drained(mt_stream_core *self)
{
    if (self->out.paused && !self->conn_lost) {
        bool report_now;
        if (!mt_out_drained_resumes(&self->out, &self->flow->marks, &report_now)) {
            if (report_now)
                push_own(self, MT_FLOW_DRAINED);
            return 0;
        }
        if (call_transport(self, "_maybe_resume_protocol", "()") < 0)
            return -1; /* resume_writing() may have written more */
    }
    if (self->close_pending && !self->out.paused && self->flow != NULL) {
        if (write_buffer_size(self) == 0) {
            self->close_pending = false;
            signal_flow(self, MT_FLOW_CLOSE);
        } else {
            arm_drained_at(self, self->out.queued);
        }
    }
    return 0;
}

static int on_sendfile_done(mt_stream_core *self, int err, size_t sent)
{
    self->sendfile_running = false;
    PyObject *waiter = self->sendfile_waiter;
    if (waiter == NULL)
        return 0; /* cancelled */
    self->sendfile_waiter = NULL;
    int rc = call_transport(self, "_mt_sendfile_done", "(Oin)", waiter, err, (Py_ssize_t)sent);
    Py_DECREF(waiter);
    return rc;
}

static int on_released(mt_stream_core *self, int err)
{
    self->closed = true;
    self->closing = true;
    if (!self->keep_held)
        drop_deferred(self);
    int rc = 0;
    if (self->sendfile_running)
        rc = on_sendfile_done(self, ECONNABORTED, 0);
    if (rc == 0)
        rc = call_transport(self, "_mt_closed", "(i)", err);
    Py_CLEAR(self->transport);
    /* The flow stays with this half until connection_lost() lets go of it
     * (release()): until then the socket's extra info may still read it. */
    mt_loop_unlink(self->loop, &self->flow->rec);
    return rc;
}

static int stream_dispatch(mt_loop *loop, mt_msg *msg)
{
    (void)loop;
    mt_flow *f = (mt_flow *)msg->rec;
    if (msg->op == MT_FLOW_REF_DONE) {
        free_loop_msg(msg); /* may follow RELEASED: needs nobody */
        return 0;
    }
    if (msg->op == MT_OP_RELEASED)
        mt_tls_core_unpin(f); /* even with nobody left to tell */
    mt_stream_core *self = f->rec.owner;
    if (self == NULL || self->transport == NULL) {
        if (msg->op == MT_FLOW_DATA)
            (void)mt_flow_consumed(f, msg->len); /* nobody will read on */
        mt_msg_free(msg);
        return 0;
    }
    Py_INCREF(self);
    int rc = 0;
    int err = msg->err;
    switch (msg->op) {
    case MT_FLOW_DATA:
    case MT_FLOW_EOF:
    case MT_FLOW_READ_ERROR:
        if (self->keep_held)
            defer(self, msg); /* hand_over(): for take_held() */
        else if (self->closing)
            free_msg(self, msg);
        else if (reading_held(self))
            defer(self, msg);
        else
            rc = deliver_read(self, msg);
        break;
    case MT_FLOW_READABLE:
        mt_msg_free(msg);
        rc = read_direct(self);
        break;
    case MT_FLOW_WRITE_ERROR:
        mt_msg_free(msg);
        rc = call_transport(self, "_mt_write_error", "(i)", err);
        break;
    case MT_FLOW_DRAINED:
        mt_msg_free(msg);
        rc = on_drained(self);
        break;
    case MT_FLOW_BLOCKED:
        mt_msg_free(msg);
        rc = on_blocked(self);
        break;
    case MT_FLOW_SENDFILE_DONE: {
        size_t sent = ((mt_flow_sendfile_done *)mt_msg_data(msg))->sent;
        mt_msg_free(msg);
        rc = on_sendfile_done(self, err, sent);
        break;
    }
    case MT_FLOW_OPENED:
        mt_msg_free(msg);
        rc = call_transport(self, "_mt_opened", "(i)", err);
        break;
    case MT_OP_RELEASED:
        mt_msg_free(msg);
        rc = on_released(self, err);
        break;
    default:
        mt_msg_free(msg);
    }
    Py_DECREF(self);
    return rc;
}

static void stream_discard(mt_msg *msg)
{
    if (msg->op == MT_OP_RELEASED)
        mt_tls_core_unpin((mt_flow *)msg->rec);
    free_loop_msg(msg); /* REF_DONE's object is the only payload that owns anything */
}

/* The loop is closing with the transport open: its descriptor closes here,
 * and the socket object it was made from (if any) with it, so the peer
 * sees the connection end now, as uvloop's does, rather than when the
 * transport is collected. */
static void stream_detach(mt_loop *loop, mt_record *rec)
{
    mt_stream_core *self = rec->owner;
    Py_INCREF(self);
    self->closed = true;
    self->closing = true;
    self->sendfile_running = false;
    Py_CLEAR(self->sendfile_waiter);
    if (self->transport != NULL && loop->fork_generation == mt_fork_generation()) {
        PyObject *res = PyObject_CallMethod(self->transport, "_mt_loop_closed", NULL);
        if (res == NULL)
            PyErr_WriteUnraisable(self->transport);
        Py_XDECREF(res);
    }
    Py_CLEAR(self->transport);
    mt_tls_core_unpin((mt_flow *)rec); /* the I/O thread has let go */
    release_flow(self);
    Py_DECREF(self);
}

static const mt_loop_ops stream_loop_ops = {
    .dispatch = stream_dispatch,
    .discard = stream_discard,
    .detach = stream_detach,
};

/* ---- lifetime ------------------------------------------------------------------ */

/* The fd operations a StreamCore(kind=...) runs under; NULL: no such kind. */
static const mt_fd_ops *fd_ops_of_kind(const char *kind)
{
    if (strcmp(kind, "socket") == 0)
        return &mt_socket_fd_ops;
    if (strcmp(kind, "read-pipe") == 0)
        return &mt_pipe_fd_ops;
    if (strcmp(kind, "write-pipe") == 0)
        return &mt_pipe_writer_fd_ops;
    return NULL;
}

static PyObject *core_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"loop", "fd", "transport", "protocol", "dup", "tls", "kind", NULL};
    PyObject *loop_obj, *transport, *protocol, *tls = Py_None;
    const char *kind = "socket";
    int fd, dup = 1;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O!iOO|pO$s:StreamCore", kwlist,
                                     &mt_LoopCoreType, &loop_obj, &fd, &transport, &protocol,
                                     &dup, &tls, &kind))
        return NULL;
    if (fd < 0) {
        PyErr_SetString(PyExc_ValueError, "invalid file descriptor");
        return NULL;
    }
    const mt_fd_ops *fd_ops = fd_ops_of_kind(kind);
    if (fd_ops == NULL || (tls != Py_None && fd_ops != &mt_socket_fd_ops)) {
        PyErr_Format(PyExc_ValueError, "no StreamCore kind '%s'%s", kind,
                     tls != Py_None ? " with tls" : "");
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
    mt_out_view_init(&self->out, DEFAULT_HIGH_WATER);
    if (set_protocol(self, protocol) < 0) {
        Py_DECREF(self);
        return NULL;
    }
    /* A socket object's descriptor is copied: the flow owns its own, so no
     * Python object can close it under the I/O thread. */
    int own = dup ? fcntl(fd, F_DUPFD_CLOEXEC, 0) : fd;
    if (own < 0) {
        Py_DECREF(self);
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    if (tls == Py_None) {
        self->flow = mt_flow_new(fd_ops, &stream_loop_ops, loop->sink, io, own);
        if (self->flow == NULL)
            PyErr_NoMemory();
    } else {
        self->flow = mt_tls_core_new_flow(tls, &stream_loop_ops, loop->sink, io, own);
    }
    if (self->flow == NULL) {
        if (dup)
            close(own);
        Py_DECREF(self);
        return NULL;
    }
    self->flow->rec.owner = self;
    update_read_direct(self);
    self->transport = Py_NewRef(transport);
    mt_loop_link(loop, &self->flow->rec);
    signal_flow(self, MT_FLOW_ATTACH);
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
    /* A transport may die while an exception unwinds the frame that held
     * it: nothing here may disturb that exception. */
    PyObject *exc = PyErr_Occurred() ? mt_fetch_exception() : NULL;
    if (self->flow != NULL) {
        if (!self->closed && self->loop->fork_generation == mt_fork_generation())
            signal_flow(self, MT_FLOW_ABORT);
        drop_deferred(self);
        /* Not linked: the loop's list would have kept this object.  In a
         * child of fork() the fd is the parent's connection too: closing
         * this copy of it does not touch the parent's. */
        mt_flow *f = self->flow;
        f->rec.owner = NULL;
        self->flow = NULL;
        mt_flow_drop_fd(f);
        mt_record_decref(&f->rec);
    }
    core_clear(self);
    Py_CLEAR(self->loop);
    Py_TYPE(self)->tp_free((PyObject *)self);
    if (exc != NULL)
        mt_restore_exception(exc);
}

/* ---- attributes -------------------------------------------------------------- */

static PyObject *get_protocol(mt_stream_core *self, void *Py_UNUSED(c))
{
    return Py_NewRef(self->protocol ? self->protocol : Py_None);
}

static PyObject *get_paused_flag(mt_stream_core *self, void *Py_UNUSED(c))
{
    return PyBool_FromLong(self->out.paused);
}

static int set_paused_flag(mt_stream_core *self, PyObject *v, void *Py_UNUSED(c))
{
    int b = v ? PyObject_IsTrue(v) : 0;
    if (b < 0)
        return -1;
    if (self->flow == NULL || self->closed) {
        self->out.paused = b;
    } else if (!b && self->close_pending) {
        self->out.paused = false;
        arm_drained_at(self, self->out.queued); /* DRAINED tells when to close */
    } else if (mt_out_set_paused(&self->out, &self->flow->marks, b)) {
        push_own(self, MT_FLOW_DRAINED);
    }
    return 0;
}

static PyObject *get_fd(mt_stream_core *self, void *Py_UNUSED(c))
{
    return PyLong_FromLong(self->flow ? self->flow->fd : -1);
}

static PyObject *core_tls_info(mt_stream_core *self, PyObject *Py_UNUSED(a))
{
    if (self->flow == NULL)
        Py_RETURN_NONE;
    return mt_tls_core_info(self->flow);
}

static PyObject *core_tls_error(mt_stream_core *self, PyObject *Py_UNUSED(a))
{
    if (self->flow == NULL)
        Py_RETURN_NONE;
    return mt_tls_core_error(self->flow);
}

static PyObject *core_tls_shutdown_clean(mt_stream_core *self, PyObject *Py_UNUSED(a))
{
    return PyBool_FromLong(self->flow != NULL && mt_tls_core_shutdown_clean(self->flow));
}

static PyObject *get_io_thread(mt_stream_core *self, void *Py_UNUSED(c))
{
    if (self->flow == NULL)
        Py_RETURN_NONE;
    return PyLong_FromLong(mt_io_thread_index(self->flow->rec.io));
}

static PyGetSetDef core_getset[] = {
    {"protocol", (getter)get_protocol, NULL, "The protocol data is delivered to.", NULL},
    {"protocol_paused", (getter)get_paused_flag, (setter)set_paused_flag,
     "Whether pause_writing() was called and resume_writing() not yet.", NULL},
    {"fd", (getter)get_fd, NULL,
     "The flow's own file descriptor, or -1 once released.", NULL},
    {"io_thread", (getter)get_io_thread, NULL, "Index of the owning I/O thread.", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyMemberDef core_members[] = {
    {"closing", T_BOOL, offsetof(mt_stream_core, closing), 0, NULL},
    {"eof", T_BOOL, offsetof(mt_stream_core, eof), 0, NULL},
    {"reading_paused", T_BOOL, offsetof(mt_stream_core, reading_paused), READONLY, NULL},
    {"closed", T_BOOL, offsetof(mt_stream_core, closed), READONLY, NULL},
    {"conn_lost", T_INT, offsetof(mt_stream_core, conn_lost), 0, NULL},
    {"high_water", T_PYSSIZET, offsetof(mt_stream_core, out.high_water), 0, NULL},
    {"low_water", T_PYSSIZET, offsetof(mt_stream_core, out.low_water), 0, NULL},
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
    {"close", (PyCFunction)core_close, METH_NOARGS, "Flush, then release the flow."},
    {"hand_over", (PyCFunction)core_hand_over, METH_NOARGS,
     "Flush, then release the flow, keeping what it read for take_held()."},
    {"take_held", (PyCFunction)core_take_held, METH_NOARGS,
     "The bytes read and not delivered, after hand_over() (start_tls)."},
    {"abort", (PyCFunction)core_abort, METH_NOARGS, "Drop the output, release the flow."},
    {"release", (PyCFunction)core_release, METH_NOARGS,
     "Let go of the flow (connection_lost): its fd closes once the I/O thread is done."},
    {"sendfile", (PyCFunction)core_sendfile, METH_VARARGS,
     "sendfile(fd, offset, count, waiter): sendfile() on the I/O thread after the output, "
     "from a copy of fd."},
    {"sendfile_cancel", (PyCFunction)core_sendfile_cancel, METH_NOARGS,
     "The await was abandoned: stop the sendfile, forget its waiter."},
    {"get_write_buffer_size", (PyCFunction)core_get_write_buffer_size, METH_NOARGS, NULL},
    {"set_protocol", (PyCFunction)core_set_protocol, METH_O, NULL},
    {"tls_info", (PyCFunction)core_tls_info, METH_NOARGS,
     "What the TLS handshake settled (a tuple), or None."},
    {"tls_error", (PyCFunction)core_tls_error, METH_NOARGS,
     "The connection's TLS failure (a tuple), or None."},
    {"tls_shutdown_clean", (PyCFunction)core_tls_shutdown_clean, METH_NOARGS,
     "Whether the close exchanged close_notify both ways."},
    {NULL, NULL, 0, NULL},
};

PyTypeObject mt_StreamCoreType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "mtloop._mtloop.StreamCore",
    .tp_doc = "The loop-thread half of a byte-stream transport.",
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

static mt_core_slot write_slot; /* where transport_write() finds the core */

static PyObject *transport_write(PyObject *transport, PyObject *data)
{
    mt_stream_core *core =
        (mt_stream_core *)mt_transport_core(&write_slot, transport, &mt_StreamCoreType);
    if (core == NULL)
        return NULL;
    PyObject *res = core_write(core, data);
    Py_DECREF(core);
    return res;
}

static PyObject *transport_writelines(PyObject *transport, PyObject *seq)
{
    mt_stream_core *core =
        (mt_stream_core *)mt_transport_core(&write_slot, transport, &mt_StreamCoreType);
    if (core == NULL)
        return NULL;
    PyObject *res = core_writelines(core, seq);
    Py_DECREF(core);
    return res;
}

/* StreamWriter.drain() asks this on every call. */
static PyObject *transport_is_closing(PyObject *transport, PyObject *Py_UNUSED(a))
{
    mt_stream_core *core =
        (mt_stream_core *)mt_transport_core(&write_slot, transport, &mt_StreamCoreType);
    if (core == NULL)
        return NULL;
    bool closing = core->closing;
    Py_DECREF(core);
    return PyBool_FromLong(closing);
}

static PyMethodDef transport_methods[] = {
    {"is_closing", (PyCFunction)transport_is_closing, METH_NOARGS,
     "is_closing() -> bool: whether the transport is closing or closed."},
    {"write", (PyCFunction)transport_write, METH_O,
     "write(data): queue bytes-like data to be sent to the socket."},
    {"writelines", (PyCFunction)transport_writelines, METH_O,
     "writelines(list_of_data): write the items, joined."},
    {NULL, NULL, 0, NULL},
};

PyTypeObject mt_StreamWriteMethodsType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "mtloop._mtloop.StreamWriteMethods",
    .tp_doc = "write(), writelines() and is_closing() of mtloop's stream transport, in C.",
    .tp_basicsize = sizeof(PyObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE,
    .tp_new = PyType_GenericNew,
    .tp_methods = transport_methods,
};

int mt_stream_core_type_init(PyObject *module)
{
    if (PyType_Ready(&mt_StreamWriteMethodsType) < 0 ||
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
