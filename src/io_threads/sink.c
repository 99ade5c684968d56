/* Sinks (a loop's completion queue) and latches (what a closing loop waits
 * on).  See runtime.h. */
#include "io_threads/io_thread.h"

#include "io_threads/buffer_pool.h"

#include <stdlib.h>
#include <string.h>

/* A countdown the closing loop blocks on while I/O threads let go of its
 * records.  `pending` is guarded by `mu`. */
typedef struct mt_latch {
    int pending;
    pthread_mutex_t mu;
    pthread_cond_t cv;
} mt_latch;

/* SINK_CLOSE, with its payload: owned by the closing thread's stack, which
 * outlives it (the closer waits until every thread is done). */
typedef struct mt_sink_close_msg {
    mt_msg msg;
    mt_sink *sink;
    mt_latch *latch;
} mt_sink_close_msg;

_Static_assert(offsetof(mt_sink_close_msg, sink) == sizeof(mt_msg),
               "the payload must follow the header");

mt_sink *mt_sink_new(void)
{
    return mt_sink_new_lanes(MT_LANE_HELD_MAX);
}

mt_sink *mt_sink_new_lanes(int64_t lane_max)
{
    mt_sink *sink = malloc(sizeof(*sink));
    if (sink == NULL)
        return NULL;
    mt_mpsc_queue_init(&sink->queue);
    atomic_init(&sink->refs, 1);
    sink->lane_max = lane_max;
    sink->ret_lanes = 0;
    memset(sink->ret_bytes, 0, sizeof(sink->ret_bytes));
    memset(sink->ret_io, 0, sizeof(sink->ret_io));
    memset(sink->lanes, 0, sizeof(sink->lanes));
    for (int i = 0; i < MT_IO_THREADS_MAX; i++)
        mt_credit_init(&sink->lanes[i].lane.held);
    if (mt_waker_init(&sink->waker) < 0) {
        free(sink);
        return NULL;
    }
    return sink;
}

void mt_sink_incref(mt_sink *sink)
{
    atomic_fetch_add_explicit(&sink->refs, 1, memory_order_relaxed);
}

void mt_sink_decref(mt_sink *sink)
{
    if (atomic_fetch_sub_explicit(&sink->refs, 1, memory_order_acq_rel) != 1)
        return;
    /* Every completion holds its record, which holds the sink: nothing can
     * be queued any more. */
    for (int i = 0; i < MT_IO_THREADS_MAX; i++)
        if (sink->ret_io[i] != NULL)
            mt_io_thread_decref(sink->ret_io[i]);
    mt_waker_close(&sink->waker);
    free(sink);
}

void mt_sink_push(mt_sink *sink, mt_msg *first, mt_msg *last, bool wake)
{
    mt_mpsc_queue_push_chain(&sink->queue, &first->node, &last->node);
    if (wake)
        mt_waker_notify(&sink->waker);
}

/* ---- lanes (MT_LANE_HELD_MAX) -------------------------------------------- */

/* Popped bytes go back to their lane in sums of up to an eighth of it: a
 * return is a locked instruction on a line the I/O thread writes too.
 * Each lane sums on its own, so a loop whose completions alternate between
 * threads still returns in batches. */
static void return_lane(mt_sink *sink, int i)
{
    mt_io_thread *io = sink->ret_io[i];
    int64_t n = sink->ret_bytes[i];
    sink->ret_io[i] = NULL;
    sink->ret_bytes[i] = 0;
    sink->ret_lanes &= ~((uint64_t)1 << i);
    if (mt_credit_return(&sink->lanes[i].lane.held, n, sink->lane_max))
        mt_io_thread_kick(io);
    mt_io_thread_decref(io);
}

void mt_sink_popped(mt_sink *sink, mt_msg *msg)
{
    int i = msg->lane;
    if (sink->ret_io[i] == NULL) {
        mt_io_thread *io = msg->rec->io; /* the emitter (record.c) */
        mt_io_thread_incref(io);
        sink->ret_io[i] = io;
        sink->ret_lanes |= (uint64_t)1 << i;
    }
    sink->ret_bytes[i] += (int64_t)mt_pool_class_size(msg->pool_cls);
    if (sink->ret_bytes[i] >= sink->lane_max / 8)
        return_lane(sink, i);
}

void mt_sink_return(mt_sink *sink)
{
    while (sink->ret_lanes != 0)
        return_lane(sink, __builtin_ctzll(sink->ret_lanes));
}

static void latch_init(mt_latch *l)
{
    l->pending = 0;
    pthread_mutex_init(&l->mu, NULL);
    pthread_cond_init(&l->cv, NULL);
}

static void latch_add(mt_latch *l)
{
    pthread_mutex_lock(&l->mu);
    l->pending++;
    pthread_mutex_unlock(&l->mu);
}

void mt_sink_close_done(mt_msg *msg)
{
    mt_latch *l = ((mt_sink_close_msg *)msg)->latch;
    pthread_mutex_lock(&l->mu);
    if (--l->pending == 0)
        pthread_cond_broadcast(&l->cv);
    pthread_mutex_unlock(&l->mu);
}

static void latch_wait(mt_latch *l)
{
    pthread_mutex_lock(&l->mu);
    while (l->pending > 0)
        pthread_cond_wait(&l->cv, &l->mu);
    pthread_mutex_unlock(&l->mu);
}

static void latch_destroy(mt_latch *l)
{
    pthread_mutex_destroy(&l->mu);
    pthread_cond_destroy(&l->cv);
}

mt_sink *mt_sink_close_target(mt_msg *msg)
{
    return ((mt_sink_close_msg *)msg)->sink;
}

void mt_runtime_close_sink(mt_sink *sink, mt_io_thread *const *io, int n)
{
    mt_sink_close_msg msgs[MT_IO_THREADS_MAX];
    mt_latch latch;
    latch_init(&latch);
    for (int i = 0; i < n && i < MT_IO_THREADS_MAX; i++) {
        mt_sink_close_msg *m = &msgs[i];
        memset(m, 0, sizeof(*m));
        m->msg.op = MT_OP_SINK_CLOSE;
        m->msg.pool_cls = MT_MSG_EMBEDDED;
        m->sink = sink;
        m->latch = &latch;
        latch_add(&latch);
        if (!mt_io_thread_post(io[i], &m->msg, &m->msg))
            mt_sink_close_done(&m->msg);
    }
    latch_wait(&latch);
    latch_destroy(&latch);
}
