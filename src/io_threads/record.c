/* Records and messages: the seam between the runtime and the record kinds
 * (see runtime.h).  Messages and the record head on any thread; control
 * bits, dirty records, completion batches and watches on the owning I/O
 * thread. */
#include "io_threads/io_thread.h"

#include "io_threads/buffer_pool.h"

#include <errno.h>
#include <string.h>

#include <event2/event.h>

_Static_assert(offsetof(mt_msg, op) == offsetof(mt_msg_link, op),
               "a control link and a message must agree on where op is");

/* ---- messages ------------------------------------------------------------ */

mt_msg *mt_msg_new(uint8_t op, mt_record *rec, size_t len)
{
    uint8_t cls;
    mt_msg *msg = mt_pool_alloc(sizeof(*msg) + len, &cls);
    if (msg == NULL)
        return NULL;
    atomic_init(&msg->node.next, NULL);
    msg->op = op;
    msg->pool_cls = cls;
    msg->lane = MT_LANE_NONE;
    msg->err = 0;
    msg->rec = rec;
    msg->len = len;
    if (rec != NULL)
        mt_record_incref(rec);
    return msg;
}

void mt_msg_free(mt_msg *msg)
{
    mt_record *rec = msg->rec;
    if (msg->pool_cls != MT_MSG_EMBEDDED)
        mt_pool_free(msg, msg->pool_cls);
    if (rec != NULL)
        mt_record_decref(rec);
}

/* ---- the record head ----------------------------------------------------- */

void mt_record_init(mt_record *rec, const mt_record_ops *ops,
                    const struct mt_loop_ops *loop_ops, mt_sink *sink, mt_io_thread *io)
{
    memset(rec, 0, sizeof(*rec));
    atomic_init(&rec->refs, 1);
    atomic_init(&rec->control, 0);
    rec->ops = ops;
    rec->loop_ops = loop_ops;
    rec->sink = sink;
    rec->io = io;
    rec->control_link.op = MT_OP_CONTROL;
    rec->released.op = MT_OP_RELEASED;
    rec->released.pool_cls = MT_MSG_EMBEDDED;
    rec->released.lane = MT_LANE_NONE;
    rec->released.rec = rec;
    mt_sink_incref(sink);
    mt_io_thread_incref(io);
}

void mt_record_decref(mt_record *rec)
{
    if (atomic_fetch_sub_explicit(&rec->refs, 1, memory_order_acq_rel) != 1)
        return;
    mt_sink *sink = rec->sink;
    mt_io_thread *io = rec->io;
    rec->ops->destroy(rec);
    mt_sink_decref(sink);
    mt_io_thread_decref(io);
}

bool mt_record_signal(mt_record *rec, uint32_t bits)
{
    uint32_t old = atomic_fetch_or_explicit(&rec->control, bits | MT_CONTROL_QUEUED,
                                            memory_order_acq_rel);
    if (old & MT_CONTROL_QUEUED)
        return !mt_io_thread_stopped(rec->io); /* the queued link carries them */
    mt_record_incref(rec); /* the queued link's */
    mt_mpsc_node *node = &rec->control_link.node;
    atomic_store_explicit(&node->next, NULL, memory_order_relaxed);
    if (mt_io_thread_stopped(rec->io)) {
        /* QUEUED stays set: nothing will be queued for a stopped thread. */
        mt_record_decref(rec);
        return false;
    }
    mt_mpsc_queue_push(&rec->io->commands, node);
    mt_waker_notify(&rec->io->waker);
    return true;
}

/* ---- on the owning thread ------------------------------------------------ */

void mt_record_mark_dirty(mt_io_thread *io, mt_record *rec)
{
    if (rec->dirty)
        return;
    rec->dirty = true;
    mt_record_incref(rec); /* the dirty list's */
    rec->dirty_next = NULL;
    if (io->dirty_tail)
        io->dirty_tail->dirty_next = rec;
    else
        io->dirty_head = rec;
    io->dirty_tail = rec;
}

void mt_io_thread_take_control(mt_io_thread *io, mt_record *rec)
{
    /* The link is ours again: a signal after this exchange queues it anew. */
    uint32_t bits = atomic_exchange_explicit(&rec->control, 0, memory_order_acq_rel);
    rec->control_taken |= bits & ~MT_CONTROL_QUEUED;
    mt_record_mark_dirty(io, rec);
    mt_record_decref(rec); /* the link's; the dirty list holds one now */
}

void mt_io_thread_service_dirty(mt_io_thread *io)
{
    mt_record *rec;
    while ((rec = io->dirty_head) != NULL) {
        io->dirty_head = rec->dirty_next;
        if (io->dirty_head == NULL)
            io->dirty_tail = NULL;
        rec->dirty_next = NULL;
        rec->dirty = false;
        uint32_t bits = rec->control_taken;
        rec->control_taken = 0;
        rec->ops->service(io, rec, bits);
        mt_record_decref(rec);
    }
}

void mt_record_attach(mt_io_thread *io, mt_record *rec)
{
    mt_record_incref(rec);
    rec->attached = true;
    rec->owned_prev = NULL;
    rec->owned_next = io->owned;
    if (io->owned)
        io->owned->owned_prev = rec;
    io->owned = rec;
}

