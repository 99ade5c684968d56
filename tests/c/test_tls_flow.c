/* A TLS flow (src/transport/tls_ops.c) under the flow pump, on a real I/O
 * thread, against a peer speaking TLS through OpenSSL on the test thread:
 * the handshake as the filter's opening (OPENED before any data), data
 * both ways across many records, input OpenSSL holds when read credit runs
 * out, a KeyUpdate mid-stream, a TLS 1.2 renegotiation between bursts,
 * close_notify as the filter's closing, a
 * handshake that fails, an abort mid-handshake, and a start_tls() prefix
 * (TLS bytes read as plain data before the upgrade).  The certificate is made here, in memory. */
#include "flow_harness.h"

#include <sys/ioctl.h>

#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/x509.h>

static SSL_CTX *g_server_ctx, *g_client_ctx;

static int make_contexts(void)
{
    EVP_PKEY *key = EVP_EC_gen("P-256");
    X509 *cert = X509_new();
    if (key == NULL || cert == NULL)
        return -1;
    X509_set_version(cert, 2);
    ASN1_INTEGER_set(X509_get_serialNumber(cert), 1);
    X509_gmtime_adj(X509_getm_notBefore(cert), 0);
    X509_gmtime_adj(X509_getm_notAfter(cert), 3600);
    X509_set_pubkey(cert, key);
    X509_NAME *name = X509_get_subject_name(cert);
    X509_NAME_add_entry_by_txt(name, "CN", MBSTRING_ASC, (const unsigned char *)"mtloop-test",
                               -1, -1, 0);
    X509_set_issuer_name(cert, name);
    if (!X509_sign(cert, key, EVP_sha256()))
        return -1;
    g_server_ctx = SSL_CTX_new(TLS_server_method());
    g_client_ctx = SSL_CTX_new(TLS_client_method());
    if (g_server_ctx == NULL || g_client_ctx == NULL ||
        SSL_CTX_use_certificate(g_server_ctx, cert) != 1 ||
        SSL_CTX_use_PrivateKey(g_server_ctx, key) != 1)
        return -1;
    SSL_CTX_set_verify(g_client_ctx, SSL_VERIFY_NONE, NULL);
    X509_free(cert);
    EVP_PKEY_free(key);
    return 0;
}

static int setup(void **state)
{
    if (make_contexts() < 0)
        return -1;
    return flow_setup(state);
}

static int teardown(void **state)
{
    SSL_CTX_free(g_server_ctx);
    SSL_CTX_free(g_client_ctx);
    return flow_teardown(state);
}

static SSL *server_ssl(void)
{
    SSL *ssl = SSL_new(g_server_ctx);
    assert_non_null(ssl);
    SSL_set_mode(ssl, SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER | SSL_MODE_ENABLE_PARTIAL_WRITE |
                          SSL_MODE_AUTO_RETRY);
    SSL_set_accept_state(ssl);
    return ssl;
}

static SSL *client_ssl(void)
{
    SSL *ssl = SSL_new(g_client_ctx);
    assert_non_null(ssl);
    SSL_set_connect_state(ssl);
    return ssl;
}

/* The flow is the TLS server; the peer the client. */
static void open_tls(harness *h)
{
    int sv[2];
    assert_int_equal(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv), 0);
    h_open_tls(h, sv[0], sv[1], server_ssl(), client_ssl());
}

static bool opened(harness *h) { return h->n_opened > 0; }
static bool peer_closed_seen(harness *h) { return h->peer_eof || h->peer_ssl_err != 0; }

static mt_tls_flow *tls(harness *h) { return (mt_tls_flow *)h->f; }

/* Every byte arrived right both ways, and neither side saw an error. */
static void assert_intact(harness *h)
{
    assert_int_equal(h->rx_bad, 0);
    assert_int_equal(h->peer_rx_bad, 0);
    assert_int_equal(h->peer_ssl_err, 0);
    assert_int_equal(h->n_read_error + h->n_write_error, 0);
}

