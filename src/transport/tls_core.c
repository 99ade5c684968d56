/* Native TLS, the loop thread's side: see tls_core.h.  Everything here
 * runs with the GIL held. */
#include "transport/tls_core.h"

#include <dlfcn.h>
#include <errno.h>

#include <openssl/err.h>
#include <openssl/x509v3.h>

#define SESSION_CAPSULE "mtloop.tls_session"

/* ---- the user's SSL_CTX ----------------------------------------------------- */

/* CPython's context object (3.11 to 3.13) keeps its SSL_CTX right after
 * the object head.  There is no API for it: mtloop/_tls.py proves the
 * layout and the shared libssl before anything here is used. */
static SSL_CTX *context_ssl_ctx(PyObject *ctx)
{
    return *(SSL_CTX **)((char *)ctx + sizeof(PyObject));
}

static int check_context_object(PyObject *ctx)
{
    if (Py_TYPE(ctx)->tp_basicsize < (Py_ssize_t)(sizeof(PyObject) + sizeof(SSL_CTX *)) ||
        context_ssl_ctx(ctx) == NULL) {
        PyErr_SetString(PyExc_TypeError, "not an ssl.SSLContext");
        return -1;
    }
    return 0;
}

/* tls_check_libssl(path of _ssl, ssl.OPENSSL_VERSION_NUMBER): None when the
 * ssl module's extension resolves libssl to the library mtloop uses, else
 * why not. */
static PyObject *tls_check_libssl(PyObject *m, PyObject *args)
{
    (void)m;
    const char *path;
    unsigned long long version;
    if (!PyArg_ParseTuple(args, "sK:tls_check_libssl", &path, &version))
        return NULL;
    if (version != (unsigned long long)OpenSSL_version_num())
        return PyUnicode_FromFormat("the ssl module has OpenSSL 0x%llx, mtloop 0x%lx", version,
                                    (unsigned long)OpenSSL_version_num());
    void *handle = dlopen(path, RTLD_LAZY | RTLD_NOLOAD);
    if (handle == NULL)
        return PyUnicode_FromString("the ssl module's extension is not loaded");
    /* Looked up from _ssl's own scope: its copy if it has one, else the
     * libssl it was linked with. */
    void *theirs = dlsym(handle, "SSL_CTX_new");
    dlclose(handle);
    if (theirs != (void *)&SSL_CTX_new)
        return PyUnicode_FromString("the ssl module uses another libssl (or a static copy)");
    Py_RETURN_NONE;
}

/* tls_check_context(ctx, verify_mode bits, options): whether the SSL_CTX
 * read from `ctx` holds what Python says the context holds. */
static PyObject *tls_check_context(PyObject *m, PyObject *args)
{
    (void)m;
    PyObject *ctx;
    int verify;
    unsigned long long options;
    if (!PyArg_ParseTuple(args, "OiK:tls_check_context", &ctx, &verify, &options))
        return NULL;
    if (check_context_object(ctx) < 0)
        return NULL;
    SSL_CTX *c = context_ssl_ctx(ctx);
    return PyBool_FromLong(SSL_CTX_get_verify_mode(c) == verify &&
                           (unsigned long long)SSL_CTX_get_options(c) == options);
}

/* tls_find_ref(ctx, obj): the offset inside `ctx` of a pointer to `obj`,
 * or -1: how mtloop/_tls.py locates fields Python cannot read (the PSK
 * callbacks of 3.13), proved on a context of its own. */
static PyObject *tls_find_ref(PyObject *m, PyObject *args)
{
    (void)m;
    PyObject *ctx, *obj;
    if (!PyArg_ParseTuple(args, "OO:tls_find_ref", &ctx, &obj))
        return NULL;
    Py_ssize_t found = -1;
    for (Py_ssize_t off = sizeof(PyObject); off + (Py_ssize_t)sizeof(void *) <= Py_TYPE(ctx)->tp_basicsize;
         off += sizeof(void *)) {
        if (*(PyObject **)((char *)ctx + off) == obj) {
            if (found >= 0)
                return PyLong_FromLong(-1); /* not unique: no proof */
            found = off;
        }
    }
    return PyLong_FromSsize_t(found);
}

