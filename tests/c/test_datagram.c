/* The I/O half of datagram endpoints (src/transport/datagram_io.c) over
 * real sockets and a real I/O thread.  The test thread plays the loop
 * half, as datagram_core.c does: it signals the control bits, posts SENDs,
 * pops completions from the sink and gives read credit back. */
#include "test_common.h"

#include "io_threads/runtime.h"
#include "transport/datagram.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#define WAIT_MS 5000
#define QUIET_MS MT_TEST_SCALE(50, 150)

static mt_io_thread *g_io;

typedef struct dg {
    mt_sink *sink;
    mt_dgram *d;
    int fd;
    bool auto_credit;
    /* What arrived, in order: each datagram's first 4 bytes (its number)
     * and length; how many failed their pattern. */
    uint32_t *seq;
    size_t *len;
    size_t n_rx, cap, rx_bad, held_bytes[4096], n_held;
    int n_error, n_drained, n_blocked, n_released, after_released, credits;
    int last_err, released_err;
} dg;

static dg g;

/* The bytes of datagram `seq` of `len` bytes: its number, then a pattern. */
static void fill(uint8_t *buf, size_t len, uint32_t seq)
{
    for (size_t i = 0; i < len; i++)
        buf[i] = (uint8_t)(seq * 31u + i * 7u);
    if (len >= 4)
        memcpy(buf, &seq, 4);
}

static bool intact(const uint8_t *buf, size_t len, uint32_t *seq_out)
{
    uint32_t seq = 0;
    if (len >= 4)
        memcpy(&seq, buf, 4);
    *seq_out = seq;
    for (size_t i = 4; i < len; i++)
        if (buf[i] != (uint8_t)(seq * 31u + i * 7u))
            return false;
    return true;
}

static void nonblock(int fd)
{
    assert_int_equal(fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK), 0);
}

static void dg_open(dg *h, int fd, int family)
{
    memset(h, 0, sizeof(*h));
    h->auto_credit = true;
    h->fd = fd;
    nonblock(fd);
    h->cap = 1 << 16;
    h->seq = calloc(h->cap, sizeof(*h->seq));
    h->len = calloc(h->cap, sizeof(*h->len));
    assert_true(h->seq && h->len);
    h->sink = mt_sink_new();
    assert_non_null(h->sink);
    h->d = mt_dgram_new(NULL, h->sink, g_io, fd, family, 8);
    assert_non_null(h->d);
    assert_true(mt_record_signal(&h->d->rec, MT_DGRAM_ATTACH));
}

static void give_credit(dg *h, size_t n)
{
    if (mt_dgram_consumed(h->d, n)) {
        h->credits++;
        assert_true(mt_record_signal(&h->d->rec, MT_DGRAM_CREDIT));
    }
}

static void handle(dg *h, mt_msg *m)
{
    assert_ptr_equal(m->rec, &h->d->rec);
    if (h->n_released)
        h->after_released++;
    switch (m->op) {
    case MT_DGRAM_RECEIVED: {
        size_t n = mt_dgram_size(m);
        uint32_t seq;
        if (!intact((const uint8_t *)mt_dgram_bytes(m), n, &seq))
            h->rx_bad++;
        if (h->n_rx < h->cap) {
            h->seq[h->n_rx] = seq;
            h->len[h->n_rx] = n;
        }
        h->n_rx++;
        if (h->auto_credit)
            give_credit(h, n);
        else if (h->n_held < sizeof(h->held_bytes) / sizeof(h->held_bytes[0]))
            h->held_bytes[h->n_held++] = n;
        break;
    }
    case MT_DGRAM_ERROR:
        h->n_error++;
        h->last_err = m->err;
        break;
    case MT_DGRAM_DRAINED:
        h->n_drained++;
        break;
    case MT_DGRAM_BLOCKED:
        h->n_blocked++;
        break;
    case MT_OP_RELEASED:
        h->n_released++;
        h->released_err = m->err;
        break;
    default:
        fail_msg("unexpected completion %d", m->op);
    }
    mt_msg_free(m);
}

static void drain_sink(dg *h)
{
    mt_msg *m;
    while ((m = mt_sink_pop(h->sink)) != NULL)
        handle(h, m);
}

/* Pops completions until `*counter` reaches `want` (fails after WAIT_MS). */
static void wait_count(dg *h, const int *counter, int want)
{
    double end = mt_test_now() + WAIT_MS / 1000.0;
    for (;;) {
        drain_sink(h);
        if (*counter >= want)
            return;
        if (mt_test_now() > end)
            fail_msg("waited %d ms for %d (have %d)", WAIT_MS, want, *counter);
        mt_test_sleep_us(200);
    }
}

