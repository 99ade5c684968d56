/* Listener: the loop-thread half of a server socket served by an I/O
 * thread.  It turns ACCEPT completions into calls of a Python callback
 * (mtloop's Loop builds the transport) and accept errors into another. */
#ifndef MT_LISTENER_CORE_H
#define MT_LISTENER_CORE_H

#include "loop/loop.h"
#include "transport/listener.h"

extern PyTypeObject mt_ListenerType;

int mt_listener_core_type_init(PyObject *module);
/* Takes `done`.  -1 only for what must leave the run loop. */
int mt_listener_core_dispatch(mt_loop *loop, mt_done *done);

#endif