/* Both ways at once, megabytes in records of every size: every byte
 * arrives, in order; OPENED comes first, and the snapshot names the
 * version and the cipher. */
static void tls_echo_both_ways(void **state)
{
    (void)state;
    harness *h = &g_h;
    open_tls(h);
    h_reading(h, true);
    h->peer_reading = true;
    assert_true(h_run(h, opened, WAIT_MS));
    assert_int_equal(h->opened_err, 0);
    assert_non_null(tls(h)->info.version);
    assert_non_null(tls(h)->info.cipher);
    assert_null(tls(h)->info.peer_der); /* the client sent no certificate */

    h_set_in(h, 3 * 1024 * 1024 + 7, 11);
    h_write_many(h, 3 * 1024 * 1024 + 13, 70 * 1024, 5);
    assert_true(h_run(h, rx_all, WAIT_MS * 2));
    assert_true(h_run(h, peer_rx_all, WAIT_MS * 2));
    assert_int_equal(h->rx_bad, 0);
    assert_int_equal(h->peer_rx_bad, 0);
    assert_int_equal(h->data_before_opened, 0);
    /* The counters count plaintext. */
    assert_int_equal(h_flushed(h), h->out_queued);
    assert_int_equal(h->peer_ssl_err, 0);
    h_finish(h);
}

/* Read credit runs out with plaintext decrypted inside OpenSSL: it raises
 * no readiness event, and must still come once credit is back.  24 full
 * records: three reads of MT_READ_MAX use up the credit and split the
 * last record, so what is left sits in OpenSSL, none in the kernel. */
static void tls_input_held_by_openssl_arrives(void **state)
{
    (void)state;
    harness *h = &g_h;
    open_tls(h);
    h->auto_credit = false;
    h->peer_reading = true;
    set_sndbuf(h->peer, 2 * 1024 * 1024); /* all of it waits in the kernel first */
    h_set_in(h, 24 * 16384, 3);
    assert_true(h_run(h, sent_all, WAIT_MS));
    h_reading(h, true);
    h_quiet(h, QUIET_MS);
    assert_true(h->rx < h->in_len); /* stopped for credit */
    assert_true(h->rx >= 3 * MT_READ_MAX - 16384);
    while (!rx_all(h)) {
        assert_true(h_consume_held(h) > 0 || h->nheld == 0);
        assert_true(h_run(h, rx_all, WAIT_MS) || h->nheld > 0);
    }
    assert_int_equal(h->rx_bad, 0);
    h_consume_held(h);
    h_finish(h);
}

/* CLOSE after output: the peer reads every byte, then close_notify; when
 * it answers with its own, the flow is released without an error. */
static void tls_close_sends_close_notify(void **state)
{
    (void)state;
    harness *h = &g_h;
    open_tls(h);
    h->peer_reading = true;
    assert_true(h_run(h, opened, WAIT_MS));
    h_write_many(h, 512 * 1024, 16 * 1024, 9);
    h_signal(h, MT_FLOW_CLOSE);
    assert_true(h_run(h, peer_closed_seen, WAIT_MS));
    assert_true(h->peer_eof);
    assert_int_equal(h->peer_rx_at_eof, h->out_queued);
    assert_int_equal(h->peer_rx_bad, 0);
    assert_false(h->released); /* waiting for the peer's close_notify */
    assert_int_equal(SSL_shutdown(h->peer_ssl), 1);
    assert_true(h_run(h, released_seen, WAIT_MS));
    assert_int_equal(h->released_err, 0);
    h_finish(h);
}

/* A post-handshake message mid-stream (TLS 1.3 KeyUpdate, the peer asking
 * for one back): the flow's reads take it in stride, its answer goes out
 * with its next write, and data keeps flowing both ways, intact. */
