/* The I/O runtime: a pool of I/O threads shared by every loop in the process,
 * and the seam every transport kind plugs into.
 *
 * Each I/O thread drives its own libevent base (EVENT_BASE_FLAG_NOLOCK) and
 * owns the C half of the transports and listeners given to it: their
 * records.  Loops talk to a thread only through its command queue (MPSC,
 * woken through its waker); the thread answers through each loop's sink
 * (MPSC + waker), batching what one iteration produced into one push and at
 * most one wakeup per sink.  No I/O thread ever touches a PyObject or the
 * GIL.
 *
 * The seam, modelled on libuv's uv__io_t (the poller knows no handle type):
 *  - a record starts with mt_record, the common head: reference count,
 *    owning thread, sink, the I/O-side operations the runtime calls and the
 *    loop-side operations the loop calls (loop.h), the loop half's pointer;
 *  - messages in both directions are one generic envelope, mt_msg; a record
 *    kind numbers its own opcodes from MT_OP_KIND and lays out its payloads;
 *  - control operations are bits set in the record plus one embedded queue
 *    link, so they never allocate and never fail;
 *  - a record's last completion is its embedded RELEASED message, which
 *    cannot fail either;
 *  - fd readiness reaches a record through an mt_io_watch, whose callback
 *    the record kind supplies.
 * Adding a kind touches neither this file nor src/loop/.
 *
 * The pool starts on first use, grows on demand, stops at interpreter exit
 * or on request (a later use starts a fresh one, except after the exit-time
 * stop) and is recreated lazily in a child process after fork(), where the
 * parent's threads do not exist. */
#ifndef MT_RUNTIME_H
#define MT_RUNTIME_H

#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#include "io_threads/credit.h"
#include "io_threads/mpsc_queue.h"
#include "io_threads/waker.h"

#define MT_IO_THREADS_MAX 64

typedef struct mt_io_thread mt_io_thread;
typedef struct mt_sink mt_sink;
typedef struct mt_record mt_record;
typedef struct mt_msg mt_msg;
struct mt_loop_ops; /* the loop's half of the seam: src/loop/loop.h */
struct event_base;

/* ---- messages: the envelope ---------------------------------------------- */

enum {
    MT_OP_CONTROL = 0,    /* not a message: a record's control link (below) */
    MT_OP_SINK_CLOSE = 1, /* command: mt_runtime_close_sink() */
    MT_OP_STOP = 2,       /* command: mt_runtime_stop() */
    MT_OP_RELEASED = 3,   /* completion: the record's embedded last one; err */
    MT_OP_KIND = 16,      /* record kinds number their opcodes from here */
};

/* A command (loop -> I/O thread) or a completion (I/O thread -> loop).
 * The payload, `len` bytes laid out by the record kind, follows the
 * header (mt_msg_data).  Records come from the buffer pool. */
struct mt_msg {
    mt_mpsc_node node;  /* queue link; a receiver may chain a popped message
                           on lists of its own through node.next */
    uint8_t op;         /* MT_OP_* or the kind's own opcode */
    uint8_t pool_cls;   /* buffer-pool class, or MT_MSG_EMBEDDED */
    uint8_t lane;       /* a completion charged to its sink's lane: the
                           index of the thread that emitted it (see mt_sink),
                           else MT_LANE_NONE */
    int32_t err;        /* an errno value, or 0 */
    mt_record *rec;     /* target or source: a reference */
    size_t len;         /* payload bytes */
};

#define MT_MSG_EMBEDDED 0xfe /* part of a record: freeing drops the reference */
#define MT_LANE_NONE 0xff

static inline void *mt_msg_data(mt_msg *msg) { return msg + 1; }

/* A message with room for `len` payload bytes, holding a reference on
 * `rec` (may be NULL); NULL when out of memory.  Any thread. */
mt_msg *mt_msg_new(uint8_t op, mt_record *rec, size_t len);
/* Frees it and drops its reference.  Any thread. */
void mt_msg_free(mt_msg *msg);

/* ---- records: the common head ---------------------------------------------- */

