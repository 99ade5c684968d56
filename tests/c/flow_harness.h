/* A harness for the flow pump (src/transport/flow_pump.c) over real
 * sockets and a real I/O thread, shared by test_flow.c and
 * test_flow_race.c.
 *
 * The test thread plays the loop half of a stream transport: it signals
 * the flow's control bits, posts WRITE and SENDFILE messages, consumes the
 * sink with the wake protocol, returns read credit with mt_flow_consumed()
 * per DATA completion as stream_core.c does, and lets go of the fd
 * (mt_flow_drop_fd) when it is done.  It also drives the peer end of the
 * socket (non-blocking) from the same poll(). */
#ifndef MT_FLOW_HARNESS_H
#define MT_FLOW_HARNESS_H

#include "test_common.h"

#include "io_threads/runtime.h"
#include "transport/flow.h"
#include "transport/listener.h"
#include "transport/tls.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

/* Not every test file uses every helper. */
#define H_FN static __attribute__((unused))

#define WAIT_MS 5000 /* a wait this long means a lost wakeup or a stuck flow */
#define QUIET_MS MT_TEST_SCALE(40, 120) /* "nothing more happens" windows */

static mt_io_thread *g_io;

enum { SNAP_TRANSPORTS, SNAP_LISTENERS, SNAP_BYTES_READ, SNAP_BYTES_WRITTEN, SNAP_ACCEPTS,
       SNAP_COMMANDS };

H_FN uint64_t snap(int what)
{
    mt_io_snapshot s;
    assert_true(mt_runtime_snapshot(mt_io_thread_index(g_io), &s));
    switch (what) {
    case SNAP_TRANSPORTS: return s.transports;
    case SNAP_LISTENERS: return s.listeners;
    case SNAP_BYTES_READ: return s.bytes_read;
    case SNAP_BYTES_WRITTEN: return s.bytes_written;
    case SNAP_COMMANDS: return s.commands;
    default: return s.accepts;
    }
}

H_FN void fill_pattern(uint8_t *buf, size_t len, uint32_t salt)
{
    uint64_t x = 0x9E3779B97F4A7C15ull ^ salt;
    for (size_t i = 0; i < len; i++) {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        buf[i] = (uint8_t)((x * 0x2545F4914F6CDD1Dull) >> 56);
    }
}

/* mt_runtime_close_sink() on a helper thread, bounded, so that a stuck
 * I/O thread fails the test instead of hanging it.  What a closing loop
 * does before it lets go of its sink: once it returns, the thread is done
 * pushing to the sink. */
typedef struct h_close_args {
    mt_sink *sink;
} h_close_args;

static void *h_close_main(void *arg)
{
    h_close_args *a = arg;
    mt_runtime_close_sink(a->sink, &g_io, 1);
    return NULL;
}

H_FN void sink_barrier(mt_sink *sink)
{
    h_close_args a = {.sink = sink};
    pthread_t th;
    assert_int_equal(pthread_create(&th, NULL, h_close_main, &a), 0);
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    ts.tv_sec += WAIT_MS / 1000;
    if (pthread_timedjoin_np(th, NULL, &ts) != 0)
        fail_msg("mt_runtime_close_sink did not return within %d ms", WAIT_MS);
}

H_FN bool fd_open(int fd)
{
    return fcntl(fd, F_GETFD) >= 0;
}

/* ---- the harness: a flow, its sink, and the peer -------------------------- */

