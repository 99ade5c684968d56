/* The I/O runtime: a pool of I/O threads shared by every loop in the process.
 *
 * Each I/O thread drives its own libevent base (EVENT_BASE_FLAG_NOLOCK) and
 * owns the C half of the transports and listeners given to it.  Loops talk
 * to it only through its command queue (MPSC, woken through its waker);
 * it answers through each loop's sink (MPSC + waker), batching what one
 * iteration produced into one push and at most one wakeup per sink.  No
 * I/O thread ever touches a PyObject or the GIL.
 *
 * The pool starts on first use, grows on demand, stops at interpreter exit
 * or on request (a later use starts a fresh one) and is recreated lazily in
 * a child process after fork(), where the parent's threads do not exist. */
#ifndef MT_RUNTIME_H
#define MT_RUNTIME_H

#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/socket.h>
#include <sys/types.h>

#include "io_threads/mpsc_queue.h"
#include "io_threads/waker.h"

#define MT_IO_THREADS_MAX 64

typedef struct mt_io_thread mt_io_thread;
typedef struct mt_sink mt_sink;
typedef struct mt_io_obj mt_io_obj;
typedef struct mt_cmd mt_cmd;

/* ---- objects owned by I/O threads ---------------------------------------- */

/* What the runtime needs of a stream or listener: its handlers. */
typedef struct mt_io_ops {
    /* On the owning thread: carry out a command addressed to the object. */
    void (*command)(mt_io_thread *io, mt_io_obj *obj, mt_cmd *cmd);
    /* On the owning thread: let go of everything now (loop closing, pool
     * stopping).  `notify`: push a CLOSED/last completion to the sink. */
    void (*drop)(mt_io_thread *io, mt_io_obj *obj, bool notify);
    /* Any thread, when the last reference goes. */
    void (*destroy)(mt_io_obj *obj);
} mt_io_ops;

/* The common head of streams and listeners.
 *
 * Ownership: `refs` is atomic; `ops`, `sink` and `io` are set before the
 * object is published and then only read; `prev`/`next` (the owning
 * thread's list) belong to the I/O thread. */
struct mt_io_obj {
    _Atomic int refs;
    const mt_io_ops *ops;
    mt_sink *sink;          /* a reference */
    mt_io_thread *io;
    mt_io_obj *prev, *next;
};

void mt_io_obj_init(mt_io_obj *obj, const mt_io_ops *ops, mt_sink *sink, mt_io_thread *io);
static inline void mt_io_obj_incref(mt_io_obj *obj)
{
    atomic_fetch_add_explicit(&obj->refs, 1, memory_order_relaxed);
}
void mt_io_obj_decref(mt_io_obj *obj);

/* ---- commands: loop -> I/O thread --------------------------------------- */

typedef enum {
    MT_CMD_STREAM_ATTACH,   /* take the stream; reading stays off */
    MT_CMD_STREAM_WRITE,    /* the command itself becomes an output chunk */
    MT_CMD_STREAM_READ_ON,
    MT_CMD_STREAM_READ_OFF,
    MT_CMD_STREAM_CREDIT,   /* the loop consumed data: reading may resume */
    MT_CMD_STREAM_SHUT_WR,  /* shutdown(SHUT_WR) once the output is flushed */
    MT_CMD_STREAM_CLOSE,    /* flush, then release the fd */
    MT_CMD_STREAM_ABORT,    /* drop the output and release the fd */
    MT_CMD_STREAM_SENDFILE, /* after the output: sendfile() from file_fd */
    MT_CMD_STREAM_OWN_FD,   /* the socket object let go: close the fd when done */
    MT_CMD_LISTEN,
    MT_CMD_UNLISTEN,
    MT_CMD_SINK_CLOSE,      /* drop everything of a closing loop, then ack */
    MT_CMD_STOP,            /* abort everything and end the thread */
} mt_cmd_kind;

typedef struct mt_latch mt_latch;

struct mt_cmd {
    mt_mpsc_node node;
    struct mt_cmd *next;   /* output-queue link once a WRITE is queued */
    uint8_t kind;
    uint8_t pool_cls;      /* buffer-pool class of this record */
    void *target;          /* an mt_io_obj (a reference), or the mt_sink */
    mt_latch *latch;       /* SINK_CLOSE only */
    size_t len;            /* WRITE: bytes in data[]; SENDFILE: count */
    int64_t offset;        /* SENDFILE: file offset */
    int file_fd;           /* SENDFILE */
    char data[];
};

/* Allocates a command with room for `len` bytes of data (from the buffer
 * pool; NULL when out of memory).  Any thread frees it with mt_cmd_free(). */
mt_cmd *mt_cmd_new(mt_cmd_kind kind, void *target, size_t len);
void mt_cmd_free(mt_cmd *cmd);

/* Pushes a chain of commands (linked through node.next, first..last) to an
 * I/O thread and wakes it if it sleeps.  Returns false, leaving the chain
 * to the caller, when the thread has stopped.  Any thread. */
bool mt_io_thread_post(mt_io_thread *io, mt_cmd *first, mt_cmd *last);

/* ---- completions: I/O thread -> loop ------------------------------------ */

