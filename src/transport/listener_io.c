/* The I/O-thread half of servers: accept4() on readiness, a timed pause
 * when the process runs out of descriptors, release of the dup'ed fd. */
#include "transport/listener.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include <event2/event.h>

static void emit_error(mt_io_thread *io, mt_listener *l, int err)
{
    mt_done *done = mt_done_new(MT_DONE_ACCEPT_ERROR, &l->obj, 0);
    if (done == NULL)
        return;
    done->err = err;
    mt_io_thread_emit(io, done);
}

static void on_acceptable(evutil_socket_t fd, short what, void *arg)
{
    (void)what;
    mt_listener *l = arg;
    mt_io_thread *io = l->obj.io;
    for (int i = 0; i < l->backlog; i++) {
        mt_done *done = mt_done_new(MT_DONE_ACCEPT, &l->obj, sizeof(struct sockaddr_storage));
        if (done == NULL)
            return; /* level-triggered: tried again on the next round */
        done->addr = (struct sockaddr_storage *)(void *)done->data;
        done->addrlen = sizeof(struct sockaddr_storage);
        int conn = accept4(fd, (struct sockaddr *)done->addr, &done->addrlen,
                           SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (conn >= 0) {
            done->fd = conn;
            atomic_fetch_add_explicit(&mt_io_thread_stats(io)->accepts, 1,
                                      memory_order_relaxed);
            mt_io_thread_emit(io, done);
            continue;
        }
        int err = errno;
        mt_done_free(done);
        if (err == EAGAIN || err == EWOULDBLOCK || err == EINTR || err == ECONNABORTED)
            return;
        if (err == EINVAL) {
            /* The loop shut the socket down (Server.close()); UNLISTEN
             * follows. */
            event_del(l->ev);
            return;
        }
        emit_error(io, l, err);
        if (err == EMFILE || err == ENFILE || err == ENOBUFS || err == ENOMEM) {
            /* Readiness stays on while the backlog is full: stop watching
             * for a while instead of spinning. */
            struct timeval tv = {.tv_sec = MT_ACCEPT_RETRY_DELAY, .tv_usec = 0};
            event_del(l->ev);
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
        event_add(l->ev, NULL);
}

static void release(mt_io_thread *io, mt_listener *l)
{
    if (l->closed)
        return;
    l->closed = true;
    if (l->attached) {
        event_free(l->ev);
        event_free(l->retry);
        l->ev = l->retry = NULL;
        atomic_fetch_sub_explicit(&mt_io_thread_stats(io)->listeners, 1, memory_order_relaxed);
    }
    close(l->fd);
    l->fd = -1;
    if (l->attached) {
        l->attached = false;
        mt_io_thread_disown(io, &l->obj);
    }
}

static void listener_command(mt_io_thread *io, mt_io_obj *obj, mt_cmd *cmd)
{
    mt_listener *l = (mt_listener *)obj;
    if (cmd->kind == MT_CMD_LISTEN && !l->closed) {
        struct event_base *base = mt_io_thread_base(io);
        l->ev = event_new(base, l->fd, EV_READ | EV_PERSIST, on_acceptable, l);
        l->retry = evtimer_new(base, on_retry, l);
        if (l->ev == NULL || l->retry == NULL || event_add(l->ev, NULL) < 0) {
            if (l->ev)
                event_free(l->ev);
            if (l->retry)
                event_free(l->retry);
            l->ev = l->retry = NULL;
            emit_error(io, l, ENOMEM);
        } else {
            l->attached = true;
            mt_io_thread_own(io, &l->obj);
            atomic_fetch_add_explicit(&mt_io_thread_stats(io)->listeners, 1,
                                      memory_order_relaxed);
        }
    } else if (cmd->kind == MT_CMD_UNLISTEN) {
        release(io, l);
    }
    mt_cmd_free(cmd);
}

static void listener_drop(mt_io_thread *io, mt_io_obj *obj, bool notify)
{
    (void)notify; /* the loop side needs no word: it stops serving itself */
    release(io, (mt_listener *)obj);
}

static void listener_destroy(mt_io_obj *obj)
{
    mt_listener *l = (mt_listener *)obj;
    if (l->fd >= 0)
        close(l->fd); /* never reached an I/O thread */
    free(l);
}

const mt_io_ops mt_listener_ops = {
    .command = listener_command,
    .drop = listener_drop,
    .destroy = listener_destroy,
};

mt_listener *mt_listener_new(mt_sink *sink, mt_io_thread *io, int dup_fd, int backlog)
{
    mt_listener *l = calloc(1, sizeof(*l));
    if (l == NULL)
        return NULL;
    mt_io_obj_init(&l->obj, &mt_listener_ops, sink, io);
    l->fd = dup_fd;
    l->backlog = backlog < 1 ? 1 : backlog;
    return l;
}
