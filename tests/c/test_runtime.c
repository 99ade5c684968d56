/* Unit tests for the I/O runtime (src/io_threads/runtime.c): the thread pool,
 * command posting, completion batching into sinks, SINK_CLOSE, shutdown and
 * reference counting, driven through a fake mt_io_obj whose handlers record
 * what the I/O threads do to it.
 *
 * Handlers run on I/O threads, where CMocka's assertions must not be used:
 * they count anomalies in atomics that the test thread asserts on. */
#include "test_common.h"

#include "io_threads/runtime.h"

#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define WAIT_MS 5000 /* a wait this long means a lost wakeup or a stuck thread */
#define MAX_PRODUCERS 8
#define MAX_FAKES 16384

/* ---- the fake object ------------------------------------------------------ */

enum {
    OP_RECORD = 1, /* check per-producer order */
    OP_EMIT,       /* emit `count` completions of `kind`, pausing every `pause_every` */
    OP_OWN,        /* mt_io_thread_own */
    OP_DISOWN,     /* mt_io_thread_disown */
    OP_NOP,
    OP_EMIT_TO,    /* `count` rounds of one completion to each of `targets` */
};

typedef struct fake fake;

typedef struct payload {
    uint32_t op;
    uint32_t producer;
    uint64_t seq;
    uint32_t count;
    uint32_t pause_every;
    uint32_t kind;     /* of the completions emitted */
    uint32_t ack;      /* emit one MT_DONE_EOF carrying `seq` when done */
    fake **targets;
    uint32_t ntargets;
} payload;

typedef struct done_payload {
    int32_t id;
    uint64_t seq;
} done_payload;

struct fake {
    mt_io_obj obj;
    int id;
    _Atomic uint64_t next_seq[MAX_PRODUCERS]; /* OP_RECORD: next expected */
    _Atomic uint64_t bad;                     /* order violations, wrong thread */
    _Atomic uint64_t handled;                 /* commands handled */
    _Atomic uint64_t emit_seq;                /* completions emitted for this object */
    _Atomic int drops, drops_notify, drop_bad;
    _Atomic int owned;
    _Atomic unsigned long thread;             /* pthread_self() of the last handler */
};

static _Atomic int g_destroyed[MAX_FAKES];
static _Atomic int g_next_id;

static void fake_emit(mt_io_thread *io, fake *f, mt_done_kind kind, uint64_t seq_override,
                      bool use_override)
{
    mt_done *d = mt_done_new(kind, &f->obj, sizeof(done_payload));
    if (d == NULL) {
        atomic_fetch_add(&f->bad, 1);
        return;
    }
    done_payload p = {.id = f->id};
    p.seq = use_override ? seq_override : atomic_fetch_add(&f->emit_seq, 1);
    memcpy(d->data, &p, sizeof(p));
    mt_io_thread_emit(io, d);
}

static void fake_command(mt_io_thread *io, mt_io_obj *obj, mt_cmd *cmd)
{
    fake *f = (fake *)obj;
    atomic_store(&f->thread, (unsigned long)pthread_self());
    if (io != obj->io || cmd->target != obj || cmd->len != sizeof(payload)) {
        atomic_fetch_add(&f->bad, 1);
        mt_cmd_free(cmd);
        return;
    }
    payload p;
    memcpy(&p, cmd->data, sizeof(p));
    switch (p.op) {
    case OP_RECORD: {
        if (p.producer >= MAX_PRODUCERS) {
            atomic_fetch_add(&f->bad, 1);
            break;
        }
        uint64_t want = atomic_load_explicit(&f->next_seq[p.producer], memory_order_relaxed);
        if (p.seq != want)
            atomic_fetch_add(&f->bad, 1);
        atomic_store_explicit(&f->next_seq[p.producer], p.seq + 1, memory_order_release);
        break;
    }
    case OP_EMIT:
        for (uint32_t i = 0; i < p.count; i++) {
            fake_emit(io, f, (mt_done_kind)p.kind, 0, false);
            if (p.pause_every && (i + 1) % p.pause_every == 0 && i + 1 < p.count)
                mt_test_sleep_us(40);
        }
        break;
    case OP_OWN:
        if (atomic_load(&f->owned))
            atomic_fetch_add(&f->bad, 1);
        mt_io_thread_own(io, obj);
        atomic_store(&f->owned, 1);
        break;
    case OP_DISOWN:
        if (!atomic_load(&f->owned))
            atomic_fetch_add(&f->bad, 1);
        atomic_store(&f->owned, 0);
        mt_io_thread_disown(io, obj);
        break;
    case OP_EMIT_TO:
        for (uint32_t r = 0; r < p.count; r++)
            for (uint32_t t = 0; t < p.ntargets; t++)
                fake_emit(io, p.targets[t], (mt_done_kind)p.kind, 0, false);
        break;
    case OP_NOP:
        break;
    default:
        atomic_fetch_add(&f->bad, 1);
    }
    if (p.ack)
        fake_emit(io, f, MT_DONE_EOF, p.seq, true);
    atomic_fetch_add_explicit(&f->handled, 1, memory_order_release);
    mt_cmd_free(cmd);
}

/* Lets go of the object like a stream would: a CLOSED completion (err =
 * notify, always emitted so that the test can see that SINK_CLOSE flushes
 * before it acks), then disown. */
static void fake_drop(mt_io_thread *io, mt_io_obj *obj, bool notify)
{
    fake *f = (fake *)obj;
    atomic_fetch_add(&f->drops, 1);
    if (notify)
        atomic_fetch_add(&f->drops_notify, 1);
    if (!atomic_load(&f->owned) || io != obj->io)
        atomic_fetch_add(&f->drop_bad, 1);
    mt_done *d = mt_done_new(MT_DONE_CLOSED, obj, sizeof(done_payload));
    if (d != NULL) {
        done_payload p = {.id = f->id, .seq = UINT64_MAX};
        memcpy(d->data, &p, sizeof(p));
        d->err = notify;
        mt_io_thread_emit(io, d);
    }
    atomic_store(&f->owned, 0);
    mt_io_thread_disown(io, obj);
}

static void fake_destroy(mt_io_obj *obj)
{
    fake *f = (fake *)obj;
    atomic_fetch_add(&g_destroyed[f->id], 1);
    memset(f, 0xdd, sizeof(*f)); /* a use after destroy reads garbage */
    free(f);
}