static void tls_key_update_mid_stream(void **state)
{
    (void)state;
    harness *h = &g_h;
    open_tls(h);
    h_reading(h, true);
    h->peer_reading = true;
    h_write_many(h, 256 * 1024, 16 * 1024, 4);
    assert_true(h_run(h, peer_rx_all, WAIT_MS));
    assert_int_equal(SSL_version(h->peer_ssl), TLS1_3_VERSION);
    assert_int_equal(SSL_key_update(h->peer_ssl, SSL_KEY_UPDATE_REQUESTED), 1);
    h_set_in(h, 1024 * 1024, 21); /* the update goes out before this data */
    assert_true(h_run(h, rx_all, WAIT_MS));
    h_write_many(h, 256 * 1024, 16 * 1024, 5);
    assert_true(h_run(h, peer_rx_all, WAIT_MS));
    assert_intact(h);
    h_finish(h);
}

/* TLS 1.2 renegotiation, started by the peer (a server; the flow is the
 * client here) between bursts of data: the flow's reads answer the
 * HelloRequest with a new handshake, the peer sees it complete, and data
 * flows both ways again, intact.  (With data in flight both ways during
 * the new handshake, OpenSSL's own client refuses the interleaved records,
 * "unexpected record", whoever drives it.) */
static bool renegotiated(harness *h) { return SSL_renegotiate_pending(h->peer_ssl) == 0; }

static void tls12_renegotiation_between_bursts(void **state)
{
    (void)state;
    harness *h = &g_h;
    int sv[2];
    assert_int_equal(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv), 0);
    SSL *ssl = client_ssl();
    assert_int_equal(SSL_set_max_proto_version(ssl, TLS1_2_VERSION), 1);
    h_open_tls(h, sv[0], sv[1], ssl, server_ssl());
    h_reading(h, true);
    h->peer_reading = true;
    h_set_in(h, 256 * 1024, 31);
    h_write_many(h, 256 * 1024, 16 * 1024, 32);
    assert_true(h_run(h, rx_all, WAIT_MS));
    assert_true(h_run(h, peer_rx_all, WAIT_MS));
    assert_int_equal(SSL_version(h->peer_ssl), TLS1_2_VERSION);
    assert_int_equal(SSL_renegotiate(h->peer_ssl), 1);
    (void)SSL_do_handshake(h->peer_ssl); /* the HelloRequest goes out */
    assert_true(h_run(h, renegotiated, WAIT_MS));
    assert_int_equal(SSL_num_renegotiations(h->peer_ssl), 1);
    assert_int_equal(h->rx_bad, 0);
    h->rx = 0; /* the next stream */
    h_set_in(h, 1024 * 1024, 33);
    h_write_many(h, 1024 * 1024, 16 * 1024, 34);
    assert_true(h_run(h, rx_all, WAIT_MS));
    assert_true(h_run(h, peer_rx_all, WAIT_MS));
    assert_intact(h);
    h_finish(h);
}

/* The peer's close_notify: EOF for the loop, after the data before it. */
static void tls_peer_close_notify_is_eof(void **state)
{
    (void)state;
    harness *h = &g_h;
    open_tls(h);
    h_reading(h, true);
    h->peer_reading = true;
    h_set_in(h, 100 * 1000, 17);
    assert_true(h_run(h, rx_all, WAIT_MS));
    assert_true(SSL_shutdown(h->peer_ssl) >= 0);
    assert_true(h_run(h, eof_seen, WAIT_MS));
    assert_int_equal(h->data_after_eof, 0);
    assert_int_equal(h->n_read_error, 0);
    /* The loop closes in answer: the flow answers close_notify and goes. */
    h_close_released(h);
    h_finish(h);
}

/* Bytes that are no TLS: OPENED reports the failure (EPROTO, with the
 * error kept for the loop), then RELEASED; no DATA. */
