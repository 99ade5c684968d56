/* The fd operations of a TLS flow (see tls.h): OpenSSL on the owning I/O
 * thread, reading and writing records on the socket itself. */
#include "transport/tls.h"

#include <errno.h>
#include <limits.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <openssl/err.h>
#include <openssl/x509.h>

/* Writes of up to one record's worth of small buffers are gathered, so a
 * protocol's many small writes cost one record, not one each. */
#define MT_TLS_RECORD (16 * 1024)
/* A large buffer goes to SSL_write as it is, this much at a time (partial
 * writes on: OpenSSL returns after the records the socket took). */
#define MT_TLS_DIRECT_MAX (64 * 1024)

static mt_tls_flow *tls_of(mt_flow *f)
{
    return (mt_tls_flow *)f;
}

/* ---- handshake slots (tls.h) ------------------------------------------------ */

static _Atomic int max_handshakes = MT_TLS_HANDSHAKES_DEFAULT; /* any thread */

void mt_tls_set_max_handshakes(int n)
{
    atomic_store_explicit(&max_handshakes, n < 1 ? 1 : n, memory_order_relaxed);
}

int mt_tls_max_handshakes(void)
{
    return atomic_load_explicit(&max_handshakes, memory_order_relaxed);
}

/* Each I/O thread's own: its TLS flows run only on it. */
static _Thread_local struct {
    int active;                     /* handshakes holding a slot */
    mt_tls_flow *head, *tail;       /* flows waiting for one, in arrival order */
} slots;

static void park(mt_tls_flow *t)
{
    t->parked = true;
    t->park_next = NULL;
    t->park_prev = slots.tail;
    if (slots.tail)
        slots.tail->park_next = t;
    else
        slots.head = t;
    slots.tail = t;
}

static void unpark(mt_tls_flow *t)
{
    if (!t->parked)
        return;
    t->parked = false;
    if (t->park_prev)
        t->park_prev->park_next = t->park_next;
    else
        slots.head = t->park_next;
    if (t->park_next)
        t->park_next->park_prev = t->park_prev;
    else
        slots.tail = t->park_prev;
    t->park_prev = t->park_next = NULL;
}

/* Only a server's handshakes take slots: a client's wait on its server,
 * which may be served by this very thread (a process talking to itself),
 * and a client opens as many connections as it chooses to. */
static bool take_slot(mt_tls_flow *t)
{
    if (t->has_slot || !SSL_is_server(t->ssl))
        return true;
    if (slots.active >= mt_tls_max_handshakes() || (slots.head != NULL && slots.head != t))
        return false; /* full, or others were waiting first */
    unpark(t);
    slots.active++;
    t->has_slot = true;
    if (slots.head != NULL && slots.active < mt_tls_max_handshakes()) /* more freed at once */
        mt_record_mark_dirty(slots.head->flow.rec.io, &slots.head->flow.rec);
    return true;
}

/* A handshake ended (done, failed, or its flow released): the first flow
 * waiting gets its turn, through the pump's service (flow.h). */
static void give_back_slot(mt_tls_flow *t)
{
    if (!t->has_slot)
        return;
    t->has_slot = false;
    slots.active--;
    mt_tls_flow *next = slots.head;
    if (next != NULL && slots.active < mt_tls_max_handshakes())
        mt_record_mark_dirty(next->flow.rec.io, &next->flow.rec);
}

/* The peer ended the connection without close_notify.  OpenSSL 3 says so
 * with an SSL error of its own, OpenSSL 1.1 with a bare SYSCALL. */
static bool is_unclean_eof(int ssl_error, int sys_errno)
{
    if (ssl_error == SSL_ERROR_SYSCALL)
        return sys_errno == 0 && ERR_peek_error() == 0;
#ifdef SSL_R_UNEXPECTED_EOF_WHILE_READING
    if (ssl_error == SSL_ERROR_SSL)
        return ERR_GET_REASON(ERR_peek_last_error()) == SSL_R_UNEXPECTED_EOF_WHILE_READING;
#endif
    return false;
}

static void note_error(mt_tls_flow *t, int ssl_error, int sys_errno, bool eof)
{
    if (t->failed)
        return;
    t->failed = true;
    t->error.ssl_error = ssl_error;
    t->error.code = ERR_peek_last_error();
    t->error.verify_result = SSL_get_verify_result(t->ssl);
    t->error.sys_errno = sys_errno;
    t->error.eof = eof;
}

static ssize_t classify_failure(mt_tls_flow *t, int e, int sys_errno, bool reading);