/* tls_ref_set(ctx, offset): whether the pointer at a proved offset is set. */
static PyObject *tls_ref_set(PyObject *m, PyObject *args)
{
    (void)m;
    PyObject *ctx;
    Py_ssize_t off;
    if (!PyArg_ParseTuple(args, "On:tls_ref_set", &ctx, &off))
        return NULL;
    if (off < (Py_ssize_t)sizeof(PyObject) ||
        off + (Py_ssize_t)sizeof(void *) > Py_TYPE(ctx)->tp_basicsize) {
        PyErr_SetString(PyExc_ValueError, "offset outside the object");
        return NULL;
    }
    return PyBool_FromLong(*(PyObject **)((char *)ctx + off) != NULL);
}

/* ---- a connection's SSL ------------------------------------------------------ */

typedef struct tls_session {
    SSL *ssl;       /* until a flow takes it */
    PyObject *ctx;  /* strong: the SSL's callbacks may point into it */
    PyObject *prefix; /* bytes the SSL reads before the socket, or NULL */
} tls_session;

static void session_free(PyObject *capsule)
{
    tls_session *s = PyCapsule_GetPointer(capsule, SESSION_CAPSULE);
    if (s == NULL)
        return;
    if (s->ssl != NULL)
        SSL_free(s->ssl);
    Py_XDECREF(s->ctx);
    Py_XDECREF(s->prefix);
    PyMem_Free(s);
}

static PyObject *ssl_failure(const char *what)
{
    unsigned long code = ERR_get_error();
    const char *reason = code ? ERR_reason_error_string(code) : NULL;
    ERR_clear_error();
    PyErr_Format(PyExc_OSError, "%s failed: %s", what, reason ? reason : "unknown error");
    return NULL;
}

/* As CPython's _ssl_configure_hostname(): SNI unless an IP literal, and the
 * name or address for verification when check_hostname is on (the host
 * flags come with the context's verify parameters). */
static int configure_hostname(SSL *ssl, const char *hostname, int check_hostname)
{
    ASN1_OCTET_STRING *ip = a2i_IPADDRESS(hostname);
    if (ip == NULL)
        ERR_clear_error();
    int rc = -1;
    if (ip == NULL && !SSL_set_tlsext_host_name(ssl, hostname)) {
        ssl_failure("SSL_set_tlsext_host_name");
        goto done;
    }
    if (check_hostname) {
        X509_VERIFY_PARAM *param = SSL_get0_param(ssl);
        int ok = ip == NULL
                     ? X509_VERIFY_PARAM_set1_host(param, hostname, strlen(hostname))
                     : X509_VERIFY_PARAM_set1_ip(param, ASN1_STRING_get0_data(ip),
                                                 (size_t)ASN1_STRING_length(ip));
        if (!ok) {
            ssl_failure("X509_VERIFY_PARAM_set1_host");
            goto done;
        }
    }
    rc = 0;
done:
    if (ip != NULL)
        ASN1_OCTET_STRING_free(ip);
    return rc;
}

/* tls_session(ctx, server_side, server_hostname, check_hostname,
 * post_handshake_auth): the SSL of one connection, as CPython's
 * newPySSLSocket() makes it, in a capsule for StreamCore(tls=...). */
static PyObject *tls_session_new(PyObject *m, PyObject *args)
{
    (void)m;
    PyObject *ctx;
    int server_side, check_hostname, pha;
    const char *hostname;
    if (!PyArg_ParseTuple(args, "Opzpp:tls_session", &ctx, &server_side, &hostname,
                          &check_hostname, &pha))
        return NULL;
    if (check_context_object(ctx) < 0)
        return NULL;
    ERR_clear_error();
    SSL *ssl = SSL_new(context_ssl_ctx(ctx));
    if (ssl == NULL)
        return ssl_failure("SSL_new");
    SSL_set_mode(ssl, SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER | SSL_MODE_ENABLE_PARTIAL_WRITE |
                          SSL_MODE_AUTO_RETRY);
#ifndef OPENSSL_NO_PSK
    /* CPython's PSK callbacks expect its own socket object as the SSL's
     * app data; contexts with them take the fallback (mtloop/_tls.py). */
    SSL_set_psk_client_callback(ssl, NULL);
    SSL_set_psk_server_callback(ssl, NULL);
#endif
    if (pha) {
        if (server_side) {
            int mode = SSL_get_verify_mode(ssl);
            if (mode & SSL_VERIFY_PEER)
                SSL_set_verify(ssl, mode | SSL_VERIFY_POST_HANDSHAKE,
                               SSL_get_verify_callback(ssl));
        } else {
            SSL_set_post_handshake_auth(ssl, 1);
        }
    }
    if (hostname != NULL && configure_hostname(ssl, hostname, check_hostname) < 0) {
        SSL_free(ssl);
        return NULL;
    }
    if (server_side)
        SSL_set_accept_state(ssl);
    else
        SSL_set_connect_state(ssl);
    tls_session *s = PyMem_Malloc(sizeof(*s));
    if (s == NULL) {
        SSL_free(ssl);
        return PyErr_NoMemory();
    }
    s->ssl = ssl;
    s->ctx = Py_NewRef(ctx);
    s->prefix = NULL;
    PyObject *capsule = PyCapsule_New(s, SESSION_CAPSULE, session_free);
    if (capsule == NULL) {
        SSL_free(ssl);
        Py_DECREF(s->ctx);
        PyMem_Free(s);
    }
    return capsule;
}

