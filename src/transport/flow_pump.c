/* The flow pump: the I/O-thread half of every byte-stream transport, and
 * the loop's side of its handshakes.  See flow.h.  The I/O half runs only
 * on the owning thread and never touches Python. */
#include "transport/flow.h"

#include "io_threads/buffer_pool.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define MT_MAX_IOV 64

_Static_assert(((size_t)1 << MT_READ_MAX_SHIFT) - sizeof(mt_msg) == MT_READ_MAX &&
                   MT_READ_MAX_SHIFT <= MT_POOL_MAX_SHIFT && MT_READ_MIN_SHIFT >= MT_POOL_MIN_SHIFT,
               "reads go into whole pool blocks");

static void emit(mt_io_thread *io, mt_flow *f, uint8_t op, int err)
{
    /* Nothing follows RELEASED.  Out of memory: dropped; RELEASED, which
     * cannot fail, still ends the flow for the loop. */
    if (!f->closed)
        (void)mt_io_thread_emit_op(io, &f->rec, op, err);
}

static void finish_close(mt_io_thread *io, mt_flow *f, int err, bool notify);
static void on_readable(mt_io_thread *io, mt_flow *f);

/* ---- interest ------------------------------------------------------------- */

/* The filter's own work (opening or closing) holds the byte stream. */
static bool filter_busy(const mt_flow *f)
{
    return f->filter_phase == MT_FILTER_OPENING || f->filter_phase == MT_FILTER_CLOSING;
}

/* Input a filter holds that no readiness event will announce (flow.h). */
static bool filter_has_input(mt_flow *f)
{
    return f->fd_ops->has_input != NULL && f->fd_ops->has_input(f);
}

static bool reading_wanted(mt_flow *f)
{
    return atomic_load_explicit(&f->want_read, memory_order_relaxed) && !f->starved &&
           !f->held_back && !f->read_done && !f->closing && !filter_busy(f);
}

static void update_interest(mt_io_thread *io, mt_flow *f)
{
    if (f->closed || !f->rec.attached)
        return;
    unsigned interest;
    if (filter_busy(f))
        interest = f->filter_wait; /* the filter's own work comes first */
    else
        interest = (reading_wanted(f) ? f->read_on : 0) | (f->want_write ? f->write_on : 0);
    if (mt_io_watch_set(&f->watch, interest) < 0)
        finish_close(io, f, errno, true); /* a silent flow would hang its peer */
}

/* The readiness an fd op that returned EAGAIN waits for. */
static unsigned take_wait_hint(mt_flow *f, unsigned own)
{
    unsigned hint = f->wait_hint;
    f->wait_hint = 0;
    return hint ? hint : own;
}

/* ---- the output side ------------------------------------------------------ */

/* The next WRITE of the output queue, chained through the message's node. */
static mt_msg *out_next(mt_msg *m)
{
    mt_mpsc_node *next = atomic_load_explicit(&m->node.next, memory_order_relaxed);
    return next ? MT_CONTAINER_OF(next, mt_msg, node) : NULL;
}

/* The bytes of a WRITE or a WRITE_REF. */
static char *out_data(mt_msg *m)
{
    if (m->op == MT_FLOW_WRITE_REF)
        return (char *)((mt_flow_write_ref *)mt_msg_data(m))->data;
    return mt_msg_data(m);
}

/* A WRITE is done with (sent or dropped): freed, or for a WRITE_REF handed
 * back to the loop as REF_DONE, which lets go of the bytes' object.  No
 * one waits for that: it goes quietly, with the next completion that
 * wakes the loop (a wakeup of its own, in a request-response exchange
 * where the loop sleeps after each write, is a context switch a request). */
static void out_done(mt_io_thread *io, mt_msg *m)
{
    if (m->op != MT_FLOW_WRITE_REF) {
        mt_msg_free(m);
        return;
    }
    m->op = MT_FLOW_REF_DONE;
    mt_io_thread_emit_quiet(io, m, m->len);
}

