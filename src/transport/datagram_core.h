/* DatagramCore: the loop-thread half of a datagram endpoint (datagram.h).
 *
 * A C object owned by mtloop's Python datagram transport (its `_core`),
 * which keeps asyncio's DatagramTransport API and its cold paths in
 * Python.  The hot paths are here: sendto() parses a numeric address and
 * copies the datagram into a SEND for the I/O thread, and each RECEIVED
 * becomes one datagram_received(data, addr) call.  Loop thread, GIL held. */
#ifndef MT_DATAGRAM_CORE_H
#define MT_DATAGRAM_CORE_H

#include "loop/loop.h"
#include "transport/datagram.h"

extern PyTypeObject mt_DatagramCoreType;

int mt_datagram_core_type_init(PyObject *module);

#endif
