/* The flow pump's handshakes between the I/O thread and the loop, under
 * races (src/transport/flow_pump.c):
 *  - DRAINED: the loop arms a resume mark (mt_flow_arm_resume) while the
 *    I/O thread moves `flushed` past it; every mark is reported exactly
 *    once, by the arm's return or by one DRAINED.  Through the real pump,
 *    and as a pure two-thread stress of the fenced store/load pairs, with
 *    an unfenced copy of the I/O side to show what the fence is for;
 *  - BLOCKED: the fd refuses output before or after the loop arms its mark
 *    (mt_flow_arm_blocked);
 *  - control bits: many signals while the I/O thread works, writes in
 *    order, CLOSE after writes flushes them before RELEASED, ABORT drops
 *    them, RELEASED always last. */
#include "flow_harness.h"

/* ---- DRAINED through the real pump ----------------------------------------- */

/* Plays the writing side of the loop: posts WRITE messages (at most
 * WINDOW bytes ahead of `flushed`) and drains the peer, until told to
 * stop. */
#define WINDOW (64 * 1024)

typedef struct drain_writer {
    mt_flow *f;
    int peer;
    _Atomic uint64_t posted;
    _Atomic int stop;
    pthread_mutex_t mu;   /* held while posting, and to set `hold` */
    bool hold;            /* the loop asks for no new writes (under mu) */
    uint64_t peer_rx;
    int err;
} drain_writer;

static void *drain_writer_main(void *arg)
{
    drain_writer *w = arg;
    mt_test_rng rng;
    mt_test_rng_seed(&rng, 31337);
    static uint8_t buf[128 * 1024];
    while (!atomic_load(&w->stop)) {
        for (;;) {
            ssize_t n = recv(w->peer, buf, sizeof(buf), MSG_DONTWAIT);
            if (n > 0) {
                w->peer_rx += (uint64_t)n;
                continue;
            }
            if (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR)
                w->err = errno;
            break;
        }
        pthread_mutex_lock(&w->mu);
        if (w->hold) {
            pthread_mutex_unlock(&w->mu);
            struct pollfd p = {.fd = w->peer, .events = POLLIN};
            poll(&p, 1, 1);
            continue;
        }
        uint64_t posted = atomic_load_explicit(&w->posted, memory_order_relaxed);
        uint64_t flushed = atomic_load_explicit(&w->f->marks.flushed, memory_order_acquire);
        if (posted - flushed < WINDOW) {
            uint32_t k = 1 + (uint32_t)mt_test_rng_below(&rng, 8);
            mt_msg *first = NULL, *last = NULL;
            uint64_t bytes = 0;
            for (uint32_t j = 0; j < k; j++) {
                size_t len = 1 + (size_t)mt_test_rng_below(&rng, 4096);
                mt_msg *m = mt_msg_new(MT_FLOW_WRITE, &w->f->rec, len);
                if (m == NULL) {
                    w->err = ENOMEM;
                    break;
                }
                memset(mt_msg_data(m), (int)j, len);
                if (last)
                    atomic_store_explicit(&last->node.next, &m->node, memory_order_relaxed);
                else
                    first = m;
                last = m;
                bytes += len;
            }
            if (first == NULL) {
                pthread_mutex_unlock(&w->mu);
                break;
            }
            /* Counted before the post: the loop never arms past it. */
            atomic_store_explicit(&w->posted, posted + bytes, memory_order_release);
            bool ok = mt_io_thread_post(w->f->rec.io, first, last);
            pthread_mutex_unlock(&w->mu);
            if (!ok) {
                w->err = ESHUTDOWN;
                break;
            }
        } else {
            pthread_mutex_unlock(&w->mu);
            struct pollfd p = {.fd = w->peer, .events = POLLIN};
            poll(&p, 1, 1);
        }
    }
    return NULL;
}

static void set_hold(drain_writer *w, bool on)
{
    pthread_mutex_lock(&w->mu);
    w->hold = on;
    pthread_mutex_unlock(&w->mu);
}