static void emit_sendfile_done(mt_io_thread *io, mt_flow *f, int err, size_t sent)
{
    if (f->closed)
        return; /* nothing follows RELEASED: the loop ends the waiter there */
    mt_msg *msg = mt_msg_new(MT_FLOW_SENDFILE_DONE, &f->rec, sizeof(mt_flow_sendfile_done));
    if (msg == NULL)
        return; /* the loop's waiter ends with RELEASED at the latest */
    msg->err = err;
    ((mt_flow_sendfile_done *)mt_msg_data(msg))->sent = sent;
    mt_io_thread_emit(io, msg);
}

static void end_sendfile(mt_io_thread *io, mt_flow *f, int err, bool notify)
{
    if (f->sf_fd < 0)
        return;
    close(f->sf_fd);
    f->sf_fd = -1;
    if (notify)
        emit_sendfile_done(io, f, err, f->sf_done);
}

/* The handshakes' I/O side (flow.h).  Each side stores, then loads what the
 * other stores, both sequentially consistent: with a release store here
 * instead, x86 let the load pass the store and each side miss the other's
 * update (the DRAINED that resume_writing() waits for never came: 66-741
 * lost in 10^6 racing rounds on the 2-core VM, tests/c/test_flow_race.c). */
/* `n` more bytes left the queue (sent, or dropped). */
static void note_flushed(mt_io_thread *io, mt_flow *f, uint64_t n)
{
    if (!mt_flow_add_flushed(f, n) || f->closed)
        return;
    if (!mt_io_thread_emit_op(io, &f->rec, MT_FLOW_DRAINED, 0)) {
        /* Out of memory: the next flush tries again. */
        mt_out_rearm_resume(&f->marks);
    }
}

/* More output waits behind a full fd: tell the loop if it asked about this
 * much. */
static void check_blocked(mt_io_thread *io, mt_flow *f)
{
    if (mt_out_take_blocked(&f->marks, f->out_bytes))
        emit(io, f, MT_FLOW_BLOCKED, 0);
}

static void note_full(mt_io_thread *io, mt_flow *f)
{
    f->want_write = true;
    f->write_on = take_wait_hint(f, MT_IO_WRITE);
    update_interest(io, f);
    if (mt_flow_note_full(f))
        emit(io, f, MT_FLOW_BLOCKED, 0);
}

/* Output that will never be sent still leaves the queue: counting it as
 * flushed brings the loop's write-buffer size back to zero. */
static void drop_output(mt_io_thread *io, mt_flow *f)
{
    uint64_t dropped = 0;
    while (f->out_head != NULL) {
        mt_msg *m = f->out_head;
        f->out_head = out_next(m);
        dropped += m->len - f->out_off;
        f->out_off = 0;
        out_done(io, m);
    }
    f->out_tail = NULL;
    f->out_bytes = 0;
    if (dropped)
        note_flushed(io, f, dropped);
}

static void write_failed(mt_io_thread *io, mt_flow *f, int err)
{
    int none = 0;
    atomic_compare_exchange_strong(&f->write_err, &none, err);
    f->write_failed = true;
    f->want_write = false;
    /* The error goes first: the drop below may reach the loop's resume
     * mark, and a DRAINED ahead of it would resume a paused writer (its
     * drain() returning cleanly) before the transport failed. */
    emit(io, f, MT_FLOW_WRITE_ERROR, err);
    drop_output(io, f);
    update_interest(io, f);
}

/* Sends queued output until it is gone or the fd is full.  Returns true
 * when nothing is left to send. */
static bool flush_output(mt_io_thread *io, mt_flow *f)
{
    while (f->out_head != NULL) {
        struct iovec iov[MT_MAX_IOV];
        int cnt = 0;
        size_t off = f->out_off;
        for (mt_msg *m = f->out_head; m != NULL && cnt < MT_MAX_IOV; m = out_next(m), off = 0) {
            iov[cnt].iov_base = out_data(m) + off;
            iov[cnt].iov_len = m->len - off;
            cnt++;
        }
        ssize_t n = f->fd_ops->writev(f, iov, cnt);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK) {
                note_full(io, f);
                return false;
            }
            write_failed(io, f, errno);
            return true;
        }
        mt_out_note_progress(&f->marks);
        f->write_on = MT_IO_WRITE;
        size_t left = (size_t)n;
        f->out_bytes -= left;
        mt_counter_add(&mt_io_thread_stats(io)->bytes_written, left);
        while (left > 0) {
            mt_msg *m = f->out_head;
            size_t avail = m->len - f->out_off;
            if (left < avail) {
                f->out_off += left;
                break;
            }
            left -= avail;
            f->out_head = out_next(m);
            f->out_off = 0;
            out_done(io, m);
        }
        if (f->out_head == NULL)
            f->out_tail = NULL;
        note_flushed(io, f, (uint64_t)n);
    }
    return true;
}

