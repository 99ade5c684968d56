/* Unit tests for the flow pump (src/transport/flow_pump.c, socket_ops.c)
 * and listeners (src/transport/listener_io.c), over real sockets and a
 * real I/O thread.  The harness (flow_harness.h) plays the loop half and
 * the peer. */
#include "flow_harness.h"

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
    h_reading(h, true);
    assert_true(h_run(h, rx_all, 4 * WAIT_MS));
    h_quiet(h, 5);
    assert_int_equal(h->rx, total);
    assert_int_equal(h->rx_bad, 0);
    assert_int_equal(h->n_eof + h->n_read_error, 0);
    assert_int_equal(h_used(h), 0);
    assert_int_equal(h->charged, 0);
    assert_int_equal(snap(SNAP_BYTES_READ) - read_before, total);
    assert_int_equal(snap(SNAP_TRANSPORTS), 1);
    print_message("%zu bytes in %d DATA completions, %llu wakeups, %d credit signals\n", h->rx,
                  h->n_data, (unsigned long long)atomic_load(&h->sink->waker.wakeups_sent),
                  h->credits_signalled);
    h_finish(h);
}

/* Reading stays off until READING (with want_read set), and READING with
 * want_read clear stops it. */
static void test_read_on_off(void **state)
{
    (void)state;
    harness *h = &g_h;
    h_open(h);
    h_set_in(h, 1000, 2);
    h_quiet(h, QUIET_MS);
    assert_int_equal(h->in_sent, 1000);
    assert_int_equal(h->n_data, 0); /* ATTACH alone does not read */
    /* want_read without the signal: the thread does not look. */
    atomic_store(&h->f->want_read, true);
    h_quiet(h, QUIET_MS);
    assert_int_equal(h->n_data, 0);
    h_reading(h, true);
    assert_true(h_run(h, rx_all, WAIT_MS));
    h_reading(h, false);
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
    h_reading(h, true);
    assert_true(h_run(h, rx_all, WAIT_MS));
    assert_int_equal(h->rx, 3000);
    assert_int_equal(h->rx_bad, 0);
    h_finish(h);
}

static bool starved(harness *h)
{
    return atomic_load(&h->f->read_credit.starved);
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
    h_reading(h, true);
    if (!h_run(h, starved, WAIT_MS))
        fail_msg("the reader never ran out of credit (%zu bytes delivered, %zu sent)", h->rx,
                 h->in_sent);
    h_quiet(h, QUIET_MS); /* nothing more arrives */
    size_t delivered = h->rx;
    int64_t used = h_used(h);
    print_message("stopped after %zu bytes in %zu reads (credit %d used %lld, read size "
                  "%zu); peer sent %zu of %zu\n",
                  delivered, h->nheld, MT_READ_CREDIT, (long long)used, MT_READ_MAX,
                  h->in_sent, total);
    /* Exactly what was charged for the reads delivered. */
    assert_int_equal(used, h->charged);
    assert_true(used >= MT_READ_CREDIT);
    assert_true(used < MT_READ_CREDIT + (int64_t)MT_READ_MAX);
    assert_true(delivered <= (size_t)used);
    assert_int_equal(h->rx_bad, 0);
    /* The peer is stuck: the socket is full and nobody reads it. */
    assert_true(h->in_sent < total);
    char byte = 0;
    errno = 0;
    assert_int_equal(send(h->peer, &byte, 1, MSG_DONTWAIT | MSG_NOSIGNAL), -1);
    assert_true(errno == EAGAIN || errno == EWOULDBLOCK);
    h_quiet(h, QUIET_MS);
    assert_int_equal(h->rx, delivered);
    assert_true(starved(h));

    /* The loop consumes it all, one completion at a time: exactly one of
     * them asks for the restart (the reader may starve again at once, on
     * what waited in the socket). */
    assert_int_equal(h_consume_held(h), 1);
    h->auto_credit = true;
    assert_true(h_run(h, rx_all, WAIT_MS));
    assert_int_equal(h->rx, total);
    assert_int_equal(h->rx_bad, 0);
    assert_int_equal(h_used(h), 0);
    h_finish(h);
}

/* Each read is charged at least MT_READ_CHARGE_MIN: a trickle of tiny
 * reads stops after MT_READ_CREDIT / MT_READ_CHARGE_MIN of them, however
 * few bytes that is; the rest stays in the kernel. */
static void test_read_charge_min(void **state)
{
    (void)state;
    harness *h = &g_h;
    h_open(h);
    enum { TRICKLE = 20 };
    const int max_reads = MT_READ_CREDIT / MT_READ_CHARGE_MIN;
    h_set_in(h, TRICKLE, 9);
    h->in_len = 0;
    h->auto_credit = false;
    h_reading(h, true);
    for (int i = 0; i < TRICKLE; i++) {
        h->in_len = (size_t)i + 1; /* one more byte */
        if (i < max_reads) {
            int want = h->n_data + 1;
            double deadline = mt_test_now() + WAIT_MS / 1000.0;
            while (h->n_data < want && mt_test_now() < deadline)
                h_quiet(h, 1);
            assert_int_equal(h->n_data, want);
        } else {
            h_quiet(h, MT_TEST_SCALE(5, 20));
        }
    }
    h_quiet(h, QUIET_MS);
    assert_int_equal(h->n_data, max_reads);
    assert_int_equal(h->rx, (size_t)max_reads);
    assert_int_equal(h_used(h), (int64_t)max_reads * MT_READ_CHARGE_MIN);
    assert_true(starved(h));
    /* Consuming gives it all back and the rest comes. */
    assert_int_equal(h_consume_held(h), 1);
    h->auto_credit = true;
    assert_true(h_run(h, rx_all, WAIT_MS));
    assert_int_equal(h->rx, TRICKLE);
    assert_int_equal(h->rx_bad, 0);
    h_finish(h);
}

