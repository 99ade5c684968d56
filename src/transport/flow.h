/* A flow: the C record of every byte-stream transport (TCP and Unix
 * sockets, TLS over them, pipes), and the pump that drives it on its
 * I/O thread.
 *
 * The pump is the byte-stream machinery, the same for every kind: the
 * output queue and its batched writes, the `flushed` and `unconsumed`
 * counters, the marks for DRAINED and BLOCKED, read credit, shutdown and
 * close ordering, and RELEASED strictly last.  What differs by kind is a
 * small table of fd operations (mt_fd_ops): a socket sends with sendmsg()
 * and has sendfile(); a pipe uses writev() (pipe_ops.c); TLS (tls_ops.c) is a
 * filter between the pump and its socket, with a handshake and a
 * close_notify of its own.  The counters count the bytes the pump hands to
 * and takes from those operations: plaintext, for TLS.
 *
 * Lifetime and the fd: the record is reference-counted (mt_record).  The
 * loop half holds one reference until it lets go of the transport
 * (connection_lost, or the loop closing), the owning I/O thread one while
 * attached, every queued message one.  The record owns its fd from
 * creation; the fd has two holds, the I/O thread's (until it released the
 * flow) and the loop half's (until it lets go), and closes when the second
 * goes, so the number can never be reused under either of them, and a
 * peer sees the close as soon as asyncio would close the socket (messages
 * still queued do not keep it open).  The loop thread may write to an idle
 * flow (the direct send in stream_core.c) but never closes or re-registers
 * the fd; Python holds no owning object for it.
 *
 * The loop drives a flow through messages (WRITE, SENDFILE) and control
 * bits (mt_record_signal), which never allocate. */
#ifndef MT_FLOW_H
#define MT_FLOW_H

#include <sys/uio.h>

#include "io_threads/credit.h"
#include "io_threads/runtime.h"
#include "transport/fd_holds.h"
#include "transport/out_marks.h"

/* An I/O thread stops reading a flow once this much is delivered to the
 * loop but not yet consumed by the protocol.  Each read is charged at
 * least MT_READ_CHARGE_MIN, so at most 8 reads are ahead of the protocol
 * however small they are: a protocol that closes after its first bytes
 * leaves the rest in the kernel, as with the stock loop, whose close then
 * resets the peer (with byte credit alone, a peer sending into a small
 * receive buffer had 256 KiB taken from it in 2 KiB reads before the
 * close reached the I/O thread, and saw its sends succeed). */
#define MT_READ_CREDIT (256 * 1024)
#define MT_READ_CHARGE_MIN (32 * 1024)

static inline int64_t mt_read_charge(size_t n)
{
    return n < MT_READ_CHARGE_MIN ? MT_READ_CHARGE_MIN : (int64_t)n;
}

/* One read takes at most this much, into a completion record that fills
 * one 128 KiB block of the buffer pool.  A fixed read size under 64 KiB
 * stalled 64 KiB echoes for ~40 ms a request on loopback (each read left a
 * segment's tail behind).
 *
 * A flow's reads go into blocks sized by what its reads return (the pump's
 * read_shift): a read that fills its block doubles the next one, up to
 * 128 KiB, where every flow starts; one that fills under a quarter of it
 * halves the next, down to MT_READ_MIN_SHIFT.  The block is the record
 * handed to the loop, so a flow whose messages keep one size is read with
 * no copy on the I/O thread (a fixed 128 KiB block copied every read of up
 * to 32 KiB into a record of its own: a sixth of all the bytes copied in
 * callgrind's count of a storm of 300 streams echoing in 8 KiB chunks).  A
 * read that fills under a quarter of its block still moves to a record of
 * its own size, so the big block goes straight back to the thread's cache:
 * with 1,000 connections of 10 KiB messages, keeping them in 128 KiB
 * blocks took the server's peak RSS to 52 MB (uvloop: 25) and gave 49-58k
 * requests/s against 56-59k. */