void mt_record_detach(mt_io_thread *io, mt_record *rec)
{
    if (!rec->attached)
        return;
    rec->attached = false;
    if (rec->owned_prev)
        rec->owned_prev->owned_next = rec->owned_next;
    else
        io->owned = rec->owned_next;
    if (rec->owned_next)
        rec->owned_next->owned_prev = rec->owned_prev;
    rec->owned_prev = rec->owned_next = NULL;
    mt_record_decref(rec);
}

/* ---- lanes (runtime.h, MT_LANE_HELD_MAX) -------------------------------- */

static mt_lane *lane_of(mt_io_thread *io, mt_sink *sink)
{
    return &sink->lanes[io->index].lane;
}

/* Parking takes the record off the poller (its kind stops watching for
 * input), and resuming reads at once, before the record watches again: a
 * record that finds the lane full again is parked anew without a system
 * call.  Resuming every parked record and letting the poller report them
 * again cost two epoll_ctl() a record a round: 474k parks for 272k
 * completions in a storm of 10,000 connections, and 1.6 times the
 * system time. */
static void park(mt_io_thread *io, mt_record *rec)
{
    if (rec->parked)
        return;
    mt_lane *l = lane_of(io, rec->sink);
    rec->parked = true;
    mt_record_incref(rec); /* the list's */
    rec->parked_next = NULL;
    if (l->parked_tail)
        l->parked_tail->parked_next = rec;
    else
        l->parked_head = rec;
    l->parked_tail = rec;
    if (!l->listed) {
        l->listed = true;
        l->next_starved = io->starved;
        io->starved = rec->sink;
    }
    mt_counter_add(&io->stats.held_back, 1);
}

/* mt_credit_available for a lane, which many records share.  When the
 * credit came back between the two loads, the starved flag stays up while
 * records are parked: the loop's return that takes it is what restarts
 * them.  (Cleared there, a record that found room would leave the parked
 * ones waiting for a restart the loop no longer sent: a storm of 10,000
 * connections with a 256 KiB lane stalled hundreds of them at once.) */
static bool lane_available(mt_lane *l, int64_t max)
{
    if (atomic_load_explicit(&l->held.used, memory_order_relaxed) < max)
        return true;
    atomic_store_explicit(&l->held.starved, true, memory_order_seq_cst);
    if (atomic_load_explicit(&l->held.used, memory_order_seq_cst) < max) {
        if (l->parked_head == NULL)
            atomic_store_explicit(&l->held.starved, false, memory_order_relaxed);
        return true;
    }
    return false;
}

static mt_record *unpark_head(mt_lane *l)
{
    mt_record *rec = l->parked_head;
    l->parked_head = rec->parked_next;
    if (l->parked_head == NULL)
        l->parked_tail = NULL;
    rec->parked_next = NULL;
    rec->parked = false;
    return rec; /* with the list's reference */
}

bool mt_io_lane_open(mt_io_thread *io, mt_record *rec)
{
    if (io->is_inline)
        return true; /* its wait has MT_INLINE_HELD_MAX */
    if (lane_available(lane_of(io, rec->sink), rec->sink->lane_max))
        return true;
    park(io, rec);
    return false;
}

/* Runs `each` over the starved sinks (`only`, or all when NULL), holding
 * each sink while its records may let go of it, and unlists those whose
 * lane has no parked record left. */
static void for_starved(mt_io_thread *io, mt_sink *only,
                        void (*each)(mt_io_thread *io, mt_sink *sink, mt_lane *l))
{
    mt_sink **link = &io->starved;
    mt_sink *sink;
    while ((sink = *link) != NULL) {
        mt_lane *l = lane_of(io, sink);
        if (only != NULL && sink != only) {
            link = &l->next_starved;
            continue;
        }
        mt_sink_incref(sink);
        each(io, sink, l);
        if (l->parked_head == NULL) {
            *link = l->next_starved;
            l->next_starved = NULL;
            l->listed = false;
        } else {
            link = &l->next_starved;
        }
        mt_sink_decref(sink);
    }
}

static void resume_lane(mt_io_thread *io, mt_sink *sink, mt_lane *l)
{
    /* Asked before each record, so that a lane full again is marked
     * starved anew (credit.h) and the loop kicks once more. */
    while (l->parked_head != NULL && lane_available(l, sink->lane_max)) {
        mt_record *rec = unpark_head(l);
        rec->ops->resume(io, rec); /* may park it again, at the tail */
        mt_record_decref(rec);
    }
}

static void drop_lane(mt_io_thread *io, mt_sink *sink, mt_lane *l)
{
    (void)io;
    (void)sink;
    while (l->parked_head != NULL)
        mt_record_decref(unpark_head(l));
}

void mt_io_thread_unpark(mt_io_thread *io)
{
    for_starved(io, NULL, resume_lane);
}

