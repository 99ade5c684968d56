/* The I/O thread pool: thread bodies, command dispatch, completion batching,
 * sinks and the process-wide registry of threads.  See runtime.h. */
#include "io_threads/runtime.h"

#include "io_threads/buffer_pool.h"

#include <errno.h>
#include <sched.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <event2/event.h>

#define MT_BATCH_SINKS 8

struct mt_io_thread {
    int index;                 /* immutable */
    pthread_t thread;          /* immutable once started */
    mt_mpsc_queue commands;    /* any thread pushes; this thread pops */
    mt_waker waker;            /* shared (atomics) */
    _Atomic bool stopped;      /* set by the stopper before STOP is posted */
    _Atomic long native_id;    /* the thread's kernel id, set when it starts */
    mt_io_stats stats;         /* written by this thread, read by anyone */
    struct mt_io_thread *retired_next; /* registry, under rt.mu */

    /* This thread only. */
    struct event_base *base;
    struct event *waker_event;
    mt_io_obj *owned;
    bool exiting;
    struct {
        mt_sink *sink;
        mt_done *first, *last;
    } batch[MT_BATCH_SINKS];
    int nbatch;
};

/* ---- commands and completions -------------------------------------------- */

mt_cmd *mt_cmd_new(mt_cmd_kind kind, void *target, size_t len)
{
    uint8_t cls;
    mt_cmd *cmd = mt_pool_alloc(sizeof(*cmd) + len, &cls);
    if (cmd == NULL)
        return NULL;
    memset(cmd, 0, sizeof(*cmd));
    cmd->pool_cls = cls;
    cmd->kind = (uint8_t)kind;
    cmd->target = target;
    cmd->len = len;
    cmd->file_fd = -1;
    if (target != NULL && kind != MT_CMD_SINK_CLOSE)
        mt_io_obj_incref(target);
    return cmd;
}

void mt_cmd_free(mt_cmd *cmd)
{
    if (cmd->target != NULL && cmd->kind != MT_CMD_SINK_CLOSE)
        mt_io_obj_decref(cmd->target);
    mt_pool_free(cmd, cmd->pool_cls);
}

mt_done *mt_done_new(mt_done_kind kind, mt_io_obj *source, size_t len)
{
    uint8_t cls;
    mt_done *done = mt_pool_alloc(sizeof(*done) + len, &cls);
    if (done == NULL)
        return NULL;
    memset(done, 0, sizeof(*done));
    done->pool_cls = cls;
    done->kind = (uint8_t)kind;
    done->fd = -1;
    done->source = source;
    done->len = len;
    mt_io_obj_incref(source);
    return done;
}

void mt_done_free(mt_done *done)
{
    if (done->kind == MT_DONE_ACCEPT && done->fd >= 0)
        close(done->fd); /* accepted but never handed over */
    mt_io_obj_decref(done->source);
    mt_pool_free(done, done->pool_cls);
}

/* ---- objects ---------------------------------------------------------------- */

void mt_io_obj_init(mt_io_obj *obj, const mt_io_ops *ops, mt_sink *sink, mt_io_thread *io)
{
    atomic_init(&obj->refs, 1);
    obj->ops = ops;
    obj->sink = sink;
    obj->io = io;
    obj->prev = obj->next = NULL;
    mt_sink_incref(sink);
}

void mt_io_obj_decref(mt_io_obj *obj)
{
    if (atomic_fetch_sub_explicit(&obj->refs, 1, memory_order_acq_rel) != 1)
        return;
    mt_sink *sink = obj->sink;
    obj->ops->destroy(obj);
    mt_sink_decref(sink);
}

/* ---- sinks ---------------------------------------------------------------- */

mt_sink *mt_sink_new(void)
{
    mt_sink *sink = malloc(sizeof(*sink));
    if (sink == NULL)
        return NULL;
    mt_mpsc_queue_init(&sink->queue);
    atomic_init(&sink->refs, 1);
    if (mt_waker_init(&sink->waker) < 0) {
        free(sink);
        return NULL;
    }
    return sink;
}

void mt_sink_incref(mt_sink *sink)
{
    atomic_fetch_add_explicit(&sink->refs, 1, memory_order_relaxed);
}

void mt_sink_decref(mt_sink *sink)
{
    if (atomic_fetch_sub_explicit(&sink->refs, 1, memory_order_acq_rel) != 1)
        return;
    /* Every completion holds its source, which holds the sink: nothing can
     * be queued any more. */
    mt_waker_close(&sink->waker);
    free(sink);
}

void mt_sink_push(mt_sink *sink, mt_done *first, mt_done *last)
{
    mt_mpsc_queue_push_chain(&sink->queue, &first->node, &last->node);
    mt_waker_notify(&sink->waker);
}

/* ---- latches ---------------------------------------------------------------- */

void mt_latch_init(mt_latch *l)
{
    l->pending = 0;
    pthread_mutex_init(&l->mu, NULL);
    pthread_cond_init(&l->cv, NULL);
}

void mt_latch_add(mt_latch *l)
{
    pthread_mutex_lock(&l->mu);
    l->pending++;
    pthread_mutex_unlock(&l->mu);
}

