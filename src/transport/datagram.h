/* A datagram endpoint (UDP, Unix datagram) served by an I/O thread: the
 * C record.
 *
 * The I/O thread receives in batches (recvmmsg) while the loop has credit
 * and sends the loop's queued datagrams in batches (sendmmsg): one system
 * call for many datagrams, where a single-threaded loop makes one each.
 * Each received datagram travels to the loop as its own RECEIVED
 * completion (the bytes and the sender's address), each sendto() as its
 * own SEND command, so datagrams are never merged, split or reordered.
 *
 * The record owns its fd from creation, with two holds (fd_holds.h): the
 * I/O thread's, dropped when it releases the record, and the loop half's,
 * dropped when the transport lets go at connection_lost.  The fd is the
 * socket the loop made for create_datagram_endpoint() (the Python object
 * detached from it), or a dup() of a socket the caller passed as `sock=`,
 * which stays the caller's object and is closed at connection_lost, as the
 * stock loop closes it.
 *
 * Write accounting follows asyncio's datagram transport: each queued
 * datagram counts its length plus `overhead` (asyncio counts a header of 8
 * bytes from 3.12 on) in the write-buffer size, and the marks of
 * out_marks.h report DRAINED and BLOCKED. */
#ifndef MT_DATAGRAM_H
#define MT_DATAGRAM_H

#include <sys/socket.h>

#include "io_threads/credit.h"
#include "io_threads/runtime.h"
#include "transport/fd_holds.h"
#include "transport/out_marks.h"

/* Opcodes. */
enum {
    MT_DGRAM_SEND = MT_OP_KIND, /* command; payload: mt_dgram_head, address, bytes */
    MT_DGRAM_RECEIVED,          /* payload: mt_dgram_head, address, bytes */
    MT_DGRAM_ERROR,             /* err: a receive or send error (error_received) */
    MT_DGRAM_DRAINED,           /* flushed reached the loop's resume mark */
    MT_DGRAM_BLOCKED,           /* the socket refused output past the loop's mark */
};

/* Control bits. */
enum {
    MT_DGRAM_ATTACH = 1u << 0,  /* start serving the record */
    MT_DGRAM_READ = 1u << 1,    /* start receiving (after connection_made) */
    MT_DGRAM_CREDIT = 1u << 2,  /* the loop handled received datagrams */
    MT_DGRAM_CLOSE = 1u << 3,   /* stop receiving; release once the output is out */
    MT_DGRAM_ABORT = 1u << 4,   /* drop the output, release now */
};

/* A SEND or RECEIVED payload starts with this, then `addrlen` bytes of
 * address (none for a connected socket's SEND), then the datagram. */
typedef struct mt_dgram_head {
    uint32_t addrlen;
} mt_dgram_head;

static inline const void *mt_dgram_addr(mt_msg *msg)
{
    return (const char *)mt_msg_data(msg) + sizeof(mt_dgram_head);
}

static inline uint32_t mt_dgram_addrlen(mt_msg *msg)
{
    return ((const mt_dgram_head *)mt_msg_data(msg))->addrlen;
}

static inline char *mt_dgram_bytes(mt_msg *msg)
{
    return (char *)mt_msg_data(msg) + sizeof(mt_dgram_head) + mt_dgram_addrlen(msg);
}

static inline size_t mt_dgram_size(mt_msg *msg)
{
    return msg->len - sizeof(mt_dgram_head) - mt_dgram_addrlen(msg);
}

/* A new SEND of `len` bytes to `addr` (NULL, 0: the connected peer),
 * holding a reference on `rec`; its bytes are left for the caller to fill
 * (mt_dgram_bytes).  NULL when out of memory.  Any thread. */
mt_msg *mt_dgram_send_new(mt_record *rec, const struct sockaddr *addr, socklen_t addrlen,
                          size_t len);

/* Received datagrams the loop has not handled yet, in bytes, each counted
 * at least MT_DGRAM_CHARGE_MIN: with small datagrams about 500 wait in the
 * process at most, the rest in the kernel (which drops when its buffer
 * fills, as for any loop). */
#define MT_DGRAM_CREDIT (256 * 1024)
#define MT_DGRAM_CHARGE_MIN 512

static inline int64_t mt_dgram_charge(size_t n)
{
    return n < MT_DGRAM_CHARGE_MIN ? MT_DGRAM_CHARGE_MIN : (int64_t)n;
}

/* The largest datagram read whole: asyncio's max_size for a datagram
 * transport (256 KiB) for Unix sockets, 64 KiB for IP, whose datagrams
 * cannot be larger.  A larger one is truncated, as by recvfrom(). */
#define MT_DGRAM_READ_MAX_UNIX (256 * 1024)
#define MT_DGRAM_READ_MAX_IP (64 * 1024)

/* Ownership: `fd`, `family`, `read_max`, `overhead` are immutable (the fd
 * closes with its last hold); `fd_holds`, `credit` and `marks` are shared
 * atomics (fd_holds.h, credit.h, out_marks.h); the rest belongs to the
 * owning I/O thread. */
typedef struct mt_dgram {
    mt_record rec;
    int fd;
    _Atomic int fd_holds;        /* the I/O thread's and the loop half's */
    int family;
    uint32_t read_max;
    uint32_t overhead;           /* counted per datagram on top of its bytes */

    /* Shared. */
    mt_credit credit;            /* received bytes (charged), not yet handled */
    mt_out_marks marks;          /* `flushed`: SEND units that left the queue */

    /* The owning I/O thread only. */
    mt_io_watch watch;
    mt_msg *out_head, *out_tail; /* SEND messages, in order */
    uint64_t out_units;          /* their units */
    bool reading, starved, want_write, closing, closed;
    bool held_back;              /* parked: the loop's lane is full */
} mt_dgram;

/* A new, unattached record around `fd`, which it owns from now on (one
 * reference, the caller's); NULL with errno set, the fd still the
 * caller's. */
mt_dgram *mt_dgram_new(const struct mt_loop_ops *loop_ops, mt_sink *sink, mt_io_thread *io,
                       int fd, int family, uint32_t overhead);

/* Drops one hold on the fd (the I/O thread's when it released the record,
 * the loop half's when it lets go); the last closes it.  Any thread. */
static inline void mt_dgram_drop_fd(mt_dgram *d)
{
    mt_fd_hold_drop(d->fd, &d->fd_holds);
}

/* The units of a SEND: what it adds to the write-buffer size. */
static inline uint64_t mt_dgram_units(const mt_dgram *d, size_t len)
{
    return (uint64_t)len + d->overhead;
}

/* Loop thread: a RECEIVED of `n` bytes was handled.  True when the caller
 * must signal MT_DGRAM_CREDIT. */
static inline bool mt_dgram_consumed(mt_dgram *d, size_t n)
{
    return mt_credit_return(&d->credit, mt_dgram_charge(n), MT_DGRAM_CREDIT);
}

#endif
