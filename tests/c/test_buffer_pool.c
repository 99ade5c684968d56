/* Unit tests for the size-classed block pool (src/io_threads/buffer_pool.h):
 * the size-to-class mapping, reuse of a freed block on the same thread, the
 * batches a thread trades with the shared depot, the depot's cap, the
 * return of a thread's cache to the depot when the thread exits,
 * mt_pool_trim(), blocks allocated on one thread and freed on another (the
 * pattern the pool exists for), and many threads at once.
 *
 * The pool's counters are process-global and the depot outlives each test:
 * the tests that count call mt_pool_trim() first (it empties the depot and
 * the calling thread's cache; every other thread of an earlier test has
 * exited, so its cache went to the depot) and compare deltas.  After the
 * threads of a test have exited, every block the test took from malloc is
 * either back with malloc or in the depot: the tests check that balance.
 *
 * Worker threads must not use CMocka's assertions: they count anomalies
 * that the test thread asserts on after joining them. */
#include "test_common.h"

#include "io_threads/buffer_pool.h"

#include <pthread.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>

#if defined(__SANITIZE_ADDRESS__)
#  define MT_TEST_ASAN 1
#elif defined(__has_feature)
#  if __has_feature(address_sanitizer)
#    define MT_TEST_ASAN 1
#  endif
#endif
#ifndef MT_TEST_ASAN
#  define MT_TEST_ASAN 0
#endif
#if MT_TEST_ASAN
#  include <sanitizer/asan_interface.h>
#endif

/* A 64 KiB read plus a command/completion header: the block size of the
 * echo path, in the 128 KiB class. */
#define BLOCK_64K_HDR ((size_t)65536 + 80)
/* A condition wait this long means a lost wakeup or a stuck thread. */
#define WAIT_S 30

/* ---- helpers ------------------------------------------------------------- */

typedef struct stats_delta {
    mt_pool_stats s0;
} stats_delta;

static void delta_start(stats_delta *d)
{
    mt_pool_get_stats(&d->s0);
}

static uint64_t delta_mallocs(const stats_delta *d)
{
    mt_pool_stats s;
    mt_pool_get_stats(&s);
    return s.mallocs - d->s0.mallocs;
}

static uint64_t delta_frees(const stats_delta *d)
{
    mt_pool_stats s;
    mt_pool_get_stats(&s);
    return s.frees - d->s0.frees;
}

static uint64_t depot_blocks(void)
{
    mt_pool_stats s;
    mt_pool_get_stats(&s);
    return s.depot_blocks;
}

/* Mirrors buffer_pool.c: a thread trades blocks with the depot in batches
 * of about 256 KiB (2 to 32 blocks) and spills a batch when it holds two. */
static uint64_t expected_batch(size_t class_size)
{
    size_t n = ((size_t)256 * 1024) / class_size;
    return n < 2 ? 2 : n > 32 ? 32 : n;
}

/* Blocks of one class the depot keeps (MT_POOL_DEPOT_BYTES worth, at most
 * MT_POOL_DEPOT_BLOCKS). */
static uint64_t expected_cap(size_t class_size)
{
    uint64_t n = MT_POOL_DEPOT_BYTES / class_size;
    if (n > MT_POOL_DEPOT_BLOCKS)
        n = MT_POOL_DEPOT_BLOCKS;
    uint64_t b = expected_batch(class_size);
    return n < b ? b : n;
}

/* The contents of a block: 64-bit words derived from `seed` and their
 * index (distinct seeds give distinct first words, where the pool keeps its
 * free-list link), then tail bytes.  `stride` > 1 writes only every
 * stride-th word plus the last one, for the tests that move many big
 * blocks; a second owner of a block still overwrites what the first one
 * checks. */
static inline uint64_t pattern_word(uint64_t seed, size_t i)
{
    uint64_t x = seed + (uint64_t)i * 0x9E3779B97F4A7C15ull;
    x ^= x >> 29;
    x *= 0xBF58476D1CE4E5B9ull;
    return x ^ (x >> 32);
}

static void fill_pattern(void *p, size_t size, uint64_t seed, size_t stride)
{
    uint64_t *w = p;
    size_t nwords = size / 8;
    for (size_t i = 0; i < nwords; i += stride)
        w[i] = pattern_word(seed, i);
    if (nwords > 0)
        w[nwords - 1] = pattern_word(seed, nwords - 1);
    unsigned char *tail = (unsigned char *)p + nwords * 8;
    for (size_t i = 0; i < size % 8; i++)
        tail[i] = (unsigned char)pattern_word(seed, nwords + i);
}

static bool check_pattern(const void *p, size_t size, uint64_t seed, size_t stride)
{
    const uint64_t *w = p;
    size_t nwords = size / 8;
    bool ok = true;
    for (size_t i = 0; i < nwords; i += stride)
        ok &= w[i] == pattern_word(seed, i);
    if (nwords > 0)
        ok &= w[nwords - 1] == pattern_word(seed, nwords - 1);
    const unsigned char *tail = (const unsigned char *)p + nwords * 8;
    for (size_t i = 0; i < size % 8; i++)
        ok &= tail[i] == (unsigned char)pattern_word(seed, nwords + i);
    return ok;
}

static bool wait_cond(pthread_cond_t *cv, pthread_mutex_t *mu)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    ts.tv_sec += WAIT_S;
    return pthread_cond_timedwait(cv, mu, &ts) == 0;
}

/* ---- 1. class mapping ---------------------------------------------------- */