/* A failed SSL_read or SSL_write, in the pump's terms: -1 with errno
 * (EAGAIN and a wait hint while OpenSSL waits for the fd; EPROTO for a
 * TLS failure, described in t->error), or 0 for the peer's end.
 *
 * OpenSSL's error queue (per thread) must be empty before a call for
 * SSL_get_error() to be right.  Only failures fill it, and this thread runs
 * no other OpenSSL code, so it is emptied here, after a failure, rather
 * than before every call (that cost 3.6% of an I/O thread's time on TLS
 * echo 1 KiB). */
static ssize_t call_failed(mt_tls_flow *t, int ret, int sys_errno, bool reading)
{
    int e = SSL_get_error(t->ssl, ret);
    int saved;
    ssize_t rc = classify_failure(t, e, sys_errno, reading);
    if (e == SSL_ERROR_SSL || e == SSL_ERROR_SYSCALL) {
        saved = errno;
        ERR_clear_error();
        errno = saved;
    }
    return rc;
}

static ssize_t classify_failure(mt_tls_flow *t, int e, int sys_errno, bool reading)
{
    switch (e) {
    case SSL_ERROR_WANT_READ:
        t->flow.wait_hint = MT_IO_READ;
        errno = EAGAIN;
        return -1;
    case SSL_ERROR_WANT_WRITE:
        t->flow.wait_hint = MT_IO_WRITE;
        errno = EAGAIN;
        return -1;
    case SSL_ERROR_ZERO_RETURN:
        t->peer_closed = true;
        t->peer_gone = !t->close_notify_seen; /* an EOF (see mt_tls_flow_new) */
        break;
    default:
        if (is_unclean_eof(e, sys_errno)) {
            /* As asyncio's SSL protocol takes a transport's EOF: the end,
             * and no close_notify in answer. */
            t->peer_closed = true;
            t->peer_gone = true;
            break;
        }
        if (e == SSL_ERROR_SYSCALL && sys_errno != 0) {
            errno = sys_errno;
            return -1;
        }
        note_error(t, e, sys_errno, false);
        errno = EPROTO;
        return -1;
    }
    if (reading)
        return 0;
    errno = EPIPE;
    return -1;
}

/* ---- the byte stream ------------------------------------------------------ */

/* Fills `buf` with as many records as are there: one completion carries
 * up to MT_READ_MAX plaintext bytes, as a socket read would. */
static ssize_t tls_read(mt_flow *f, void *buf, size_t len)
{
    mt_tls_flow *t = tls_of(f);
    t->end_pending = false;
    if (t->failed) {
        errno = EPROTO;
        return -1;
    }
    if (t->peer_closed)
        return 0;
    t->read_wants_write = false;
    size_t got = 0;
    while (got < len) {
        size_t want = len - got < INT_MAX ? len - got : INT_MAX;
        errno = 0;
        int n = SSL_read(t->ssl, (char *)buf + got, (int)want);
        if (n > 0) {
            got += (size_t)n;
            continue;
        }
        int sys_errno = errno;
        ssize_t rc = call_failed(t, n, sys_errno, true);
        if (got == 0)
            return rc;
        /* Data first.  The next read reports the end or the failure, or
         * finishes the write OpenSSL must do (a post-handshake answer):
         * no readiness event would bring that read about, so has_input
         * asks for it. */
        if (rc < 0 && errno == EAGAIN)
            t->read_wants_write = t->flow.wait_hint == MT_IO_WRITE;
        else
            t->end_pending = true;
        break;
    }
    t->flow.wait_hint = 0;
    return (ssize_t)got;
}

/* The next bytes for SSL_write: a retry must offer the same bytes again,
 * which the pump keeps at the head of its queue until a write takes them. */
static ssize_t tls_writev(mt_flow *f, const struct iovec *iov, int cnt)
{
    mt_tls_flow *t = tls_of(f);
    if (t->failed) {
        errno = EPROTO;
        return -1;
    }
    const void *buf;
    size_t len;
    if (t->stage_len > 0) {
        buf = t->stage;
        len = t->stage_len;
    } else if (t->direct_len > 0) {
        buf = iov[0].iov_base;
        len = t->direct_len;
    } else if (cnt == 1 || iov[0].iov_len >= MT_TLS_RECORD) {
        buf = iov[0].iov_base;
        len = iov[0].iov_len < MT_TLS_DIRECT_MAX ? iov[0].iov_len : MT_TLS_DIRECT_MAX;
        t->direct_len = len;
    } else {
        if (t->stage == NULL && (t->stage = malloc(MT_TLS_RECORD)) == NULL) {
            errno = ENOMEM;
            return -1;
        }
        len = 0;
        for (int i = 0; i < cnt && len < MT_TLS_RECORD; i++) {
            size_t take = iov[i].iov_len;
            if (take > MT_TLS_RECORD - len)
                take = MT_TLS_RECORD - len;
            memcpy(t->stage + len, iov[i].iov_base, take);
            len += take;
        }
        t->stage_len = len;
        buf = t->stage;
    }
    errno = 0;
    int n = SSL_write(t->ssl, buf, (int)len);
    if (n <= 0)
        return call_failed(t, n, errno, false);
    if (t->stage_len > 0) {
        /* The stage stays a copy of the head of the pump's queue. */
        t->stage_len -= (size_t)n;
        memmove(t->stage, t->stage + n, t->stage_len);
    }
    t->direct_len = 0;
    return n;
}