/* The peer closes: the data, then one EOF, and nothing after it. */
static void test_peer_close_eof(void **state)
{
    (void)state;
    harness *h = &g_h;
    h_open(h);
    size_t total = 200 * 1024 + 3;
    h_set_in(h, total, 4);
    h_reading(h, true);
    /* Send it all, then close the peer before the flow read it all. */
    assert_true(h_run(h, sent_all, WAIT_MS));
    close(h->peer);
    h->peer = -1;
    assert_true(h_run(h, eof_seen, WAIT_MS));
    h_quiet(h, QUIET_MS);
    h_assert_clean_eof(h, total);
    /* A close with nothing queued: RELEASED at once; the fd stays open
     * while the loop half holds it. */
    h_close_released(h);
    assert_true(fd_open(h->fd));
    h_finish(h); /* (closes it) */
}

/* The peer resets the connection: READ_ERROR with ECONNRESET. */
static void test_peer_reset(void **state)
{
    (void)state;
    int cfd, afd;
    tcp_pair(&cfd, &afd);
    harness *h = &g_h;
    h_open_fds(h, cfd, afd);
    h_set_in(h, 10, 5);
    h_reading(h, true);
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
     * flushed, and so does what is written after; write_err keeps the
     * first error for the loop's direct send. */
    h_post_msg(h, h_make_write(h, 1000, 1));
    assert_true(h_run(h, write_error_seen, WAIT_MS));
    assert_true(h->write_err == EPIPE || h->write_err == ECONNRESET);
    assert_int_equal(atomic_load(&h->f->write_err), h->write_err);
    assert_int_equal(h_wait_flushed(h, 1000), 1000);
    h_post_msg(h, h_make_write(h, 500, 2));
    assert_int_equal(h_wait_flushed(h, 1500), 1500);
    h_quiet(h, QUIET_MS);
    assert_int_equal(h->n_write_error, 1);
    h_finish(h);
}

/* ---- writing --------------------------------------------------------------- */

/* WRITE messages reach the peer in order, byte for byte; `flushed` counts
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
    mt_msg *first = NULL, *last = NULL;
    for (int i = 0; i < 300; i++) {
        mt_msg *m = h_make_write(h, 1 + (size_t)(i % 7), (uint32_t)i);
        if (last)
            atomic_store_explicit(&last->node.next, &m->node, memory_order_relaxed);
        else
            first = m;
        last = m;
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
    assert_int_equal(h->n_blocked, 0);
    h_finish(h);
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

/* mt_flow_arm_resume: one DRAINED once `flushed` reaches the mark, none
 * before.  The peer reads in small steps, so the output stays stalled just
 * short of the mark for a while: a DRAINED sent early is seen with
 * flushed < mark. */
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
    assert_false(mt_flow_arm_resume(h->f, mark)); /* not there yet: DRAINED will come */
    assert_int_equal(atomic_load(&h->f->marks.resume_at), mark);
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
    assert_int_equal(atomic_load(&h->f->marks.resume_at), 0);
    h->peer_reading = true;
    assert_true(h_run(h, peer_rx_all, WAIT_MS));
    h_quiet(h, QUIET_MS);
    assert_int_equal(h->n_drained, 1);
    assert_int_equal(h->peer_rx, total);
    assert_int_equal(h->peer_rx_bad, 0);

    /* A mark already reached: the loop reports it itself, no DRAINED. */
    assert_int_equal(h_wait_flushed(h, total), total);
    assert_true(mt_flow_arm_resume(h->f, total));
    assert_int_equal(atomic_load(&h->f->marks.resume_at), 0);
    assert_true(mt_flow_arm_resume(h->f, 1));
    h_quiet(h, QUIET_MS);
    assert_int_equal(h->n_drained, 1);

    /* A mark at the very end of a later write. */
    assert_false(mt_flow_arm_resume(h->f, total + 1000));
    h_post_msg(h, h_make_write(h, 1000, 99));
    assert_true(h_run(h, peer_rx_all, WAIT_MS));
    h_quiet(h, QUIET_MS);
    assert_int_equal(h->n_drained, 2);
    assert_int_equal(h_wait_flushed(h, total + 1000), total + 1000);
    assert_int_equal(atomic_load(&h->f->marks.resume_at), 0);
    /* A mark moved up before it was reached: only the last one counts. */
    assert_false(mt_flow_arm_resume(h->f, total + 1500));
    assert_false(mt_flow_arm_resume(h->f, total + 3000));
    h_post_msg(h, h_make_write(h, 1000, 100));
    assert_true(h_run(h, peer_rx_all, WAIT_MS));
    h_quiet(h, QUIET_MS);
    assert_int_equal(h->n_drained, 2);
    h_post_msg(h, h_make_write(h, 1000, 101));
    assert_true(h_run(h, peer_rx_all, WAIT_MS));
    deadline = mt_test_now() + WAIT_MS / 1000.0;
    while (h->n_drained < 3 && mt_test_now() < deadline)
        h_quiet(h, 1);
    h_quiet(h, QUIET_MS);
    assert_int_equal(h->n_drained, 3);
    assert_true(h->drained_flushed >= total + 3000);
    h_finish(h);
}

/* CLOSE after queued writes: everything reaches the peer, RELEASED comes
 * last; the fd stays open while the loop half holds it, and its drop is
 * what the peer sees as the close. */