typedef struct harness {
    mt_sink *sink;
    mt_flow *f;
    int fd;          /* the flow's (it owns it) */
    int peer;        /* the test's half, non-blocking; -1 once closed */
    bool fd_dropped; /* the loop half let go of the fd */
    bool fd_reused;  /* the test gave the closed number to another socket */

    /* Peer -> flow: what the peer sends, what arrived as DATA. */
    uint8_t *in;
    size_t in_len;     /* bytes the peer is to send */
    size_t in_sent;    /* bytes the peer has sent */
    size_t in_chunk;   /* largest single send */
    size_t rx;         /* bytes delivered in DATA */
    size_t rx_bad;     /* delivered bytes that differ from `in` */
    bool auto_credit;  /* consume DATA at once and return credit */
    int credits_signalled;
    int64_t charged;   /* read credit charged for DATA not consumed yet */
    size_t *held;      /* lengths of DATA not consumed yet (!auto_credit) */
    size_t nheld, held_cap;

    /* Flow -> peer: what the test queued (the expected stream), what the
     * peer read. */
    uint8_t *out;
    size_t out_cap;
    size_t out_queued;
    bool peer_reading;
    size_t peer_rx;
    size_t peer_rx_bad;
    bool peer_eof;
    size_t peer_rx_at_eof;
    int peer_err;

    /* The peer is a pipe's other end (read() and write(), not recv/send). */
    bool peer_pipe;

    /* A TLS flow's peer speaks TLS through this SSL (NULL: plain). */
    SSL *peer_ssl;
    bool peer_handshaken;
    int peer_ssl_err;     /* a failure of the peer's SSL (SSL_get_error) */

    /* Completions. */
    int n_data, n_eof, n_read_error, n_write_error, n_drained, n_blocked, n_sendfile,
        n_released, n_opened, n_other;
    int read_err, write_err, released_err, sendfile_err, opened_err;
    int data_before_opened;
    bool write_error_before_drained; /* the first DRAINED came after a WRITE_ERROR */
    size_t sendfile_sent;
    uint64_t drained_flushed, released_flushed;
    int after_released;   /* completions after RELEASED (but REF_DONE) */
    int n_ref_done, ref_done_after_released;
    uintptr_t ref_done_owners; /* the sum of the owners REF_DONE gave back */
    int data_after_eof;   /* DATA after EOF or a read error */
    int bad_source;
    bool released;        /* RELEASED seen */

    /* The wake protocol. */
    uint64_t blocks, lost;
} harness;

/* Tests use this one (not a local), so that the teardown can clean up
 * after a failed assertion instead of leaving an attached flow to break
 * the next tests. */
static harness g_h;

H_FN void h_signal(harness *h, uint32_t bits)
{
    assert_true(mt_record_signal(&h->f->rec, bits));
}

H_FN void h_post_msg(harness *h, mt_msg *msg)
{
    assert_non_null(msg);
    assert_true(mt_io_thread_post(h->f->rec.io, msg, msg));
}

H_FN void h_reading(harness *h, bool on)
{
    atomic_store(&h->f->want_read, on);
    h_signal(h, MT_FLOW_READING);
}

/* What every flow of the harness starts with: both ends non-blocking, a
 * sink, nothing received or sent. */
H_FN void h_init(harness *h, int fd, int peer, size_t in_chunk)
{
    memset(h, 0, sizeof(*h));
    h->fd = fd;
    h->peer = peer;
    h->in_chunk = in_chunk;
    h->auto_credit = true;
    assert_int_equal(fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK), 0);
    assert_int_equal(fcntl(peer, F_SETFL, fcntl(peer, F_GETFL) | O_NONBLOCK), 0);
    h->sink = mt_sink_new();
    assert_non_null(h->sink);
}

/* The flow takes fd and runs it with `ops`; both ends are made
 * non-blocking. */
H_FN void h_open_ops(harness *h, const mt_fd_ops *ops, int fd, int peer)
{
    h_init(h, fd, peer, 48 * 1024);
    h->f = mt_flow_new(ops, NULL, h->sink, g_io, fd);
    assert_non_null(h->f);
    assert_int_equal(h->f->fd, fd);
    assert_int_equal(atomic_load(&h->f->fd_holds), 2);
    assert_int_equal(atomic_load(&h->f->rec.refs), 1);
    assert_int_equal(atomic_load(&h->sink->refs), 2);
    h_signal(h, MT_FLOW_ATTACH);
}