static const mt_io_ops fake_ops = {
    .command = fake_command,
    .drop = fake_drop,
    .destroy = fake_destroy,
};

static fake *fake_new(mt_sink *sink, mt_io_thread *io)
{
    fake *f = calloc(1, sizeof(*f));
    assert_non_null(f);
    f->id = atomic_fetch_add(&g_next_id, 1);
    assert_true(f->id < MAX_FAKES);
    atomic_store(&g_destroyed[f->id], 0);
    mt_io_obj_init(&f->obj, &fake_ops, sink, io);
    return f;
}

static int destroyed(int id)
{
    return atomic_load(&g_destroyed[id]);
}

static mt_cmd *cmd_make(fake *f, payload p)
{
    mt_cmd *c = mt_cmd_new(MT_CMD_STREAM_WRITE, &f->obj, sizeof(payload));
    assert_non_null(c);
    memcpy(c->data, &p, sizeof(p));
    return c;
}

static void link_cmd(mt_cmd *prev, mt_cmd *next)
{
    atomic_store_explicit(&prev->node.next, &next->node, memory_order_relaxed);
}

static void post1(fake *f, payload p)
{
    mt_cmd *c = cmd_make(f, p);
    assert_true(mt_io_thread_post(f->obj.io, c, c));
}

static int sink_refs(mt_sink *sink)
{
    return atomic_load(&sink->refs);
}

static int obj_refs(fake *f)
{
    return atomic_load(&f->obj.refs);
}

/* ---- the consumer side: the wake protocol on a sink ------------------- */

typedef struct consumer {
    mt_sink *sink;
    uint64_t blocks;   /* polls that returned readable */
    uint64_t lost;     /* polls that timed out with a non-empty queue */
    uint64_t timeouts; /* waits that ran out */
} consumer;

/* The next completion, sleeping on the sink's eventfd as a loop does
 * (prepare_sleep, re-check, poll, awake, drain); NULL after timeout_ms. */
static mt_done *sink_next(consumer *c, int timeout_ms)
{
    mt_sink *sink = c->sink;
    double deadline = mt_test_now() + timeout_ms / 1000.0;
    for (;;) {
        mt_mpsc_node *n = mt_mpsc_queue_pop(&sink->queue);
        if (n != NULL)
            return MT_CONTAINER_OF(n, mt_done, node);
        if (!mt_mpsc_queue_is_empty(&sink->queue)) {
            sched_yield(); /* a push is half-way */
            continue;
        }
        mt_waker_prepare_sleep(&sink->waker);
        if (!mt_mpsc_queue_is_empty(&sink->queue)) {
            mt_waker_awake(&sink->waker);
            continue;
        }
        int left = (int)((deadline - mt_test_now()) * 1000.0);
        if (left <= 0) {
            mt_waker_awake(&sink->waker);
            c->timeouts++;
            return NULL;
        }
        struct pollfd pfd = {.fd = sink->waker.fd, .events = POLLIN};
        int r = poll(&pfd, 1, left);
        mt_waker_awake(&sink->waker);
        if (r > 0) {
            c->blocks++;
            mt_waker_drain(&sink->waker);
        } else if (r == 0) {
            if (!mt_mpsc_queue_is_empty(&sink->queue))
                c->lost++;
            c->timeouts++;
            return NULL;
        }
    }
}

/* Pops without waiting (after a join or a latch, everything is there). */
static mt_done *sink_pop_now(mt_sink *sink)
{
    mt_mpsc_node *n = mt_mpsc_queue_pop(&sink->queue);
    return n ? MT_CONTAINER_OF(n, mt_done, node) : NULL;
}

static done_payload done_data(mt_done *d)
{
    done_payload p;
    memcpy(&p, d->data, sizeof(p));
    return p;
}

static bool latch_wait_for(mt_latch *l, int timeout_ms)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    ts.tv_sec += timeout_ms / 1000;
    ts.tv_nsec += (long)(timeout_ms % 1000) * 1000000L;
    if (ts.tv_nsec >= 1000000000L) {
        ts.tv_sec++;
        ts.tv_nsec -= 1000000000L;
    }
    pthread_mutex_lock(&l->mu);
    int rc = 0;
    while (l->pending > 0 && rc != ETIMEDOUT)
        rc = pthread_cond_timedwait(&l->cv, &l->mu, &ts);
    bool ok = l->pending == 0;
    pthread_mutex_unlock(&l->mu);
    return ok;
}

/* What a closing loop does before it lets go of its sink (loop.c,
 * close_sink): SINK_CLOSE to each thread, and wait for them all.  Once the
 * latch opens, no thread is still pushing to the sink. */
static void sink_barrier(mt_sink *sink, mt_io_thread **io, int n)
{
    mt_latch latch;
    mt_latch_init(&latch);
    for (int i = 0; i < n; i++) {
        mt_cmd *cmd = mt_cmd_new(MT_CMD_SINK_CLOSE, sink, 0);
        assert_non_null(cmd);
        cmd->latch = &latch;
        mt_latch_add(&latch);
        if (!mt_io_thread_post(io[i], cmd, cmd)) {
            mt_latch_done(&latch);
            mt_cmd_free(cmd);
        }
    }
    assert_true(latch_wait_for(&latch, WAIT_MS));
    mt_latch_destroy(&latch);
}

/* Waits (sleeping briefly) until *counter >= want; false after timeout_ms. */
static bool wait_u64(_Atomic uint64_t *counter, uint64_t want, int timeout_ms)
{
    double deadline = mt_test_now() + timeout_ms / 1000.0;
    while (atomic_load_explicit(counter, memory_order_acquire) < want) {
        if (mt_test_now() > deadline)
            return false;
        mt_test_sleep_us(100);
    }
    return true;
}

static uint64_t snap_commands(int i)
{
    mt_io_snapshot s;
    assert_true(mt_runtime_snapshot(i, &s));
    return s.commands;
}

static uint64_t snap_completions(int i)
{
    mt_io_snapshot s;
    assert_true(mt_runtime_snapshot(i, &s));
    return s.completions;
}

/* Posts an acked NOP and waits for the ack: everything posted to that
 * thread before has been handled and its completions pushed. */
