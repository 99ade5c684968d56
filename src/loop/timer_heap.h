/* A binary min-heap of timers ordered by (when, seq).
 *
 * Owned by the loop thread.  `seq` is assigned on push, so timers due at
 * the same instant fire in the order they were scheduled.  Cancelled timers
 * are removed lazily: the loop pops them when they reach the top, or
 * compacts the heap with mt_timer_heap_filter() once they are the majority. */
#ifndef MT_TIMER_HEAP_H
#define MT_TIMER_HEAP_H

#include <stddef.h>
#include <stdint.h>

typedef struct mt_timer {
    double when;
    uint64_t seq;
    void *data;
} mt_timer;

typedef struct mt_timer_heap {
    mt_timer *items;
    size_t len;
    size_t cap;
    uint64_t next_seq;
} mt_timer_heap;

void mt_timer_heap_init(mt_timer_heap *h);
void mt_timer_heap_free(mt_timer_heap *h);
/* Returns 0, or -1 when memory runs out (the heap is unchanged). */
int mt_timer_heap_push(mt_timer_heap *h, double when, void *data);
/* The earliest timer, or NULL when empty.  Valid until the next change. */
const mt_timer *mt_timer_heap_peek(const mt_timer_heap *h);
/* Removes the earliest timer into *out; returns 0, or -1 when empty. */
int mt_timer_heap_pop(mt_timer_heap *h, mt_timer *out);
/* Keeps the timers for which keep(data, arg) is nonzero and passes every
 * other one to drop(data, arg), then restores the heap order in O(n).
 * Returns the number dropped. */
size_t mt_timer_heap_filter(mt_timer_heap *h,
                            int (*keep)(void *data, void *arg),
                            void (*drop)(void *data, void *arg), void *arg);

static inline size_t mt_timer_heap_len(const mt_timer_heap *h) { return h->len; }

#endif
