/* Unit tests for the wake-only-a-sleeper protocol (src/io_threads/waker.h),
 * used together with the MPSC queue as the I/O threads use it. */
#include "test_common.h"

#include "io_threads/mpsc_queue.h"
#include "io_threads/waker.h"

#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <unistd.h>

static int fd_readable(int fd)
{
    struct pollfd pfd = {.fd = fd, .events = POLLIN};
    int r;
    do {
        r = poll(&pfd, 1, 0);
    } while (r < 0 && errno == EINTR);
    return r > 0 && (pfd.revents & POLLIN);
}

static int state_of(mt_waker *w)
{
    return atomic_load(&w->state);
}

static uint64_t sent_of(mt_waker *w)
{
    return atomic_load(&w->wakeups_sent);
}

static uint64_t received_of(mt_waker *w)
{
    return atomic_load(&w->wakeups_received);
}

static void test_init_close(void **state)
{
    (void)state;
    mt_waker w;
    assert_int_equal(mt_waker_init(&w), 0);
    assert_true(w.fd >= 0);
    assert_int_equal(state_of(&w), MT_WAKER_RUNNING);
    assert_int_equal(sent_of(&w), 0);
    assert_int_equal(received_of(&w), 0);
    assert_false(fd_readable(w.fd));
    /* Draining an empty eventfd neither blocks nor counts. */
    mt_waker_drain(&w);
    assert_int_equal(received_of(&w), 0);
    mt_waker_close(&w);
    assert_int_equal(w.fd, -1);
    mt_waker_close(&w); /* idempotent */
    assert_int_equal(w.fd, -1);
}

static void test_notify_running_does_not_write(void **state)
{
    (void)state;
    mt_waker w;
    assert_int_equal(mt_waker_init(&w), 0);
    for (int i = 0; i < 10; i++) {
        assert_false(mt_waker_notify(&w));
        assert_int_equal(state_of(&w), MT_WAKER_RUNNING);
    }
    assert_int_equal(sent_of(&w), 0);
    assert_false(fd_readable(w.fd));

    /* prepare_sleep followed by awake (queue found non-empty) also leaves
     * the consumer RUNNING: producers must not write then either. */
    mt_waker_prepare_sleep(&w);
    assert_int_equal(state_of(&w), MT_WAKER_SLEEPING);
    mt_waker_awake(&w);
    assert_int_equal(state_of(&w), MT_WAKER_RUNNING);
    assert_false(mt_waker_notify(&w));
    assert_int_equal(state_of(&w), MT_WAKER_RUNNING);
    assert_int_equal(sent_of(&w), 0);
    assert_false(fd_readable(w.fd));
    mt_waker_close(&w);
}

static void test_notify_sleeping_writes_once(void **state)
{
    (void)state;
    mt_waker w;
    assert_int_equal(mt_waker_init(&w), 0);
    for (uint64_t round = 1; round <= 3; round++) {
        mt_waker_prepare_sleep(&w);
        assert_int_equal(state_of(&w), MT_WAKER_SLEEPING);
        assert_false(fd_readable(w.fd));
        assert_true(mt_waker_notify(&w));
        assert_int_equal(state_of(&w), MT_WAKER_NOTIFIED);
        assert_int_equal(sent_of(&w), round);
        assert_true(fd_readable(w.fd));
        /* Later producers in the same burst do nothing. */
        assert_false(mt_waker_notify(&w));
        assert_false(mt_waker_notify(&w));
        assert_int_equal(state_of(&w), MT_WAKER_NOTIFIED);
        assert_int_equal(sent_of(&w), round);
        /* The eventfd holds exactly one write. */
        uint64_t count = 0;
        assert_int_equal(read(w.fd, &count, sizeof(count)), (ssize_t)sizeof(count));
        assert_int_equal(count, 1);
        assert_false(fd_readable(w.fd));
        mt_waker_awake(&w);
        assert_int_equal(state_of(&w), MT_WAKER_RUNNING);
        assert_false(mt_waker_notify(&w));
        assert_int_equal(sent_of(&w), round);
    }
    /* drain() consumes the count and records it. */
    mt_waker_prepare_sleep(&w);
    assert_true(mt_waker_notify(&w));
    assert_true(fd_readable(w.fd));
    mt_waker_drain(&w);
    assert_int_equal(received_of(&w), 1);
    assert_false(fd_readable(w.fd));
    mt_waker_drain(&w);
    assert_int_equal(received_of(&w), 1);
    mt_waker_awake(&w);
    assert_int_equal(sent_of(&w), 4);
    mt_waker_close(&w);
}