/* The errors after which nothing can be sent any more (others, such as a
 * file sendfile() cannot read, leave the connection usable: the loop falls
 * back to writes). */
static bool connection_broken(int err)
{
    switch (err) {
    case EPIPE:
    case ECONNRESET:
    case ECONNABORTED:
    case ENOTCONN:
    case ESHUTDOWN:
    case ETIMEDOUT:
    case EHOSTUNREACH:
    case ENETUNREACH:
    case ENETDOWN:
        return true;
    default:
        return false;
    }
}

/* Returns true when the sendfile is over (done or failed). */
static bool run_sendfile(mt_io_thread *io, mt_flow *f)
{
    int err = 0;
    while (f->sf_left > 0) {
        size_t chunk = f->sf_left < 0x7ffff000u ? f->sf_left : 0x7ffff000u;
        ssize_t n = f->fd_ops->sendfile(f, f->sf_fd, &f->sf_offset, chunk);
        if (n > 0) {
            f->sf_left -= (size_t)n;
            f->sf_done += (size_t)n;
            mt_counter_add(&mt_io_thread_stats(io)->bytes_written, (uint64_t)n);
            continue;
        }
        if (n == 0)
            break; /* end of file before count */
        if (errno == EINTR)
            continue;
        if (errno == EAGAIN) {
            f->want_write = true;
            update_interest(io, f);
            return false;
        }
        err = errno;
        break;
    }
    end_sendfile(io, f, err, true);
    if (err != 0 && connection_broken(err))
        write_failed(io, f, err); /* as a failed send fails the transport */
    return true;
}

static void run_filter(mt_io_thread *io, mt_flow *f);

/* Moves output forward: queued writes, then a pending sendfile, then the
 * deferred shutdown and close once everything is out.  Nothing moves while
 * a filter does its own work. */
static void pump_output(mt_io_thread *io, mt_flow *f)
{
    if (f->closed || filter_busy(f))
        return;
    if (f->out_head != NULL && !flush_output(io, f))
        return;
    if (f->sf_fd >= 0 && !f->write_failed && !run_sendfile(io, f))
        return;
    if (f->want_write) {
        f->want_write = false;
        update_interest(io, f);
    }
    if (f->shut_wr_pending && !f->write_failed) {
        f->shut_wr_pending = false;
        if (f->fd_ops->shutdown_wr != NULL)
            f->fd_ops->shutdown_wr(f);
    }
    if (!f->closing)
        return;
    if (f->filter_phase == MT_FILTER_OPEN) {
        f->filter_phase = MT_FILTER_CLOSING; /* close_notify first */
        run_filter(io, f);
        return;
    }
    finish_close(io, f, 0, true);
}

/* ---- a filter's own work ---------------------------------------------------- */

/* Runs the filter's opening or closing as far as the fd lets it. */
static void run_filter(mt_io_thread *io, mt_flow *f)
{
    bool opening = f->filter_phase == MT_FILTER_OPENING;
    int rc = opening ? f->fd_ops->open(f) : f->fd_ops->close(f);
    int err = rc < 0 ? errno : 0;
    if (rc > 0) {
        update_interest(io, f);
        return;
    }
    f->filter_wait = 0;
    if (!opening) {
        finish_close(io, f, err, true);
        return;
    }
    emit(io, f, MT_FLOW_OPENED, err); /* before any data it read */
    if (rc < 0) {
        finish_close(io, f, err, true);
        return;
    }
    f->filter_phase = MT_FILTER_OPEN;
    update_interest(io, f);
    pump_output(io, f); /* what was queued meanwhile */
    if (!f->closed && reading_wanted(f) && filter_has_input(f))
        on_readable(io, f);
}

/* ---- the input side ------------------------------------------------------- */

bool mt_flow_read_sized(mt_flow *f, size_t n, size_t room)
{
    bool sparse = n <= room / 4;
    if (n == room && f->read_shift < MT_READ_MAX_SHIFT)
        f->read_shift++;
    else if (sparse && f->read_shift > MT_READ_MIN_SHIFT)
        f->read_shift--;
    return sparse;
}