static tls_session *unused_session(PyObject *session)
{
    tls_session *s = PyCapsule_GetPointer(session, SESSION_CAPSULE);
    if (s != NULL && s->ssl == NULL) {
        PyErr_SetString(PyExc_ValueError, "TLS session already used");
        return NULL;
    }
    return s;
}

/* tls_session_prefix(session, data): the session's SSL will read `data`
 * (bytes) before the socket: what a plain connection read past the point
 * where start_tls() upgraded it. */
static PyObject *tls_session_prefix(PyObject *m, PyObject *args)
{
    (void)m;
    PyObject *session, *data;
    if (!PyArg_ParseTuple(args, "OS:tls_session_prefix", &session, &data))
        return NULL;
    tls_session *s = unused_session(session);
    if (s == NULL)
        return NULL;
    Py_XSETREF(s->prefix, Py_NewRef(data));
    Py_RETURN_NONE;
}

mt_flow *mt_tls_core_new_flow(PyObject *session, const struct mt_loop_ops *loop_ops,
                              mt_sink *sink, mt_io_thread *io, int fd)
{
    tls_session *s = unused_session(session);
    if (s == NULL)
        return NULL;
    const char *prefix = s->prefix ? PyBytes_AS_STRING(s->prefix) : NULL;
    size_t prefix_len = s->prefix ? (size_t)PyBytes_GET_SIZE(s->prefix) : 0;
    mt_tls_flow *t = mt_tls_flow_new(s->ssl, prefix, prefix_len, loop_ops, sink, io, fd);
    if (t == NULL) {
        PyErr_NoMemory();
        return NULL;
    }
    /* A server's SSL calls CPython's ALPN callback, which is handed the
     * context object, during its handshakes: the context lives until the
     * I/O thread is done.  CPython installs nothing a client's SSL calls
     * back (the contexts that would fall back). */
    if (SSL_is_server(s->ssl))
        t->pin = s->ctx;
    else
        Py_DECREF(s->ctx);
    s->ssl = NULL;
    s->ctx = NULL;
    Py_CLEAR(s->prefix); /* copied into the flow */
    return &t->flow;
}

void mt_tls_core_unpin(mt_flow *f)
{
    mt_tls_flow *t = mt_tls_flow_of(f);
    if (t != NULL && t->pin != NULL) {
        PyObject *pin = t->pin;
        t->pin = NULL;
        Py_DECREF(pin);
    }
}

/* ---- what the loop asks -------------------------------------------------------- */

static PyObject *cipher_tuple(const SSL_CIPHER *c)
{
    return Py_BuildValue("(ssi)", SSL_CIPHER_get_name(c), SSL_CIPHER_get_version(c),
                         SSL_CIPHER_get_bits(c, NULL));
}