static void test_drained_race_pump(void **state)
{
    (void)state;
    harness *h = &g_h;
    h_open(h);
    /* A small buffer keeps `flushed` moving in small steps. */
    set_sndbuf(h->fd, 32 * 1024);
    drain_writer w = {.f = h->f, .peer = h->peer};
    pthread_mutex_init(&w.mu, NULL);
    pthread_t th;
    assert_int_equal(pthread_create(&th, NULL, drain_writer_main, &w), 0);

    const int rounds = MT_TEST_SCALE(20000, 5000);
    mt_test_rng rng;
    mt_test_rng_seed(&rng, 4711);
    int now = 0, later = 0, early = 0, extra = 0, timeouts = 0, spins = 0, held_reports = 0;
    double idle_since = 0;
    for (int r = 0; r < rounds && timeouts == 0; r++) {
        /* Any DRAINED here would be a second report of a mark already
         * reported. */
        h_drain_sink(h);
        extra += h->n_drained;
        h->n_drained = 0;
        uint64_t flushed = h_flushed(h);
        uint64_t posted = atomic_load(&w.posted);
        if (posted <= flushed) {
            if (spins++ == 0)
                idle_since = mt_test_now();
            else if (mt_test_now() - idle_since > WAIT_MS / 1000.0)
                fail_msg("the writer stopped posting");
            sched_yield();
            r--;
            continue;
        }
        spins = 0;
        /* Just ahead of `flushed`, where the I/O thread is about to be;
         * or ahead of where it was a moment ago, so that it is as likely
         * to have passed the mark already as not; or, with the writer
         * held, at (or just short of) the end of the output, so that the
         * very last flush must be the one that reports it (a pump that
         * only notices a mark on the next flush would never report it, as
         * a paused protocol writes nothing more). */
        uint64_t mark;
        bool held = false;
        uint64_t how = mt_test_rng_below(&rng, 4);
        if (how == 0) {
            pthread_mutex_lock(&w.mu);
            w.hold = true; /* no post after this */
            pthread_mutex_unlock(&w.mu);
            held = true;
            posted = atomic_load(&w.posted);
            flushed = h_flushed(h);
            uint64_t room = posted - flushed;
            mark = posted;
            if (room > 1 && mt_test_rng_below(&rng, 2))
                mark -= mt_test_rng_below(&rng, room < 4096 ? room : 4096);
            if (mark == 0)
                mark = 1;
        } else if (how == 1) {
            uint64_t room = posted - flushed;
            uint64_t span = mt_test_rng_below(&rng, 4) == 0 ? 16384 : 2048;
            mark = flushed + 1 + mt_test_rng_below(&rng, room < span ? room : span);
        } else {
            double until = mt_test_now() + (double)mt_test_rng_below(&rng, 100) * 1e-6;
            while (mt_test_now() < until) {
            }
            posted = atomic_load(&w.posted);
            uint64_t room = posted - flushed;
            uint64_t span = 65536;
            mark = flushed + 1 + mt_test_rng_below(&rng, room < span ? room : span);
        }
        if (mt_flow_arm_resume(h->f, mark)) {
            now++;
            if (held)
                set_hold(&w, false);
            continue;
        }
        /* Armed: one DRAINED must come, once flushed >= mark. */
        double deadline = mt_test_now() + WAIT_MS / 1000.0;
        while (h->n_drained == 0 && mt_test_now() < deadline)
            h_run(h, drained_seen, 5);
        if (h->n_drained == 0) {
            timeouts++;
            print_message("round %d: mark %llu never reported (flushed %llu, resume_at "
                          "%llu)\n",
                          r, (unsigned long long)mark, (unsigned long long)h_flushed(h),
                          (unsigned long long)atomic_load(&h->f->marks.resume_at));
            break;
        }
        if (held) {
            held_reports++;
            set_hold(&w, false);
        }
        if (h->drained_flushed < mark)
            early++;
        later++;
        h->n_drained--;
        extra += h->n_drained; /* two at once */
        h->n_drained = 0;
    }
    set_hold(&w, false);
    atomic_store(&w.stop, 1);
    pthread_join(th, NULL);
    pthread_mutex_destroy(&w.mu);
    /* Let the output finish (the peer drains it here): no report may be
     * pending. */
    uint64_t posted = atomic_load(&w.posted);
    double deadline = mt_test_now() + WAIT_MS / 1000.0;
    static uint8_t sink_buf[128 * 1024];
    while (h_flushed(h) < posted && mt_test_now() < deadline) {
        while (recv(h->peer, sink_buf, sizeof(sink_buf), MSG_DONTWAIT) > 0) {
        }
        h_quiet(h, 1);
    }
    assert_int_equal(h_flushed(h), posted);
    h_quiet(h, QUIET_MS);
    extra += h->n_drained;
    print_message("%d marks: %d reported by the arm, %d by DRAINED (%d with the writer "
                  "held); %d lost, %d extra, %d early; %llu bytes\n",
                  now + later, now, later, held_reports, timeouts, extra, early,
                  (unsigned long long)atomic_load(&w.posted));
    assert_int_equal(w.err, 0);
    assert_int_equal(timeouts, 0);
    assert_int_equal(extra, 0);
    assert_int_equal(early, 0);
    assert_int_equal(now + later, rounds);
    assert_true(later > 0); /* the DRAINED side did run */
    assert_true(held_reports > 0);
    assert_true(now > 0);   /* and so did the arm's own report */
    assert_int_equal(atomic_load(&h->f->marks.resume_at), 0);
    h_finish(h);
}