/* Reads straight into a completion record the size of one pool block
 * (sized per flow, see flow.h), so a read is copied once (kernel to
 * record) before the loop makes its bytes object.  A read that fills
 * under a quarter of its block moves to a record of its own size, and
 * the block goes back to this thread's pool cache at once. */
static void on_readable(mt_io_thread *io, mt_flow *f)
{
    if (f->read_direct == MT_READ_DIRECT_ALWAYS ||
        (f->read_direct == MT_READ_DIRECT_LARGE &&
         mt_flow_read_block(f) > MT_READ_DIRECT_LARGE_MIN)) {
        emit(io, f, MT_FLOW_READABLE, 0); /* the loop reads: see flow.h */
        return;
    }
    for (int round = 0; round < MT_READS_PER_EVENT; round++) {
        if (!mt_credit_available(&f->read_credit, MT_READ_CREDIT)) {
            f->starved = true;
            update_interest(io, f);
            return;
        }
        if (!mt_io_lane_open(io, &f->rec)) {
            f->held_back = true;
            update_interest(io, f);
            return;
        }
        size_t block = (size_t)1 << f->read_shift, room = block - sizeof(mt_msg);
        mt_msg *msg = mt_msg_new(MT_FLOW_DATA, &f->rec, room);
        if (msg == NULL) {
            f->read_done = true;
            update_interest(io, f);
            emit(io, f, MT_FLOW_READ_ERROR, ENOMEM);
            return;
        }
        ssize_t n = f->fd_ops->read(f, mt_msg_data(msg), room);
        if (n > 0) {
            if (mt_flow_read_sized(f, (size_t)n, room)) {
                mt_msg *small = mt_msg_new(MT_FLOW_DATA, &f->rec, (size_t)n);
                if (small != NULL) {
                    memcpy(mt_msg_data(small), mt_msg_data(msg), (size_t)n);
                    mt_msg_free(msg);
                    msg = small;
                }
            }
            msg->len = (size_t)n;
            mt_credit_take(&f->read_credit, mt_read_charge((size_t)n));
            mt_counter_add(&mt_io_thread_stats(io)->bytes_read, (uint64_t)n);
            mt_io_thread_emit(io, msg);
            if (f->read_on != MT_IO_READ) {
                f->read_on = MT_IO_READ;
                update_interest(io, f);
            }
            if ((size_t)n < room && !filter_has_input(f))
                return;
            continue;
        }
        int err = errno;
        mt_msg_free(msg);
        if (n < 0 && err == EINTR)
            continue;
        if (n < 0 && (err == EAGAIN || err == EWOULDBLOCK)) {
            unsigned on = take_wait_hint(f, MT_IO_READ);
            if (on != f->read_on) {
                f->read_on = on;
                update_interest(io, f);
            }
            return;
        }
        f->read_done = true;
        update_interest(io, f);
        if (n == 0)
            emit(io, f, MT_FLOW_EOF, 0);
        else
            emit(io, f, MT_FLOW_READ_ERROR, err);
        return;
    }
    /* Out of rounds: input a filter holds gets no readiness event. */
    if (filter_has_input(f))
        mt_record_mark_dirty(io, &f->rec);
}

static void on_watch(mt_io_watch *w, unsigned events)
{
    mt_flow *f = MT_CONTAINER_OF(w, mt_flow, watch);
    mt_io_thread *io = w->io;
    if (events == MT_IO_READ && f->read_on == MT_IO_READ && !filter_busy(f)) {
        on_readable(io, f); /* the common case, kept free of atomics */
        return;
    }
    /* Output first: flushing (or a filter's work) may close the flow and
     * let go of the record, so it is held, and read only if still open. */
    mt_record_incref(&f->rec);
    if (filter_busy(f)) {
        if (events & f->filter_wait)
            run_filter(io, f); /* moves output and input itself when done */
    } else {
        if (f->want_write && (events & f->write_on))
            pump_output(io, f);
        if (!f->closed && reading_wanted(f) && (events & f->read_on))
            on_readable(io, f);
    }
    mt_record_decref(&f->rec);
}

