/* Unit tests for the loop's timer heap (src/loop/timer_heap.h). */
#include "test_common.h"

#include "loop/timer_heap.h"

#include <stdlib.h>
#include <string.h>

/* A test record: the heap stores pointers to these as `data`. */
typedef struct rec {
    size_t id;
    double when;
    int cancelled;
    int dropped;  /* times passed to drop() */
    int popped;   /* times popped from the heap */
} rec;

/* (when, seq) order, independent of the implementation's own compare. */
static int before(const mt_timer *a, const mt_timer *b)
{
    if (a->when != b->when)
        return a->when < b->when;
    return a->seq < b->seq;
}

/* Every parent must not come after either child. */
static void check_heap_property(const mt_timer_heap *h)
{
    for (size_t i = 1; i < h->len; i++) {
        const mt_timer *parent = &h->items[(i - 1) / 2];
        if (before(&h->items[i], parent))
            fail_msg("heap order broken at index %zu (parent %zu)", i, (i - 1) / 2);
    }
}

static void test_empty(void **state)
{
    (void)state;
    mt_timer_heap h;
    mt_timer_heap_init(&h);
    assert_int_equal(mt_timer_heap_len(&h), 0);
    assert_null(mt_timer_heap_peek(&h));
    mt_timer out = {.when = 1.5, .seq = 99, .data = &h};
    assert_int_equal(mt_timer_heap_pop(&h, &out), -1);
    /* A failed pop leaves *out alone. */
    assert_true(out.when == 1.5);
    assert_int_equal(out.seq, 99);
    assert_ptr_equal(out.data, &h);

    /* Empty again after push + pop. */
    int x;
    assert_int_equal(mt_timer_heap_push(&h, 3.0, &x), 0);
    assert_int_equal(mt_timer_heap_len(&h), 1);
    assert_int_equal(mt_timer_heap_pop(&h, &out), 0);
    assert_ptr_equal(out.data, &x);
    assert_int_equal(mt_timer_heap_len(&h), 0);
    assert_null(mt_timer_heap_peek(&h));
    assert_int_equal(mt_timer_heap_pop(&h, &out), -1);
    mt_timer_heap_free(&h);
    mt_timer_heap_free(&h);
    assert_null(mt_timer_heap_peek(&h));
}

static void test_order_by_when(void **state)
{
    (void)state;
    static const double whens[] = {5.0, 1.0, 4.0, -2.0, 3.5, 0.0, 10.0, 2.25, 7.0, 6.0};
    enum { N = sizeof(whens) / sizeof(whens[0]) };
    rec recs[N];
    mt_timer_heap h;
    mt_timer_heap_init(&h);
    for (size_t i = 0; i < N; i++) {
        recs[i] = (rec){.id = i, .when = whens[i]};
        assert_int_equal(mt_timer_heap_push(&h, whens[i], &recs[i]), 0);
        assert_int_equal(mt_timer_heap_len(&h), i + 1);
        check_heap_property(&h);
    }
    double sorted[N];
    memcpy(sorted, whens, sizeof(sorted));
    for (size_t i = 1; i < N; i++) /* insertion sort */
        for (size_t j = i; j > 0 && sorted[j] < sorted[j - 1]; j--) {
            double t = sorted[j];
            sorted[j] = sorted[j - 1];
            sorted[j - 1] = t;
        }
    for (size_t i = 0; i < N; i++) {
        const mt_timer *top = mt_timer_heap_peek(&h);
        assert_non_null(top);
        assert_true(top->when == sorted[i]);
        const rec *expect = top->data;
        mt_timer out;
        assert_int_equal(mt_timer_heap_pop(&h, &out), 0);
        assert_true(out.when == sorted[i]);
        assert_ptr_equal(out.data, expect);
        rec *r = out.data;
        assert_true(r->when == out.when);
        /* seq is the push index. */
        assert_int_equal(out.seq, r->id);
        assert_int_equal(mt_timer_heap_len(&h), N - 1 - i);
        check_heap_property(&h);
    }
    assert_null(mt_timer_heap_peek(&h));
    mt_timer_heap_free(&h);
}

