/* The fd operations of a pipe flow (pipes, FIFOs, character devices such
 * as ptys, and sockets handed to connect_*_pipe): see flow.h.
 *
 * A pipe has no shutdown of its own: asyncio ends a write pipe by closing
 * it (write_eof() is close()), which the pump's CLOSE already does.  No
 * sendfile either: loop.sendfile() on a pipe is not asyncio's API. */
#include "transport/flow.h"

#include <unistd.h>

static ssize_t pipe_read(mt_flow *f, void *buf, size_t len)
{
    return read(f->fd, buf, len);
}

/* writev() can raise SIGPIPE where send() would not.  The I/O threads run
 * with every signal blocked (runtime.c), so a broken pipe is an EPIPE
 * there; on the loop thread (a direct send) it is what os.write() gives
 * the stock loop, under Python's SIGPIPE disposition (ignored by
 * default). */
static ssize_t pipe_writev(mt_flow *f, const struct iovec *iov, int cnt)
{
    return writev(f->fd, iov, cnt);
}

const mt_fd_ops mt_pipe_fd_ops = {
    .read = pipe_read,
    .writev = pipe_writev,
    .loop_may_write = true,
};

/* The write end of a pipe reads nothing: readiness for reading there is
 * the kernel saying the read end is gone (EPOLLERR on a pipe or FIFO,
 * EOF or data on a socket), which asyncio's write pipe takes as "closed by
 * the peer" without reading.  It is reported as EOF; the transport decides
 * what that means (mtloop/_pipes.py). */
static ssize_t pipe_peer_gone(mt_flow *f, void *buf, size_t len)
{
    (void)f;
    (void)buf;
    (void)len;
    return 0;
}

const mt_fd_ops mt_pipe_writer_fd_ops = {
    .read = pipe_peer_gone,
    .writev = pipe_writev,
    .loop_may_write = true,
};
