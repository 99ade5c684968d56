/* Unit tests for the loop's ready queue (src/loop/ready_queue.h). */
#include "test_common.h"

#include "loop/ready_queue.h"

#include <stdlib.h>

/* Items are encoded integers (never NULL, which pop uses for "empty"). */
#define ITEM(n) ((void *)(uintptr_t)((n) + 1))
#define ITEM_ID(p) ((uintptr_t)(p) - 1)

static size_t capacity(const mt_ready_queue *q)
{
    return q->items ? q->mask + 1 : 0;
}

static void test_empty(void **state)
{
    (void)state;
    mt_ready_queue q;
    mt_ready_queue_init(&q);
    assert_int_equal(mt_ready_queue_len(&q), 0);
    assert_null(mt_ready_queue_pop(&q));
    assert_null(mt_ready_queue_pop(&q));
    assert_null(mt_ready_queue_peek(&q, 0));
    assert_int_equal(mt_ready_queue_len(&q), 0);
    /* Freeing a never-used queue is fine, and so is freeing it twice. */
    mt_ready_queue_free(&q);
    mt_ready_queue_free(&q);
    assert_int_equal(mt_ready_queue_len(&q), 0);
    assert_null(mt_ready_queue_pop(&q));
}

static void test_fifo_order(void **state)
{
    (void)state;
    mt_ready_queue q;
    mt_ready_queue_init(&q);
    for (uintptr_t i = 0; i < 10; i++) {
        assert_int_equal(mt_ready_queue_push(&q, ITEM(i)), 0);
        assert_int_equal(mt_ready_queue_len(&q), i + 1);
    }
    for (uintptr_t i = 0; i < 10; i++) {
        void *p = mt_ready_queue_pop(&q);
        assert_non_null(p);
        assert_int_equal(ITEM_ID(p), i);
        assert_int_equal(mt_ready_queue_len(&q), 9 - i);
    }
    assert_null(mt_ready_queue_pop(&q));
    /* Reusable after being emptied. */
    assert_int_equal(mt_ready_queue_push(&q, ITEM(42)), 0);
    assert_int_equal(ITEM_ID(mt_ready_queue_pop(&q)), 42);
    assert_null(mt_ready_queue_pop(&q));
    mt_ready_queue_free(&q);
}

static void test_peek(void **state)
{
    (void)state;
    mt_ready_queue q;
    mt_ready_queue_init(&q);
    for (uintptr_t i = 0; i < 20; i++)
        assert_int_equal(mt_ready_queue_push(&q, ITEM(i)), 0);
    for (uintptr_t i = 0; i < 20; i++)
        assert_int_equal(ITEM_ID(mt_ready_queue_peek(&q, i)), i);
    assert_null(mt_ready_queue_peek(&q, 20));
    assert_null(mt_ready_queue_peek(&q, (size_t)-1));
    /* Peek does not remove; it is relative to the current head. */
    assert_int_equal(mt_ready_queue_len(&q), 20);
    for (uintptr_t i = 0; i < 5; i++)
        assert_int_equal(ITEM_ID(mt_ready_queue_pop(&q)), i);
    for (uintptr_t i = 0; i < 15; i++)
        assert_int_equal(ITEM_ID(mt_ready_queue_peek(&q, i)), i + 5);
    assert_null(mt_ready_queue_peek(&q, 15));
    mt_ready_queue_free(&q);
}

/* Growth from a full ring whose live region wraps around the end of the
 * storage, for every possible head position of the first ring. */