void mt_flow_set_read_direct(mt_flow *f, int mode)
{
    /* Only an inline flow's field is this thread's to write. */
    if (mt_io_thread_is_inline(f->rec.io))
        f->read_direct = f->fd_ops->open == NULL && f->fd_ops->has_input == NULL
                             ? (uint8_t)mode : MT_READ_DIRECT_OFF;
}

ssize_t mt_flow_read_direct(mt_flow *f, void *buf, size_t len)
{
    mt_io_thread *io = f->rec.io;
    ssize_t n;
    do
        n = f->fd_ops->read(f, buf, len);
    while (n < 0 && errno == EINTR);
    if (n > 0) {
        mt_counter_add(&mt_io_thread_stats(io)->bytes_read, (uint64_t)n);
        mt_counter_add(&mt_io_thread_stats(io)->reads_direct, 1);
    } else if (n == 0 || (errno != EAGAIN && errno != EWOULDBLOCK)) {
        int err = errno;
        f->read_done = true;
        update_interest(io, f);
        errno = err;
    }
    return n;
}

/* ---- lifetime ------------------------------------------------------------- */

void mt_flow_drop_fd(mt_flow *f)
{
    mt_fd_hold_drop(f->fd, &f->fd_holds);
}

static void finish_close(mt_io_thread *io, mt_flow *f, int err, bool notify)
{
    if (f->closed)
        return;
    end_sendfile(io, f, ECONNABORTED, notify); /* its DONE before RELEASED */
    f->closed = true;
    drop_output(io, f);
    if (f->rec.attached) {
        mt_io_watch_close(&f->watch);
        atomic_fetch_sub_explicit(&mt_io_thread_stats(io)->transports, 1, memory_order_relaxed);
    }
    if (f->fd_ops->release)
        f->fd_ops->release(f, false); /* before the fd can close */
    mt_flow_drop_fd(f);
    if (notify)
        mt_record_release(io, &f->rec, err);
    mt_record_detach(io, &f->rec);
}

static void attach(mt_io_thread *io, mt_flow *f)
{
    if (mt_io_watch_open(&f->watch, io, f->fd, on_watch) < 0) {
        int err = errno;
        f->closed = true;
        drop_output(io, f);
        if (f->fd_ops->release)
            f->fd_ops->release(f, false);
        mt_flow_drop_fd(f);
        mt_record_release(io, &f->rec, err);
        return;
    }
    mt_record_attach(io, &f->rec);
    atomic_fetch_add_explicit(&mt_io_thread_stats(io)->transports, 1, memory_order_relaxed);
    if (f->fd_ops->open != NULL) {
        f->filter_phase = MT_FILTER_OPENING;
        f->filter_wait = MT_IO_READ | MT_IO_WRITE; /* until open says what it waits for */
        run_filter(io, f);
    }
}

/* ---- the runtime's entry points ------------------------------------------- */

static void flow_message(mt_io_thread *io, mt_record *rec, mt_msg *msg)
{
    mt_flow *f = (mt_flow *)rec;
    switch (msg->op) {
    case MT_FLOW_WRITE:
    case MT_FLOW_WRITE_REF:
        if (msg->len == 0 || f->closed || f->write_failed) {
            /* Counted first: the message's reference may be the flow's
             * last (a closed flow whose loop half let go meanwhile). */
            note_flushed(io, f, msg->len);
            out_done(io, msg);
            return;
        }
        atomic_store_explicit(&msg->node.next, NULL, memory_order_relaxed);
        if (f->out_tail)
            atomic_store_explicit(&f->out_tail->node.next, &msg->node, memory_order_relaxed);
        else
            f->out_head = msg;
        f->out_tail = msg;
        f->out_bytes += msg->len;
        mt_record_mark_dirty(io, rec); /* flushed once, after the batch */
        return;
    case MT_FLOW_SENDFILE: {
        mt_flow_sendfile *sf = mt_msg_data(msg);
        if (f->closed || f->sf_fd >= 0 || sf->fd < 0 || f->fd_ops->sendfile == NULL) {
            if (sf->fd >= 0)
                close(sf->fd);
            emit_sendfile_done(io, f, sf->fd < 0 ? EBADF : EINVAL, 0);
        } else {
            f->sf_fd = sf->fd;
            f->sf_offset = sf->offset;
            f->sf_left = sf->count;
            f->sf_done = 0;
            mt_record_mark_dirty(io, rec);
        }
        mt_msg_free(msg);
        return;
    }
    default:
        mt_msg_free(msg);
    }
}