static void wait_rx(dg *h, size_t want)
{
    double end = mt_test_now() + WAIT_MS / 1000.0;
    while (drain_sink(h), h->n_rx < want) {
        if (mt_test_now() > end)
            fail_msg("waited %d ms for %zu datagrams (have %zu)", WAIT_MS, want, h->n_rx);
        mt_test_sleep_us(200);
    }
}

/* Lets completions arrive for a while: for "nothing more comes". */
static void settle(dg *h)
{
    double end = mt_test_now() + QUIET_MS / 1000.0;
    while (mt_test_now() < end) {
        drain_sink(h);
        mt_test_sleep_us(500);
    }
    drain_sink(h);
}

static void post_send(dg *h, const struct sockaddr *sa, socklen_t salen, size_t len,
                      uint32_t seq)
{
    mt_msg *m = mt_dgram_send_new(&h->d->rec, sa, salen, len);
    assert_non_null(m);
    fill((uint8_t *)mt_dgram_bytes(m), len, seq);
    assert_true(mt_io_thread_post(g_io, m, m));
}

/* Ends the record (ABORT unless it released already) and frees the rest. */
static int dg_teardown(void **state)
{
    (void)state;
    dg *h = &g;
    if (h->d != NULL) {
        if (!h->n_released) {
            (void)mt_record_signal(&h->d->rec, MT_DGRAM_ABORT);
            wait_count(h, &h->n_released, 1);
        }
        settle(h);
        mt_record_decref(&h->d->rec);
        h->d = NULL;
    }
    if (h->sink)
        mt_sink_decref(h->sink);
    free(h->seq);
    free(h->len);
    memset(h, 0, sizeof(*h));
    return 0;
}

static size_t size_of(uint32_t i)
{
    static const size_t sizes[] = {4, 5, 64, 1000, 1472, 3000, 9000, 200};
    return sizes[i % 8];
}

/* Datagrams arrive whole, intact and in order; each costs credit, which
 * the loop gives back as it handles them. */
static void test_receive_in_order(void **state)
{
    (void)state;
    int sv[2];
    assert_int_equal(socketpair(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0, sv), 0);
    dg_open(&g, sv[0], AF_UNIX);
    assert_true(mt_record_signal(&g.d->rec, MT_DGRAM_READ));
    nonblock(sv[1]);
    uint32_t total = MT_TEST_SCALE(5000, 1000);
    uint8_t buf[9000];
    for (uint32_t i = 0; i < total;) {
        fill(buf, size_of(i), i);
        if (send(sv[1], buf, size_of(i), 0) < 0) {
            assert_int_equal(errno, EAGAIN);
            drain_sink(&g);
            mt_test_sleep_us(50);
            continue;
        }
        i++;
    }
    wait_rx(&g, total);
    settle(&g);
    assert_int_equal(g.n_rx, total);
    assert_int_equal(g.rx_bad, 0);
    for (uint32_t i = 0; i < total; i++) {
        assert_int_equal(g.seq[i], i);
        assert_int_equal(g.len[i], size_of(i));
    }
    assert_int_equal(g.n_error, 0);
    close(sv[1]);
}

/* A loop that does not keep up stops the reading: the datagrams stay in the
 * kernel (whose queue fills, so the sender is refused), and the reading
 * resumes when the loop gives credit back. */