#ifndef MT_TEST_ROUNDS
#define MT_TEST_ROUNDS MT_TEST_SCALE(1000000, 200000)
#endif

/* ---- the handshake alone: two threads on an mt_flow's fields ---------------- */

/* One round: the loop arms mark i+1 while the I/O side moves flushed from i
 * to i+1.  Exactly one of them must report it.  Both sides start each
 * round at the same moment of a shared clock (as litmus testers do), each
 * with a small random offset, so that over the rounds their store/load
 * pairs overlap in every way. */
typedef struct hs {
    mt_flow *f;
    int rounds;
    bool fenced;                 /* the I/O side as note_flushed does it */
    _Atomic uint64_t start_at;   /* round start, in ticks (0: none yet) */
    _Atomic int go;              /* round the I/O side may run */
    _Atomic int done;            /* round the I/O side finished */
    _Atomic bool io_reported;    /* its CAS took the mark this round */
    int cpu;                     /* for the I/O side, or -1 */
} hs;

#if defined(__x86_64__) || defined(__i386__)
#include <x86intrin.h>
static inline uint64_t ticks(void) { return __rdtsc(); }
#define TICKS_AHEAD 3000u /* ~1.3 us at 2.3 GHz: time for the other side to see it */
#define TICKS_JITTER 300u
#else
static inline uint64_t ticks(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}
#define TICKS_AHEAD 3000u
#define TICKS_JITTER 150u
#endif

/* The two sides on two different CPUs when there are two (on this VM the
 * scheduler otherwise often runs both on one vCPU, where they never
 * overlap).  Returns the CPU for the other side, or -1. */
static int pin_self(cpu_set_t *saved)
{
    cpu_set_t allowed;
    if (sched_getaffinity(0, sizeof(allowed), &allowed) != 0 || CPU_COUNT(&allowed) < 2)
        return -1;
    *saved = allowed;
    int a = -1, b = -1;
    for (int c = 0; c < CPU_SETSIZE && b < 0; c++)
        if (CPU_ISSET(c, &allowed)) {
            if (a < 0)
                a = c;
            else
                b = c;
        }
    cpu_set_t one;
    CPU_ZERO(&one);
    CPU_SET(a, &one);
    if (pthread_setaffinity_np(pthread_self(), sizeof(one), &one) != 0)
        return -1;
    return b;
}

