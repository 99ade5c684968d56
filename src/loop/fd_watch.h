/* add_reader/add_writer: fd watchers on the loop thread's event base.
 *
 * Each watched fd has up to two persistent level-triggered libevent events
 * (read, write) and the handle each one schedules.  libevent calls back
 * during the wait, without the GIL: the callback only records the fd in
 * loop->fired, and mt_fd_watch_collect() turns those records into ready
 * handles once the GIL is back.  All of it is loop-thread state. */
#ifndef MT_FD_WATCH_H
#define MT_FD_WATCH_H

#include "loop/loop.h"

struct mt_fd_watch {
    struct event *events[2];   /* [0] read, [1] write; NULL when unwatched */
    PyObject *handles[2];      /* strong references to mt_handle */
    PyObject *fileobj;         /* what the last add_* was given (strong): a
                                  closed socket is found by it, as asyncio's
                                  selector finds it */
};

enum { MT_WATCH_READ = 0, MT_WATCH_WRITE = 1 };

/* Watches fd for `dir`, scheduling `handle` each time it is ready; replaces
 * (and cancels) a previous handle.  `fileobj` is what the caller named the
 * fd by.  Returns 0, or -1 with OSError/MemoryError. */
int mt_fd_watch_add(mt_loop *loop, int fd, int dir, PyObject *handle, PyObject *fileobj);
/* The fd a watcher was added for by this very object (a socket closed
 * since, whose fileno() is -1 now), or -1. */
int mt_fd_watch_find(mt_loop *loop, PyObject *fileobj);
/* Returns 1 when a watcher was removed (its handle cancelled), 0 when there
 * was none, -1 on error. */
int mt_fd_watch_remove(mt_loop *loop, int fd, int dir);
/* Moves the handles of the fds that fired during the last wait to the ready
 * queue.  Returns 0 or -1 (MemoryError). */
int mt_fd_watch_collect(mt_loop *loop);
/* Drops every watcher (loop close). */
void mt_fd_watch_clear_all(mt_loop *loop);
int mt_fd_watch_traverse(mt_loop *loop, visitproc visit, void *arg);

#endif