/* What the runtime calls on the owning I/O thread. */
typedef struct mt_record_ops {
    /* A message of the kind's own opcode addressed to the record.  Takes it. */
    void (*message)(mt_io_thread *io, mt_record *rec, mt_msg *msg);
    /* Once after each command batch in which the record was marked dirty
     * (mt_record_mark_dirty) or given control bits: `control` holds the
     * bits taken since the last call, in no particular order. */
    void (*service)(mt_io_thread *io, mt_record *rec, uint32_t control);
    /* Let go of everything now: the loop is closing (`notify` false: its
     * sink takes nothing more) or the pool is stopping (`notify` true: end
     * with RELEASED).  Must disown the record. */
    void (*drop)(mt_io_thread *io, mt_record *rec, bool notify);
    /* Any thread, when the last reference goes. */
    void (*destroy)(mt_record *rec);
    /* Kinds that call mt_io_lane_open: its lane has room again, so the
     * record may read (and may be parked again at once). */
    void (*resume)(mt_io_thread *io, mt_record *rec);
} mt_record_ops;

/* The link a control signal queues: same first fields as mt_msg. */
typedef struct mt_msg_link {
    mt_mpsc_node node;
    uint8_t op; /* MT_OP_CONTROL */
} mt_msg_link;

/* Set in `control` while the control link is queued. */
#define MT_CONTROL_QUEUED (1u << 31)

/* Ownership: `refs` and `control` are atomics; `io`, `sink`, `ops`,
 * `loop_ops` are set before the record is published, then only read;
 * `owner` and `live_*` belong to the loop thread; `owned_*`, `dirty*`,
 * `parked*`, `control_taken` to the owning I/O thread; `released` is written by the
 * I/O thread before it is pushed and read by the loop after it pops it. */
struct mt_record {
    _Atomic int refs;
    _Atomic uint32_t control;        /* pending control bits, kind-defined */
    mt_io_thread *io;                /* a reference */
    mt_sink *sink;                   /* a reference */
    const mt_record_ops *ops;
    const struct mt_loop_ops *loop_ops;
    void *owner;                     /* the loop half (a PyObject), borrowed;
                                        NULL once it is gone */
    mt_record *live_prev, *live_next;   /* the loop's list of open records */
    mt_record *owned_prev, *owned_next; /* the thread's list of attached ones */
    mt_record *dirty_next;
    mt_record *parked_next;          /* its lane's list of parked ones */
    uint32_t control_taken;
    bool dirty;
    bool parked;                     /* waits for room in its lane */
    bool attached;                   /* on the thread's owned list */
    mt_msg_link control_link;
    mt_msg released;                 /* MT_OP_RELEASED, pushed at most once */
};

/* Initialises the head (one reference, the caller's).  `loop_ops` may be
 * NULL for records no loop dispatches (tests). */
void mt_record_init(mt_record *rec, const mt_record_ops *ops,
                    const struct mt_loop_ops *loop_ops, mt_sink *sink, mt_io_thread *io);
static inline void mt_record_incref(mt_record *rec)
{
    atomic_fetch_add_explicit(&rec->refs, 1, memory_order_relaxed);
}
void mt_record_decref(mt_record *rec);

/* Sets control bits and queues the record's control link to its I/O thread
 * unless it is queued already; the thread hands the bits to ops->service
 * after the batch in which it took them, so every message posted before
 * the signal has been handed to ops->message by then.  Never allocates.
 * Returns false when the thread has stopped (the bits are moot: the thread
 * dropped its records).  The same callers as mt_io_thread_post. */
bool mt_record_signal(mt_record *rec, uint32_t bits);

/* ---- for the owning thread's handlers ------------------------------------- */

/* Queues the record for ops->service after the current command batch. */
void mt_record_mark_dirty(mt_io_thread *io, mt_record *rec);
/* Puts the record on the thread's list (the list holds a reference) /
 * takes it off.  Attached records are dropped when their sink closes or
 * the pool stops. */
void mt_record_attach(mt_io_thread *io, mt_record *rec);
void mt_record_detach(mt_io_thread *io, mt_record *rec);
/* Queues the embedded RELEASED completion with `err`: the record's last
 * completion (nothing may be emitted for it afterwards). */
