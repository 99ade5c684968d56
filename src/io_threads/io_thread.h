/* An I/O thread's own state: shared by the files of src/io_threads/ only
 * (runtime.c runs the thread, record.c serves its records). */
#ifndef MT_IO_THREAD_H
#define MT_IO_THREAD_H

#include "io_threads/runtime.h"

#include <time.h>

#define MT_BATCH_SINKS 8

/* Quiet completions (mt_io_thread_emit_quiet) wake the loop anyway once
 * they hold this many bytes since this thread last woke one: they are
 * buffers the loop lets go of, and a loop that sleeps must not keep them
 * without bound. */
#define MT_QUIET_BYTES_MAX ((uint64_t)1024 * 1024)

/* An inline runtime's handlers run inside its loop's wait, and what they
 * read waits in records until the wait returns: past this much pool memory
 * held so, the wait ends early (event_base_loopbreak) and the rest of the
 * ready fds are served by the next one.  Without it a wait that found
 * thousands of fds readable held a read block for each: a storm of 10,000
 * connections peaked at twice uvloop's RSS and page faults, and its reads
 * went into memory long out of cache.  Not much less: each early end costs
 * one more epoll_wait, which reports the same thousands of ready fds again
 * (at 1 MiB the storm's system time doubled). */
#define MT_INLINE_HELD_MAX ((size_t)8 * 1024 * 1024)

struct mt_io_thread {
    int index;                 /* immutable; -1 when inline */
    bool is_inline;            /* immutable: run by its loop's thread */
    pthread_t thread;          /* immutable once started */
    _Atomic int refs;          /* the registry's, each record's, each loop's */
    mt_mpsc_queue commands;    /* any thread pushes; this thread pops */
    mt_waker waker;            /* shared (atomics) */
    _Atomic bool stopped;      /* set by the stopper before STOP is posted */
    _Atomic bool unpark;       /* a loop gave a lane room: set by that loop,
                                  taken by this thread (mt_io_thread_kick) */
    _Atomic long native_id;    /* the thread's kernel id, set when it starts */
    mt_io_stats stats;         /* written by this thread, read by anyone */
    mt_msg stop_msg;           /* posted once by mt_runtime_stop() */
    mt_io_thread *stopping_next; /* the registry's list, under its mutex */

    /* This thread only. */
    struct event_base *base;
    struct event *waker_event;
    mt_record *owned;          /* attached records */
    mt_record *dirty_head, *dirty_tail;
    mt_sink *starved;          /* sinks whose lane holds parked records
                                  (linked through the lanes, mt_lane) */
    bool exiting;
    struct {
        mt_sink *sink;
        mt_msg *first, *last;
        bool wake;             /* a completion the loop must be woken for */
    } batch[MT_BATCH_SINKS];
    int nbatch;
    uint64_t quiet_bytes;      /* held by quiet completions since the last wakeup */
    size_t inline_held;        /* inline: pool bytes emitted since the flush */
    _Atomic uint64_t wait_since; /* written by this thread, read by snapshots:
                                  mt_io_now_ns() when it began to sleep, 0
                                  while it runs */
};

static inline uint64_t mt_io_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* This thread: back to RUNNING as soon as the wait returned, so that
 * producers skip the eventfd write and the loop's direct send sees a busy
 * thread while events are dispatched. */
static inline void mt_io_thread_running(mt_io_thread *io)
{
    if (atomic_load_explicit(&io->waker.state, memory_order_relaxed) == MT_WAKER_RUNNING)
        return;
    mt_waker_awake(&io->waker);
    uint64_t since = atomic_load_explicit(&io->wait_since, memory_order_relaxed);
    if (since != 0) {
        mt_counter_add(&io->stats.wait_ns, mt_io_now_ns() - since);
        atomic_store_explicit(&io->wait_since, 0, memory_order_release);
    }
}

/* record.c, for the thread body. */
void mt_io_thread_flush_batches(mt_io_thread *io);
void mt_io_thread_service_dirty(mt_io_thread *io);
/* A loop popped enough of what this thread's lane held for it that the
 * parked records may read again: wakes the thread to restart them.  Loop
 * thread (sink.c). */
void mt_io_thread_kick(mt_io_thread *io);
/* The kick's other half, on the thread: parked records resume, oldest
 * first, while their lane has room. */
void mt_io_thread_unpark(mt_io_thread *io);
/* A control link was popped: take the record's bits and queue it dirty. */
void mt_io_thread_take_control(mt_io_thread *io, mt_record *rec);
/* sink.c: SINK_CLOSE's sink, and its acknowledgement (after which the
 * message is gone). */
mt_sink *mt_sink_close_target(mt_msg *msg);
void mt_sink_close_done(mt_msg *msg);
/* Drops the attached records of `sink` (all of them when NULL), and lets
 * go of those that were parked. */
void mt_io_thread_drop_sink(mt_io_thread *io, mt_sink *sink);

#endif