static void test_credit_bounds_reading(void **state)
{
    (void)state;
    int sv[2];
    assert_int_equal(socketpair(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0, sv), 0);
    dg_open(&g, sv[0], AF_UNIX);
    g.auto_credit = false;
    assert_true(mt_record_signal(&g.d->rec, MT_DGRAM_READ));
    nonblock(sv[1]);
    const size_t limit = MT_DGRAM_CREDIT / MT_DGRAM_CHARGE_MIN;
    uint8_t buf[100];
    uint32_t sent = 0;
    double end = mt_test_now() + WAIT_MS / 1000.0, refused_since = 0;
    for (;;) {
        fill(buf, sizeof(buf), sent);
        if (send(sv[1], buf, sizeof(buf), 0) == (ssize_t)sizeof(buf)) {
            sent++;
            refused_since = 0;
            continue;
        }
        assert_int_equal(errno, EAGAIN);
        /* Refused for a whole quiet window: the reading stopped. */
        drain_sink(&g);
        double now = mt_test_now();
        if (refused_since == 0)
            refused_since = now;
        else if (now - refused_since > QUIET_MS / 1000.0)
            break;
        if (now > end)
            fail_msg("the sender was never refused for long: reading did not stop");
        mt_test_sleep_us(200);
    }
    drain_sink(&g);
    assert_true(g.n_rx >= limit);
    assert_true(g.n_rx < limit + 32); /* at most one batch past the limit */
    assert_true(sent > g.n_rx);       /* the rest waits in the kernel */
    /* The loop catches up: everything arrives, in order. */
    g.auto_credit = true;
    for (size_t i = 0; i < g.n_held; i++)
        give_credit(&g, g.held_bytes[i]);
    g.n_held = 0;
    assert_int_equal(g.credits, 1);
    wait_rx(&g, sent);
    assert_int_equal(g.n_rx, sent);
    assert_int_equal(g.rx_bad, 0);
    for (uint32_t i = 0; i < sent; i++)
        assert_int_equal(g.seq[i], i);
    close(sv[1]);
}

/* SENDs go out in order, also past a full socket (the I/O thread waits for
 * writability); CLOSE right behind them still sends them all, then
 * releases.  The marks count every datagram's units. */
static void test_close_flushes_sends(void **state)
{
    (void)state;
    int sv[2];
    assert_int_equal(socketpair(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0, sv), 0);
    dg_open(&g, sv[0], AF_UNIX);
    uint32_t total = MT_TEST_SCALE(3000, 600);
    uint64_t units = 0;
    for (uint32_t i = 0; i < total; i++) {
        post_send(&g, NULL, 0, size_of(i), i);
        units += size_of(i) + 8;
    }
    assert_true(mt_record_signal(&g.d->rec, MT_DGRAM_CLOSE));
    uint8_t buf[10000];
    uint32_t got = 0;
    double end = mt_test_now() + WAIT_MS / 1000.0;
    while (got < total) {
        ssize_t n = recv(sv[1], buf, sizeof(buf), MSG_DONTWAIT);
        if (n < 0) {
            assert_int_equal(errno, EAGAIN);
            if (mt_test_now() > end)
                fail_msg("only %u of %u datagrams arrived", got, total);
            drain_sink(&g);
            mt_test_sleep_us(100);
            continue;
        }
        uint32_t seq;
        assert_true(intact(buf, (size_t)n, &seq));
        assert_int_equal(seq, got);
        assert_int_equal((size_t)n, size_of(got));
        got++;
    }
    wait_count(&g, &g.n_released, 1);
    settle(&g);
    assert_int_equal(g.released_err, 0);
    assert_int_equal(g.after_released, 0);
    assert_int_equal(atomic_load(&g.d->marks.flushed), units);
    /* The I/O thread let go of the fd; the loop half's hold keeps it open
     * (its number cannot be reused under the loop) until it lets go too. */
    assert_int_equal(atomic_load(&g.d->fd_holds), 1);
    assert_true(fcntl(sv[0], F_GETFD) >= 0);
    mt_dgram_drop_fd(g.d);
    assert_int_equal(fcntl(sv[0], F_GETFD), -1);
    assert_int_equal(errno, EBADF);
    assert_int_equal(recv(sv[1], buf, sizeof(buf), MSG_DONTWAIT), -1);
    close(sv[1]);
}

/* An unconnected socket sends each datagram to its own address; a failing
 * one is reported (ERROR) and skipped, and the next goes out. */