/* Timers due at the same instant fire in push order. */
static void test_ties_fire_in_push_order(void **state)
{
    (void)state;
    enum { N = 300 };
    rec recs[N];
    mt_timer_heap h;
    mt_timer_heap_init(&h);
    /* Three instants, pushed interleaved and in descending "when" order so
     * that sift-up has work to do; plus enough items to grow the storage. */
    for (size_t i = 0; i < N; i++) {
        double when = (double)(2 - (int)(i % 3));
        recs[i] = (rec){.id = i, .when = when};
        assert_int_equal(mt_timer_heap_push(&h, when, &recs[i]), 0);
    }
    check_heap_property(&h);
    double last_when = -1e300;
    size_t last_id = 0;
    int have_last = 0;
    for (size_t i = 0; i < N; i++) {
        mt_timer out;
        assert_int_equal(mt_timer_heap_pop(&h, &out), 0);
        rec *r = out.data;
        assert_true(out.when >= last_when);
        if (have_last && out.when == last_when) {
            assert_true(r->id > last_id);
        }
        last_when = out.when;
        last_id = r->id;
        have_last = 1;
        check_heap_property(&h);
    }
    /* Interleaving pops with pushes at an already-present instant: a later
     * push still comes after the earlier ones. */
    rec a = {.id = 1}, b = {.id = 2}, c = {.id = 3}, d = {.id = 4};
    assert_int_equal(mt_timer_heap_push(&h, 1.0, &a), 0);
    assert_int_equal(mt_timer_heap_push(&h, 1.0, &b), 0);
    assert_int_equal(mt_timer_heap_push(&h, 0.5, &c), 0);
    mt_timer out;
    assert_int_equal(mt_timer_heap_pop(&h, &out), 0);
    assert_ptr_equal(out.data, &c);
    assert_int_equal(mt_timer_heap_push(&h, 1.0, &d), 0);
    assert_int_equal(mt_timer_heap_pop(&h, &out), 0);
    assert_ptr_equal(out.data, &a);
    assert_int_equal(mt_timer_heap_pop(&h, &out), 0);
    assert_ptr_equal(out.data, &b);
    assert_int_equal(mt_timer_heap_pop(&h, &out), 0);
    assert_ptr_equal(out.data, &d);
    assert_int_equal(mt_timer_heap_pop(&h, &out), -1);
    mt_timer_heap_free(&h);
}

/* Many random pushes (fixed seed, with plenty of duplicate instants) pop
 * in (when, seq) order, each exactly once. */
static void test_random_pushes_pop_sorted(void **state)
{
    (void)state;
    enum { N = 20000 };
    rec *recs = calloc(N, sizeof(*recs));
    assert_non_null(recs);
    mt_test_rng rng;
    mt_test_rng_seed(&rng, 0xC0FFEE);
    mt_timer_heap h;
    mt_timer_heap_init(&h);
    for (size_t i = 0; i < N; i++) {
        /* 0.0 .. 499.75 in quarter steps: many exact ties. */
        double when = (double)mt_test_rng_below(&rng, 2000) * 0.25;
        recs[i] = (rec){.id = i, .when = when};
        assert_int_equal(mt_timer_heap_push(&h, when, &recs[i]), 0);
    }
    assert_int_equal(mt_timer_heap_len(&h), N);
    check_heap_property(&h);
    mt_timer prev = {0};
    for (size_t i = 0; i < N; i++) {
        const mt_timer *top = mt_timer_heap_peek(&h);
        assert_non_null(top);
        mt_timer peeked = *top;
        mt_timer out;
        assert_int_equal(mt_timer_heap_pop(&h, &out), 0);
        assert_true(peeked.when == out.when);
        assert_int_equal(peeked.seq, out.seq);
        assert_ptr_equal(peeked.data, out.data);
        if (i > 0 && !before(&prev, &out))
            fail_msg("pop %zu out of order: (%g, %llu) after (%g, %llu)", i, out.when,
                     (unsigned long long)out.seq, prev.when, (unsigned long long)prev.seq);
        rec *r = out.data;
        assert_true(r->when == out.when);
        assert_int_equal(out.seq, r->id);
        r->popped++;
        prev = out;
    }
    assert_int_equal(mt_timer_heap_len(&h), 0);
    for (size_t i = 0; i < N; i++)
        assert_int_equal(recs[i].popped, 1);
    mt_timer_heap_free(&h);
    free(recs);
}