static void barrier_on(fake *f, consumer *c, uint64_t tag)
{
    post1(f, (payload){.op = OP_NOP, .ack = 1, .seq = tag});
    for (;;) {
        mt_done *d = sink_next(c, WAIT_MS);
        assert_non_null(d);
        bool found = d->kind == MT_DONE_EOF && done_data(d).id == f->id &&
                     done_data(d).seq == tag;
        mt_done_free(d);
        if (found)
            return;
    }
}

/* ---- tests ------------------------------------------------------------------ */

static void test_default_size(void **state)
{
    (void)state;
    const char *saved = getenv("MTLOOP_IO_THREADS");
    char *copy = saved ? strdup(saved) : NULL;
    long cpus = sysconf(_SC_NPROCESSORS_ONLN);
    int fallback = (int)(cpus - 1 < 1 ? 1 : cpus - 1 > 8 ? 8 : cpus - 1);

    setenv("MTLOOP_IO_THREADS", "3", 1);
    assert_int_equal(mt_runtime_default_size(), 3);
    setenv("MTLOOP_IO_THREADS", "64", 1);
    assert_int_equal(mt_runtime_default_size(), 64);
    const char *bad[] = {"0", "65", "-2", "abc", "3x", ""};
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        setenv("MTLOOP_IO_THREADS", bad[i], 1);
        assert_int_equal(mt_runtime_default_size(), fallback);
    }
    unsetenv("MTLOOP_IO_THREADS");
    assert_int_equal(mt_runtime_default_size(), fallback);
    assert_true(fallback >= 1);
    if (copy) {
        setenv("MTLOOP_IO_THREADS", copy, 1);
        free(copy);
    }
}

static void test_latch(void **state)
{
    (void)state;
    mt_latch l;
    mt_latch_init(&l);
    mt_latch_wait(&l); /* nothing pending: returns at once */
    mt_latch_add(&l);
    mt_latch_add(&l);
    mt_latch_done(&l);
    assert_false(latch_wait_for(&l, 20));
    mt_latch_done(&l);
    assert_true(latch_wait_for(&l, 20));
    mt_latch_wait(&l);
    mt_latch_destroy(&l);
}

/* acquire starts threads on demand, only ever grows the pool, hands back
 * the same threads, and each thread runs the commands of its objects. */
static void test_acquire_grows_only(void **state)
{
    (void)state;
    mt_runtime_shutdown();
    assert_int_equal(mt_runtime_size(), 0);
    mt_io_thread *a[4] = {0}, *b[4] = {0}, *c3[4] = {0};

    errno = 0;
    assert_int_equal(mt_runtime_acquire(0, a), -1);
    assert_int_equal(errno, EINVAL);
    errno = 0;
    assert_int_equal(mt_runtime_acquire(MT_IO_THREADS_MAX + 1, a), -1);
    assert_int_equal(errno, EINVAL);
    assert_int_equal(mt_runtime_size(), 0);

    assert_int_equal(mt_runtime_acquire(2, a), 0);
    assert_int_equal(mt_runtime_size(), 2);
    assert_non_null(a[0]);
    assert_non_null(a[1]);
    assert_ptr_not_equal(a[0], a[1]);
    assert_int_equal(mt_io_thread_index(a[0]), 0);
    assert_int_equal(mt_io_thread_index(a[1]), 1);
    assert_false(mt_io_thread_stopped(a[0]));
    assert_false(mt_io_thread_stopped(a[1]));

    /* Asking for fewer neither shrinks nor restarts. */
    assert_int_equal(mt_runtime_acquire(1, b), 0);
    assert_ptr_equal(b[0], a[0]);
    assert_null(b[1]);
    assert_int_equal(mt_runtime_size(), 2);

    /* Asking for more keeps the first ones and adds one. */
    assert_int_equal(mt_runtime_acquire(3, c3), 0);
    assert_int_equal(mt_runtime_size(), 3);
    assert_ptr_equal(c3[0], a[0]);
    assert_ptr_equal(c3[1], a[1]);
    assert_non_null(c3[2]);
    assert_ptr_not_equal(c3[2], a[0]);
    assert_ptr_not_equal(c3[2], a[1]);
    assert_int_equal(mt_io_thread_index(c3[2]), 2);

    mt_io_snapshot snap;
    for (int i = 0; i < 3; i++) {
        assert_true(mt_runtime_snapshot(i, &snap));
        assert_int_equal(snap.transports, 0);
        assert_int_equal(snap.listeners, 0);
    }
    assert_false(mt_runtime_snapshot(3, &snap));
    assert_false(mt_runtime_snapshot(-1, &snap));

    /* Each is a running thread of its own, and none is this one. */
    mt_sink *sink = mt_sink_new();
    assert_non_null(sink);
    consumer cons = {.sink = sink};
    fake *f[3];
    for (int i = 0; i < 3; i++) {
        f[i] = fake_new(sink, c3[i]);
        barrier_on(f[i], &cons, 100 + (uint64_t)i);
        assert_int_equal(atomic_load(&f[i]->handled), 1);
        assert_int_equal(atomic_load(&f[i]->bad), 0);
    }
    unsigned long self = (unsigned long)pthread_self();
    for (int i = 0; i < 3; i++) {
        unsigned long t = atomic_load(&f[i]->thread);
        assert_true(t != 0 && t != self);
        for (int j = 0; j < i; j++)
            assert_true(t != atomic_load(&f[j]->thread));
    }
    assert_int_equal(cons.lost, 0);
    for (int i = 0; i < 3; i++) {
        int id = f[i]->id;
        mt_io_obj_decref(&f[i]->obj);
        assert_int_equal(destroyed(id), 1);
    }
    sink_barrier(sink, c3, 3);
    assert_int_equal(sink_refs(sink), 1);
    mt_sink_decref(sink);
    mt_runtime_shutdown();
    assert_int_equal(mt_runtime_size(), 0);
}

/* Several producer threads push chains of commands to objects on two I/O
 * threads: every command arrives once, in each producer's order. */
enum { FIFO_IO = 2, FIFO_OBJS = 4, FIFO_PRODUCERS = 4 };