/* Every size up to 128 KiB gets the smallest power-of-two class from 128 B
 * that holds it, and a block that really is that big; bigger sizes come
 * from malloc as MT_POOL_NONE and are just as usable. */
static void test_class_mapping(void **state)
{
    (void)state;
    for (uint8_t c = 0; c < MT_POOL_CLASSES; c++)
        assert_int_equal(mt_pool_class_size(c), (size_t)128 << c);
    assert_int_equal(mt_pool_class_size(MT_POOL_CLASSES), 0);
    assert_int_equal(mt_pool_class_size(MT_POOL_NONE), 0);

    static const size_t pooled[] = {1,    2,     127,   128,           129, 255, 256, 1000,
                                    4095, 4096,  4097,  65535,         65536, 65537,
                                    BLOCK_64K_HDR, 131071, 131072};
    for (size_t i = 0; i < sizeof(pooled) / sizeof(pooled[0]); i++) {
        size_t size = pooled[i];
        uint8_t cls = 0xAA;
        unsigned char *p = mt_pool_alloc(size, &cls);
        assert_non_null(p);
        assert_true(cls < MT_POOL_CLASSES);
        size_t cap = mt_pool_class_size(cls);
        assert_true(cap >= size);
        /* The smallest class that fits, not merely one that fits. */
        assert_true(cls == 0 || mt_pool_class_size((uint8_t)(cls - 1)) < size);
        /* All of the class size is the caller's (ASan would report a
         * short block here). */
        memset(p, 0x5A, cap);
        fill_pattern(p, cap, 1000 + i, 1);
        assert_true(check_pattern(p, cap, 1000 + i, 1));
        /* A second block of the class while the first is in use is
         * another block. */
        uint8_t cls2;
        unsigned char *q = mt_pool_alloc(size, &cls2);
        assert_non_null(q);
        assert_int_equal(cls2, cls);
        assert_ptr_not_equal(q, p);
        memset(q, 0xC3, cap);
        assert_true(check_pattern(p, cap, 1000 + i, 1));
        mt_pool_free(q, cls2);
        mt_pool_free(p, cls);
    }
    /* A few exact expectations, so a consistently shifted mapping fails. */
    static const struct {
        size_t size;
        uint8_t cls;
    } exact[] = {{1, 0},    {127, 0},     {128, 0},           {129, 1},
                 {4096, 5}, {65536, 9},   {BLOCK_64K_HDR, 10}, {131072, 10}};
    for (size_t i = 0; i < sizeof(exact) / sizeof(exact[0]); i++) {
        uint8_t cls = 0xAA;
        void *p = mt_pool_alloc(exact[i].size, &cls);
        assert_non_null(p);
        assert_int_equal(cls, exact[i].cls);
        mt_pool_free(p, cls);
    }

    static const size_t big[] = {131073, 200000, (size_t)1 << 20, ((size_t)4 << 20) + 3};
    for (size_t i = 0; i < sizeof(big) / sizeof(big[0]); i++) {
        size_t size = big[i];
        uint8_t cls = 0;
        unsigned char *p = mt_pool_alloc(size, &cls);
        assert_non_null(p);
        assert_int_equal(cls, MT_POOL_NONE);
        memset(p, 0xA5, size);
        fill_pattern(p, size, 2000 + i, 1);
        assert_true(check_pattern(p, size, 2000 + i, 1));
        mt_pool_free(p, cls);
    }
    /* Freeing NULL is a no-op in either kind of class. */
    mt_pool_free(NULL, 3);
    mt_pool_free(NULL, MT_POOL_NONE);
}

/* ---- 2. reuse on one thread ---------------------------------------------- */

static void test_reuse_same_thread(void **state)
{
    (void)state;
    enum { REPS = 10000, WORKING_SET = 10 };
    mt_pool_trim();

    static const size_t sizes[] = {1, 300, 4096, BLOCK_64K_HDR, 131072};
    for (size_t i = 0; i < sizeof(sizes) / sizeof(sizes[0]); i++) {
        stats_delta d;
        delta_start(&d);
        uint8_t cls, cls2;
        void *p = mt_pool_alloc(sizes[i], &cls);
        assert_non_null(p);
        mt_pool_free(p, cls);
        for (int r = 0; r < REPS; r++) {
            void *q = mt_pool_alloc(sizes[i], &cls2);
            assert_int_equal(cls2, cls);
            /* The block just freed comes straight back. */
            assert_ptr_equal(q, p);
            fill_pattern(q, sizes[i], (uint64_t)r, 64);
            assert_true(check_pattern(q, sizes[i], (uint64_t)r, 64));
            mt_pool_free(q, cls2);
        }
        /* A handful at most (one, here), not one per allocation. */
        assert_true(delta_mallocs(&d) <= 4);
        assert_int_equal(delta_frees(&d), 0);
    }

    /* Reuse is per class, not per size: a 129-byte block serves a 256-byte
     * request, and not a request of another class. */
    uint8_t c1, c2, c3;
    void *p = mt_pool_alloc(129, &c1);
    assert_non_null(p);
    mt_pool_free(p, c1);
    void *other = mt_pool_alloc(128, &c2);
    assert_non_null(other);
    assert_true(c2 != c1);
    assert_ptr_not_equal(other, p);
    uint8_t c4;
    void *bigger = mt_pool_alloc(512, &c4);
    assert_non_null(bigger);
    assert_true(c4 != c1);
    assert_ptr_not_equal(bigger, p);
    void *q = mt_pool_alloc(256, &c3);
    assert_int_equal(c3, c1);
    assert_ptr_equal(q, p);
    mt_pool_free(q, c3);
    mt_pool_free(other, c2);
    mt_pool_free(bigger, c4);

    /* Last freed, first reused. */
    void *abc[3];
    uint8_t cls = 0;
    for (int i = 0; i < 3; i++)
        abc[i] = mt_pool_alloc(1000, &cls);
    for (int i = 0; i < 3; i++)
        mt_pool_free(abc[i], cls);
    for (int i = 2; i >= 0; i--) {
        uint8_t c;
        assert_ptr_equal(mt_pool_alloc(1000, &c), abc[i]);
    }
    for (int i = 0; i < 3; i++)
        mt_pool_free(abc[i], cls);

    /* A working set of several blocks, allocated and freed over and over:
     * the mallocs stay at the working set, whatever goes through the
     * depot in between. */
    static const size_t ws_sizes[] = {4096, 65536, BLOCK_64K_HDR};
    for (size_t i = 0; i < sizeof(ws_sizes) / sizeof(ws_sizes[0]); i++) {
        mt_pool_trim();
        stats_delta d;
        delta_start(&d);
        void *ws[WORKING_SET];
        uint8_t wc[WORKING_SET];
        for (int r = 0; r < REPS / WORKING_SET; r++) {
            for (int k = 0; k < WORKING_SET; k++) {
                ws[k] = mt_pool_alloc(ws_sizes[i], &wc[k]);
                assert_non_null(ws[k]);
                fill_pattern(ws[k], ws_sizes[i], (uint64_t)(r * WORKING_SET + k), 256);
            }
            for (int k = 0; k < WORKING_SET; k++) {
                uint64_t seed = (uint64_t)(r * WORKING_SET + k);
                assert_true(check_pattern(ws[k], ws_sizes[i], seed, 256));
                mt_pool_free(ws[k], wc[k]);
            }
        }
        assert_true(delta_mallocs(&d) <= WORKING_SET + 4);
        assert_int_equal(delta_frees(&d), 0);
    }
    mt_pool_trim();
}

