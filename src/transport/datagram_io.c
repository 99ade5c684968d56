/* The I/O-thread half of datagram endpoints: batched receives under
 * credit, batched sends, close after the output.  See datagram.h. */
#include "transport/datagram.h"

#include <errno.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

/* Datagrams one recvmmsg()/sendmmsg() call takes at most, and the calls a
 * readiness event makes at most before the thread serves its other
 * records. */
#define MT_DGRAM_BATCH 32
#define MT_DGRAM_BATCHES_PER_EVENT 4

/* ---- the receive scratch: one per I/O thread ------------------------------ */

/* recvmmsg() fills these; each datagram is then copied into a completion
 * of its own size.  2 MiB a thread, touched only as far as datagrams
 * reach. */
#define MT_DGRAM_SCRATCH (MT_DGRAM_BATCH * MT_DGRAM_READ_MAX_IP)

typedef struct scratch {
    struct mmsghdr hdr[MT_DGRAM_BATCH];
    struct iovec iov[MT_DGRAM_BATCH];
    struct sockaddr_storage addr[MT_DGRAM_BATCH];
    char buf[MT_DGRAM_SCRATCH];
} scratch;

static pthread_key_t scratch_key;
static pthread_once_t scratch_once = PTHREAD_ONCE_INIT;

static void make_scratch_key(void)
{
    (void)pthread_key_create(&scratch_key, free); /* freed when the thread ends */
}

static scratch *thread_scratch(void)
{
    pthread_once(&scratch_once, make_scratch_key);
    scratch *s = pthread_getspecific(scratch_key);
    if (s == NULL) {
        s = malloc(sizeof(*s));
        if (s != NULL && pthread_setspecific(scratch_key, s) != 0) {
            free(s);
            s = NULL;
        }
    }
    return s;
}

/* ---- messages ------------------------------------------------------------- */

static mt_msg *dgram_msg_new(uint8_t op, mt_record *rec, const void *addr, socklen_t addrlen,
                             size_t len)
{
    mt_msg *msg = mt_msg_new(op, rec, sizeof(mt_dgram_head) + addrlen + len);
    if (msg == NULL)
        return NULL;
    ((mt_dgram_head *)mt_msg_data(msg))->addrlen = addrlen;
    if (addrlen > 0)
        memcpy((char *)mt_msg_data(msg) + sizeof(mt_dgram_head), addr, addrlen);
    return msg;
}

mt_msg *mt_dgram_send_new(mt_record *rec, const struct sockaddr *addr, socklen_t addrlen,
                          size_t len)
{
    return dgram_msg_new(MT_DGRAM_SEND, rec, addr, addrlen, len);
}

static mt_msg *out_next(mt_msg *m)
{
    mt_mpsc_node *next = atomic_load_explicit(&m->node.next, memory_order_relaxed);
    return next ? MT_CONTAINER_OF(next, mt_msg, node) : NULL;
}

static void emit_error(mt_io_thread *io, mt_dgram *d, int err)
{
    (void)mt_io_thread_emit_op(io, &d->rec, MT_DGRAM_ERROR, err);
}

/* `units` more left the output queue (sent, or dropped). */
static void note_flushed(mt_io_thread *io, mt_dgram *d, uint64_t units)
{
    if (mt_out_add_flushed(&d->marks, units) && !d->closed &&
        !mt_io_thread_emit_op(io, &d->rec, MT_DGRAM_DRAINED, 0))
        mt_out_rearm_resume(&d->marks);
}

/* ---- interest and release ---------------------------------------------------- */

static void release(mt_io_thread *io, mt_dgram *d, int err, bool notify);

static void update_interest(mt_io_thread *io, mt_dgram *d)
{
    if (d->closed || !d->rec.attached)
        return;
    unsigned interest = (d->reading && !d->starved && !d->held_back && !d->closing ? MT_IO_READ : 0) |
                        (d->want_write ? MT_IO_WRITE : 0);
    if (mt_io_watch_set(&d->watch, interest) < 0)
        release(io, d, errno, true);
}

static void drop_output(mt_io_thread *io, mt_dgram *d)
{
    uint64_t units = d->out_units;
    mt_msg *m = d->out_head;
    d->out_head = d->out_tail = NULL;
    d->out_units = 0;
    while (m != NULL) {
        mt_msg *next = out_next(m);
        mt_msg_free(m);
        m = next;
    }
    if (units)
        note_flushed(io, d, units);
}

static void release(mt_io_thread *io, mt_dgram *d, int err, bool notify)
{
    if (d->closed)
        return;
    d->closed = true;
    drop_output(io, d);
    if (d->rec.attached) {
        mt_io_watch_close(&d->watch);
        atomic_fetch_sub_explicit(&mt_io_thread_stats(io)->transports, 1, memory_order_relaxed);
    }
    mt_dgram_drop_fd(d);
    if (notify)
        mt_record_release(io, &d->rec, err);
    mt_record_detach(io, &d->rec);
}

/* ---- receiving ---------------------------------------------------------------- */