/* A TLS flow around fd with `ssl` (which it takes), reading `prefix`
 * first (mt_tls_flow_new), its peer speaking TLS through `peer_ssl` (freed
 * by h_finish) in records of 16 KiB. */
H_FN void h_open_tls_prefixed(harness *h, int fd, int peer, SSL *ssl, SSL *peer_ssl,
                              const void *prefix, size_t prefix_len)
{
    h_init(h, fd, peer, 16 * 1024);
    mt_tls_flow *t = mt_tls_flow_new(ssl, prefix, prefix_len, NULL, h->sink, g_io, fd);
    assert_non_null(t);
    h->f = &t->flow;
    h->peer_ssl = peer_ssl;
    SSL_set_mode(peer_ssl, SSL_MODE_ENABLE_PARTIAL_WRITE | SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER);
    assert_int_equal(SSL_set_fd(peer_ssl, peer), 1);
    h_signal(h, MT_FLOW_ATTACH);
}

H_FN void h_open_tls(harness *h, int fd, int peer, SSL *ssl, SSL *peer_ssl)
{
    h_open_tls_prefixed(h, fd, peer, ssl, peer_ssl, NULL, 0);
}

H_FN void h_open_fds(harness *h, int fd, int peer)
{
    h_open_ops(h, &mt_socket_fd_ops, fd, peer);
}

H_FN void h_open(harness *h)
{
    int sv[2];
    assert_int_equal(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv), 0);
    h_open_fds(h, sv[0], sv[1]);
}

/* Tests that need the output (or the peer's input) to stall pin the send
 * buffer, rather than depend on net.core.wmem_default. */
H_FN void set_sndbuf(int fd, int bytes)
{
    assert_int_equal(setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &bytes, sizeof(bytes)), 0);
}

H_FN void h_set_in(harness *h, size_t len, uint32_t salt)
{
    free(h->in);
    h->in = malloc(len ? len : 1);
    assert_non_null(h->in);
    fill_pattern(h->in, len, salt);
    h->in_len = len;
    h->in_sent = 0;
}

H_FN void h_reserve_out(harness *h, size_t cap)
{
    if (cap <= h->out_cap)
        return;
    size_t n = h->out_cap ? h->out_cap : 64 * 1024;
    while (n < cap)
        n *= 2;
    h->out = realloc(h->out, n);
    assert_non_null(h->out);
    h->out_cap = n;
}

/* Makes a WRITE of `len` bytes of a fresh pattern, recorded as expected. */
H_FN mt_msg *h_make_write(harness *h, size_t len, uint32_t salt)
{
    h_reserve_out(h, h->out_queued + len);
    fill_pattern(h->out + h->out_queued, len, salt);
    mt_msg *msg = mt_msg_new(MT_FLOW_WRITE, &h->f->rec, len);
    assert_non_null(msg);
    memcpy(mt_msg_data(msg), h->out + h->out_queued, len);
    h->out_queued += len;
    return msg;
}

/* Makes a WRITE_REF of buf[0:len] (recorded as expected), sent from buf,
 * which must stay as it is until REF_DONE; `owner` is what REF_DONE gives
 * back. */
H_FN mt_msg *h_make_write_ref(harness *h, const uint8_t *buf, size_t len, uintptr_t owner)
{
    h_reserve_out(h, h->out_queued + len);
    memcpy(h->out + h->out_queued, buf, len);
    h->out_queued += len;
    mt_msg *msg = mt_msg_new(MT_FLOW_WRITE_REF, &h->f->rec, sizeof(mt_flow_write_ref));
    assert_non_null(msg);
    ((mt_flow_write_ref *)mt_msg_data(msg))->data = (const char *)buf;
    ((mt_flow_write_ref *)mt_msg_data(msg))->owner = (void *)owner;
    msg->len = len;
    return msg;
}

/* Expects the peer to read these bytes next (e.g. a file slice). */
H_FN void h_expect_out(harness *h, const uint8_t *data, size_t len)
{
    h_reserve_out(h, h->out_queued + len);
    memcpy(h->out + h->out_queued, data, len);
    h->out_queued += len;
}

