/* Wake-only-a-sleeper protocol between queue producers and one consumer.
 *
 * The consumer announces it is about to block with mt_waker_prepare_sleep(),
 * re-checks its queues, and then blocks on the eventfd (directly or through
 * an event base).  A producer pushes first, then calls mt_waker_notify(),
 * which writes the eventfd only when it finds the consumer asleep and is the
 * one to flip it to NOTIFIED, so a burst of producers costs one syscall.
 * Both sides put a sequentially consistent fence between their store and
 * their load (Dekker's pattern): either the producer sees SLEEPING or the
 * consumer sees the pushed item, so no wakeup is lost.
 *
 * Ownership: `state` and the counters are atomics shared by all threads;
 * `fd` is set once at init and only read afterwards. */
#ifndef MT_WAKER_H
#define MT_WAKER_H

#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>

enum {
    MT_WAKER_RUNNING = 0,  /* consumer is working; producers do nothing */
    MT_WAKER_SLEEPING = 1, /* consumer is (about to be) blocked on fd */
    MT_WAKER_NOTIFIED = 2, /* a producer has written (or is writing) fd */
};

typedef struct mt_waker {
    _Atomic int state;
    int fd;                            /* eventfd, non-blocking */
    _Atomic uint64_t wakeups_sent;     /* eventfd writes by producers */
    _Atomic uint64_t wakeups_received; /* eventfd reads that found a count */
} mt_waker;

/* Returns 0, or -1 with errno set. */
int mt_waker_init(mt_waker *w);
void mt_waker_close(mt_waker *w);

/* Consumer: store SLEEPING and fence.  The caller must re-check its queues
 * afterwards and call mt_waker_awake() instead of blocking if any is
 * non-empty. */
void mt_waker_prepare_sleep(mt_waker *w);
/* Consumer: back to RUNNING after a wait (or instead of one). */
void mt_waker_awake(mt_waker *w);
/* Consumer: clear the eventfd after it became readable. */
void mt_waker_drain(mt_waker *w);

/* Producer, after pushing: wakes the consumer if it sleeps.  Returns true
 * when this call wrote the eventfd. */
bool mt_waker_notify(mt_waker *w);

#endif