typedef struct fifo_prod {
    int id;
    fake **objs;
    uint32_t chains;
    pthread_barrier_t *start;
    uint64_t posted[FIFO_OBJS];
    uint64_t post_failed;
    int stalled;
} fifo_prod;

static void *fifo_producer(void *arg)
{
    fifo_prod *a = arg;
    mt_test_rng rng;
    mt_test_rng_seed(&rng, 7000 + (uint64_t)a->id);
    pthread_barrier_wait(a->start);
    for (uint32_t c = 0; c < a->chains; c++) {
        int t = (int)mt_test_rng_below(&rng, FIFO_OBJS);
        fake *f = a->objs[t];
        uint32_t k = 1 + (uint32_t)mt_test_rng_below(&rng, 32);
        mt_cmd *first = NULL, *last = NULL;
        for (uint32_t j = 0; j < k; j++) {
            payload p = {.op = OP_RECORD, .producer = (uint32_t)a->id,
                         .seq = a->posted[t] + j};
            mt_cmd *cmd = mt_cmd_new(MT_CMD_STREAM_WRITE, &f->obj, sizeof(p));
            memcpy(cmd->data, &p, sizeof(p));
            if (last)
                link_cmd(last, cmd);
            else
                first = cmd;
            last = cmd;
        }
        if (!mt_io_thread_post(f->obj.io, first, last)) {
            a->post_failed++;
            mt_mpsc_node *n = &first->node;
            while (n) {
                mt_mpsc_node *next = atomic_load(&n->next);
                bool end = n == &last->node;
                mt_cmd_free(MT_CONTAINER_OF(n, mt_cmd, node));
                n = end ? NULL : next;
            }
            continue;
        }
        a->posted[t] += k;
        uint64_t r = mt_test_rng_below(&rng, 32);
        if (r == 0 && !a->stalled) {
            /* Wait until this object has run everything we sent it: when
             * every producer does this at once, the I/O thread sleeps and
             * only our wakeup can get it going again. */
            if (!wait_u64(&f->next_seq[a->id], a->posted[t], WAIT_MS))
                a->stalled = 1;
        } else if (r == 1) {
            mt_test_sleep_us(20 + (long)mt_test_rng_below(&rng, 200));
        } else if (r < 5) {
            sched_yield();
        }
    }
    return NULL;
}

static void test_post_fifo_many_producers(void **state)
{
    (void)state;
    const uint32_t chains = MT_TEST_SCALE(3000, 500);
    mt_runtime_shutdown();
    mt_io_thread *io[FIFO_IO];
    assert_int_equal(mt_runtime_acquire(FIFO_IO, io), 0);
    mt_sink *sink = mt_sink_new();
    assert_non_null(sink);
    fake *objs[FIFO_OBJS];
    for (int i = 0; i < FIFO_OBJS; i++)
        objs[i] = fake_new(sink, io[i % FIFO_IO]);
    uint64_t cmds_before[FIFO_IO];
    for (int i = 0; i < FIFO_IO; i++)
        cmds_before[i] = snap_commands(i);

    pthread_barrier_t start;
    assert_int_equal(pthread_barrier_init(&start, NULL, FIFO_PRODUCERS), 0);
    fifo_prod args[FIFO_PRODUCERS];
    pthread_t th[FIFO_PRODUCERS];
    for (int p = 0; p < FIFO_PRODUCERS; p++) {
        args[p] = (fifo_prod){.id = p, .objs = objs, .chains = chains, .start = &start};
        assert_int_equal(pthread_create(&th[p], NULL, fifo_producer, &args[p]), 0);
    }
    for (int p = 0; p < FIFO_PRODUCERS; p++)
        pthread_join(th[p], NULL);
    pthread_barrier_destroy(&start);

    uint64_t total = 0, per_io[FIFO_IO] = {0};
    for (int p = 0; p < FIFO_PRODUCERS; p++) {
        assert_int_equal(args[p].post_failed, 0);
        assert_false(args[p].stalled);
        for (int t = 0; t < FIFO_OBJS; t++) {
            total += args[p].posted[t];
            per_io[t % FIFO_IO] += args[p].posted[t];
            /* Bounded: a lost wakeup leaves the last chain unhandled. */
            assert_true(wait_u64(&objs[t]->next_seq[p], args[p].posted[t], WAIT_MS));
        }
    }
    for (int t = 0; t < FIFO_OBJS; t++) {
        assert_int_equal(atomic_load(&objs[t]->bad), 0);
        uint64_t want = 0;
        for (int p = 0; p < FIFO_PRODUCERS; p++) {
            want += args[p].posted[t];
            /* Exactly once: no command ran twice (the count would pass the
             * number posted, and the order check would fail). */
            assert_int_equal(atomic_load(&objs[t]->next_seq[p]), args[p].posted[t]);
        }
        assert_true(wait_u64(&objs[t]->handled, want, WAIT_MS));
        assert_int_equal(atomic_load(&objs[t]->handled), want);
    }
    /* The per-thread command counters agree (they are published after each
     * batch, so give them a moment). */
    double deadline = mt_test_now() + WAIT_MS / 1000.0;
    for (int i = 0; i < FIFO_IO; i++) {
        while (snap_commands(i) - cmds_before[i] < per_io[i] && mt_test_now() < deadline)
            mt_test_sleep_us(100);
        assert_int_equal(snap_commands(i) - cmds_before[i], per_io[i]);
    }
    uint64_t wakes = 0;
    for (int i = 0; i < FIFO_IO; i++) {
        mt_io_snapshot snap;
        assert_true(mt_runtime_snapshot(i, &snap));
        wakes += snap.wakeups_sent;
    }
    print_message("%llu commands from %d producers in chains of 1..32: %llu I/O thread "
                  "wakeups\n",
                  (unsigned long long)total, FIFO_PRODUCERS, (unsigned long long)wakes);
    /* The threads did sleep and get woken (else this proves little). */
    assert_true(wakes > 0);

    /* The joins free every command: then the test's reference is the last. */
    mt_runtime_shutdown();
    for (int t = 0; t < FIFO_OBJS; t++) {
        int id = objs[t]->id;
        assert_int_equal(obj_refs(objs[t]), 1);
        mt_io_obj_decref(&objs[t]->obj);
        assert_int_equal(destroyed(id), 1);
    }
    assert_int_equal(sink_refs(sink), 1);
    mt_sink_decref(sink);
}