static void test_close_flushes(void **state)
{
    (void)state;
    harness *h = &g_h;
    h_open(h);
    set_sndbuf(h->fd, 128 * 1024);
    h_reading(h, true);
    size_t total = MT_TEST_SCALE(1024, 512) * 1024;
    h_write_many(h, total, 64 * 1024, 13);
    h_signal(h, MT_FLOW_CLOSE);
    h_quiet(h, QUIET_MS);
    assert_int_equal(h->n_released, 0); /* output still queued */
    assert_true(h_flushed(h) < total);
    h->peer_reading = true;
    assert_true(h_run(h, released_seen, WAIT_MS));
    assert_int_equal(h->released_err, 0);
    assert_int_equal(h->released_flushed, total); /* all sent before RELEASED */
    assert_true(h_run(h, peer_rx_all, WAIT_MS));
    h_quiet(h, QUIET_MS);
    assert_int_equal(h->peer_rx, total);
    assert_int_equal(h->peer_rx_bad, 0);
    assert_false(h->peer_eof); /* not shut down, and the loop holds the fd */
    assert_true(fd_open(h->fd));
    assert_int_equal(atomic_load(&h->f->fd_holds), 1);
    assert_int_equal(h->n_write_error, 0);
    assert_int_equal(snap(SNAP_TRANSPORTS), 0);
    /* The fd is still a working socket, but nobody reads it any more. */
    h_set_in(h, 100, 6);
    h_quiet(h, QUIET_MS);
    assert_int_equal(h->in_sent, 100);
    assert_int_equal(h->rx, 0);
    /* Later writes are dropped, counted as flushed; later signals do
     * nothing; no completion. */
    h_post_msg(h, mt_msg_new(MT_FLOW_WRITE, &h->f->rec, 500));
    h_reading(h, true);
    h_signal(h, MT_FLOW_CLOSE);
    assert_int_equal(h_wait_flushed(h, total + 500), total + 500);
    h_quiet(h, QUIET_MS);
    assert_int_equal(h->rx, 0);
    /* The loop lets go: the peer sees the close (a reset: the 100 bytes
     * were never read), after everything that was written. */
    h_drop_fd(h);
    assert_false(fd_open(h->fd));
    assert_true(h_run(h, peer_end_seen, WAIT_MS));
    assert_true(h->peer_eof || h->peer_err == ECONNRESET);
    h->peer_err = 0;
    assert_int_equal(h->peer_rx, total);
    h_finish(h);
}

/* WRITE_REF between WRITEs: its bytes go out from the caller's buffer, in
 * order, and the message comes back as REF_DONE with its owner once sent;
 * one dropped by ABORT comes back too, and so does one that reaches the
 * flow after RELEASED (the one completion allowed after it). */
static void test_write_ref(void **state)
{
    (void)state;
    harness *h = &g_h;
    h_open(h);
    static uint8_t a[300 * 1024], b[200 * 1024], c[100 * 1024];
    fill_pattern(a, sizeof(a), 42);
    fill_pattern(b, sizeof(b), 44);
    fill_pattern(c, sizeof(c), 45);
    h->peer_reading = true;
    h_post_msg(h, h_make_write(h, 1000, 41));
    h_post_msg(h, h_make_write_ref(h, a, sizeof(a), 0x1000));
    h_post_msg(h, h_make_write(h, 70 * 1024, 43));
    assert_true(h_run(h, peer_rx_all, WAIT_MS));
    assert_int_equal(h->peer_rx_bad, 0);
    h_quiet(h, 5);
    assert_int_equal(h->n_ref_done, 1);
    assert_int_equal(h->ref_done_owners, 0x1000);
    assert_int_equal(h_flushed(h), h->out_queued);
    /* Queued behind a peer that stopped reading, then aborted. */
    h->peer_reading = false;
    set_sndbuf(h->fd, 4096);
    for (int i = 0; i < 8; i++)
        h_post_msg(h, h_make_write_ref(h, b, sizeof(b), 0x10000));
    h_quiet(h, QUIET_MS);
    assert_true(h_flushed(h) < h->out_queued);
    h_signal(h, MT_FLOW_ABORT);
    assert_true(h_run(h, released_seen, WAIT_MS));
    assert_int_equal(h->n_ref_done, 1 + 8);
    assert_int_equal(h->ref_done_owners, 0x1000 + 8 * 0x10000);
    assert_int_equal(h->ref_done_after_released, 0);
    /* After RELEASED: dropped, and still handed back. */
    h_post_msg(h, h_make_write_ref(h, c, sizeof(c), 0x100000));
    h_quiet(h, QUIET_MS);
    assert_int_equal(h->ref_done_after_released, 1);
    assert_int_equal(h->ref_done_owners, 0x1000 + 8 * 0x10000 + 0x100000);
    h_finish(h);
}

/* ABORT drops the queued output at once (the peer is not reading), counts
 * it as flushed, and reports RELEASED. */
static void test_abort_drops_output(void **state)
{
    (void)state;
    harness *h = &g_h;
    h_open(h);
    set_sndbuf(h->fd, 128 * 1024);
    size_t total = MT_TEST_SCALE(4, 2) * 1024 * 1024;
    h_write_many(h, total, 64 * 1024, 14);
    uint64_t sent = h_wait_write_stall(h, total);
    h_signal(h, MT_FLOW_ABORT);
    assert_true(h_run(h, released_seen, WAIT_MS));
    assert_int_equal(h->released_err, 0);
    assert_int_equal(h->released_flushed, total);
    assert_int_equal(h->n_write_error, 0);
    assert_true(fd_open(h->fd));
    /* The peer gets what was sent before the abort, and no more. */
    h->peer_reading = true;
    h_quiet(h, QUIET_MS);
    assert_int_equal(h->peer_rx, sent);
    assert_true(h->peer_rx < total);
    assert_int_equal(h->peer_rx_bad, 0);
    assert_false(h->peer_eof);
    /* A SENDFILE after the release closes its fd and is not answered:
     * nothing follows RELEASED (the loop half ends a sendfile still
     * waiting when RELEASED comes, see stream_core.c). */
    int file = open("/dev/null", O_RDONLY | O_CLOEXEC);
    assert_true(file >= 0);
    mt_msg *sf = mt_msg_new(MT_FLOW_SENDFILE, &h->f->rec, sizeof(mt_flow_sendfile));
    assert_non_null(sf);
    *(mt_flow_sendfile *)mt_msg_data(sf) = (mt_flow_sendfile){.fd = file, .count = 10};
    h_post_msg(h, sf);
    h_quiet(h, QUIET_MS);
    assert_int_equal(h->n_sendfile, 0);
    assert_false(fd_open(file));
    h_finish(h);
}