static void test_sendto_addresses_and_errors(void **state)
{
    (void)state;
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    int peers[2];
    struct sockaddr_in peer_addr[2];
    for (int i = 0; i < 2; i++) {
        peers[i] = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
        assert_true(peers[i] >= 0);
        peer_addr[i] = a;
        assert_int_equal(bind(peers[i], (struct sockaddr *)&peer_addr[i], sizeof(a)), 0);
        socklen_t len = sizeof(peer_addr[i]);
        assert_int_equal(getsockname(peers[i], (struct sockaddr *)&peer_addr[i], &len), 0);
        struct timeval tv = {.tv_sec = WAIT_MS / 1000};
        setsockopt(peers[i], SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
    }
    int fd = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    assert_true(fd >= 0);
    dg_open(&g, fd, AF_INET);
    const uint32_t total = 40;
    for (uint32_t i = 0; i < total; i++) {
        if (i == 20) /* too large for UDP: EMSGSIZE */
            post_send(&g, (struct sockaddr *)&peer_addr[0], sizeof(a), 70000, 999);
        post_send(&g, (struct sockaddr *)&peer_addr[i % 2], sizeof(a), 100, i);
    }
    uint8_t buf[200];
    for (uint32_t i = 0; i < total; i++) {
        ssize_t n = recv(peers[i % 2], buf, sizeof(buf), 0);
        assert_int_equal(n, 100);
        uint32_t seq;
        assert_true(intact(buf, 100, &seq));
        assert_int_equal(seq, i);
    }
    wait_count(&g, &g.n_error, 1);
    assert_int_equal(g.last_err, EMSGSIZE);
    settle(&g);
    assert_int_equal(g.n_error, 1);
    assert_int_equal(atomic_load(&g.d->marks.flushed), (total * 108) + 70008);
    close(peers[0]);
    close(peers[1]);
}

/* The loop's marks: BLOCKED once the socket refused output past the mark,
 * DRAINED once the queue is down to the resume mark; ABORT drops the rest
 * and counts it as flushed. */
static void test_marks_and_abort(void **state)
{
    (void)state;
    int sv[2];
    assert_int_equal(socketpair(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0, sv), 0);
    int small = 16 * 1024;
    assert_int_equal(setsockopt(sv[0], SOL_SOCKET, SO_SNDBUF, &small, sizeof(small)), 0);
    dg_open(&g, sv[0], AF_UNIX);
    assert_false(mt_out_arm_blocked(&g.d->marks, 32 * 1024));
    uint64_t queued = 0;
    uint32_t i = 0;
    for (; i < 200; i++) { /* the peer does not read: the socket fills */
        post_send(&g, NULL, 0, 1000, i);
        queued += 1008;
    }
    wait_count(&g, &g.n_blocked, 1);
    /* The peer reads a few: DRAINED once `flushed` passes the mark. */
    uint64_t mark = atomic_load(&g.d->marks.flushed) + 5 * 1008;
    assert_false(mt_out_arm_resume(&g.d->marks, mark));
    uint8_t buf[2000];
    double end = mt_test_now() + WAIT_MS / 1000.0;
    for (int k = 0; k < 20;) { /* the kernel queues a few at a time */
        ssize_t n = recv(sv[1], buf, sizeof(buf), MSG_DONTWAIT);
        if (n < 0) {
            assert_int_equal(errno, EAGAIN);
            if (mt_test_now() > end)
                fail_msg("the peer got only %d datagrams", k);
            mt_test_sleep_us(200);
            continue;
        }
        assert_int_equal(n, 1000);
        k++;
    }
    wait_count(&g, &g.n_drained, 1);
    assert_true(atomic_load(&g.d->marks.flushed) >= mark);
    assert_true(atomic_load(&g.d->marks.flushed) < queued);
    /* ABORT: what is still queued is dropped, and counted. */
    assert_true(mt_record_signal(&g.d->rec, MT_DGRAM_ABORT));
    wait_count(&g, &g.n_released, 1);
    settle(&g);
    assert_int_equal(atomic_load(&g.d->marks.flushed), queued);
    assert_int_equal(g.after_released, 0);
    /* A SEND that reaches a released record is dropped and counted too. */
    post_send(&g, NULL, 0, 10, 0);
    end = mt_test_now() + WAIT_MS / 1000.0;
    while (atomic_load(&g.d->marks.flushed) != queued + 18) {
        if (mt_test_now() > end)
            fail_msg("a SEND after the release was not counted");
        mt_test_sleep_us(200);
    }
    close(sv[1]);
}

static int group_setup(void **state)
{
    (void)state;
    mt_runtime_init();
    return mt_runtime_acquire(1, &g_io);
}

static int group_teardown(void **state)
{
    (void)state;
    mt_runtime_shutdown();
    if (g_io != NULL)
        mt_io_thread_decref(g_io);
    g_io = NULL;
    return 0;
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_teardown(test_receive_in_order, dg_teardown),
        cmocka_unit_test_teardown(test_credit_bounds_reading, dg_teardown),
        cmocka_unit_test_teardown(test_close_flushes_sends, dg_teardown),
        cmocka_unit_test_teardown(test_sendto_addresses_and_errors, dg_teardown),
        cmocka_unit_test_teardown(test_marks_and_abort, dg_teardown),
    };
    int rc = cmocka_run_group_tests(tests, group_setup, group_teardown);
    if (mt_runtime_threads_allocated() != 0) {
        print_error("I/O thread records still allocated at the end\n");
        return rc ? rc : 1;
    }
    return rc;
}