/* ---- batches traded with the depot --------------------------------------- */

/* One thread: its cache takes two batches before it spills one to the
 * depot, a flush moves everything, and an allocation from an empty cache
 * takes exactly one batch (a refill that took one block too many, or a
 * spill too early or too late, shows in depot_blocks). */
static void test_batches(void **state)
{
    (void)state;
    static const size_t sizes[] = {4096, 65536, BLOCK_64K_HDR, 100};
    for (size_t i = 0; i < sizeof(sizes) / sizeof(sizes[0]); i++) {
        mt_pool_trim();
        assert_int_equal(depot_blocks(), 0);
        uint8_t cls;
        void *probe = mt_pool_alloc(sizes[i], &cls);
        assert_non_null(probe);
        uint64_t b = expected_batch(mt_pool_class_size(cls));
        uint64_t n = 2 * b;
        stats_delta d;
        delta_start(&d);
        void **blocks = calloc(n + 1, sizeof(void *));
        assert_non_null(blocks);
        blocks[0] = probe;
        for (uint64_t k = 1; k < n; k++) {
            uint8_t c;
            blocks[k] = mt_pool_alloc(sizes[i], &c);
            assert_non_null(blocks[k]);
            assert_int_equal(c, cls);
        }
        assert_int_equal(delta_mallocs(&d), n - 1);
        for (uint64_t k = 0; k < n; k++) {
            mt_pool_free(blocks[k], cls);
            /* The first spill comes with the block that makes two batches,
             * and moves one batch. */
            assert_int_equal(depot_blocks(), k + 1 < n ? 0 : b);
        }
        mt_pool_flush_thread();
        assert_int_equal(depot_blocks(), n);
        assert_int_equal(delta_frees(&d), 0);

        /* From an empty cache: one batch comes over, one block of it is
         * handed out, the rest serve the next b - 1 allocations. */
        for (uint64_t k = 0; k < n; k++) {
            uint8_t c;
            blocks[k] = mt_pool_alloc(sizes[i], &c);
            assert_non_null(blocks[k]);
            uint64_t taken = (k / b + 1) * b;
            assert_int_equal(depot_blocks(), n - taken);
        }
        assert_int_equal(delta_mallocs(&d), n - 1);
        /* Depot and cache empty: the next one is new. */
        blocks[n] = mt_pool_alloc(sizes[i], &cls);
        assert_non_null(blocks[n]);
        assert_int_equal(delta_mallocs(&d), n);
        for (uint64_t k = 0; k < n; k++)
            for (uint64_t j = k + 1; j <= n; j++)
                assert_ptr_not_equal(blocks[k], blocks[j]);
        for (uint64_t k = 0; k <= n; k++)
            mt_pool_free(blocks[k], cls);
        free(blocks);
        mt_pool_trim();
        assert_int_equal(delta_frees(&d), n + 1); /* the probe too */
    }
}

/* ---- 3. cross-thread recycling ------------------------------------------- */

enum { XQ_CAP = 8, X_LIVE_MAX = 2 * XQ_CAP + 4 };

typedef struct xchan {
    void *block[XQ_CAP];
    uint64_t seq[XQ_CAP];
    uint8_t cls[XQ_CAP];
    unsigned head, count;
} xchan;

/* Two bounded queues of blocks under one lock, and the set of blocks
 * handed over and not yet freed by their receiver: a block the pool hands
 * out while it is still in that set was given to two owners. */
typedef struct xfer {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    xchan ch[2];
    void *live[X_LIVE_MAX];
    unsigned nlive;
    size_t size;
} xfer;