/* Completions from two I/O threads into one sink, consumed with the wake
 * protocol: none lost, per-object order kept, and at most one eventfd write
 * per batch (far fewer than completions). */
static void test_completions_batched(void **state)
{
    (void)state;
    const int rounds = MT_TEST_SCALE(150, 40);
    const uint32_t per_cmd = 64;
    mt_runtime_shutdown();
    mt_io_thread *io[2];
    assert_int_equal(mt_runtime_acquire(2, io), 0);
    mt_sink *sink = mt_sink_new();
    assert_non_null(sink);
    consumer cons = {.sink = sink};
    fake *f[2] = {fake_new(sink, io[0]), fake_new(sink, io[1])};
    uint64_t done_before = snap_completions(0) + snap_completions(1);

    mt_test_rng rng;
    mt_test_rng_seed(&rng, 4242);
    uint64_t expected = 0, received = 0, commands = 0, bad = 0;
    uint64_t next_seq[2] = {0, 0};
    for (int r = 0; r < rounds; r++) {
        uint64_t want = 0;
        for (int o = 0; o < 2; o++) {
            uint32_t k = 1 + (uint32_t)mt_test_rng_below(&rng, 3);
            mt_cmd *first = NULL, *last = NULL;
            for (uint32_t j = 0; j < k; j++) {
                mt_cmd *c = cmd_make(f[o], (payload){.op = OP_EMIT, .count = per_cmd,
                                                     .pause_every = 16,
                                                     .kind = MT_DONE_DATA});
                if (last)
                    link_cmd(last, c);
                else
                    first = c;
                last = c;
            }
            assert_true(mt_io_thread_post(io[o], first, last));
            commands += k;
            want += (uint64_t)k * per_cmd;
        }
        expected += want;
        while (received < expected) {
            mt_done *d = sink_next(&cons, WAIT_MS);
            if (d == NULL)
                fail_msg("completion %llu of %llu never arrived (lost wakeup?)",
                         (unsigned long long)received, (unsigned long long)expected);
            done_payload p = done_data(d);
            int o = p.id == f[0]->id ? 0 : p.id == f[1]->id ? 1 : -1;
            if (o < 0 || d->kind != MT_DONE_DATA || d->source != &f[o]->obj ||
                p.seq != next_seq[o])
                bad++;
            if (o >= 0)
                next_seq[o] = p.seq + 1;
            received++;
            mt_done_free(d);
        }
    }
    /* Nothing extra. */
    assert_null(sink_next(&cons, 20));
    cons.timeouts = 0;

    uint64_t sent = atomic_load(&sink->waker.wakeups_sent);
    uint64_t recvd = atomic_load(&sink->waker.wakeups_received);
    print_message("%llu completions from %llu commands: %llu eventfd writes, %llu reads, "
                  "%llu blocks\n",
                  (unsigned long long)received, (unsigned long long)commands,
                  (unsigned long long)sent, (unsigned long long)recvd,
                  (unsigned long long)cons.blocks);
    assert_int_equal(bad, 0);
    assert_int_equal(received, expected);
    assert_int_equal(cons.lost, 0);
    assert_int_equal(cons.timeouts, 0);
    assert_true(cons.blocks > 0); /* the consumer did sleep and get woken */
    /* One push (and at most one write) per batch; a command's completions
     * are one batch, so never more writes than commands. */
    assert_true(sent >= 1);
    assert_true(sent <= commands);
    assert_true(sent * 16 <= received);
    assert_true(recvd <= sent);
    uint64_t done_after = 0;
    double deadline = mt_test_now() + WAIT_MS / 1000.0;
    do {
        done_after = snap_completions(0) + snap_completions(1);
    } while (done_after - done_before < expected && mt_test_now() < deadline);
    assert_int_equal(done_after - done_before, expected);

    mt_runtime_shutdown();
    for (int o = 0; o < 2; o++) {
        int id = f[o]->id;
        mt_io_obj_decref(&f[o]->obj);
        assert_int_equal(destroyed(id), 1);
    }
    assert_int_equal(sink_refs(sink), 1);
    mt_sink_decref(sink);
}

/* More sinks than a thread batches at once (MT_BATCH_SINKS): completions
 * interleaved over them all still arrive, each sink in order. */
enum { MANY_SINKS = 11, MANY_ROUNDS = 20 };

static void test_emit_many_sinks(void **state)
{
    (void)state;
    mt_runtime_shutdown();
    mt_io_thread *io;
    assert_int_equal(mt_runtime_acquire(1, &io), 0);
    mt_sink *sinks[MANY_SINKS];
    fake *f[MANY_SINKS];
    consumer cons[MANY_SINKS];
    for (int i = 0; i < MANY_SINKS; i++) {
        sinks[i] = mt_sink_new();
        assert_non_null(sinks[i]);
        f[i] = fake_new(sinks[i], io);
        cons[i] = (consumer){.sink = sinks[i]};
    }
    post1(f[0], (payload){.op = OP_EMIT_TO, .count = MANY_ROUNDS, .kind = MT_DONE_DATA,
                          .targets = f, .ntargets = MANY_SINKS});
    for (int i = 0; i < MANY_SINKS; i++) {
        for (uint64_t seq = 0; seq < MANY_ROUNDS; seq++) {
            mt_done *d = sink_next(&cons[i], WAIT_MS);
            if (d == NULL)
                fail_msg("sink %d: completion %llu never arrived", i, (unsigned long long)seq);
            assert_ptr_equal(d->source, &f[i]->obj);
            assert_int_equal(done_data(d).id, f[i]->id);
            assert_int_equal(done_data(d).seq, seq);
            mt_done_free(d);
        }
        assert_null(sink_next(&cons[i], 5));
        assert_int_equal(cons[i].lost, 0);
    }
    mt_runtime_shutdown();
    for (int i = 0; i < MANY_SINKS; i++) {
        int id = f[i]->id;
        mt_io_obj_decref(&f[i]->obj);
        assert_int_equal(destroyed(id), 1);
        assert_int_equal(sink_refs(sinks[i]), 1);
        mt_sink_decref(sinks[i]);
    }
}