/* One datagram from the scratch to the loop.  False when out of memory:
 * it is dropped then, as the kernel drops what it has no room for. */
static bool deliver(mt_io_thread *io, mt_dgram *d, scratch *s, int i)
{
    struct msghdr *h = &s->hdr[i].msg_hdr;
    size_t n = s->hdr[i].msg_len;
    mt_msg *msg = dgram_msg_new(MT_DGRAM_RECEIVED, &d->rec, h->msg_name, h->msg_namelen, n);
    if (msg == NULL)
        return false;
    memcpy(mt_dgram_bytes(msg), h->msg_iov->iov_base, n);
    mt_io_thread_emit(io, msg);
    return true;
}

static void receive(mt_io_thread *io, mt_dgram *d)
{
    scratch *s = thread_scratch();
    if (s == NULL)
        return; /* level-triggered: tried again on the next round */
    unsigned slots = MT_DGRAM_SCRATCH / d->read_max;
    if (slots > MT_DGRAM_BATCH)
        slots = MT_DGRAM_BATCH;
    for (int round = 0; round < MT_DGRAM_BATCHES_PER_EVENT; round++) {
        if (!mt_credit_available(&d->credit, MT_DGRAM_CREDIT)) {
            d->starved = true; /* CREDIT turns reading back on */
            update_interest(io, d);
            return;
        }
        if (!mt_io_lane_open(io, &d->rec)) {
            d->held_back = true; /* until dgram_resume */
            update_interest(io, d);
            return;
        }
        for (unsigned i = 0; i < slots; i++) {
            s->iov[i].iov_base = s->buf + (size_t)i * d->read_max;
            s->iov[i].iov_len = d->read_max;
            s->hdr[i].msg_hdr = (struct msghdr){
                .msg_name = &s->addr[i],
                .msg_namelen = sizeof(s->addr[i]),
                .msg_iov = &s->iov[i],
                .msg_iovlen = 1,
            };
        }
        int n = recvmmsg(d->fd, s->hdr, slots, MSG_DONTWAIT, NULL);
        if (n < 0) {
            if (errno == EAGAIN || errno == EWOULDBLOCK)
                return;
            if (errno != EINTR)
                emit_error(io, d, errno); /* an ICMP error, as recvfrom() reports it */
            continue;
        }
        /* Credit and counters once a batch: the completions reach the loop
         * only after this round (the thread pushes its batches later). */
        int64_t charge = 0;
        uint64_t bytes = 0;
        for (int i = 0; i < n; i++) {
            if (deliver(io, d, s, i)) {
                bytes += s->hdr[i].msg_len;
                charge += mt_dgram_charge(s->hdr[i].msg_len);
            }
        }
        mt_credit_take(&d->credit, charge);
        mt_counter_add(&mt_io_thread_stats(io)->bytes_read, bytes);
        if ((unsigned)n < slots)
            return;
    }
}

/* ---- sending -------------------------------------------------------------------- */

/* Takes the first SEND off the queue (sent, or failed) and frees it; its
 * units, for the caller to count as flushed.  The record is attached, so
 * the message's reference is not its last. */
static uint64_t pop_sent(mt_dgram *d, uint64_t *bytes)
{
    mt_msg *m = d->out_head;
    size_t n = mt_dgram_size(m);
    uint64_t units = mt_dgram_units(d, n);
    d->out_head = out_next(m);
    if (d->out_head == NULL)
        d->out_tail = NULL;
    d->out_units -= units;
    *bytes += n;
    mt_msg_free(m);
    return units;
}

static void flush(mt_io_thread *io, mt_dgram *d)
{
    struct mmsghdr hdr[MT_DGRAM_BATCH];
    struct iovec iov[MT_DGRAM_BATCH];
    while (d->out_head != NULL && !d->closed) {
        unsigned cnt = 0;
        for (mt_msg *m = d->out_head; m != NULL && cnt < MT_DGRAM_BATCH; m = out_next(m), cnt++) {
            iov[cnt].iov_base = mt_dgram_bytes(m);
            iov[cnt].iov_len = mt_dgram_size(m);
            uint32_t addrlen = mt_dgram_addrlen(m);
            hdr[cnt].msg_hdr = (struct msghdr){
                .msg_name = addrlen ? (void *)mt_dgram_addr(m) : NULL,
                .msg_namelen = addrlen,
                .msg_iov = &iov[cnt],
                .msg_iovlen = 1,
            };
        }
        int n = sendmmsg(d->fd, hdr, cnt, MSG_DONTWAIT | MSG_NOSIGNAL);
        if (n < 0) {
            int err = errno;
            if (err == EINTR)
                continue;
            if (err == EAGAIN || err == EWOULDBLOCK) {
                d->want_write = true;
                if (mt_out_note_full(&d->marks, d->out_units))
                    (void)mt_io_thread_emit_op(io, &d->rec, MT_DGRAM_BLOCKED, 0);
                update_interest(io, d);
                return;
            }
            /* This datagram fails (asyncio reports it to error_received()
             * and goes on with the next). */
            uint64_t failed_bytes = 0;
            emit_error(io, d, err);
            note_flushed(io, d, pop_sent(d, &failed_bytes));
            continue;
        }
        mt_out_note_progress(&d->marks);
        uint64_t units = 0, bytes = 0;
        for (int i = 0; i < n; i++)
            units += pop_sent(d, &bytes);
        mt_counter_add(&mt_io_thread_stats(io)->bytes_written, bytes);
        note_flushed(io, d, units); /* once a batch: a DRAINED handshake each */
    }
    if (d->want_write) {
        d->want_write = false;
        update_interest(io, d);
    }
    if (d->closing && d->out_head == NULL)
        release(io, d, 0, true);
}

