/* LoopCore: scheduling and the run loop.  See loop.h. */
#include "loop/loop.h"

#include <errno.h>
#include <event2/event.h>
#include <math.h>
#include <string.h>
#include <structmember.h>
#include <time.h>

#include "loop/fd_watch.h"
#include "loop/handle.h"
#include "pyext/module.h"

/* A call_soon_threadsafe() handle on its way through the MPSC queue. */
typedef struct mt_pending {
    mt_mpsc_node node;
    PyObject *handle; /* strong reference */
} mt_pending;

/* asyncio's cap on one wait, so a clock jump cannot park the loop forever. */
#define MT_MAX_WAIT_SECONDS (24.0 * 3600.0)
/* Compact the timer heap when more than half of at least this many are cancelled. */
#define MT_MIN_TIMERS_FOR_COMPACTION 100
/* Completions dispatched per iteration at most. */
#define MT_MAX_COMPLETIONS_PER_ITERATION 4096

double mt_loop_time(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static PyObject *loop_closed_error(void)
{
    PyErr_SetString(PyExc_RuntimeError, "Event loop is closed");
    return NULL;
}

static inline bool on_owner_thread(mt_loop *self)
{
    return atomic_load_explicit(&self->owner_thread, memory_order_relaxed) ==
           PyThread_get_thread_ident();
}

/* ---- cold paths delegated to the Python class --------------------------- */

int mt_loop_report_callback_error(mt_loop *loop, PyObject *handle, PyObject *exc)
{
    PyObject *res = PyObject_CallMethod((PyObject *)loop, "_mt_callback_error", "OO",
                                        handle, exc);
    Py_DECREF(exc);
    if (res == NULL)
        return -1;
    Py_DECREF(res);
    return 0;
}

PyObject *mt_loop_source_traceback(mt_loop *loop)
{
    (void)loop;
    return mt_call_helper("extract_stack", NULL, 0);
}

/* In debug mode asyncio checks the calling thread and the callback. */
static int debug_checks(mt_loop *self, PyObject *callback, const char *method, bool thread)
{
    PyObject *res;
    if (thread) {
        res = PyObject_CallMethod((PyObject *)self, "_check_thread", NULL);
        if (res == NULL)
            return -1;
        Py_DECREF(res);
    }
    res = PyObject_CallMethod((PyObject *)self, "_check_callback", "Os", callback, method);
    if (res == NULL)
        return -1;
    Py_DECREF(res);
    return 0;
}

/* ---- argument parsing ------------------------------------------------- */

/* Splits f(<npos fixed>, *args, context=None) called with FASTCALL|KEYWORDS. */
static int parse_call_args(const char *fname, const char *const *posnames, Py_ssize_t npos,
                           Py_ssize_t nargs, PyObject *kwnames, PyObject *const *args,
                           PyObject **context)
{
    *context = NULL;
    if (kwnames != NULL) {
        Py_ssize_t nkw = PyTuple_GET_SIZE(kwnames);
        for (Py_ssize_t i = 0; i < nkw; i++) {
            PyObject *name = PyTuple_GET_ITEM(kwnames, i);
            if (PyUnicode_CompareWithASCIIString(name, "context") != 0) {
                PyErr_Format(PyExc_TypeError, "%s() got an unexpected keyword argument '%U'",
                             fname, name);
                return -1;
            }
            *context = args[nargs + i];
        }
    }
    if (nargs < npos) {
        PyErr_Format(PyExc_TypeError, "%s() missing required positional argument: '%s'",
                     fname, posnames[nargs]);
        return -1;
    }
    return 0;
}

/* ---- scheduling ------------------------------------------------------- */

static int push_ready(mt_loop *self, PyObject *handle)
{
    if (mt_ready_queue_push(&self->ready, Py_NewRef(handle)) < 0) {
        Py_DECREF(handle);
        PyErr_NoMemory();
        return -1;
    }
    return 0;
}

static PyObject *loop_call_soon(mt_loop *self, PyObject *const *args, Py_ssize_t nargs,
                                PyObject *kwnames)
{
    static const char *const names[] = {"callback"};
    PyObject *context;
    if (parse_call_args("call_soon", names, 1, nargs, kwnames, args, &context) < 0)
        return NULL;
    if (self->closed || self->core_closed)
        return loop_closed_error();
    if (self->debug && debug_checks(self, args[0], "call_soon", true) < 0)
        return NULL;
    PyObject *h = mt_handle_new(self, args[0], args + 1, nargs - 1, context);
    if (h == NULL)
        return NULL;
    if (push_ready(self, h) < 0) {
        Py_DECREF(h);
        return NULL;
    }
    return h;
}

static PyObject *loop_call_soon_threadsafe(mt_loop *self, PyObject *const *args,
                                           Py_ssize_t nargs, PyObject *kwnames)
{
    static const char *const names[] = {"callback"};
    PyObject *context;
    if (parse_call_args("call_soon_threadsafe", names, 1, nargs, kwnames, args, &context) < 0)
        return NULL;
    if (self->closed || self->core_closed)
        return loop_closed_error();
    if (self->debug && debug_checks(self, args[0], "call_soon_threadsafe", false) < 0)
        return NULL;
    PyObject *h = mt_handle_new(self, args[0], args + 1, nargs - 1, context);
    if (h == NULL)
        return NULL;
    /* On the loop's own thread, or while no thread runs the loop, the ready
     * queue is ours under the GIL and appending there keeps asyncio's FIFO
     * order with call_soon().  Another thread hands the handle over through
     * the MPSC queue and wakes the loop only if it sleeps. */
    if (!atomic_load_explicit(&self->running, memory_order_acquire) || on_owner_thread(self)) {
        if (push_ready(self, h) < 0) {
            Py_DECREF(h);
            return NULL;
        }
    } else {
        mt_pending *p = PyMem_RawMalloc(sizeof(*p));
        if (p == NULL) {
            Py_DECREF(h);
            return PyErr_NoMemory();
        }
        p->handle = Py_NewRef(h); /* owned by the queue until drained */
        mt_mpsc_queue_push(&self->threadsafe, &p->node);
        mt_waker_notify(&self->sink->waker);
    }
    return h;
}

static PyObject *schedule_at(mt_loop *self, double when, PyObject *const *args,
                             Py_ssize_t nargs, PyObject *context)
{
    if (self->closed || self->core_closed)
        return loop_closed_error();
    if (self->debug && debug_checks(self, args[0], "call_at", true) < 0)
        return NULL;
    PyObject *t = mt_timer_handle_new(self, when, args[0], args + 1, nargs - 1, context);
    if (t == NULL)
        return NULL;
    if (mt_timer_heap_push(&self->timers, when, Py_NewRef(t)) < 0) {
        Py_DECREF(t);
        Py_DECREF(t);
        return PyErr_NoMemory();
    }
    mt_slot_set(t, mt_handles.scheduled, Py_True);
    return t;
}

static PyObject *loop_call_later(mt_loop *self, PyObject *const *args, Py_ssize_t nargs,
                                 PyObject *kwnames)
{
    static const char *const names[] = {"delay", "callback"};
    PyObject *context;
    if (parse_call_args("call_later", names, 2, nargs, kwnames, args, &context) < 0)
        return NULL;
    if (args[0] == Py_None) {
        PyErr_SetString(PyExc_TypeError, "delay must not be None");
        return NULL;
    }
    double delay = PyFloat_AsDouble(args[0]);
    if (delay == -1.0 && PyErr_Occurred())
        return NULL;
    return schedule_at(self, mt_loop_time() + delay, args + 1, nargs - 1, context);
}

static PyObject *loop_call_at(mt_loop *self, PyObject *const *args, Py_ssize_t nargs,
                              PyObject *kwnames)
{
    static const char *const names[] = {"when", "callback"};
    PyObject *context;
    if (parse_call_args("call_at", names, 2, nargs, kwnames, args, &context) < 0)
        return NULL;
    if (args[0] == Py_None) {
        PyErr_SetString(PyExc_TypeError, "when cannot be None");
        return NULL;
    }
    double when = PyFloat_AsDouble(args[0]);
    if (when == -1.0 && PyErr_Occurred())
        return NULL;
    return schedule_at(self, when, args + 1, nargs - 1, context);
}

static PyObject *loop_time(mt_loop *Py_UNUSED(self), PyObject *Py_UNUSED(ignored))
{
    return PyFloat_FromDouble(mt_loop_time());
}

static PyObject *loop_add_callback(mt_loop *self, PyObject *handle)
{
    if (self->core_closed)
        return loop_closed_error();
    int cancelled = mt_handle_check_cancelled(handle);
    if (cancelled < 0)
        return NULL;
    if (cancelled)
        Py_RETURN_NONE;
    if (push_ready(self, handle) < 0)
        return NULL;
    Py_RETURN_NONE;
}

/* TimerHandle.cancel() reports here, as on the stock loop. */
static PyObject *loop_timer_handle_cancelled(mt_loop *self, PyObject *handle)
{
    if (Py_IS_TYPE(handle, mt_handles.timer_type) &&
        MT_SLOT(handle, mt_handles.scheduled) == Py_True)
        self->timer_cancelled_count++;
    Py_RETURN_NONE;
}

/* ---- fd watchers -------------------------------------------------------- */

/* selectors' rules: an int, or an object whose fileno() gives one. */
static int fileobj_to_fd(PyObject *fileobj)
{
    long fd;
    if (PyLong_Check(fileobj)) {
        fd = PyLong_AsLong(fileobj);
        if (fd == -1 && PyErr_Occurred())
            return -1;
    } else {
        PyObject *res = PyObject_CallMethod(fileobj, "fileno", NULL);
        if (res != NULL && PyLong_Check(res)) {
            fd = PyLong_AsLong(res);
        } else {
            fd = -1;
            if (res != NULL || PyErr_ExceptionMatches(PyExc_AttributeError) ||
                PyErr_ExceptionMatches(PyExc_TypeError) ||
                PyErr_ExceptionMatches(PyExc_ValueError)) {
                PyErr_Clear();
                PyErr_Format(PyExc_ValueError, "Invalid file object: %R", fileobj);
            }
        }
        Py_XDECREF(res);
        if (fd == -1 && PyErr_Occurred())
            return -1;
    }
    if (fd < 0 || fd > INT32_MAX) {
        PyErr_Format(PyExc_ValueError, "Invalid file descriptor: %ld", fd);
        return -1;
    }
    return (int)fd;
}

/* The fd a watcher call names: fileobj_to_fd(), except that a closed
 * socket (fileno() -1) still names the fd it was registered for, as the
 * stock loop's selector finds a registration by the object it was given:
 * a library may close a socket first and unregister it after, and the fd
 * number's next owner must find it unwatched. */
static int watched_fd(mt_loop *self, PyObject *fileobj)
{
    int fd = fileobj_to_fd(fileobj);
    if (fd >= 0 || !PyErr_ExceptionMatches(PyExc_ValueError))
        return fd;
    int found = mt_fd_watch_find(self, fileobj);
    if (found >= 0)
        PyErr_Clear();
    return found;
}

/* Adding or removing a watcher touches the base, which only the loop thread
 * may do; asyncio leaves this unchecked, but here it would corrupt the base. */
static int check_watch_thread(mt_loop *self)
{
    if (atomic_load_explicit(&self->running, memory_order_acquire) && !on_owner_thread(self)) {
        PyErr_SetString(PyExc_RuntimeError,
                        "Non-thread-safe operation invoked on an event loop other "
                        "than the current one");
        return -1;
    }
    return 0;
}

static PyObject *add_watch(mt_loop *self, int dir, PyObject *const *args, Py_ssize_t nargs,
                           const char *fname)
{
    if (nargs < 2) {
        PyErr_Format(PyExc_TypeError, "%s() missing required positional argument: '%s'",
                     fname, nargs == 0 ? "fd" : "callback");
        return NULL;
    }
    int fd = watched_fd(self, args[0]);
    if (fd < 0)
        return NULL;
    if (self->closed || self->core_closed)
        return loop_closed_error();
    if (check_watch_thread(self) < 0)
        return NULL;
    PyObject *h = mt_handle_new(self, args[1], args + 2, nargs - 2, NULL);
    if (h == NULL)
        return NULL;
    if (mt_fd_watch_add(self, fd, dir, h, args[0]) < 0) {
        Py_DECREF(h);
        return NULL;
    }
    return h;
}

static PyObject *remove_watch(mt_loop *self, int dir, PyObject *fileobj)
{
    int fd = watched_fd(self, fileobj);
    if (fd < 0)
        return NULL;
    if (self->closed || self->core_closed)
        Py_RETURN_FALSE;
    if (check_watch_thread(self) < 0)
        return NULL;
    int rc = mt_fd_watch_remove(self, fd, dir);
    if (rc < 0)
        return NULL;
    return PyBool_FromLong(rc);
}

static PyObject *loop_add_reader_handle(mt_loop *self, PyObject *const *args, Py_ssize_t nargs)
{
    return add_watch(self, MT_WATCH_READ, args, nargs, "add_reader");
}

static PyObject *loop_add_writer_handle(mt_loop *self, PyObject *const *args, Py_ssize_t nargs)
{
    return add_watch(self, MT_WATCH_WRITE, args, nargs, "add_writer");
}

static PyObject *none_or_null(PyObject *res)
{
    if (res == NULL)
        return NULL;
    Py_DECREF(res);
    Py_RETURN_NONE;
}

static PyObject *loop_add_reader(mt_loop *self, PyObject *const *args, Py_ssize_t nargs)
{
    return none_or_null(loop_add_reader_handle(self, args, nargs));
}

static PyObject *loop_add_writer(mt_loop *self, PyObject *const *args, Py_ssize_t nargs)
{
    return none_or_null(loop_add_writer_handle(self, args, nargs));
}

static PyObject *loop_remove_reader(mt_loop *self, PyObject *fd)
{
    return remove_watch(self, MT_WATCH_READ, fd);
}

static PyObject *loop_remove_writer(mt_loop *self, PyObject *fd)
{
    return remove_watch(self, MT_WATCH_WRITE, fd);
}

/* ---- the run loop ------------------------------------------------------- */

static void on_waker_event(evutil_socket_t Py_UNUSED(fd), short Py_UNUSED(what), void *arg)
{
    mt_waker_drain(&((mt_loop *)arg)->sink->waker);
}

static void on_timeout_event(evutil_socket_t Py_UNUSED(fd), short Py_UNUSED(what),
                             void *Py_UNUSED(arg))
{
    /* Firing is all it takes: it ends the wait. */
}

/* Moves call_soon_threadsafe handles into the ready queue.  Returns false
 * when a producer was caught mid-push and the queue must be looked at again. */
static bool drain_threadsafe(mt_loop *self)
{
    mt_mpsc_node *node;
    while ((node = mt_mpsc_queue_pop(&self->threadsafe)) != NULL) {
        mt_pending *p = MT_CONTAINER_OF(node, mt_pending, node);
        PyObject *h = p->handle;
        PyMem_RawFree(p);
        /* The queue's reference moves to the ready queue. */
        if (mt_ready_queue_push(&self->ready, h) < 0) {
            /* Out of memory: run it now rather than lose it. */
            if (mt_handle_run(self, h) < 0)
                PyErr_WriteUnraisable(h);
            Py_DECREF(h);
        }
    }
    return mt_mpsc_queue_is_empty(&self->threadsafe);
}

static int keep_live_timer(void *data, void *Py_UNUSED(arg))
{
    return !mt_handle_is_cancelled((PyObject *)data);
}

static void collect_dead_timer(void *data, void *arg)
{
    mt_slot_set((PyObject *)data, mt_handles.scheduled, Py_False);
    /* Released after the heap is consistent again: a release may run code. */
    if (PyList_Append((PyObject *)arg, (PyObject *)data) == 0)
        Py_DECREF(data);
}

static void drop_cancelled_timers(mt_loop *self)
{
    size_t n = mt_timer_heap_len(&self->timers);
    if (n > MT_MIN_TIMERS_FOR_COMPACTION && self->timer_cancelled_count * 2 > (Py_ssize_t)n) {
        PyObject *dead = PyList_New(0);
        if (dead != NULL) {
            mt_timer_heap_filter(&self->timers, keep_live_timer, collect_dead_timer, dead);
            self->timer_cancelled_count = 0;
            Py_DECREF(dead);
            return;
        }
        PyErr_Clear(); /* fall back to trimming the head */
    }
    const mt_timer *top;
    while ((top = mt_timer_heap_peek(&self->timers)) != NULL &&
           mt_handle_is_cancelled((PyObject *)top->data)) {
        mt_timer t;
        mt_timer_heap_pop(&self->timers, &t);
        mt_slot_set((PyObject *)t.data, mt_handles.scheduled, Py_False);
        self->timer_cancelled_count--;
        Py_DECREF((PyObject *)t.data);
    }
}

/* Waits for fd events, a wakeup or the timeout (<0: none) with the GIL
 * released.  libevent's callbacks only record what fired. */
static int wait_for_events(mt_loop *self, double timeout)
{
    int rc;
    if (timeout == 0.0) {
        rc = event_base_loop(self->base, EVLOOP_ONCE | EVLOOP_NONBLOCK);
    } else {
        if (timeout > 0.0) {
            /* Round up so the wait never ends before the timer is due. */
            double usec = ceil(timeout * 1e6);
            struct timeval tv = {.tv_sec = (time_t)(usec / 1e6),
                                 .tv_usec = (suseconds_t)fmod(usec, 1e6)};
            event_add(self->timeout_event, &tv);
        }
        Py_BEGIN_ALLOW_THREADS
        rc = event_base_loop(self->base, EVLOOP_ONCE);
        Py_END_ALLOW_THREADS
        if (timeout > 0.0)
            event_del(self->timeout_event);
    }
    if (rc < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    return 0;
}

static int run_ready(mt_loop *self, PyObject *h)
{
    int cancelled = mt_handle_check_cancelled(h);
    if (cancelled)
        return cancelled < 0 ? -1 : 0;
    return mt_handle_run(self, h);
}

static int run_ready_debug(mt_loop *self, PyObject *h)
{
    Py_XSETREF(self->current_handle, Py_NewRef(h));
    double t0 = mt_loop_time();
    int rc = run_ready(self, h);
    double dt = mt_loop_time() - t0;
    Py_CLEAR(self->current_handle);
    if (rc == 0 && dt >= self->slow_callback_duration) {
        PyObject *res = PyObject_CallMethod((PyObject *)self, "_mt_slow_callback", "Od", h, dt);
        if (res == NULL)
            return -1;
        Py_DECREF(res);
    }
    return rc;
}

/* Runs the first `n` handles of the ready queue. */
static int run_handles(mt_loop *self, size_t n)
{
    for (size_t i = 0; i < n && !self->core_closed; i++) {
        PyObject *h = mt_ready_queue_pop(&self->ready);
        if (h == NULL)
            break;
        int res = self->debug ? run_ready_debug(self, h) : run_ready(self, h);
        Py_DECREF(h);
        if (res < 0)
            return -1;
    }
    return 0;
}

static void count_batch(mt_loop *self, uint64_t n)
{
    if (n == 0)
        return;
    self->completion_batches++;
    self->completions += n;
    if (n > self->deepest_batch)
        self->deepest_batch = n;
}

/* Hands I/O threads' completions to their records' loop halves.  At most
 * a bounded batch per iteration, so a flood cannot starve timers. */
static int drain_completions(mt_loop *self)
{
    uint64_t n = 0;
    int rc = 0;
    for (int i = 0; i < MT_MAX_COMPLETIONS_PER_ITERATION; i++) {
        mt_msg *msg = mt_sink_pop(self->sink);
        if (msg == NULL)
            break;
        n++;
        if (msg->rec->loop_ops->dispatch(self, msg) < 0) {
            rc = -1;
            break;
        }
    }
    mt_sink_return(self->sink); /* the lanes' room, before the loop runs callbacks */
    count_batch(self, n);
    return rc;
}

static PyObject *forked_error(void)
{
    PyErr_SetString(PyExc_RuntimeError,
                    "this mtloop event loop was created before os.fork() in the parent "
                    "process and cannot be used in the child; create a new event loop");
    return NULL;
}

int mt_loop_check_fork(mt_loop *loop)
{
    if (loop->fork_generation != mt_fork_generation()) {
        forked_error();
        return -1;
    }
    return 0;
}

int mt_loop_check_usable(mt_loop *loop)
{
    if (mt_loop_check_fork(loop) < 0)
        return -1;
    if (loop->core_closed || loop->closed) {
        loop_closed_error();
        return -1;
    }
    return 0;
}

static void release_io(mt_loop *loop)
{
    if (!loop->io_acquired)
        return;
    loop->io_acquired = false;
    for (int i = 0; i < loop->io_count; i++)
        mt_io_thread_decref(loop->io[i]);
}

/* The loop's inline runtime when it has one in use, else NULL. */
static mt_io_thread *inline_in_use(mt_loop *loop)
{
    return loop->io_count == 0 && loop->io_acquired ? loop->io[0] : NULL;
}

/* The loop's inline runtime (io_threads=0), made on first use. */
static mt_io_thread *inline_io(mt_loop *loop)
{
    if (!loop->io_acquired) {
        loop->io[0] = mt_io_inline_new(loop->base);
        if (loop->io[0] == NULL) {
            PyErr_NoMemory();
            return NULL;
        }
        loop->io_acquired = true;
    }
    return loop->io[0];
}

mt_io_thread *mt_loop_pick_io(mt_loop *loop)
{
    if (mt_loop_check_usable(loop) < 0)
        return NULL;
    if (loop->io_count == 0)
        return inline_io(loop);
    unsigned i = loop->io_next++ % (unsigned)loop->io_count;
    if (!loop->io_acquired || mt_io_thread_stopped(loop->io[i])) {
        /* First use, or the pool was shut down and restarted since. */
        mt_io_thread *io[MT_IO_THREADS_MAX];
        if (mt_runtime_acquire(loop->io_count, io) < 0) {
            if (errno == ESHUTDOWN)
                PyErr_SetString(PyExc_RuntimeError,
                                "mtloop's I/O threads were shut down at interpreter exit");
            else
                PyErr_SetFromErrno(PyExc_OSError);
            return NULL;
        }
        release_io(loop);
        memcpy(loop->io, io, (size_t)loop->io_count * sizeof(*io));
        loop->io_acquired = true;
    }
    return loop->io[i];
}

void mt_loop_link(mt_loop *loop, mt_record *rec)
{
    Py_INCREF((PyObject *)rec->owner);
    rec->live_prev = NULL;
    rec->live_next = loop->live;
    if (loop->live)
        loop->live->live_prev = rec;
    loop->live = rec;
}

void mt_loop_unlink(mt_loop *loop, mt_record *rec)
{
    if (rec->live_prev)
        rec->live_prev->live_next = rec->live_next;
    else if (loop->live == rec)
        loop->live = rec->live_next;
    else
        return; /* not linked */
    if (rec->live_next)
        rec->live_next->live_prev = rec->live_prev;
    rec->live_prev = rec->live_next = NULL;
    Py_DECREF((PyObject *)rec->owner);
}

bool mt_loop_may_send_directly(mt_loop *loop, mt_io_thread *io)
{
    if (mt_io_thread_is_inline(io))
        return true;
    return mt_ready_queue_len(&loop->ready) == 0 && mt_mpsc_queue_is_empty(&loop->sink->queue) &&
           mt_io_thread_sleeping(io) && !mt_io_thread_stopped(io);
}

/* Makes every I/O thread let go of this loop's records, waiting (without
 * the GIL) until they have; then frees what they had already sent and
 * detaches the loop halves still open. */
static void close_sink(mt_loop *self)
{
    if (self->sink == NULL)
        return;
    if (self->fork_generation == mt_fork_generation() && self->io_acquired) {
        if (inline_in_use(self) != NULL) {
            mt_io_inline_close(self->io[0], self->sink); /* takes the reference */
            self->io_acquired = false;
        } else {
            Py_BEGIN_ALLOW_THREADS
            mt_runtime_close_sink(self->sink, self->io, self->io_count);
            Py_END_ALLOW_THREADS
        }
        mt_msg *msg;
        while ((msg = mt_sink_pop(self->sink)) != NULL)
            msg->rec->loop_ops->discard(msg);
    }
    /* After fork() the parent's threads are gone and nothing drains what
     * they held: it is left as it is, and the loop halves only let go of
     * their Python objects. */
    while (self->live != NULL) {
        mt_record *rec = self->live;
        rec->loop_ops->detach(self, rec);
        if (self->live == rec)
            mt_loop_unlink(self, rec); /* a detach that forgot to */
    }
    if (self->fork_generation == mt_fork_generation())
        release_io(self); /* in a child the references are the parent's */
}

static PyObject *loop_check_usable(mt_loop *self, PyObject *Py_UNUSED(ignored))
{
    if (mt_loop_check_usable(self) < 0)
        return NULL;
    Py_RETURN_NONE;
}

static inline void cpu_relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

/* After this many spins in a row that catch nothing, the loop skips
 * spinning for a while (64 waits, doubling up to 4096 while it keeps
 * missing): an idle or lightly loaded loop sleeps as without the spin. */
#define SPIN_MISSES_MAX 8
#define SPIN_BACKOFF_MIN 64
#define SPIN_BACKOFF_MAX 4096

/* The opt-in spin (new_event_loop(spin_us=...)): before blocking, the loop
 * thread polls its completion and call_soon_threadsafe() queues for up to
 * spin_ns with the GIL released.  Its waker stays RUNNING meanwhile, so an
 * I/O thread hands work over without an eventfd write, and the CPU does
 * not go idle: on a VM a halted vCPU takes 25-40 us to wake (DESIGN.md),
 * which is most of a ping-pong's round trip.  The cost is the CPU the spin
 * burns, hence opt-in and the back-off.  True when work came; otherwise
 * `*timeout` (>0) loses the time spun, so a timer is not made late. */
static bool spin_for_work(mt_loop *self, double *timeout)
{
    /* Inline I/O comes from the fds, which only the wait can see. */
    if (self->spin_ns <= 0 || self->io_count == 0)
        return false;
    if (self->spin_skip > 0) {
        self->spin_skip--;
        self->spins_skipped++;
        return false;
    }
    /* A busy I/O thread may need this very CPU (on a machine with few
     * cores it often shares it with the loop thread), and will hand its
     * work over soon anyway: the spin only fills time the process would
     * otherwise spend idle, waiting for a peer. */
    for (int i = 0; self->io_acquired && i < self->io_count; i++) {
        if (!mt_io_thread_sleeping(self->io[i]))
            return false;
    }
    int64_t budget = self->spin_ns;
    if (*timeout > 0.0 && *timeout * 1e9 < (double)budget)
        budget = (int64_t)(*timeout * 1e9);
    self->spins++;
    bool caught = false;
    double start = mt_loop_time();
    Py_BEGIN_ALLOW_THREADS
    double until = start + (double)budget / 1e9;
    for (unsigned i = 1;; i++) {
        if (!mt_mpsc_queue_is_empty(&self->sink->queue) ||
            !mt_mpsc_queue_is_empty(&self->threadsafe)) {
            caught = true;
            break;
        }
        cpu_relax();
        if ((i & 31) == 0 && mt_loop_time() >= until)
            break;
    }
    Py_END_ALLOW_THREADS
    if (caught) {
        self->spins_caught++;
        self->spin_misses = 0;
        self->spin_backoff = 0;
        return true;
    }
    if (*timeout > 0.0) {
        *timeout -= mt_loop_time() - start;
        if (!(*timeout > 0.0))
            *timeout = 0.0; /* the timer is due: poll the fds without waiting */
    }
    if (++self->spin_misses >= SPIN_MISSES_MAX) {
        self->spin_misses = 0;
        self->spin_backoff = self->spin_backoff == 0 ? SPIN_BACKOFF_MIN
                             : self->spin_backoff >= SPIN_BACKOFF_MAX ? SPIN_BACKOFF_MAX
                                                                      : self->spin_backoff * 2;
        self->spin_skip = self->spin_backoff;
    }
    return false;
}

static PyObject *loop_set_spin(mt_loop *self, PyObject *arg)
{
    double us = PyFloat_AsDouble(arg);
    if (us == -1.0 && PyErr_Occurred())
        return NULL;
    if (!(us >= 0.0 && us <= 1e6)) {
        PyErr_SetString(PyExc_ValueError, "spin_us must be from 0 to 1000000");
        return NULL;
    }
    self->spin_ns = (int64_t)(us * 1e3);
    self->spin_misses = self->spin_backoff = self->spin_skip = 0;
    Py_RETURN_NONE;
}

static PyObject *loop_spin_stats(mt_loop *self, PyObject *Py_UNUSED(ignored))
{
    return Py_BuildValue("(KKK)", (unsigned long long)self->spins,
                         (unsigned long long)self->spins_caught,
                         (unsigned long long)self->spins_skipped);
}

static PyObject *loop_completion_stats(mt_loop *self, PyObject *Py_UNUSED(ignored))
{
    return Py_BuildValue("{sKsKsK}", "batches", (unsigned long long)self->completion_batches,
                         "completions", (unsigned long long)self->completions,
                         "deepest_batch", (unsigned long long)self->deepest_batch);
}

static PyObject *loop_inline_stats(mt_loop *self, PyObject *Py_UNUSED(ignored))
{
    mt_io_thread *io = inline_in_use(self);
    if (io == NULL)
        Py_RETURN_NONE;
    mt_io_snapshot snap;
    mt_io_thread_snapshot(io, &snap);
    return Py_BuildValue("{sKsKsKsKsKsKsKsK}", "transports", (unsigned long long)snap.transports,
                         "listeners", (unsigned long long)snap.listeners, "bytes_read",
                         (unsigned long long)snap.bytes_read, "bytes_written",
                         (unsigned long long)snap.bytes_written, "accepts",
                         (unsigned long long)snap.accepts, "commands",
                         (unsigned long long)snap.commands, "completions",
                         (unsigned long long)snap.completions, "reads_direct",
                         (unsigned long long)snap.reads_direct);
}

static PyObject *loop_run_once(mt_loop *self, PyObject *Py_UNUSED(ignored))
{
    if (self->core_closed)
        return loop_closed_error();

    if (self->fork_generation != mt_fork_generation())
        return forked_error();

    /* Signal handlers that came in since the last wait run before the
     * timeout is chosen: what they schedule (a callback, stop()) must not
     * wait behind a wait that did not know of it. */
    if (PyErr_CheckSignals() < 0)
        return NULL;
    drop_cancelled_timers(self);
    bool drained = drain_threadsafe(self);
    /* Inline I/O: what the last callbacks asked for (writes, closes, new
     * transports) is done before the wait, as uvloop does it. */
    mt_io_thread *inline_rt = inline_in_use(self);
    bool io_pending = inline_rt != NULL && mt_io_inline_run(inline_rt);

    double timeout = -1.0;
    if (mt_ready_queue_len(&self->ready) || self->stopping || !drained || io_pending ||
        !mt_mpsc_queue_is_empty(&self->sink->queue)) {
        timeout = 0.0;
    } else {
        const mt_timer *top = mt_timer_heap_peek(&self->timers);
        if (top != NULL) {
            timeout = top->when - mt_loop_time();
            if (timeout > MT_MAX_WAIT_SECONDS)
                timeout = MT_MAX_WAIT_SECONDS;
            else if (!(timeout > 0.0))
                timeout = 0.0;
        }
    }
    if (timeout != 0.0 && spin_for_work(self, &timeout))
        timeout = 0.0;
    if (timeout != 0.0) {
        /* Announce the sleep, then look once more for work that raced it. */
        mt_waker_prepare_sleep(&self->sink->waker);
        if (!mt_mpsc_queue_is_empty(&self->threadsafe) ||
            !mt_mpsc_queue_is_empty(&self->sink->queue))
            timeout = 0.0;
    }
    int rc = wait_for_events(self, timeout);
    mt_waker_awake(&self->sink->waker);
    if (inline_rt != NULL)
        mt_io_inline_flush(inline_rt); /* what the wait's handlers made */
    if (rc < 0)
        return NULL;

    /* The callbacks that were ready before the wait run first, then the
     * I/O that came in it, then the timers that came due: asyncio's order.
     * Completions are dispatched directly, not queued, so they go between
     * the two runs of the ready queue. */
    size_t nready = mt_ready_queue_len(&self->ready);
    if (mt_fd_watch_collect(self) < 0)
        return NULL;
    drain_threadsafe(self);
    /* Signal handlers (KeyboardInterrupt included) run here, as they would
     * when asyncio's select() returns with EINTR. */
    if (PyErr_CheckSignals() < 0)
        return NULL;

    double end_time = mt_loop_time() + self->clock_resolution;
    const mt_timer *top;
    while ((top = mt_timer_heap_peek(&self->timers)) != NULL && top->when < end_time) {
        mt_timer t;
        mt_timer_heap_pop(&self->timers, &t);
        PyObject *th = t.data;
        mt_slot_set(th, mt_handles.scheduled, Py_False);
        if (mt_handle_is_cancelled(th)) {
            self->timer_cancelled_count--;
            Py_DECREF(th);
            continue;
        }
        if (mt_ready_queue_push(&self->ready, th) < 0) {
            Py_DECREF(th);
            return PyErr_NoMemory();
        }
    }

    /* Run what is ready now; what these callbacks schedule waits for the
     * next iteration, after another poll. */
    size_t ntodo = mt_ready_queue_len(&self->ready);
    if (run_handles(self, nready) < 0)
        return NULL;
    if (self->core_closed)
        Py_RETURN_NONE;
    if (drain_completions(self) < 0)
        return NULL;
    if (run_handles(self, ntodo - nready) < 0)
        return NULL;
    Py_RETURN_NONE;
}

/* ---- lifetime ------------------------------------------------------------ */

static void core_release(mt_loop *self)
{
    if (self->core_closed)
        return;
    self->core_closed = true;

    /* Take everything out first; releasing a handle may run arbitrary code. */
    PyObject *dead = PyList_New(0);
    PyObject *h;
    while ((h = mt_ready_queue_pop(&self->ready)) != NULL) {
        if (dead == NULL || PyList_Append(dead, h) == 0)
            Py_DECREF(h);
    }
    mt_timer t;
    while (mt_timer_heap_pop(&self->timers, &t) == 0) {
        mt_slot_set((PyObject *)t.data, mt_handles.scheduled, Py_False);
        if (dead == NULL || PyList_Append(dead, t.data) == 0)
            Py_DECREF((PyObject *)t.data);
    }
    mt_mpsc_node *node;
    while (!mt_mpsc_queue_is_empty(&self->threadsafe)) {
        node = mt_mpsc_queue_pop(&self->threadsafe);
        if (node == NULL)
            continue; /* a producer is mid-push: it completes at once */
        mt_pending *p = MT_CONTAINER_OF(node, mt_pending, node);
        h = p->handle;
        PyMem_RawFree(p);
        if (dead == NULL || PyList_Append(dead, h) == 0)
            Py_DECREF(h);
    }
    bool forked = self->fork_generation != mt_fork_generation();
    close_sink(self);
    if (forked) {
        /* A child of fork(): the event base shares its epoll instance with
         * the parent's loop, so unregistering anything would break the
         * parent.  Everything C-side is left as it is. */
        self->base = NULL;
        self->timeout_event = self->waker_event = NULL;
        self->sink = NULL;
    }
    mt_fd_watch_clear_all(self);
    if (self->timeout_event)
        event_free(self->timeout_event);
    if (self->waker_event)
        event_free(self->waker_event);
    if (self->base)
        event_base_free(self->base);
    self->timeout_event = self->waker_event = NULL;
    self->base = NULL;
    if (self->sink != NULL)
        mt_sink_decref(self->sink);
    self->sink = NULL;
    mt_ready_queue_free(&self->ready);
    mt_timer_heap_free(&self->timers);
    Py_CLEAR(self->current_handle);
    Py_XDECREF(dead);
}

static PyObject *loop_core_close(mt_loop *self, PyObject *Py_UNUSED(ignored))
{
    if (atomic_load(&self->running)) {
        PyErr_SetString(PyExc_RuntimeError, "Cannot close a running event loop");
        return NULL;
    }
    core_release(self);
    Py_RETURN_NONE;
}

static PyObject *loop_new(PyTypeObject *type, PyObject *Py_UNUSED(args),
                          PyObject *Py_UNUSED(kwds))
{
    mt_loop *self = (mt_loop *)type->tp_alloc(type, 0);
    if (self == NULL)
        return NULL;
    mt_ready_queue_init(&self->ready);
    mt_timer_heap_init(&self->timers);
    mt_mpsc_queue_init(&self->threadsafe);
    self->io_count = mt_runtime_default_size();
    self->fork_generation = mt_fork_generation();
    atomic_init(&self->owner_thread, 0);
    atomic_init(&self->running, false);
    self->slow_callback_duration = 0.1;
    struct timespec res;
    self->clock_resolution =
        clock_getres(CLOCK_MONOTONIC, &res) == 0 ? res.tv_sec + res.tv_nsec * 1e-9 : 1e-9;

    self->sink = mt_sink_new();
    if (self->sink == NULL) {
        PyErr_SetFromErrno(PyExc_OSError);
        goto fail;
    }
    struct event_config *cfg = event_config_new();
    if (cfg == NULL)
        goto nomem;
    /* Only the loop thread touches this base: no libevent locks. */
    event_config_set_flag(cfg, EVENT_BASE_FLAG_NOLOCK | EVENT_BASE_FLAG_IGNORE_ENV);
    self->base = event_base_new_with_config(cfg);
    event_config_free(cfg);
    if (self->base == NULL) {
        PyErr_SetString(PyExc_OSError, "libevent could not create an event base");
        goto fail;
    }
    self->waker_event = event_new(self->base, self->sink->waker.fd, EV_READ | EV_PERSIST,
                                  on_waker_event, self);
    self->timeout_event = evtimer_new(self->base, on_timeout_event, self);
    if (self->waker_event == NULL || self->timeout_event == NULL)
        goto nomem;
    if (event_add(self->waker_event, NULL) < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        goto fail;
    }
    return (PyObject *)self;
nomem:
    PyErr_NoMemory();
fail:
    Py_DECREF(self);
    return NULL;
}

static int loop_traverse(mt_loop *self, visitproc visit, void *arg)
{
    for (size_t i = 0; i < mt_ready_queue_len(&self->ready); i++)
        Py_VISIT((PyObject *)mt_ready_queue_peek(&self->ready, i));
    for (size_t i = 0; i < mt_timer_heap_len(&self->timers); i++)
        Py_VISIT((PyObject *)self->timers.items[i].data);
    Py_VISIT(self->current_handle);
    for (mt_record *rec = self->live; rec != NULL; rec = rec->live_next)
        Py_VISIT((PyObject *)rec->owner);
    return mt_fd_watch_traverse(self, visit, arg);
}

static int loop_clear(mt_loop *self)
{
    core_release(self);
    return 0;
}

static void loop_dealloc(mt_loop *self)
{
    PyObject_GC_UnTrack(self);
    core_release(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* ---- attributes shared with asyncio.BaseEventLoop ----------------------- */

static PyObject *get_flag(bool *flag) { return PyBool_FromLong(*flag); }

static int set_flag(bool *flag, PyObject *value)
{
    if (value == NULL) {
        PyErr_SetString(PyExc_AttributeError, "cannot delete this attribute");
        return -1;
    }
    int v = PyObject_IsTrue(value);
    if (v < 0)
        return -1;
    *flag = v;
    return 0;
}

static PyObject *loop_get_stopping(mt_loop *self, void *Py_UNUSED(c)) { return get_flag(&self->stopping); }
static int loop_set_stopping(mt_loop *self, PyObject *v, void *Py_UNUSED(c)) { return set_flag(&self->stopping, v); }
static PyObject *loop_get_debug(mt_loop *self, void *Py_UNUSED(c)) { return get_flag(&self->debug); }
static int loop_set_debug(mt_loop *self, PyObject *v, void *Py_UNUSED(c)) { return set_flag(&self->debug, v); }
static PyObject *loop_get_closed(mt_loop *self, void *Py_UNUSED(c)) { return get_flag(&self->closed); }
static int loop_set_closed(mt_loop *self, PyObject *v, void *Py_UNUSED(c)) { return set_flag(&self->closed, v); }

static PyObject *loop_get_thread_id(mt_loop *self, void *Py_UNUSED(c))
{
    if (!atomic_load(&self->running))
        Py_RETURN_NONE;
    return PyLong_FromUnsignedLong(atomic_load(&self->owner_thread));
}

static int loop_set_thread_id(mt_loop *self, PyObject *value, void *Py_UNUSED(c))
{
    if (value == NULL || value == Py_None) {
        atomic_store(&self->running, false);
        atomic_store(&self->owner_thread, 0);
        return 0;
    }
    unsigned long ident = PyLong_AsUnsignedLong(value);
    if (ident == (unsigned long)-1 && PyErr_Occurred())
        return -1;
    atomic_store(&self->owner_thread, ident);
    atomic_store(&self->running, true);
    return 0;
}

static PyObject *loop_get_current_handle(mt_loop *self, void *Py_UNUSED(c))
{
    return Py_NewRef(self->current_handle ? self->current_handle : Py_None);
}

static int loop_set_current_handle(mt_loop *self, PyObject *v, void *Py_UNUSED(c))
{
    Py_XSETREF(self->current_handle, (v == NULL || v == Py_None) ? NULL : Py_NewRef(v));
    return 0;
}

static PyObject *loop_get_ready_count(mt_loop *self, void *Py_UNUSED(c))
{
    return PyLong_FromSize_t(mt_ready_queue_len(&self->ready));
}

static PyObject *loop_get_timer_count(mt_loop *self, void *Py_UNUSED(c))
{
    return PyLong_FromSize_t(mt_timer_heap_len(&self->timers));
}

static PyObject *loop_get_io_threads(mt_loop *self, void *Py_UNUSED(c))
{
    return PyLong_FromLong(self->io_count);
}

static PyObject *loop_configure_io(mt_loop *self, PyObject *arg)
{
    long n = PyLong_AsLong(arg);
    if (n == -1 && PyErr_Occurred())
        return NULL;
    if (n < 0 || n > MT_IO_THREADS_MAX) {
        PyErr_Format(PyExc_ValueError, "io_threads must be between 0 and %d, not %ld",
                     MT_IO_THREADS_MAX, n);
        return NULL;
    }
    if (self->io_acquired) {
        PyErr_SetString(PyExc_RuntimeError,
                        "io_threads cannot change once the loop has transports");
        return NULL;
    }
    self->io_count = (int)n;
    Py_RETURN_NONE;
}

static PyGetSetDef loop_getset[] = {
    {"io_threads", (getter)loop_get_io_threads, NULL,
     "How many I/O threads this loop spreads its transports over; 0: the loop "
     "thread runs their I/O itself.", NULL},
    {"_stopping", (getter)loop_get_stopping, (setter)loop_set_stopping, NULL, NULL},
    {"_debug", (getter)loop_get_debug, (setter)loop_set_debug, NULL, NULL},
    {"_closed", (getter)loop_get_closed, (setter)loop_set_closed, NULL, NULL},
    {"_thread_id", (getter)loop_get_thread_id, (setter)loop_set_thread_id, NULL, NULL},
    {"_current_handle", (getter)loop_get_current_handle, (setter)loop_set_current_handle, NULL, NULL},
    {"_mt_ready_count", (getter)loop_get_ready_count, NULL, "Handles in the ready queue.", NULL},
    {"_mt_timer_count", (getter)loop_get_timer_count, NULL, "Timers in the heap, cancelled ones included.", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyMemberDef loop_members[] = {
    {"slow_callback_duration", T_DOUBLE, offsetof(mt_loop, slow_callback_duration), 0, NULL},
    {"_clock_resolution", T_DOUBLE, offsetof(mt_loop, clock_resolution), 0, NULL},
    {"_timer_cancelled_count", T_PYSSIZET, offsetof(mt_loop, timer_cancelled_count), 0, NULL},
    {NULL, 0, 0, 0, NULL},
};

/* create_future() and get_debug() in C: the stock ones are Python frames,
 * and every await of a stream read makes a future, whose __init__ calls
 * get_debug() (under cProfile, a storm of 2,000 streams spent about 2% of
 * the loop thread's time in these two frames and the transport's
 * is_closing(), which moved to C with them). */
static PyObject *future_type; /* asyncio.futures.Future, as asyncio's create_future() */
static PyObject *loop_kwname; /* ("loop",) */

static PyObject *loop_create_future(mt_loop *self, PyObject *Py_UNUSED(a))
{
    PyObject *args[1] = {(PyObject *)self};
    return PyObject_Vectorcall(future_type, args, 0, loop_kwname);
}

static PyObject *loop_get_debug_method(mt_loop *self, PyObject *Py_UNUSED(a))
{
    return get_flag(&self->debug);
}

#define FASTKW (METH_FASTCALL | METH_KEYWORDS)

static PyMethodDef loop_methods[] = {
    {"call_soon", (PyCFunction)(void (*)(void))loop_call_soon, FASTKW,
     "call_soon(callback, *args, context=None) -> Handle"},
    {"call_soon_threadsafe", (PyCFunction)(void (*)(void))loop_call_soon_threadsafe, FASTKW,
     "call_soon_threadsafe(callback, *args, context=None) -> Handle"},
    {"call_later", (PyCFunction)(void (*)(void))loop_call_later, FASTKW,
     "call_later(delay, callback, *args, context=None) -> TimerHandle"},
    {"call_at", (PyCFunction)(void (*)(void))loop_call_at, FASTKW,
     "call_at(when, callback, *args, context=None) -> TimerHandle"},
    {"time", (PyCFunction)loop_time, METH_NOARGS, "The loop's clock (time.monotonic())."},
    {"create_future", (PyCFunction)loop_create_future, METH_NOARGS,
     "create_future() -> asyncio.Future attached to the loop."},
    {"get_debug", (PyCFunction)loop_get_debug_method, METH_NOARGS,
     "get_debug() -> bool: whether the loop is in debug mode."},
    {"_run_once", (PyCFunction)loop_run_once, METH_NOARGS, "Run one iteration."},
    {"_mt_set_spin", (PyCFunction)loop_set_spin, METH_O,
     "Spin up to this many microseconds before each wait (0: never)."},
    {"inline_stats", (PyCFunction)loop_inline_stats, METH_NOARGS,
     "With io_threads=0: the counters runtime_stats() gives for an I/O thread, for the "
     "loop's own I/O (no thread or wakeup keys), and reads_direct (reads the loop made itself, "
     "straight into a protocol's buffer or bytes); None before the loop has a transport or server, and for "
     "a loop with I/O threads."},
    {"completion_stats", (PyCFunction)loop_completion_stats, METH_NOARGS,
     "Completions this loop received from its I/O: batches (iterations that had any), "
     "completions, and deepest_batch (the most one iteration dispatched)."},
    {"_mt_spin_stats", (PyCFunction)loop_spin_stats, METH_NOARGS,
     "(spins, spins that caught work, waits that skipped spinning)."},
    {"_add_callback", (PyCFunction)loop_add_callback, METH_O, NULL},
    {"_add_callback_signalsafe", (PyCFunction)loop_add_callback, METH_O, NULL},
    {"_timer_handle_cancelled", (PyCFunction)loop_timer_handle_cancelled, METH_O, NULL},
    {"add_reader", (PyCFunction)(void (*)(void))loop_add_reader, METH_FASTCALL,
     "add_reader(fd, callback, *args): call callback(*args) whenever fd is readable."},
    {"add_writer", (PyCFunction)(void (*)(void))loop_add_writer, METH_FASTCALL,
     "add_writer(fd, callback, *args): call callback(*args) whenever fd is writable."},
    {"_add_reader", (PyCFunction)(void (*)(void))loop_add_reader_handle, METH_FASTCALL, NULL},
    {"_add_writer", (PyCFunction)(void (*)(void))loop_add_writer_handle, METH_FASTCALL, NULL},
    {"remove_reader", (PyCFunction)loop_remove_reader, METH_O,
     "remove_reader(fd) -> bool: stop watching fd for reading."},
    {"remove_writer", (PyCFunction)loop_remove_writer, METH_O,
     "remove_writer(fd) -> bool: stop watching fd for writing."},
    {"_remove_reader", (PyCFunction)loop_remove_reader, METH_O, NULL},
    {"_remove_writer", (PyCFunction)loop_remove_writer, METH_O, NULL},
    {"_core_close", (PyCFunction)loop_core_close, METH_NOARGS, "Release the C resources."},
    {"_mt_configure_io", (PyCFunction)loop_configure_io, METH_O, NULL},
    {"_mt_check_usable", (PyCFunction)loop_check_usable, METH_NOARGS, NULL},
    {NULL, NULL, 0, NULL},
};

PyTypeObject mt_LoopCoreType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "mtloop._mtloop.LoopCore",
    .tp_doc = "The C core of mtloop.Loop: scheduling, timers, fd watchers and the run loop.",
    .tp_basicsize = sizeof(mt_loop),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_BASETYPE,
    .tp_new = loop_new,
    .tp_dealloc = (destructor)loop_dealloc,
    .tp_traverse = (traverseproc)loop_traverse,
    .tp_clear = (inquiry)loop_clear,
    .tp_methods = loop_methods,
    .tp_getset = loop_getset,
    .tp_members = loop_members,
};

int mt_loop_type_init(PyObject *module)
{
    PyObject *futures = PyImport_ImportModule("asyncio.futures");
    if (futures == NULL)
        return -1;
    future_type = PyObject_GetAttrString(futures, "Future");
    Py_DECREF(futures);
    loop_kwname = Py_BuildValue("(s)", "loop");
    if (future_type == NULL || loop_kwname == NULL)
        return -1;
    if (PyType_Ready(&mt_LoopCoreType) < 0)
        return -1;
    return PyModule_AddObjectRef(module, "LoopCore", (PyObject *)&mt_LoopCoreType);
}