static int tls_shutdown_wr(mt_flow *f)
{
    (void)f; /* TLS has no half-close (asyncio's write_eof() refuses) */
    errno = ENOTSUP;
    return -1;
}

static bool tls_has_input(mt_flow *f)
{
    mt_tls_flow *t = tls_of(f);
    if (t->end_pending)
        return true;
    if (t->ssl == NULL || t->failed)
        return false;
    /* A start_tls() prefix OpenSSL has not read yet raises no readiness. */
    return SSL_has_pending(t->ssl) || t->read_wants_write ||
           (t->prefixed && BIO_ctrl_pending(SSL_get_rbio(t->ssl)) > 0);
}

/* ---- the handshake and close_notify --------------------------------------- */

/* What CPython's SSLObject answers about a connection, taken once the
 * handshake is done; see tls.h. */
static void take_snapshot(mt_tls_flow *t)
{
    mt_tls_info *info = &t->info;
    SSL *ssl = t->ssl;
#if OPENSSL_VERSION_NUMBER >= 0x30000000L
    X509 *peer = SSL_get0_peer_certificate(ssl);
#else
    X509 *peer = SSL_get_peer_certificate(ssl);
#endif
    if (peer != NULL) {
        info->peer_der_len = i2d_X509(peer, &info->peer_der);
        if (info->peer_der_len < 0) {
            info->peer_der = NULL;
            info->peer_der_len = 0;
        }
#if OPENSSL_VERSION_NUMBER < 0x30000000L
        X509_free(peer);
#endif
    }
    info->verified_peer = (SSL_get_verify_mode(ssl) & SSL_VERIFY_PEER) != 0;
    info->session_reused = SSL_session_reused(ssl) != 0;
    info->cipher = SSL_get_current_cipher(ssl);
    info->version = SSL_get_version(ssl);
    const unsigned char *alpn = NULL;
    unsigned alpn_len = 0;
    SSL_get0_alpn_selected(ssl, &alpn, &alpn_len);
    if (alpn != NULL && alpn_len <= sizeof(info->alpn)) {
        memcpy(info->alpn, alpn, alpn_len);
        info->alpn_len = alpn_len;
    }
    info->compression = NULL;
#ifndef OPENSSL_NO_COMP
    const COMP_METHOD *comp = SSL_get_current_compression(ssl);
    if (comp != NULL && COMP_get_type(comp) != NID_undef)
        info->compression = OBJ_nid2sn(COMP_get_type(comp));
#endif
    /* As SSLObject.shared_ciphers(): the server's ciphers the client
     * offered; the client side does not know them. */
    STACK_OF(SSL_CIPHER) *client = SSL_get_client_ciphers(ssl);
    STACK_OF(SSL_CIPHER) *server = SSL_get_ciphers(ssl);
    info->n_shared = -1;
    if (client != NULL && server != NULL) {
        info->n_shared = 0;
        for (int i = 0; i < sk_SSL_CIPHER_num(server) && info->n_shared < MT_TLS_MAX_SHARED; i++) {
            const SSL_CIPHER *c = sk_SSL_CIPHER_value(server, i);
            if (sk_SSL_CIPHER_find(client, c) >= 0)
                info->shared[info->n_shared++] = c;
        }
    }
}

