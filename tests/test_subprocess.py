"""Subprocesses: loop.subprocess_exec()/subprocess_shell() and
asyncio.create_subprocess_*(), on the stock loop, uvloop and mtloop.

What a child sees (its arguments, environment, descriptors, session) is
checked from inside the child; what the parent sees (output, return codes,
errors, the order of protocol callbacks) is compared with what the stock
loop gives.  Children are short-lived Python or coreutils processes; none
is left behind (each test checks its pids are reaped).
"""

import asyncio
import grp
import hashlib
import os
import pty
import pwd
import signal
import subprocess
import sys
import time

import pytest

from procutil import open_fds, run_on_new_thread

PY = sys.executable
PIPE = asyncio.subprocess.PIPE
# tools/sanitize.sh preloads the sanitizer's runtime into the test process,
# and every child inherits it; dash crashes under TSan's.  Shell children
# get the environment without it (None, inherit everything, otherwise).
SH_ENV = ({k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
          if "LD_PRELOAD" in os.environ else None)


def reaped(pid):
    """True when `pid` is no child of ours any more (not running, and no
    zombie either).  Reads /proc rather than calling waitpid(), which would
    reap the child itself."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state, ppid = f.read().rsplit(")", 1)[1].split()[:2]
    except (FileNotFoundError, ProcessLookupError):  # gone, before or while reading
        return True
    return int(ppid) != os.getpid()


def wait_reaped(pid, timeout=5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if reaped(pid):
            return True
        time.sleep(0.01)
    return False


async def py(code, *args, **kwargs):
    return await asyncio.create_subprocess_exec(PY, "-c", code, *args, **kwargs)


# ---- basics -----------------------------------------------------------------


def test_exec_communicate_with_input(loop, run):
    async def main():
        proc = await py("import sys; d = sys.stdin.buffer.read(); "
                        "sys.stdout.buffer.write(d.upper()); sys.stderr.write('e' * 3)",
                        stdin=PIPE, stdout=PIPE, stderr=PIPE)
        out, err = await proc.communicate(b"hello")
        return proc.pid, out, err, proc.returncode

    pid, out, err, rc = run(main())
    assert (out, err, rc) == (b"HELLO", b"eee", 0)
    assert reaped(pid)


def test_exec_communicate_without_input(loop, run):
    async def main():
        proc = await py("print('out')", stdout=PIPE)
        out, err = await proc.communicate()
        return out, err, proc.returncode

    assert run(main()) == (b"out\n", None, 0)


def test_shell_and_exit_codes(loop, run):
    async def main():
        codes = []
        for cmd in ("exit 0", "exit 3", "exit 255", "kill -TERM $$"):
            proc = await asyncio.create_subprocess_shell(cmd, env=SH_ENV)
            codes.append(await proc.wait())
        out = await asyncio.create_subprocess_shell("echo $((6*7))", stdout=PIPE, env=SH_ENV)
        return codes, (await out.communicate())[0]

    codes, out = run(main())
    assert codes == [0, 3, 255, -signal.SIGTERM]
    assert out == b"42\n"


def test_streams_interactive(loop, run):
    async def main():
        proc = await py("import sys\nfor line in sys.stdin:\n"
                        "    sys.stdout.write(line[::-1][1:] + '\\n'); sys.stdout.flush()",
                        stdin=PIPE, stdout=PIPE)
        got = []
        for word in (b"abc", b"hello", b"xyz"):
            proc.stdin.write(word + b"\n")
            await proc.stdin.drain()
            got.append(await proc.stdout.readline())
        proc.stdin.close()
        await proc.stdin.wait_closed()
        rest = await proc.stdout.read()
        return got, rest, await proc.wait()

    got, rest, rc = run(main())
    assert got == [b"cba\n", b"olleh\n", b"zyx\n"]
    assert (rest, rc) == (b"", 0)


def test_protocol_callback_order(loop, run):
    class Proto(asyncio.SubprocessProtocol):
        def __init__(self):
            self.events = []
            self.done = loop.create_future()

        def connection_made(self, transport):
            self.events.append("made")

        def pipe_data_received(self, fd, data):
            self.events.append(("data", fd, data))

        def pipe_connection_lost(self, fd, exc):
            self.events.append(("pipe_lost", fd, exc))

        def process_exited(self):
            self.events.append("exited")

        def connection_lost(self, exc):
            self.events.append(("lost", exc))
            self.done.set_result(None)

    async def main():
        proto = Proto()
        transport, _ = await loop.subprocess_exec(
            lambda: proto, PY, "-c", "import os; os.write(1, b'o'); os.write(2, b'e')",
            stdin=None, stdout=PIPE, stderr=PIPE)
        await asyncio.wait_for(proto.done, 10)
        assert transport.get_returncode() == 0
        assert transport.get_pipe_transport(1) is not None
        transport.close()
        return proto.events

    events = run(main())
    assert events[0] == "made"
    assert events[-1] == ("lost", None)
    assert set(events[1:-1]) == {("data", 1, b"o"), ("data", 2, b"e"), ("pipe_lost", 1, None),
                                  ("pipe_lost", 2, None), "exited"}
    # Each pipe's data comes before its end.
    assert events.index(("data", 1, b"o")) < events.index(("pipe_lost", 1, None))
    assert events.index(("data", 2, b"e")) < events.index(("pipe_lost", 2, None))


# ---- arguments ----------------------------------------------------------------


def test_stdio_redirections(loop, run, tmp_path):
    path = tmp_path / "out"

    async def main():
        results = {}
        # stderr to stdout
        p = await py("import sys; sys.stdout.write('o'); sys.stdout.flush(); sys.stderr.write('e')",
                     stdout=PIPE, stderr=asyncio.subprocess.STDOUT)
        results["stdout"] = (await p.communicate())[0]
        # DEVNULL in and out
        p = await py("import sys; assert sys.stdin.read() == ''; print('gone')",
                     stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL)
        results["devnull"] = await p.wait()
        # a file object and an fd
        with open(path, "wb") as f:
            p = await py("print('to a file')", stdout=f)
            await p.wait()
            p = await py("print('to an fd')", stdout=f.fileno())
            await p.wait()
        return results

    results = run(main())
    assert sorted(results["stdout"]) == sorted(b"oe")
    assert results["devnull"] == 0
    assert path.read_bytes() == b"to a file\nto an fd\n"


@pytest.mark.uvloop_xfail("uvloop rejects umask (ValueError: unexpected kwargs)")
def test_cwd_env_umask_session_group(loop, run, tmp_path):
    code = ("import os, json; print(json.dumps([os.getcwd(), os.environ.get('MTLOOP_T'), "
            "os.umask(0), os.getsid(0) == os.getpid(), os.getpgid(0) == os.getpid()]))")

    async def main():
        p = await py(code, stdout=PIPE, cwd=tmp_path, env={"MTLOOP_T": "yes"},
                     umask=0o027, start_new_session=True)
        a = (await p.communicate())[0]
        p = await py(code, stdout=PIPE, process_group=0)
        b = (await p.communicate())[0]
        return a, b

    import json
    a, b = (json.loads(x) for x in run(main()))
    assert a == [str(tmp_path), "yes", 0o027, True, True]
    assert b[3] is False and b[4] is True  # own group, not own session


def test_pass_fds_close_fds_preexec_fn(loop, run):
    r, w = os.pipe()
    extra_r, extra_w = os.pipe()

    def preexec():
        os.environ["MTLOOP_PREEXEC"] = "ran"

    async def main():
        p = await py(f"import os; os.write({w}, b'passed'); "
                     "print(os.environ.get('MTLOOP_PREEXEC'))",
                     stdout=PIPE, pass_fds=(w,), preexec_fn=preexec)
        out = (await p.communicate())[0]
        p = await py(f"import os\ntry:\n    os.fstat({extra_w}); print('open')\n"
                     "except OSError:\n    print('closed')", stdout=PIPE, close_fds=True)
        closed = (await p.communicate())[0]
        return out, closed

    try:
        out, closed = run(main())
        assert out == b"ran\n"
        assert os.read(r, 100) == b"passed"
        assert closed == b"closed\n"
    finally:
        for fd in (r, w, extra_r, extra_w):
            os.close(fd)


@pytest.mark.uvloop_xfail("uvloop rejects user, group and extra_groups")
def test_user_group_extra_groups(loop, run):
    uid, gid = os.getuid(), os.getgid()
    user = pwd.getpwuid(uid).pw_name
    group = grp.getgrgid(gid).gr_name
    kwargs = dict(user=user, group=group)
    if uid == 0:
        kwargs["extra_groups"] = [gid]

    async def main():
        p = await py("import os; print(os.getuid(), os.getgid())", stdout=PIPE, **kwargs)
        return (await p.communicate())[0]

    assert run(main()) == f"{uid} {gid}\n".encode()


@pytest.mark.parametrize("kwargs", [
    dict(universal_newlines=True), dict(text=True), dict(encoding="utf-8"),
    dict(errors="strict"), dict(bufsize=1),
])
@pytest.mark.parametrize("shell", [False, True])
def test_text_mode_arguments_rejected(loop, run, kwargs, shell):
    async def main():
        if shell:
            await loop.subprocess_shell(asyncio.SubprocessProtocol, "true", **kwargs)
        else:
            await loop.subprocess_exec(asyncio.SubprocessProtocol, "true", **kwargs)

    with pytest.raises(ValueError):
        run(main())


@pytest.mark.uvloop_xfail("uvloop raises TypeError for a list given to subprocess_shell")
def test_shell_needs_a_string_and_exec_no_shell(loop, run):
    async def main():
        with pytest.raises(ValueError):
            await loop.subprocess_shell(asyncio.SubprocessProtocol, ["true"])
        with pytest.raises(ValueError):
            await loop.subprocess_exec(asyncio.SubprocessProtocol, "true", shell=True)

    run(main())


def test_missing_program_raises(loop, run):
    async def main():
        with pytest.raises(FileNotFoundError):
            await asyncio.create_subprocess_exec("/nonexistent/mtloop-program", stdout=PIPE)

    run(main())


# ---- signals, kills, closing ----------------------------------------------------


def test_kill_terminate_send_signal(loop, run):
    async def main():
        codes = []
        for how in ("kill", "terminate", "send_signal"):
            p = await py("import time; time.sleep(30)")
            if how == "send_signal":
                p.send_signal(signal.SIGINT)
            else:
                getattr(p, how)()
            codes.append(await p.wait())
        return codes

    assert run(main()) == [-signal.SIGKILL, -signal.SIGTERM, -signal.SIGINT]


def test_signals_after_exit_raise_process_lookup_error(loop, run):
    async def main():
        p = await asyncio.create_subprocess_exec("true")
        await p.wait()
        # wait() returns at once for a child that exited before it was
        # called, on every loop, while the transport's connection_lost() is
        # still scheduled: the signals raise once that ran.
        for _ in range(5):
            await asyncio.sleep(0)
        for call in (p.kill, p.terminate, lambda: p.send_signal(signal.SIGTERM)):
            with pytest.raises(ProcessLookupError):
                call()

    run(main())


def test_closing_the_transport_kills_a_running_child(loop, run):
    async def main():
        transport, proto = await loop.subprocess_exec(
            asyncio.SubprocessProtocol, PY, "-c", "import time; time.sleep(30)")
        pid = transport.get_pid()
        transport.close()
        for _ in range(500):
            if transport.get_returncode() is not None:
                break
            await asyncio.sleep(0.01)
        return pid, transport.get_returncode()

    pid, rc = run(main())
    assert rc == -signal.SIGKILL
    assert wait_reaped(pid)


def test_child_closing_stdin_early(loop, run):
    async def main():
        p = await py("import os; os.close(0)", stdin=PIPE)
        # communicate() ignores the broken pipe, as asyncio documents.
        await p.communicate(b"x" * (4 * 1024 * 1024))
        return p.returncode

    assert run(main()) == 0


def test_drain_reports_a_broken_stdin(loop, run):
    r, w = os.pipe()

    async def main():
        p = await py(f"import os; os.read({r}, 1)", stdin=PIPE, pass_fds=(r,))
        p.stdin.write(b"x" * (4 * 1024 * 1024 + 1))
        os.write(w, b"go")  # the child exits without reading its stdin
        with pytest.raises((BrokenPipeError, ConnectionResetError)):
            await p.stdin.drain()
        return await p.wait()

    try:
        assert run(main()) == 0
    finally:
        os.close(r)
        os.close(w)


# ---- volume and concurrency --------------------------------------------------------


def test_100mb_both_ways_through_cat(loop, run):
    payload = os.urandom(1024 * 1024) * 100

    async def main():
        p = await asyncio.create_subprocess_exec("cat", stdin=PIPE, stdout=PIPE)
        out, _ = await p.communicate(payload)
        return out, p.returncode

    out, rc = run(main(), timeout=60)
    assert rc == 0
    assert len(out) == len(payload)
    assert hashlib.sha256(out).digest() == hashlib.sha256(payload).digest()


def test_200_concurrent_children(loop, run):
    async def one(i):
        p = await asyncio.create_subprocess_exec("sh", "-c", f"echo {i}; exit {i % 7}",
                                                 stdout=PIPE, env=SH_ENV)
        out, _ = await p.communicate()
        return p.pid, int(out), p.returncode

    async def main():
        return await asyncio.gather(*(one(i) for i in range(200)))

    results = run(main(), timeout=60)
    assert [(n, rc) for _, n, rc in results] == [(i, i % 7) for i in range(200)]
    assert all(reaped(pid) for pid, _, _ in results)


@pytest.mark.uvloop_xfail("uvloop never hands over the child's answer read from the pty "
                         "master while the parent holds the slave side open")
def test_pty_both_ways(loop, run):
    # The parent keeps its slave side open until the answer is read: once
    # the child exits, the master would read EIO, which the stock loop
    # reports before data it has not handed over yet (test_pipes.py covers
    # how each loop ends on EIO).
    master, slave = pty.openpty()

    async def main():
        p = await py("import sys; line = sys.stdin.readline(); print('got', line.strip())",
                     stdin=slave, stdout=slave)
        mpipe = open(master, "r+b", buffering=0)
        reader = asyncio.StreamReader()
        rt, _ = await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader),
                                              mpipe)
        wt, _ = await loop.connect_write_pipe(asyncio.Protocol, os.fdopen(os.dup(master), "wb", 0))
        wt.write(b"over the pty\n")
        out = b""
        while b"got over the pty" not in out:
            chunk = await asyncio.wait_for(reader.read(1024), 5)
            assert chunk, out
            out += chunk
        rc = await p.wait()
        wt.close()
        rt.close()
        return rc

    try:
        assert run(main()) == 0
    finally:
        os.close(slave)


# ---- watching children ------------------------------------------------------------------


def test_subprocess_from_a_loop_in_another_thread(loop_factory):
    async def main():
        p = await py("print('thread')", stdout=PIPE)
        out, _ = await p.communicate()
        return out, p.returncode, p.pid

    out, rc, pid = run_on_new_thread(loop_factory, main)
    assert (out, rc) == (b"thread\n", 0)
    assert reaped(pid)


@pytest.mark.uvloop_xfail("uvloop replaces the application's SIGCHLD handler")
def test_application_children_and_sigchld_handler_left_alone(loop, run):
    # A child the application started and waits for itself, and its own
    # SIGCHLD handler, keep working while the loop runs subprocesses.
    calls = []
    old = signal.signal(signal.SIGCHLD, lambda *a: calls.append(1))
    try:
        own = subprocess.Popen([PY, "-c", "import time; time.sleep(0.3)"])

        async def main():
            ps = [await asyncio.create_subprocess_exec("true") for _ in range(5)]
            return [await p.wait() for p in ps]

        assert run(main()) == [0] * 5
        _, status = os.waitpid(own.pid, 0)  # not stolen by the loop's watcher
        assert os.waitstatus_to_exitcode(status) == 0
        own.returncode = 0
        assert calls  # the application's handler still runs
    finally:
        signal.signal(signal.SIGCHLD, old)


@pytest.mark.uvloop_xfail("uvloop leaves a zombie when the loop closes before the child exits")
def test_no_zombie_when_the_loop_closes_with_a_running_child(loop_factory, impl, request):
    if impl.name == "asyncio" and sys.version_info >= (3, 12):
        # Not the spec here: issue #11 asks mtloop for more than the stock loop.
        request.applymarker(pytest.mark.xfail(
            strict=True, reason="the stock loop's default pidfd watcher (3.12+) "
            "watches on the loop, so a child exiting after the loop closed stays a zombie"))
    lp = loop_factory()
    try:
        async def main():
            transport, _ = await lp.subprocess_exec(
                asyncio.SubprocessProtocol, PY, "-c", "import time; time.sleep(0.3)")
            return transport

        transport = lp.run_until_complete(main())
        pid = transport.get_pid()
        transport.close()  # kills it; the exit may come after the loop closed
    finally:
        lp.close()
    assert wait_reaped(pid)


@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
def test_fork_with_children_running(loop_factory, loop, run):
    # The forked process gets a loop of its own, whose children it watches;
    # the parent's watch of its child is undisturbed.
    async def main():
        p = await py("import time; time.sleep(0.3)")
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                child_loop = loop_factory()

                async def in_child():
                    q = await py("print('child')", stdout=PIPE)
                    return (await q.communicate())[0], q.returncode

                if child_loop.run_until_complete(in_child()) == (b"child\n", 0):
                    code = 0
                child_loop.close()
            finally:
                os._exit(code)
        forked_status = await loop.run_in_executor(None, os.waitpid, pid, 0)
        return await p.wait(), os.waitstatus_to_exitcode(forked_status[1])

    assert run(main()) == (0, 0)


def test_subprocesses_leak_no_fd(loop, run):
    async def main():
        for _ in range(10):
            p = await py("import sys; sys.stdout.write(sys.stdin.read())",
                         stdin=PIPE, stdout=PIPE, stderr=PIPE)
            await p.communicate(b"data")
        await asyncio.sleep(0.1)  # I/O threads let go of their copies

    run(main())  # the first round may open the loop's own descriptors
    before = open_fds()
    run(main())
    assert open_fds() == before


def test_exits_seen_without_pidfds(loop, run, monkeypatch):
    # mtloop's fallback where pidfds are missing: a waitpid() thread per
    # child.  The other loops ignore the variable; the outcome is the same.
    monkeypatch.setenv("MTLOOP_PIDFD", "0")

    async def main():
        p = await py("import sys; sys.exit(sys.stdin.read().count('x'))", stdin=PIPE)
        await p.communicate(b"xxxx")
        q = await py("import time; time.sleep(30)")
        q.kill()
        many = [await asyncio.create_subprocess_exec("true") for _ in range(20)]
        return p.returncode, await q.wait(), [await m.wait() for m in many], q.pid

    rc, killed, many, pid = run(main())
    assert (rc, killed, many) == (4, -signal.SIGKILL, [0] * 20)
    assert reaped(pid)