/* Many producers racing to notify one sleeping consumer: exactly one of
 * them writes. */
enum { RACERS = 4 };

typedef struct racer_arg {
    mt_waker *w;
    pthread_barrier_t *go;
    pthread_barrier_t *done;
    int rounds;
    _Atomic int wins;
} racer_arg;

static void *racer_main(void *p)
{
    racer_arg *a = p;
    for (int r = 0; r < a->rounds; r++) {
        pthread_barrier_wait(a->go);
        if (mt_waker_notify(a->w))
            atomic_fetch_add(&a->wins, 1);
        pthread_barrier_wait(a->done);
    }
    return NULL;
}

static void test_concurrent_notify_writes_once(void **state)
{
    (void)state;
    const int rounds = MT_TEST_SCALE(300, 100);
    mt_waker w;
    assert_int_equal(mt_waker_init(&w), 0);
    pthread_barrier_t go, done;
    assert_int_equal(pthread_barrier_init(&go, NULL, RACERS + 1), 0);
    assert_int_equal(pthread_barrier_init(&done, NULL, RACERS + 1), 0);
    racer_arg args[RACERS];
    pthread_t threads[RACERS];
    for (int i = 0; i < RACERS; i++) {
        args[i] = (racer_arg){.w = &w, .go = &go, .done = &done, .rounds = rounds};
        atomic_init(&args[i].wins, 0);
        assert_int_equal(pthread_create(&threads[i], NULL, racer_main, &args[i]), 0);
    }
    int bad_rounds = 0, unreadable = 0;
    for (int r = 0; r < rounds; r++) {
        mt_waker_prepare_sleep(&w);
        pthread_barrier_wait(&go);
        pthread_barrier_wait(&done);
        if (!fd_readable(w.fd))
            unreadable++;
        uint64_t count = 0;
        if (read(w.fd, &count, sizeof(count)) != (ssize_t)sizeof(count) || count != 1)
            bad_rounds++;
        mt_waker_awake(&w);
    }
    int wins = 0;
    for (int i = 0; i < RACERS; i++) {
        pthread_join(threads[i], NULL);
        wins += atomic_load(&args[i].wins);
    }
    pthread_barrier_destroy(&go);
    pthread_barrier_destroy(&done);
    assert_int_equal(unreadable, 0);
    assert_int_equal(bad_rounds, 0);
    assert_int_equal(wins, rounds);
    assert_int_equal(sent_of(&w), (uint64_t)rounds);
    mt_waker_close(&w);
}

/* ---- the full protocol with a consumer thread ---- */

typedef struct msg {
    mt_mpsc_node node;
    uint32_t producer;
    uint32_t seq;
} msg;

#define BLOCK_TIMEOUT_MS 5000 /* a block this long means a lost wakeup */

typedef struct shared {
    mt_waker w;
    mt_mpsc_queue q;
    uint64_t total;       /* messages the consumer waits for */
    int nproducers;
    /* Consumer results (read after join). */
    uint64_t received;
    uint64_t bad;         /* duplicate, out-of-order or unknown messages */
    uint64_t blocks;      /* polls that returned readable */
    uint64_t timeouts;    /* polls that timed out: lost wakeups */
    uint64_t aborted_checks; /* prepare_sleep followed by a non-empty queue */
    uint64_t *next_seq;   /* per producer */
    /* Per-producer count of messages consumed, published for producers
     * that wait for their messages to be handled (at most 8 producers). */
    _Atomic uint64_t consumed[8];
    /* Ping-pong handshake: the consumer publishes the round it is about to
     * block in (after its re-check found the queue empty). */
    _Atomic uint64_t blocking_round;
} shared;

/* Drains the queue; returns when pop gives NULL and the queue is empty, or
 * (yielding) retries while a push is in flight. */
static void consume_all(shared *s)
{
    for (;;) {
        mt_mpsc_node *n = mt_mpsc_queue_pop(&s->q);
        if (n == NULL) {
            if (mt_mpsc_queue_is_empty(&s->q))
                return;
            sched_yield();
            continue;
        }
        msg *m = MT_CONTAINER_OF(n, msg, node);
        if (m->producer >= (uint32_t)s->nproducers || m->seq != s->next_seq[m->producer])
            s->bad++;
        else
            atomic_store_explicit(&s->consumed[m->producer], ++s->next_seq[m->producer],
                                  memory_order_release);
        s->received++;
    }
}