static int tls_open(mt_flow *f)
{
    mt_tls_flow *t = tls_of(f);
    if (!take_slot(t)) {
        if (!t->parked)
            park(t);
        f->filter_wait = 0; /* no readiness: a slot, which give_back_slot() brings */
        return 1;
    }
    ERR_clear_error();
    errno = 0;
    int rc = SSL_do_handshake(t->ssl);
    if (rc == 1) {
        give_back_slot(t);
        take_snapshot(t);
        return 0;
    }
    int sys_errno = errno;
    int e = SSL_get_error(t->ssl, rc);
    if (e == SSL_ERROR_WANT_READ || e == SSL_ERROR_WANT_WRITE) {
        f->filter_wait = e == SSL_ERROR_WANT_READ ? MT_IO_READ : MT_IO_WRITE;
        return 1;
    }
    give_back_slot(t);
    bool eof = e == SSL_ERROR_ZERO_RETURN || is_unclean_eof(e, sys_errno);
    note_error(t, e, sys_errno, eof);
    ERR_clear_error(); /* see call_failed() */
    if (eof)
        errno = ECONNRESET; /* asyncio: the peer left during the handshake */
    else if (e == SSL_ERROR_SYSCALL && sys_errno != 0)
        errno = sys_errno;
    else
        errno = EPROTO;
    return -1;
}

/* Sends close_notify, then waits for the peer's, as asyncio's SSL protocol
 * does before it closes the transport (the loop bounds the wait with
 * ssl_shutdown_timeout).  Done (0) when the peer answered, or had ended
 * the connection already; a peer that goes away instead fails it (-1,
 * described in t->error as a read would be). */
static int tls_close(mt_flow *f)
{
    mt_tls_flow *t = tls_of(f);
    if (t->failed || t->peer_gone)
        return 0; /* no close_notify after a fatal error, or to a peer that left */
    for (int round = 0; round < 2; round++) {
        ERR_clear_error();
        errno = 0;
        int rc = SSL_shutdown(t->ssl);
        if (rc == 1) {
            t->shutdown_clean = true;
            return 0;
        }
        if (rc == 0) { /* ours is sent */
            if (t->peer_closed)
                return 0;
            continue; /* now wait for the peer's */
        }
        int sys_errno = errno;
        int e = SSL_get_error(t->ssl, rc);
        if (e == SSL_ERROR_WANT_READ || e == SSL_ERROR_WANT_WRITE) {
            f->filter_wait = e == SSL_ERROR_WANT_READ ? MT_IO_READ : MT_IO_WRITE;
            return 1;
        }
        bool eof = is_unclean_eof(e, sys_errno);
        if (!t->peer_closed)
            note_error(t, e, sys_errno, eof);
        ERR_clear_error(); /* see call_failed() */
        if (t->peer_closed)
            return 0;
        errno = eof ? ECONNRESET : (e == SSL_ERROR_SYSCALL && sys_errno ? sys_errno : EPROTO);
        return -1;
    }
    return 0;
}

/* ---- lifetime ------------------------------------------------------------- */

static void tls_release(mt_flow *f, bool destroying)
{
    mt_tls_flow *t = tls_of(f);
    if (!destroying) { /* the owning I/O thread: its slots */
        unpark(t);
        give_back_slot(t);
    }
    if (t->ssl != NULL) {
        SSL_free(t->ssl); /* its socket BIO does not close the fd */
        t->ssl = NULL;
    }
    free(t->stage);
    t->stage = NULL;
    if (destroying) {
        OPENSSL_free(t->info.peer_der);
        t->info.peer_der = NULL;
    }
}

const mt_fd_ops mt_tls_fd_ops = {
    .read = tls_read,
    .writev = tls_writev,
    .shutdown_wr = tls_shutdown_wr,
    .sendfile = NULL,
    .open = tls_open,
    .close = tls_close,
    .has_input = tls_has_input,
    .release = tls_release,
    .flow_size = sizeof(mt_tls_flow),
    .loop_may_write = false,
};

/* Notes the peer's close_notify as it arrives (OpenSSL's message callback,
 * on the I/O thread inside SSL_read). */
static void on_message(int write_p, int version, int content_type, const void *buf, size_t len,
                       SSL *ssl, void *arg)
{
    (void)version;
    (void)ssl;
    const unsigned char *p = buf;
    if (!write_p && content_type == SSL3_RT_ALERT && len >= 2 && p[1] == SSL_AD_CLOSE_NOTIFY)
        ((mt_tls_flow *)arg)->close_notify_seen = true;
}

/* ---- start_tls(): the bytes read before the upgrade ------------------------ */

/* A connection that start_tls() upgrades may have read the peer's first
 * TLS bytes as plain data (the plain flow's reads after the protocol
 * paused).  They are the start of the TLS stream: the SSL reads them
 * first, then the socket, through this BIO, which serves its prefix and
 * then reads the fd as OpenSSL's socket BIO would (writes keep going
 * through the socket BIO). */
