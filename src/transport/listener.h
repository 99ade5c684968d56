/* A listening socket served by an I/O thread: the C record.
 *
 * The I/O thread accepts on its own dup() of the server socket, so the
 * Python socket object can be closed at once by Server.close() while the
 * I/O thread lets go of its copy when the UNLISTEN signal reaches it.
 * Accepted connections travel to the loop as ACCEPT completions, each
 * owning its new fd; the loop then spreads their transports over its I/O
 * threads.  Accepts take credit, as reads do: a loop that does not keep up
 * leaves new connections in the kernel's backlog instead of turning it
 * into open descriptors in the process. */
#ifndef MT_LISTENER_H
#define MT_LISTENER_H

#include <sys/socket.h>

#include "io_threads/credit.h"
#include "io_threads/runtime.h"

/* Opcodes (completions). */
enum {
    MT_LISTENER_ACCEPT = MT_OP_KIND, /* payload: mt_accepted */
    MT_LISTENER_ERROR,               /* err */
};

/* Control bits. */
enum {
    MT_LISTENER_LISTEN = 1u << 0,
    MT_LISTENER_UNLISTEN = 1u << 1,
    MT_LISTENER_CREDIT = 1u << 2, /* the loop handled accepted connections */
};

typedef struct mt_accepted {
    int fd;            /* owned by the message until the loop takes it */
    socklen_t addrlen;
    struct sockaddr_storage addr;
} mt_accepted;

/* Connections accepted ahead of the loop: the listen() backlog, within
 * these bounds, as asyncio accepts up to `backlog` a loop iteration.  A
 * lower bound than the backlog lets the kernel's queue fill under a
 * connection storm while the loop is busy, and the kernel then drops SYNs:
 * each costs its client a second before it tries again (with a bound of
 * 128, 10,000 clients at once took 3.2-5.2 s where they now take 2.2-2.3
 * in most runs; README, "A connection storm").  The upper bound is
 * Linux's default cap on any backlog (net.core.somaxconn). */
#define MT_ACCEPT_CREDIT_MIN 16
#define MT_ACCEPT_CREDIT_MAX 4096

/* Seconds an I/O thread waits before accepting again after running out of
 * file descriptors or memory (asyncio's ACCEPT_RETRY_DELAY). */
#define MT_ACCEPT_RETRY_DELAY 1

typedef struct mt_listener {
    mt_record rec;
    int fd;            /* the dup; owned, closed when released or destroyed */
    int credit_limit;  /* immutable: connections accepted ahead of the loop */
    bool nodelay;      /* immutable: TCP_NODELAY on each accepted socket */

    /* Shared. */
    mt_credit credit;  /* accepted, not yet handled by the loop */

    /* The owning I/O thread only. */
    mt_io_watch watch;
    struct event *retry;
    bool closed;
} mt_listener;

/* A new record around `dup_fd`, which it owns from now on (one reference,
 * the caller's); NULL with errno set, the fd still the caller's.
 * `backlog` sets the credit (see MT_ACCEPT_CREDIT_MIN). */
mt_listener *mt_listener_new(const struct mt_loop_ops *loop_ops, mt_sink *sink,
                             mt_io_thread *io, int dup_fd, int backlog, bool nodelay);

/* Loop thread: `n` ACCEPT completions were handled.  True when the caller
 * must signal MT_LISTENER_CREDIT. */
bool mt_listener_consumed(mt_listener *l, int n);

#endif