/* SINK_CLOSE drops exactly the objects of that sink on every thread,
 * pushes what they emitted before it acks, and releases the latch. */
static void test_sink_close(void **state)
{
    (void)state;
    mt_runtime_shutdown();
    mt_io_thread *io[2];
    assert_int_equal(mt_runtime_acquire(2, io), 0);
    mt_sink *sa = mt_sink_new(), *sb = mt_sink_new();
    assert_non_null(sa);
    assert_non_null(sb);
    consumer ca = {.sink = sa}, cb = {.sink = sb};
    enum { NA = 5, NB = 3 };
    fake *a[NA], *b[NB];
    for (int i = 0; i < NA; i++)
        a[i] = fake_new(sa, io[i < 3 ? 0 : 1]);
    for (int i = 0; i < NB; i++)
        b[i] = fake_new(sb, io[i < 2 ? 0 : 1]);
    /* Interleave the objects on each thread's list. */
    for (int i = 0; i < NA || i < NB; i++) {
        if (i < NA)
            post1(a[i], (payload){.op = OP_OWN});
        if (i < NB)
            post1(b[i], (payload){.op = OP_OWN});
    }
    /* One object of A's sink is not owned: it must not be dropped. */
    fake *loose = fake_new(sa, io[0]);

    mt_latch latch;
    mt_latch_init(&latch);
    for (int t = 0; t < 2; t++) {
        mt_cmd *cmd = mt_cmd_new(MT_CMD_SINK_CLOSE, sa, 0);
        assert_non_null(cmd);
        cmd->latch = &latch;
        mt_latch_add(&latch);
        assert_true(mt_io_thread_post(io[t], cmd, cmd));
    }
    assert_true(latch_wait_for(&latch, WAIT_MS));
    mt_latch_destroy(&latch);

    for (int i = 0; i < NA; i++) {
        assert_int_equal(atomic_load(&a[i]->drops), 1);
        assert_int_equal(atomic_load(&a[i]->drops_notify), 0);
        assert_int_equal(atomic_load(&a[i]->drop_bad), 0);
        assert_int_equal(atomic_load(&a[i]->owned), 0);
        assert_int_equal(atomic_load(&a[i]->bad), 0);
    }
    for (int i = 0; i < NB; i++) {
        assert_int_equal(atomic_load(&b[i]->drops), 0);
        assert_int_equal(atomic_load(&b[i]->owned), 1);
    }
    assert_int_equal(atomic_load(&loose->drops), 0);
    /* What the drops emitted was pushed before the latch opened. */
    int closed = 0, seen[NA] = {0};
    mt_done *d;
    while ((d = sink_pop_now(sa)) != NULL) {
        assert_int_equal(d->kind, MT_DONE_CLOSED);
        assert_int_equal(d->err, 0);
        for (int i = 0; i < NA; i++)
            if (d->source == &a[i]->obj)
                seen[i]++;
        closed++;
        mt_done_free(d);
    }
    assert_int_equal(closed, NA);
    for (int i = 0; i < NA; i++)
        assert_int_equal(seen[i], 1);
    assert_true(mt_mpsc_queue_is_empty(&sb->queue));

    /* The threads go on serving the other sink, and the dropped objects
     * still take commands (they are just not owned any more). */
    barrier_on(b[0], &cb, 1);
    barrier_on(b[2], &cb, 2);
    barrier_on(a[0], &ca, 3);
    /* Owned by nobody: the test's reference is the last one. */
    for (int i = 0; i < NA; i++) {
        int id = a[i]->id;
        assert_int_equal(obj_refs(a[i]), 1);
        mt_io_obj_decref(&a[i]->obj);
        assert_int_equal(destroyed(id), 1);
    }
    int loose_id = loose->id;
    mt_io_obj_decref(&loose->obj);
    assert_int_equal(destroyed(loose_id), 1);
    sink_barrier(sa, io, 2);
    assert_int_equal(sink_refs(sa), 1);
    mt_sink_decref(sa);

    /* Shutdown drops the rest with notify. */
    mt_runtime_shutdown();
    for (int i = 0; i < NB; i++) {
        assert_int_equal(atomic_load(&b[i]->drops), 1);
        assert_int_equal(atomic_load(&b[i]->drops_notify), 1);
        assert_int_equal(atomic_load(&b[i]->drop_bad), 0);
    }
    closed = 0;
    while ((d = sink_pop_now(sb)) != NULL) {
        assert_int_equal(d->kind, MT_DONE_CLOSED);
        assert_int_equal(d->err, 1);
        closed++;
        mt_done_free(d);
    }
    assert_int_equal(closed, NB);
    for (int i = 0; i < NB; i++) {
        int id = b[i]->id;
        mt_io_obj_decref(&b[i]->obj);
        assert_int_equal(destroyed(id), 1);
    }
    assert_int_equal(ca.lost + cb.lost, 0);
    assert_int_equal(sink_refs(sb), 1);
    mt_sink_decref(sb);
}

/* Shutdown joins the threads, drops their objects with notify, makes posts
 * fail; a later acquire starts a fresh pool. */