/* Posts writes of about `total` bytes in chains of 1..16 messages of
 * 1..max_chunk bytes. */
H_FN void h_write_many(harness *h, size_t total, size_t max_chunk, uint64_t seed)
{
    mt_test_rng rng;
    mt_test_rng_seed(&rng, seed);
    size_t done = 0;
    while (done < total) {
        uint32_t k = 1 + (uint32_t)mt_test_rng_below(&rng, 16);
        mt_msg *first = NULL, *last = NULL;
        for (uint32_t j = 0; j < k && done < total; j++) {
            size_t len = 1 + (size_t)mt_test_rng_below(&rng, max_chunk);
            if (len > total - done)
                len = total - done;
            mt_msg *m = h_make_write(h, len, (uint32_t)mt_test_rng_next(&rng));
            if (last)
                atomic_store_explicit(&last->node.next, &m->node, memory_order_relaxed);
            else
                first = m;
            last = m;
            done += len;
        }
        assert_true(mt_io_thread_post(g_io, first, last));
    }
}

H_FN uint64_t h_flushed(harness *h)
{
    return atomic_load(&h->f->marks.flushed);
}

H_FN int64_t h_used(harness *h)
{
    return atomic_load(&h->f->read_credit.used);
}

/* Gives back one DATA completion's credit as stream_core.c does. */
H_FN void h_consume(harness *h, size_t n)
{
    h->charged -= mt_read_charge(n);
    if (mt_flow_consumed(h->f, n)) {
        h_signal(h, MT_FLOW_CREDIT);
        h->credits_signalled++;
    }
}

/* Consumes every held DATA; returns how many consumptions asked for a
 * CREDIT signal. */
H_FN int h_consume_held(harness *h)
{
    int before = h->credits_signalled;
    for (size_t i = 0; i < h->nheld; i++)
        h_consume(h, h->held[i]);
    h->nheld = 0;
    return h->credits_signalled - before;
}

H_FN void h_handle(harness *h, mt_msg *d)
{
    if (d->rec != &h->f->rec)
        h->bad_source++;
    if (h->released && d->op != MT_FLOW_REF_DONE) /* the one that may follow */
        h->after_released++;
    switch (d->op) {
    case MT_FLOW_REF_DONE:
        h->n_ref_done++;
        h->ref_done_owners += (uintptr_t)((mt_flow_write_ref *)mt_msg_data(d))->owner;
        if (h->released)
            h->ref_done_after_released++;
        break;
    case MT_FLOW_OPENED:
        h->n_opened++;
        h->opened_err = d->err;
        break;
    case MT_FLOW_DATA: {
        h->n_data++;
        if (h->peer_ssl != NULL && h->n_opened == 0)
            h->data_before_opened++;
        if (h->n_eof || h->n_read_error)
            h->data_after_eof++;
        const uint8_t *p = mt_msg_data(d);
        for (size_t i = 0; i < d->len; i++)
            if (h->rx + i >= h->in_len || p[i] != h->in[h->rx + i])
                h->rx_bad++;
        h->rx += d->len;
        h->charged += mt_read_charge(d->len);
        if (h->auto_credit) {
            h_consume(h, d->len);
        } else {
            if (h->nheld == h->held_cap) {
                h->held_cap = h->held_cap ? 2 * h->held_cap : 64;
                h->held = realloc(h->held, h->held_cap * sizeof(*h->held));
                assert_non_null(h->held);
            }
            h->held[h->nheld++] = d->len;
        }
        break;
    }
    case MT_FLOW_EOF:
        h->n_eof++;
        break;
    case MT_FLOW_READ_ERROR:
        h->n_read_error++;
        h->read_err = d->err;
        break;
    case MT_FLOW_WRITE_ERROR:
        h->n_write_error++;
        h->write_err = d->err;
        break;
    case MT_FLOW_DRAINED:
        if (h->n_drained == 0 && h->n_write_error > 0)
            h->write_error_before_drained = true;
        h->n_drained++;
        h->drained_flushed = h_flushed(h);
        break;
    case MT_FLOW_BLOCKED:
        h->n_blocked++;
        break;
    case MT_FLOW_SENDFILE_DONE:
        h->n_sendfile++;
        h->sendfile_err = d->err;
        if (d->len == sizeof(mt_flow_sendfile_done))
            h->sendfile_sent = ((mt_flow_sendfile_done *)mt_msg_data(d))->sent;
        else
            h->bad_source++;
        break;
    case MT_OP_RELEASED:
        h->n_released++;
        h->released = true;
        h->released_err = d->err;
        h->released_flushed = h_flushed(h);
        if (d != &h->f->rec.released)
            h->bad_source++;
        break;
    default:
        h->n_other++;
    }
    mt_msg_free(d);
}