typedef struct endpoint {
    xfer *x;
    int out, in; /* channel indexes, -1 for none */
    uint64_t tag;
    uint64_t to_send, to_recv;
    uint64_t sent, recvd;
    uint64_t bad_class, bad_alloc, bad_pattern, double_handout, bad_live, bad_seq;
    int stuck;
} endpoint;

static uint64_t xfer_seed(uint64_t tag, uint64_t seq)
{
    return (tag << 48) ^ seq;
}

static void *endpoint_main(void *arg)
{
    endpoint *e = arg;
    xfer *x = e->x;
    void *pending = NULL;
    uint8_t pending_cls = 0;
    uint64_t peer_tag = e->in >= 0 ? (uint64_t)e->in + 1 : 0;
    while (e->sent < e->to_send || e->recvd < e->to_recv) {
        if (pending == NULL && e->sent < e->to_send) {
            pending = mt_pool_alloc(x->size, &pending_cls);
            if (pending == NULL) {
                e->bad_alloc++;
                break;
            }
            if (pending_cls >= MT_POOL_CLASSES || mt_pool_class_size(pending_cls) < x->size)
                e->bad_class++;
            fill_pattern(pending, x->size, xfer_seed(e->tag, e->sent), 1);
        }
        pthread_mutex_lock(&x->mu);
        bool can_send, can_recv;
        for (;;) {
            can_send = pending != NULL && x->ch[e->out].count < XQ_CAP;
            can_recv = e->in >= 0 && x->ch[e->in].count > 0;
            if (can_send || can_recv)
                break;
            if (!wait_cond(&x->cv, &x->mu)) {
                e->stuck = 1;
                break;
            }
        }
        if (e->stuck) {
            pthread_mutex_unlock(&x->mu);
            break;
        }
        void *got = NULL;
        uint64_t got_seq = 0;
        uint8_t got_cls = 0;
        if (can_send) {
            for (unsigned i = 0; i < x->nlive; i++)
                if (x->live[i] == pending)
                    e->double_handout++;
            if (x->nlive < X_LIVE_MAX)
                x->live[x->nlive++] = pending;
            else
                e->bad_live++;
            xchan *c = &x->ch[e->out];
            unsigned slot = (c->head + c->count) % XQ_CAP;
            c->block[slot] = pending;
            c->seq[slot] = e->sent;
            c->cls[slot] = pending_cls;
            c->count++;
            e->sent++;
            pending = NULL;
        }
        if (can_recv) {
            xchan *c = &x->ch[e->in];
            got = c->block[c->head];
            got_seq = c->seq[c->head];
            got_cls = c->cls[c->head];
            c->head = (c->head + 1) % XQ_CAP;
            c->count--;
        }
        pthread_cond_broadcast(&x->cv);
        pthread_mutex_unlock(&x->mu);

        if (got != NULL) {
            if (got_seq != e->recvd)
                e->bad_seq++;
            if (!check_pattern(got, x->size, xfer_seed(peer_tag, got_seq), 1))
                e->bad_pattern++;
            pthread_mutex_lock(&x->mu);
            bool found = false;
            for (unsigned i = 0; i < x->nlive; i++) {
                if (x->live[i] == got) {
                    x->live[i] = x->live[--x->nlive];
                    found = true;
                    break;
                }
            }
            pthread_mutex_unlock(&x->mu);
            if (!found)
                e->bad_live++;
            mt_pool_free(got, got_cls);
            e->recvd++;
        }
    }
    if (pending != NULL)
        mt_pool_free(pending, pending_cls);
    return NULL;
}

static void check_endpoint(const endpoint *e)
{
    assert_false(e->stuck);
    assert_int_equal(e->bad_alloc, 0);
    assert_int_equal(e->bad_class, 0);
    assert_int_equal(e->bad_seq, 0);
    assert_int_equal(e->bad_pattern, 0);
    assert_int_equal(e->double_handout, 0);
    assert_int_equal(e->bad_live, 0);
    assert_int_equal(e->sent, e->to_send);
    assert_int_equal(e->recvd, e->to_recv);
}

/* Channel 0 carries thread 0's blocks to thread 1; with `both_ways`,
 * channel 1 carries thread 1's blocks to thread 0 at the same time. */
static void run_cross_thread(bool both_ways)
{
    const uint64_t n = MT_TEST_SCALE(20000, 2000);
    /* Far below one malloc per block: blocks freed on the receiving thread
     * must come back to the sending one through the depot. */
    const uint64_t max_mallocs = n / 20;
    mt_pool_trim();
    stats_delta d;
    delta_start(&d);

    xfer *x = calloc(1, sizeof(*x));
    assert_non_null(x);
    pthread_mutex_init(&x->mu, NULL);
    pthread_cond_init(&x->cv, NULL);
    x->size = BLOCK_64K_HDR;
    endpoint e[2] = {
        {.x = x, .out = 0, .in = both_ways ? 1 : -1, .tag = 1, .to_send = n,
         .to_recv = both_ways ? n : 0},
        {.x = x, .out = 1, .in = 0, .tag = 2, .to_send = both_ways ? n : 0, .to_recv = n},
    };
    pthread_t th[2];
    for (int i = 0; i < 2; i++)
        assert_int_equal(pthread_create(&th[i], NULL, endpoint_main, &e[i]), 0);
    for (int i = 0; i < 2; i++)
        pthread_join(th[i], NULL);
    for (int i = 0; i < 2; i++)
        check_endpoint(&e[i]);
    assert_int_equal(x->nlive, 0);
    pthread_cond_destroy(&x->cv);
    pthread_mutex_destroy(&x->mu);
    free(x);

    uint64_t mallocs = delta_mallocs(&d), frees = delta_frees(&d);
    print_message("%s: %llu blocks each way, %llu mallocs, %llu frees\n",
                  both_ways ? "both ways" : "one way", (unsigned long long)n,
                  (unsigned long long)mallocs, (unsigned long long)frees);
    assert_true(mallocs < max_mallocs);
    /* Both threads have exited: what is not back with malloc is in the
     * depot. */
    assert_int_equal(mallocs - frees, depot_blocks());
    mt_pool_trim();
}