PyObject *mt_tls_core_info(mt_flow *f)
{
    mt_tls_flow *t = mt_tls_flow_of(f);
    /* Asked only once OPENED was dispatched: the snapshot is complete and
     * immutable (before that, this would race the I/O thread). */
    if (t == NULL || t->info.version == NULL)
        Py_RETURN_NONE;
    const mt_tls_info *in = &t->info;
    PyObject *shared;
    if (in->n_shared < 0) {
        shared = Py_NewRef(Py_None);
    } else {
        shared = PyList_New(in->n_shared);
        for (int i = 0; shared != NULL && i < in->n_shared; i++) {
            PyObject *c = cipher_tuple(in->shared[i]);
            if (c == NULL)
                Py_CLEAR(shared);
            else
                PyList_SET_ITEM(shared, i, c);
        }
        if (shared == NULL)
            return NULL;
    }
    PyObject *cipher = in->cipher ? cipher_tuple(in->cipher) : Py_NewRef(Py_None);
    if (cipher == NULL) {
        Py_DECREF(shared);
        return NULL;
    }
    PyObject *der = in->peer_der ? PyBytes_FromStringAndSize((const char *)in->peer_der,
                                                             in->peer_der_len)
                                 : Py_NewRef(Py_None);
    PyObject *alpn = in->alpn_len ? PyUnicode_DecodeLatin1((const char *)in->alpn,
                                                           (Py_ssize_t)in->alpn_len, NULL)
                                  : Py_NewRef(Py_None);
    if (der == NULL || alpn == NULL) {
        Py_XDECREF(der);
        Py_XDECREF(alpn);
        Py_DECREF(shared);
        Py_DECREF(cipher);
        return NULL;
    }
    const char *version = strcmp(in->version, "unknown") == 0 ? NULL : in->version;
    return Py_BuildValue("(NONzzNNO)", der, in->verified_peer ? Py_True : Py_False, cipher,
                         version, in->compression, alpn, shared,
                         in->session_reused ? Py_True : Py_False);
}

bool mt_tls_core_shutdown_clean(mt_flow *f)
{
    mt_tls_flow *t = mt_tls_flow_of(f);
    return t != NULL && t->shutdown_clean;
}

PyObject *mt_tls_core_error(mt_flow *f)
{
    mt_tls_flow *t = mt_tls_flow_of(f);
    if (t == NULL || !t->failed)
        Py_RETURN_NONE;
    const mt_tls_error *e = &t->error;
    const char *reason = e->code ? ERR_reason_error_string(e->code) : NULL;
    const char *verify = X509_verify_cert_error_string(e->verify_result);
    return Py_BuildValue("(iiilzsiO)", e->ssl_error, ERR_GET_LIB(e->code), ERR_GET_REASON(e->code),
                         e->verify_result, reason, verify, e->sys_errno,
                         e->eof ? Py_True : Py_False);
}

/* tls_max_handshakes(n=None): the bound on handshakes in progress per I/O
 * thread; sets it first when n is given. */
static PyObject *tls_max_handshakes(PyObject *m, PyObject *args)
{
    (void)m;
    PyObject *n = Py_None;
    if (!PyArg_ParseTuple(args, "|O:tls_max_handshakes", &n))
        return NULL;
    if (n != Py_None) {
        long v = PyLong_AsLong(n);
        if (v == -1 && PyErr_Occurred())
            return NULL;
        if (v < 1 || v > 1000000) {
            PyErr_SetString(PyExc_ValueError, "the handshake bound must be 1 to 1000000");
            return NULL;
        }
        mt_tls_set_max_handshakes((int)v);
    }
    return PyLong_FromLong(mt_tls_max_handshakes());
}

static PyMethodDef tls_functions[] = {
    {"tls_max_handshakes", tls_max_handshakes, METH_VARARGS,
     "The bound on TLS handshakes in progress per I/O thread (sets it when given)."},
    {"tls_check_libssl", tls_check_libssl, METH_VARARGS,
     "None when the ssl module shares mtloop's libssl, else why not."},
    {"tls_check_context", tls_check_context, METH_VARARGS,
     "Whether an SSLContext's SSL_CTX reads back what Python set."},
    {"tls_find_ref", tls_find_ref, METH_VARARGS, "Offset of a pointer to obj inside ctx, or -1."},
    {"tls_ref_set", tls_ref_set, METH_VARARGS, "Whether the pointer at a proved offset is set."},
    {"tls_session", tls_session_new, METH_VARARGS, "The SSL of one native TLS connection."},
    {"tls_session_prefix", tls_session_prefix, METH_VARARGS,
     "Bytes the session's SSL reads before the socket (start_tls)."},
    {NULL, NULL, 0, NULL},
};

int mt_tls_core_init(PyObject *module)
{
    return PyModule_AddFunctions(module, tls_functions);
}