void mt_record_release(mt_io_thread *io, mt_record *rec, int err);
/* Before a handler produces input for its loop (a read): true when the
 * record's lane (mt_sink) has room.  False when the loop holds its share
 * already: the record is parked, and the handler must stop producing
 * (and watching for input) until ops->resume.  Always true inline. */
bool mt_io_lane_open(mt_io_thread *io, mt_record *rec);
/* Queues a completion; the thread pushes each sink's batch once per
 * iteration. */
void mt_io_thread_emit(mt_io_thread *io, mt_msg *msg);
/* The same for a completion nobody waits for (a buffer to let go of, of
 * `bytes`): it wakes the loop only with others, or past
 * MT_QUIET_BYTES_MAX; a sleeping loop finds it when it next wakes. */
void mt_io_thread_emit_quiet(mt_io_thread *io, mt_msg *msg, size_t bytes);
/* A completion of `op` with no payload and `err`; false when out of
 * memory (nothing was queued). */
bool mt_io_thread_emit_op(mt_io_thread *io, mt_record *rec, uint8_t op, int err);

/* fd readiness for a record, as libuv's uv__io_t: the callback is the
 * kind's, the runtime only polls.  One libevent event, re-assigned when
 * the interest changes (a second event cost about 170 bytes a
 * connection).  Owning thread only. */
enum { MT_IO_READ = 1, MT_IO_WRITE = 2 };
typedef struct mt_io_watch mt_io_watch;
typedef void (*mt_io_watch_cb)(mt_io_watch *w, unsigned events);
struct mt_io_watch {
    struct event *ev;
    mt_io_thread *io;
    mt_io_watch_cb cb;
    int fd;
    uint8_t interest; /* what it is added for now */
};
/* Returns 0, or -1 with errno set (nothing is watched yet). */
int mt_io_watch_open(mt_io_watch *w, mt_io_thread *io, int fd, mt_io_watch_cb cb);
/* Watches for `interest` (0: nothing).  Returns 0, or -1 with errno when
 * the poller refused (the watch is then off). */
int mt_io_watch_set(mt_io_watch *w, unsigned interest);
void mt_io_watch_close(mt_io_watch *w);

/* ---- commands: loop -> I/O thread ------------------------------------------ */

/* Pushes a chain of messages (linked through node.next, first..last) to an
 * I/O thread and wakes it if it sleeps.  Returns false, leaving the chain
 * to the caller, when the thread has stopped.  Callers hold the GIL, which
 * orders them against mt_runtime_stop(); without it they must not race a
 * stop. */
bool mt_io_thread_post(mt_io_thread *io, mt_msg *first, mt_msg *last);

/* ---- sinks: one per loop ------------------------------------------------- */

/* Pool memory one I/O thread may hold in completions its loop has not
 * popped yet (the lane of that thread and that loop).  Past it the thread
 * parks the records that would read more for that loop, and the loop
 * restarts them once it has popped half.  Without it, an I/O thread read
 * ahead on every connection at once while the loop thread was busy: a
 * storm of 10,000 connections echoing 100 KB peaked at 300 MB and 72k
 * page faults (uvloop: 100 MB, 19k).  Other loops' lanes are not touched,
 * so a loop that stops popping holds back only its own connections.  The
 * inline runtime has its own bound, MT_INLINE_HELD_MAX. */
#define MT_LANE_HELD_MAX ((int64_t)8 * 1024 * 1024)

/* One I/O thread's share of a sink.  `held` (credit.h) is shared by the
 * thread, its producer, and the loop thread; the rest is the thread's. */
typedef struct mt_lane {
    mt_credit held;                     /* pool bytes of completions not popped */
    mt_record *parked_head, *parked_tail; /* waiting for room, in order;
                                           each holds a reference */
    mt_sink *next_starved;              /* the thread's list of sinks whose
                                           lane has parked records */
    bool listed;                        /* on that list */
} mt_lane;

/* A loop's completion queue.  Reference-counted because I/O threads may
 * hold it after the loop object is gone: every record holds one reference,
 * the loop another.
 *
 * Ownership: `queue` is pushed by any thread and popped by the loop thread;
 * `waker` is shared (atomics), its fd is watched by the loop's base;
 * `refs` is atomic; `lanes[i]` is I/O thread i's (mt_lane); `ret_*` belong
 * to the loop thread. */
