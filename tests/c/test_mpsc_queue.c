/* Unit tests for the intrusive MPSC queue (src/io_threads/mpsc_queue.h). */
#include "test_common.h"

#include "io_threads/mpsc_queue.h"

#include <pthread.h>
#include <sched.h>
#include <stdlib.h>

/* The node sits in the middle of the record, so MT_CONTAINER_OF has to
 * subtract a real offset. */
typedef struct item {
    uint64_t seq;
    mt_mpsc_node node;
    uint32_t producer;
    uint32_t canary;
} item;

#define CANARY 0xA5A5F00Du

static item *pop_item(mt_mpsc_queue *q)
{
    mt_mpsc_node *n = mt_mpsc_queue_pop(q);
    return n ? MT_CONTAINER_OF(n, item, node) : NULL;
}

static void test_empty(void **state)
{
    (void)state;
    mt_mpsc_queue q;
    mt_mpsc_queue_init(&q);
    assert_true(mt_mpsc_queue_is_empty(&q));
    assert_null(mt_mpsc_queue_pop(&q));
    assert_null(mt_mpsc_queue_pop(&q));
    assert_true(mt_mpsc_queue_is_empty(&q));
}

static void test_container_of(void **state)
{
    (void)state;
    item it;
    assert_ptr_equal(MT_CONTAINER_OF(&it.node, item, node), &it);
    assert_true(offsetof(item, node) != 0);
}

static void test_single_thread_fifo(void **state)
{
    (void)state;
    enum { N = 1000 };
    static item items[N];
    mt_mpsc_queue q;
    mt_mpsc_queue_init(&q);
    for (int round = 0; round < 3; round++) {
        for (uint64_t i = 0; i < N; i++) {
            items[i] = (item){.seq = i, .canary = CANARY};
            mt_mpsc_queue_push(&q, &items[i].node);
            assert_false(mt_mpsc_queue_is_empty(&q));
        }
        for (uint64_t i = 0; i < N; i++) {
            assert_false(mt_mpsc_queue_is_empty(&q));
            item *it = pop_item(&q);
            assert_ptr_equal(it, &items[i]);
            assert_int_equal(it->seq, i);
            assert_int_equal(it->canary, CANARY);
        }
        assert_true(mt_mpsc_queue_is_empty(&q));
        assert_null(mt_mpsc_queue_pop(&q));
    }
    /* One at a time: each pop empties the queue (the stub re-push path). */
    for (uint64_t i = 0; i < 100; i++) {
        items[i].seq = 1000 + i;
        mt_mpsc_queue_push(&q, &items[i].node);
        assert_false(mt_mpsc_queue_is_empty(&q));
        assert_ptr_equal(pop_item(&q), &items[i]);
        assert_true(mt_mpsc_queue_is_empty(&q));
        assert_null(mt_mpsc_queue_pop(&q));
    }
    /* Two at a time, popping one before pushing the next. */
    mt_mpsc_queue_push(&q, &items[0].node);
    for (int i = 1; i < 100; i++) {
        mt_mpsc_queue_push(&q, &items[i].node);
        assert_ptr_equal(pop_item(&q), &items[i - 1]);
        assert_false(mt_mpsc_queue_is_empty(&q));
    }
    assert_ptr_equal(pop_item(&q), &items[99]);
    assert_true(mt_mpsc_queue_is_empty(&q));
    /* A node popped can be pushed again right away. */
    mt_mpsc_queue_push(&q, &items[5].node);
    mt_mpsc_queue_push(&q, &items[6].node);
    item *it = pop_item(&q);
    assert_ptr_equal(it, &items[5]);
    mt_mpsc_queue_push(&q, &it->node);
    assert_ptr_equal(pop_item(&q), &items[6]);
    assert_ptr_equal(pop_item(&q), &items[5]);
    assert_null(pop_item(&q));
    assert_true(mt_mpsc_queue_is_empty(&q));
}

static void link_chain(item *its, size_t n)
{
    for (size_t i = 0; i + 1 < n; i++)
        atomic_store_explicit(&its[i].node.next, &its[i + 1].node, memory_order_relaxed);
}