/* Random interleaving of pushes and pops against a brute-force model. */
static void test_random_interleaving(void **state)
{
    (void)state;
    enum { STEPS = 6000 };
    mt_timer *model = calloc(STEPS, sizeof(*model));
    assert_non_null(model);
    size_t model_len = 0;
    uint64_t seq = 0;
    mt_test_rng rng;
    mt_test_rng_seed(&rng, 777);
    mt_timer_heap h;
    mt_timer_heap_init(&h);
    for (int step = 0; step < STEPS; step++) {
        int push_bias = (step / 1000) % 2 ? 40 : 70;
        if ((int)mt_test_rng_below(&rng, 100) < push_bias) {
            double when = (double)mt_test_rng_below(&rng, 100);
            void *data = (void *)(uintptr_t)(seq + 1);
            assert_int_equal(mt_timer_heap_push(&h, when, data), 0);
            model[model_len++] = (mt_timer){.when = when, .seq = seq++, .data = data};
        } else {
            mt_timer out;
            if (model_len == 0) {
                assert_int_equal(mt_timer_heap_pop(&h, &out), -1);
                continue;
            }
            size_t best = 0;
            for (size_t i = 1; i < model_len; i++)
                if (before(&model[i], &model[best]))
                    best = i;
            assert_int_equal(mt_timer_heap_pop(&h, &out), 0);
            assert_true(out.when == model[best].when);
            assert_int_equal(out.seq, model[best].seq);
            assert_ptr_equal(out.data, model[best].data);
            model[best] = model[--model_len];
        }
        assert_int_equal(mt_timer_heap_len(&h), model_len);
    }
    check_heap_property(&h);
    mt_timer_heap_free(&h);
    free(model);
}

/* ---- filter ---- */

typedef struct filter_ctx {
    int keep_calls;
    int drop_calls;
    int bad_arg;
} filter_ctx;

static int keep_not_cancelled(void *data, void *arg)
{
    filter_ctx *ctx = arg;
    rec *r = data;
    ctx->keep_calls++;
    return !r->cancelled;
}

static void drop_count(void *data, void *arg)
{
    filter_ctx *ctx = arg;
    rec *r = data;
    ctx->drop_calls++;
    r->dropped++;
}

static int keep_checks_arg(void *data, void *arg)
{
    (void)data;
    if (arg != (void *)&keep_checks_arg)
        abort();
    return 1;
}

static void drop_never(void *data, void *arg)
{
    (void)data;
    (void)arg;
    fail_msg("drop() called although keep() kept everything");
}

static void test_filter(void **state)
{
    (void)state;
    enum { N = 2000 };
    rec *recs = calloc(N, sizeof(*recs));
    assert_non_null(recs);
    mt_test_rng rng;
    mt_test_rng_seed(&rng, 4242);
    mt_timer_heap h;
    mt_timer_heap_init(&h);
    size_t expect_dropped = 0;
    for (size_t i = 0; i < N; i++) {
        double when = (double)mt_test_rng_below(&rng, 300);
        recs[i] = (rec){.id = i, .when = when};
        /* Cancel about 60%, in an irregular pattern. */
        recs[i].cancelled = mt_test_rng_below(&rng, 10) < 6;
        expect_dropped += (size_t)recs[i].cancelled;
        assert_int_equal(mt_timer_heap_push(&h, when, &recs[i]), 0);
    }
    /* Pop a few first so the heap is not in push layout. */
    for (int i = 0; i < 50; i++) {
        mt_timer out;
        assert_int_equal(mt_timer_heap_pop(&h, &out), 0);
        rec *r = out.data;
        r->popped++;
        if (r->cancelled)
            expect_dropped--;
    }
    size_t before_len = mt_timer_heap_len(&h);

    filter_ctx ctx = {0};
    size_t dropped = mt_timer_heap_filter(&h, keep_not_cancelled, drop_count, &ctx);
    assert_int_equal(dropped, expect_dropped);
    assert_int_equal(ctx.keep_calls, before_len);
    assert_int_equal(ctx.drop_calls, expect_dropped);
    assert_int_equal(mt_timer_heap_len(&h), before_len - expect_dropped);
    check_heap_property(&h);
    for (size_t i = 0; i < N; i++) {
        if (recs[i].popped) {
            assert_int_equal(recs[i].dropped, 0);
        } else if (recs[i].cancelled) {
            assert_int_equal(recs[i].dropped, 1);
        } else {
            assert_int_equal(recs[i].dropped, 0);
        }
    }
    /* The heap holds exactly the kept ones, and they come out in (when,
     * seq) order: ties keep their push order across the compaction. */
    mt_timer prev = {0};
    size_t popped = 0;
    mt_timer out;
    while (mt_timer_heap_pop(&h, &out) == 0) {
        rec *r = out.data;
        assert_false(r->cancelled);
        assert_int_equal(r->popped, 0);
        assert_int_equal(out.seq, r->id);
        assert_true(out.when == r->when);
        r->popped++;
        if (popped > 0 && !before(&prev, &out))
            fail_msg("pop after filter out of order at %zu", popped);
        prev = out;
        popped++;
        check_heap_property(&h);
    }
    assert_int_equal(popped, before_len - expect_dropped);
    for (size_t i = 0; i < N; i++)
        assert_int_equal(recs[i].popped + recs[i].dropped, 1);
    mt_timer_heap_free(&h);
    free(recs);
}

