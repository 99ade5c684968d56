/* fd watchers for add_reader/add_writer.  See fd_watch.h. */
#include "loop/fd_watch.h"

#include <errno.h>
#include <fcntl.h>
#include <event2/event.h>
#include <stdlib.h>
#include <string.h>

#include "loop/handle.h"

static const short dir_flags[2] = {EV_READ, EV_WRITE};

/* libevent callback, during the wait and without the GIL. */
static void on_fd_event(evutil_socket_t fd, short what, void *arg)
{
    mt_loop *loop = arg;
    if (loop->fired_len == loop->fired_cap) {
        size_t cap = loop->fired_cap ? loop->fired_cap * 2 : 64;
        mt_fired *fired = realloc(loop->fired, cap * sizeof(*fired));
        if (fired == NULL)
            return; /* the fd stays ready (level-triggered): it fires again next time */
        loop->fired = fired;
        loop->fired_cap = cap;
    }
    loop->fired[loop->fired_len++] = (mt_fired){.fd = (int)fd, .what = what};
}

static int ensure_slot(mt_loop *loop, int fd)
{
    if ((size_t)fd < loop->watches_len)
        return 0;
    size_t len = loop->watches_len ? loop->watches_len : 64;
    while (len <= (size_t)fd)
        len *= 2;
    mt_fd_watch *w = realloc(loop->watches, len * sizeof(*w));
    if (w == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    memset(w + loop->watches_len, 0, (len - loop->watches_len) * sizeof(*w));
    loop->watches = w;
    loop->watches_len = len;
    return 0;
}

int mt_fd_watch_find(mt_loop *loop, PyObject *fileobj)
{
    for (size_t fd = 0; fd < loop->watches_len; fd++)
        if (loop->watches[fd].fileobj == fileobj)
            return (int)fd;
    return -1;
}

int mt_fd_watch_add(mt_loop *loop, int fd, int dir, PyObject *handle, PyObject *fileobj)
{
    if (fd < 0) {
        PyErr_Format(PyExc_ValueError, "Invalid file descriptor: %d", fd);
        return -1;
    }
    if (fcntl(fd, F_GETFD) < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    if (ensure_slot(loop, fd) < 0)
        return -1;
    mt_fd_watch *w = &loop->watches[fd];
    if (w->events[dir] == NULL) {
        struct event *ev = event_new(loop->base, fd, dir_flags[dir] | EV_PERSIST,
                                     on_fd_event, loop);
        if (ev == NULL) {
            PyErr_NoMemory();
            return -1;
        }
        errno = 0;
        if (event_add(ev, NULL) < 0) {
            int err = errno ? errno : EINVAL;
            event_free(ev);
            errno = err;
            PyErr_SetFromErrno(PyExc_OSError);
            return -1;
        }
        w->events[dir] = ev;
    }
    Py_XSETREF(w->fileobj, Py_NewRef(fileobj));
    PyObject *old = w->handles[dir];
    w->handles[dir] = Py_NewRef(handle);
    if (old != NULL) {
        int rc = mt_handle_cancel(old);
        Py_DECREF(old);
        if (rc < 0)
            return -1;
    }
    return 0;
}

/* Detaches the watcher; returns its handle (a reference the caller owns) or NULL. */
static PyObject *detach(mt_loop *loop, int fd, int dir)
{
    if (fd < 0 || (size_t)fd >= loop->watches_len)
        return NULL;
    mt_fd_watch *w = &loop->watches[fd];
    if (w->events[dir] != NULL) {
        event_free(w->events[dir]);  /* also deletes it from the base */
        w->events[dir] = NULL;
    }
    PyObject *h = w->handles[dir];
    w->handles[dir] = NULL;
    if (w->handles[!dir] == NULL)
        Py_CLEAR(w->fileobj);
    return h;
}

int mt_fd_watch_remove(mt_loop *loop, int fd, int dir)
{
    PyObject *h = detach(loop, fd, dir);
    if (h == NULL)
        return 0;
    int rc = mt_handle_cancel(h);
    Py_DECREF(h);
    return rc < 0 ? -1 : 1;
}

int mt_fd_watch_collect(mt_loop *loop)
{
    int rc = 0;
    for (size_t i = 0; i < loop->fired_len; i++) {
        int fd = loop->fired[i].fd;
        for (int dir = 0; dir < 2; dir++) {
            if (!(loop->fired[i].what & dir_flags[dir]) || (size_t)fd >= loop->watches_len)
                continue;
            PyObject *h = loop->watches[fd].handles[dir];
            if (h == NULL)
                continue;
            if (mt_handle_is_cancelled(h)) {
                Py_DECREF(detach(loop, fd, dir));
                continue;
            }
            if (mt_ready_queue_push(&loop->ready, Py_NewRef(h)) < 0) {
                Py_DECREF(h);
                PyErr_NoMemory();
                rc = -1;
            }
        }
    }
    loop->fired_len = 0;
    return rc;
}

void mt_fd_watch_clear_all(mt_loop *loop)
{
    /* Detach the table first: releasing a handle can run arbitrary code. */
    mt_fd_watch *watches = loop->watches;
    size_t len = loop->watches_len;
    loop->watches = NULL;
    loop->watches_len = 0;
    free(loop->fired);
    loop->fired = NULL;
    loop->fired_len = loop->fired_cap = 0;
    for (size_t fd = 0; fd < len; fd++) {
        for (int dir = 0; dir < 2; dir++) {
            /* No base: a forked child's copy, whose epoll set is the
             * parent's; leave it alone. */
            if (watches[fd].events[dir] != NULL && loop->base != NULL)
                event_free(watches[fd].events[dir]);
        }
    }
    for (size_t fd = 0; fd < len; fd++) {
        Py_XDECREF(watches[fd].handles[0]);
        Py_XDECREF(watches[fd].handles[1]);
        Py_XDECREF(watches[fd].fileobj);
    }
    free(watches);
}

int mt_fd_watch_traverse(mt_loop *loop, visitproc visit, void *arg)
{
    for (size_t fd = 0; fd < loop->watches_len; fd++) {
        Py_VISIT(loop->watches[fd].handles[0]);
        Py_VISIT(loop->watches[fd].handles[1]);
        Py_VISIT(loop->watches[fd].fileobj);
    }
    return 0;
}
