"""Subprocesses: asyncio's base_subprocess machinery over mtloop's pipe
transports, with each child's exit watched through a pidfd.

BaseEventLoop.subprocess_exec()/subprocess_shell() check the arguments as
the stock loop does and call _make_subprocess_transport() here.  The
transport is asyncio's BaseSubprocessTransport, so pipe_data_received(),
pipe_connection_lost() and process_exited() come in asyncio's order; its
pipes are connected with connect_read_pipe()/connect_write_pipe(), so
their I/O runs on the I/O threads (mtloop._pipes).

Child exit: the loop watches a pidfd per child (Linux 5.3+,
os.pidfd_open()), which becomes readable when that child exits, and reaps
it with waitid(P_PIDFD): no helper thread, no polling, no SIGCHLD handler,
and no wait for any child but our own, so an application's SIGCHLD handler
or os.waitpid() is left alone.  It works from a loop in any thread.
Where pidfds are missing (an older kernel, a seccomp filter, or
MTLOOP_PIDFD=0), a thread per child blocks in waitpid() instead, as
asyncio's ThreadedChildWatcher does.

No zombies: a child whose transport was closed is still reaped when it
exits; children still running when the loop closes are handed to a thread
that waits for them.
"""

from __future__ import annotations

import errno
import os
import subprocess
import threading
from asyncio import base_subprocess
from asyncio.log import logger
from typing import Any

__all__ = ["SubprocessMethods", "SubprocessTransport"]


class SubprocessTransport(base_subprocess.BaseSubprocessTransport):
    """asyncio's subprocess transport, started with subprocess.Popen as the
    stock Unix loop starts it."""

    def _start(self, args: Any, shell: bool, stdin: Any, stdout: Any, stderr: Any,
               bufsize: int, **kwargs: Any) -> None:
        self._proc = subprocess.Popen(
            args, shell=shell, stdin=stdin, stdout=stdout, stderr=stderr,
            universal_newlines=False, bufsize=bufsize, **kwargs)


def _use_pidfd() -> bool:
    return (hasattr(os, "pidfd_open") and hasattr(os, "P_PIDFD")
            and os.environ.get("MTLOOP_PIDFD", "1") != "0")


def _exit_code(transport: SubprocessTransport, status: int | None) -> int:
    """The returncode for a wait status; None: somebody else reaped the child."""
    if status is not None:
        return os.waitstatus_to_exitcode(status)
    proc = transport._proc
    if proc is not None and proc.returncode is not None:
        return proc.returncode  # Popen.poll() reaped it (close(), send_signal() on 3.11)
    logger.warning("child process pid %d exit status already read: "
                   "will report returncode 255", transport.get_pid())
    return 255


def _reap(pidfd: int, pid: int) -> int | None:
    """Reaps the child behind `pidfd` if it exited: its wait status (as
    os.waitpid() gives it), or None when it was reaped elsewhere.  Raises
    BlockingIOError while it still runs."""
    try:
        res = os.waitid(os.P_PIDFD, pidfd, os.WEXITED | os.WNOHANG)
    except ChildProcessError:
        return None
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            raise
        # Linux 5.3 has pidfd_open() but not waitid(P_PIDFD): the pidfd
        # said the child exited, so its pid cannot have been reused.
        try:
            done, status = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            return None
        if done == 0:
            raise BlockingIOError from None
        return status
    if res is None:
        raise BlockingIOError
    if res.si_code == os.CLD_EXITED:
        return (res.si_status & 0xFF) << 8
    return res.si_status & 0x7F  # killed or dumped: the signal number


def _reap_in_thread(pids: list[int]) -> None:
    def reap() -> None:
        for pid in pids:
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass
    threading.Thread(target=reap, name="mtloop-reaper", daemon=True).start()


class SubprocessMethods:
    """Mixin for mtloop.Loop (needs the LoopCore base and BaseEventLoop)."""

    # pidfd -> (pid, transport) for the children the loop watches.
    _mt_children: dict[int, tuple[int, SubprocessTransport]]

    async def _make_subprocess_transport(self, protocol: Any, args: Any, shell: bool,
                                         stdin: Any, stdout: Any, stderr: Any, bufsize: int,
                                         extra: dict | None = None,
                                         **kwargs: Any) -> SubprocessTransport:
        waiter = self.create_future()
        transport = SubprocessTransport(self, protocol, args, shell, stdin, stdout, stderr,
                                        bufsize, waiter=waiter, extra=extra, **kwargs)
        self._mt_watch_child(transport)
        try:
            await waiter
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException:
            transport.close()
            await transport._wait()
            raise
        return transport

    def _mt_watch_child(self, transport: SubprocessTransport) -> None:
        pid = transport.get_pid()
        if _use_pidfd():
            try:
                pidfd = os.pidfd_open(pid)
            except ProcessLookupError:
                # Reaped already (by Popen, or an application's waitpid(-1)).
                self.call_soon(transport._process_exited, _exit_code(transport, None))
                return
            except OSError as exc:
                if self.get_debug():
                    logger.debug("pidfd_open() failed (%s): a thread waits for pid %d",
                                 exc, pid)
            else:
                self._mt_children[pidfd] = (pid, transport)
                self._add_reader(pidfd, self._mt_child_ready, pidfd)
                return
        threading.Thread(target=self._mt_wait_child_thread, args=(transport,),
                         name=f"mtloop-waitpid-{pid}", daemon=True).start()

    def _mt_child_ready(self, pidfd: int) -> None:
        pid, transport = self._mt_children[pidfd]
        try:
            status = _reap(pidfd, pid)
        except BlockingIOError:
            return  # not exited after all
        del self._mt_children[pidfd]
        self._remove_reader(pidfd)
        os.close(pidfd)
        # Reported on the next iteration, as the stock loop's watchers
        # report it (through call_soon_threadsafe): a task that was about
        # to call wait() gets there first.
        self.call_soon(transport._process_exited, _exit_code(transport, status))

    def _mt_wait_child_thread(self, transport: SubprocessTransport) -> None:
        pid = transport.get_pid()
        try:
            _, status = os.waitpid(pid, 0)
        except ChildProcessError:
            status = None
        try:
            self.call_soon_threadsafe(self._mt_child_exited, transport, status)
        except RuntimeError:
            pass  # the loop closed: the child is reaped, nobody is waiting

    def _mt_child_exited(self, transport: SubprocessTransport, status: int | None) -> None:
        transport._process_exited(_exit_code(transport, status))

    def _mt_close_children(self) -> None:
        """The loop closes: its children still running are reaped by a
        thread, so none stays a zombie."""
        children, self._mt_children = self._mt_children, {}
        for pidfd in children:
            self._remove_reader(pidfd)
            os.close(pidfd)
        if children:
            _reap_in_thread([pid for pid, _ in children.values()])