static void *consumer_main(void *p)
{
    shared *s = p;
    int timeout_ms = BLOCK_TIMEOUT_MS;
    uint64_t round = 0;
    for (;;) {
        consume_all(s);
        if (s->received >= s->total)
            break;
        mt_waker_prepare_sleep(&s->w);
        if (!mt_mpsc_queue_is_empty(&s->q)) {
            s->aborted_checks++;
            mt_waker_awake(&s->w);
            continue;
        }
        atomic_store(&s->blocking_round, ++round);
        struct pollfd pfd = {.fd = s->w.fd, .events = POLLIN};
        int r = poll(&pfd, 1, timeout_ms);
        if (r < 0 && errno == EINTR)
            continue; /* still SLEEPING: block again after a re-check */
        if (r == 0) {
            /* Lost wakeup.  Keep going with short polls so the test ends
             * and reports it instead of stalling. */
            s->timeouts++;
            timeout_ms = 10;
        } else if (r > 0) {
            s->blocks++;
        }
        mt_waker_drain(&s->w);
        mt_waker_awake(&s->w);
    }
    return NULL;
}

static void shared_init(shared *s, int nproducers, uint64_t total)
{
    *s = (shared){.nproducers = nproducers, .total = total};
    assert_int_equal(mt_waker_init(&s->w), 0);
    mt_mpsc_queue_init(&s->q);
    atomic_init(&s->blocking_round, 0);
    assert_true(nproducers <= 8);
    for (int i = 0; i < 8; i++)
        atomic_init(&s->consumed[i], 0);
    s->next_seq = calloc((size_t)nproducers, sizeof(uint64_t));
    assert_non_null(s->next_seq);
}

static void shared_free(shared *s)
{
    mt_waker_close(&s->w);
    free(s->next_seq);
}

/* Deterministic block/wake cycles: the producer waits until the consumer
 * has found the queue empty and is about to block, then pushes and
 * notifies.  The consumer is SLEEPING, so notify must write every time, and
 * the consumer must wake up from poll every time. */
static void test_ping_pong_wakes_sleeper(void **state)
{
    (void)state;
    const uint32_t rounds = MT_TEST_SCALE(2000, 1000);
    shared s;
    shared_init(&s, 1, rounds);
    msg *msgs = calloc(rounds, sizeof(*msgs));
    assert_non_null(msgs);
    pthread_t consumer;
    assert_int_equal(pthread_create(&consumer, NULL, consumer_main, &s), 0);
    uint32_t notified = 0, sent_msgs = 0;
    int gave_up = 0;
    double deadline = mt_test_now() + 60.0;
    for (uint32_t i = 0; i < rounds; i++) {
        /* Wait until the consumer is past its re-check for round i+1. */
        while (!gave_up && atomic_load(&s.blocking_round) < (uint64_t)i + 1) {
            sched_yield();
            if (mt_test_now() > deadline)
                gave_up = 1;
        }
        msgs[i] = (msg){.producer = 0, .seq = i};
        mt_mpsc_queue_push(&s.q, &msgs[i].node);
        notified += mt_waker_notify(&s.w);
        sent_msgs++;
    }
    /* (After giving up the rest is pushed at once so the consumer ends.) */
    pthread_join(consumer, NULL);
    free(msgs);
    if (gave_up)
        fail_msg("consumer did not reach its next block within 60 s");
    assert_int_equal(sent_msgs, rounds);
    print_message("rounds %u: notify wrote %u, consumer woke from poll %llu times\n",
                  rounds, notified, (unsigned long long)s.blocks);
    assert_int_equal(s.timeouts, 0);
    assert_int_equal(s.bad, 0);
    assert_int_equal(s.received, rounds);
    assert_int_equal(notified, rounds);
    assert_int_equal(sent_of(&s.w), rounds);
    /* Every wakeup is consumed (one eventfd read per write here). */
    assert_int_equal(received_of(&s.w), rounds);
    assert_int_equal(s.blocks, rounds);
    shared_free(&s);
}

/* Several producers pushing with irregular pauses while the consumer runs
 * the full drain / prepare_sleep / re-check / block / drain / awake loop. */
enum { NPRODUCERS = 3 };

typedef struct wprod_arg {
    shared *s;
    msg *msgs;
    uint32_t id;
    uint32_t count;
    pthread_barrier_t *start;
    uint64_t wrote; /* notifies that returned true */
    int stalled;    /* gave up waiting for the consumer */
} wprod_arg;

