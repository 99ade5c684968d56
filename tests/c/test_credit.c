/* Unit tests for the credit handshake (src/io_threads/credit.h): a
 * producer (an I/O thread delivering reads or accepts) stops once `used`
 * reaches the limit and a consumer (the loop) restarts it once it has
 * handed enough back.
 *
 * The race test runs the two sides on two threads for many rounds, the way
 * the flow pump and stream_core.c use them: the producer takes credit and
 * then publishes an item (a ring of item sizes stands for the sink), the
 * consumer pops items and returns their credit, and restarts the producer
 * (a semaphore stands for the CREDIT signal) when mt_credit_return says
 * so.  A lost restart leaves the producer waiting with no credit in use:
 * its wait is bounded, and the test fails on the first one. */
#include "test_common.h"

#include "io_threads/credit.h"

#include <pthread.h>
#include <sched.h>
#include <semaphore.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

/* ---- one thread ----------------------------------------------------------- */

static void test_credit_basics(void **state)
{
    (void)state;
    mt_credit c;
    mt_credit_init(&c);
    const int64_t limit = 8;

    /* Available below the limit; the last delivery may overshoot it. */
    for (int i = 0; i < 7; i++) {
        assert_true(mt_credit_available(&c, limit));
        mt_credit_take(&c, 1);
    }
    assert_true(mt_credit_available(&c, limit));
    mt_credit_take(&c, 5);
    assert_int_equal(atomic_load(&c.used), 12);
    assert_false(atomic_load(&c.starved));

    /* Out: marked starved, and stays out. */
    assert_false(mt_credit_available(&c, limit));
    assert_true(atomic_load(&c.starved));
    assert_false(mt_credit_available(&c, limit));

    /* Returns above half the limit restart nothing. */
    assert_false(mt_credit_return(&c, 4, limit)); /* 8 */
    assert_false(mt_credit_return(&c, 4, limit)); /* 4: not below half */
    assert_true(atomic_load(&c.starved));
    /* Below half: this return is the one that restarts. */
    assert_true(mt_credit_return(&c, 1, limit)); /* 3 */
    assert_false(atomic_load(&c.starved));
    assert_false(mt_credit_return(&c, 1, limit)); /* once only */
    assert_int_equal(atomic_load(&c.used), 2);
    assert_true(mt_credit_available(&c, limit));

    /* A producer that never stopped is never restarted. */
    mt_credit_take(&c, 6); /* 8 */
    assert_false(mt_credit_return(&c, 8, limit));
    assert_int_equal(atomic_load(&c.used), 0);

    /* The consumer's return may come before the producer looked: then the
     * producer finds credit and does not stop. */
    mt_credit_take(&c, 8);
    assert_false(mt_credit_return(&c, 8, limit)); /* not starved yet */
    assert_true(mt_credit_available(&c, limit));
    assert_false(atomic_load(&c.starved));

    /* A limit of two: the restart comes when nothing is left. */
    mt_credit_init(&c);
    assert_true(mt_credit_available(&c, 2));
    mt_credit_take(&c, 1);
    assert_true(mt_credit_available(&c, 2));
    mt_credit_take(&c, 1);
    assert_false(mt_credit_available(&c, 2));
    assert_false(mt_credit_return(&c, 1, 2));
    assert_true(mt_credit_return(&c, 1, 2));
    assert_true(mt_credit_available(&c, 2));
}

/* ---- two threads ------------------------------------------------------------ */

#define RING 4096 /* > limit + max item: items ahead never exceed used */
#define LIMIT 64
#define MAX_ITEM 8
#define STALL_MS MT_TEST_SCALE(2000, 10000)