/* SHUT_WR after writes: the peer reads everything, then EOF; the flow
 * still reads what the peer sends. */
static void test_shut_wr(void **state)
{
    (void)state;
    harness *h = &g_h;
    h_open(h);
    h_reading(h, true);
    size_t total = 300 * 1024 + 5;
    h_write_many(h, total, 32 * 1024, 15);
    h_signal(h, MT_FLOW_SHUT_WR);
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
    assert_int_equal(h->n_released, 0);
    assert_int_equal(h->n_write_error, 0);
    h_finish(h);
}

static mt_msg *sendfile_msg(harness *h, int fd, int64_t offset, size_t count)
{
    mt_msg *sf = mt_msg_new(MT_FLOW_SENDFILE, &h->f->rec, sizeof(mt_flow_sendfile));
    assert_non_null(sf);
    *(mt_flow_sendfile *)mt_msg_data(sf) =
        (mt_flow_sendfile){.fd = fd, .offset = offset, .count = count};
    return sf;
}

/* SENDFILE: after the queued output, the file slice; its count in the
 * completion; a count past the end of the file stops at the end; the flow
 * closes the descriptor it was given; a second one while one runs is
 * refused; SF_CANCEL stops one midway. */
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
    mt_msg *head = h_make_write(h, 1000, 1);
    int own = dup(file);
    mt_msg *sf = sendfile_msg(h, own, (int64_t)off, count);
    atomic_store_explicit(&head->node.next, &sf->node, memory_order_relaxed);
    assert_true(mt_io_thread_post(g_io, head, sf));
    h_expect_out(h, content + off, count);
    h_quiet(h, QUIET_MS);
    assert_int_equal(h->n_sendfile, 0); /* the peer does not read yet */
    assert_true(fd_open(own));
    h->peer_reading = true;
    assert_true(h_run(h, sendfile_seen, WAIT_MS));
    assert_int_equal(h->sendfile_err, 0);
    assert_int_equal(h->sendfile_sent, count);
    assert_false(fd_open(own)); /* the flow's, closed when done */
    /* Writes after the sendfile follow it. */
    h_post_msg(h, h_make_write(h, 777, 2));
    assert_true(h_run(h, peer_rx_all, WAIT_MS));
    assert_int_equal(h->peer_rx, 1000 + count + 777);
    assert_int_equal(h->peer_rx_bad, 0);

    /* Past the end of the file: what there is. */
    h_post_msg(h, sendfile_msg(h, dup(file), (int64_t)fsize - 100, 1000));
    h_expect_out(h, content + fsize - 100, 100);
    h->n_sendfile = 0;
    assert_true(h_run(h, sendfile_seen, WAIT_MS));
    assert_int_equal(h->sendfile_err, 0);
    assert_int_equal(h->sendfile_sent, 100);
    assert_true(h_run(h, peer_rx_all, WAIT_MS));
    assert_int_equal(h->peer_rx_bad, 0);

    /* A file sendfile() cannot read: the error, nothing sent, and the
     * flow goes on. */
    int wronly = open("/dev/null", O_WRONLY | O_CLOEXEC);
    assert_true(wronly >= 0);
    h_post_msg(h, sendfile_msg(h, wronly, 0, 100));
    h->n_sendfile = 0;
    assert_true(h_run(h, sendfile_seen, WAIT_MS));
    assert_int_equal(h->sendfile_err, EBADF);
    assert_int_equal(h->sendfile_sent, 0);
    assert_false(fd_open(wronly));
    h_post_msg(h, h_make_write(h, 50, 3));
    assert_true(h_run(h, peer_rx_all, WAIT_MS));
    assert_int_equal(h->peer_rx, h->out_queued);
    assert_int_equal(h->peer_rx_bad, 0);
    assert_int_equal(h_wait_snap(h, SNAP_BYTES_WRITTEN, written_before + h->out_queued),
                     written_before + h->out_queued);

    /* SF_CANCEL ends one stuck behind a peer that does not read, with
     * what it sent. */
    h->peer_reading = false;
    int first = dup(file);
    h_post_msg(h, sendfile_msg(h, first, 0, fsize));
    h_quiet(h, QUIET_MS);
    assert_true(fd_open(first));
    h->n_sendfile = 0;
    h_signal(h, MT_FLOW_SF_CANCEL);
    assert_true(h_run(h, sendfile_seen, WAIT_MS));
    assert_int_equal(h->sendfile_err, ECANCELED);
    assert_true(h->sendfile_sent > 0);
    assert_true(h->sendfile_sent < fsize);
    assert_false(fd_open(first));
    h_expect_out(h, content, h->sendfile_sent);
    h->peer_reading = true;
    assert_true(h_run(h, peer_rx_all, WAIT_MS));
    assert_int_equal(h->peer_rx_bad, 0);

    /* One at a time: a second is refused (EINVAL, its fd closed) while the
     * first runs, and the first goes on to the end. */
    h->peer_reading = false;
    first = dup(file);
    int second = dup(file);
    h_post_msg(h, sendfile_msg(h, first, 0, fsize));
    h_expect_out(h, content, fsize);
    h_quiet(h, QUIET_MS);
    h->n_sendfile = 0;
    h_post_msg(h, sendfile_msg(h, second, 0, 10));
    assert_true(h_run(h, sendfile_seen, WAIT_MS));
    assert_int_equal(h->sendfile_err, EINVAL);
    assert_int_equal(h->sendfile_sent, 0);
    assert_false(fd_open(second));
    assert_true(fd_open(first));
    h->n_sendfile = 0;
    h->peer_reading = true;
    assert_true(h_run(h, sendfile_seen, WAIT_MS));
    assert_int_equal(h->sendfile_err, 0);
    assert_false(fd_open(first));
    /* The refusal leaves the running sendfile's count alone. */
    assert_int_equal(h->sendfile_sent, fsize);
    h_post_msg(h, h_make_write(h, 60, 4));
    h->peer_reading = true;
    assert_true(h_run(h, peer_rx_all, WAIT_MS));
    h_quiet(h, QUIET_MS);
    assert_int_equal(h->peer_rx, h->out_queued);
    assert_int_equal(h->peer_rx_bad, 0);
    assert_int_equal(h->n_sendfile, 1);
    assert_int_equal(h->n_write_error, 0);
    h_finish(h);
    close(file);
    free(content);
}

