/* The I/O-thread half of stream transports: reading under read credit,
 * batched sendmsg() of queued output, shutdown, sendfile() and release of
 * the fd.  Runs only on the owning I/O thread; never touches Python. */
#include "transport/stream.h"

#include <errno.h>
#include <limits.h>
#include <stdlib.h>
#include <string.h>
#include <sys/sendfile.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

#include <event2/event.h>

#define MT_MAX_IOV 64
#define MT_READS_PER_EVENT 16

static void emit(mt_io_thread *io, mt_stream *s, mt_done_kind kind, int err, size_t len)
{
    mt_done *done = mt_done_new(kind, &s->obj, 0);
    if (done == NULL)
        return; /* out of memory: the CLOSED that follows still tells the loop */
    done->err = err;
    done->len = len;
    mt_io_thread_emit(io, done);
}

static void on_event(evutil_socket_t fd, short what, void *arg);

/* One libevent event serves both directions (a second one cost about 170
 * bytes a connection): it is re-assigned with the interest wanted, which
 * changes only when reading starts or stops or the socket fills up. */
static void set_interest(mt_stream *s, bool read, bool write)
{
    if (read == s->read_armed && write == s->write_armed)
        return;
    if (s->read_armed || s->write_armed)
        event_del(s->ev);
    s->read_armed = read;
    s->write_armed = write;
    if (read || write) {
        short what = (short)((read ? EV_READ : 0) | (write ? EV_WRITE : 0) | EV_PERSIST);
        event_assign(s->ev, mt_io_thread_base(s->obj.io), s->fd, what, on_event, s);
        event_add(s->ev, NULL);
    }
}

static void arm_write(mt_stream *s, bool want)
{
    set_interest(s, s->read_armed, want);
}

static void update_read(mt_stream *s)
{
    bool want = s->attached && s->want_read && !s->starved && !s->read_done && !s->closing &&
                !s->closed;
    set_interest(s, want, s->write_armed);
}

/* Output that will never be sent still leaves the queue: counting it as
 * flushed brings the loop's write-buffer size back to zero. */
static void drop_output(mt_stream *s)
{
    uint64_t dropped = 0;
    while (s->out_head != NULL) {
        mt_cmd *c = s->out_head;
        s->out_head = c->next;
        dropped += c->len - s->out_off;
        s->out_off = 0;
        mt_cmd_free(c);
    }
    s->out_tail = NULL;
    s->out_bytes = 0;
    if (dropped)
        mt_counter_add(&s->flushed, dropped);
}

static void check_drained(mt_io_thread *io, mt_stream *s)
{
    uint64_t mark = atomic_load_explicit(&s->resume_at, memory_order_seq_cst);
    if (mark == 0 || atomic_load_explicit(&s->flushed, memory_order_relaxed) < mark)
        return;
    if (atomic_compare_exchange_strong(&s->resume_at, &mark, 0))
        emit(io, s, MT_DONE_DRAINED, 0, 0);
}

/* The socket is full: tell the loop if it asked about this much output. */
static void check_blocked(mt_io_thread *io, mt_stream *s)
{
    uint64_t mark = atomic_load_explicit(&s->blocked_mark, memory_order_acquire);
    if (mark == 0 || s->out_bytes < mark)
        return;
    if (atomic_compare_exchange_strong(&s->blocked_mark, &mark, 0))
        emit(io, s, MT_DONE_BLOCKED, 0, 0);
}

static void finish_close(mt_io_thread *io, mt_stream *s, int err, bool notify)
{
    if (s->closed)
        return;
    s->closed = true;
    drop_output(s);
    if (s->sf_active) {
        s->sf_active = false;
        if (notify)
            emit(io, s, MT_DONE_SENDFILE, ECONNABORTED, s->sf_done);
    }
    if (s->attached) {
        event_free(s->ev);
        s->ev = NULL;
        s->read_armed = s->write_armed = false;
        atomic_fetch_sub_explicit(&mt_io_thread_stats(io)->transports, 1, memory_order_relaxed);
    }
    if (notify)
        emit(io, s, MT_DONE_CLOSED, err, 0);
    if (s->own_fd) {
        close(s->fd);
        s->own_fd = false;
    }
    if (s->attached) {
        s->attached = false;
        mt_io_thread_disown(io, &s->obj);
    }
}