static void *wproducer_main(void *p)
{
    wprod_arg *a = p;
    mt_test_rng rng;
    mt_test_rng_seed(&rng, 99 + a->id);
    for (uint32_t i = 0; i < a->count; i++)
        a->msgs[i] = (msg){.producer = a->id, .seq = i};
    pthread_barrier_wait(a->start);
    for (uint32_t i = 0; i < a->count; i++) {
        mt_mpsc_queue_push(&a->s->q, &a->msgs[i].node);
        if (mt_waker_notify(&a->s->w))
            a->wrote++;
        /* Bursts and pauses of various lengths so that the consumer both
         * keeps running and goes to sleep often. */
        uint64_t r = mt_test_rng_below(&rng, 64);
        if (r == 0) {
            mt_test_sleep_us(50 + (long)mt_test_rng_below(&rng, 200));
        } else if (r == 1 && !a->stalled) {
            /* Wait until the consumer has handled everything we pushed.
             * When all producers wait at once, nobody else can rescue a
             * lost wakeup: the consumer then hits its poll timeout. */
            double deadline = mt_test_now() + 30.0;
            while (atomic_load_explicit(&a->s->consumed[a->id], memory_order_acquire) < i + 1) {
                mt_test_sleep_us(20);
                if (mt_test_now() > deadline) {
                    a->stalled = 1;
                    break;
                }
            }
        } else if (r < 5) {
            sched_yield();
        }
    }
    return NULL;
}

static void test_concurrent_no_lost_wakeup(void **state)
{
    (void)state;
    const uint32_t per_producer = MT_TEST_SCALE(40000, 12000);
    const uint64_t total = (uint64_t)per_producer * NPRODUCERS;
    shared s;
    shared_init(&s, NPRODUCERS, total);
    pthread_barrier_t start;
    assert_int_equal(pthread_barrier_init(&start, NULL, NPRODUCERS), 0);
    wprod_arg args[NPRODUCERS];
    pthread_t producers[NPRODUCERS], consumer;
    for (uint32_t p = 0; p < NPRODUCERS; p++) {
        args[p] = (wprod_arg){.s = &s, .id = p, .count = per_producer, .start = &start,
                              .msgs = calloc(per_producer, sizeof(msg))};
        assert_non_null(args[p].msgs);
    }
    assert_int_equal(pthread_create(&consumer, NULL, consumer_main, &s), 0);
    for (uint32_t p = 0; p < NPRODUCERS; p++)
        assert_int_equal(pthread_create(&producers[p], NULL, wproducer_main, &args[p]), 0);
    uint64_t wrote = 0;
    for (uint32_t p = 0; p < NPRODUCERS; p++) {
        pthread_join(producers[p], NULL);
        wrote += args[p].wrote;
    }
    /* The consumer ends once it has every message (each lost wakeup costs
     * it BLOCK_TIMEOUT_MS, then it polls in short steps). */
    pthread_join(consumer, NULL);
    pthread_barrier_destroy(&start);
    for (uint32_t p = 0; p < NPRODUCERS; p++)
        free(args[p].msgs);

    uint64_t sent = sent_of(&s.w), recvd = received_of(&s.w);
    print_message("%llu messages: %llu eventfd writes, %llu reads, %llu blocks, "
                  "%llu re-checks found work\n",
                  (unsigned long long)total, (unsigned long long)sent,
                  (unsigned long long)recvd, (unsigned long long)s.blocks,
                  (unsigned long long)s.aborted_checks);
    assert_int_equal(s.timeouts, 0);
    assert_int_equal(s.bad, 0);
    assert_int_equal(s.received, total);
    for (uint32_t p = 0; p < NPRODUCERS; p++)
        assert_false(args[p].stalled);
    for (uint32_t p = 0; p < NPRODUCERS; p++)
        assert_int_equal(s.next_seq[p], per_producer);
    assert_true(mt_mpsc_queue_is_empty(&s.q));
    assert_int_equal(sent, wrote);
    assert_true(sent <= total);
    assert_true(recvd <= sent);
    shared_free(&s);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_init_close),
        cmocka_unit_test(test_notify_running_does_not_write),
        cmocka_unit_test(test_notify_sleeping_writes_once),
        cmocka_unit_test(test_concurrent_notify_writes_once),
        cmocka_unit_test(test_ping_pong_wakes_sleeper),
        cmocka_unit_test(test_concurrent_no_lost_wakeup),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
