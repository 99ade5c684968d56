/* Unit tests for the I/O-thread halves of stream transports
 * (src/transport/stream_io.c) and listeners (src/transport/listener_io.c),
 * over real sockets and a real I/O thread.
 *
 * The test thread plays the loop: it posts commands, consumes the sink with
 * the wake protocol, returns read credit as stream_core.c does, and drives
 * the peer end of the socket (non-blocking) from the same poll(). */
#include "test_common.h"

#include "io_threads/runtime.h"
#include "transport/listener.h"
#include "transport/stream.h"

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

#define WAIT_MS 5000 /* a wait this long means a lost wakeup or a stuck stream */
#define QUIET_MS MT_TEST_SCALE(40, 120) /* "nothing more happens" windows */

static mt_io_thread *g_io;

static uint64_t snap(int what)
{
    mt_io_snapshot s;
    assert_true(mt_runtime_snapshot(mt_io_thread_index(g_io), &s));
    switch (what) {
    case 0: return s.transports;
    case 1: return s.listeners;
    case 2: return s.bytes_read;
    case 3: return s.bytes_written;
    case 5: return s.commands;
    default: return s.accepts;
    }
}
#define SNAP_TRANSPORTS 0
#define SNAP_LISTENERS 1
#define SNAP_BYTES_READ 2
#define SNAP_BYTES_WRITTEN 3
#define SNAP_ACCEPTS 4
#define SNAP_COMMANDS 5

static void fill_pattern(uint8_t *buf, size_t len, uint32_t salt)
{
    uint64_t x = 0x9E3779B97F4A7C15ull ^ salt;
    for (size_t i = 0; i < len; i++) {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        buf[i] = (uint8_t)((x * 0x2545F4914F6CDD1Dull) >> 56);
    }
}

/* What a closing loop does before it lets go of its sink: SINK_CLOSE to
 * the thread, and wait.  Once the latch opens, the thread is done pushing
 * to the sink (see test_runtime.c, test_push_keeps_sink_alive, for what
 * happens without it). */
static void sink_barrier(mt_sink *sink)
{
    mt_latch latch;
    mt_latch_init(&latch);
    mt_latch_add(&latch);
    mt_cmd *cmd = mt_cmd_new(MT_CMD_SINK_CLOSE, sink, 0);
    assert_non_null(cmd);
    cmd->latch = &latch;
    if (!mt_io_thread_post(g_io, cmd, cmd)) {
        mt_cmd_free(cmd);
        mt_latch_done(&latch);
    }
    /* Bounded, so that a stuck thread fails the test instead of hanging. */
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    ts.tv_sec += WAIT_MS / 1000;
    pthread_mutex_lock(&latch.mu);
    int rc = 0;
    while (latch.pending > 0 && rc != ETIMEDOUT)
        rc = pthread_cond_timedwait(&latch.cv, &latch.mu, &ts);
    int pending = latch.pending;
    pthread_mutex_unlock(&latch.mu);
    if (pending > 0)
        fail_msg("SINK_CLOSE was not acknowledged within %d ms", WAIT_MS);
    mt_latch_destroy(&latch);
}

static bool fd_open(int fd)
{
    return fcntl(fd, F_GETFD) >= 0;
}

/* ---- the harness: a stream, its sink, and the peer ------------------------ */

typedef struct harness {
    mt_sink *sink;
    mt_stream *s;
    int fd;   /* the I/O thread's half */
    int peer; /* the test's half, non-blocking; -1 once closed */

    /* Peer -> stream: what the peer sends, what arrived as DATA. */
    uint8_t *in;
    size_t in_len;     /* bytes the peer is to send */
    size_t in_sent;    /* bytes the peer has sent */
    size_t in_chunk;   /* largest single send */
    size_t rx;         /* bytes delivered in DATA */
    size_t rx_bad;     /* delivered bytes that differ from `in` */
    bool auto_credit;  /* consume DATA at once and return credit */
    int credits_posted;

    /* Stream -> peer: what the test queued (the expected stream), what
     * the peer read. */
    uint8_t *out;
    size_t out_cap;
    size_t out_queued;
    bool peer_reading;
    size_t peer_rx;
    size_t peer_rx_bad;
    bool peer_eof;
    size_t peer_rx_at_eof;
    int peer_err;

    /* Completions. */
    int n_data, n_eof, n_read_error, n_write_error, n_drained, n_sendfile, n_closed;
    int read_err, write_err, closed_err, sendfile_err;
    size_t sendfile_len;
    uint64_t drained_flushed, closed_flushed;
    int after_closed;     /* completions after CLOSED */
    int data_after_eof;   /* DATA after EOF or a read error */
    int bad_source;
    bool closed;          /* CLOSED seen */

    /* The wake protocol. */
    uint64_t blocks, lost;

    /* Commands posted to the thread since it counted cmd_base. */
    uint64_t cmd_base, posted;
} harness;

/* Tests use this one (not a local), so that the teardown can clean up
 * after a failed assertion instead of leaving an attached stream to break
 * the next tests. */
static harness g_h;

static void h_post_cmd(harness *h, mt_cmd *cmd)
{
    assert_non_null(cmd);
    assert_true(mt_io_thread_post(h->s->obj.io, cmd, cmd));
    h->posted++;
}

static void h_post(harness *h, mt_cmd_kind kind)
{
    mt_cmd *cmd = mt_cmd_new(kind, &h->s->obj, 0);
    assert_non_null(cmd);
    h_post_cmd(h, cmd);
}

/* The stream takes (fd, peer); the peer side is made non-blocking. */
static void h_open_fds(harness *h, int fd, int peer)
{
    memset(h, 0, sizeof(*h));
    h->fd = fd;
    h->peer = peer;
    h->in_chunk = 48 * 1024;
    h->auto_credit = true;
    assert_int_equal(fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK), 0);
    assert_int_equal(fcntl(peer, F_SETFL, fcntl(peer, F_GETFL) | O_NONBLOCK), 0);
    h->sink = mt_sink_new();
    assert_non_null(h->sink);
    h->s = mt_stream_new(h->sink, g_io, fd);
    assert_non_null(h->s);
    assert_int_equal(h->s->fd, fd);
    assert_int_equal(atomic_load(&h->sink->refs), 2);
    h->cmd_base = snap(SNAP_COMMANDS);
    h_post(h, MT_CMD_STREAM_ATTACH);
}

static void h_open(harness *h)
{
    int sv[2];
    assert_int_equal(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv), 0);
    h_open_fds(h, sv[0], sv[1]);
}

/* Tests that need the output (or the peer's input) to stall pin the send
 * buffer, rather than depend on net.core.wmem_default. */