void mt_io_thread_drop_sink(mt_io_thread *io, mt_sink *sink)
{
    for_starved(io, sink, drop_lane);
    mt_record *rec = io->owned;
    while (rec != NULL) {
        mt_record *next = rec->owned_next;
        if (sink == NULL || rec->sink == sink) {
            mt_record_incref(rec); /* drop() detaches it */
            rec->ops->drop(io, rec, sink == NULL);
            mt_record_decref(rec);
        }
        rec = next;
    }
}

/* ---- completions ------------------------------------------------------------ */

void mt_io_thread_flush_batches(mt_io_thread *io)
{
    for (int i = 0; i < io->nbatch; i++) {
        /* Once pushed, the completions (which hold the sink) may be popped
         * and freed before the wakeup: hold the sink across both. */
        mt_sink *sink = io->batch[i].sink;
        bool wake = io->batch[i].wake;
        mt_sink_incref(sink);
        mt_sink_push(sink, io->batch[i].first, io->batch[i].last, wake);
        mt_sink_decref(sink);
        if (wake)
            io->quiet_bytes = 0;
    }
    io->nbatch = 0;
    io->inline_held = 0;
}

static void emit(mt_io_thread *io, mt_msg *msg, bool wake)
{
    mt_sink *sink = msg->rec->sink;
    mt_counter_add(&io->stats.completions, 1);
    msg->lane = MT_LANE_NONE;
    if (msg->pool_cls != MT_MSG_EMBEDDED) {
        size_t held = mt_pool_class_size(msg->pool_cls);
        if (io->is_inline) {
            io->inline_held += held;
            if (io->inline_held > MT_INLINE_HELD_MAX)
                event_base_loopbreak(io->base); /* see MT_INLINE_HELD_MAX */
        } else if (io == msg->rec->io) {
            msg->lane = (uint8_t)io->index; /* the loop's pop gives it back */
            mt_credit_take(&lane_of(io, sink)->held, (int64_t)held);
        }
    }
    atomic_store_explicit(&msg->node.next, NULL, memory_order_relaxed);
    int i;
    for (i = 0; i < io->nbatch && io->batch[i].sink != sink; i++)
        ;
    if (i == io->nbatch) {
        if (io->nbatch == MT_BATCH_SINKS) {
            mt_io_thread_flush_batches(io);
            i = 0;
        }
        io->batch[i].sink = sink;
        io->batch[i].first = io->batch[i].last = msg;
        io->batch[i].wake = wake;
        io->nbatch = i + 1;
        return;
    }
    atomic_store_explicit(&io->batch[i].last->node.next, &msg->node, memory_order_relaxed);
    io->batch[i].last = msg;
    io->batch[i].wake |= wake;
}

void mt_io_thread_emit(mt_io_thread *io, mt_msg *msg)
{
    emit(io, msg, true);
}

void mt_io_thread_emit_quiet(mt_io_thread *io, mt_msg *msg, size_t bytes)
{
    io->quiet_bytes += bytes;
    emit(io, msg, io->quiet_bytes >= MT_QUIET_BYTES_MAX);
}

bool mt_io_thread_emit_op(mt_io_thread *io, mt_record *rec, uint8_t op, int err)
{
    mt_msg *msg = mt_msg_new(op, rec, 0);
    if (msg == NULL)
        return false;
    msg->err = err;
    mt_io_thread_emit(io, msg);
    return true;
}

void mt_record_release(mt_io_thread *io, mt_record *rec, int err)
{
    rec->released.err = err;
    mt_record_incref(rec); /* the message's, dropped by mt_msg_free */
    mt_io_thread_emit(io, &rec->released);
}

/* ---- watches ---------------------------------------------------------------- */

static void on_watch_event(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    mt_io_watch *w = arg;
    mt_io_thread_running(w->io);
    w->cb(w, ((what & EV_READ) ? MT_IO_READ : 0) | ((what & EV_WRITE) ? MT_IO_WRITE : 0));
}

int mt_io_watch_open(mt_io_watch *w, mt_io_thread *io, int fd, mt_io_watch_cb cb)
{
    w->io = io;
    w->fd = fd;
    w->cb = cb;
    w->interest = 0;
    w->ev = event_new(io->base, fd, EV_READ | EV_PERSIST, on_watch_event, w);
    if (w->ev == NULL) {
        errno = ENOMEM;
        return -1;
    }
    return 0;
}

int mt_io_watch_set(mt_io_watch *w, unsigned interest)
{
    if (interest == w->interest)
        return 0;
    if (w->interest)
        event_del(w->ev);
    w->interest = 0;
    if (interest == 0)
        return 0;
    short what = (short)(((interest & MT_IO_READ) ? EV_READ : 0) |
                         ((interest & MT_IO_WRITE) ? EV_WRITE : 0) | EV_PERSIST);
    event_assign(w->ev, w->io->base, w->fd, what, on_watch_event, w);
    errno = 0;
    if (event_add(w->ev, NULL) < 0) {
        if (errno == 0)
            errno = ENOMEM;
        return -1;
    }
    w->interest = (uint8_t)interest;
    return 0;
}

void mt_io_watch_close(mt_io_watch *w)
{
    if (w->ev != NULL)
        event_free(w->ev); /* deletes it from the base too */
    w->ev = NULL;
    w->interest = 0;
}