void mt_latch_done(mt_latch *l)
{
    pthread_mutex_lock(&l->mu);
    if (--l->pending == 0)
        pthread_cond_broadcast(&l->cv);
    pthread_mutex_unlock(&l->mu);
}

void mt_latch_wait(mt_latch *l)
{
    pthread_mutex_lock(&l->mu);
    while (l->pending > 0)
        pthread_cond_wait(&l->cv, &l->mu);
    pthread_mutex_unlock(&l->mu);
}

void mt_latch_destroy(mt_latch *l)
{
    pthread_mutex_destroy(&l->mu);
    pthread_cond_destroy(&l->cv);
}

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

static void flush_batches(mt_io_thread *io)
{
    for (int i = 0; i < io->nbatch; i++) {
        /* Once pushed, the completions (which hold the sink) may be popped
         * and freed before the wakeup: hold the sink across both. */
        mt_sink *sink = io->batch[i].sink;
        mt_sink_incref(sink);
        mt_sink_push(sink, io->batch[i].first, io->batch[i].last);
        mt_sink_decref(sink);
    }
    io->nbatch = 0;
}

void mt_io_thread_emit(mt_io_thread *io, mt_done *done)
{
    mt_sink *sink = done->source->sink;
    mt_counter_add(&io->stats.completions, 1);
    atomic_store_explicit(&done->node.next, NULL, memory_order_relaxed);
    int i;
    for (i = 0; i < io->nbatch && io->batch[i].sink != sink; i++)
        ;
    if (i == io->nbatch) {
        if (io->nbatch == MT_BATCH_SINKS) {
            flush_batches(io);
            i = 0;
        }
        io->batch[i].sink = sink;
        io->batch[i].first = io->batch[i].last = done;
        io->nbatch = i + 1;
        return;
    }
    atomic_store_explicit(&io->batch[i].last->node.next, &done->node, memory_order_relaxed);
    io->batch[i].last = done;
}

void mt_io_thread_own(mt_io_thread *io, mt_io_obj *obj)
{
    mt_io_obj_incref(obj);
    obj->prev = NULL;
    obj->next = io->owned;
    if (io->owned)
        io->owned->prev = obj;
    io->owned = obj;
}

void mt_io_thread_disown(mt_io_thread *io, mt_io_obj *obj)
{
    if (obj->prev)
        obj->prev->next = obj->next;
    else
        io->owned = obj->next;
    if (obj->next)
        obj->next->prev = obj->prev;
    obj->prev = obj->next = NULL;
    mt_io_obj_decref(obj);
}

bool mt_io_thread_post(mt_io_thread *io, mt_cmd *first, mt_cmd *last)
{
    /* mt_runtime_stop() sets `stopped` and posts STOP while its caller
     * holds the GIL, as does every poster in the extension: nothing can be
     * pushed behind STOP.  (Callers without the GIL must not race a stop.) */
    if (mt_io_thread_stopped(io))
        return false;
    mt_mpsc_queue_push_chain(&io->commands, &first->node, &last->node);
    mt_waker_notify(&io->waker);
    return true;
}

static void drop_sink(mt_io_thread *io, mt_sink *sink)
{
    mt_io_obj *obj = io->owned;
    while (obj != NULL) {
        mt_io_obj *next = obj->next;
        if (sink == NULL || obj->sink == sink)
            obj->ops->drop(io, obj, sink == NULL); /* disowns it */
        obj = next;
    }
}

static void run_commands(mt_io_thread *io)
{
    mt_mpsc_node *node;
    uint64_t n = 0;
    while ((node = mt_mpsc_queue_pop(&io->commands)) != NULL) {
        mt_cmd *cmd = MT_CONTAINER_OF(node, mt_cmd, node);
        n++;
        switch (cmd->kind) {
        case MT_CMD_SINK_CLOSE:
            drop_sink(io, cmd->target);
            flush_batches(io);
            mt_latch_done(cmd->latch);
            mt_cmd_free(cmd);
            break;
        case MT_CMD_STOP:
            io->exiting = true;
            mt_cmd_free(cmd);
            break;
        default: {
            mt_io_obj *obj = cmd->target;
            obj->ops->command(io, obj, cmd); /* takes the command */
        }
        }
    }
    if (n)
        mt_counter_add(&io->stats.commands, n);
}

static void on_waker(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    mt_waker_drain(&((mt_io_thread *)arg)->waker);
}