static void flow_service(mt_io_thread *io, mt_record *rec, uint32_t control)
{
    mt_flow *f = (mt_flow *)rec;
    if (f->closed)
        return;
    if (control & MT_FLOW_ATTACH) {
        attach(io, f);
        if (f->closed)
            return;
    }
    if (!rec->attached)
        return; /* cannot happen: ATTACH is the first signal of a flow */
    if (control & MT_FLOW_ABORT) {
        finish_close(io, f, 0, true);
        return;
    }
    if (control & MT_FLOW_SF_CANCEL)
        end_sendfile(io, f, ECANCELED, true);
    if (control & MT_FLOW_SHUT_WR)
        f->shut_wr_pending = true;
    if (control & MT_FLOW_CLOSE)
        f->closing = true;
    if (control & MT_FLOW_CREDIT)
        f->starved = false;
    if (filter_busy(f) && f->filter_wait == 0) {
        run_filter(io, f); /* a filter waiting for no readiness asked for this */
        if (f->closed)
            return;
    }
    update_interest(io, f);
    if (f->closed)
        return;
    if (!f->want_write)
        pump_output(io, f);
    else if (f->out_head != NULL)
        check_blocked(io, f); /* more output behind a full fd */
    /* Input a filter already holds raises no readiness event. */
    if (!f->closed && reading_wanted(f) && filter_has_input(f))
        on_readable(io, f);
}

static void flow_resume(mt_io_thread *io, mt_record *rec)
{
    mt_flow *f = (mt_flow *)rec;
    f->held_back = false;
    if (f->closed)
        return;
    /* Read before watching again (record.c, park). */
    if (reading_wanted(f) && f->read_on == MT_IO_READ)
        on_readable(io, f);
    update_interest(io, f);
}

static void flow_drop(mt_io_thread *io, mt_record *rec, bool notify)
{
    finish_close(io, (mt_flow *)rec, ECONNABORTED, notify);
}

static void flow_destroy(mt_record *rec)
{
    mt_flow *f = (mt_flow *)rec;
    /* Queued output holds references: none is left by now.  A hold not
     * dropped belongs to a flow no I/O thread ever served. */
    if (f->sf_fd >= 0)
        close(f->sf_fd);
    if (f->fd_ops->release)
        f->fd_ops->release(f, true);
    mt_fd_holds_end(f->fd, &f->fd_holds);
    free(f);
}

static const mt_record_ops flow_ops = {
    .message = flow_message,
    .service = flow_service,
    .drop = flow_drop,
    .destroy = flow_destroy,
    .resume = flow_resume,
};

mt_flow *mt_flow_new(const mt_fd_ops *fd_ops, const struct mt_loop_ops *loop_ops,
                     mt_sink *sink, mt_io_thread *io, int fd)
{
    mt_flow *f = calloc(1, fd_ops->flow_size ? fd_ops->flow_size : sizeof(*f));
    if (f == NULL)
        return NULL;
    mt_record_init(&f->rec, &flow_ops, loop_ops, sink, io);
    f->fd_ops = fd_ops;
    f->fd = fd;
    mt_fd_holds_init(&f->fd_holds);
    f->sf_fd = -1;
    f->read_on = MT_IO_READ;
    f->write_on = MT_IO_WRITE;
    f->read_shift = MT_READ_MAX_SHIFT;
    atomic_init(&f->want_read, false);
    mt_credit_init(&f->read_credit);
    mt_out_marks_init(&f->marks);
    atomic_init(&f->write_err, 0);
    return f;
}

/* ---- the loop's side of the handshakes ------------------------------------ */

bool mt_flow_consumed(mt_flow *f, size_t n)
{
    return mt_credit_return(&f->read_credit, mt_read_charge(n), MT_READ_CREDIT);
}

bool mt_flow_consumed_part(mt_flow *f, size_t n, size_t left)
{
    return mt_credit_return(&f->read_credit, mt_read_charge(n) - mt_read_charge(left),
                            MT_READ_CREDIT);
}