static void test_cross_thread_one_way(void **state)
{
    (void)state;
    run_cross_thread(false);
}

static void test_cross_thread_both_ways(void **state)
{
    (void)state;
    run_cross_thread(true);
}

/* ---- 4. depot cap -------------------------------------------------------- */

typedef struct free_all_arg {
    void **blocks;
    uint64_t n;
    uint8_t cls;
} free_all_arg;

static void *free_all_main(void *arg)
{
    free_all_arg *a = arg;
    for (uint64_t i = 0; i < a->n; i++)
        mt_pool_free(a->blocks[i], a->cls);
    return NULL; /* the cache goes to the depot at exit */
}

/* Frees far more than MT_POOL_DEPOT_BYTES of one class: the depot keeps
 * about its cap and the rest goes back to malloc, whether the blocks reach
 * the depot by spills and an explicit flush or by a thread's exit. */
static void test_depot_cap(void **state)
{
    (void)state;
    static const size_t sizes[] = {128, 4096, 65536, BLOCK_64K_HDR};
    for (int via_exit = 0; via_exit < 2; via_exit++) {
        for (size_t i = 0; i < sizeof(sizes) / sizeof(sizes[0]); i++) {
            mt_pool_trim();
            stats_delta d;
            delta_start(&d);
            size_t csize = mt_pool_class_size(0);
            while (csize < sizes[i])
                csize *= 2;
            uint64_t cap = expected_cap(csize), b = expected_batch(csize);
            uint64_t n = 2 * cap + 2 * b + 3;
            void **blocks = malloc(n * sizeof(void *));
            assert_non_null(blocks);
            uint8_t cls = 0;
            for (uint64_t k = 0; k < n; k++) {
                blocks[k] = mt_pool_alloc(sizes[i], &cls);
                assert_non_null(blocks[k]);
                assert_int_equal(mt_pool_class_size(cls), csize);
            }
            assert_int_equal(delta_mallocs(&d), n);
            if (via_exit) {
                free_all_arg a = {.blocks = blocks, .n = n, .cls = cls};
                pthread_t th;
                assert_int_equal(pthread_create(&th, NULL, free_all_main, &a), 0);
                pthread_join(th, NULL);
            } else {
                for (uint64_t k = 0; k < n; k++)
                    mt_pool_free(blocks[k], cls);
                mt_pool_flush_thread();
            }
            free(blocks);
            uint64_t kept = depot_blocks();
            print_message("class %zu B: freed %llu, depot keeps %llu (cap %llu)\n", csize,
                          (unsigned long long)n, (unsigned long long)kept,
                          (unsigned long long)cap);
            assert_true(kept <= cap + b);
            /* ...and it does keep blocks: a depot that returned everything
             * to malloc would pass the bound above. */
            assert_true(kept + b >= cap);
            /* Nothing stays in the freeing thread's cache after the flush
             * (or the exit): the excess went to malloc. */
            assert_int_equal(delta_frees(&d), n - kept);
            assert_int_equal(delta_mallocs(&d), n);
            mt_pool_trim();
            assert_int_equal(depot_blocks(), 0);
            assert_int_equal(delta_frees(&d), n);
        }
    }
}

/* ---- 5. thread exit ------------------------------------------------------ */

enum { EXIT_SMALL = 20, EXIT_BIG = 3, EXIT_TOTAL = EXIT_SMALL + EXIT_BIG };
#define EXIT_SMALL_SIZE ((size_t)4096)

typedef struct exit_arg {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int phase; /* 0: running, 1: blocks freed, 2: may exit */
    int stuck;
    void *blocks[EXIT_TOTAL];
    uint8_t cls[EXIT_TOTAL];
    /* The second thread's results. */
    void *got[EXIT_TOTAL + 1];
    uint64_t mallocs_for_cached, mallocs_after, depot_after;
    uint64_t bad_alloc, foreign, dup;
} exit_arg;

/* Allocates blocks of two classes, frees them (fewer than two batches of
 * each, so they stay in this thread's cache), then waits to be let go. */
static void *exit_first_main(void *arg)
{
    exit_arg *a = arg;
    for (int i = 0; i < EXIT_TOTAL; i++) {
        size_t size = i < EXIT_SMALL ? EXIT_SMALL_SIZE : BLOCK_64K_HDR;
        a->blocks[i] = mt_pool_alloc(size, &a->cls[i]);
        if (a->blocks[i] == NULL)
            a->bad_alloc++;
        else
            fill_pattern(a->blocks[i], size, (uint64_t)i, 1);
    }
    for (int i = 0; i < EXIT_TOTAL; i++)
        mt_pool_free(a->blocks[i], a->cls[i]);
    pthread_mutex_lock(&a->mu);
    a->phase = 1;
    pthread_cond_broadcast(&a->cv);
    while (a->phase != 2) {
        if (!wait_cond(&a->cv, &a->mu)) {
            a->stuck = 1;
            break;
        }
    }
    pthread_mutex_unlock(&a->mu);
    return NULL;
}