H_FN void h_drain_sink(harness *h)
{
    for (;;) {
        mt_msg *d = mt_sink_pop(h->sink);
        if (d != NULL) {
            h_handle(h, d);
            continue;
        }
        if (mt_mpsc_queue_is_empty(&h->sink->queue))
            return;
        sched_yield(); /* a push is half-way */
    }
}

/* The peer's side of a TLS flow: handshake, then what h_peer_io does, in
 * records. */
H_FN void h_peer_tls_io(harness *h)
{
    SSL *ssl = h->peer_ssl;
    if (h->peer_ssl_err)
        return;
    if (!h->peer_handshaken) {
        int rc = SSL_do_handshake(ssl);
        if (rc != 1) {
            int e = SSL_get_error(ssl, rc);
            if (e != SSL_ERROR_WANT_READ && e != SSL_ERROR_WANT_WRITE)
                h->peer_ssl_err = e;
            return;
        }
        h->peer_handshaken = true;
    }
    while (h->in_sent < h->in_len) {
        size_t len = h->in_len - h->in_sent < h->in_chunk ? h->in_len - h->in_sent : h->in_chunk;
        int n = SSL_write(ssl, h->in + h->in_sent, (int)len);
        if (n > 0) {
            h->in_sent += (size_t)n;
            continue;
        }
        int e = SSL_get_error(ssl, n);
        if (e != SSL_ERROR_WANT_READ && e != SSL_ERROR_WANT_WRITE)
            h->peer_ssl_err = e;
        break;
    }
    static uint8_t buf[64 * 1024];
    while (h->peer_reading && !h->peer_eof && !h->peer_ssl_err) {
        int n = SSL_read(ssl, buf, sizeof(buf));
        if (n > 0) {
            for (int i = 0; i < n; i++)
                if (h->peer_rx + (size_t)i >= h->out_queued ||
                    buf[i] != h->out[h->peer_rx + (size_t)i])
                    h->peer_rx_bad++;
            h->peer_rx += (size_t)n;
            continue;
        }
        int e = SSL_get_error(ssl, n);
        if (e == SSL_ERROR_ZERO_RETURN) {
            h->peer_eof = true; /* close_notify */
            h->peer_rx_at_eof = h->peer_rx;
        } else if (e != SSL_ERROR_WANT_READ && e != SSL_ERROR_WANT_WRITE) {
            h->peer_ssl_err = e;
        }
        break;
    }
}