#define MT_READ_MAX ((size_t)(128 * 1024) - sizeof(mt_msg))
#define MT_READ_MAX_SHIFT 17 /* log2 of MT_READ_MAX's block */
#define MT_READ_MIN_SHIFT 12 /* 4 KiB */

/* The reads one readiness event may take before other fds get their turn. */
#define MT_READS_PER_EVENT 16


/* The largest write the loop thread sends itself when the I/O thread
 * sleeps (stream_core.c); bigger ones are worth a wakeup. */
#define MT_DIRECT_SEND_MAX (16 * 1024)

typedef struct mt_flow mt_flow;

/* The fd operations of a flow kind.  Each returns what the system call
 * would (-1 with errno; EAGAIN when the fd is not ready). */
typedef struct mt_fd_ops {
    /* read and writev return what the system call would.  An operation
     * that returns EAGAIN because it waits for the other readiness (a TLS
     * read that must send first) says so in f->wait_hint. */
    ssize_t (*read)(mt_flow *f, void *buf, size_t len);
    ssize_t (*writev)(mt_flow *f, const struct iovec *iov, int cnt);
    /* NULL when the kind has no half-close (a pipe: the loop never asks). */
    int (*shutdown_wr)(mt_flow *f);
    /* NULL when the kind has none (the loop falls back to writes). */
    ssize_t (*sendfile)(mt_flow *f, int in_fd, int64_t *offset, size_t count);

    /* A filter (TLS) has work of its own on the fd before the byte stream
     * opens (a handshake) and before the fd closes (close_notify); NULL
     * for plain kinds.  The pump calls `open` from attach and `close` once
     * the output is out, then each again on the readiness it left in
     * f->filter_wait; reads and writes wait meanwhile.  Each returns 0 when
     * done, 1 while it waits, -1 with errno when it failed.  One that
     * waits with filter_wait 0 waits for no readiness: it is run again
     * once its record is marked dirty (mt_record_mark_dirty). */
    int (*open)(mt_flow *f);
    int (*close)(mt_flow *f);
    /* True when the filter holds input the fd will not signal (decrypted
     * bytes buffered inside OpenSSL).  NULL: never. */
    bool (*has_input)(mt_flow *f);
    /* Frees the filter's state; idempotent.  The owning I/O thread calls
     * it when it lets go of the flow (what the loop may still read stays),
     * destroy with `destroying` for the rest. */
    void (*release)(mt_flow *f, bool destroying);
    /* The size of the kind's flow struct, which starts with mt_flow; 0 for
     * a plain mt_flow. */
    size_t flow_size;

    /* The loop thread may call writev on an idle flow: the operation keeps
     * no state of its own (false for a filter such as TLS). */
    bool loop_may_write;
} mt_fd_ops;

extern const mt_fd_ops mt_socket_fd_ops;
/* pipe_ops.c: a pipe's read end (or any fd read and written with read()
 * and writev()), and a pipe's write end, whose readability means the read
 * end is gone. */
extern const mt_fd_ops mt_pipe_fd_ops;
extern const mt_fd_ops mt_pipe_writer_fd_ops;

/* Where a filter's own work stands (mt_flow.filter_phase). */
enum { MT_FILTER_NONE, MT_FILTER_OPENING, MT_FILTER_OPEN, MT_FILTER_CLOSING };