static inline void wait_ticks(uint64_t t)
{
    while (ticks() < t) {
    }
}

/* Spins until *v == want, yielding now and then (two vCPUs: the other
 * side may be descheduled). */
static inline void spin_until(_Atomic int *v, int want)
{
    for (unsigned n = 0; atomic_load_explicit(v, memory_order_acquire) != want; n++)
        if ((n & 0xfff) == 0xfff)
            sched_yield();
}

/* What note_flushed + check_drained in flow_pump.c do (the report is the
 * CAS that takes the mark; emitting DRAINED is left out). */
static bool io_side_fenced(mt_flow *f, uint64_t n)
{
    return mt_flow_add_flushed(f, n); /* the pump's own I/O side */
}

/* The same without the fence: a release store, then the load, which the
 * CPU may perform before the store is visible (x86 store buffering). */
static bool io_side_unfenced(mt_flow *f, uint64_t n)
{
    uint64_t v = atomic_load_explicit(&f->marks.flushed, memory_order_relaxed) + n;
    atomic_store_explicit(&f->marks.flushed, v, memory_order_release);
    uint64_t mark = atomic_load_explicit(&f->marks.resume_at, memory_order_relaxed);
    if (mark == 0 || v < mark)
        return false;
    return atomic_compare_exchange_strong(&f->marks.resume_at, &mark, 0);
}

static void *hs_io_main(void *arg)
{
    hs *s = arg;
    if (s->cpu >= 0) {
        cpu_set_t one;
        CPU_ZERO(&one);
        CPU_SET(s->cpu, &one);
        pthread_setaffinity_np(pthread_self(), sizeof(one), &one);
    }
    mt_test_rng rng;
    mt_test_rng_seed(&rng, 5);
    for (int i = 0; i < s->rounds; i++) {
        spin_until(&s->go, i + 1);
        uint64_t t = atomic_load_explicit(&s->start_at, memory_order_relaxed);
        wait_ticks(t + mt_test_rng_below(&rng, TICKS_JITTER));
        bool rep = s->fenced ? io_side_fenced(s->f, 1) : io_side_unfenced(s->f, 1);
        atomic_store_explicit(&s->io_reported, rep, memory_order_relaxed);
        atomic_store_explicit(&s->done, i + 1, memory_order_release);
    }
    return NULL;
}

typedef struct hs_result {
    int lost, twice, by_loop;
    double secs;
} hs_result;

static hs_result handshake_stress(bool fenced, int rounds)
{
    mt_flow *f = calloc(1, sizeof(*f));
    assert_non_null(f);
    atomic_init(&f->marks.flushed, 0);
    atomic_init(&f->marks.resume_at, 0);
    hs *s = calloc(1, sizeof(hs));
    assert_non_null(s);
    s->f = f;
    s->rounds = rounds;
    s->fenced = fenced;
    atomic_init(&s->go, 0);
    atomic_init(&s->done, 0);
    cpu_set_t saved;
    s->cpu = pin_self(&saved);
    pthread_t th;
    assert_int_equal(pthread_create(&th, NULL, hs_io_main, s), 0);
    mt_test_rng rng;
    mt_test_rng_seed(&rng, 6);
    hs_result res = {0};
    double t0 = mt_test_now();
    for (int i = 0; i < rounds; i++) {
        uint64_t t = ticks() + TICKS_AHEAD;
        atomic_store_explicit(&s->start_at, t, memory_order_relaxed);
        atomic_store_explicit(&s->go, i + 1, memory_order_release);
        wait_ticks(t + mt_test_rng_below(&rng, TICKS_JITTER));
        bool loop_rep = mt_flow_arm_resume(f, (uint64_t)i + 1);
        spin_until(&s->done, i + 1);
        bool io_rep = atomic_load_explicit(&s->io_reported, memory_order_relaxed);
        if (!loop_rep && !io_rep)
            res.lost++;
        if (loop_rep && io_rep)
            res.twice++;
        if (loop_rep)
            res.by_loop++;
        /* Next round: no mark armed. */
        atomic_store_explicit(&f->marks.resume_at, 0, memory_order_relaxed);
    }
    res.secs = mt_test_now() - t0;
    pthread_join(th, NULL);
    if (s->cpu >= 0)
        pthread_setaffinity_np(pthread_self(), sizeof(saved), &saved);
    assert_int_equal(atomic_load(&f->marks.flushed), (uint64_t)rounds);
    free(s);
    free(f);
    return res;
}

