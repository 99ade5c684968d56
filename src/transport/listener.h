/* A listening socket served by an I/O thread: the C record.
 *
 * The I/O thread accepts on its own dup() of the server socket, so the
 * Python socket object can be closed at once by Server.close() while the
 * I/O thread lets go of its copy when the UNLISTEN command reaches it.
 * Accepted connections travel to the loop as ACCEPT completions; the loop
 * then spreads their transports over its I/O threads. */
#ifndef MT_LISTENER_H
#define MT_LISTENER_H

#include "io_threads/runtime.h"

struct event;

typedef struct mt_listener {
    mt_io_obj obj;
    int fd;            /* the dup; closed by the owning I/O thread */
    int backlog;       /* immutable: most accepts per readiness */

    /* The owning I/O thread only. */
    struct event *ev, *retry;
    bool attached, closed;

    /* The loop thread only: its Python half (borrowed). */
    void *core;
} mt_listener;

extern const mt_io_ops mt_listener_ops;

/* Seconds an I/O thread waits before accepting again after running out of
 * file descriptors or memory (asyncio's ACCEPT_RETRY_DELAY). */
#define MT_ACCEPT_RETRY_DELAY 1

/* A new record around `dup_fd` (one reference, the caller's), or NULL. */
mt_listener *mt_listener_new(mt_sink *sink, mt_io_thread *io, int dup_fd, int backlog);

#endif