typedef struct race {
    mt_credit c;
    sem_t restart;                  /* the CREDIT signal */
    _Atomic uint64_t head;          /* items published (producer) */
    _Atomic uint64_t tail;          /* items popped (consumer) */
    int64_t size[RING];
    uint64_t total;                 /* items to deliver */
    _Atomic int failed;             /* either side gave up */

    /* Producer's results. */
    uint64_t stops, restarts, stale_restarts, ring_full, over_limit;
    double max_wait;                /* seconds stopped, longest */
    int64_t lost_used;              /* `used` when a restart never came */

    /* Consumer's results. */
    uint64_t returned_items, signals, negative, consumer_stalls;
} race;

static void *producer(void *arg)
{
    race *r = arg;
    mt_test_rng rng;
    mt_test_rng_seed(&rng, 99);
    for (uint64_t i = 0; i < r->total; i++) {
        bool stopped = false;
        double t0 = 0;
        while (!mt_credit_available(&r->c, LIMIT)) {
            /* Stopped until the consumer's restart. */
            if (!stopped) {
                stopped = true;
                r->stops++;
                t0 = mt_test_now();
            } else {
                r->stale_restarts++; /* woken, but still no credit */
            }
            struct timespec ts;
            clock_gettime(CLOCK_REALTIME, &ts);
            ts.tv_sec += STALL_MS / 1000;
            ts.tv_nsec += (long)(STALL_MS % 1000) * 1000000L;
            if (ts.tv_nsec >= 1000000000L) {
                ts.tv_sec++;
                ts.tv_nsec -= 1000000000L;
            }
            int rc;
            while ((rc = sem_timedwait(&r->restart, &ts)) != 0 && errno == EINTR) {
            }
            if (rc != 0) {
                r->lost_used = atomic_load(&r->c.used);
                atomic_store(&r->failed, 1);
                return NULL;
            }
            r->restarts++;
        }
        if (stopped) {
            double w = mt_test_now() - t0;
            if (w > r->max_wait)
                r->max_wait = w;
        }
        int64_t n = 1 + (int64_t)mt_test_rng_below(&rng, MAX_ITEM);
        /* Take, then publish (the flow charges before it emits). */
        mt_credit_take(&r->c, n);
        if (atomic_load_explicit(&r->c.used, memory_order_relaxed) > LIMIT - 1 + MAX_ITEM)
            r->over_limit++;
        uint64_t h = atomic_load_explicit(&r->head, memory_order_relaxed);
        if (h - atomic_load_explicit(&r->tail, memory_order_acquire) >= RING) {
            r->ring_full++;
            atomic_store(&r->failed, 1);
            return NULL;
        }
        r->size[h % RING] = n;
        atomic_store_explicit(&r->head, h + 1, memory_order_release);
        if (mt_test_rng_below(&rng, 256) == 0)
            sched_yield();
    }
    return NULL;
}

/* Pops one item; false when none is there. */
static bool pop(race *r, uint64_t *t, int64_t *n)
{
    if (*t == atomic_load_explicit(&r->head, memory_order_acquire))
        return false;
    *n = r->size[*t % RING];
    atomic_store_explicit(&r->tail, ++*t, memory_order_release);
    r->returned_items++;
    return true;
}

static void give_back(race *r, int64_t n)
{
    if (n == 0)
        return;
    if (mt_credit_return(&r->c, n, LIMIT)) {
        r->signals++;
        sem_post(&r->restart);
    }
    if (atomic_load_explicit(&r->c.used, memory_order_relaxed) < 0)
        r->negative++;
}

/* Alternates two ways of consuming:
 *  - trickle: one return per item (stream_core.c), sometimes a few at
 *    once, with small pauses;
 *  - burst: wait until the producer is at the limit (or stopped short of
 *    it by an earlier burst), then hand everything back in one return,
 *    right when the producer is deciding to stop (its load of `used` and
 *    its store of `starved`): the race the producer's second look is
 *    for. */