/* Closing the sink lets go of the flow without a word (its I/O hold on the
 * fd goes; the loop's stays); shutting the runtime down reports RELEASED
 * (ECONNABORTED). */
static void test_sink_close_and_shutdown(void **state)
{
    (void)state;
    harness *h = &g_h;
    h_open(h);
    set_sndbuf(h->fd, 128 * 1024);
    h_reading(h, true);
    h_write_many(h, 2 * 1024 * 1024, 64 * 1024, 16); /* stuck output */
    h_wait_write_stall(h, 2 * 1024 * 1024);
    assert_int_equal(snap(SNAP_TRANSPORTS), 1);
    sink_barrier(h->sink);
    assert_int_equal(snap(SNAP_TRANSPORTS), 0);
    h_drain_sink(h);
    assert_int_equal(h->n_released, 0);
    assert_true(fd_open(h->fd));
    assert_int_equal(atomic_load(&h->f->fd_holds), 1);
    assert_int_equal(h_flushed(h), 2 * 1024 * 1024); /* dropped */
    assert_int_equal(atomic_load(&h->f->rec.refs), 1);
    h->released = true;
    h->n_released = 1;
    h_finish(h);

    /* Shutdown: RELEASED with ECONNABORTED, the pool restarts afterwards. */
    h_open(h);
    h_reading(h, true);
    h_set_in(h, 10, 8);
    assert_true(h_run(h, rx_all, WAIT_MS));
    mt_runtime_shutdown();
    h_drain_sink(h);
    assert_int_equal(h->n_released, 1);
    assert_int_equal(h->released_err, ECONNABORTED);
    assert_true(fd_open(h->fd));
    assert_int_equal(atomic_load(&h->f->fd_holds), 1);
    assert_int_equal(atomic_load(&h->f->rec.refs), 1);
    mt_msg *late = mt_msg_new(MT_FLOW_WRITE, &h->f->rec, 1);
    assert_false(mt_io_thread_post(g_io, late, late));
    mt_msg_free(late);
    assert_false(mt_record_signal(&h->f->rec, MT_FLOW_CLOSE));
    mt_io_thread *old = g_io;
    assert_int_equal(mt_runtime_acquire(1, &g_io), 0);
    assert_ptr_not_equal(g_io, old);
    mt_io_thread_decref(old); /* the flow holds it on */
    h_quiet(h, 5);
    assert_int_equal(h->after_released, 0);
    h_finish(h);
}

/* The fd's two holds: it closes when the second goes, whichever that is,
 * and never twice (the number may belong to a new socket by then). */
/* The poller refuses the fd (epoll takes no regular file): the flow fails
 * with that error, RELEASED(EPERM), instead of staying silent, which is
 * what an ignored event_add() result did before. */
static void test_watch_failure_fails_the_flow(void **state)
{
    (void)state;
    char path[] = "/tmp/mt-test-flow-XXXXXX";
    int fd = mkstemp(path);
    assert_true(fd >= 0);
    unlink(path);
    mt_sink *sink = mt_sink_new();
    assert_non_null(sink);
    mt_flow *f = mt_flow_new(&mt_socket_fd_ops, NULL, sink, g_io, fd);
    assert_non_null(f);
    atomic_store(&f->want_read, true);
    assert_true(mt_record_signal(&f->rec, MT_FLOW_ATTACH | MT_FLOW_READING));
    mt_msg *msg = NULL;
    for (int ms = 0; ms < WAIT_MS && msg == NULL; ms++) {
        msg = mt_sink_pop(sink);
        if (msg == NULL)
            mt_test_sleep_us(1000);
    }
    assert_non_null(msg);
    assert_int_equal(msg->op, MT_OP_RELEASED);
    assert_int_equal(msg->err, EPERM);
    mt_msg_free(msg);
    assert_null(mt_sink_pop(sink));
    mt_flow_drop_fd(f); /* the loop's hold: the last one */
    assert_false(fd_open(fd));
    mt_record_decref(&f->rec);
    mt_sink_decref(sink);
}