static void write_failed(mt_io_thread *io, mt_stream *s, int err)
{
    int none = 0;
    atomic_compare_exchange_strong(&s->write_err, &none, err);
    s->write_failed = true;
    drop_output(s);
    arm_write(s, false);
    emit(io, s, MT_DONE_WRITE_ERROR, err, 0);
    check_drained(io, s);
}

/* Sends queued output until it is gone or the socket is full.  Returns
 * true when nothing is left to send. */
static bool flush_output(mt_io_thread *io, mt_stream *s)
{
    while (s->out_head != NULL) {
        struct iovec iov[MT_MAX_IOV];
        int cnt = 0;
        size_t off = s->out_off;
        for (mt_cmd *c = s->out_head; c != NULL && cnt < MT_MAX_IOV; c = c->next, off = 0) {
            iov[cnt].iov_base = c->data + off;
            iov[cnt].iov_len = c->len - off;
            cnt++;
        }
        struct msghdr msg = {.msg_iov = iov, .msg_iovlen = (size_t)cnt};
        ssize_t n = sendmsg(s->fd, &msg, MSG_NOSIGNAL);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK) {
                arm_write(s, true);
                check_blocked(io, s);
                return false;
            }
            if (errno == ENOTSOCK) {
                /* Not a socket after all (a pipe handed to a stream). */
                n = writev(s->fd, iov, cnt);
                if (n < 0) {
                    if (errno == EAGAIN) {
                        arm_write(s, true);
                        check_blocked(io, s);
                        return false;
                    }
                    write_failed(io, s, errno);
                    return true;
                }
            } else {
                write_failed(io, s, errno);
                return true;
            }
        }
        size_t left = (size_t)n;
        s->out_bytes -= left;
        mt_counter_add(&s->flushed, left);
        mt_counter_add(&mt_io_thread_stats(io)->bytes_written, left);
        while (left > 0) {
            mt_cmd *c = s->out_head;
            size_t avail = c->len - s->out_off;
            if (left < avail) {
                s->out_off += left;
                break;
            }
            left -= avail;
            s->out_head = c->next;
            s->out_off = 0;
            mt_cmd_free(c);
        }
        if (s->out_head == NULL)
            s->out_tail = NULL;
        check_drained(io, s);
    }
    return true;
}

/* Returns true when the sendfile is over (done or failed). */
static bool run_sendfile(mt_io_thread *io, mt_stream *s)
{
    int err = 0;
    while (s->sf_left > 0) {
        off_t off = (off_t)s->sf_offset;
        size_t chunk = s->sf_left < 0x7ffff000u ? s->sf_left : 0x7ffff000u;
        ssize_t n = sendfile(s->fd, s->sf_fd, &off, chunk);
        if (n > 0) {
            s->sf_offset += n;
            s->sf_left -= (size_t)n;
            s->sf_done += (size_t)n;
            mt_counter_add(&mt_io_thread_stats(io)->bytes_written, (uint64_t)n);
            continue;
        }
        if (n == 0)
            break; /* end of file before count */
        if (errno == EINTR)
            continue;
        if (errno == EAGAIN) {
            arm_write(s, true);
            return false;
        }
        err = errno;
        break;
    }
    s->sf_active = false;
    emit(io, s, MT_DONE_SENDFILE, err, s->sf_done);
    return true;
}

/* Moves output forward: queued writes, then a pending sendfile, then the
 * deferred shutdown/close once everything is out. */