H_FN void h_peer_io(harness *h)
{
    if (h->peer < 0)
        return;
    if (h->peer_ssl != NULL) {
        h_peer_tls_io(h);
        return;
    }
    while (h->in_sent < h->in_len) {
        size_t len = h->in_len - h->in_sent;
        if (len > h->in_chunk)
            len = h->in_chunk;
        ssize_t n = h->peer_pipe
                        ? write(h->peer, h->in + h->in_sent, len)
                        : send(h->peer, h->in + h->in_sent, len, MSG_NOSIGNAL | MSG_DONTWAIT);
        if (n > 0) {
            h->in_sent += (size_t)n;
            continue;
        }
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK)
            h->peer_err = errno;
        break;
    }
    static uint8_t buf[256 * 1024];
    while (h->peer_reading && !h->peer_eof && h->peer_err == 0) {
        ssize_t n = h->peer_pipe ? read(h->peer, buf, sizeof(buf))
                                 : recv(h->peer, buf, sizeof(buf), MSG_DONTWAIT);
        if (n > 0) {
            for (ssize_t i = 0; i < n; i++)
                if (h->peer_rx + (size_t)i >= h->out_queued ||
                    buf[i] != h->out[h->peer_rx + (size_t)i])
                    h->peer_rx_bad++;
            h->peer_rx += (size_t)n;
            continue;
        }
        if (n == 0) {
            h->peer_eof = true;
            h->peer_rx_at_eof = h->peer_rx;
            break;
        }
        if (errno == EINTR)
            continue;
        if (errno != EAGAIN && errno != EWOULDBLOCK)
            h->peer_err = errno;
        break;
    }
}

typedef bool (*h_cond)(harness *h);

H_FN bool never(harness *h)
{
    (void)h;
    return false;
}

/* Plays the loop and the peer until cond holds (true) or timeout_ms pass
 * (false).  Waits the way a loop does: prepare_sleep, re-check the queue,
 * poll the sink's eventfd (and the peer), awake, drain. */
H_FN bool h_run(harness *h, h_cond cond, int timeout_ms)
{
    double deadline = mt_test_now() + timeout_ms / 1000.0;
    for (;;) {
        h_drain_sink(h);
        h_peer_io(h);
        if (cond(h))
            return true;
        mt_waker_prepare_sleep(&h->sink->waker);
        if (!mt_mpsc_queue_is_empty(&h->sink->queue)) {
            mt_waker_awake(&h->sink->waker);
            continue;
        }
        int left = (int)((deadline - mt_test_now()) * 1000.0);
        if (left <= 0) {
            mt_waker_awake(&h->sink->waker);
            return false;
        }
        struct pollfd p[2] = {{.fd = h->sink->waker.fd, .events = POLLIN}};
        nfds_t np = 1;
        if (h->peer >= 0) {
            short ev = 0;
            if (h->in_sent < h->in_len)
                ev |= POLLOUT;
            if (h->peer_reading && !h->peer_eof && h->peer_err == 0)
                ev |= POLLIN;
            if (ev) {
                p[1] = (struct pollfd){.fd = h->peer, .events = ev};
                np = 2;
            }
        }
        int r = poll(p, np, left);
        mt_waker_awake(&h->sink->waker);
        if (r > 0 && (p[0].revents & POLLIN)) {
            h->blocks++;
            mt_waker_drain(&h->sink->waker);
        } else if (r == 0 && !mt_mpsc_queue_is_empty(&h->sink->queue)) {
            /* Completions queued and nobody woke us: lost, unless they are
             * all quiet ones (REF_DONE), which wake nobody by design. */
            mt_msg *d;
            bool lost = false;
            while ((d = mt_sink_pop(h->sink)) != NULL) {
                lost |= d->op != MT_FLOW_REF_DONE;
                h_handle(h, d);
            }
            h->lost += lost;
        }
    }
}

H_FN void h_quiet(harness *h, int ms)
{
    h_run(h, never, ms);
}

/* Waits until `flushed` stops moving short of `below` (the peer is not
 * reading and the socket is full). */
H_FN uint64_t h_wait_write_stall(harness *h, uint64_t below)
{
    double deadline = mt_test_now() + WAIT_MS / 1000.0;
    uint64_t prev = UINT64_MAX;
    for (;;) {
        h_quiet(h, MT_TEST_SCALE(30, 80));
        uint64_t f = h_flushed(h);
        if (f == prev && f < below)
            return f;
        prev = f;
        if (mt_test_now() > deadline)
            fail_msg("output never stalled (flushed %llu of %llu)", (unsigned long long)f,
                     (unsigned long long)below);
    }
}

H_FN bool released_seen(harness *h) { return h->released; }