static void test_fd_ownership(void **state)
{
    (void)state;
    harness *h = &g_h;

    /* The loop lets go first, while output is queued: the fd stays open
     * until the I/O thread released the flow, and is closed by the time
     * RELEASED arrives; the peer reads everything, then EOF. */
    h_open(h);
    set_sndbuf(h->fd, 64 * 1024);
    h_write_many(h, 512 * 1024, 16 * 1024, 17);
    h_signal(h, MT_FLOW_CLOSE);
    h_drop_fd(h);
    h_quiet(h, QUIET_MS);
    assert_int_equal(h->n_released, 0);
    assert_true(fd_open(h->fd));
    h->peer_reading = true;
    assert_true(h_run(h, released_seen, WAIT_MS));
    assert_false(fd_open(h->fd));
    assert_true(h_run(h, peer_eof_seen, WAIT_MS));
    assert_int_equal(h->peer_rx_at_eof, 512 * 1024);
    assert_int_equal(h->peer_rx_bad, 0);
    /* A new socket takes the number: letting go of the record must not
     * close it. */
    int fd = h->fd, sv[2];
    assert_int_equal(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv), 0);
    if (sv[0] != fd && sv[1] != fd)
        assert_int_equal(dup2(sv[0], fd), fd);
    h->fd_reused = true;
    h_finish(h);
    assert_true(fd_open(fd));
    if (sv[0] != fd && sv[1] != fd)
        close(fd);
    close(sv[0]);
    close(sv[1]);

    /* The I/O thread lets go first (ABORT): the loop's drop closes it. */
    h_open(h);
    h_signal(h, MT_FLOW_ABORT);
    assert_true(h_run(h, released_seen, WAIT_MS));
    assert_true(fd_open(h->fd));
    h_drop_fd(h);
    assert_false(fd_open(h->fd));
    h_finish(h);

    /* Never attached: destroying the record closes it, with or without
     * the loop's drop, once. */
    for (int drop = 0; drop < 2; drop++) {
        int pair[2];
        assert_int_equal(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, pair), 0);
        mt_sink *sink = mt_sink_new();
        mt_flow *f = mt_flow_new(&mt_socket_fd_ops, NULL, sink, g_io, pair[0]);
        assert_non_null(f);
        if (drop) {
            mt_flow_drop_fd(f);
            assert_true(fd_open(pair[0]));
        }
        mt_record_decref(&f->rec);
        assert_false(fd_open(pair[0]));
        assert_int_equal(atomic_load(&sink->refs), 1);
        mt_sink_decref(sink);
        close(pair[1]);
    }
}

/* ---- listeners ---------------------------------------------------------- */