static void test_push_chain(void **state)
{
    (void)state;
    item before = {.seq = 100}, after = {.seq = 200};
    item chain[5], single[1];
    for (int i = 0; i < 5; i++)
        chain[i] = (item){.seq = (uint64_t)i};
    single[0] = (item){.seq = 50};
    /* Garbage in the last node's next must be cleared by push_chain. */
    atomic_store_explicit(&chain[4].node.next, &before.node, memory_order_relaxed);
    atomic_store_explicit(&single[0].node.next, &after.node, memory_order_relaxed);
    link_chain(chain, 5);

    mt_mpsc_queue q;
    mt_mpsc_queue_init(&q);
    /* Chain into an empty queue. */
    mt_mpsc_queue_push_chain(&q, &chain[0].node, &chain[4].node);
    assert_false(mt_mpsc_queue_is_empty(&q));
    for (int i = 0; i < 5; i++)
        assert_ptr_equal(pop_item(&q), &chain[i]);
    assert_null(pop_item(&q));
    assert_true(mt_mpsc_queue_is_empty(&q));

    /* Between single pushes, and a one-node chain. */
    link_chain(chain, 5);
    mt_mpsc_queue_push(&q, &before.node);
    mt_mpsc_queue_push_chain(&q, &chain[0].node, &chain[4].node);
    mt_mpsc_queue_push_chain(&q, &single[0].node, &single[0].node);
    mt_mpsc_queue_push(&q, &after.node);
    assert_ptr_equal(pop_item(&q), &before);
    for (int i = 0; i < 5; i++)
        assert_ptr_equal(pop_item(&q), &chain[i]);
    assert_ptr_equal(pop_item(&q), &single[0]);
    assert_ptr_equal(pop_item(&q), &after);
    assert_null(pop_item(&q));
    assert_true(mt_mpsc_queue_is_empty(&q));

    /* Chain pushed while the consumer is half-way through the queue. */
    mt_mpsc_queue_push(&q, &before.node);
    mt_mpsc_queue_push(&q, &after.node);
    assert_ptr_equal(pop_item(&q), &before);
    link_chain(chain, 5);
    mt_mpsc_queue_push_chain(&q, &chain[0].node, &chain[4].node);
    assert_ptr_equal(pop_item(&q), &after);
    for (int i = 0; i < 5; i++)
        assert_ptr_equal(pop_item(&q), &chain[i]);
    assert_null(pop_item(&q));
    assert_true(mt_mpsc_queue_is_empty(&q));
}

/* The two halves of a push, done by hand, to reach the "producer half-way"
 * state deterministically: head swapped but previous node not linked yet. */
static mt_mpsc_node *half_push(mt_mpsc_queue *q, mt_mpsc_node *n)
{
    atomic_store_explicit(&n->next, NULL, memory_order_relaxed);
    return atomic_exchange_explicit(&q->head, n, memory_order_acq_rel);
}

static void finish_push(mt_mpsc_node *prev, mt_mpsc_node *n)
{
    atomic_store_explicit(&prev->next, n, memory_order_release);
}

static void test_is_empty_semantics(void **state)
{
    (void)state;
    item a = {.seq = 1}, b = {.seq = 2};
    mt_mpsc_queue q;
    mt_mpsc_queue_init(&q);
    assert_true(mt_mpsc_queue_is_empty(&q));

    /* Push in flight into an empty queue: pop sees nothing, but the queue
     * is not empty (the consumer must come back, not sleep). */
    mt_mpsc_node *prev = half_push(&q, &a.node);
    assert_null(mt_mpsc_queue_pop(&q));
    assert_false(mt_mpsc_queue_is_empty(&q));
    assert_null(mt_mpsc_queue_pop(&q));
    assert_false(mt_mpsc_queue_is_empty(&q));
    finish_push(prev, &a.node);
    assert_false(mt_mpsc_queue_is_empty(&q));
    assert_ptr_equal(pop_item(&q), &a);
    assert_true(mt_mpsc_queue_is_empty(&q));

    /* Push in flight behind a queued node: the queued node can only come
     * out once the in-flight one is linked (that is the design), and the
     * queue never reads as empty meanwhile. */
    mt_mpsc_queue_push(&q, &a.node);
    prev = half_push(&q, &b.node);
    assert_ptr_equal(prev, &a.node);
    assert_null(mt_mpsc_queue_pop(&q));
    assert_false(mt_mpsc_queue_is_empty(&q));
    finish_push(prev, &b.node);
    assert_ptr_equal(pop_item(&q), &a);
    assert_false(mt_mpsc_queue_is_empty(&q));
    assert_ptr_equal(pop_item(&q), &b);
    assert_true(mt_mpsc_queue_is_empty(&q));
    assert_null(mt_mpsc_queue_pop(&q));

    /* Not empty while exactly one node remains. */
    mt_mpsc_queue_push(&q, &a.node);
    mt_mpsc_queue_push(&q, &b.node);
    assert_ptr_equal(pop_item(&q), &a);
    assert_false(mt_mpsc_queue_is_empty(&q));
    assert_ptr_equal(pop_item(&q), &b);
    assert_true(mt_mpsc_queue_is_empty(&q));
}

/* ---- concurrency ---- */

enum { NPRODUCERS = 4 };
#define PER_PRODUCER ((uint64_t)MT_TEST_SCALE(200000, 50000))
#define DEADLINE_S 60.0

