#include "ready_queue.h"

#include <stdlib.h>

void mt_ready_queue_init(mt_ready_queue *q)
{
    q->items = NULL;
    q->head = 0;
    q->len = 0;
    q->mask = (size_t)-1;
}

void mt_ready_queue_free(mt_ready_queue *q)
{
    free(q->items);
    mt_ready_queue_init(q);
}

static int grow(mt_ready_queue *q)
{
    size_t cap = q->items ? q->mask + 1 : 0;
    size_t new_cap = cap ? cap * 2 : 64;
    void **items = malloc(new_cap * sizeof(*items));
    if (items == NULL)
        return -1;
    /* Unwrap the ring so the new one starts at index 0. */
    for (size_t i = 0; i < q->len; i++)
        items[i] = q->items[(q->head + i) & q->mask];
    free(q->items);
    q->items = items;
    q->head = 0;
    q->mask = new_cap - 1;
    return 0;
}

int mt_ready_queue_push(mt_ready_queue *q, void *item)
{
    if (q->items == NULL || q->len == q->mask + 1) {
        if (grow(q) < 0)
            return -1;
    }
    q->items[(q->head + q->len) & q->mask] = item;
    q->len++;
    return 0;
}

void *mt_ready_queue_pop(mt_ready_queue *q)
{
    if (q->len == 0)
        return NULL;
    void *item = q->items[q->head];
    q->head = (q->head + 1) & q->mask;
    q->len--;
    return item;
}

void *mt_ready_queue_peek(const mt_ready_queue *q, size_t i)
{
    if (i >= q->len)
        return NULL;
    return q->items[(q->head + i) & q->mask];
}