static void set_sndbuf(int fd, int bytes)
{
    assert_int_equal(setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &bytes, sizeof(bytes)), 0);
}

static void h_set_in(harness *h, size_t len, uint32_t salt)
{
    free(h->in);
    h->in = malloc(len ? len : 1);
    assert_non_null(h->in);
    fill_pattern(h->in, len, salt);
    h->in_len = len;
    h->in_sent = 0;
}

static void h_reserve_out(harness *h, size_t cap)
{
    if (cap <= h->out_cap)
        return;
    h->out = realloc(h->out, cap);
    assert_non_null(h->out);
    h->out_cap = cap;
}

/* Makes a WRITE of `len` bytes of a fresh pattern, recorded as expected. */
static mt_cmd *h_make_write(harness *h, size_t len, uint32_t salt)
{
    h_reserve_out(h, h->out_queued + len);
    fill_pattern(h->out + h->out_queued, len, salt);
    mt_cmd *cmd = mt_cmd_new(MT_CMD_STREAM_WRITE, &h->s->obj, len);
    assert_non_null(cmd);
    memcpy(cmd->data, h->out + h->out_queued, len);
    h->out_queued += len;
    return cmd;
}

/* Expects the peer to read these bytes next (e.g. a file slice). */
static void h_expect_out(harness *h, const uint8_t *data, size_t len)
{
    h_reserve_out(h, h->out_queued + len);
    memcpy(h->out + h->out_queued, data, len);
    h->out_queued += len;
}

/* Posts writes of about `total` bytes in chains of 1..16 commands of
 * 1..max_chunk bytes. */
static void h_write_many(harness *h, size_t total, size_t max_chunk, uint64_t seed)
{
    mt_test_rng rng;
    mt_test_rng_seed(&rng, seed);
    size_t done = 0;
    while (done < total) {
        uint32_t k = 1 + (uint32_t)mt_test_rng_below(&rng, 16);
        mt_cmd *first = NULL, *last = NULL;
        for (uint32_t j = 0; j < k && done < total; j++) {
            size_t len = 1 + (size_t)mt_test_rng_below(&rng, max_chunk);
            if (len > total - done)
                len = total - done;
            mt_cmd *c = h_make_write(h, len, (uint32_t)mt_test_rng_next(&rng));
            if (last)
                atomic_store_explicit(&last->node.next, &c->node, memory_order_relaxed);
            else
                first = c;
            last = c;
            done += len;
            h->posted++;
        }
        assert_true(mt_io_thread_post(g_io, first, last));
    }
}

static uint64_t h_flushed(harness *h)
{
    return atomic_load(&h->s->flushed);
}

/* Gives back `n` delivered bytes as stream_core.c does. */
static void h_return_credit(harness *h, size_t n)
{
    mt_stream *s = h->s;
    int64_t left = atomic_fetch_sub(&s->unconsumed, (int64_t)n) - (int64_t)n;
    if (left >= MT_READ_CREDIT / 2)
        return;
    if (atomic_load(&s->read_starved) && atomic_exchange(&s->read_starved, false)) {
        h_post(h, MT_CMD_STREAM_CREDIT);
        h->credits_posted++;
    }
}

static void h_handle(harness *h, mt_done *d)
{
    if (d->source != &h->s->obj)
        h->bad_source++;
    if (h->closed)
        h->after_closed++;
    switch (d->kind) {
    case MT_DONE_DATA:
        h->n_data++;
        if (h->n_eof || h->n_read_error)
            h->data_after_eof++;
        for (size_t i = 0; i < d->len; i++)
            if (h->rx + i >= h->in_len || (uint8_t)d->data[i] != h->in[h->rx + i])
                h->rx_bad++;
        h->rx += d->len;
        if (h->auto_credit)
            h_return_credit(h, d->len);
        break;
    case MT_DONE_EOF:
        h->n_eof++;
        break;
    case MT_DONE_READ_ERROR:
        h->n_read_error++;
        h->read_err = d->err;
        break;
    case MT_DONE_WRITE_ERROR:
        h->n_write_error++;
        h->write_err = d->err;
        break;
    case MT_DONE_DRAINED:
        h->n_drained++;
        h->drained_flushed = h_flushed(h);
        break;
    case MT_DONE_SENDFILE:
        h->n_sendfile++;
        h->sendfile_len = d->len;
        h->sendfile_err = d->err;
        break;
    case MT_DONE_CLOSED:
        h->n_closed++;
        h->closed = true;
        h->closed_err = d->err;
        h->closed_flushed = h_flushed(h);
        break;
    default:
        h->bad_source++;
    }
    mt_done_free(d);
}

static void h_drain_sink(harness *h)
{
    for (;;) {
        mt_mpsc_node *n = mt_mpsc_queue_pop(&h->sink->queue);
        if (n != NULL) {
            h_handle(h, MT_CONTAINER_OF(n, mt_done, node));
            continue;
        }
        if (mt_mpsc_queue_is_empty(&h->sink->queue))
            return;
        sched_yield(); /* a push is half-way */
    }
}

static void h_peer_io(harness *h)
{
    if (h->peer < 0)
        return;
    while (h->in_sent < h->in_len) {
        size_t len = h->in_len - h->in_sent;
        if (len > h->in_chunk)
            len = h->in_chunk;
        ssize_t n = send(h->peer, h->in + h->in_sent, len, MSG_NOSIGNAL | MSG_DONTWAIT);
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
    while (h->peer_reading && !h->peer_eof) {
        ssize_t n = recv(h->peer, buf, sizeof(buf), MSG_DONTWAIT);
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

static bool never(harness *h)
{
    (void)h;
    return false;
}

/* Plays the loop and the peer until cond holds (true) or timeout_ms pass
 * (false).  Waits the way a loop does: prepare_sleep, re-check the queue,
 * poll the sink's eventfd (and the peer), awake, drain. */
static bool h_run(harness *h, h_cond cond, int timeout_ms)
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
            if (h->peer_reading && !h->peer_eof)
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
            h->lost++; /* completions queued, nobody woke us */
        }
    }
}

static void h_quiet(harness *h, int ms)
{
    h_run(h, never, ms);
}

/* Waits until `flushed` stops moving short of `below` (the peer is not
 * reading and the socket is full). */
static uint64_t h_wait_write_stall(harness *h, uint64_t below)
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

static bool closed_seen(harness *h) { return h->n_closed > 0; }

/* Waits until the I/O thread has run every command posted so far (only
 * for tests that post nothing else to the thread behind the harness). */