typedef struct producer_arg {
    mt_mpsc_queue *q;
    item *items;
    uint32_t id;
    pthread_barrier_t *start;
} producer_arg;

static void *producer_main(void *p)
{
    producer_arg *a = p;
    mt_test_rng rng;
    mt_test_rng_seed(&rng, 1000 + a->id);
    for (uint64_t i = 0; i < PER_PRODUCER; i++)
        a->items[i] = (item){.seq = i, .producer = a->id, .canary = CANARY};
    pthread_barrier_wait(a->start);
    if (a->id % 2 == 0) {
        for (uint64_t i = 0; i < PER_PRODUCER; i++) {
            mt_mpsc_queue_push(a->q, &a->items[i].node);
            /* Now and then let another producer in, to mix the streams. */
            if ((i & 4095) == 4095)
                sched_yield();
        }
    } else {
        /* Odd producers push chains of 1..8 nodes. */
        uint64_t i = 0;
        while (i < PER_PRODUCER) {
            uint64_t n = 1 + mt_test_rng_below(&rng, 8);
            if (n > PER_PRODUCER - i)
                n = PER_PRODUCER - i;
            for (uint64_t k = 0; k + 1 < n; k++)
                atomic_store_explicit(&a->items[i + k].node.next, &a->items[i + k + 1].node,
                                      memory_order_relaxed);
            mt_mpsc_queue_push_chain(a->q, &a->items[i].node, &a->items[i + n - 1].node);
            i += n;
        }
    }
    return NULL;
}

static void test_concurrent_producers(void **state)
{
    (void)state;
    mt_mpsc_queue q;
    mt_mpsc_queue_init(&q);
    pthread_barrier_t start;
    assert_int_equal(pthread_barrier_init(&start, NULL, NPRODUCERS + 1), 0);
    producer_arg args[NPRODUCERS];
    pthread_t threads[NPRODUCERS];
    for (uint32_t p = 0; p < NPRODUCERS; p++) {
        args[p] = (producer_arg){.q = &q, .id = p, .start = &start,
                                 .items = calloc(PER_PRODUCER, sizeof(item))};
        assert_non_null(args[p].items);
    }
    for (uint32_t p = 0; p < NPRODUCERS; p++)
        assert_int_equal(pthread_create(&threads[p], NULL, producer_main, &args[p]), 0);

    uint64_t next_seq[NPRODUCERS] = {0};
    const uint64_t total = PER_PRODUCER * NPRODUCERS;
    uint64_t received = 0, bad_order = 0, bad_record = 0, null_not_empty = 0;
    int timed_out = 0;
    pthread_barrier_wait(&start);
    double deadline = mt_test_now() + DEADLINE_S;
    unsigned spins = 0;
    while (received < total) {
        mt_mpsc_node *n = mt_mpsc_queue_pop(&q);
        if (n == NULL) {
            if (!mt_mpsc_queue_is_empty(&q))
                null_not_empty++;
            sched_yield();
            if (++spins % 1024 == 0 && mt_test_now() > deadline) {
                timed_out = 1;
                break;
            }
            continue;
        }
        item *it = MT_CONTAINER_OF(n, item, node);
        if (it->canary != CANARY || it->producer >= NPRODUCERS) {
            bad_record++;
            received++;
            continue;
        }
        /* Strictly consecutive per producer: exactly once and in order. */
        if (it->seq != next_seq[it->producer])
            bad_order++;
        next_seq[it->producer] = it->seq + 1;
        received++;
    }
    for (uint32_t p = 0; p < NPRODUCERS; p++)
        pthread_join(threads[p], NULL);
    pthread_barrier_destroy(&start);

    /* Nothing extra after all producers are done. */
    int extra = mt_mpsc_queue_pop(&q) != NULL;
    int empty = mt_mpsc_queue_is_empty(&q);
    for (uint32_t p = 0; p < NPRODUCERS; p++)
        free(args[p].items);

    if (timed_out)
        fail_msg("consumer gave up after %.0f s with %llu of %llu nodes", DEADLINE_S,
                 (unsigned long long)received, (unsigned long long)total);
    print_message("popped %llu nodes; pop returned NULL on a non-empty queue %llu times\n",
                  (unsigned long long)received, (unsigned long long)null_not_empty);
    assert_int_equal(bad_record, 0);
    assert_int_equal(bad_order, 0);
    assert_int_equal(received, total);
    for (uint32_t p = 0; p < NPRODUCERS; p++)
        assert_int_equal(next_seq[p], PER_PRODUCER);
    assert_false(extra);
    assert_true(empty);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_empty),
        cmocka_unit_test(test_container_of),
        cmocka_unit_test(test_single_thread_fifo),
        cmocka_unit_test(test_push_chain),
        cmocka_unit_test(test_is_empty_semantics),
        cmocka_unit_test(test_concurrent_producers),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
