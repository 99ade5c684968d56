/* A growable FIFO ring of opaque pointers: the loop's ready queue.
 *
 * Owned by the loop thread; no internal locking.  The loop pushes handles
 * at the tail and pops them from the head; capacity doubles on demand and
 * is always a power of two so the index wrap is a mask. */
#ifndef MT_READY_QUEUE_H
#define MT_READY_QUEUE_H

#include <stddef.h>

typedef struct mt_ready_queue {
    void **items;
    size_t head;     /* index of the first item */
    size_t len;      /* number of items */
    size_t mask;     /* capacity - 1; capacity is 0 before the first push */
} mt_ready_queue;

void mt_ready_queue_init(mt_ready_queue *q);
/* Frees the storage; items still queued are not touched. */
void mt_ready_queue_free(mt_ready_queue *q);
/* Returns 0, or -1 when memory runs out (the queue is unchanged). */
int mt_ready_queue_push(mt_ready_queue *q, void *item);
/* Returns the head item, or NULL when empty. */
void *mt_ready_queue_pop(mt_ready_queue *q);
/* The i-th item from the head (i < len), without removing it. */
void *mt_ready_queue_peek(const mt_ready_queue *q, size_t i);

static inline size_t mt_ready_queue_len(const mt_ready_queue *q) { return q->len; }

#endif
