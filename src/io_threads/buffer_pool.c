/* Size-classed block pool with per-thread caches and a shared depot.  See
 * buffer_pool.h for why it exists. */
#include "io_threads/buffer_pool.h"

#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdlib.h>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
/* A pooled block is free memory to ASan, except the link in its first
 * word, so a use after mt_pool_free() is still reported. */
#define POISON_FREE(b, size)                                                                  \
    ASAN_POISON_MEMORY_REGION((char *)(b) + sizeof(pool_block), (size) - sizeof(pool_block))
#define UNPOISON(b, size) ASAN_UNPOISON_MEMORY_REGION((b), (size))
#else
#define POISON_FREE(b, size) ((void)(b), (void)(size))
#define UNPOISON(b, size) ((void)(b), (void)(size))
#endif

typedef struct pool_block {
    struct pool_block *next;
} pool_block;

/* The blocks a thread keeps per class (its own; no other thread looks). */
typedef struct thread_cache {
    pool_block *head;
    uint32_t count;
} thread_cache;

/* Shared blocks per class.  Ownership: `head` and `count` are guarded by
 * `mu`. */
typedef struct depot {
    pthread_mutex_t mu;
    pool_block *head;
    size_t count;
} depot;

static depot depots[MT_POOL_CLASSES] = {
#define D {PTHREAD_MUTEX_INITIALIZER, NULL, 0}
    D, D, D, D, D, D, D, D, D, D, D,
#undef D
};
_Static_assert(MT_POOL_CLASSES == 11, "depots[] initializer");

static _Atomic uint64_t stat_mallocs, stat_frees; /* any thread, relaxed */

static _Thread_local thread_cache caches[MT_POOL_CLASSES];
static _Thread_local bool cache_registered;
static pthread_key_t cache_key;
static pthread_once_t setup_once = PTHREAD_ONCE_INIT;

/* Blocks traded with the depot at a time: about 256 KiB, 2 to 32 blocks.
 * A thread caches at most two batches. */
static uint32_t batch_of(uint8_t cls)
{
    size_t n = ((size_t)256 * 1024) / mt_pool_class_size(cls);
    return n < 2 ? 2 : n > 32 ? 32 : (uint32_t)n;
}

static size_t depot_cap(uint8_t cls)
{
    size_t n = MT_POOL_DEPOT_BYTES / mt_pool_class_size(cls);
    if (n > MT_POOL_DEPOT_BLOCKS)
        n = MT_POOL_DEPOT_BLOCKS;
    return n < batch_of(cls) ? batch_of(cls) : n;
}

static void free_chain(pool_block *b)
{
    while (b != NULL) {
        pool_block *next = b->next;
        free(b);
        atomic_fetch_add_explicit(&stat_frees, 1, memory_order_relaxed);
        b = next;
    }
}

static void on_thread_exit(void *arg)
{
    (void)arg;
    mt_pool_flush_thread();
}

static void lock_all(void)
{
    for (int i = 0; i < MT_POOL_CLASSES; i++)
        pthread_mutex_lock(&depots[i].mu);
}

static void unlock_all(void)
{
    for (int i = MT_POOL_CLASSES - 1; i >= 0; i--)
        pthread_mutex_unlock(&depots[i].mu);
}

/* The depot stays usable in a child of fork(): its blocks are the child's
 * copy of free memory.  Holding every lock across fork() keeps another
 * thread from leaving one locked forever. */
static void setup(void)
{
    pthread_key_create(&cache_key, on_thread_exit);
    pthread_atfork(lock_all, unlock_all, unlock_all);
}

static void register_thread(void)
{
    pthread_once(&setup_once, setup);
    pthread_setspecific(cache_key, (void *)1);
    cache_registered = true;
}

static int class_of(size_t size)
{
    if (size > ((size_t)1 << MT_POOL_MAX_SHIFT))
        return -1;
    int cls = 0;
    while (((size_t)1 << (cls + MT_POOL_MIN_SHIFT)) < size)
        cls++;
    return cls;
}