/* ---- the runtime's entry points ----------------------------------------------- */

static void on_ready(mt_io_watch *w, unsigned events)
{
    mt_dgram *d = MT_CONTAINER_OF(w, mt_dgram, watch);
    if ((events & MT_IO_WRITE) && d->out_head != NULL)
        flush(w->io, d);
    if ((events & MT_IO_READ) && !d->closed && d->reading && !d->closing)
        receive(w->io, d);
}

static void attach(mt_io_thread *io, mt_dgram *d)
{
    if (mt_io_watch_open(&d->watch, io, d->fd, on_ready) < 0) {
        release(io, d, errno, true);
        return;
    }
    mt_record_attach(io, &d->rec);
    atomic_fetch_add_explicit(&mt_io_thread_stats(io)->transports, 1, memory_order_relaxed);
}

static void dgram_message(mt_io_thread *io, mt_record *rec, mt_msg *msg)
{
    mt_dgram *d = (mt_dgram *)rec;
    if (msg->op != MT_DGRAM_SEND) {
        mt_msg_free(msg);
        return;
    }
    uint64_t units = mt_dgram_units(d, mt_dgram_size(msg));
    if (d->closed) {
        /* Counted first: the message's reference may be the record's last. */
        note_flushed(io, d, units);
        mt_msg_free(msg);
        return;
    }
    atomic_store_explicit(&msg->node.next, NULL, memory_order_relaxed);
    if (d->out_tail)
        atomic_store_explicit(&d->out_tail->node.next, &msg->node, memory_order_relaxed);
    else
        d->out_head = msg;
    d->out_tail = msg;
    d->out_units += units;
    mt_record_mark_dirty(io, rec); /* sent in one batch, after the commands */
}

static void dgram_service(mt_io_thread *io, mt_record *rec, uint32_t control)
{
    mt_dgram *d = (mt_dgram *)rec;
    if (d->closed)
        return;
    if (control & MT_DGRAM_ATTACH) {
        attach(io, d);
        if (d->closed)
            return;
    }
    if (control & MT_DGRAM_ABORT) {
        release(io, d, 0, true);
        return;
    }
    if (control & MT_DGRAM_READ)
        d->reading = true;
    if (control & MT_DGRAM_CLOSE)
        d->closing = true;
    if (control & MT_DGRAM_CREDIT)
        d->starved = false;
    update_interest(io, d);
    if (d->closed)
        return;
    if (!d->want_write)
        flush(io, d); /* also releases a closing record with nothing queued */
    else if (mt_out_take_blocked(&d->marks, d->out_units))
        /* More waits behind the full socket: the loop asked about this much. */
        (void)mt_io_thread_emit_op(io, &d->rec, MT_DGRAM_BLOCKED, 0);
}

static void dgram_resume(mt_io_thread *io, mt_record *rec)
{
    mt_dgram *d = (mt_dgram *)rec;
    d->held_back = false;
    if (d->closed)
        return;
    if (d->reading && !d->starved && !d->closing)
        receive(io, d); /* before watching again, as a flow does */
    update_interest(io, d);
}

static void dgram_drop(mt_io_thread *io, mt_record *rec, bool notify)
{
    release(io, (mt_dgram *)rec, ECONNABORTED, notify);
}

static void dgram_destroy(mt_record *rec)
{
    mt_dgram *d = (mt_dgram *)rec;
    mt_fd_holds_end(d->fd, &d->fd_holds);
    free(d);
}

static const mt_record_ops dgram_ops = {
    .message = dgram_message,
    .service = dgram_service,
    .drop = dgram_drop,
    .destroy = dgram_destroy,
    .resume = dgram_resume,
};

mt_dgram *mt_dgram_new(const struct mt_loop_ops *loop_ops, mt_sink *sink, mt_io_thread *io,
                       int fd, int family, uint32_t overhead)
{
    mt_dgram *d = calloc(1, sizeof(*d));
    if (d == NULL)
        return NULL;
    mt_record_init(&d->rec, &dgram_ops, loop_ops, sink, io);
    d->fd = fd;
    mt_fd_holds_init(&d->fd_holds);
    d->family = family;
    d->read_max = family == AF_UNIX ? MT_DGRAM_READ_MAX_UNIX : MT_DGRAM_READ_MAX_IP;
    d->overhead = overhead;
    mt_credit_init(&d->credit);
    mt_out_marks_init(&d->marks);
    return d;
}
