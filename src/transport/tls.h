/* TLS as a flow filter: OpenSSL runs a connection on its I/O thread.
 *
 * A TLS flow is a flow (flow.h) whose fd operations are OpenSSL's: the
 * pump hands them plaintext and they read and write records on the
 * socket (SSL_set_fd: no copy between OpenSSL and the kernel).  The
 * handshake is the filter's opening and close_notify its closing, so the
 * loop sees a TLS connection as a plain byte stream plus one OPENED
 * completion, and the counters and write flow control count plaintext.
 *
 * The SSL object is made on the loop thread from the user's SSL_CTX
 * (tls_core.c) and belongs to the owning I/O thread from attach until it
 * frees it when it lets go of the flow.  What the loop may ask about the
 * connection afterwards (the peer's certificate, the cipher, ALPN) is a
 * snapshot the I/O thread takes when the handshake completes, published
 * by the OPENED completion: the loop thread never touches the SSL. */
#ifndef MT_TLS_H
#define MT_TLS_H

#include <openssl/ssl.h>

#include "transport/flow.h"

#define MT_TLS_MAX_SHARED 64

/* What the handshake settled; immutable once OPENED is emitted. */
typedef struct mt_tls_info {
    unsigned char *peer_der;            /* the peer's certificate, or NULL */
    int peer_der_len;
    bool verified_peer;                 /* SSL_VERIFY_PEER was on */
    bool session_reused;
    const SSL_CIPHER *cipher;           /* OpenSSL's static tables */
    const char *version;                /* static */
    unsigned char alpn[256];
    unsigned alpn_len;
    const char *compression;            /* static, or NULL */
    int n_shared;                       /* -1: unknown (client side) */
    const SSL_CIPHER *shared[MT_TLS_MAX_SHARED];
} mt_tls_info;

/* The first TLS failure of a connection, as CPython's ssl module would
 * report it. */
typedef struct mt_tls_error {
    int ssl_error;                      /* SSL_get_error() */
    unsigned long code;                 /* ERR_peek_last_error(), or 0 */
    long verify_result;                 /* SSL_get_verify_result() */
    int sys_errno;
    bool eof;                           /* the peer closed without close_notify */
} mt_tls_error;

typedef struct mt_tls_flow {
    mt_flow flow;                       /* first: the pump sees an mt_flow */
    SSL *ssl;                           /* the owning I/O thread's from attach; NULL
                                           once released */
    void *pin;                          /* loop thread only: what the SSL's callbacks
                                           point to (a server's Python SSLContext),
                                           kept until RELEASED is dispatched */

    /* The owning I/O thread only. */
    unsigned char *stage;               /* small writes gathered into one record */
    size_t stage_len;                   /* staged bytes an SSL_write has not taken */
    size_t direct_len;                  /* a direct SSL_write waiting to be retried */
    bool has_slot;                      /* counted in the thread's handshakes */
    struct mt_tls_flow *park_prev, *park_next; /* waiting for a handshake slot */
    bool parked;
    bool peer_closed;                   /* close_notify or EOF from the peer */
    bool peer_gone;                     /* EOF without close_notify */
    bool close_notify_seen;             /* the peer's close_notify arrived */
    bool read_wants_write;              /* a read returned data, then found OpenSSL
                                           waiting to write */
    bool end_pending;                   /* a read returned data, then met the end or
                                           a failure: the next read reports it */
    bool prefixed;                      /* reads a start_tls() prefix first (set
                                           before attach) */

    /* Written by the I/O thread before the completion that reports them
     * (OPENED; READ_ERROR or WRITE_ERROR with EPROTO; RELEASED after the
     * close), read-only after. */
    bool failed;
    bool shutdown_clean;                /* close_notify went both ways */
    mt_tls_error error;
    mt_tls_info info;
} mt_tls_flow;

extern const mt_fd_ops mt_tls_fd_ops;

/* Server handshakes in progress on one I/O thread are bounded: past the
 * bound a new connection waits (its hello left in the kernel) until one of
 * them ends, so that a connection storm cannot starve the connections
 * already open, nor push every handshake past its timeout at once. */
#define MT_TLS_HANDSHAKES_DEFAULT 64

/* The bound, per I/O thread (at least 1); any thread, any time. */
void mt_tls_set_max_handshakes(int n);
int mt_tls_max_handshakes(void);

/* A new TLS flow around `fd` (as mt_flow_new), taking over `ssl` on
 * success.  The SSL reads the `prefix_len` bytes at `prefix` first, then
 * the socket: start_tls() passes what the plain flow read past the
 * upgrade (NULL, 0: none). */
mt_tls_flow *mt_tls_flow_new(SSL *ssl, const void *prefix, size_t prefix_len,
                             const struct mt_loop_ops *loop_ops, mt_sink *sink,
                             mt_io_thread *io, int fd);

static inline mt_tls_flow *mt_tls_flow_of(mt_flow *f)
{
    return f->fd_ops == &mt_tls_fd_ops ? (mt_tls_flow *)f : NULL;
}

#endif
