/* The I/O-thread half of servers: accept4() on readiness under credit, a
 * timed pause when the process runs out of descriptors, release of the
 * dup'ed fd.  See listener.h. */
#include "transport/listener.h"

#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <event2/event.h>

/* Accepts per readiness at most: the rest waits for the next round, so a
 * connection storm does not hold up this thread's transports. */
#define MT_ACCEPTS_PER_EVENT 128

static void release(mt_io_thread *io, mt_listener *l)
{
    if (l->closed)
        return;
    l->closed = true;
    if (l->rec.attached) {
        mt_io_watch_close(&l->watch);
        event_free(l->retry);
        l->retry = NULL;
        atomic_fetch_sub_explicit(&mt_io_thread_stats(io)->listeners, 1, memory_order_relaxed);
    }
    close(l->fd);
    l->fd = -1;
    mt_record_detach(io, &l->rec);
}

static void watch_accepts(mt_io_thread *io, mt_listener *l, bool on)
{
    if (mt_io_watch_set(&l->watch, on ? MT_IO_READ : 0) < 0)
        (void)mt_io_thread_emit_op(io, &l->rec, MT_LISTENER_ERROR, errno);
}

static void on_acceptable(mt_io_watch *w, unsigned events)
{
    (void)events;
    mt_listener *l = MT_CONTAINER_OF(w, mt_listener, watch);
    mt_io_thread *io = w->io;
    for (int i = 0; i < MT_ACCEPTS_PER_EVENT; i++) {
        if (!mt_credit_available(&l->credit, l->credit_limit)) {
            watch_accepts(io, l, false); /* CREDIT turns it back on */
            return;
        }
        mt_msg *msg = mt_msg_new(MT_LISTENER_ACCEPT, &l->rec, sizeof(mt_accepted));
        if (msg == NULL)
            return; /* level-triggered: tried again on the next round */
        mt_accepted *a = mt_msg_data(msg);
        a->addrlen = sizeof(a->addr);
        int conn = accept4(l->fd, (struct sockaddr *)&a->addr, &a->addrlen,
                           SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (conn >= 0) {
            if (l->nodelay) {
                int one = 1;
                setsockopt(conn, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
            }
            a->fd = conn;
            mt_credit_take(&l->credit, 1);
            atomic_fetch_add_explicit(&mt_io_thread_stats(io)->accepts, 1,
                                      memory_order_relaxed);
            mt_io_thread_emit(io, msg);
            continue;
        }
        int err = errno;
        a->fd = -1;
        mt_msg_free(msg);
        if (err == EAGAIN || err == EWOULDBLOCK || err == EINTR || err == ECONNABORTED)
            return;
        if (err == EINVAL) {
            /* The loop shut the socket down (Server.close()); UNLISTEN
             * follows. */
            watch_accepts(io, l, false);
            return;
        }
        (void)mt_io_thread_emit_op(io, &l->rec, MT_LISTENER_ERROR, err);
        if (err == EMFILE || err == ENFILE || err == ENOBUFS || err == ENOMEM) {
            /* Readiness stays on while the backlog is full: stop watching
             * for a while instead of spinning. */
            struct timeval tv = {.tv_sec = MT_ACCEPT_RETRY_DELAY, .tv_usec = 0};
            watch_accepts(io, l, false);
            event_add(l->retry, &tv);
        }
        return;
    }
}

static void on_retry(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    mt_listener *l = arg;
    if (!l->closed)
        watch_accepts(l->watch.io, l, true);
}

static void listen_now(mt_io_thread *io, mt_listener *l)
{
    l->retry = evtimer_new(mt_io_thread_base(io), on_retry, l);
    if (l->retry == NULL || mt_io_watch_open(&l->watch, io, l->fd, on_acceptable) < 0) {
        if (l->retry)
            event_free(l->retry);
        l->retry = NULL;
        (void)mt_io_thread_emit_op(io, &l->rec, MT_LISTENER_ERROR, ENOMEM);
        return;
    }
    mt_record_attach(io, &l->rec);
    atomic_fetch_add_explicit(&mt_io_thread_stats(io)->listeners, 1, memory_order_relaxed);
    watch_accepts(io, l, true);
}

static void listener_message(mt_io_thread *io, mt_record *rec, mt_msg *msg)
{
    (void)io;
    (void)rec;
    mt_msg_free(msg); /* a listener takes no messages */
}

static void listener_service(mt_io_thread *io, mt_record *rec, uint32_t control)
{
    mt_listener *l = (mt_listener *)rec;
    if (l->closed)
        return;
    if (control & MT_LISTENER_UNLISTEN) {
        release(io, l);
        return;
    }
    if (control & MT_LISTENER_LISTEN)
        listen_now(io, l);
    if ((control & MT_LISTENER_CREDIT) && rec->attached && !event_pending(l->retry, EV_TIMEOUT, NULL))
        watch_accepts(io, l, true);
}

static void listener_drop(mt_io_thread *io, mt_record *rec, bool notify)
{
    (void)notify; /* the loop side needs no word: it stops serving itself */
    release(io, (mt_listener *)rec);
}

static void listener_destroy(mt_record *rec)
{
    mt_listener *l = (mt_listener *)rec;
    if (l->fd >= 0)
        close(l->fd); /* never reached an I/O thread */
    free(l);
}

static const mt_record_ops listener_ops = {
    .message = listener_message,
    .service = listener_service,
    .drop = listener_drop,
    .destroy = listener_destroy,
};

mt_listener *mt_listener_new(const struct mt_loop_ops *loop_ops, mt_sink *sink,
                             mt_io_thread *io, int dup_fd, int backlog, bool nodelay)
{
    mt_listener *l = calloc(1, sizeof(*l));
    if (l == NULL)
        return NULL;
    mt_record_init(&l->rec, &listener_ops, loop_ops, sink, io);
    l->fd = dup_fd;
    l->credit_limit = backlog < MT_ACCEPT_CREDIT_MIN   ? MT_ACCEPT_CREDIT_MIN
                      : backlog > MT_ACCEPT_CREDIT_MAX ? MT_ACCEPT_CREDIT_MAX
                                                       : backlog;
    l->nodelay = nodelay;
    mt_credit_init(&l->credit);
    return l;
}

bool mt_listener_consumed(mt_listener *l, int n)
{
    return mt_credit_return(&l->credit, n, l->credit_limit);
}