static void h_sync(harness *h)
{
    double deadline = mt_test_now() + WAIT_MS / 1000.0;
    while (snap(SNAP_COMMANDS) < h->cmd_base + h->posted && mt_test_now() < deadline)
        mt_test_sleep_us(100);
    assert_int_equal(snap(SNAP_COMMANDS), h->cmd_base + h->posted);
}

/* The I/O thread counts bytes after its sendmsg() returns, possibly after
 * the peer has read them: counters are awaited, not sampled. */
static uint64_t h_wait_snap(harness *h, int what, uint64_t want)
{
    double deadline = mt_test_now() + WAIT_MS / 1000.0;
    while (snap(what) != want && mt_test_now() < deadline)
        h_quiet(h, 1);
    return snap(what);
}

static uint64_t h_wait_flushed(harness *h, uint64_t want)
{
    double deadline = mt_test_now() + WAIT_MS / 1000.0;
    while (h_flushed(h) != want && mt_test_now() < deadline)
        h_quiet(h, 1);
    return h_flushed(h);
}

/* Ends the stream (ABORT unless closed already), checks the bookkeeping
 * every test shares, and frees everything.  close_fd: the test still owns
 * the fd (false when the I/O thread closed it). */
static void h_finish(harness *h, bool close_fd)
{
    if (!h->closed) {
        h_post(h, MT_CMD_STREAM_ABORT);
        assert_true(h_run(h, closed_seen, WAIT_MS));
    }
    h_quiet(h, 5);
    assert_int_equal(h->n_closed, 1);
    assert_int_equal(h->after_closed, 0);
    assert_int_equal(h->bad_source, 0);
    assert_int_equal(h->lost, 0);
    assert_int_equal(h->peer_err, 0);
    assert_int_equal(snap(SNAP_TRANSPORTS), 0);
    /* Once CLOSED is out, nothing but the caller holds the stream. */
    assert_int_equal(atomic_load(&h->s->obj.refs), 1);
    mt_io_obj_decref(&h->s->obj);
    sink_barrier(h->sink);
    assert_int_equal(atomic_load(&h->sink->refs), 1);
    mt_sink_decref(h->sink);
    if (close_fd)
        close(h->fd);
    if (h->peer >= 0)
        close(h->peer);
    free(h->in);
    free(h->out);
    memset(h, 0, sizeof(*h));
}

/* After a failure: abort the stream and free what can be freed. */
static int h_teardown(void **state)
{
    (void)state;
    harness *h = &g_h;
    if (h->s == NULL)
        return 0;
    mt_cmd *cmd = mt_cmd_new(MT_CMD_STREAM_ABORT, &h->s->obj, 0);
    if (!h->closed && mt_io_thread_post(h->s->obj.io, cmd, cmd))
        h_run(h, closed_seen, 1000);
    else
        mt_cmd_free(cmd);
    h_drain_sink(h);
    mt_io_obj_decref(&h->s->obj);
    sink_barrier(h->sink);
    mt_sink_decref(h->sink);
    if (fd_open(h->fd))
        close(h->fd);
    if (h->peer >= 0)
        close(h->peer);
    free(h->in);
    free(h->out);
    memset(h, 0, sizeof(*h));
    return 0;
}

static bool rx_all(harness *h) { return h->rx >= h->in_len && h->in_sent == h->in_len; }
static bool sent_all(harness *h) { return h->in_sent >= h->in_len; }
static bool peer_rx_all(harness *h) { return h->peer_rx >= h->out_queued; }
static bool peer_eof_seen(harness *h) { return h->peer_eof; }
static bool eof_seen(harness *h) { return h->n_eof > 0; }
static bool read_error_seen(harness *h) { return h->n_read_error > 0; }
static bool sendfile_seen(harness *h) { return h->n_sendfile > 0; }
static bool write_error_seen(harness *h) { return h->n_write_error > 0; }

/* ---- reading --------------------------------------------------------------- */

/* Several MB from the peer arrive as DATA, byte for byte, in order. */
static void test_read_exact(void **state)
{
    (void)state;
    harness *h = &g_h;
    h_open(h);
    uint64_t read_before = snap(SNAP_BYTES_READ);
    size_t total = MT_TEST_SCALE(6, 2) * 1024 * 1024 + 12345;
    h_set_in(h, total, 1);
    h->in_chunk = 100 * 1024;
    h_post(h, MT_CMD_STREAM_READ_ON);
    assert_true(h_run(h, rx_all, 4 * WAIT_MS));
    h_quiet(h, 5);
    assert_int_equal(h->rx, total);
    assert_int_equal(h->rx_bad, 0);
    assert_int_equal(h->n_eof + h->n_read_error, 0);
    assert_int_equal(atomic_load(&h->s->unconsumed), 0);
    assert_int_equal(snap(SNAP_BYTES_READ) - read_before, total);
    assert_int_equal(snap(SNAP_TRANSPORTS), 1);
    print_message("%zu bytes in %d DATA completions, %llu wakeups, %d credit returns\n", h->rx,
                  h->n_data, (unsigned long long)atomic_load(&h->sink->waker.wakeups_sent),
                  h->credits_posted);
    h_finish(h, true);
}

/* Reading stays off until READ_ON, and READ_OFF stops it. */
static void test_read_on_off(void **state)
{
    (void)state;
    harness *h = &g_h;
    h_open(h);
    h_set_in(h, 1000, 2);
    h_quiet(h, QUIET_MS);
    assert_int_equal(h->in_sent, 1000);
    assert_int_equal(h->n_data, 0); /* ATTACH alone does not read */
    h_post(h, MT_CMD_STREAM_READ_ON);
    assert_true(h_run(h, rx_all, WAIT_MS));
    h_post(h, MT_CMD_STREAM_READ_OFF);
    h_sync(h);
    /* What the peer sends now stays in the socket... */
    free(h->in);
    h->in = malloc(3000);
    fill_pattern(h->in, 3000, 2);
    h->in_len = 3000;
    h_quiet(h, QUIET_MS);
    assert_int_equal(h->in_sent, 3000);
    assert_int_equal(h->rx, 1000);
    /* ...until reading is back on. */
    h_post(h, MT_CMD_STREAM_READ_ON);
    assert_true(h_run(h, rx_all, WAIT_MS));
    assert_int_equal(h->rx, 3000);
    assert_int_equal(h->rx_bad, 0);
    h_finish(h, true);
}

static bool starved(harness *h)
{
    return atomic_load(&h->s->read_starved);
}

/* Unconsumed data stops the reader at the credit limit: the peer's sends
 * then fail with EAGAIN; handing the credit back resumes reading. */