static void pump_output(mt_io_thread *io, mt_stream *s)
{
    if (s->closed)
        return;
    if (s->out_head != NULL && !flush_output(io, s))
        return;
    if (s->sf_active && !s->write_failed && !run_sendfile(io, s))
        return;
    arm_write(s, false);
    if (s->shut_wr_pending && !s->write_failed) {
        s->shut_wr_pending = false;
        shutdown(s->fd, SHUT_WR);
    }
    if (s->closing)
        finish_close(io, s, 0, true);
}

static bool take_credit(mt_stream *s)
{
    if (atomic_load_explicit(&s->unconsumed, memory_order_seq_cst) < MT_READ_CREDIT)
        return true;
    /* Announce the stop, then look again: the loop frees credit first and
     * checks the flag second, so one of the two sides sees the other. */
    atomic_store_explicit(&s->read_starved, true, memory_order_seq_cst);
    if (atomic_load_explicit(&s->unconsumed, memory_order_seq_cst) < MT_READ_CREDIT) {
        /* Credit came back meanwhile.  If the loop already took the flag,
         * its CREDIT command will find us reading: harmless. */
        atomic_exchange(&s->read_starved, false);
        return true;
    }
    s->starved = true;
    update_read(s);
    return false;
}

/* Reads straight into a completion record the size of one pool block, so
 * a large read is copied once (kernel to record) before the loop makes
 * its bytes object.  A short read moves to a record of its own size and
 * the big one goes back to this thread's pool cache at once. */
static void on_readable(evutil_socket_t fd, short what, void *arg)
{
    (void)what;
    mt_stream *s = arg;
    mt_io_thread *io = s->obj.io;
    for (int round = 0; round < MT_READS_PER_EVENT; round++) {
        if (!take_credit(s))
            return;
        mt_done *done = mt_done_new(MT_DONE_DATA, &s->obj, MT_READ_MAX);
        if (done == NULL) {
            s->read_done = true;
            update_read(s);
            emit(io, s, MT_DONE_READ_ERROR, ENOMEM, 0);
            return;
        }
        ssize_t n = read(fd, done->data, MT_READ_MAX);
        if (n > 0) {
            if ((size_t)n <= MT_READ_COPY_MAX) {
                mt_done *small = mt_done_new(MT_DONE_DATA, &s->obj, (size_t)n);
                if (small != NULL) {
                    memcpy(small->data, done->data, (size_t)n);
                    mt_done_free(done);
                    done = small;
                }
            }
            done->len = (size_t)n;
            atomic_fetch_add_explicit(&s->unconsumed, n, memory_order_seq_cst);
            mt_counter_add(&mt_io_thread_stats(io)->bytes_read, (uint64_t)n);
            mt_io_thread_emit(io, done);
            if ((size_t)n < MT_READ_MAX)
                return;
            continue;
        }
        int err = errno;
        mt_done_free(done);
        if (n < 0 && err == EINTR)
            continue;
        if (n < 0 && (err == EAGAIN || err == EWOULDBLOCK))
            return;
        s->read_done = true;
        update_read(s);
        if (n == 0)
            emit(io, s, MT_DONE_EOF, 0, 0);
        else
            emit(io, s, MT_DONE_READ_ERROR, err, 0);
        return;
    }
}

static void on_event(evutil_socket_t fd, short what, void *arg)
{
    mt_stream *s = arg;
    if (!(what & EV_WRITE)) {
        on_readable(fd, what, s); /* the common case, kept free of atomics */
        return;
    }
    /* Writable first: flushing may close the stream and let go of the
     * record, so it is held, and read only if it is still open. */
    mt_io_obj_incref(&s->obj);
    pump_output(s->obj.io, s);
    if ((what & EV_READ) && s->read_armed && !s->closed)
        on_readable(fd, what, s);
    mt_io_obj_decref(&s->obj);
}

