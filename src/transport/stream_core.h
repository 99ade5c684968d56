/* StreamCore: the loop-thread half of a flow (a byte-stream transport).
 *
 * A C object owned by mtloop's Python transport class (its `_core`), which
 * keeps asyncio's Transport API and cold paths in Python.  The hot paths
 * are here: write()/writelines() copy into WRITE messages for the I/O
 * thread, and completions are dispatched straight to the protocol
 * (data_received, or get_buffer/buffer_updated).  Everything here runs on
 * the loop thread with the GIL held.  Any flow kind (its fd operations)
 * can sit under it. */
#ifndef MT_STREAM_CORE_H
#define MT_STREAM_CORE_H

#include "loop/loop.h"
#include "transport/flow.h"

extern PyTypeObject mt_StreamCoreType;

int mt_stream_core_type_init(PyObject *module);

#endif