/* Runs alone: takes as many blocks as the first thread left, which must be
 * exactly those blocks, without a malloc; one more is new. */
static void *exit_second_main(void *arg)
{
    exit_arg *a = arg;
    mt_pool_stats s0, s1;
    mt_pool_get_stats(&s0);
    uint8_t cls[EXIT_TOTAL + 1];
    for (int i = 0; i < EXIT_TOTAL; i++) {
        size_t size = i < EXIT_SMALL ? EXIT_SMALL_SIZE : BLOCK_64K_HDR;
        a->got[i] = mt_pool_alloc(size, &cls[i]);
        if (a->got[i] == NULL) {
            a->bad_alloc++;
            continue;
        }
        bool known = false;
        for (int j = 0; j < EXIT_TOTAL; j++)
            known |= a->got[i] == a->blocks[j] && cls[i] == a->cls[j];
        if (!known)
            a->foreign++;
        for (int j = 0; j < i; j++)
            if (a->got[j] == a->got[i])
                a->dup++;
        memset(a->got[i], 0x33, size);
    }
    mt_pool_get_stats(&s1);
    a->mallocs_for_cached = s1.mallocs - s0.mallocs;
    a->depot_after = s1.depot_blocks;
    a->got[EXIT_TOTAL] = mt_pool_alloc(BLOCK_64K_HDR, &cls[EXIT_TOTAL]);
    if (a->got[EXIT_TOTAL] == NULL)
        a->bad_alloc++;
    mt_pool_get_stats(&s1);
    a->mallocs_after = s1.mallocs - s0.mallocs;
    for (int i = 0; i <= EXIT_TOTAL; i++)
        mt_pool_free(a->got[i], cls[i]);
    return NULL;
}

static void *exit_free_only_main(void *arg)
{
    free_all_arg *a = arg;
    for (uint64_t i = 0; i < a->n; i++)
        mt_pool_free(a->blocks[i], a->cls);
    return NULL;
}

static void test_thread_exit(void **state)
{
    (void)state;
    mt_pool_trim();
    stats_delta d;
    delta_start(&d);
    exit_arg *a = calloc(1, sizeof(*a));
    assert_non_null(a);
    pthread_mutex_init(&a->mu, NULL);
    pthread_cond_init(&a->cv, NULL);

    pthread_t th;
    assert_int_equal(pthread_create(&th, NULL, exit_first_main, a), 0);
    pthread_mutex_lock(&a->mu);
    bool stuck = false;
    while (a->phase != 1 && !stuck)
        stuck = !wait_cond(&a->cv, &a->mu);
    pthread_mutex_unlock(&a->mu);
    assert_false(stuck);
    /* While the thread lives its freed blocks are in its own cache. */
    assert_int_equal(depot_blocks(), 0);
    pthread_mutex_lock(&a->mu);
    a->phase = 2;
    pthread_cond_broadcast(&a->cv);
    pthread_mutex_unlock(&a->mu);
    pthread_join(th, NULL);
    assert_false(a->stuck);
    assert_int_equal(a->bad_alloc, 0);
    assert_int_equal(delta_mallocs(&d), EXIT_TOTAL);
    /* Its exit gave them to the depot. */
    assert_int_equal(depot_blocks(), EXIT_TOTAL);
    assert_int_equal(delta_frees(&d), 0);

    assert_int_equal(pthread_create(&th, NULL, exit_second_main, a), 0);
    pthread_join(th, NULL);
    assert_int_equal(a->bad_alloc, 0);
    assert_int_equal(a->foreign, 0);
    assert_int_equal(a->dup, 0);
    assert_int_equal(a->mallocs_for_cached, 0);
    assert_int_equal(a->depot_after, 0);
    assert_int_equal(a->mallocs_after, 1);
    /* ...and the second thread's exit gave back all it held. */
    assert_int_equal(depot_blocks(), EXIT_TOTAL + 1);
    assert_int_equal(delta_mallocs(&d), EXIT_TOTAL + 1);
    assert_int_equal(delta_frees(&d), 0);

    /* A thread that only frees (never allocates) also hands its cache over
     * when it exits. */
    mt_pool_trim();
    delta_start(&d);
    void *blocks[3];
    uint8_t cls = 0;
    for (int i = 0; i < 3; i++) {
        blocks[i] = mt_pool_alloc(1000, &cls);
        assert_non_null(blocks[i]);
    }
    free_all_arg fa = {.blocks = blocks, .n = 3, .cls = cls};
    assert_int_equal(pthread_create(&th, NULL, exit_free_only_main, &fa), 0);
    pthread_join(th, NULL);
    assert_int_equal(depot_blocks(), 3);
    for (int i = 0; i < 3; i++) {
        uint8_t c;
        void *p = mt_pool_alloc(1000, &c);
        bool known = p == blocks[0] || p == blocks[1] || p == blocks[2];
        assert_true(known);
        mt_pool_free(p, c);
    }
    assert_int_equal(delta_mallocs(&d), 3);

    pthread_cond_destroy(&a->cv);
    pthread_mutex_destroy(&a->mu);
    free(a);
    mt_pool_trim();
}

/* ---- 6. trim ------------------------------------------------------------- */

