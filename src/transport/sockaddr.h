/* Socket addresses between C and Python, as the socket module spells them:
 * for the loop halves of listeners (the peer of an accepted connection) and
 * of datagram endpoints (each datagram's sender, each sendto()'s target).
 * Loop thread, GIL held. */
#ifndef MT_SOCKADDR_H
#define MT_SOCKADDR_H

#include "pyext/compat.h"

#include <sys/socket.h>

/* The address as socket.recvfrom() returns it: (host, port) for AF_INET,
 * (host, port, flowinfo, scope_id) for AF_INET6, the path for AF_UNIX (bytes
 * in the abstract namespace), None for an empty one.  `last_host` caches the
 * previous host string (a strong reference, or NULL), shared with the next
 * address from the same host: many peers come from few hosts.  New
 * reference, or NULL with an exception. */
PyObject *mt_sockaddr_to_py(PyObject **last_host, const struct sockaddr *sa, socklen_t len);

/* Parses `addr` for a socket of `family` without resolving anything: a
 * numeric host (IPv4 or IPv6) with a port in range, or a Unix path.
 * Returns 1 with *out and *len filled, 0 when `addr` is in any other form
 * (nothing raised: the caller takes the slow path, which resolves, or
 * raises what socket.sendto() would). */
int mt_sockaddr_from_py(int family, PyObject *addr, struct sockaddr_storage *out,
                        socklen_t *len);

#endif