static void test_growth_across_wraparound(void **state)
{
    (void)state;
    /* Learn the initial capacity from the structure itself. */
    mt_ready_queue probe;
    mt_ready_queue_init(&probe);
    assert_int_equal(mt_ready_queue_push(&probe, ITEM(0)), 0);
    const size_t cap0 = capacity(&probe);
    mt_ready_queue_free(&probe);
    assert_true(cap0 >= 2);
    assert_int_equal(cap0 & (cap0 - 1), 0); /* power of two */

    for (size_t offset = 0; offset < cap0; offset++) {
        mt_ready_queue q;
        mt_ready_queue_init(&q);
        uintptr_t next_in = 0, next_out = 0;
        /* Move the head to `offset` without growing. */
        for (size_t i = 0; i < offset; i++)
            assert_int_equal(mt_ready_queue_push(&q, ITEM(next_in++)), 0);
        for (size_t i = 0; i < offset; i++)
            assert_int_equal(ITEM_ID(mt_ready_queue_pop(&q)), next_out++);
        assert_int_equal(capacity(&q), offset ? cap0 : 0);
        /* Fill the ring exactly: it now wraps unless offset == 0. */
        for (size_t i = 0; i < cap0; i++)
            assert_int_equal(mt_ready_queue_push(&q, ITEM(next_in++)), 0);
        assert_int_equal(capacity(&q), cap0);
        assert_int_equal(mt_ready_queue_len(&q), cap0);
        assert_int_equal(q.head, offset);
        for (size_t i = 0; i < cap0; i++)
            assert_int_equal(ITEM_ID(mt_ready_queue_peek(&q, i)), next_out + i);
        /* One more forces growth, which must unwrap the ring in order. */
        assert_int_equal(mt_ready_queue_push(&q, ITEM(next_in++)), 0);
        assert_int_equal(capacity(&q), 2 * cap0);
        assert_int_equal(mt_ready_queue_len(&q), cap0 + 1);
        for (size_t i = 0; i < cap0 + 1; i++)
            assert_int_equal(ITEM_ID(mt_ready_queue_peek(&q, i)), next_out + i);
        /* Wrap the grown ring too and grow it again. */
        for (size_t i = 0; i < cap0 / 2 + offset % 7; i++)
            assert_int_equal(ITEM_ID(mt_ready_queue_pop(&q)), next_out++);
        while (mt_ready_queue_len(&q) < 2 * cap0)
            assert_int_equal(mt_ready_queue_push(&q, ITEM(next_in++)), 0);
        assert_int_equal(capacity(&q), 2 * cap0);
        assert_int_equal(mt_ready_queue_push(&q, ITEM(next_in++)), 0);
        assert_int_equal(capacity(&q), 4 * cap0);
        /* Drain: strict FIFO over everything ever pushed. */
        while (mt_ready_queue_len(&q) > 0)
            assert_int_equal(ITEM_ID(mt_ready_queue_pop(&q)), next_out++);
        assert_int_equal(next_out, next_in);
        assert_null(mt_ready_queue_pop(&q));
        mt_ready_queue_free(&q);
    }
}

/* Random push/pop interleavings (fixed seed) checked against a model: the
 * queue must always hold exactly the items next_out .. next_in-1. */
static void test_random_interleaving(void **state)
{
    (void)state;
    mt_test_rng rng;
    mt_test_rng_seed(&rng, 12345);
    mt_ready_queue q;
    mt_ready_queue_init(&q);
    uintptr_t next_in = 0, next_out = 0;
    size_t max_len = 0;
    for (int step = 0; step < 200000; step++) {
        /* Phases biased toward pushing, then toward popping, so the ring
         * both wraps and grows repeatedly. */
        int push_bias = (step / 5000) % 2 ? 35 : 65;
        if ((int)mt_test_rng_below(&rng, 100) < push_bias) {
            assert_int_equal(mt_ready_queue_push(&q, ITEM(next_in++)), 0);
        } else {
            void *p = mt_ready_queue_pop(&q);
            if (next_out == next_in) {
                assert_null(p);
            } else {
                assert_non_null(p);
                assert_int_equal(ITEM_ID(p), next_out++);
            }
        }
        size_t len = mt_ready_queue_len(&q);
        assert_int_equal(len, next_in - next_out);
        if (len > max_len)
            max_len = len;
        if (len > 0 && step % 97 == 0) {
            size_t i = (size_t)mt_test_rng_below(&rng, len);
            assert_int_equal(ITEM_ID(mt_ready_queue_peek(&q, i)), next_out + i);
            assert_null(mt_ready_queue_peek(&q, len));
        }
    }
    assert_true(max_len > 256); /* growth really happened */
    while (mt_ready_queue_len(&q) > 0)
        assert_int_equal(ITEM_ID(mt_ready_queue_pop(&q)), next_out++);
    assert_int_equal(next_out, next_in);
    mt_ready_queue_free(&q);
    assert_int_equal(mt_ready_queue_len(&q), 0);
    /* Usable again after free. */
    assert_int_equal(mt_ready_queue_push(&q, ITEM(7)), 0);
    assert_int_equal(ITEM_ID(mt_ready_queue_pop(&q)), 7);
    mt_ready_queue_free(&q);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_empty),
        cmocka_unit_test(test_fifo_order),
        cmocka_unit_test(test_peek),
        cmocka_unit_test(test_growth_across_wraparound),
        cmocka_unit_test(test_random_interleaving),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