static void test_trim(void **state)
{
    (void)state;
    enum { PER_CLASS = 5 };
    mt_pool_trim();
    assert_int_equal(depot_blocks(), 0);
    stats_delta d;
    delta_start(&d);
    void *blocks[MT_POOL_CLASSES][PER_CLASS];
    for (uint8_t c = 0; c < MT_POOL_CLASSES; c++) {
        for (int i = 0; i < PER_CLASS; i++) {
            uint8_t cls;
            blocks[c][i] = mt_pool_alloc(mt_pool_class_size(c), &cls);
            assert_non_null(blocks[c][i]);
            assert_int_equal(cls, c);
        }
    }
    for (uint8_t c = 0; c < MT_POOL_CLASSES; c++)
        for (int i = 0; i < PER_CLASS; i++)
            mt_pool_free(blocks[c][i], c);
    mt_pool_flush_thread();
    uint64_t total = (uint64_t)MT_POOL_CLASSES * PER_CLASS;
    assert_int_equal(delta_mallocs(&d), total);
    assert_int_equal(depot_blocks(), total);
    /* Leave some in this thread's cache too: this takes a batch of class
     * 3 out of the depot. */
    uint8_t c3;
    void *p = mt_pool_alloc(mt_pool_class_size(3), &c3);
    assert_non_null(p);
    mt_pool_free(p, c3);
    assert_true(depot_blocks() < total);

    mt_pool_trim();
    assert_int_equal(depot_blocks(), 0);
    /* Everything went back to malloc, the cache included. */
    assert_int_equal(delta_frees(&d), total);
    assert_int_equal(delta_mallocs(&d), total);
    /* An empty cache and depot: the next block is new. */
    p = mt_pool_alloc(mt_pool_class_size(3), &c3);
    assert_non_null(p);
    assert_int_equal(delta_mallocs(&d), total + 1);
    mt_pool_free(p, c3);
    /* Trimming twice frees nothing more than the one block. */
    mt_pool_trim();
    mt_pool_trim();
    assert_int_equal(delta_frees(&d), total + 1);
    assert_int_equal(depot_blocks(), 0);
}

/* ---- 7. many threads ----------------------------------------------------- */

enum { HAMMER_MAX_THREADS = 8, HAMMER_SLOTS = 24, MAILBOX_CAP = 256 };

typedef struct held {
    void *p;
    size_t size;
    uint64_t seed;
    uint8_t cls;
} held;

typedef struct mailbox {
    pthread_mutex_t mu;
    held items[MAILBOX_CAP];
    unsigned count;
} mailbox;

typedef struct hammer_shared {
    int nthreads;
    uint64_t iters;
    pthread_barrier_t done_sending;
    mailbox box[HAMMER_MAX_THREADS];
} hammer_shared;

typedef struct hammer_arg {
    hammer_shared *sh;
    int id;
    uint64_t allocs, sent, received;
    uint64_t bad_alloc, bad_class, bad_pattern;
} hammer_arg;

enum { HAMMER_STRIDE = 8 }; /* one word in each 64-byte line */

static void hammer_release(hammer_arg *a, held *h)
{
    if (!check_pattern(h->p, h->size, h->seed, HAMMER_STRIDE))
        a->bad_pattern++;
    mt_pool_free(h->p, h->cls);
    h->p = NULL;
}

static void hammer_drain(hammer_arg *a)
{
    mailbox *mb = &a->sh->box[a->id];
    held items[MAILBOX_CAP];
    pthread_mutex_lock(&mb->mu);
    unsigned n = mb->count;
    memcpy(items, mb->items, n * sizeof(held));
    mb->count = 0;
    pthread_mutex_unlock(&mb->mu);
    for (unsigned i = 0; i < n; i++) {
        hammer_release(a, &items[i]);
        a->received++;
    }
}

static void *hammer_main(void *arg)
{
    hammer_arg *a = arg;
    hammer_shared *sh = a->sh;
    mt_test_rng rng;
    mt_test_rng_seed(&rng, 0xB10C0000u + (uint64_t)a->id);
    held slots[HAMMER_SLOTS] = {{0}};
    uint64_t seq = 0;
    for (uint64_t it = 0; it < sh->iters; it++) {
        if ((it & 15) == 0)
            hammer_drain(a);
        if (mt_test_rng_below(&rng, 2000) == 0)
            mt_pool_flush_thread();
        held *h = &slots[mt_test_rng_below(&rng, HAMMER_SLOTS)];
        if (h->p != NULL) {
            if (sh->nthreads > 1 && mt_test_rng_below(&rng, 4) == 0) {
                /* Give it to another thread to check and free. */
                if (!check_pattern(h->p, h->size, h->seed, HAMMER_STRIDE))
                    a->bad_pattern++;
                int to = (a->id + 1 + (int)mt_test_rng_below(&rng, (uint64_t)sh->nthreads - 1)) %
                         sh->nthreads;
                mailbox *mb = &sh->box[to];
                pthread_mutex_lock(&mb->mu);
                bool room = mb->count < MAILBOX_CAP;
                if (room)
                    mb->items[mb->count++] = *h;
                pthread_mutex_unlock(&mb->mu);
                if (room) {
                    h->p = NULL;
                    a->sent++;
                    continue;
                }
            }
            hammer_release(a, h);
            continue;
        }
        /* Sizes spread over every class (log-uniform), sometimes past the
         * biggest one. */
        size_t size;
        if (mt_test_rng_below(&rng, 16) == 0) {
            size = ((size_t)1 << MT_POOL_MAX_SHIFT) + 1 + mt_test_rng_below(&rng, 100000);
        } else {
            unsigned shift = (unsigned)mt_test_rng_below(&rng, MT_POOL_MAX_SHIFT + 1);
            size = ((size_t)1 << shift) + mt_test_rng_below(&rng, (uint64_t)1 << shift);
            if (size > ((size_t)1 << MT_POOL_MAX_SHIFT))
                size = (size_t)1 << MT_POOL_MAX_SHIFT;
        }
        h->p = mt_pool_alloc(size, &h->cls);
        a->allocs++;
        if (h->p == NULL) {
            a->bad_alloc++;
            continue;
        }
        if (h->cls == MT_POOL_NONE ? size <= ((size_t)1 << MT_POOL_MAX_SHIFT)
                                   : mt_pool_class_size(h->cls) < size)
            a->bad_class++;
        h->size = size;
        h->seed = ((uint64_t)a->id << 56) ^ seq++;
        fill_pattern(h->p, size, h->seed, HAMMER_STRIDE);
    }
    for (int i = 0; i < HAMMER_SLOTS; i++)
        if (slots[i].p != NULL)
            hammer_release(a, &slots[i]);
    /* Nobody sends after this; then take what was sent here. */
    pthread_barrier_wait(&sh->done_sending);
    hammer_drain(a);
    return NULL;
}

