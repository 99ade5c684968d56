/* StreamCore: the loop-thread half of a stream transport.
 *
 * A C object owned by mtloop's Python transport class (its `_core`), which
 * keeps asyncio's Transport API and cold paths in Python.  The hot paths
 * are here: write()/writelines() copy into commands for the I/O thread,
 * and completions are dispatched straight to the protocol
 * (data_received, or get_buffer/buffer_updated).  Everything here runs on
 * the loop thread with the GIL held. */
#ifndef MT_STREAM_CORE_H
#define MT_STREAM_CORE_H

#include "loop/loop.h"
#include "transport/stream.h"

struct mt_stream_core {
    PyObject_HEAD
    mt_loop *loop;              /* strong */
    mt_stream *stream;          /* a reference; its obj.io is the owning thread */
    PyObject *transport;        /* strong until CLOSED is dispatched */
    PyObject *protocol;
    PyObject *data_received;    /* bound methods, cached by set_protocol() */
    PyObject *get_buffer;
    PyObject *buffer_updated;
    PyObject *sendfile_waiter;  /* future of a running sendfile, or NULL */
    bool buffered;

    /* asyncio's transport state, shared with the Python class. */
    bool closing, eof, reading_paused, reading_started, protocol_paused;
    bool closed;                /* the I/O thread let go of the fd */
    bool redelivery_scheduled;  /* a callback will hand deferred_* over */
    int conn_lost;
    Py_ssize_t high_water, low_water;
    uint64_t queued;            /* bytes handed to WRITE commands */
    uint64_t flushed_seen;      /* the stream's `flushed` as of the last
                                   pause or DRAINED: the size reported while
                                   paused, so it drops to the low mark in the
                                   same step as resume_writing() */

    /* Read completions held back while reading is paused. */
    mt_done *deferred_head, *deferred_tail;

    mt_stream_core *live_prev, *live_next; /* the loop's open transports */
};

extern PyTypeObject mt_StreamCoreType;

int mt_stream_core_type_init(PyObject *module);
/* Takes `done`.  Returns -1 only for an exception that must leave the run
 * loop (KeyboardInterrupt, SystemExit, or a failing error path). */
int mt_stream_core_dispatch(mt_loop *loop, mt_done *done);
/* The loop is closing: every open core lets go of its transport and
 * stream. */
void mt_stream_core_detach_all(mt_loop *loop);

#endif
