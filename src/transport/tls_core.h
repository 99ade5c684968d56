/* The loop-thread side of native TLS: proving that the interpreter's ssl
 * module and mtloop share one libssl, making the SSL object of a
 * connection from a Python ssl.SSLContext, and answering what the loop
 * asks of a TLS flow afterwards.  The Python half is mtloop/_tls.py. */
#ifndef MT_TLS_CORE_H
#define MT_TLS_CORE_H

#include "pyext/compat.h"
#include "transport/tls.h"

/* Adds the module functions (tls_*). */
int mt_tls_core_init(PyObject *module);

/* A TLS flow around `fd` from a session capsule (tls_session()), which it
 * empties; NULL with an exception set, the fd still the caller's. */
mt_flow *mt_tls_core_new_flow(PyObject *session, const struct mt_loop_ops *loop_ops,
                              mt_sink *sink, mt_io_thread *io, int fd);

/* Drops the flow's pin (loop thread): RELEASED was dispatched or
 * discarded, so no I/O thread runs the SSL any more. */
void mt_tls_core_unpin(mt_flow *f);

/* The handshake's snapshot as a tuple, or None before OPENED. */
PyObject *mt_tls_core_info(mt_flow *f);
/* The connection's TLS failure as a tuple, or None. */
PyObject *mt_tls_core_error(mt_flow *f);
/* Whether the close exchanged close_notify both ways (after RELEASED). */
bool mt_tls_core_shutdown_clean(mt_flow *f);

#endif