static void test_read_credit(void **state)
{
    (void)state;
    harness *h = &g_h;
    h_open(h);
    set_sndbuf(h->peer, 128 * 1024);
    size_t total = 4 * MT_READ_CREDIT + 777;
    h_set_in(h, total, 3);
    h->auto_credit = false;
    h_post(h, MT_CMD_STREAM_READ_ON);
    if (!h_run(h, starved, WAIT_MS))
        fail_msg("the reader never ran out of credit (%zu bytes delivered, %zu sent)", h->rx,
                 h->in_sent);
    h_quiet(h, QUIET_MS); /* nothing more arrives */
    size_t delivered = h->rx;
    print_message("stopped after %zu bytes (credit %d, read size %zu); peer sent %zu of %zu\n",
                  delivered, MT_READ_CREDIT, MT_READ_MAX, h->in_sent, total);
    assert_true(delivered >= MT_READ_CREDIT);
    assert_true(delivered <= MT_READ_CREDIT + MT_READ_MAX);
    assert_int_equal(atomic_load(&h->s->unconsumed), (int64_t)delivered);
    assert_int_equal(h->rx_bad, 0);
    /* The peer is stuck: the socket is full and nobody reads it. */
    assert_true(h->in_sent < total);
    char byte = 0;
    errno = 0;
    assert_int_equal(send(h->peer, &byte, 1, MSG_DONTWAIT | MSG_NOSIGNAL), -1);
    assert_true(errno == EAGAIN || errno == EWOULDBLOCK);
    h_quiet(h, QUIET_MS);
    assert_int_equal(h->rx, delivered);
    assert_true(atomic_load(&h->s->read_starved));

    /* The loop consumes it all: subtract, take the flag, post CREDIT. */
    atomic_fetch_sub(&h->s->unconsumed, (int64_t)delivered);
    assert_true(atomic_exchange(&h->s->read_starved, false));
    h_post(h, MT_CMD_STREAM_CREDIT);
    h->auto_credit = true;
    assert_true(h_run(h, rx_all, WAIT_MS));
    assert_int_equal(h->rx, total);
    assert_int_equal(h->rx_bad, 0);
    assert_int_equal(atomic_load(&h->s->unconsumed), 0);
    h_finish(h, true);
}

/* The peer closes: the data, then one EOF, and nothing after it. */
static void test_peer_close_eof(void **state)
{
    (void)state;
    harness *h = &g_h;
    h_open(h);
    size_t total = 200 * 1024 + 3;
    h_set_in(h, total, 4);
    h_post(h, MT_CMD_STREAM_READ_ON);
    /* Send it all, then close the peer before the stream read it all. */
    assert_true(h_run(h, sent_all, WAIT_MS));
    close(h->peer);
    h->peer = -1;
    assert_true(h_run(h, eof_seen, WAIT_MS));
    h_quiet(h, QUIET_MS);
    assert_int_equal(h->rx, total);
    assert_int_equal(h->rx_bad, 0);
    assert_int_equal(h->n_eof, 1);
    assert_int_equal(h->n_read_error, 0);
    assert_int_equal(h->data_after_eof, 0);
    /* A close with nothing queued: CLOSED at once, the fd still ours. */
    h_post(h, MT_CMD_STREAM_CLOSE);
    assert_true(h_run(h, closed_seen, WAIT_MS));
    assert_int_equal(h->closed_err, 0);
    assert_true(fd_open(h->fd));
    h_finish(h, true);
}

/* The peer resets the connection: READ_ERROR with ECONNRESET. */
static void test_peer_reset(void **state)
{
    (void)state;
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

    harness *h = &g_h;
    h_open_fds(h, cfd, afd);
    h_set_in(h, 10, 5);
    h_post(h, MT_CMD_STREAM_READ_ON);
    assert_true(h_run(h, rx_all, WAIT_MS));
    struct linger lg = {.l_onoff = 1, .l_linger = 0};
    assert_int_equal(setsockopt(h->peer, SOL_SOCKET, SO_LINGER, &lg, sizeof(lg)), 0);
    close(h->peer);
    h->peer = -1;
    assert_true(h_run(h, read_error_seen, WAIT_MS));
    h_quiet(h, QUIET_MS);
    assert_int_equal(h->n_read_error, 1);
    assert_int_equal(h->read_err, ECONNRESET);
    assert_int_equal(h->n_eof, 0);
    assert_int_equal(h->rx, 10);
    /* Writing to the reset connection fails once; the bytes count as
     * flushed, and so does what is written after. */
    h_post_cmd(h, h_make_write(h, 1000, 1));
    assert_true(h_run(h, write_error_seen, WAIT_MS));
    assert_true(h->write_err == EPIPE || h->write_err == ECONNRESET);
    assert_int_equal(h_wait_flushed(h, 1000), 1000);
    h_post_cmd(h, h_make_write(h, 500, 2));
    assert_int_equal(h_wait_flushed(h, 1500), 1500);
    h_quiet(h, QUIET_MS);
    assert_int_equal(h->n_write_error, 1);
    h_finish(h, true);
}

/* ---- writing --------------------------------------------------------------- */

/* WRITE commands reach the peer in order, byte for byte; `flushed` counts
 * them all. */
static void test_write_order(void **state)
{
    (void)state;
    harness *h = &g_h;
    h_open(h);
    uint64_t written_before = snap(SNAP_BYTES_WRITTEN);
    h->peer_reading = true;
    size_t total = MT_TEST_SCALE(6, 2) * 1024 * 1024;
    /* First many tiny ones (more than one sendmsg() iovec batch). */
    mt_cmd *first = NULL, *last = NULL;
    for (int i = 0; i < 300; i++) {
        mt_cmd *c = h_make_write(h, 1 + (size_t)(i % 7), (uint32_t)i);
        if (last)
            atomic_store_explicit(&last->node.next, &c->node, memory_order_relaxed);
        else
            first = c;
        last = c;
    }
    assert_true(mt_io_thread_post(g_io, first, last));
    /* Then chains of all sizes while the peer reads. */
    mt_test_rng rng;
    mt_test_rng_seed(&rng, 11);
    while (h->out_queued < total) {
        h_write_many(h, 64 * 1024 + (size_t)mt_test_rng_below(&rng, 512 * 1024), 96 * 1024,
                     mt_test_rng_next(&rng));
        h_run(h, never, 0);
    }
    assert_true(h_run(h, peer_rx_all, 4 * WAIT_MS));
    h_quiet(h, 5);
    assert_int_equal(h->peer_rx, h->out_queued);
    assert_int_equal(h->peer_rx_bad, 0);
    assert_int_equal(h_wait_flushed(h, h->out_queued), h->out_queued);
    assert_int_equal(h_wait_snap(h, SNAP_BYTES_WRITTEN, written_before + h->out_queued),
                     written_before + h->out_queued);
    assert_int_equal(h->n_write_error, 0);
    assert_int_equal(h->n_drained, 0); /* no mark set */
    h_finish(h, true);
}


