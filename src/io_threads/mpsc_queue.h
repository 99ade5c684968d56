/* An intrusive multi-producer single-consumer FIFO (Vyukov's design).
 *
 * Any thread may push; only the owning consumer thread pops.  A push is one
 * atomic exchange and one release store, never allocates (the node lives
 * inside the record being queued) and never blocks.  A pop can transiently
 * see a producer that has swapped the head but not yet linked its node: it
 * then returns NULL although the queue is not empty, and
 * mt_mpsc_queue_is_empty() tells the consumer to come back instead of
 * sleeping.
 *
 * Ownership: `head` is shared (atomic); `tail` and `stub` linkage are owned
 * by the consumer, except stub.next which producers store with release. */
#ifndef MT_MPSC_QUEUE_H
#define MT_MPSC_QUEUE_H

#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>

typedef struct mt_mpsc_node {
    _Atomic(struct mt_mpsc_node *) next;
} mt_mpsc_node;

typedef struct mt_mpsc_queue {
    _Atomic(mt_mpsc_node *) head; /* last pushed node; producers swap it */
    mt_mpsc_node *tail;           /* next node to pop; consumer only */
    mt_mpsc_node stub;            /* sentinel that keeps the list non-empty */
} mt_mpsc_queue;

#define MT_CONTAINER_OF(ptr, type, member) \
    ((type *)((char *)(ptr) - offsetof(type, member)))

static inline void mt_mpsc_queue_init(mt_mpsc_queue *q)
{
    atomic_store_explicit(&q->stub.next, NULL, memory_order_relaxed);
    atomic_store_explicit(&q->head, &q->stub, memory_order_relaxed);
    q->tail = &q->stub;
}

/* Pushes the chain first..last, already linked through `next`, in one
 * exchange.  Any thread. */
static inline void mt_mpsc_queue_push_chain(mt_mpsc_queue *q, mt_mpsc_node *first,
                                            mt_mpsc_node *last)
{
    atomic_store_explicit(&last->next, NULL, memory_order_relaxed);
    mt_mpsc_node *prev = atomic_exchange_explicit(&q->head, last, memory_order_acq_rel);
    atomic_store_explicit(&prev->next, first, memory_order_release);
}

/* Any thread. */
static inline void mt_mpsc_queue_push(mt_mpsc_queue *q, mt_mpsc_node *node)
{
    mt_mpsc_queue_push_chain(q, node, node);
}

/* Consumer only.  True when nothing is queued and no push is in flight. */
static inline bool mt_mpsc_queue_is_empty(mt_mpsc_queue *q)
{
    return q->tail == &q->stub &&
           atomic_load_explicit(&q->stub.next, memory_order_acquire) == NULL &&
           atomic_load_explicit(&q->head, memory_order_acquire) == &q->stub;
}

/* Consumer only.  The oldest node, or NULL when the queue is empty or a
 * producer is half-way through a push (see mt_mpsc_queue_is_empty). */
static inline mt_mpsc_node *mt_mpsc_queue_pop(mt_mpsc_queue *q)
{
    mt_mpsc_node *tail = q->tail;
    mt_mpsc_node *next = atomic_load_explicit(&tail->next, memory_order_acquire);
    if (tail == &q->stub) {
        if (next == NULL)
            return NULL;
        q->tail = next;
        tail = next;
        next = atomic_load_explicit(&tail->next, memory_order_acquire);
    }
    if (next != NULL) {
        q->tail = next;
        return tail;
    }
    if (tail != atomic_load_explicit(&q->head, memory_order_acquire))
        return NULL; /* a producer has swapped head but not linked yet */
    mt_mpsc_queue_push(q, &q->stub);
    next = atomic_load_explicit(&tail->next, memory_order_acquire);
    if (next != NULL) {
        q->tail = next;
        return tail;
    }
    return NULL;
}

#endif