static int tcp_listener(struct sockaddr_in *addr, int backlog)
{
    int lfd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    assert_true(lfd >= 0);
    *addr = (struct sockaddr_in){.sin_family = AF_INET,
                                 .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    assert_int_equal(bind(lfd, (struct sockaddr *)addr, sizeof(*addr)), 0);
    assert_int_equal(listen(lfd, backlog), 0);
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

static mt_msg *sink_next(mt_sink *sink, int timeout_ms, uint64_t *lost)
{
    double deadline = mt_test_now() + timeout_ms / 1000.0;
    for (;;) {
        mt_msg *m = mt_sink_pop(sink);
        if (m != NULL)
            return m;
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

/* The loop handled one ACCEPT: the credit goes back (CREDIT when asked). */
static void listener_consumed(mt_listener *l, int n, int *credit_signals)
{
    if (mt_listener_consumed(l, n)) {
        assert_true(mt_record_signal(&l->rec, MT_LISTENER_CREDIT));
        (*credit_signals)++;
    }
}

enum { NCLIENTS = 10 };

/* LISTEN: connections arrive as ACCEPT completions with working,
 * non-blocking, close-on-exec (and here TCP_NODELAY) fds and the peers'
 * addresses; UNLISTEN closes the I/O thread's dup (once). */
static void test_listener_accepts(void **state)
{
    (void)state;
    struct sockaddr_in addr;
    int lfd = tcp_listener(&addr, 64);
    int dupfd = fcntl(lfd, F_DUPFD_CLOEXEC, 0);
    assert_true(dupfd >= 0);
    mt_sink *sink = mt_sink_new();
    assert_non_null(sink);
    uint64_t accepts_before = snap(SNAP_ACCEPTS), lost = 0;
    mt_listener *l = mt_listener_new(NULL, sink, g_io, dupfd, 4, true);
    assert_non_null(l);
    assert_int_equal(l->credit_limit, MT_ACCEPT_CREDIT_MIN);
    assert_true(mt_record_signal(&l->rec, MT_LISTENER_LISTEN));
    assert_int_equal(wait_listeners(1), 1);

    int clients[NCLIENTS];
    uint16_t ports[NCLIENTS];
    int matched[NCLIENTS] = {0}, credit_signals = 0;
    for (int i = 0; i < NCLIENTS; i++) {
        clients[i] = tcp_connect(&addr);
        struct sockaddr_in me;
        socklen_t ml = sizeof(me);
        assert_int_equal(getsockname(clients[i], (struct sockaddr *)&me, &ml), 0);
        ports[i] = me.sin_port;
    }
    for (int k = 0; k < NCLIENTS; k++) {
        mt_msg *d = sink_next(sink, WAIT_MS, &lost);
        if (d == NULL)
            fail_msg("accept %d of %d never reported", k, NCLIENTS);
        assert_int_equal(d->op, MT_LISTENER_ACCEPT);
        assert_ptr_equal(d->rec, &l->rec);
        assert_int_equal(d->len, sizeof(mt_accepted));
        mt_accepted *a = mt_msg_data(d);
        assert_true(a->fd >= 0);
        assert_int_equal(a->addrlen, sizeof(struct sockaddr_in));
        const struct sockaddr_in *pa = (const struct sockaddr_in *)&a->addr;
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
        assert_int_equal(getpeername(a->fd, (struct sockaddr *)&peer, &pl), 0);
        assert_int_equal(peer.sin_port, pa->sin_port);
        assert_true(fcntl(a->fd, F_GETFL) & O_NONBLOCK);
        assert_true(fcntl(a->fd, F_GETFD) & FD_CLOEXEC);
        int nodelay = 0;
        socklen_t nl = sizeof(nodelay);
        assert_int_equal(getsockopt(a->fd, IPPROTO_TCP, TCP_NODELAY, &nodelay, &nl), 0);
        assert_int_equal(nodelay, 1);
        /* It is that client's connection. */
        char byte = (char)which;
        assert_int_equal(send(a->fd, &byte, 1, MSG_NOSIGNAL), 1);
        char got = -1;
        assert_int_equal(recv(clients[which], &got, 1, 0), 1);
        assert_int_equal(got, (char)which);
        int taken = a->fd; /* the loop takes it */
        mt_msg_free(d);
        assert_true(fd_open(taken)); /* freeing the message does not close it */
        close(taken);
        listener_consumed(l, 1, &credit_signals);
    }
    for (int i = 0; i < NCLIENTS; i++)
        assert_int_equal(matched[i], 1);
    assert_int_equal(snap(SNAP_ACCEPTS) - accepts_before, NCLIENTS);
    assert_int_equal(credit_signals, 0); /* never starved */
    assert_int_equal(atomic_load(&l->credit.used), 0);

    /* UNLISTEN: the dup goes, the original stays. */
    assert_true(mt_record_signal(&l->rec, MT_LISTENER_UNLISTEN));
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
    double deadline = mt_test_now() + WAIT_MS / 1000.0;
    while (atomic_load(&l->rec.refs) != 1 && mt_test_now() < deadline)
        mt_test_sleep_us(100);
    assert_int_equal(atomic_load(&l->rec.refs), 1);
    mt_record_decref(&l->rec);
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

/* A listener dropped by closing its sink closes its dup without a word;
 * one that never reached a thread closes it when destroyed. */
static void test_listener_drop(void **state)
{
    (void)state;
    struct sockaddr_in addr;
    int lfd = tcp_listener(&addr, 64);
    mt_sink *sink = mt_sink_new();
    assert_non_null(sink);

    int dupfd = dup(lfd);
    mt_listener *l = mt_listener_new(NULL, sink, g_io, dupfd, 0, false);
    assert_non_null(l);
    assert_int_equal(l->credit_limit, MT_ACCEPT_CREDIT_MIN);
    assert_true(mt_record_signal(&l->rec, MT_LISTENER_LISTEN));
    sink_barrier(sink);
    assert_int_equal(snap(SNAP_LISTENERS), 0);
    assert_false(fd_open(dupfd));
    assert_true(mt_mpsc_queue_is_empty(&sink->queue));
    assert_int_equal(atomic_load(&l->rec.refs), 1);
    mt_record_decref(&l->rec);

    dupfd = dup(lfd);
    l = mt_listener_new(NULL, sink, g_io, dupfd, 8, false);
    assert_non_null(l);
    mt_record_decref(&l->rec);
    assert_false(fd_open(dupfd));

    /* The shutdown of the pool drops it too, no completion (a listener's
     * loop half needs none). */
    dupfd = dup(lfd);
    l = mt_listener_new(NULL, sink, g_io, dupfd, 8, false);
    assert_true(mt_record_signal(&l->rec, MT_LISTENER_LISTEN));
    assert_int_equal(wait_listeners(1), 1);
    mt_runtime_shutdown();
    assert_false(fd_open(dupfd));
    assert_true(mt_mpsc_queue_is_empty(&sink->queue));
    assert_int_equal(atomic_load(&l->rec.refs), 1);
    mt_record_decref(&l->rec);
    mt_io_thread *old = g_io;
    assert_int_equal(mt_runtime_acquire(1, &g_io), 0);
    mt_io_thread_decref(old);

    assert_int_equal(atomic_load(&sink->refs), 1);
    mt_sink_decref(sink);
    close(lfd);
}

/* Accept credit: a loop that does not handle its ACCEPT completions gets
 * at most credit_limit connections (the backlog, within
 * MT_ACCEPT_CREDIT_MIN..MAX); the rest wait in the kernel.  Handling some
 * (mt_listener_consumed, CREDIT when it asks) lets more through, never
 * more than the limit ahead of the loop, until all are accepted. */
static void accept_credit_case(int backlog, int expect_limit, int nclients)
{
    struct sockaddr_in addr;
    int lfd = tcp_listener(&addr, nclients + 16);
    mt_sink *sink = mt_sink_new();
    assert_non_null(sink);
    mt_listener *l = mt_listener_new(NULL, sink, g_io, dup(lfd), backlog, false);
    assert_non_null(l);
    assert_int_equal(l->credit_limit, expect_limit);
    int *clients = calloc((size_t)nclients, sizeof(int));
    int *held = calloc((size_t)nclients, sizeof(int)); /* accepted fds not handled */
    assert_non_null(clients);
    assert_non_null(held);
    for (int i = 0; i < nclients; i++)
        clients[i] = tcp_connect(&addr); /* completed by the kernel's backlog */
    uint64_t lost = 0;
    assert_true(mt_record_signal(&l->rec, MT_LISTENER_LISTEN));

    int accepted = 0, handled = 0, nheld = 0, credit_signals = 0, max_ahead = 0;
    /* Phase 1: nothing handled: exactly the limit comes, then nothing. */
    while (accepted < expect_limit) {
        mt_msg *d = sink_next(sink, WAIT_MS, &lost);
        if (d == NULL)
            fail_msg("only %d of %d accepts arrived", accepted, expect_limit);
        assert_int_equal(d->op, MT_LISTENER_ACCEPT);
        held[nheld++] = ((mt_accepted *)mt_msg_data(d))->fd;
        accepted++;
        mt_msg_free(d);
    }
    assert_null(sink_next(sink, QUIET_MS, &lost));
    assert_int_equal(accepted, expect_limit);
    assert_int_equal(atomic_load(&l->credit.used), expect_limit);
    assert_true(atomic_load(&l->credit.starved));

    /* Phase 2: handle down to just above half: no restart yet. */
    int half = expect_limit / 2;
    while (accepted - handled > half) {
        close(held[--nheld]);
        handled++;
        listener_consumed(l, 1, &credit_signals);
    }
    assert_int_equal(credit_signals, 0);
    assert_null(sink_next(sink, QUIET_MS, &lost));
    /* One more: below half, the restart. */
    close(held[--nheld]);
    handled++;
    listener_consumed(l, 1, &credit_signals);
    assert_int_equal(credit_signals, 1);

    /* Phase 3: handle as they come, in bursts, and whatever is held when
     * nothing more comes; never more than the limit ahead of the loop. */
    mt_test_rng rng;
    mt_test_rng_seed(&rng, (uint64_t)backlog);
    double deadline = mt_test_now() + WAIT_MS / 1000.0;
    uint64_t ignored = 0; /* (short waits: a push at the timeout is no loss) */
    while (accepted < nclients) {
        mt_msg *d = sink_next(sink, 20, &ignored);
        if (d == NULL) {
            if (nheld == 0 && mt_test_now() > deadline)
                fail_msg("accept %d of %d never came (%d handled, %d credit signals)",
                         accepted, nclients, handled, credit_signals);
        } else {
            assert_int_equal(d->op, MT_LISTENER_ACCEPT);
            held[nheld++] = ((mt_accepted *)mt_msg_data(d))->fd;
            accepted++;
            mt_msg_free(d);
            if (accepted - handled > max_ahead)
                max_ahead = accepted - handled;
            deadline = mt_test_now() + WAIT_MS / 1000.0;
        }
        if (d == NULL || mt_test_rng_below(&rng, 4) == 0 || accepted == nclients) {
            int n = nheld;
            for (int i = 0; i < n; i++)
                close(held[--nheld]);
            handled += n;
            if (n)
                listener_consumed(l, n, &credit_signals);
        }
    }
    assert_null(sink_next(sink, QUIET_MS, &lost));
    print_message("backlog %d: limit %d, %d connections, %d credit signals, at most %d "
                  "ahead\n",
                  backlog, expect_limit, nclients, credit_signals, max_ahead);
    assert_true(max_ahead <= expect_limit);
    assert_int_equal(accepted, nclients);
    assert_int_equal(handled, nclients);
    assert_int_equal(atomic_load(&l->credit.used), 0);
    assert_int_equal(lost, 0);

    assert_true(mt_record_signal(&l->rec, MT_LISTENER_UNLISTEN));
    assert_int_equal(wait_listeners(0), 0);
    deadline = mt_test_now() + WAIT_MS / 1000.0;
    while (atomic_load(&l->rec.refs) != 1 && mt_test_now() < deadline)
        mt_test_sleep_us(100);
    mt_record_decref(&l->rec);
    sink_barrier(sink);
    assert_int_equal(atomic_load(&sink->refs), 1);
    mt_sink_decref(sink);
    for (int i = 0; i < nclients; i++)
        close(clients[i]);
    free(clients);
    free(held);
    close(lfd);
}

static void test_listener_accept_credit(void **state)
{
    (void)state;
    accept_credit_case(0, MT_ACCEPT_CREDIT_MIN, 3 * MT_ACCEPT_CREDIT_MIN + 5);
    accept_credit_case(40, 40, 100);
    accept_credit_case(200, 200, 240);

    /* Above the kernel's own cap (somaxconn) the limit stops growing. */
    mt_sink *sink = mt_sink_new();
    assert_non_null(sink);
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    assert_true(fd >= 0);
    mt_listener *l = mt_listener_new(NULL, sink, g_io, fd, 100000, false);
    assert_non_null(l);
    assert_int_equal(l->credit_limit, MT_ACCEPT_CREDIT_MAX);
    mt_record_decref(&l->rec); /* never listened: closes fd */
    mt_sink_decref(sink);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_teardown(test_read_exact, h_teardown),
        cmocka_unit_test_teardown(test_read_on_off, h_teardown),
        cmocka_unit_test_teardown(test_read_credit, h_teardown),
        cmocka_unit_test_teardown(test_read_charge_min, h_teardown),
        cmocka_unit_test_teardown(test_peer_close_eof, h_teardown),
        cmocka_unit_test_teardown(test_peer_reset, h_teardown),
        cmocka_unit_test_teardown(test_write_order, h_teardown),
        cmocka_unit_test_teardown(test_write_drained, h_teardown),
        cmocka_unit_test_teardown(test_close_flushes, h_teardown),
        cmocka_unit_test_teardown(test_abort_drops_output, h_teardown),
        cmocka_unit_test_teardown(test_write_ref, h_teardown),
        cmocka_unit_test_teardown(test_shut_wr, h_teardown),
        cmocka_unit_test_teardown(test_sendfile, h_teardown),
        cmocka_unit_test_teardown(test_sink_close_and_shutdown, h_teardown),
        cmocka_unit_test_teardown(test_fd_ownership, h_teardown),
        cmocka_unit_test_teardown(test_watch_failure_fails_the_flow, h_teardown),
        cmocka_unit_test_teardown(test_listener_accepts, h_teardown),
        cmocka_unit_test_teardown(test_listener_drop, h_teardown),
        cmocka_unit_test_teardown(test_listener_accept_credit, h_teardown),
    };
    return flow_check_threads(cmocka_run_group_tests(tests, flow_setup, flow_teardown));
}