static void test_drained_handshake_stress(void **state)
{
    (void)state;
    const int rounds = MT_TEST_ROUNDS;
    hs_result fenced = handshake_stress(true, rounds);
    hs_result unfenced = handshake_stress(false, rounds);
    print_message("%d rounds, fenced I/O side (flow_pump.c): %d lost, %d reported twice, "
                  "%d by the arm (%.2f s)\n",
                  rounds, fenced.lost, fenced.twice, fenced.by_loop, fenced.secs);
    print_message("%d rounds, I/O side without the fence: %d lost, %d reported twice, "
                  "%d by the arm (%.2f s)%s\n",
                  rounds, unfenced.lost, unfenced.twice, unfenced.by_loop, unfenced.secs,
                  MT_TEST_TSAN ? " (TSan does not model store buffering)" : "");
    assert_int_equal(fenced.lost, 0);
    assert_int_equal(fenced.twice, 0);
    assert_int_equal(unfenced.twice, 0); /* the CAS still keeps it to one */
}

/* ---- BLOCKED ---------------------------------------------------------------- */

static bool output_full(harness *h)
{
    return atomic_load(&h->f->marks.output_full);
}

/* Waits until the I/O thread found the fd full, and its output stalled. */
static void h_wait_full(harness *h, uint64_t total)
{
    h_wait_write_stall(h, total);
    double deadline = mt_test_now() + WAIT_MS / 1000.0;
    while (!output_full(h) && mt_test_now() < deadline)
        h_quiet(h, 1);
    assert_true(output_full(h));
}

