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
 * the GIL held, except `threadsafe` (MPSC: any thread pushes), `waker`
 * (atomics) and `owner_thread`/`running` (atomics read by any thread). */
#ifndef MT_LOOP_H
#define MT_LOOP_H

#include "pyext/compat.h"

#include <stdatomic.h>
#include <stdbool.h>

#include "io_threads/mpsc_queue.h"
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
    mt_waker waker;

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

#endif
