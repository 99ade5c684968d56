/* A transport record's descriptor, held by both halves of the transport:
 * the owning I/O thread (until it releases the record) and the loop half
 * (until it lets go of the transport, at connection_lost or when the loop
 * closes).  The second hold dropped closes it.  So the number can never be
 * reused under either half: the loop thread may send on it directly while
 * it holds it, and the record may own the socket the loop made instead of
 * a dup() of it (one descriptor a transport, as with the stock loop).
 * Every kind whose loop half touches its fd keeps its holds this way
 * (flows, datagram endpoints).
 *
 * Ownership: the count is an atomic both threads drop; the fd itself is
 * immutable once the record is made. */
#ifndef MT_FD_HOLDS_H
#define MT_FD_HOLDS_H

#include <stdatomic.h>
#include <unistd.h>

enum { MT_FD_HOLDERS = 2 }; /* the I/O thread and the loop half */

static inline void mt_fd_holds_init(_Atomic int *holds)
{
    atomic_init(holds, MT_FD_HOLDERS);
}

/* Drops one hold on `fd`; the last closes it.  Any thread. */
static inline void mt_fd_hold_drop(int fd, _Atomic int *holds)
{
    if (atomic_fetch_sub_explicit(holds, 1, memory_order_acq_rel) == 1)
        (void)close(fd);
}

/* The record is destroyed: a hold not dropped belongs to a record that no
 * I/O thread ever served (or whose loop half never let go), and closes the
 * fd now. */
static inline void mt_fd_holds_end(int fd, _Atomic int *holds)
{
    if (atomic_load_explicit(holds, memory_order_acquire) > 0)
        (void)close(fd);
}

#endif