static void test_blocked(void **state)
{
    (void)state;
    harness *h = &g_h;
    h_open(h);
    set_sndbuf(h->fd, 16 * 1024);
    assert_false(output_full(h));

    /* 1. The fd is full before the loop asks: the arm says so itself, and
     *    no BLOCKED comes for that mark, now or on later refusals. */
    h_write_many(h, 512 * 1024, 32 * 1024, 21);
    h_wait_full(h, h->out_queued);
    assert_int_equal(h->n_blocked, 0); /* no mark, no report */
    assert_true(mt_flow_arm_blocked(h->f, 64 * 1024));
    assert_int_equal(atomic_load(&h->f->marks.blocked_mark), 0);
    h_write_many(h, 128 * 1024, 32 * 1024, 22);
    h_quiet(h, QUIET_MS);
    assert_int_equal(h->n_blocked, 0);
    /* The peer reads it all: the fd takes output again, and says so. */
    h->peer_reading = true;
    assert_true(h_run(h, peer_rx_all, WAIT_MS));
    assert_int_equal(h_wait_flushed(h, h->out_queued), h->out_queued);
    assert_false(output_full(h));
    assert_int_equal(h->peer_rx_bad, 0);

    /* 2. The mark first, then the fd fills with at least that much
     *    waiting: one BLOCKED. */
    h->peer_reading = false;
    assert_false(mt_flow_arm_blocked(h->f, 64 * 1024));
    assert_int_equal(atomic_load(&h->f->marks.blocked_mark), 64 * 1024);
    h_quiet(h, QUIET_MS);
    assert_int_equal(h->n_blocked, 0);
    /* One chain, handled in one batch: the report can only come from the
     * refusal itself (note_full), not from a later batch's service. */
    mt_msg *first = NULL, *last = NULL;
    for (int i = 0; i < 16; i++) {
        mt_msg *m = h_make_write(h, 32 * 1024, 2300 + (uint32_t)i);
        if (last)
            atomic_store_explicit(&last->node.next, &m->node, memory_order_relaxed);
        else
            first = m;
        last = m;
    }
    assert_true(mt_io_thread_post(g_io, first, last));
    assert_true(h_run(h, blocked_seen, WAIT_MS));
    h_quiet(h, QUIET_MS);
    assert_int_equal(h->n_blocked, 1);
    assert_int_equal(atomic_load(&h->f->marks.blocked_mark), 0);
    assert_true(output_full(h));
    h->peer_reading = true;
    assert_true(h_run(h, peer_rx_all, WAIT_MS));
    assert_int_equal(h_wait_flushed(h, h->out_queued), h->out_queued);

    /* 3. A mark above what waits when the fd fills: nothing yet; more
     *    output behind the full fd reaches it: one BLOCKED. */
    h->peer_reading = false;
    h->n_blocked = 0;
    assert_false(mt_flow_arm_blocked(h->f, 1024 * 1024));
    h_write_many(h, 256 * 1024, 32 * 1024, 24);
    h_wait_full(h, h->out_queued);
    h_quiet(h, QUIET_MS);
    assert_int_equal(h->n_blocked, 0);
    assert_int_equal(atomic_load(&h->f->marks.blocked_mark), 1024 * 1024);
    h_write_many(h, 1024 * 1024, 32 * 1024, 25);
    assert_true(h_run(h, blocked_seen, WAIT_MS));
    h_quiet(h, QUIET_MS);
    assert_int_equal(h->n_blocked, 1);
    assert_int_equal(atomic_load(&h->f->marks.blocked_mark), 0);
    h->peer_reading = true;
    assert_true(h_run(h, peer_rx_all, WAIT_MS));
    assert_int_equal(h->peer_rx_bad, 0);
    assert_int_equal(h->n_write_error, 0);
    h_finish(h);
}

/* ---- control bits under load ------------------------------------------------ */

/* Many signals (READING on and off, CREDIT, empty ones) from the loop
 * while the I/O thread reads and writes, WRITE messages interleaved; then
 * CLOSE (every write out before RELEASED) or ABORT (the rest dropped,
 * counted as flushed).  Everything written reaches the peer in order,
 * everything read arrives in order, RELEASED is always the last
 * completion. */
