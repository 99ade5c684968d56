#include "timer_heap.h"

#include <stdlib.h>

static inline int earlier(const mt_timer *a, const mt_timer *b)
{
    if (a->when != b->when)
        return a->when < b->when;
    return a->seq < b->seq;
}

static void sift_up(mt_timer *items, size_t i)
{
    mt_timer t = items[i];
    while (i > 0) {
        size_t parent = (i - 1) / 2;
        if (!earlier(&t, &items[parent]))
            break;
        items[i] = items[parent];
        i = parent;
    }
    items[i] = t;
}

static void sift_down(mt_timer *items, size_t len, size_t i)
{
    mt_timer t = items[i];
    for (;;) {
        size_t child = 2 * i + 1;
        if (child >= len)
            break;
        if (child + 1 < len && earlier(&items[child + 1], &items[child]))
            child++;
        if (!earlier(&items[child], &t))
            break;
        items[i] = items[child];
        i = child;
    }
    items[i] = t;
}

void mt_timer_heap_init(mt_timer_heap *h)
{
    h->items = NULL;
    h->len = 0;
    h->cap = 0;
    h->next_seq = 0;
}

void mt_timer_heap_free(mt_timer_heap *h)
{
    free(h->items);
    mt_timer_heap_init(h);
}

int mt_timer_heap_push(mt_timer_heap *h, double when, void *data)
{
    if (h->len == h->cap) {
        size_t cap = h->cap ? h->cap * 2 : 64;
        mt_timer *items = realloc(h->items, cap * sizeof(*items));
        if (items == NULL)
            return -1;
        h->items = items;
        h->cap = cap;
    }
    h->items[h->len] = (mt_timer){.when = when, .seq = h->next_seq++, .data = data};
    sift_up(h->items, h->len);
    h->len++;
    return 0;
}

const mt_timer *mt_timer_heap_peek(const mt_timer_heap *h)
{
    return h->len ? &h->items[0] : NULL;
}

int mt_timer_heap_pop(mt_timer_heap *h, mt_timer *out)
{
    if (h->len == 0)
        return -1;
    *out = h->items[0];
    h->len--;
    if (h->len) {
        h->items[0] = h->items[h->len];
        sift_down(h->items, h->len, 0);
    }
    return 0;
}

size_t mt_timer_heap_filter(mt_timer_heap *h,
                            int (*keep)(void *data, void *arg),
                            void (*drop)(void *data, void *arg), void *arg)
{
    size_t kept = 0, dropped = 0;
    for (size_t i = 0; i < h->len; i++) {
        if (keep(h->items[i].data, arg)) {
            h->items[kept++] = h->items[i];
        } else {
            drop(h->items[i].data, arg);
            dropped++;
        }
    }
    h->len = kept;
    for (size_t i = kept / 2; i-- > 0;)
        sift_down(h->items, h->len, i);
    return dropped;
}
