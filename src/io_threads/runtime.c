/* The I/O thread pool: thread bodies, command dispatch and the
 * process-wide registry of threads.  See runtime.h; records and messages
 * are in record.c, sinks in sink.c. */
#include "io_threads/io_thread.h"
#include "io_threads/cpu_budget.h"

#include <errno.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <event2/event.h>

static _Atomic int threads_allocated;

/* ---- the thread ---------------------------------------------------------- */

struct event_base *mt_io_thread_base(mt_io_thread *io) { return io->base; }
mt_io_stats *mt_io_thread_stats(mt_io_thread *io) { return &io->stats; }
int mt_io_thread_index(mt_io_thread *io) { return io->index; }

bool mt_io_thread_stopped(mt_io_thread *io)
{
    return atomic_load_explicit(&io->stopped, memory_order_acquire);
}

bool mt_io_thread_sleeping(mt_io_thread *io)
{
    return atomic_load_explicit(&io->waker.state, memory_order_relaxed) != MT_WAKER_RUNNING;
}

void mt_io_thread_incref(mt_io_thread *io)
{
    atomic_fetch_add_explicit(&io->refs, 1, memory_order_relaxed);
}

void mt_io_thread_decref(mt_io_thread *io)
{
    if (atomic_fetch_sub_explicit(&io->refs, 1, memory_order_acq_rel) != 1)
        return;
    /* Joined (the registry's reference goes last of all when it ran). */
    mt_waker_close(&io->waker);
    free(io);
    atomic_fetch_sub_explicit(&threads_allocated, 1, memory_order_relaxed);
}

void mt_io_thread_kick(mt_io_thread *io)
{
    /* Then the waker's fence: the thread either sees `unpark` after it
     * announced its sleep, or is woken (waker.h). */
    atomic_store_explicit(&io->unpark, true, memory_order_seq_cst);
    mt_waker_notify(&io->waker);
}

bool mt_io_thread_post(mt_io_thread *io, mt_msg *first, mt_msg *last)
{
    /* mt_runtime_stop() sets `stopped` and posts STOP while its caller
     * holds the GIL, as does every poster in the extension: nothing can be
     * pushed behind STOP. */
    if (mt_io_thread_stopped(io))
        return false;
    mt_mpsc_queue_push_chain(&io->commands, &first->node, &last->node);
    mt_waker_notify(&io->waker);
    return true;
}

/* Runs what the queue holds, then services the records the batch made
 * dirty: a record's control bits and its new output are handled once per
 * batch, after every message posted before them. */
static void run_commands(mt_io_thread *io)
{
    mt_mpsc_node *node;
    uint64_t n = 0;
    if (atomic_load_explicit(&io->unpark, memory_order_relaxed) &&
        atomic_exchange_explicit(&io->unpark, false, memory_order_seq_cst))
        mt_io_thread_unpark(io); /* serviced with this batch */
    while ((node = mt_mpsc_queue_pop(&io->commands)) != NULL) {
        n++;
        if (((mt_msg_link *)node)->op == MT_OP_CONTROL) {
            mt_io_thread_take_control(io, MT_CONTAINER_OF(node, mt_record, control_link.node));
            continue;
        }
        mt_msg *msg = MT_CONTAINER_OF(node, mt_msg, node);
        switch (msg->op) {
        case MT_OP_SINK_CLOSE:
            /* Pending attaches first: a record attached after the drop
             * would outlive its loop. */
            mt_io_thread_service_dirty(io);
            mt_io_thread_drop_sink(io, mt_sink_close_target(msg));
            mt_io_thread_flush_batches(io);
            mt_sink_close_done(msg); /* the closer may return now */
            break;
        case MT_OP_STOP:
            io->exiting = true;
            break;
        default:
            msg->rec->ops->message(io, msg->rec, msg); /* takes it */
        }
    }
    mt_io_thread_service_dirty(io);
    if (n)
        mt_counter_add(&io->stats.commands, n);
}

static void on_waker(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    mt_io_thread *io = arg;
    mt_io_thread_running(io);
    mt_waker_drain(&io->waker);
}