struct mt_sink {
    mt_mpsc_queue queue;
    mt_waker waker;
    _Atomic int refs;
    int64_t lane_max;      /* immutable: MT_LANE_HELD_MAX, or a test's */
    uint64_t ret_lanes;    /* bit i: lane i has popped bytes not given back */
    int64_t ret_bytes[MT_IO_THREADS_MAX];      /* those bytes, per lane ... */
    mt_io_thread *ret_io[MT_IO_THREADS_MAX];   /* ... and its thread (a reference) */
    union {
        mt_lane lane;
        char line[64];     /* one cache line each */
    } lanes[MT_IO_THREADS_MAX];
};

mt_sink *mt_sink_new(void);
/* The same with lanes of `lane_max` bytes (tests: small lanes park often). */
mt_sink *mt_sink_new_lanes(int64_t lane_max);
void mt_sink_incref(mt_sink *sink);
void mt_sink_decref(mt_sink *sink);
/* Pushes a chain (linked through node.next) and, with `wake`, wakes the
 * loop if it sleeps. */
void mt_sink_push(mt_sink *sink, mt_msg *first, mt_msg *last, bool wake);
/* Loop thread: gives the lanes back what the pops took, at the latest
 * when a pop finds nothing (mt_sink_pop does) and when the sink closes. */
void mt_sink_return(mt_sink *sink);
/* Loop thread: `msg`, popped, was charged to the lane of thread `msg->lane`
 * (its record's thread). */
void mt_sink_popped(mt_sink *sink, mt_msg *msg);
/* Loop thread: the next completion, or NULL (see mt_mpsc_queue_pop). */
static inline mt_msg *mt_sink_pop(mt_sink *sink)
{
    mt_mpsc_node *node = mt_mpsc_queue_pop(&sink->queue);
    if (node == NULL) {
        if (sink->ret_lanes != 0)
            mt_sink_return(sink);
        return NULL;
    }
    mt_msg *msg = MT_CONTAINER_OF(node, mt_msg, node);
    if (msg->lane != MT_LANE_NONE)
        mt_sink_popped(sink, msg);
    return msg;
}

/* Makes each of the `n` threads drop the records of `sink` it owns (no
 * RELEASED: the loop is closing) and waits until every one has; completions
 * they had already queued stay in the sink for the caller to free.
 * Threads that stopped are skipped.  Blocks: call without the GIL. */
void mt_runtime_close_sink(mt_sink *sink, mt_io_thread *const *io, int n);

/* ---- the pool ------------------------------------------------------------ */

/* Adds to a counter that only one thread writes (others only read it): a
 * load and a release store, no locked instruction. */
static inline void mt_counter_add(_Atomic uint64_t *counter, uint64_t n)
{
    atomic_store_explicit(counter, atomic_load_explicit(counter, memory_order_relaxed) + n,
                          memory_order_release);
}

/* Per-thread counters, all atomics written by their I/O thread and read by
 * anyone, but for `bytes_sent_direct`. */
typedef struct mt_io_stats {
    _Atomic uint64_t transports;   /* currently owned */
    _Atomic uint64_t listeners;    /* currently owned */
    _Atomic uint64_t bytes_read;
    _Atomic uint64_t bytes_written;
    _Atomic uint64_t bytes_sent_direct; /* loop threads (any of them: fetch_add): what
                                           they sent themselves on this thread's
                                           records (a flow's direct send); the
                                           snapshot's bytes_written includes it */
    _Atomic uint64_t accepts;
    _Atomic uint64_t commands;
    _Atomic uint64_t completions;
    _Atomic uint64_t reads_direct; /* inline only: reads into a protocol's own buffer
                                      or bytes object (flow.h, direct reads) */
    _Atomic uint64_t held_back;    /* records parked for a full lane (mt_io_lane_open) */
    _Atomic uint64_t wait_ns;      /* time asleep in the thread's wait */
} mt_io_stats;