/* The peer reads at most `max` bytes (one recv), checking them. */
static void h_peer_read_some(harness *h, size_t max)
{
    static uint8_t buf[64 * 1024];
    if (max > sizeof(buf))
        max = sizeof(buf);
    ssize_t n = recv(h->peer, buf, max, MSG_DONTWAIT);
    for (ssize_t i = 0; i < n; i++)
        if (h->peer_rx + (size_t)i >= h->out_queued || buf[i] != h->out[h->peer_rx + (size_t)i])
            h->peer_rx_bad++;
    if (n > 0)
        h->peer_rx += (size_t)n;
}

/* resume_at: one DRAINED once `flushed` reaches the mark, none before.  The
 * peer reads in small steps, so the output stays stalled just short of the
 * mark for a while: a DRAINED sent early is seen with flushed < mark. */
static void test_write_drained(void **state)
{
    (void)state;
    harness *h = &g_h;
    h_open(h);
    /* A small send buffer: `flushed` then moves in small steps. */
    set_sndbuf(h->fd, 16 * 1024);
    size_t total = 1024 * 1024;
    h_write_many(h, total, 64 * 1024, 12);
    uint64_t stalled = h_wait_write_stall(h, total);
    uint64_t mark = stalled + 96 * 1024;
    assert_true(mark < total);
    atomic_store(&h->s->resume_at, mark);
    assert_true(h_flushed(h) < mark); /* (else the loop reports it itself) */
    h_quiet(h, QUIET_MS);
    assert_int_equal(h->n_drained, 0);
    double deadline = mt_test_now() + WAIT_MS / 1000.0;
    int steps = 0;
    while (h->n_drained == 0 && mt_test_now() < deadline) {
        h_peer_read_some(h, 4096);
        h_quiet(h, MT_TEST_SCALE(2, 5));
        steps++;
    }
    print_message("stalled at %llu, mark %llu, DRAINED seen at %llu after %d reads\n",
                  (unsigned long long)stalled, (unsigned long long)mark,
                  (unsigned long long)h->drained_flushed, steps);
    assert_int_equal(h->n_drained, 1);
    assert_true(h->drained_flushed >= mark);
    assert_int_equal(atomic_load(&h->s->resume_at), 0);
    h->peer_reading = true;
    assert_true(h_run(h, peer_rx_all, WAIT_MS));
    h_quiet(h, QUIET_MS);
    assert_int_equal(h->n_drained, 1);
    assert_int_equal(h->peer_rx, total);
    assert_int_equal(h->peer_rx_bad, 0);

    /* A mark at the very end of a later write. */
    atomic_store(&h->s->resume_at, total + 1000);
    mt_cmd *c = h_make_write(h, 1000, 99);
    h_post_cmd(h, c);
    assert_true(h_run(h, peer_rx_all, WAIT_MS));
    h_quiet(h, QUIET_MS);
    assert_int_equal(h->n_drained, 2);
    assert_int_equal(h_wait_flushed(h, total + 1000), total + 1000);
    assert_int_equal(atomic_load(&h->s->resume_at), 0);
    h_finish(h, true);
}

/* CLOSE after queued writes: everything reaches the peer, CLOSED comes
 * last, and the fd stays open (the loop's socket object owns it). */
static void test_close_flushes(void **state)
{
    (void)state;
    harness *h = &g_h;
    h_open(h);
    set_sndbuf(h->fd, 128 * 1024);
    h_post(h, MT_CMD_STREAM_READ_ON);
    size_t total = MT_TEST_SCALE(1024, 512) * 1024;
    h_write_many(h, total, 64 * 1024, 13);
    h_post(h, MT_CMD_STREAM_CLOSE);
    h_quiet(h, QUIET_MS);
    assert_int_equal(h->n_closed, 0); /* output still queued */
    assert_true(h_flushed(h) < total);
    h->peer_reading = true;
    assert_true(h_run(h, closed_seen, WAIT_MS));
    assert_int_equal(h->closed_err, 0);
    assert_int_equal(h->closed_flushed, total); /* all sent before CLOSED */
    assert_true(h_run(h, peer_rx_all, WAIT_MS));
    h_quiet(h, QUIET_MS);
    assert_int_equal(h->peer_rx, total);
    assert_int_equal(h->peer_rx_bad, 0);
    assert_false(h->peer_eof); /* not shut down, not closed */
    assert_true(fd_open(h->fd));
    assert_int_equal(h->n_write_error, 0);
    assert_int_equal(snap(SNAP_TRANSPORTS), 0);
    /* The fd is still a working socket, but nobody reads it any more. */
    h_set_in(h, 100, 6);
    h_quiet(h, QUIET_MS);
    assert_int_equal(h->in_sent, 100);
    assert_int_equal(h->rx, 0);
    /* Later writes are dropped, counted as flushed; no completion. */
    h_post_cmd(h, mt_cmd_new(MT_CMD_STREAM_WRITE, &h->s->obj, 500));
    h_post(h, MT_CMD_STREAM_READ_ON);
    h_post(h, MT_CMD_STREAM_CLOSE);
    assert_int_equal(h_wait_flushed(h, total + 500), total + 500);
    h_quiet(h, QUIET_MS);
    assert_int_equal(h->rx, 0);
    h_finish(h, true);
}

/* ABORT drops the queued output at once (the peer is not reading), counts
 * it as flushed, and reports CLOSED. */
static void test_abort_drops_output(void **state)
{
    (void)state;
    harness *h = &g_h;
    h_open(h);
    set_sndbuf(h->fd, 128 * 1024);
    size_t total = MT_TEST_SCALE(4, 2) * 1024 * 1024;
    h_write_many(h, total, 64 * 1024, 14);
    uint64_t sent = h_wait_write_stall(h, total);
    h_post(h, MT_CMD_STREAM_ABORT);
    assert_true(h_run(h, closed_seen, WAIT_MS));
    assert_int_equal(h->closed_err, 0);
    assert_int_equal(h->closed_flushed, total);
    assert_int_equal(h->n_write_error, 0);
    assert_true(fd_open(h->fd));
    /* The peer gets what was sent before the abort, and no more. */
    h->peer_reading = true;
    h_quiet(h, QUIET_MS);
    assert_int_equal(h->peer_rx, sent);
    assert_true(h->peer_rx < total);
    assert_int_equal(h->peer_rx_bad, 0);
    assert_false(h->peer_eof);
    /* A SENDFILE after the close fails at once. */
    mt_cmd *sf = mt_cmd_new(MT_CMD_STREAM_SENDFILE, &h->s->obj, 0);
    assert_non_null(sf);
    sf->file_fd = h->peer;
    sf->len = 10;
    h->closed = false; /* (SENDFILE's answer may follow CLOSED) */
    h_post_cmd(h, sf);
    assert_true(h_run(h, sendfile_seen, WAIT_MS));
    assert_int_equal(h->sendfile_err, ECONNABORTED);
    assert_int_equal(h->sendfile_len, 0);
    h->closed = true;
    h_finish(h, true);
}