static void test_filter_edge_cases(void **state)
{
    (void)state;
    mt_timer_heap h;
    mt_timer_heap_init(&h);
    filter_ctx ctx = {0};

    /* Empty heap: no callback, nothing dropped. */
    assert_int_equal(mt_timer_heap_filter(&h, keep_not_cancelled, drop_count, &ctx), 0);
    assert_int_equal(ctx.keep_calls, 0);
    assert_int_equal(ctx.drop_calls, 0);

    enum { N = 100 };
    rec recs[N];
    for (size_t i = 0; i < N; i++) {
        recs[i] = (rec){.id = i, .when = (double)(N - i)};
        assert_int_equal(mt_timer_heap_push(&h, recs[i].when, &recs[i]), 0);
    }
    /* Keep everything: nothing dropped, the arg is passed through, order
     * unchanged. */
    assert_int_equal(mt_timer_heap_filter(&h, keep_checks_arg, drop_never, (void *)&keep_checks_arg), 0);
    assert_int_equal(mt_timer_heap_len(&h), N);
    check_heap_property(&h);
    assert_ptr_equal(mt_timer_heap_peek(&h)->data, &recs[N - 1]);

    /* Drop everything: each exactly once, heap empty and reusable. */
    for (size_t i = 0; i < N; i++)
        recs[i].cancelled = 1;
    ctx = (filter_ctx){0};
    assert_int_equal(mt_timer_heap_filter(&h, keep_not_cancelled, drop_count, &ctx), N);
    assert_int_equal(ctx.drop_calls, N);
    for (size_t i = 0; i < N; i++)
        assert_int_equal(recs[i].dropped, 1);
    assert_int_equal(mt_timer_heap_len(&h), 0);
    assert_null(mt_timer_heap_peek(&h));

    /* seq keeps counting after filter, so new ties still order by push. */
    rec a = {.id = 0}, b = {.id = 1};
    assert_int_equal(mt_timer_heap_push(&h, 5.0, &a), 0);
    assert_int_equal(mt_timer_heap_push(&h, 5.0, &b), 0);
    mt_timer out1, out2;
    assert_int_equal(mt_timer_heap_pop(&h, &out1), 0);
    assert_int_equal(mt_timer_heap_pop(&h, &out2), 0);
    assert_ptr_equal(out1.data, &a);
    assert_ptr_equal(out2.data, &b);
    assert_true(out1.seq < out2.seq);
    assert_true(out1.seq >= N);

    /* Keep only the single latest / earliest. */
    for (size_t i = 0; i < N; i++) {
        recs[i] = (rec){.id = i, .when = (double)(i % 10), .cancelled = i != 37};
        assert_int_equal(mt_timer_heap_push(&h, recs[i].when, &recs[i]), 0);
    }
    ctx = (filter_ctx){0};
    assert_int_equal(mt_timer_heap_filter(&h, keep_not_cancelled, drop_count, &ctx), N - 1);
    assert_int_equal(mt_timer_heap_len(&h), 1);
    assert_ptr_equal(mt_timer_heap_peek(&h)->data, &recs[37]);
    assert_int_equal(recs[37].dropped, 0);
    mt_timer_heap_free(&h);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_empty),
        cmocka_unit_test(test_order_by_when),
        cmocka_unit_test(test_ties_fire_in_push_order),
        cmocka_unit_test(test_random_pushes_pop_sorted),
        cmocka_unit_test(test_random_interleaving),
        cmocka_unit_test(test_filter),
        cmocka_unit_test(test_filter_edge_cases),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
