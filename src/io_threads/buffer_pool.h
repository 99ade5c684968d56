/* Recycled memory for commands and completions.
 *
 * Every request moves its bytes through one block allocated on one thread
 * and freed on another (a completion: I/O thread -> loop; a write: loop ->
 * I/O thread).  Handed to malloc, blocks of tens of KiB made glibc trim and
 * regrow its heaps on every request: 17-29 page faults per 64 KiB echo on
 * the development VM, half of mtloop's CPU in the heavy-handler benchmark.
 * The pool keeps such blocks instead.
 *
 * Size classes are powers of two from 128 B to 128 KiB; bigger requests go
 * to malloc.  Each thread keeps a small cache per class and trades whole
 * batches with a shared depot under a per-class mutex, so a block freed by
 * the loop thread comes back to the I/O thread that reads into it without
 * a lock per block.  The depot keeps at most MT_POOL_DEPOT_BYTES and at
 * most MT_POOL_DEPOT_BLOCKS blocks per class; the rest goes back to malloc.
 * (Without the block cap, the small records of a storm of 10,000 accepted
 * connections stayed in the depot: 0.5 KiB of RSS per idle connection.)
 *
 * Any thread may allocate and free; a thread's cache goes back to the
 * depot when the thread exits (blocks a later thread-exit hook frees stay
 * in that dead thread's cache).  A child of fork() keeps the depot, its
 * own copy of that free memory; the other threads' caches are lost. */
#ifndef MT_BUFFER_POOL_H
#define MT_BUFFER_POOL_H

#include <stddef.h>
#include <stdint.h>

#define MT_POOL_MIN_SHIFT 7   /* 128 B */
#define MT_POOL_MAX_SHIFT 17  /* 128 KiB */
#define MT_POOL_CLASSES (MT_POOL_MAX_SHIFT - MT_POOL_MIN_SHIFT + 1)
#define MT_POOL_NONE 0xff     /* the class of a block malloc gave */
#define MT_POOL_DEPOT_BYTES (4u * 1024 * 1024)
#define MT_POOL_DEPOT_BLOCKS 256u

/* A block of at least `size` bytes, or NULL (errno ENOMEM).  `*cls` gets
 * the class to pass back to mt_pool_free(). */
void *mt_pool_alloc(size_t size, uint8_t *cls);
void mt_pool_free(void *block, uint8_t cls);

/* Bytes a block of class `cls` can hold (0 for MT_POOL_NONE).  Inline:
 * the lanes ask it for every completion, on both sides (runtime.h). */
static inline size_t mt_pool_class_size(uint8_t cls)
{
    return cls < MT_POOL_CLASSES ? (size_t)1 << (cls + MT_POOL_MIN_SHIFT) : 0;
}

/* Counters for tests and introspection (racy reads, any thread). */
typedef struct mt_pool_stats {
    uint64_t mallocs;      /* blocks taken from malloc */
    uint64_t frees;        /* blocks given back to malloc */
    uint64_t depot_blocks; /* blocks in the depot now */
} mt_pool_stats;
void mt_pool_get_stats(mt_pool_stats *out);

/* Gives the calling thread's cached blocks back to the depot (done
 * automatically at thread exit). */
void mt_pool_flush_thread(void);
/* Frees every block in the depot and the calling thread's cache. */
void mt_pool_trim(void);

#endif