typedef struct mt_io_snapshot {
    uint64_t transports, listeners, bytes_read, bytes_written, accepts, commands,
        completions, wakeups_sent, wakeups_received, reads_direct, held_back;
    uint64_t cpu_ns;  /* the thread's CPU time (0 inline: the loop thread's own) */
    uint64_t wait_ns;
    long native_id;
} mt_io_snapshot;

/* Makes sure at least `n` threads run (starting the pool if needed) and
 * stores the first `n` in `out`, each with a reference the caller gives
 * back with mt_io_thread_decref().  Returns 0, or -1 with errno set
 * (ESHUTDOWN after mt_runtime_finalize()). */
int mt_runtime_acquire(int n, mt_io_thread **out);
/* Tells every thread to stop (their records are dropped, with RELEASED)
 * and marks them stopped, so that posts fail from now on.  Does not
 * block: the extension calls it with the GIL held, which orders it
 * against every post. */
void mt_runtime_stop(void);
/* Joins the threads stopped so far.  Blocks: call without the GIL. */
void mt_runtime_join(void);
/* mt_runtime_stop() then mt_runtime_join(), for callers without a GIL. */
void mt_runtime_shutdown(void);
/* The interpreter is exiting: no pool may start again in this process
 * (a loop in a daemon thread would otherwise restart it). */
void mt_runtime_finalize(void);
/* Number of threads running now. */
int mt_runtime_size(void);
/* Copies thread i's counters; false if there is no such thread. */
bool mt_runtime_snapshot(int i, mt_io_snapshot *out);
/* Copies the counters of `io` (a pool thread or an inline runtime). */
void mt_io_thread_snapshot(mt_io_thread *io, mt_io_snapshot *out);
/* The default number of I/O threads for a loop: $MTLOOP_IO_THREADS if
 * valid, else from the CPUs this process may use; 0 means inline. */
int mt_runtime_default_size(void);
/* Thread records allocated and not yet freed (started, stopped or
 * referenced): for tests. */
int mt_runtime_threads_allocated(void);

/* ---- the inline runtime ---------------------------------------------------
 *
 * A loop made with io_threads=0 runs its records itself: an mt_io_thread
 * with no thread of its own, whose watches live on the loop's event base
 * and whose handlers run on the loop thread, inside the loop's wait, as
 * uvloop's do.  Nothing is handed between threads, so nothing wakes
 * anyone: a post only queues (its waker never sleeps), and the loop runs
 * the queue before each wait.  For machines where an I/O thread would
 * share the loop thread's CPU: there each handoff costs a context switch.
 * Loop thread only, all of it. */

/* A runtime on `base` (the loop's), holding one reference for the loop;
 * NULL when out of memory. */
mt_io_thread *mt_io_inline_new(struct event_base *base);
bool mt_io_thread_is_inline(mt_io_thread *io);
/* Runs the commands posted since the last call and pushes the
 * completions they made to the sink, without waking it.  True when work is
 * left that must not wait for fd events. */
bool mt_io_inline_run(mt_io_thread *io);
/* Pushes the completions the handlers made in the loop's wait. */
void mt_io_inline_flush(mt_io_thread *io);
/* The loop is closing: every record lets go (no RELEASED; what was queued
 * stays in `sink`), the runtime leaves the base and the loop's reference
 * goes.  Records may hold theirs on. */
void mt_io_inline_close(mt_io_thread *io, mt_sink *sink);

/* Registers the fork handler; once, at module import. */
void mt_runtime_init(void);
/* Bumped in the child after every fork(): objects made under another
 * generation belong to the parent. */
unsigned mt_fork_generation(void);

/* A stopped thread stays allocated while records or loops refer to it. */
void mt_io_thread_incref(mt_io_thread *io);
void mt_io_thread_decref(mt_io_thread *io);
bool mt_io_thread_stopped(mt_io_thread *io);
/* True while the thread is blocked in (or about to block in) its wait:
 * work handed to it now costs a wakeup.  A racy hint, any thread. */
bool mt_io_thread_sleeping(mt_io_thread *io);
int mt_io_thread_index(mt_io_thread *io);
struct event_base *mt_io_thread_base(mt_io_thread *io);
mt_io_stats *mt_io_thread_stats(mt_io_thread *io);

#endif