/* Opcodes.  Commands: */
enum {
    MT_FLOW_WRITE = MT_OP_KIND, /* payload: the bytes */
    MT_FLOW_SENDFILE,           /* payload: mt_flow_sendfile */
    /* Completions (RELEASED, the runtime's, comes last): */
    MT_FLOW_DATA,               /* payload: the bytes read */
    MT_FLOW_EOF,
    MT_FLOW_READ_ERROR,         /* err */
    MT_FLOW_WRITE_ERROR,        /* err */
    MT_FLOW_DRAINED,            /* flushed reached the loop's resume mark */
    MT_FLOW_BLOCKED,            /* the fd refused output past the loop's mark */
    MT_FLOW_SENDFILE_DONE,      /* payload: mt_flow_sendfile_done; err */
    MT_FLOW_OPENED,             /* a filter's opening finished (err: or failed,
                                   and RELEASED follows) */
    MT_FLOW_READABLE,           /* read_direct: input waits for the loop */
    /* A command: a WRITE whose bytes stay in the loop's object (payload:
     * mt_flow_write_ref; len: the bytes').  Once sent or dropped the same
     * message comes back as the completion REF_DONE, which lets go of the
     * object; it is the one completion that may follow RELEASED (a WRITE_REF
     * that reached a closed flow), so the loop handles it without the
     * transport. */
    MT_FLOW_WRITE_REF,
    MT_FLOW_REF_DONE,
};

typedef struct mt_flow_write_ref {
    const char *data;   /* inside `owner`, immutable while it is held */
    void *owner;        /* the loop's (a bytes object); opaque to the I/O thread */
} mt_flow_write_ref;

/* Control bits (mt_record_signal). */
enum {
    MT_FLOW_ATTACH = 1u << 0,    /* start serving the record */
    MT_FLOW_READING = 1u << 1,   /* want_read changed */
    MT_FLOW_CREDIT = 1u << 2,    /* read credit came back */
    MT_FLOW_SHUT_WR = 1u << 3,   /* shutdown(SHUT_WR) once the output is out */
    MT_FLOW_CLOSE = 1u << 4,     /* release once the output is out */
    MT_FLOW_ABORT = 1u << 5,     /* drop the output, release now */
    MT_FLOW_SF_CANCEL = 1u << 6, /* stop the sendfile in progress */
};

typedef struct mt_flow_sendfile {
    int fd;          /* owned by the message, then by the flow */
    int64_t offset;
    size_t count;
} mt_flow_sendfile;

typedef struct mt_flow_sendfile_done {
    size_t sent;
} mt_flow_sendfile_done;

struct mt_flow {
    mt_record rec;
    const mt_fd_ops *fd_ops;        /* immutable */
    int fd;                         /* immutable; closed by the last hold */
    _Atomic int fd_holds;           /* the I/O thread's and the loop half's (fd_holds.h) */

    /* Shared. */
    _Atomic bool want_read;         /* loop: the protocol reads (then signal READING) */
    mt_credit read_credit;          /* bytes delivered, not consumed */
    mt_out_marks marks;             /* `flushed` counts output bytes */
    _Atomic int write_err;          /* the first hard write error, set (once) by
                                       whichever thread saw it */

    /* The owning I/O thread only. */
    mt_io_watch watch;
    mt_msg *out_head, *out_tail;    /* WRITE messages, in order */
    uint64_t out_bytes;             /* bytes in them not sent yet */
    size_t out_off;                 /* bytes of out_head already sent */
    int sf_fd;                      /* the sendfile's own file descriptor, or -1 */
    int64_t sf_offset;
    size_t sf_left, sf_done;
    bool want_write;                /* output waits for writability */
    uint8_t filter_phase;           /* MT_FILTER_* */
    unsigned filter_wait;           /* readiness the filter's own work waits for */
    unsigned read_on, write_on;     /* readiness a blocked read / write waits for */
    unsigned wait_hint;             /* set by an fd op with its EAGAIN (mt_fd_ops) */
    uint8_t read_shift;             /* log2 of the block the next read goes into */
    bool starved;                   /* out of read credit */
    bool held_back;                 /* parked: its loop's lane is full
                                       (mt_io_lane_open) */
    uint8_t read_direct;            /* inline flows only: MT_READ_DIRECT_*, whether
                                       the loop reads the fd itself on READABLE
                                       (mt_flow_set_read_direct) */
    bool read_done;                 /* EOF or a read error seen */
    bool shut_wr_pending, closing, closed, write_failed;
};

/* A new, unattached flow around `fd`, which it owns from now on (one
 * reference, the caller's); NULL with errno set, the fd still the
 * caller's. */