/* Waits until the I/O thread has handled every message and signal posted
 * so far: an empty signal queues the control link behind them, and the
 * thread has serviced it once the bits are taken (control back to 0) and
 * the thread then went to sleep (it runs commands only while RUNNING, and
 * announces sleep only after servicing its dirty records).  For tests
 * whose flow is idle by then. */
H_FN void h_sync(harness *h)
{
    assert_true(mt_record_signal(&h->f->rec, 0));
    double deadline = mt_test_now() + WAIT_MS / 1000.0;
    while (atomic_load(&h->f->rec.control) != 0) {
        if (mt_test_now() > deadline)
            fail_msg("the I/O thread never took the control link");
        h_quiet(h, 1);
    }
    while (!mt_io_thread_sleeping(h->f->rec.io)) {
        if (mt_test_now() > deadline)
            fail_msg("the I/O thread never went idle");
        h_quiet(h, 1);
    }
}

/* The I/O thread counts bytes after its sendmsg() returns, possibly after
 * the peer has read them: counters are awaited, not sampled. */
H_FN uint64_t h_wait_snap(harness *h, int what, uint64_t want)
{
    double deadline = mt_test_now() + WAIT_MS / 1000.0;
    while (snap(what) != want && mt_test_now() < deadline)
        h_quiet(h, 1);
    return snap(what);
}

H_FN uint64_t h_wait_flushed(harness *h, uint64_t want)
{
    double deadline = mt_test_now() + WAIT_MS / 1000.0;
    while (h_flushed(h) != want && mt_test_now() < deadline)
        h_quiet(h, 1);
    return h_flushed(h);
}

/* The loop half lets go of the fd (once). */
H_FN void h_drop_fd(harness *h)
{
    if (!h->fd_dropped) {
        h->fd_dropped = true;
        mt_flow_drop_fd(h->f);
    }
}

/* The peer's end and the buffers, once the flow and the sink are gone. */
H_FN void h_free_rest(harness *h)
{
    if (h->peer_ssl != NULL)
        SSL_free(h->peer_ssl);
    if (h->peer >= 0)
        close(h->peer);
    free(h->in);
    free(h->out);
    free(h->held);
    memset(h, 0, sizeof(*h));
}

/* Ends the flow (ABORT unless released already), checks the bookkeeping
 * every test shares, lets go of the fd (which closes it: the I/O thread
 * let go first) and frees everything. */
H_FN void h_finish(harness *h)
{
    if (!h->released) {
        h_signal(h, MT_FLOW_ABORT);
        assert_true(h_run(h, released_seen, WAIT_MS));
    }
    h_quiet(h, 5);
    assert_int_equal(h->n_released, 1);
    assert_int_equal(h->after_released, 0);
    assert_int_equal(h->bad_source, 0);
    assert_int_equal(h->n_other, 0);
    assert_int_equal(h->lost, 0);
    assert_int_equal(h->peer_err, 0);
    assert_int_equal(snap(SNAP_TRANSPORTS), 0);
    /* The I/O thread's hold on the fd went before RELEASED. */
    bool dropped_before = h->fd_dropped;
    assert_int_equal(atomic_load(&h->f->fd_holds), dropped_before ? 0 : 1);
    if (!h->fd_reused)
        assert_true(fd_open(h->fd) != dropped_before);
    h_drop_fd(h);
    assert_int_equal(atomic_load(&h->f->fd_holds), 0);
    if (!h->fd_reused)
        assert_false(fd_open(h->fd));
    /* Delivered DATA was all consumed, so no credit is outstanding. */
    if (h->nheld == 0)
        assert_int_equal(h_used(h), 0);
    /* Once RELEASED is out, nothing but the caller holds the flow. */
    assert_int_equal(atomic_load(&h->f->rec.refs), 1);
    mt_record_decref(&h->f->rec);
    sink_barrier(h->sink);
    assert_int_equal(atomic_load(&h->sink->refs), 1);
    mt_sink_decref(h->sink);
    h_free_rest(h);
}

