/* A stream transport's C record: the half an I/O thread owns, plus the few
 * atomics through which the loop thread and the I/O thread account for
 * read credit and flushed output.
 *
 * Lifetime: reference-counted (mt_io_obj).  The loop half holds one
 * reference, the owning I/O thread one while attached, every queued
 * command and completion one.  The fd belongs to the Python socket object;
 * the I/O thread does every system call on it until it reports CLOSED, and
 * the loop closes the socket only after that, so the number is never
 * reused under the I/O thread.  When the transport's Python side is done
 * first (connection_lost() runs as soon as asyncio would run it), the
 * socket object is detached and OWN_FD hands the fd to the I/O thread,
 * which closes it once released. */
#ifndef MT_STREAM_H
#define MT_STREAM_H

#include "io_threads/runtime.h"

/* An I/O thread stops reading a stream once this many bytes are delivered
 * to the loop but not yet consumed by the protocol. */
#define MT_READ_CREDIT (256 * 1024)

/* One read() takes at most this much, into a completion record that fills
 * one 128 KiB block of the buffer pool.  A read size under 64 KiB stalled
 * 64 KiB echoes for ~40 ms a request on loopback (each read left a
 * segment's tail behind).  Reads of at most MT_READ_COPY_MAX bytes move to
 * a record of their own size, so the big block goes straight back to the
 * thread's cache: with 1,000 connections of 10 KiB messages, keeping them
 * in 128 KiB blocks took the server's peak RSS to 52 MB (uvloop: 25) and
 * gave 49-58k requests/s against 56-59k. */
#define MT_READ_MAX ((size_t)(128 * 1024) - sizeof(mt_done))
#define MT_READ_COPY_MAX (32 * 1024)

/* Write flow control follows asyncio: the protocol is paused when output
 * the kernel refused exceeds the high-water mark.  Only the I/O thread
 * sees the kernel refuse, so the loop asks it (blocked_mark) and pauses on
 * its BLOCKED completion; it pauses by itself only past this many times the
 * high-water mark, so a writer that never yields stays bounded. */
#define MT_WRITE_CAP_FACTOR 16
#define MT_WRITE_CAP_MIN (4 * 1024 * 1024)

/* The largest write the loop thread sends itself when the I/O thread
 * sleeps (stream_core.c, direct_send); bigger ones are worth a wakeup. */
#define MT_DIRECT_SEND_MAX (16 * 1024)

struct event;

typedef struct mt_stream {
    mt_io_obj obj;

    int fd;                          /* immutable */
    int sf_fd;                       /* the owning I/O thread only (sendfile) */

    /* Shared. */
    _Atomic bool read_starved;       /* I/O stopped reading for credit; loop clears */
    _Atomic int64_t unconsumed;      /* I/O adds on delivery, loop subtracts on use */
    _Atomic uint64_t flushed;        /* output bytes sent or dropped; I/O writes */
    _Atomic uint64_t resume_at;      /* loop: report DRAINED once flushed >= this */
    _Atomic uint64_t blocked_mark;   /* loop: report BLOCKED once the socket is full
                                        with more than mark-1 bytes waiting; 0 none */
    _Atomic int write_err;           /* the first hard send error, set (once) by
                                        whichever thread saw it; the loop's next
                                        write() fails at once, as asyncio's does */

    /* The owning I/O thread only. */
    struct event *ev;                /* one event; read_armed/write_armed say
                                        what it is assigned and added for */
    mt_cmd *out_head, *out_tail;     /* WRITE commands, in order */
    uint64_t out_bytes;              /* bytes in them not sent yet */
    size_t out_off;                  /* bytes of out_head already sent */
    bool attached, want_read, read_armed, write_armed, starved;
    bool read_done;                  /* EOF or a read error seen */
    bool shut_wr_pending, closing, closed, write_failed;
    bool own_fd;                     /* close fd once released */
    bool sf_active;                  /* a sendfile is queued or running; the
                                        loop sends no WRITE until it ends */
    int64_t sf_offset;
    size_t sf_left, sf_done;

    /* The loop thread only: its Python half (borrowed; cleared when that
     * goes away). */
    void *core;
} mt_stream;

extern const mt_io_ops mt_stream_ops;

/* A new, unattached record (one reference, the caller's), or NULL with
 * errno set. */
mt_stream *mt_stream_new(mt_sink *sink, mt_io_thread *io, int fd);

#endif