static void test_shutdown_and_restart(void **state)
{
    (void)state;
    mt_runtime_shutdown();
    mt_io_thread *io[3];
    assert_int_equal(mt_runtime_acquire(3, io), 0);
    mt_sink *sink = mt_sink_new();
    assert_non_null(sink);
    consumer cons = {.sink = sink};
    enum { PER = 2 };
    fake *owned[3 * PER];
    for (int i = 0; i < 3 * PER; i++) {
        owned[i] = fake_new(sink, io[i % 3]);
        post1(owned[i], (payload){.op = OP_OWN});
        /* Work still queued behind the own when STOP arrives is done
         * first (FIFO), its completions delivered. */
        post1(owned[i], (payload){.op = OP_EMIT, .count = 3, .kind = MT_DONE_DATA});
    }
    fake *loose = fake_new(sink, io[1]);
    post1(loose, (payload){.op = OP_NOP, .ack = 1, .seq = 9});

    mt_runtime_shutdown();
    assert_int_equal(mt_runtime_size(), 0);
    mt_io_snapshot snap;
    assert_false(mt_runtime_snapshot(0, &snap));
    for (int t = 0; t < 3; t++)
        assert_true(mt_io_thread_stopped(io[t]));
    /* The join orders everything the threads pushed before this point. */
    int data = 0, closed = 0, acks = 0, other = 0;
    mt_done *d;
    while ((d = sink_pop_now(sink)) != NULL) {
        if (d->kind == MT_DONE_DATA)
            data++;
        else if (d->kind == MT_DONE_CLOSED && d->err == 1)
            closed++;
        else if (d->kind == MT_DONE_EOF && d->source == &loose->obj)
            acks++;
        else
            other++;
        mt_done_free(d);
    }
    assert_int_equal(data, 3 * PER * 3);
    assert_int_equal(closed, 3 * PER);
    assert_int_equal(acks, 1);
    assert_int_equal(other, 0);
    for (int i = 0; i < 3 * PER; i++) {
        assert_int_equal(atomic_load(&owned[i]->drops), 1);
        assert_int_equal(atomic_load(&owned[i]->drops_notify), 1);
        assert_int_equal(atomic_load(&owned[i]->drop_bad), 0);
        assert_int_equal(atomic_load(&owned[i]->owned), 0);
        assert_int_equal(obj_refs(owned[i]), 1);
    }
    assert_int_equal(atomic_load(&loose->drops), 0);

    /* Posting to a stopped thread fails and leaves the chain to us. */
    mt_cmd *c1 = cmd_make(loose, (payload){.op = OP_NOP});
    mt_cmd *c2 = cmd_make(loose, (payload){.op = OP_NOP});
    link_cmd(c1, c2);
    assert_int_equal(obj_refs(loose), 3);
    assert_false(mt_io_thread_post(io[1], c1, c2));
    assert_false(mt_io_thread_post(io[0], c1, c1));
    assert_int_equal(obj_refs(loose), 3);
    mt_cmd_free(c1);
    mt_cmd_free(c2);
    assert_int_equal(obj_refs(loose), 1);
    assert_int_equal(atomic_load(&loose->handled), 1);

    mt_runtime_shutdown(); /* idempotent */
    assert_int_equal(mt_runtime_size(), 0);

    /* A fresh pool: new threads (the stopped ones stay allocated, so the
     * addresses differ), and they work. */
    mt_io_thread *fresh[2];
    assert_int_equal(mt_runtime_acquire(2, fresh), 0);
    assert_int_equal(mt_runtime_size(), 2);
    for (int i = 0; i < 2; i++) {
        assert_false(mt_io_thread_stopped(fresh[i]));
        assert_int_equal(mt_io_thread_index(fresh[i]), i);
        for (int t = 0; t < 3; t++)
            assert_ptr_not_equal(fresh[i], io[t]);
        assert_true(mt_runtime_snapshot(i, &snap));
        assert_int_equal(snap.commands, 0);
        fake *g = fake_new(sink, fresh[i]);
        barrier_on(g, &cons, 20 + (uint64_t)i);
        int id = g->id;
        mt_io_obj_decref(&g->obj);
        assert_int_equal(destroyed(id), 1);
    }
    assert_int_equal(cons.lost, 0);
    mt_runtime_shutdown();

    for (int i = 0; i < 3 * PER; i++) {
        int id = owned[i]->id;
        mt_io_obj_decref(&owned[i]->obj);
        assert_int_equal(destroyed(id), 1);
    }
    int lid = loose->id;
    mt_io_obj_decref(&loose->obj);
    assert_int_equal(destroyed(lid), 1);
    assert_int_equal(sink_refs(sink), 1);
    mt_sink_decref(sink);
}

/* An object lives as long as any command, completion, owning thread or
 * caller holds it, and is destroyed exactly once; the sink lives as long as
 * an object or the caller holds it. */
static void test_refcounts(void **state)
{
    (void)state;
    mt_runtime_shutdown();
    mt_io_thread *io;
    assert_int_equal(mt_runtime_acquire(1, &io), 0);
    mt_sink *sink = mt_sink_new();
    assert_non_null(sink);
    consumer cons = {.sink = sink};
    assert_int_equal(sink_refs(sink), 1);

    fake *f = fake_new(sink, io);
    int id = f->id;
    assert_int_equal(obj_refs(f), 1);
    assert_int_equal(sink_refs(sink), 2);

    enum { N = 10 };
    mt_cmd *own = cmd_make(f, (payload){.op = OP_OWN});
    mt_cmd *emit = cmd_make(f, (payload){.op = OP_EMIT, .count = N, .kind = MT_DONE_DATA});
    assert_int_equal(obj_refs(f), 3); /* every command holds one */
    link_cmd(own, emit);
    assert_true(mt_io_thread_post(io, own, emit));
    mt_io_obj_decref(&f->obj); /* the caller lets go at once */
    assert_int_equal(destroyed(id), 0);

    mt_done *held[N + 1];
    for (int i = 0; i < N; i++) {
        held[i] = sink_next(&cons, WAIT_MS);
        assert_non_null(held[i]);
        assert_int_equal(held[i]->kind, MT_DONE_DATA);
        assert_int_equal(done_data(held[i]).seq, (uint64_t)i);
    }
    /* The owning thread's reference plus one per completion. */
    assert_int_equal(destroyed(id), 0);
    assert_int_equal(obj_refs(f), 1 + N);

    /* Disown through a command made from a completion's reference. */
    mt_cmd *dis = mt_cmd_new(MT_CMD_STREAM_WRITE, held[0]->source, sizeof(payload));
    assert_non_null(dis);
    payload p = {.op = OP_DISOWN, .ack = 1, .seq = 77};
    memcpy(dis->data, &p, sizeof(p));
    assert_true(mt_io_thread_post(io, dis, dis));
    held[N] = sink_next(&cons, WAIT_MS);
    assert_non_null(held[N]);
    assert_int_equal(held[N]->kind, MT_DONE_EOF);
    assert_int_equal(done_data(held[N]).seq, 77);
    /* The command was freed before its ack was pushed: only completions. */
    assert_int_equal(obj_refs(f), N + 1);
    assert_int_equal(atomic_load(&f->bad), 0);

    /* Make sure the thread is done pushing to the sink before its last
     * reference goes (as a closing loop does; see
     * test_push_keeps_sink_alive for why). */
    sink_barrier(sink, &io, 1);
    /* The caller lets go of the sink too: the object keeps it alive. */
    int sink_fd = sink->waker.fd;
    mt_sink_decref(sink);
    assert_int_equal(sink_refs(sink), 1);
    assert_true(fcntl(sink_fd, F_GETFD) >= 0);
    for (int i = 0; i < N; i++) {
        mt_done_free(held[i]);
        assert_int_equal(destroyed(id), 0);
    }
    assert_true(fcntl(sink_fd, F_GETFD) >= 0);
    mt_done_free(held[N]); /* the last reference: object, then sink */
    assert_int_equal(destroyed(id), 1);
    errno = 0;
    assert_int_equal(fcntl(sink_fd, F_GETFD), -1);
    assert_int_equal(errno, EBADF);

    /* The last reference can also go on the I/O thread (with its command),
     * taking the sink with it. */
    mt_sink *s2 = mt_sink_new();
    assert_non_null(s2);
    fake *g = fake_new(s2, io);
    int gid = g->id;
    int s2_fd = s2->waker.fd;
    mt_sink_decref(s2);
    mt_cmd *nop = cmd_make(g, (payload){.op = OP_NOP});
    mt_io_obj_decref(&g->obj);
    assert_int_equal(destroyed(gid), 0);
    assert_true(mt_io_thread_post(io, nop, nop));
    double deadline = mt_test_now() + WAIT_MS / 1000.0;
    while (destroyed(gid) == 0 && mt_test_now() < deadline)
        mt_test_sleep_us(100);
    assert_int_equal(destroyed(gid), 1);
    /* (The sink's fd is closed right after destroy, on that thread.) */
    while (fcntl(s2_fd, F_GETFD) >= 0 && mt_test_now() < deadline)
        mt_test_sleep_us(100);
    assert_int_equal(fcntl(s2_fd, F_GETFD), -1);

    /* A completion freed without ever being queued releases its source. */
    mt_sink *s3 = mt_sink_new();
    fake *h = fake_new(s3, io);
    int hid = h->id;
    mt_done *lone = mt_done_new(MT_DONE_DATA, &h->obj, 0);
    assert_non_null(lone);
    assert_int_equal(obj_refs(h), 2);
    mt_io_obj_decref(&h->obj);
    assert_int_equal(destroyed(hid), 0);
    mt_done_free(lone);
    assert_int_equal(destroyed(hid), 1);
    assert_int_equal(sink_refs(s3), 1);
    mt_sink_decref(s3);

    assert_int_equal(cons.lost, 0);
    mt_runtime_shutdown();
}