static void tls_handshake_failure(void **state)
{
    (void)state;
    harness *h = &g_h;
    open_tls(h);
    h_reading(h, true);
    SSL_free(h->peer_ssl);
    h->peer_ssl = NULL; /* the peer speaks plain bytes */
    static const char junk[] = "GET / HTTP/1.1\r\nHost: x\r\n\r\n";
    assert_int_equal(send(h->peer, junk, sizeof(junk) - 1, MSG_NOSIGNAL), (ssize_t)sizeof(junk) - 1);
    assert_true(h_run(h, released_seen, WAIT_MS));
    assert_int_equal(h->n_opened, 1);
    assert_int_equal(h->opened_err, EPROTO);
    assert_int_equal(h->n_data, 0);
    assert_true(tls(h)->failed);
    assert_int_equal(tls(h)->error.ssl_error, SSL_ERROR_SSL);
    assert_int_not_equal(tls(h)->error.code, 0);
    h_finish(h);
}

/* ABORT while the handshake waits for the peer: released at once, the SSL
 * freed on the I/O thread (ASan: no leak), no OPENED. */
static void tls_abort_mid_handshake(void **state)
{
    (void)state;
    harness *h = &g_h;
    open_tls(h);
    SSL_free(h->peer_ssl);
    h->peer_ssl = NULL; /* a peer that never says hello */
    h_quiet(h, 20);
    h_signal(h, MT_FLOW_ABORT);
    assert_true(h_run(h, released_seen, WAIT_MS));
    assert_int_equal(h->n_opened, 0);
    assert_null(tls(h)->ssl);
    h_finish(h);
}

/* start_tls(): the plain flow had read the start of the peer's
 * ClientHello before the upgrade.  The TLS flow reads those bytes first,
 * then the rest from the socket: the handshake completes and data flows
 * both ways, intact. */
static void tls_prefix_read_before_the_socket(void **state)
{
    (void)state;
    harness *h = &g_h;
    int sv[2];
    assert_int_equal(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv), 0);
    SSL *peer = client_ssl();
    assert_int_equal(fcntl(sv[1], F_SETFL, O_NONBLOCK), 0);
    assert_int_equal(SSL_set_fd(peer, sv[1]), 1);
    assert_int_equal(SSL_get_error(peer, SSL_do_handshake(peer)), SSL_ERROR_WANT_READ);
    unsigned char prefix[100];
    assert_int_equal(recv(sv[0], prefix, sizeof(prefix), 0), (ssize_t)sizeof(prefix));
    int left = 0;
    assert_int_equal(ioctl(sv[0], FIONREAD, &left), 0);
    assert_true(left > 0); /* the hello's rest waits in the kernel */

    h_open_tls_prefixed(h, sv[0], sv[1], server_ssl(), peer, prefix, sizeof(prefix));
    assert_true(tls(h)->prefixed);
    h_reading(h, true);
    h->peer_reading = true;
    assert_true(h_run(h, opened, WAIT_MS));
    assert_int_equal(h->opened_err, 0);
    h_set_in(h, 512 * 1024 + 3, 41);
    h_write_many(h, 512 * 1024 + 5, 16 * 1024, 42);
    assert_true(h_run(h, rx_all, WAIT_MS));
    assert_true(h_run(h, peer_rx_all, WAIT_MS));
    assert_intact(h);
    h_finish(h);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_teardown(tls_echo_both_ways, h_teardown),
        cmocka_unit_test_teardown(tls_input_held_by_openssl_arrives, h_teardown),
        cmocka_unit_test_teardown(tls_close_sends_close_notify, h_teardown),
        cmocka_unit_test_teardown(tls_peer_close_notify_is_eof, h_teardown),
        cmocka_unit_test_teardown(tls_key_update_mid_stream, h_teardown),
        cmocka_unit_test_teardown(tls12_renegotiation_between_bursts, h_teardown),
        cmocka_unit_test_teardown(tls_handshake_failure, h_teardown),
        cmocka_unit_test_teardown(tls_abort_mid_handshake, h_teardown),
        cmocka_unit_test_teardown(tls_prefix_read_before_the_socket, h_teardown),
    };
    return flow_check_threads(cmocka_run_group_tests(tests, setup, teardown));
}