/* SHUT_WR after writes: the peer reads everything, then EOF; the stream
 * still reads what the peer sends. */
static void test_shut_wr(void **state)
{
    (void)state;
    harness *h = &g_h;
    h_open(h);
    h_post(h, MT_CMD_STREAM_READ_ON);
    size_t total = 300 * 1024 + 5;
    h_write_many(h, total, 32 * 1024, 15);
    h_post(h, MT_CMD_STREAM_SHUT_WR);
    h->peer_reading = true;
    assert_true(h_run(h, peer_eof_seen, WAIT_MS));
    assert_int_equal(h->peer_rx_at_eof, total);
    assert_int_equal(h->peer_rx_bad, 0);
    assert_int_equal(h_wait_flushed(h, total), total);
    /* Half-closed: the other direction still works. */
    h_set_in(h, 100 * 1024, 7);
    assert_true(h_run(h, rx_all, WAIT_MS));
    assert_int_equal(h->rx_bad, 0);
    assert_int_equal(shutdown(h->peer, SHUT_WR), 0);
    assert_true(h_run(h, eof_seen, WAIT_MS));
    h_quiet(h, QUIET_MS);
    assert_int_equal(h->n_eof, 1);
    assert_int_equal(h->n_closed, 0);
    assert_int_equal(h->n_write_error, 0);
    h_finish(h, true);
}

/* SENDFILE: after the queued output, the file slice; its count in the
 * completion; a count past the end of the file stops at the end. */
static void test_sendfile(void **state)
{
    (void)state;
    char path[] = "/tmp/mt_test_sendfile_XXXXXX";
    int file = mkstemp(path);
    assert_true(file >= 0);
    unlink(path);
    size_t fsize = MT_TEST_SCALE(1024, 512) * 1024 + 17;
    uint8_t *content = malloc(fsize);
    assert_non_null(content);
    fill_pattern(content, fsize, 77);
    assert_int_equal(write(file, content, fsize), (ssize_t)fsize);

    harness *h = &g_h;
    h_open(h);
    set_sndbuf(h->fd, 64 * 1024);
    uint64_t written_before = snap(SNAP_BYTES_WRITTEN);
    size_t off = 12345, count = fsize / 2 + 1000;
    mt_cmd *head = h_make_write(h, 1000, 1);
    mt_cmd *sf = mt_cmd_new(MT_CMD_STREAM_SENDFILE, &h->s->obj, 0);
    assert_non_null(sf);
    sf->file_fd = file;
    sf->offset = (int64_t)off;
    sf->len = count;
    atomic_store_explicit(&head->node.next, &sf->node, memory_order_relaxed);
    assert_true(mt_io_thread_post(g_io, head, sf));
    h_expect_out(h, content + off, count);
    h_quiet(h, QUIET_MS);
    assert_int_equal(h->n_sendfile, 0); /* the peer does not read yet */
    h->peer_reading = true;
    assert_true(h_run(h, sendfile_seen, WAIT_MS));
    assert_int_equal(h->sendfile_err, 0);
    assert_int_equal(h->sendfile_len, count);
    /* Writes after the sendfile follow it. */
    h_post_cmd(h, h_make_write(h, 777, 2));
    assert_true(h_run(h, peer_rx_all, WAIT_MS));
    assert_int_equal(h->peer_rx, 1000 + count + 777);
    assert_int_equal(h->peer_rx_bad, 0);

    /* Past the end of the file: what there is. */
    sf = mt_cmd_new(MT_CMD_STREAM_SENDFILE, &h->s->obj, 0);
    sf->file_fd = file;
    sf->offset = (int64_t)fsize - 100;
    sf->len = 1000;
    h_post_cmd(h, sf);
    h_expect_out(h, content + fsize - 100, 100);
    h->n_sendfile = 0;
    assert_true(h_run(h, sendfile_seen, WAIT_MS));
    assert_int_equal(h->sendfile_err, 0);
    assert_int_equal(h->sendfile_len, 100);
    assert_true(h_run(h, peer_rx_all, WAIT_MS));
    assert_int_equal(h->peer_rx_bad, 0);

    /* A bad file: the error, nothing sent, and the stream goes on. */
    sf = mt_cmd_new(MT_CMD_STREAM_SENDFILE, &h->s->obj, 0);
    sf->file_fd = -1;
    sf->len = 100;
    h_post_cmd(h, sf);
    h->n_sendfile = 0;
    assert_true(h_run(h, sendfile_seen, WAIT_MS));
    assert_int_equal(h->sendfile_err, EBADF);
    assert_int_equal(h->sendfile_len, 0);
    h_post_cmd(h, h_make_write(h, 50, 3));
    assert_true(h_run(h, peer_rx_all, WAIT_MS));
    assert_int_equal(h->peer_rx, h->out_queued);
    assert_int_equal(h->peer_rx_bad, 0);
    assert_int_equal(h_wait_snap(h, SNAP_BYTES_WRITTEN, written_before + h->out_queued),
                     written_before + h->out_queued);
    assert_int_equal(h->n_write_error, 0);
    h_finish(h, true);
    close(file);
    free(content);
}

/* SINK_CLOSE lets go of the stream without a word; shutting the runtime
 * down reports CLOSED (ECONNABORTED).  Neither closes the fd. */