/* Takes up to one batch from the depot into the (empty) thread cache. */
static void refill(uint8_t cls)
{
    depot *d = &depots[cls];
    thread_cache *tc = &caches[cls];
    uint32_t want = batch_of(cls);
    pthread_mutex_lock(&d->mu);
    pool_block *first = d->head, *last = NULL;
    uint32_t n = 0;
    for (pool_block *b = first; b != NULL && n < want; b = b->next) {
        last = b;
        n++;
    }
    if (n > 0) {
        d->head = last->next;
        d->count -= n;
        last->next = NULL;
        tc->head = first;
        tc->count = n;
    }
    pthread_mutex_unlock(&d->mu);
}

void *mt_pool_alloc(size_t size, uint8_t *cls_out)
{
    int c = class_of(size);
    if (c < 0) {
        *cls_out = MT_POOL_NONE;
        return malloc(size);
    }
    uint8_t cls = (uint8_t)c;
    *cls_out = cls;
    if (!cache_registered)
        register_thread();
    thread_cache *tc = &caches[cls];
    if (tc->head == NULL)
        refill(cls);
    pool_block *b = tc->head;
    if (b != NULL) {
        tc->head = b->next;
        tc->count--;
        UNPOISON(b, mt_pool_class_size(cls));
        return b;
    }
    void *p = malloc(mt_pool_class_size(cls));
    if (p != NULL)
        atomic_fetch_add_explicit(&stat_mallocs, 1, memory_order_relaxed);
    return p;
}

/* Moves `n` blocks from the front of the thread cache to the depot, or to
 * malloc once the depot is full. */
static void spill(uint8_t cls, uint32_t n)
{
    thread_cache *tc = &caches[cls];
    pool_block *first = tc->head, *last = first;
    for (uint32_t i = 1; i < n; i++)
        last = last->next;
    tc->head = last->next;
    tc->count -= n;
    last->next = NULL;

    depot *d = &depots[cls];
    pthread_mutex_lock(&d->mu);
    bool room = d->count + n <= depot_cap(cls);
    if (room) {
        last->next = d->head;
        d->head = first;
        d->count += n;
    }
    pthread_mutex_unlock(&d->mu);
    if (!room)
        free_chain(first);
}

void mt_pool_free(void *block, uint8_t cls)
{
    if (block == NULL)
        return;
    if (cls >= MT_POOL_CLASSES) {
        free(block);
        return;
    }
    if (!cache_registered)
        register_thread();
    thread_cache *tc = &caches[cls];
    pool_block *b = block;
    b->next = tc->head;
    tc->head = b;
    tc->count++;
    POISON_FREE(b, mt_pool_class_size(cls));
    uint32_t batch = batch_of(cls);
    if (tc->count >= 2 * batch)
        spill(cls, batch);
}

void mt_pool_flush_thread(void)
{
    for (uint8_t cls = 0; cls < MT_POOL_CLASSES; cls++)
        if (caches[cls].count > 0)
            spill(cls, caches[cls].count);
}

void mt_pool_trim(void)
{
    for (uint8_t cls = 0; cls < MT_POOL_CLASSES; cls++) {
        free_chain(caches[cls].head);
        caches[cls].head = NULL;
        caches[cls].count = 0;
        depot *d = &depots[cls];
        pthread_mutex_lock(&d->mu);
        pool_block *chain = d->head;
        d->head = NULL;
        d->count = 0;
        pthread_mutex_unlock(&d->mu);
        free_chain(chain);
    }
}

void mt_pool_get_stats(mt_pool_stats *out)
{
    out->mallocs = atomic_load_explicit(&stat_mallocs, memory_order_relaxed);
    out->frees = atomic_load_explicit(&stat_frees, memory_order_relaxed);
    out->depot_blocks = 0;
    for (int i = 0; i < MT_POOL_CLASSES; i++) {
        pthread_mutex_lock(&depots[i].mu);
        out->depot_blocks += depots[i].count;
        pthread_mutex_unlock(&depots[i].mu);
    }
}