static void *consumer(void *arg)
{
    race *r = arg;
    mt_test_rng rng;
    mt_test_rng_seed(&rng, 7);
    uint64_t t = 0;
    int64_t n;
    double idle_since = 0;
    while (t < r->total && !atomic_load(&r->failed)) {
        if (mt_test_rng_below(&rng, 2) == 0) {
            /* Burst. */
            while (atomic_load_explicit(&r->c.used, memory_order_relaxed) < LIMIT &&
                   !atomic_load_explicit(&r->c.starved, memory_order_relaxed) &&
                   atomic_load_explicit(&r->head, memory_order_acquire) < r->total &&
                   !atomic_load(&r->failed)) {
            }
            int64_t sum = 0;
            while (pop(r, &t, &n))
                sum += n;
            give_back(r, sum);
            continue;
        }
        /* Trickle. */
        uint64_t items = 1 + mt_test_rng_below(&rng, 200);
        int64_t batch = 0;
        for (uint64_t k = 0; k < items && t < r->total && !atomic_load(&r->failed);) {
            if (!pop(r, &t, &n)) {
                /* Nothing new: hand back what is held, then wait. */
                give_back(r, batch);
                batch = 0;
                if (idle_since == 0)
                    idle_since = mt_test_now();
                else if (mt_test_now() - idle_since > 2.0 * STALL_MS / 1000.0) {
                    r->consumer_stalls++;
                    atomic_store(&r->failed, 1);
                }
                sched_yield();
                continue;
            }
            idle_since = 0;
            k++;
            batch += n;
            if (mt_test_rng_below(&rng, 4) != 0) {
                give_back(r, batch);
                batch = 0;
            }
            uint64_t d = mt_test_rng_below(&rng, 64);
            if (d == 0)
                sched_yield();
            else if (d == 1)
                for (volatile int spin = 0; spin < 200; spin = spin + 1) {
                }
        }
        give_back(r, batch);
    }
    return NULL;
}

static void test_credit_race(void **state)
{
    (void)state;
    race *r = calloc(1, sizeof(*r));
    assert_non_null(r);
    mt_credit_init(&r->c);
    assert_int_equal(sem_init(&r->restart, 0, 0), 0);
    r->total = MT_TEST_SCALE(2000000, 500000);
    double t0 = mt_test_now();
    pthread_t pt, ct;
    assert_int_equal(pthread_create(&pt, NULL, producer, r), 0);
    assert_int_equal(pthread_create(&ct, NULL, consumer, r), 0);
    pthread_join(pt, NULL);
    pthread_join(ct, NULL);
    double secs = mt_test_now() - t0;
    int stale = 0;
    while (sem_trywait(&r->restart) == 0)
        stale++;
    print_message("%llu items in %.2f s: %llu stops, %llu restarts (%llu signals, %llu "
                  "woken still without credit, %d left over), longest stop %.3f ms\n",
                  (unsigned long long)r->total, secs, (unsigned long long)r->stops,
                  (unsigned long long)r->restarts, (unsigned long long)r->signals,
                  (unsigned long long)r->stale_restarts, stale, r->max_wait * 1e3);
    if (atomic_load(&r->failed))
        fail_msg("gave up: lost restart (producer stopped with used=%lld, %llu of %llu "
                 "items consumed), ring full %llu, consumer stalls %llu",
                 (long long)r->lost_used, (unsigned long long)r->returned_items,
                 (unsigned long long)r->total, (unsigned long long)r->ring_full,
                 (unsigned long long)r->consumer_stalls);
    assert_int_equal(r->returned_items, r->total);
    assert_int_equal(r->over_limit, 0);
    assert_int_equal(r->negative, 0);
    assert_int_equal(atomic_load(&r->c.used), 0);
    assert_true(r->stops > 0); /* the handshake did run */
    /* Every restart answered a stop or a stop that fixed itself (the
     * consumer took the flag while the producer found credit again). */
    assert_true(r->signals >= r->stops);
    assert_int_equal(r->signals, r->restarts + (uint64_t)stale);
    /* Bounded: a restart that came only by the timeout would have failed
     * above; the slowest real one is far below it. */
    assert_true(r->max_wait < STALL_MS / 1000.0);
    sem_destroy(&r->restart);
    free(r);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_credit_basics),
        cmocka_unit_test(test_credit_race),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