static void test_sink_close_and_shutdown(void **state)
{
    (void)state;
    harness *h = &g_h;
    h_open(h);
    set_sndbuf(h->fd, 128 * 1024);
    h_post(h, MT_CMD_STREAM_READ_ON);
    h_write_many(h, 2 * 1024 * 1024, 64 * 1024, 16); /* stuck output */
    h_wait_write_stall(h, 2 * 1024 * 1024);
    assert_int_equal(snap(SNAP_TRANSPORTS), 1);
    mt_latch latch;
    mt_latch_init(&latch);
    mt_latch_add(&latch);
    mt_cmd *sc = mt_cmd_new(MT_CMD_SINK_CLOSE, h->sink, 0);
    sc->latch = &latch;
    assert_true(mt_io_thread_post(g_io, sc, sc));
    mt_latch_wait(&latch); /* (the ctest timeout bounds it) */
    mt_latch_destroy(&latch);
    assert_int_equal(snap(SNAP_TRANSPORTS), 0);
    h_drain_sink(h);
    assert_int_equal(h->n_closed, 0);
    assert_true(fd_open(h->fd));
    assert_int_equal(h_flushed(h), 2 * 1024 * 1024); /* dropped */
    assert_int_equal(atomic_load(&h->s->obj.refs), 1);
    h->closed = true;
    h->n_closed = 1;
    h_finish(h, true);

    /* Shutdown: CLOSED with ECONNABORTED, the pool restarts afterwards. */
    h_open(h);
    h_post(h, MT_CMD_STREAM_READ_ON);
    h_set_in(h, 10, 8);
    assert_true(h_run(h, rx_all, WAIT_MS));
    mt_runtime_shutdown();
    h_drain_sink(h);
    assert_int_equal(h->n_closed, 1);
    assert_int_equal(h->closed_err, ECONNABORTED);
    assert_true(fd_open(h->fd));
    assert_int_equal(atomic_load(&h->s->obj.refs), 1);
    mt_cmd *late = mt_cmd_new(MT_CMD_STREAM_WRITE, &h->s->obj, 1);
    assert_false(mt_io_thread_post(g_io, late, late));
    mt_cmd_free(late);
    assert_int_equal(mt_runtime_acquire(1, &g_io), 0);
    h_quiet(h, 5);
    assert_int_equal(h->after_closed, 0);
    h_finish(h, true);
}

/* OWN_FD: the I/O thread closes the fd once it lets go of it. */
static void test_own_fd(void **state)
{
    (void)state;
    harness *h = &g_h;
    h_open(h);
    h_post(h, MT_CMD_STREAM_OWN_FD);
    h_write_many(h, 100 * 1024, 16 * 1024, 17);
    h_post(h, MT_CMD_STREAM_CLOSE);
    h->peer_reading = true;
    assert_true(h_run(h, closed_seen, WAIT_MS));
    assert_false(fd_open(h->fd)); /* closed before CLOSED was pushed */
    assert_true(h_run(h, peer_eof_seen, WAIT_MS));
    assert_int_equal(h->peer_rx_at_eof, 100 * 1024);
    assert_int_equal(h->peer_rx_bad, 0);
    h_finish(h, false);

    /* Given after CLOSED: closed at once. */
    h_open(h);
    h_post(h, MT_CMD_STREAM_ABORT);
    assert_true(h_run(h, closed_seen, WAIT_MS));
    assert_true(fd_open(h->fd));
    h_post(h, MT_CMD_STREAM_OWN_FD);
    double deadline = mt_test_now() + WAIT_MS / 1000.0;
    while (fd_open(h->fd) && mt_test_now() < deadline)
        mt_test_sleep_us(100);
    assert_false(fd_open(h->fd));
    h_finish(h, false);
}

/* ---- listeners ---------------------------------------------------------- */

