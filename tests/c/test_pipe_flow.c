/* Unit tests for the pipe fd operations (src/transport/pipe_ops.c) under
 * the flow pump, over real pipes and a real I/O thread.  The harness
 * (flow_harness.h) plays the loop half and the pipe's other end. */
#include "flow_harness.h"

#include <signal.h>

/* A flow on one end of a fresh pipe; the harness holds the other. */
static void open_pipe(harness *h, bool flow_reads)
{
    int p[2];
    assert_int_equal(pipe2(p, O_CLOEXEC), 0);
    if (flow_reads)
        h_open_ops(h, &mt_pipe_fd_ops, p[0], p[1]);
    else
        h_open_ops(h, &mt_pipe_writer_fd_ops, p[1], p[0]);
    h->peer_pipe = true;
}

static void close_peer(harness *h)
{
    close(h->peer);
    h->peer = -1;
}

/* A read end: megabytes arrive as DATA in order, then one EOF when the
 * write end closes. */
static void test_read_end(void **state)
{
    (void)state;
    harness *h = &g_h;
    open_pipe(h, true);
    size_t total = MT_TEST_SCALE(4, 1) * 1024 * 1024 + 777;
    h_set_in(h, total, 21);
    h_reading(h, true);
    assert_true(h_run(h, rx_all, 4 * WAIT_MS));
    close_peer(h);
    assert_true(h_run(h, eof_seen, WAIT_MS));
    h_quiet(h, QUIET_MS);
    h_assert_clean_eof(h, total);
    h_close_released(h);
    h_finish(h);
}

/* A write end: batched writes reach the reader byte for byte; CLOSE
 * flushes them first, and the reader sees EOF once the loop lets go. */
static void test_write_end(void **state)
{
    (void)state;
    harness *h = &g_h;
    open_pipe(h, false);
    h_reading(h, true); /* watches for the reader going away, reads nothing */
    size_t total = MT_TEST_SCALE(2048, 512) * 1024;
    h_write_many(h, total, 64 * 1024, 22);
    h_signal(h, MT_FLOW_CLOSE);
    h_quiet(h, QUIET_MS);
    assert_int_equal(h->n_released, 0); /* the pipe holds 64 KiB */
    h->peer_reading = true;
    assert_true(h_run(h, released_seen, 4 * WAIT_MS));
    assert_int_equal(h->released_err, 0);
    assert_int_equal(h->released_flushed, total);
    assert_true(h_run(h, peer_rx_all, WAIT_MS));
    h_drop_fd(h);
    assert_true(h_run(h, peer_eof_seen, WAIT_MS));
    assert_int_equal(h->peer_rx_at_eof, total);
    assert_int_equal(h->peer_rx_bad, 0);
    assert_int_equal(h->n_data + h->n_eof + h->n_write_error, 0);
    h_finish(h);
}

/* The reader goes away from an idle write end: EOF, the write end's way
 * of saying so, and no data. */
static void test_write_end_reader_gone(void **state)
{
    (void)state;
    harness *h = &g_h;
    open_pipe(h, false);
    h_reading(h, true);
    h_quiet(h, QUIET_MS);
    assert_int_equal(h->n_eof, 0); /* an open reader says nothing */
    close_peer(h);
    assert_true(h_run(h, eof_seen, WAIT_MS));
    h_quiet(h, QUIET_MS);
    assert_int_equal(h->n_eof, 1);
    assert_int_equal(h->n_data, 0);
    h_close_released(h);
    h_finish(h);
}

/* Output queued when the reader goes: WRITE_ERROR with EPIPE comes before
 * the DRAINED that dropping the output reaches, so a paused writer learns
 * of the failure first. */
static void test_write_end_epipe_before_drained(void **state)
{
    (void)state;
    harness *h = &g_h;
    open_pipe(h, false);
    size_t total = 1024 * 1024;
    h_write_many(h, total, 64 * 1024, 23);
    assert_false(mt_flow_arm_resume(h->f, total)); /* DRAINED once all of it is gone */
    h_quiet(h, QUIET_MS);
    assert_int_equal(h->n_drained, 0);
    close_peer(h);
    assert_true(h_run(h, drained_seen, WAIT_MS));
    assert_int_equal(h->n_write_error, 1);
    assert_int_equal(h->write_err, EPIPE);
    assert_true(h->write_error_before_drained);
    h_signal(h, MT_FLOW_CLOSE);
    assert_true(h_run(h, released_seen, WAIT_MS));
    h_finish(h);
}

int main(void)
{
    /* The harness writes to pipes whose reader may be gone. */
    signal(SIGPIPE, SIG_IGN);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_teardown(test_read_end, h_teardown),
        cmocka_unit_test_teardown(test_write_end, h_teardown),
        cmocka_unit_test_teardown(test_write_end_reader_gone, h_teardown),
        cmocka_unit_test_teardown(test_write_end_epipe_before_drained, h_teardown),
    };
    return flow_check_threads(cmocka_run_group_tests(tests, flow_setup, flow_teardown));
}