static void control_round(harness *h, int round, bool abort_it, int *aborted_short)
{
    h_open(h);
    mt_test_rng rng;
    mt_test_rng_seed(&rng, 1000 + (uint64_t)round);
    if (round & 1)
        set_sndbuf(h->fd, 32 * 1024);
    h_set_in(h, 64 * 1024 + (size_t)mt_test_rng_below(&rng, 256 * 1024), (uint32_t)round);
    h->in_chunk = 4096;
    h->peer_reading = true;
    bool reading = false;
    int steps = MT_TEST_SCALE(300, 120);
    for (int s = 0; s < steps; s++) {
        switch (mt_test_rng_below(&rng, 8)) {
        case 0:
        case 1: {
            uint32_t k = 1 + (uint32_t)mt_test_rng_below(&rng, 8);
            mt_msg *first = NULL, *last = NULL;
            for (uint32_t j = 0; j < k; j++) {
                mt_msg *m = h_make_write(h, 1 + (size_t)mt_test_rng_below(&rng, 16384),
                                         (uint32_t)mt_test_rng_next(&rng));
                if (last)
                    atomic_store_explicit(&last->node.next, &m->node, memory_order_relaxed);
                else
                    first = m;
                last = m;
            }
            assert_true(mt_io_thread_post(g_io, first, last));
            break;
        }
        case 2:
        case 3:
            reading = !reading;
            h_reading(h, reading);
            break;
        case 4:
            h_signal(h, MT_FLOW_CREDIT); /* spurious: nothing was starved */
            break;
        case 5:
            h_signal(h, mt_test_rng_below(&rng, 2) ? MT_FLOW_READING | MT_FLOW_CREDIT : 0);
            break;
        case 6:
            h->peer_reading = mt_test_rng_below(&rng, 3) != 0;
            break;
        default:
            h_run(h, never, 0); /* completions, the peer */
        }
        if (s % 16 == 0)
            h_run(h, never, 0);
    }
    /* The last writes go right before the end.  CLOSE: behind a peer that
     * may not be reading yet (RELEASED waits for it).  ABORT: more than
     * the socket holds, behind a peer that does not read: RELEASED must
     * come anyway, the rest dropped. */
    h->peer_reading = abort_it ? false : mt_test_rng_below(&rng, 2);
    h_write_many(h, abort_it ? 1024 * 1024 : 64 * 1024, 16 * 1024, mt_test_rng_next(&rng));
    size_t total = h->out_queued;
    h_signal(h, abort_it ? MT_FLOW_ABORT : MT_FLOW_CLOSE);
    /* More signals after the end: they must change nothing. */
    h_reading(h, true);
    h_signal(h, MT_FLOW_CREDIT);
    if (!abort_it)
        h->peer_reading = true;
    assert_true(h_run(h, released_seen, WAIT_MS));
    h->peer_reading = true;
    assert_int_equal(h->released_err, 0);
    assert_int_equal(h->released_flushed, total); /* sent, or dropped by the abort */
    h_quiet(h, MT_TEST_SCALE(3, 10));
    assert_int_equal(h->after_released, 0);
    assert_int_equal(h->n_write_error, 0);
    assert_int_equal(h->n_read_error, 0);
    assert_int_equal(h->rx_bad, 0); /* in order, a prefix of what the peer sent */
    assert_int_equal(h->n_drained + h->n_blocked + h->n_sendfile + h->n_other, 0);
    if (!abort_it) {
        assert_true(h_run(h, peer_rx_all, WAIT_MS));
        assert_int_equal(h->peer_rx, total);
    } else {
        h_quiet(h, MT_TEST_SCALE(3, 10));
        assert_true(h->peer_rx < total);
        (*aborted_short)++;
    }
    assert_int_equal(h->peer_rx_bad, 0);
    /* The loop lets go: the peer sees the end right after what it got
     * (a reset rather than EOF when the flow left input unread). */
    h->in_len = h->in_sent; /* the peer stops sending */
    h_drop_fd(h);
    assert_true(h_run(h, peer_end_seen, WAIT_MS));
    assert_true(h->peer_err == 0 || h->peer_err == ECONNRESET);
    h->peer_err = 0;
    if (abort_it)
        assert_true(h->peer_rx < total);
    else
        assert_int_equal(h->peer_rx, total);
    assert_int_equal(h->peer_rx_bad, 0);
    h_finish(h);
}

static void test_control_bits_under_load(void **state)
{
    (void)state;
    harness *h = &g_h;
    const int rounds = MT_TEST_SCALE(40, 20);
    int aborted = 0, aborted_short = 0;
    for (int r = 0; r < rounds; r++) {
        bool abort_it = r % 3 == 2;
        aborted += abort_it;
        control_round(h, r, abort_it, &aborted_short);
    }
    print_message("%d flows: %d closed, %d aborted (%d of them with output dropped)\n",
                  rounds, rounds - aborted, aborted, aborted_short);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_drained_handshake_stress),
        cmocka_unit_test_teardown(test_drained_race_pump, h_teardown),
        cmocka_unit_test_teardown(test_blocked, h_teardown),
        cmocka_unit_test_teardown(test_control_bits_under_load, h_teardown),
    };
    return flow_check_threads(cmocka_run_group_tests(tests, flow_setup, flow_teardown));
}