/* A consumer may let go of the sink once it has freed what it popped: the
 * I/O thread must not touch a sink after the push that handed over the
 * last references keeping it alive.  mt_sink_push() (runtime.c) calls
 * mt_waker_notify(&sink->waker) after mt_mpsc_queue_push_chain(): in
 * between, the consumer can pop the completions, free them (the source,
 * then the sink goes) and the notify reads and writes freed memory.  A loop
 * is shielded only while it waits for SINK_CLOSE on every thread before its
 * last decref.  ASan reports a heap-use-after-free and TSan a race with
 * free(); a plain build sees it when the next round's sink reuses the
 * memory and counts the stale notify as its own second eventfd write. */
static void test_push_keeps_sink_alive(void **state)
{
    (void)state;
    const int rounds = MT_TEST_SCALE(8000, 200);
    int stale = 0;
    mt_runtime_shutdown();
    mt_io_thread *io;
    assert_int_equal(mt_runtime_acquire(1, &io), 0);
    for (int r = 0; r < rounds; r++) {
        mt_sink *sink = mt_sink_new();
        assert_non_null(sink);
        fake *f = fake_new(sink, io);
        int id = f->id;
        mt_cmd *cmd = cmd_make(f, (payload){.op = OP_EMIT, .count = 1, .kind = MT_DONE_DATA});
        mt_io_obj_decref(&f->obj); /* the command holds it */
        bool early = r & 1;
        if (early)
            mt_sink_decref(sink); /* the object keeps it alive */
        assert_true(mt_io_thread_post(io, cmd, cmd));
        /* The wake protocol with a zero-timeout poll (a consumer that
         * spins a while before it really sleeps): the consumer keeps
         * announcing SLEEPING, so the I/O thread takes the eventfd-write
         * path, while the consumer finds the completion in its re-check
         * and does not wait for that write. */
        mt_done *d = NULL;
        double deadline = mt_test_now() + WAIT_MS / 1000.0;
        while (d == NULL && mt_test_now() < deadline) {
            if ((d = sink_pop_now(sink)) != NULL)
                break;
            mt_waker_prepare_sleep(&sink->waker);
            if (!mt_mpsc_queue_is_empty(&sink->queue)) {
                mt_waker_awake(&sink->waker);
                continue;
            }
            struct pollfd pfd = {.fd = sink->waker.fd, .events = POLLIN};
            int n = poll(&pfd, 1, r & 2 ? 0 : 1);
            mt_waker_awake(&sink->waker);
            if (n > 0)
                mt_waker_drain(&sink->waker);
        }
        assert_non_null(d);
        /* One push, so at most one eventfd write, and state RUNNING now. A
         * late notify from the previous round landing on this sink (same
         * memory, reused) shows up here even without a sanitizer. */
        stale += atomic_load(&sink->waker.wakeups_sent) > 1;
        mt_done_free(d); /* the command is gone: the object goes */
        assert_int_equal(destroyed(id), 1);
        if (!early)
            mt_sink_decref(sink); /* the loop lets go after use */
    }
    mt_runtime_shutdown();
    assert_int_equal(stale, 0);
}

int main(void)
{
    mt_runtime_init();
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_default_size),
        cmocka_unit_test(test_latch),
        cmocka_unit_test(test_acquire_grows_only),
        cmocka_unit_test(test_post_fifo_many_producers),
        cmocka_unit_test(test_completions_batched),
        cmocka_unit_test(test_emit_many_sinks),
        cmocka_unit_test(test_sink_close),
        cmocka_unit_test(test_shutdown_and_restart),
        cmocka_unit_test(test_refcounts),
        cmocka_unit_test(test_push_keeps_sink_alive),
    };
    int rc = cmocka_run_group_tests(tests, NULL, NULL);
    mt_runtime_shutdown();
    return rc;
}