static void test_many_threads(void **state)
{
    (void)state;
    const int nthreads = MT_TEST_SCALE(8, 4);
    mt_pool_trim();
    stats_delta d;
    delta_start(&d);
    hammer_shared *sh = calloc(1, sizeof(*sh));
    assert_non_null(sh);
    sh->nthreads = nthreads;
    sh->iters = MT_TEST_SCALE(40000, 10000);
    assert_int_equal(pthread_barrier_init(&sh->done_sending, NULL, (unsigned)nthreads), 0);
    for (int i = 0; i < nthreads; i++)
        pthread_mutex_init(&sh->box[i].mu, NULL);
    hammer_arg args[HAMMER_MAX_THREADS];
    pthread_t th[HAMMER_MAX_THREADS];
    for (int i = 0; i < nthreads; i++) {
        args[i] = (hammer_arg){.sh = sh, .id = i};
        assert_int_equal(pthread_create(&th[i], NULL, hammer_main, &args[i]), 0);
    }
    for (int i = 0; i < nthreads; i++)
        pthread_join(th[i], NULL);
    uint64_t allocs = 0, sent = 0, received = 0;
    for (int i = 0; i < nthreads; i++) {
        assert_int_equal(args[i].bad_alloc, 0);
        assert_int_equal(args[i].bad_class, 0);
        assert_int_equal(args[i].bad_pattern, 0);
        allocs += args[i].allocs;
        sent += args[i].sent;
        received += args[i].received;
    }
    for (int i = 0; i < nthreads; i++) {
        assert_int_equal(sh->box[i].count, 0);
        pthread_mutex_destroy(&sh->box[i].mu);
    }
    pthread_barrier_destroy(&sh->done_sending);
    free(sh);
    assert_int_equal(sent, received);
    assert_true(sent > 0);
    uint64_t mallocs = delta_mallocs(&d), frees = delta_frees(&d);
    print_message("%d threads: %llu allocations (%llu passed between threads), %llu mallocs, "
                  "%llu frees\n",
                  nthreads, (unsigned long long)allocs, (unsigned long long)sent,
                  (unsigned long long)mallocs, (unsigned long long)frees);
    /* Every block is free now and the threads are gone: what is not back
     * with malloc is in the depot. */
    assert_int_equal(mallocs - frees, depot_blocks());
    assert_true(mallocs < allocs);
    mt_pool_trim();
    assert_int_equal(depot_blocks(), 0);
    assert_int_equal(delta_frees(&d), mallocs);
}

/* ---- ASan poisoning ------------------------------------------------------ */

/* Under ASan a pooled free block is poisoned past its first word, so a use
 * after mt_pool_free() is reported; a block handed out again is all the
 * caller's. */
static void test_asan_poisoning(void **state)
{
    (void)state;
#if MT_TEST_ASAN
    static const size_t sizes[] = {100, 4096, BLOCK_64K_HDR};
    for (size_t i = 0; i < sizeof(sizes) / sizeof(sizes[0]); i++) {
        uint8_t cls;
        char *p = mt_pool_alloc(sizes[i], &cls);
        assert_non_null(p);
        size_t csize = mt_pool_class_size(cls);
        assert_null(__asan_region_is_poisoned(p, csize));
        mt_pool_free(p, cls);
        assert_true(__asan_address_is_poisoned(p + 16));
        assert_true(__asan_address_is_poisoned(p + csize - 1));
        uint8_t cls2;
        char *q = mt_pool_alloc(sizes[i], &cls2);
        assert_ptr_equal(q, p);
        assert_null(__asan_region_is_poisoned(q, csize));
        /* Through the depot too. */
        mt_pool_free(q, cls2);
        mt_pool_flush_thread();
        assert_true(__asan_address_is_poisoned(p + 16));
        q = mt_pool_alloc(sizes[i], &cls2);
        assert_ptr_equal(q, p);
        assert_null(__asan_region_is_poisoned(q, csize));
        mt_pool_free(q, cls2);
    }
    mt_pool_trim();
#else
    skip();
#endif
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_class_mapping),
        cmocka_unit_test(test_reuse_same_thread),
        cmocka_unit_test(test_batches),
        cmocka_unit_test(test_cross_thread_one_way),
        cmocka_unit_test(test_cross_thread_both_ways),
        cmocka_unit_test(test_depot_cap),
        cmocka_unit_test(test_thread_exit),
        cmocka_unit_test(test_trim),
        cmocka_unit_test(test_many_threads),
        cmocka_unit_test(test_asan_poisoning),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
