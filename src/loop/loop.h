/* LoopCore: the C base of mtloop.Loop.
 *
 * It holds the hot state of an event loop (ready queue, timer heap, the
 * call_soon_threadsafe queue and its waker, fd watchers) and runs one
 * iteration at a time in _run_once(), waiting in the loop thread's own
 * libevent base with the GIL released.  The Python class mtloop.Loop puts
 * asyncio.BaseEventLoop's cold paths (run_until_complete, exception
 * handling, executors, address resolution) on top.
 *
 * Ownership: everything here belongs to the loop thread and is touched with
 * the GIL held, except `threadsafe` (MPSC: any thread pushes), `sink`
 * (reference-counted; I/O threads push completions and write its waker)
 * and `owner_thread`/`running` (atomics read by any thread).  `io[]` are
 * shared pool threads, reached only through their command queues. */
#ifndef MT_LOOP_H
#define MT_LOOP_H

#include "pyext/compat.h"

#include <stdatomic.h>
#include <stdbool.h>

#include "io_threads/mpsc_queue.h"
#include "io_threads/runtime.h"
#include "io_threads/waker.h"
#include "loop/ready_queue.h"
#include "loop/timer_heap.h"

struct event_base;
struct event;
typedef struct mt_fd_watch mt_fd_watch;
typedef struct mt_loop mt_loop;

/* An fd event reported by libevent during a wait: recorded without the GIL
 * and turned into ready handles after the wait. */
typedef struct mt_fired {
    int fd;
    short what;
} mt_fired;

struct mt_loop {
    PyObject_HEAD
    struct event_base *base;
    struct event *waker_event;     /* the waker's eventfd, always watched */
    struct event *timeout_event;   /* armed for the nearest timer while waiting */

    mt_ready_queue ready;          /* strong references to handles */
    mt_timer_heap timers;          /* strong references to timer handles */
    Py_ssize_t timer_cancelled_count;

    mt_mpsc_queue threadsafe;      /* call_soon_threadsafe from other threads */
    mt_sink *sink;                 /* completions from I/O threads; its waker
                                      also serves call_soon_threadsafe */

    /* The I/O threads this loop spreads its transports over (acquired on
     * first use; a reference each). */
    int io_count;
    bool io_acquired;
    unsigned io_next;              /* round robin */
    mt_io_thread *io[MT_IO_THREADS_MAX];
    unsigned fork_generation;      /* of the process that made the loop */
    mt_record *live;               /* records whose loop half is open: the
                                      list holds a reference to each owner */

    mt_fd_watch *watches;          /* indexed by fd */
    size_t watches_len;
    mt_fired *fired;               /* filled by libevent callbacks during a wait */
    size_t fired_len, fired_cap;

    _Atomic unsigned long owner_thread; /* thread running the loop, if running */
    _Atomic bool running;

    bool stopping;
    bool debug;
    bool closed;
    bool core_closed;              /* C resources released */
    double slow_callback_duration;
    double clock_resolution;

    /* The opt-in spin before a wait (loop_run_once), loop thread only. */
    int64_t spin_ns;               /* budget per wait; 0: never spin */
    unsigned spin_misses;          /* spins in a row that caught nothing */
    unsigned spin_backoff;         /* waits to skip after the next run of misses */
    unsigned spin_skip;            /* waits left to skip */
    uint64_t spins, spins_caught, spins_skipped; /* counts, for the tests */
    /* Completion batches (drain_completions), loop thread only. */
    uint64_t completion_batches;   /* drains that found completions */
    uint64_t completions;          /* completions dispatched */
    uint64_t deepest_batch;        /* the most one drain dispatched */
    PyObject *current_handle;
};

extern PyTypeObject mt_LoopCoreType;

/* The loop's clock: CLOCK_MONOTONIC in seconds, as time.monotonic(). */
double mt_loop_time(void);

/* Reports an exception raised by a handle's callback through the Python
 * loop's exception handler.  Steals `exc`. */
int mt_loop_report_callback_error(mt_loop *loop, PyObject *handle, PyObject *exc);

/* The debug-mode creation traceback for a new handle, or NULL. */
PyObject *mt_loop_source_traceback(mt_loop *loop);

int mt_loop_type_init(PyObject *module);

/* ---- for transports: the loop's half of the seam ---------------------- */

/* What the loop calls on a record's loop half.  A record kind provides one
 * table (mt_record.loop_ops) and the loop dispatches every completion
 * through it, so the loop knows no transport kind. */
typedef struct mt_loop_ops {
    /* Loop thread, GIL held: one completion of the record (msg->rec).
     * Takes `msg`.  Returns -1 only for an exception that must leave the
     * run loop (KeyboardInterrupt, SystemExit). */
    int (*dispatch)(mt_loop *loop, mt_msg *msg);
    /* Loop thread: a completion the loop will not dispatch (it is
     * closing).  Frees `msg` and what its payload owns (an accepted fd). */
    void (*discard)(mt_msg *msg);
    /* Loop thread: the loop is closing and its I/O threads have dropped
     * the record: the loop half lets go of its Python objects and the
     * record, and unlinks it (mt_loop_unlink). */
    void (*detach)(mt_loop *loop, mt_record *rec);
} mt_loop_ops;

/* Raises RuntimeError (and returns -1) when the loop is closed or was made
 * before a fork() in another process. */
int mt_loop_check_usable(mt_loop *loop);
/* Raises RuntimeError (and returns -1) in a child of fork() for a loop the
 * parent made: nothing of the parent's may be touched there. */
int mt_loop_check_fork(mt_loop *loop);
/* The I/O thread for a new record (round robin), starting the pool on
 * first use.  NULL with an exception set on failure. */
mt_io_thread *mt_loop_pick_io(mt_loop *loop);
/* Puts a record on the loop's list of open records, which keeps its owner
 * (rec->owner, a PyObject) alive, as a selector's registration keeps the
 * stock loop's transports; closing the loop detaches every record still
 * on it.  mt_loop_unlink takes it off (and drops that reference). */
void mt_loop_link(mt_loop *loop, mt_record *rec);
void mt_loop_unlink(mt_loop *loop, mt_record *rec);
/* Whether the loop thread may send a record's output itself now instead of
 * queueing it for `io`, the record's I/O thread: always with inline I/O
 * (this thread is the I/O thread, and asyncio tries the socket first too);
 * otherwise only when that saves a wakeup and nothing else waits for the
 * loop: `io` sleeps (and runs), and the loop has no ready callback or
 * completion queued.  Under a burst the I/O thread sends (batched) while
 * the loop thread runs Python.  The caller makes sure that nothing of the
 * record's is queued ahead (its output marks). */
bool mt_loop_may_send_directly(mt_loop *loop, mt_io_thread *io);

#endif
