/* Listener: the loop-thread half of a server socket served by an I/O
 * thread.  It turns ACCEPT completions into calls of a Python callback,
 * on_accept(fd, address), which owns the fd from then on (mtloop's Loop
 * builds the transport around it), and accept errors into on_error(errno);
 * each handled ACCEPT gives the I/O thread its credit back. */
#ifndef MT_LISTENER_CORE_H
#define MT_LISTENER_CORE_H

#include "loop/loop.h"
#include "transport/listener.h"

extern PyTypeObject mt_ListenerType;

int mt_listener_core_type_init(PyObject *module);

#endif
