/* Socket addresses between C and Python.  See sockaddr.h. */
#include "transport/sockaddr.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <sys/un.h>

/* The host string for `text`: the previous peer's object when it is the
 * same host (each string is about 60 bytes a connection kept in
 * peername, or an allocation a datagram).  New reference or NULL. */
static PyObject *peer_host(PyObject **last_host, const char *text)
{
    const char *prev = *last_host != NULL ? PyUnicode_AsUTF8(*last_host) : NULL;
    if (prev != NULL && strcmp(prev, text) == 0)
        return Py_NewRef(*last_host);
    PyErr_Clear(); /* an unencodable previous host only means no sharing */
    PyObject *host = PyUnicode_FromString(text);
    if (host != NULL)
        Py_XSETREF(*last_host, Py_NewRef(host));
    return host;
}

PyObject *mt_sockaddr_to_py(PyObject **last_host, const struct sockaddr *sa, socklen_t len)
{
    if (len == 0)
        Py_RETURN_NONE;
    char text[INET6_ADDRSTRLEN];
    PyObject *host, *addr;
    switch (sa->sa_family) {
    case AF_INET: {
        const struct sockaddr_in *in = (const struct sockaddr_in *)sa;
        inet_ntop(AF_INET, &in->sin_addr, text, sizeof(text));
        if ((host = peer_host(last_host, text)) == NULL)
            return NULL;
        addr = Py_BuildValue("(Oi)", host, ntohs(in->sin_port));
        Py_DECREF(host);
        return addr;
    }
    case AF_INET6: {
        const struct sockaddr_in6 *in6 = (const struct sockaddr_in6 *)sa;
        inet_ntop(AF_INET6, &in6->sin6_addr, text, sizeof(text));
        if ((host = peer_host(last_host, text)) == NULL)
            return NULL;
        addr = Py_BuildValue("(OiII)", host, ntohs(in6->sin6_port),
                             (unsigned)ntohl(in6->sin6_flowinfo), (unsigned)in6->sin6_scope_id);
        Py_DECREF(host);
        return addr;
    }
    case AF_UNIX: {
        const struct sockaddr_un *un = (const struct sockaddr_un *)sa;
        size_t off = offsetof(struct sockaddr_un, sun_path);
        if (len <= off)
            return PyUnicode_FromString("");
        size_t n = len - off;
        if (un->sun_path[0] == '\0') /* Linux abstract namespace */
            return PyBytes_FromStringAndSize(un->sun_path, (Py_ssize_t)n);
        return PyUnicode_DecodeFSDefaultAndSize(un->sun_path,
                                                (Py_ssize_t)strnlen(un->sun_path, n));
    }
    default:
        return Py_BuildValue("(iy#)", sa->sa_family, (const char *)sa, (Py_ssize_t)len);
    }
}

/* A port as the socket module takes it; false for anything else (the slow
 * path raises what socket.sendto() would). */
static bool port_from_py(PyObject *obj, uint16_t *port)
{
    if (!PyLong_CheckExact(obj))
        return false;
    long v = PyLong_AsLong(obj);
    if (v < 0 || v > 65535) {
        PyErr_Clear();
        return false;
    }
    *port = htons((uint16_t)v);
    return true;
}

static bool u32_from_py(PyObject *obj, uint32_t *out)
{
    if (!PyLong_CheckExact(obj))
        return false;
    unsigned long v = PyLong_AsUnsignedLong(obj);
    if (v == (unsigned long)-1 && PyErr_Occurred()) {
        PyErr_Clear();
        return false;
    }
    if (v > UINT32_MAX)
        return false;
    *out = (uint32_t)v;
    return true;
}

static int inet_from_py(int family, PyObject *addr, struct sockaddr_storage *out, socklen_t *len)
{
    Py_ssize_t n = PyTuple_GET_SIZE(addr);
    if (n < 2 || n > (family == AF_INET ? 2 : 4))
        return 0;
    PyObject *host = PyTuple_GET_ITEM(addr, 0);
    if (!PyUnicode_CheckExact(host))
        return 0;
    const char *text = PyUnicode_AsUTF8(host);
    if (text == NULL) {
        PyErr_Clear();
        return 0;
    }
    memset(out, 0, sizeof(*out));
    if (family == AF_INET) {
        struct sockaddr_in *in = (struct sockaddr_in *)out;
        in->sin_family = AF_INET;
        if (!port_from_py(PyTuple_GET_ITEM(addr, 1), &in->sin_port) ||
            inet_pton(AF_INET, text, &in->sin_addr) != 1)
            return 0;
        *len = sizeof(*in);
        return 1;
    }
    struct sockaddr_in6 *in6 = (struct sockaddr_in6 *)out;
    in6->sin6_family = AF_INET6;
    uint32_t flowinfo = 0, scope_id = 0;
    if (!port_from_py(PyTuple_GET_ITEM(addr, 1), &in6->sin6_port) ||
        (n > 2 && (!u32_from_py(PyTuple_GET_ITEM(addr, 2), &flowinfo) || flowinfo > 0xfffff)) ||
        (n > 3 && !u32_from_py(PyTuple_GET_ITEM(addr, 3), &scope_id)) ||
        inet_pton(AF_INET6, text, &in6->sin6_addr) != 1)
        return 0;
    in6->sin6_flowinfo = htonl(flowinfo);
    in6->sin6_scope_id = scope_id;
    *len = sizeof(*in6);
    return 1;
}

static int unix_from_py(PyObject *addr, struct sockaddr_storage *out, socklen_t *len)
{
    const char *path;
    Py_ssize_t n;
    if (PyBytes_CheckExact(addr)) {
        path = PyBytes_AS_STRING(addr);
        n = PyBytes_GET_SIZE(addr);
    } else if (PyUnicode_CheckExact(addr)) {
        /* Only ASCII paths here: anything else is encoded by the slow path,
         * with the file system encoding and its error handler. */
        if (!PyUnicode_IS_ASCII(addr))
            return 0;
        path = (const char *)PyUnicode_DATA(addr);
        n = PyUnicode_GET_LENGTH(addr);
    } else {
        return 0;
    }
    struct sockaddr_un *un = (struct sockaddr_un *)out;
    bool abstract = n == 0 || path[0] == '\0';
    if ((size_t)n >= sizeof(un->sun_path) + (abstract ? 1 : 0))
        return 0;
    memset(un, 0, sizeof(*un));
    un->sun_family = AF_UNIX;
    memcpy(un->sun_path, path, (size_t)n);
    *len = (socklen_t)(offsetof(struct sockaddr_un, sun_path) + (size_t)n);
    return 1;
}

int mt_sockaddr_from_py(int family, PyObject *addr, struct sockaddr_storage *out,
                        socklen_t *len)
{
    switch (family) {
    case AF_INET:
    case AF_INET6:
        return PyTuple_CheckExact(addr) ? inet_from_py(family, addr, out, len) : 0;
    case AF_UNIX:
        return unix_from_py(addr, out, len);
    default:
        return 0;
    }
}