static void *io_main(void *arg)
{
    mt_io_thread *io = arg;
    atomic_store(&io->native_id, (long)gettid());
    while (!io->exiting) {
        run_commands(io);
        flush_batches(io);
        if (io->exiting)
            break;
        mt_waker_prepare_sleep(&io->waker);
        if (!mt_mpsc_queue_is_empty(&io->commands)) {
            mt_waker_awake(&io->waker);
            event_base_loop(io->base, EVLOOP_ONCE | EVLOOP_NONBLOCK);
        } else {
            event_base_loop(io->base, EVLOOP_ONCE);
            mt_waker_awake(&io->waker);
        }
        flush_batches(io);
    }
    /* Stopping: abort what is left, tell the loops, free the thread's
     * resources.  Commands behind STOP cannot exist (see post). */
    run_commands(io);
    drop_sink(io, NULL);
    flush_batches(io);
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
    mt_mpsc_queue_init(&io->commands);
    atomic_init(&io->stopped, false);
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

/* Guarded by mu.  Stopped threads stay allocated on `retired`: streams of
 * old loops may still point at them (and only ask whether they stopped). */
static struct {
    pthread_mutex_t mu;
    int n;
    mt_io_thread *threads[MT_IO_THREADS_MAX];
    mt_io_thread *retired;
} rt = {.mu = PTHREAD_MUTEX_INITIALIZER};

static _Atomic unsigned fork_generation;

/* Threads told to stop and not joined yet; under rt.mu. */
static int stopping_n;
static mt_io_thread *stopping[MT_IO_THREADS_MAX * 4];

/* In a child after fork() the threads are gone; their memory is forgotten,
 * not freed, since it may have been mid-update when the parent forked. */
static void forget_after_fork(void)
{
    pthread_mutex_init(&rt.mu, NULL);
    rt.n = 0;
    rt.retired = NULL;
    stopping_n = 0;
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

int mt_runtime_acquire(int n, mt_io_thread **out)
{
    if (n < 1 || n > MT_IO_THREADS_MAX) {
        errno = EINVAL;
        return -1;
    }
    pthread_mutex_lock(&rt.mu);
    int rc = 0;
    while (rt.n < n) {
        mt_io_thread *io = io_thread_start(rt.n);
        if (io == NULL) {
            rc = -1;
            break;
        }
        rt.threads[rt.n++] = io;
    }
    if (rc == 0)
        memcpy(out, rt.threads, (size_t)n * sizeof(*out));
    pthread_mutex_unlock(&rt.mu);
    return rc;
}

void mt_runtime_stop(void)
{
    pthread_mutex_lock(&rt.mu);
    for (int i = 0; i < rt.n; i++) {
        mt_io_thread *io = rt.threads[i];
        mt_cmd *stop = mt_cmd_new(MT_CMD_STOP, NULL, 0);
        if (stop == NULL || stopping_n == (int)(sizeof(stopping) / sizeof(*stopping))) {
            /* Out of memory: this thread is left running. */
            if (stop != NULL)
                mt_cmd_free(stop);
            continue;
        }
        atomic_store_explicit(&io->stopped, true, memory_order_seq_cst);
        mt_mpsc_queue_push(&io->commands, &stop->node);
        mt_waker_notify(&io->waker);
        stopping[stopping_n++] = io;
    }
    rt.n = 0;
    pthread_mutex_unlock(&rt.mu);
}

void mt_runtime_join(void)
{
    for (;;) {
        pthread_mutex_lock(&rt.mu);
        mt_io_thread *io = stopping_n > 0 ? stopping[--stopping_n] : NULL;
        pthread_mutex_unlock(&rt.mu);
        if (io == NULL)
            return;
        pthread_join(io->thread, NULL);
        mt_waker_close(&io->waker);
        pthread_mutex_lock(&rt.mu);
        io->retired_next = rt.retired;
        rt.retired = io;
        pthread_mutex_unlock(&rt.mu);
    }
}

void mt_runtime_shutdown(void)
{
    mt_runtime_stop();
    mt_runtime_join();
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
    if (io != NULL) {
        out->transports = atomic_load(&io->stats.transports);
        out->listeners = atomic_load(&io->stats.listeners);
        out->bytes_read = atomic_load(&io->stats.bytes_read);
        out->bytes_written = atomic_load(&io->stats.bytes_written);
        out->accepts = atomic_load(&io->stats.accepts);
        out->commands = atomic_load(&io->stats.commands);
        out->completions = atomic_load(&io->stats.completions);
        out->wakeups_sent = atomic_load(&io->waker.wakeups_sent);
        out->wakeups_received = atomic_load(&io->waker.wakeups_received);
        out->native_id = atomic_load(&io->native_id);
    }
    pthread_mutex_unlock(&rt.mu);
    return io != NULL;
}

int mt_runtime_default_size(void)
{
    const char *env = getenv("MTLOOP_IO_THREADS");
    if (env != NULL && *env) {
        char *end;
        long v = strtol(env, &end, 10);
        if (*end == '\0' && v >= 1 && v <= MT_IO_THREADS_MAX)
            return (int)v;
    }
    /* The CPUs this process may run on (taskset, cgroup cpusets), not all
     * the machine has: eight threads squeezed onto two allowed CPUs cost
     * twice the CPU per request of one. */
    cpu_set_t allowed;
    long cpus = sched_getaffinity(0, sizeof(allowed), &allowed) == 0
                    ? CPU_COUNT(&allowed)
                    : sysconf(_SC_NPROCESSORS_ONLN);
    /* One core stays with the loop thread; beyond 8 a single loop cannot
     * feed more I/O threads than it already has. */
    long n = cpus - 1;
    if (n < 1)
        n = 1;
    if (n > 8)
        n = 8;
    return (int)n;
}
