#include "waker.h"

#include <errno.h>
#include <sys/eventfd.h>
#include <unistd.h>

int mt_waker_init(mt_waker *w)
{
    atomic_init(&w->state, MT_WAKER_RUNNING);
    atomic_init(&w->wakeups_sent, 0);
    atomic_init(&w->wakeups_received, 0);
    w->fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    return w->fd < 0 ? -1 : 0;
}

void mt_waker_close(mt_waker *w)
{
    if (w->fd >= 0)
        close(w->fd);
    w->fd = -1;
}

void mt_waker_prepare_sleep(mt_waker *w)
{
    atomic_store_explicit(&w->state, MT_WAKER_SLEEPING, memory_order_relaxed);
    atomic_thread_fence(memory_order_seq_cst);
}

void mt_waker_awake(mt_waker *w)
{
    atomic_store_explicit(&w->state, MT_WAKER_RUNNING, memory_order_relaxed);
}

void mt_waker_drain(mt_waker *w)
{
    uint64_t count;
    ssize_t n;
    do {
        n = read(w->fd, &count, sizeof(count));
    } while (n < 0 && errno == EINTR);
    if (n == (ssize_t)sizeof(count))
        atomic_fetch_add_explicit(&w->wakeups_received, 1, memory_order_relaxed);
}

bool mt_waker_notify(mt_waker *w)
{
    atomic_thread_fence(memory_order_seq_cst);
    int expected = MT_WAKER_SLEEPING;
    if (atomic_load_explicit(&w->state, memory_order_relaxed) != MT_WAKER_SLEEPING ||
        !atomic_compare_exchange_strong_explicit(&w->state, &expected, MT_WAKER_NOTIFIED,
                                                 memory_order_acq_rel,
                                                 memory_order_relaxed))
        return false;
    uint64_t one = 1;
    ssize_t n;
    do {
        n = write(w->fd, &one, sizeof(one));
    } while (n < 0 && errno == EINTR);
    /* EAGAIN means the counter is saturated: the consumer is woken anyway. */
    atomic_fetch_add_explicit(&w->wakeups_sent, 1, memory_order_relaxed);
    return true;
}