/* After a failure: abort the flow and free what can be freed. */
H_FN int h_teardown(void **state)
{
    (void)state;
    harness *h = &g_h;
    if (h->f == NULL)
        return 0;
    if (!h->released && mt_record_signal(&h->f->rec, MT_FLOW_ABORT))
        h_run(h, released_seen, 1000);
    h_drain_sink(h);
    h_drop_fd(h);
    mt_record_decref(&h->f->rec);
    sink_barrier(h->sink);
    mt_sink_decref(h->sink);
    h_free_rest(h);
    return 0;
}

H_FN bool rx_all(harness *h) { return h->rx >= h->in_len && h->in_sent == h->in_len; }
H_FN bool sent_all(harness *h) { return h->in_sent >= h->in_len; }
H_FN bool peer_rx_all(harness *h) { return h->peer_rx >= h->out_queued; }
H_FN bool peer_eof_seen(harness *h) { return h->peer_eof; }
H_FN bool eof_seen(harness *h) { return h->n_eof > 0; }
/* EOF, or the reset a Unix socket's peer sees when it is closed with
 * input unread. */
H_FN bool peer_end_seen(harness *h) { return h->peer_eof || h->peer_err == ECONNRESET; }
H_FN bool read_error_seen(harness *h) { return h->n_read_error > 0; }
H_FN bool sendfile_seen(harness *h) { return h->n_sendfile > 0; }
H_FN bool write_error_seen(harness *h) { return h->n_write_error > 0; }
H_FN bool drained_seen(harness *h) { return h->n_drained > 0; }
H_FN bool blocked_seen(harness *h) { return h->n_blocked > 0; }

/* The input ended cleanly: `total` bytes as sent, then one EOF and
 * nothing after it. */
H_FN void h_assert_clean_eof(harness *h, size_t total)
{
    assert_int_equal(h->rx, total);
    assert_int_equal(h->rx_bad, 0);
    assert_int_equal(h->n_eof, 1);
    assert_int_equal(h->n_read_error, 0);
    assert_int_equal(h->data_after_eof, 0);
}

/* The loop closes the flow; RELEASED comes, without an error. */
H_FN void h_close_released(harness *h)
{
    h_signal(h, MT_FLOW_CLOSE);
    assert_true(h_run(h, released_seen, WAIT_MS));
    assert_int_equal(h->released_err, 0);
}

/* A connected TCP pair over loopback (for resets, which a Unix socketpair
 * does not have). */
H_FN void tcp_pair(int *a, int *b)
{
    int lfd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    assert_true(lfd >= 0);
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    assert_int_equal(bind(lfd, (struct sockaddr *)&sa, sizeof(sa)), 0);
    assert_int_equal(listen(lfd, 4), 0);
    socklen_t sl = sizeof(sa);
    assert_int_equal(getsockname(lfd, (struct sockaddr *)&sa, &sl), 0);
    int cfd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    assert_true(cfd >= 0);
    assert_int_equal(connect(cfd, (struct sockaddr *)&sa, sizeof(sa)), 0);
    int afd = accept4(lfd, NULL, NULL, SOCK_CLOEXEC);
    assert_true(afd >= 0);
    close(lfd);
    *a = cfd;
    *b = afd;
}

H_FN int flow_setup(void **state)
{
    (void)state;
    mt_runtime_init();
    return mt_runtime_acquire(1, &g_io);
}

H_FN int flow_teardown(void **state)
{
    (void)state;
    mt_runtime_shutdown();
    if (g_io != NULL)
        mt_io_thread_decref(g_io);
    g_io = NULL;
    return 0;
}

/* For main, after the group ran: every flow and listener is gone, so is
 * every thread they held (cmocka 1.1 does not fail the run for a failed
 * group teardown). */
H_FN int flow_check_threads(int rc)
{
    int left = mt_runtime_threads_allocated();
    if (left != 0) {
        print_error("%d I/O thread records still allocated at the end\n", left);
        return rc ? rc : 1;
    }
    return rc;
}

#endif