static int tcp_listener(struct sockaddr_in *addr)
{
    int lfd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    assert_true(lfd >= 0);
    *addr = (struct sockaddr_in){.sin_family = AF_INET,
                                 .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    assert_int_equal(bind(lfd, (struct sockaddr *)addr, sizeof(*addr)), 0);
    assert_int_equal(listen(lfd, 64), 0);
    socklen_t sl = sizeof(*addr);
    assert_int_equal(getsockname(lfd, (struct sockaddr *)addr, &sl), 0);
    return lfd;
}

static int tcp_connect(const struct sockaddr_in *addr)
{
    int c = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    assert_true(c >= 0);
    assert_int_equal(connect(c, (const struct sockaddr *)addr, sizeof(*addr)), 0);
    return c;
}

static mt_done *sink_next(mt_sink *sink, int timeout_ms, uint64_t *lost)
{
    double deadline = mt_test_now() + timeout_ms / 1000.0;
    for (;;) {
        mt_mpsc_node *n = mt_mpsc_queue_pop(&sink->queue);
        if (n != NULL)
            return MT_CONTAINER_OF(n, mt_done, node);
        if (!mt_mpsc_queue_is_empty(&sink->queue)) {
            sched_yield();
            continue;
        }
        mt_waker_prepare_sleep(&sink->waker);
        if (!mt_mpsc_queue_is_empty(&sink->queue)) {
            mt_waker_awake(&sink->waker);
            continue;
        }
        int left = (int)((deadline - mt_test_now()) * 1000.0);
        struct pollfd pfd = {.fd = sink->waker.fd, .events = POLLIN};
        int r = left > 0 ? poll(&pfd, 1, left) : 0;
        mt_waker_awake(&sink->waker);
        if (r > 0) {
            mt_waker_drain(&sink->waker);
        } else if (r == 0) {
            if (!mt_mpsc_queue_is_empty(&sink->queue))
                (*lost)++;
            return NULL;
        }
    }
}

static uint64_t wait_listeners(uint64_t want)
{
    double deadline = mt_test_now() + WAIT_MS / 1000.0;
    while (snap(SNAP_LISTENERS) != want && mt_test_now() < deadline)
        mt_test_sleep_us(100);
    return snap(SNAP_LISTENERS);
}

enum { NCLIENTS = 10 };

/* LISTEN: connections arrive as ACCEPT completions with working,
 * non-blocking, close-on-exec fds and the peers' addresses; UNLISTEN closes
 * the I/O thread's dup (once). */
static void test_listener_accepts(void **state)
{
    (void)state;
    struct sockaddr_in addr;
    int lfd = tcp_listener(&addr);
    int dupfd = fcntl(lfd, F_DUPFD_CLOEXEC, 0);
    assert_true(dupfd >= 0);
    mt_sink *sink = mt_sink_new();
    assert_non_null(sink);
    uint64_t accepts_before = snap(SNAP_ACCEPTS), lost = 0;
    mt_listener *l = mt_listener_new(sink, g_io, dupfd, 4);
    assert_non_null(l);
    mt_cmd *cmd = mt_cmd_new(MT_CMD_LISTEN, &l->obj, 0);
    assert_true(mt_io_thread_post(g_io, cmd, cmd));
    assert_int_equal(wait_listeners(1), 1);

    int clients[NCLIENTS];
    uint16_t ports[NCLIENTS];
    int matched[NCLIENTS] = {0};
    for (int i = 0; i < NCLIENTS; i++) {
        clients[i] = tcp_connect(&addr);
        struct sockaddr_in me;
        socklen_t ml = sizeof(me);
        assert_int_equal(getsockname(clients[i], (struct sockaddr *)&me, &ml), 0);
        ports[i] = me.sin_port;
    }
    for (int k = 0; k < NCLIENTS; k++) {
        mt_done *d = sink_next(sink, WAIT_MS, &lost);
        if (d == NULL)
            fail_msg("accept %d of %d never reported", k, NCLIENTS);
        assert_int_equal(d->kind, MT_DONE_ACCEPT);
        assert_ptr_equal(d->source, &l->obj);
        assert_true(d->fd >= 0);
        assert_non_null(d->addr);
        assert_int_equal(d->addrlen, sizeof(struct sockaddr_in));
        const struct sockaddr_in *pa = (const struct sockaddr_in *)d->addr;
        assert_int_equal(pa->sin_family, AF_INET);
        assert_int_equal(pa->sin_addr.s_addr, htonl(INADDR_LOOPBACK));
        int which = -1;
        for (int i = 0; i < NCLIENTS; i++)
            if (ports[i] == pa->sin_port)
                which = i;
        assert_true(which >= 0);
        matched[which]++;
        struct sockaddr_in peer;
        socklen_t pl = sizeof(peer);
        assert_int_equal(getpeername(d->fd, (struct sockaddr *)&peer, &pl), 0);
        assert_int_equal(peer.sin_port, pa->sin_port);
        assert_true(fcntl(d->fd, F_GETFL) & O_NONBLOCK);
        assert_true(fcntl(d->fd, F_GETFD) & FD_CLOEXEC);
        /* It is that client's connection. */
        char byte = (char)which;
        assert_int_equal(send(d->fd, &byte, 1, MSG_NOSIGNAL), 1);
        char got = -1;
        assert_int_equal(recv(clients[which], &got, 1, 0), 1);
        assert_int_equal(got, (char)which);
        int taken = d->fd;
        d->fd = -1; /* the loop takes it */
        mt_done_free(d);
        close(taken);
    }
    for (int i = 0; i < NCLIENTS; i++)
        assert_int_equal(matched[i], 1);
    assert_int_equal(snap(SNAP_ACCEPTS) - accepts_before, NCLIENTS);

    /* An ACCEPT freed without taking its fd closes it. */
    int extra = tcp_connect(&addr);
    mt_done *d = sink_next(sink, WAIT_MS, &lost);
    assert_non_null(d);
    assert_int_equal(d->kind, MT_DONE_ACCEPT);
    int orphan = d->fd;
    assert_true(fd_open(orphan));
    mt_done_free(d);
    assert_false(fd_open(orphan));
    close(extra);

    /* UNLISTEN: the dup goes, the original stays. */
    cmd = mt_cmd_new(MT_CMD_UNLISTEN, &l->obj, 0);
    assert_true(mt_io_thread_post(g_io, cmd, cmd));
    assert_int_equal(wait_listeners(0), 0);
    assert_false(fd_open(dupfd));
    assert_true(fd_open(lfd));
    /* New connections wait in the original's backlog; nobody accepts. */
    int late = tcp_connect(&addr);
    assert_null(sink_next(sink, QUIET_MS, &lost));
    /* Destroying the record must not close the number again (now taken
     * by another socket). */
    int reuse = dup2(lfd, dupfd);
    assert_int_equal(reuse, dupfd);
    assert_int_equal(atomic_load(&l->obj.refs), 1);
    mt_io_obj_decref(&l->obj);
    assert_true(fd_open(reuse));
    assert_int_equal(lost, 0);
    sink_barrier(sink);
    assert_int_equal(atomic_load(&sink->refs), 1);
    mt_sink_decref(sink);
    close(reuse);
    close(late);
    for (int i = 0; i < NCLIENTS; i++)
        close(clients[i]);
    close(lfd);
}

/* A listener dropped by SINK_CLOSE closes its dup without a word; one that
 * never reached a thread closes it when destroyed. */
static void test_listener_drop(void **state)
{
    (void)state;
    struct sockaddr_in addr;
    int lfd = tcp_listener(&addr);
    mt_sink *sink = mt_sink_new();
    assert_non_null(sink);

    int dupfd = dup(lfd);
    mt_listener *l = mt_listener_new(sink, g_io, dupfd, 0);
    assert_non_null(l);
    assert_int_equal(l->backlog, 1);
    mt_cmd *cmd = mt_cmd_new(MT_CMD_LISTEN, &l->obj, 0);
    assert_true(mt_io_thread_post(g_io, cmd, cmd));
    mt_latch latch;
    mt_latch_init(&latch);
    mt_latch_add(&latch);
    mt_cmd *sc = mt_cmd_new(MT_CMD_SINK_CLOSE, sink, 0);
    sc->latch = &latch;
    assert_true(mt_io_thread_post(g_io, sc, sc));
    mt_latch_wait(&latch);
    mt_latch_destroy(&latch);
    assert_int_equal(snap(SNAP_LISTENERS), 0);
    assert_false(fd_open(dupfd));
    assert_true(mt_mpsc_queue_is_empty(&sink->queue));
    assert_int_equal(atomic_load(&l->obj.refs), 1);
    mt_io_obj_decref(&l->obj);

    dupfd = dup(lfd);
    l = mt_listener_new(sink, g_io, dupfd, 8);
    assert_non_null(l);
    mt_io_obj_decref(&l->obj);
    assert_false(fd_open(dupfd));

    assert_int_equal(atomic_load(&sink->refs), 1);
    mt_sink_decref(sink);
    close(lfd);
}

static int setup(void **state)
{
    (void)state;
    mt_runtime_init();
    return mt_runtime_acquire(1, &g_io);
}

static int teardown(void **state)
{
    (void)state;
    mt_runtime_shutdown();
    return 0;
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_teardown(test_read_exact, h_teardown),
        cmocka_unit_test_teardown(test_read_on_off, h_teardown),
        cmocka_unit_test_teardown(test_read_credit, h_teardown),
        cmocka_unit_test_teardown(test_peer_close_eof, h_teardown),
        cmocka_unit_test_teardown(test_peer_reset, h_teardown),
        cmocka_unit_test_teardown(test_write_order, h_teardown),
        cmocka_unit_test_teardown(test_write_drained, h_teardown),
        cmocka_unit_test_teardown(test_close_flushes, h_teardown),
        cmocka_unit_test_teardown(test_abort_drops_output, h_teardown),
        cmocka_unit_test_teardown(test_shut_wr, h_teardown),
        cmocka_unit_test_teardown(test_sendfile, h_teardown),
        cmocka_unit_test_teardown(test_sink_close_and_shutdown, h_teardown),
        cmocka_unit_test_teardown(test_own_fd, h_teardown),
        cmocka_unit_test_teardown(test_listener_accepts, h_teardown),
        cmocka_unit_test_teardown(test_listener_drop, h_teardown),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