typedef struct prefix_source {
    int fd;
    bool eof;                           /* read() returned 0 */
    size_t off, len;
    unsigned char data[];
} prefix_source;

static int prefix_read(BIO *b, char *out, int outl)
{
    prefix_source *p = BIO_get_data(b);
    BIO_clear_retry_flags(b);
    if (outl <= 0)
        return 0;
    if (p->off < p->len) {
        size_t n = p->len - p->off < (size_t)outl ? p->len - p->off : (size_t)outl;
        memcpy(out, p->data + p->off, n);
        p->off += n;
        return (int)n;
    }
    ssize_t n = read(p->fd, out, (size_t)outl);
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR))
        BIO_set_retry_read(b);
    else if (n == 0)
        p->eof = true;
    return (int)n;
}

static long prefix_ctrl(BIO *b, int cmd, long num, void *ptr)
{
    (void)num;
    (void)ptr;
    prefix_source *p = BIO_get_data(b);
    switch (cmd) {
    case BIO_CTRL_PENDING:
        return (long)(p->len - p->off);
    case BIO_CTRL_EOF: /* OpenSSL 3 asks, to tell an unexpected EOF */
        return p->eof;
    case BIO_CTRL_FLUSH:
        return 1;
    default:
        return 0;
    }
}

static int prefix_destroy(BIO *b)
{
    free(BIO_get_data(b));
    BIO_set_data(b, NULL);
    return 1;
}

static BIO_METHOD *prefix_method;
static pthread_once_t prefix_method_once = PTHREAD_ONCE_INIT;

static void make_prefix_method(void) /* kept for the life of the process */
{
    BIO_METHOD *m = BIO_meth_new(BIO_get_new_index() | BIO_TYPE_SOURCE_SINK, "mtloop prefix");
    if (m != NULL && BIO_meth_set_read(m, prefix_read) && BIO_meth_set_ctrl(m, prefix_ctrl) &&
        BIO_meth_set_destroy(m, prefix_destroy))
        prefix_method = m;
    else if (m != NULL)
        BIO_meth_free(m);
}

/* The BIO that serves `len` bytes of `data`, then reads `fd`. */
static BIO *prefix_new(const void *data, size_t len, int fd)
{
    pthread_once(&prefix_method_once, make_prefix_method);
    prefix_source *p = malloc(sizeof(*p) + len);
    BIO *b = prefix_method != NULL && p != NULL ? BIO_new(prefix_method) : NULL;
    if (b == NULL) {
        free(p);
        return NULL;
    }
    p->fd = fd;
    p->eof = false;
    p->off = 0;
    p->len = len;
    memcpy(p->data, data, len);
    BIO_set_data(b, p);
    BIO_set_init(b, 1);
    return b;
}

mt_tls_flow *mt_tls_flow_new(SSL *ssl, const void *prefix, size_t prefix_len,
                             const struct mt_loop_ops *loop_ops, mt_sink *sink,
                             mt_io_thread *io, int fd)
{
    BIO *source = prefix_len > 0 ? prefix_new(prefix, prefix_len, fd) : NULL;
    if ((prefix_len > 0 && source == NULL) || !SSL_set_fd(ssl, fd)) {
        BIO_free(source);
        errno = ENOMEM;
        return NULL;
    }
    mt_tls_flow *t = (mt_tls_flow *)mt_flow_new(&mt_tls_fd_ops, loop_ops, sink, io, fd);
    if (t == NULL) {
        BIO_free(source);
        return NULL;
    }
    t->ssl = ssl;
    if (source != NULL) {
        SSL_set0_rbio(ssl, source); /* the socket BIO stays the wbio */
        t->prefixed = true;
    }
    /* Read ahead: one read() takes every record the kernel has (without
     * it, OpenSSL reads each record's header and body apart: two system
     * calls a record).  What it reads beyond one record waits inside
     * OpenSSL, which has_input reports. */
    SSL_set_read_ahead(ssl, 1);
    /* A peer that closes TCP without close_notify ends the stream, as
     * asyncio's SSL protocol takes it, and gets no alert (OpenSSL 3 sends
     * a fatal one from SSL_read otherwise).  With the option such an EOF
     * reads like close_notify; the message callback tells them apart.
     * Both are set on this SSL only: a context with a message callback of
     * its own never comes here (it falls back). */
#ifdef SSL_OP_IGNORE_UNEXPECTED_EOF
    SSL_set_options(ssl, SSL_OP_IGNORE_UNEXPECTED_EOF);
#endif
    SSL_set_msg_callback(ssl, on_message);
    SSL_set_msg_callback_arg(ssl, t);
    return t;
}