typedef enum {
    MT_DONE_DATA,           /* len bytes in data[] */
    MT_DONE_EOF,
    MT_DONE_READ_ERROR,     /* err */
    MT_DONE_WRITE_ERROR,    /* err */
    MT_DONE_DRAINED,        /* flushed output passed the loop's mark */
    MT_DONE_BLOCKED,        /* the socket refused output the loop asked about */
    MT_DONE_SENDFILE,       /* len bytes sent; err 0 or the error */
    MT_DONE_CLOSED,         /* the I/O thread let go of the fd; the last one,
                               except the SENDFILE answering a command that
                               arrived after it (ECONNABORTED) */
    MT_DONE_ACCEPT,         /* fd, addr */
    MT_DONE_ACCEPT_ERROR,   /* err */
} mt_done_kind;

typedef struct mt_done {
    mt_mpsc_node node;
    uint8_t kind;
    uint8_t pool_cls;      /* buffer-pool class of this record */
    int err;
    int fd;
    mt_io_obj *source;     /* a reference */
    size_t len;
    socklen_t addrlen;
    struct sockaddr_storage *addr; /* ACCEPT: points into data[] */
    char data[];
} mt_done;

mt_done *mt_done_new(mt_done_kind kind, mt_io_obj *source, size_t len);
/* Frees the record and drops its reference on the source. */
void mt_done_free(mt_done *done);

/* ---- sinks: one per loop ------------------------------------------------- */

/* A loop's completion queue.  Reference-counted because I/O threads may
 * hold it after the loop object is gone: every stream and listener holds
 * one reference, the loop another.
 *
 * Ownership: `queue` is pushed by any thread and popped by the loop thread;
 * `waker` is shared (atomics), its fd is watched by the loop's base;
 * `refs` is atomic. */
struct mt_sink {
    mt_mpsc_queue queue;
    mt_waker waker;
    _Atomic int refs;
};

mt_sink *mt_sink_new(void);
void mt_sink_incref(mt_sink *sink);
void mt_sink_decref(mt_sink *sink);
/* Pushes a chain (linked through node.next) and wakes the loop if it sleeps. */
void mt_sink_push(mt_sink *sink, mt_done *first, mt_done *last);

/* A countdown a loop blocks on (without the GIL) while I/O threads let go
 * of its streams.  Ownership: `pending` is guarded by `mu`. */
struct mt_latch {
    int pending;
    pthread_mutex_t mu;
    pthread_cond_t cv;
};

void mt_latch_init(mt_latch *l);
void mt_latch_add(mt_latch *l);
void mt_latch_done(mt_latch *l);
void mt_latch_wait(mt_latch *l);
void mt_latch_destroy(mt_latch *l);

/* ---- the pool ------------------------------------------------------------ */

/* Adds to a counter that only one thread writes (others only read it): a
 * load and a release store, no locked instruction. */
static inline void mt_counter_add(_Atomic uint64_t *counter, uint64_t n)
{
    atomic_store_explicit(counter, atomic_load_explicit(counter, memory_order_relaxed) + n,
                          memory_order_release);
}

/* Per-thread counters, all atomics written by their I/O thread and read by
 * anyone. */
typedef struct mt_io_stats {
    _Atomic uint64_t transports;   /* currently owned */
    _Atomic uint64_t listeners;    /* currently owned */
    _Atomic uint64_t bytes_read;
    _Atomic uint64_t bytes_written;
    _Atomic uint64_t accepts;
    _Atomic uint64_t commands;
    _Atomic uint64_t completions;
} mt_io_stats;

typedef struct mt_io_snapshot {
    uint64_t transports, listeners, bytes_read, bytes_written, accepts, commands,
        completions, wakeups_sent, wakeups_received;
    long native_id;
} mt_io_snapshot;

/* Makes sure at least `n` threads run (starting the pool if needed) and
 * stores the first `n` in `out`.  Returns 0, or -1 with errno set. */
int mt_runtime_acquire(int n, mt_io_thread **out);
/* Tells every thread to stop (their transports are aborted) and marks
 * them stopped, so that posts fail from now on.  Does not block: the
 * extension calls it with the GIL held, which orders it against every
 * post. */
void mt_runtime_stop(void);
/* Joins the threads stopped so far.  Blocks: call without the GIL. */
void mt_runtime_join(void);
/* mt_runtime_stop() then mt_runtime_join(), for callers without a GIL. */
void mt_runtime_shutdown(void);
/* Number of threads running now. */
int mt_runtime_size(void);
/* Copies thread i's counters; false if there is no such thread. */
bool mt_runtime_snapshot(int i, mt_io_snapshot *out);
/* The default pool size: $MTLOOP_IO_THREADS if valid, else from the CPU
 * count (never zero). */
int mt_runtime_default_size(void);

/* Registers the fork handler; once, at module import. */
void mt_runtime_init(void);
/* Bumped in the child after every fork(): objects made under another
 * generation belong to the parent. */
unsigned mt_fork_generation(void);

bool mt_io_thread_stopped(mt_io_thread *io);
/* True while the thread is blocked in (or about to block in) its wait:
 * work handed to it now costs a wakeup.  A racy hint, any thread. */
bool mt_io_thread_sleeping(mt_io_thread *io);
int mt_io_thread_index(mt_io_thread *io);

/* ---- for the owning thread's handlers ----------------------------------- */

struct event_base *mt_io_thread_base(mt_io_thread *io);
mt_io_stats *mt_io_thread_stats(mt_io_thread *io);
/* Queues a completion; the thread pushes each sink's batch once per
 * iteration. */
void mt_io_thread_emit(mt_io_thread *io, mt_done *done);
/* Adds/removes an object on the thread's list (a reference is held). */
void mt_io_thread_own(mt_io_thread *io, mt_io_obj *obj);
void mt_io_thread_disown(mt_io_thread *io, mt_io_obj *obj);

#endif