static void attach(mt_io_thread *io, mt_stream *s)
{
    /* Assigned for real when reading or writing first needs it. */
    s->ev = event_new(mt_io_thread_base(io), s->fd, EV_READ | EV_PERSIST, on_event, s);
    if (s->ev == NULL) {
        s->closed = true;
        drop_output(s);
        emit(io, s, MT_DONE_CLOSED, ENOMEM, 0);
        return;
    }
    s->attached = true;
    mt_io_thread_own(io, &s->obj);
    atomic_fetch_add_explicit(&mt_io_thread_stats(io)->transports, 1, memory_order_relaxed);
}

static void stream_command(mt_io_thread *io, mt_io_obj *obj, mt_cmd *cmd)
{
    mt_stream *s = (mt_stream *)obj;
    if (cmd->kind == MT_CMD_STREAM_WRITE) {
        if (s->closed || s->write_failed) {
            mt_counter_add(&s->flushed, cmd->len);
            mt_cmd_free(cmd);
            check_drained(io, s);
            return;
        }
        cmd->next = NULL;
        if (s->out_tail)
            s->out_tail->next = cmd;
        else
            s->out_head = cmd;
        s->out_tail = cmd;
        s->out_bytes += cmd->len;
        if (!s->write_armed && !s->sf_active)
            pump_output(io, s);
        else if (s->write_armed)
            check_blocked(io, s);
        return;
    }
    if (cmd->kind == MT_CMD_STREAM_OWN_FD) {
        if (s->closed)
            close(s->fd);
        else
            s->own_fd = true;
        mt_cmd_free(cmd);
        return;
    }
    if (s->closed) {
        if (cmd->kind == MT_CMD_STREAM_SENDFILE)
            emit(io, s, MT_DONE_SENDFILE, ECONNABORTED, 0);
        mt_cmd_free(cmd);
        return;
    }
    switch (cmd->kind) {
    case MT_CMD_STREAM_ATTACH:
        attach(io, s);
        break;
    case MT_CMD_STREAM_READ_ON:
        s->want_read = true;
        update_read(s);
        break;
    case MT_CMD_STREAM_READ_OFF:
        s->want_read = false;
        update_read(s);
        break;
    case MT_CMD_STREAM_CREDIT:
        s->starved = false;
        update_read(s);
        break;
    case MT_CMD_STREAM_SHUT_WR:
        s->shut_wr_pending = true;
        if (!s->write_armed && !s->sf_active)
            pump_output(io, s);
        break;
    case MT_CMD_STREAM_CLOSE:
        s->closing = true;
        update_read(s);
        if (!s->write_armed && !s->sf_active)
            pump_output(io, s);
        break;
    case MT_CMD_STREAM_ABORT:
        finish_close(io, s, 0, true);
        break;
    case MT_CMD_STREAM_SENDFILE:
        s->sf_active = true;
        s->sf_fd = cmd->file_fd;
        s->sf_offset = cmd->offset;
        s->sf_left = cmd->len;
        s->sf_done = 0;
        if (!s->write_armed)
            pump_output(io, s);
        break;
    default:
        break;
    }
    mt_cmd_free(cmd);
}

static void stream_drop(mt_io_thread *io, mt_io_obj *obj, bool notify)
{
    finish_close(io, (mt_stream *)obj, ECONNABORTED, notify);
}

static void stream_destroy(mt_io_obj *obj)
{
    mt_stream *s = (mt_stream *)obj;
    drop_output(s);
    free(s);
}

const mt_io_ops mt_stream_ops = {
    .command = stream_command,
    .drop = stream_drop,
    .destroy = stream_destroy,
};

mt_stream *mt_stream_new(mt_sink *sink, mt_io_thread *io, int fd)
{
    mt_stream *s = calloc(1, sizeof(*s));
    if (s == NULL)
        return NULL;
    mt_io_obj_init(&s->obj, &mt_stream_ops, sink, io);
    s->fd = fd;
    s->sf_fd = -1;
    atomic_init(&s->unconsumed, 0);
    atomic_init(&s->read_starved, false);
    atomic_init(&s->flushed, 0);
    atomic_init(&s->resume_at, 0);
    atomic_init(&s->blocked_mark, 0);
    atomic_init(&s->write_err, 0);
    return s;
}