void mt_io_thread_snapshot(mt_io_thread *io, mt_io_snapshot *out)
{
    out->transports = atomic_load(&io->stats.transports);
    out->listeners = atomic_load(&io->stats.listeners);
    out->bytes_read = atomic_load(&io->stats.bytes_read);
    out->bytes_written = atomic_load(&io->stats.bytes_written) +
                         atomic_load(&io->stats.bytes_sent_direct);
    out->accepts = atomic_load(&io->stats.accepts);
    out->commands = atomic_load(&io->stats.commands);
    out->completions = atomic_load(&io->stats.completions);
    out->reads_direct = atomic_load(&io->stats.reads_direct);
    out->held_back = atomic_load(&io->stats.held_back);
    /* With the wait in progress, so that an idle thread shows its idleness
     * before anything wakes it; a wait that ended meanwhile (its start
     * changed) is read again, so the sum never goes back. */
    for (;;) {
        uint64_t since = atomic_load_explicit(&io->wait_since, memory_order_acquire);
        uint64_t waited = atomic_load(&io->stats.wait_ns);
        uint64_t now = mt_io_now_ns();
        if (atomic_load_explicit(&io->wait_since, memory_order_acquire) != since)
            continue;
        out->wait_ns = waited + (since != 0 && now > since ? now - since : 0);
        break;
    }
    out->cpu_ns = 0;
    clockid_t clock;
    struct timespec ts;
    /* A registered pool thread is running (it is joined only after the
     * registry let go of it), so its clock is valid. */
    if (!io->is_inline && pthread_getcpuclockid(io->thread, &clock) == 0 &&
        clock_gettime(clock, &ts) == 0)
        out->cpu_ns = (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
    out->wakeups_sent = atomic_load(&io->waker.wakeups_sent);
    out->wakeups_received = atomic_load(&io->waker.wakeups_received);
    out->native_id = atomic_load(&io->native_id);
}

/* ---- the inline runtime ------------------------------------------------- */

/* An inline runtime is an mt_io_thread without a thread: its loop's thread
 * runs it on the loop's own event base, between Python callbacks.  Its
 * waker is never put to sleep, so a post never writes an eventfd: the loop
 * runs the commands itself before it next waits (mt_io_inline_run). */
mt_io_thread *mt_io_inline_new(struct event_base *base)
{
    mt_io_thread *io = calloc(1, sizeof(*io));
    if (io == NULL)
        return NULL;
    io->index = -1;
    io->is_inline = true;
    atomic_init(&io->refs, 1); /* the loop's */
    mt_mpsc_queue_init(&io->commands);
    atomic_init(&io->stopped, false);
    atomic_init(&io->unpark, false);
    atomic_init(&io->waker.state, MT_WAKER_RUNNING);
    io->waker.fd = -1;
    atomic_init(&io->native_id, (long)gettid());
    io->base = base;
    atomic_fetch_add_explicit(&threads_allocated, 1, memory_order_relaxed);
    return io;
}

bool mt_io_thread_is_inline(mt_io_thread *io) { return io->is_inline; }

bool mt_io_inline_run(mt_io_thread *io)
{
    run_commands(io);
    mt_io_thread_flush_batches(io);
    return io->dirty_head != NULL || !mt_mpsc_queue_is_empty(&io->commands);
}

void mt_io_inline_flush(mt_io_thread *io)
{
    mt_io_thread_flush_batches(io);
}

void mt_io_inline_close(mt_io_thread *io, mt_sink *sink)
{
    /* As SINK_CLOSE on a thread: pending attaches first, so that no record
     * outlives the loop, then every record lets go without RELEASED. */
    run_commands(io);
    mt_io_thread_drop_sink(io, sink);
    mt_io_thread_flush_batches(io);
    atomic_store_explicit(&io->stopped, true, memory_order_release);
    io->base = NULL; /* the loop's, freed by the loop */
    mt_io_thread_decref(io);
}

static void *io_main(void *arg)
{
    mt_io_thread *io = arg;
    atomic_store(&io->native_id, (long)gettid());
    while (!io->exiting) {
        run_commands(io);
        mt_io_thread_flush_batches(io);
        if (io->exiting)
            break;
        mt_waker_prepare_sleep(&io->waker);
        /* Dirty records (work a callback deferred) are serviced with the
         * next commands: poll without sleeping while any wait. */
        if (!mt_mpsc_queue_is_empty(&io->commands) || io->dirty_head != NULL ||
            atomic_load_explicit(&io->unpark, memory_order_seq_cst)) {
            mt_waker_awake(&io->waker);
            event_base_loop(io->base, EVLOOP_ONCE | EVLOOP_NONBLOCK);
        } else {
            atomic_store_explicit(&io->wait_since, mt_io_now_ns(), memory_order_release);
            event_base_loop(io->base, EVLOOP_ONCE);
            mt_io_thread_running(io); /* if no callback ran to say so */
        }
        mt_io_thread_flush_batches(io);
    }
    /* Stopping: drop what is left (RELEASED tells the loops), free the
     * thread's resources.  Nothing can be queued behind STOP (see post). */
    run_commands(io);
    mt_io_thread_drop_sink(io, NULL);
    mt_io_thread_flush_batches(io);
    event_free(io->waker_event);
    event_base_free(io->base);
    io->base = NULL;
    io->waker_event = NULL;
    return NULL;
}

static mt_io_thread *io_thread_start(int index)
{
    mt_io_thread *io = calloc(1, sizeof(*io));
    if (io == NULL)
        return NULL;
    io->index = index;
    atomic_init(&io->refs, 1); /* the registry's */
    mt_mpsc_queue_init(&io->commands);
    atomic_init(&io->stopped, false);
    atomic_init(&io->unpark, false);
    if (mt_waker_init(&io->waker) < 0)
        goto fail;
    struct event_config *cfg = event_config_new();
    if (cfg == NULL) {
        errno = ENOMEM;
        goto fail;
    }
    /* Only this thread touches its base: no libevent locks. */
    event_config_set_flag(cfg, EVENT_BASE_FLAG_NOLOCK | EVENT_BASE_FLAG_IGNORE_ENV);
    io->base = event_base_new_with_config(cfg);
    event_config_free(cfg);
    if (io->base == NULL) {
        errno = ENOMEM;
        goto fail;
    }
    io->waker_event = event_new(io->base, io->waker.fd, EV_READ | EV_PERSIST, on_waker, io);
    if (io->waker_event == NULL || event_add(io->waker_event, NULL) < 0) {
        errno = ENOMEM;
        goto fail;
    }
    /* Signals are for the Python thread: the new thread inherits a full
     * mask. */
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    int rc = pthread_create(&io->thread, NULL, io_main, io);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (rc != 0) {
        errno = rc;
        goto fail;
    }
    atomic_fetch_add_explicit(&threads_allocated, 1, memory_order_relaxed);
    return io;
fail:;
    int saved = errno;
    if (io->waker_event)
        event_free(io->waker_event);
    if (io->base)
        event_base_free(io->base);
    mt_waker_close(&io->waker);
    free(io);
    errno = saved;
    return NULL;
}

/* ---- the registry -------------------------------------------------------- */

/* Guarded by mu.  The registry holds one reference on each thread, from
 * its start until it is joined; records and loops hold theirs. */
static struct {
    pthread_mutex_t mu;
    int n;
    mt_io_thread *threads[MT_IO_THREADS_MAX];
    mt_io_thread *stopping; /* told to stop, not joined yet */
    bool finalized;
} rt = {.mu = PTHREAD_MUTEX_INITIALIZER};

static _Atomic unsigned fork_generation;

/* In a child after fork() the threads are gone; their memory is forgotten,
 * not freed, since it may have been mid-update when the parent forked. */
static void forget_after_fork(void)
{
    pthread_mutex_init(&rt.mu, NULL);
    rt.n = 0;
    rt.stopping = NULL;
    atomic_fetch_add(&fork_generation, 1);
}

void mt_runtime_init(void)
{
    static bool done;
    if (done)
        return;
    done = true;
    pthread_atfork(NULL, NULL, forget_after_fork);
}

unsigned mt_fork_generation(void)
{
    return atomic_load_explicit(&fork_generation, memory_order_relaxed);
}

int mt_runtime_threads_allocated(void)
{
    return atomic_load_explicit(&threads_allocated, memory_order_relaxed);
}

int mt_runtime_acquire(int n, mt_io_thread **out)
{
    if (n < 1 || n > MT_IO_THREADS_MAX) {
        errno = EINVAL;
        return -1;
    }
    pthread_mutex_lock(&rt.mu);
    int rc = 0;
    if (rt.finalized) {
        errno = ESHUTDOWN;
        rc = -1;
    }
    while (rc == 0 && rt.n < n) {
        mt_io_thread *io = io_thread_start(rt.n);
        if (io == NULL)
            rc = -1;
        else
            rt.threads[rt.n++] = io;
    }
    if (rc == 0) {
        for (int i = 0; i < n; i++) {
            mt_io_thread_incref(rt.threads[i]);
            out[i] = rt.threads[i];
        }
    }
    pthread_mutex_unlock(&rt.mu);
    return rc;
}

void mt_runtime_stop(void)
{
    pthread_mutex_lock(&rt.mu);
    for (int i = 0; i < rt.n; i++) {
        mt_io_thread *io = rt.threads[i];
        /* The thread's own embedded STOP: stopping cannot fail. */
        io->stop_msg.op = MT_OP_STOP;
        io->stop_msg.pool_cls = MT_MSG_EMBEDDED;
        atomic_store_explicit(&io->stop_msg.node.next, NULL, memory_order_relaxed);
        atomic_store_explicit(&io->stopped, true, memory_order_seq_cst);
        mt_mpsc_queue_push(&io->commands, &io->stop_msg.node);
        mt_waker_notify(&io->waker);
        io->stopping_next = rt.stopping;
        rt.stopping = io;
    }
    rt.n = 0;
    pthread_mutex_unlock(&rt.mu);
}

void mt_runtime_join(void)
{
    for (;;) {
        pthread_mutex_lock(&rt.mu);
        mt_io_thread *io = rt.stopping;
        if (io != NULL)
            rt.stopping = io->stopping_next;
        pthread_mutex_unlock(&rt.mu);
        if (io == NULL)
            return;
        pthread_join(io->thread, NULL);
        mt_io_thread_decref(io); /* the registry's; records may hold it on */
    }
}

void mt_runtime_shutdown(void)
{
    mt_runtime_stop();
    mt_runtime_join();
}

void mt_runtime_finalize(void)
{
    pthread_mutex_lock(&rt.mu);
    rt.finalized = true;
    pthread_mutex_unlock(&rt.mu);
}

int mt_runtime_size(void)
{
    pthread_mutex_lock(&rt.mu);
    int n = rt.n;
    pthread_mutex_unlock(&rt.mu);
    return n;
}

bool mt_runtime_snapshot(int i, mt_io_snapshot *out)
{
    pthread_mutex_lock(&rt.mu);
    mt_io_thread *io = i >= 0 && i < rt.n ? rt.threads[i] : NULL;
    if (io != NULL)
        mt_io_thread_snapshot(io, out);
    pthread_mutex_unlock(&rt.mu);
    return io != NULL;
}

int mt_runtime_default_size(void)
{
    const char *env = getenv("MTLOOP_IO_THREADS");
    if (env != NULL && *env) {
        char *end;
        long v = strtol(env, &end, 10);
        if (*end == '\0' && v >= 0 && v <= MT_IO_THREADS_MAX)
            return (int)v;
    }
    /* The CPUs this process may run on (taskset, cgroup cpusets) and its
     * cgroup's quota pays for, not all the machine has: eight threads
     * squeezed onto two allowed CPUs cost twice the CPU per request of one. */
    long cpus = mt_cpus_usable();
    /* One core stays with the loop thread; beyond 8 a single loop cannot
     * feed more I/O threads than it already has.  On one CPU the loop runs
     * its I/O itself (0: inline): a thread there could only take turns
     * with it, at a context switch per handoff. */
    long n = cpus - 1;
    if (n < 0)
        n = 0;
    if (n > 8)
        n = 8;
    return (int)n;
}