mt_flow *mt_flow_new(const mt_fd_ops *fd_ops, const struct mt_loop_ops *loop_ops,
                     mt_sink *sink, mt_io_thread *io, int fd);

/* Drops one hold on the fd (the I/O thread's when it released the flow,
 * the loop half's when it lets go); the last closes it.  Any thread. */
void mt_flow_drop_fd(mt_flow *f);

/* ---- direct reads (inline I/O) --------------------------------------------- */

/* A flow run inline (io_threads=0) is pumped by the loop thread itself, so
 * its input need not pass through a completion record: with read_direct
 * on, readiness emits READABLE and the loop reads into the protocol's own
 * buffer (a BufferedProtocol's get_buffer()) or into the bytes object it
 * hands to data_received(), one copy fewer than through a record.
 *
 * For data_received() only while the flow's reads are large (LARGE: its
 * read block above MT_READ_DIRECT_LARGE_MIN): small reads go through
 * records, which the wait reads one after another before the loop runs
 * the protocols, and a small copy costs less than a block-sized object cut
 * down to the read (tools/bench.py, inline: direct reads of every size cost
 * 1.05x the CPU per request at Protocol 1 KiB x32, and with a bound of 16
 * KiB 1.07x at 10 KiB x1, where at 100 KiB they saved 5-13%).  Loop
 * thread.  On only for an inline flow of a plain kind
 * (no filter: TLS decrypts on the pump); a no-op otherwise. */
enum { MT_READ_DIRECT_OFF, MT_READ_DIRECT_LARGE, MT_READ_DIRECT_ALWAYS };
#define MT_READ_DIRECT_LARGE_MIN ((size_t)32 * 1024)
void mt_flow_set_read_direct(mt_flow *f, int mode);
/* The block the flow's next read should fill (its read_shift, above), for
 * a direct read into a buffer of the loop's own making. */
static inline size_t mt_flow_read_block(const mt_flow *f)
{
    return (size_t)1 << f->read_shift;
}
/* After a read of `n` bytes into `room`: sizes the next read's block
 * (above).  True when the read filled under a quarter of `room`.  The
 * flow's I/O thread (the loop thread for an inline flow). */
bool mt_flow_read_sized(mt_flow *f, size_t n, size_t room);
/* Loop thread, on READABLE: one read() into `buf`, returning what the
 * system call would.  At the end of the stream or on a hard error the flow
 * stops watching for input, as the pump does. */
ssize_t mt_flow_read_direct(mt_flow *f, void *buf, size_t len);

/* ---- the handshakes (out_marks.h) ---------------------------------------- */

/* I/O thread: `n` more bytes left the output queue.  True: report DRAINED. */
static inline bool mt_flow_add_flushed(mt_flow *f, uint64_t n)
{
    return mt_out_add_flushed(&f->marks, n);
}
/* I/O thread: the fd refused output (out_bytes waiting).  True: report
 * BLOCKED. */
static inline bool mt_flow_note_full(mt_flow *f)
{
    return mt_out_note_full(&f->marks, f->out_bytes);
}

/* ---- the loop's side of the handshakes (loop thread) ---------------------- */

/* `n` delivered bytes were consumed.  True when the caller must signal
 * MT_FLOW_CREDIT (reading had stopped for credit). */
bool mt_flow_consumed(mt_flow *f, size_t n);
/* Of a delivery of `n` bytes, all but `left` were consumed: the rest is
 * charged as a delivery of its own (mt_flow_consumed(f, left) later).
 * True as for mt_flow_consumed. */
bool mt_flow_consumed_part(mt_flow *f, size_t n, size_t left);
/* mt_out_arm_resume and mt_out_arm_blocked on the flow's marks. */
static inline bool mt_flow_arm_resume(mt_flow *f, uint64_t mark)
{
    return mt_out_arm_resume(&f->marks, mark);
}
static inline bool mt_flow_arm_blocked(mt_flow *f, uint64_t mark)
{
    return mt_out_arm_blocked(&f->marks, mark);
}

#endif
