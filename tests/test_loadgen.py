"""tools/loadgen.c (mtloop-loadgen): built with CMake, run against small
threaded Python echo servers (TCP, Unix socket and TLS), a corrupting one
and a closing one.  Not parametrized over event loops: the servers here are plain
threads, the subject is the C load generator itself."""

import json
import os
import shutil
import socket
import socketserver
import ssl
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
RUN_TIMEOUT = 30


def _tool(name):
    """`name` on PATH, looking first next to this interpreter (the venvs
    carry cmake and ninja)."""
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    return shutil.which(name, path=path)


@pytest.fixture(scope="session")
def loadgen(tmp_path_factory):
    """Path of mtloop-loadgen, built once per session in a temporary tree."""
    cmake = _tool("cmake")
    if cmake is None:
        pytest.fail("cmake not found on PATH nor next to %s" % sys.executable)
    build = tmp_path_factory.mktemp("loadgen-build")
    configure = [cmake, "-S", str(REPO), "-B", str(build),
                 "-DMTLOOP_BUILD_TOOLS=ON", "-DCMAKE_BUILD_TYPE=RelWithDebInfo"]
    ninja = _tool("ninja")
    if ninja is not None:
        configure += ["-G", "Ninja", "-DCMAKE_MAKE_PROGRAM=" + ninja]
    for cmd in (configure,
                [cmake, "--build", str(build), "--target", "mtloop-loadgen"]):
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, timeout=300)
        if proc.returncode != 0:
            pytest.fail("building mtloop-loadgen failed: %s\n%s" % (cmd, proc.stdout))
    exe = build / "tools" / "mtloop-loadgen"
    assert exe.is_file(), exe
    return exe


def run_loadgen(exe, *args):
    return subprocess.run([str(exe), *map(str, args)], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, timeout=RUN_TIMEOUT)


def run_json(exe, *args):
    proc = run_loadgen(exe, "--json", *args)
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1, (proc.stdout, proc.stderr)
    return proc, json.loads(lines[0])


# --------------------------------------------------------------------------
# Servers


class EchoHandler(socketserver.BaseRequestHandler):
    """Echoes everything; `transform(data, offset)` may alter each chunk
    (offset: bytes of this connection's stream before it); a `close_after`
    on the server closes the connection once that many bytes were echoed."""

    def handle(self):
        sock = self.request
        transform = getattr(self.server, "transform", None)
        close_after = getattr(self.server, "close_after", None)
        offset = 0
        try:
            while True:
                data = sock.recv(65536)
                if not data:
                    return
                if close_after is not None and offset + len(data) >= close_after:
                    sock.sendall(data[: close_after - offset])
                    return
                if transform is not None:
                    data = transform(data, offset)
                sock.sendall(data)
                offset += len(data)
        except OSError:
            pass


class TCPServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128


class UnixServer(socketserver.ThreadingUnixStreamServer):
    daemon_threads = True
    request_queue_size = 128


def _serve(server):
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    return thread


def _stop(server, thread):
    server.shutdown()
    server.server_close()
    thread.join(5)


@pytest.fixture
def tcp_server():
    """A factory: tcp_server(**attrs) -> port of a threaded echo server."""
    started = []

    def start(**attrs):
        server = TCPServer(("127.0.0.1", 0), EchoHandler)
        for k, v in attrs.items():
            setattr(server, k, v)
        started.append((server, _serve(server)))
        return server.server_address[1]

    yield start
    for server, thread in started:
        _stop(server, thread)


class TLSServer(TCPServer):
    """The echo server over TLS; counts the connections it accepted."""

    def __init__(self, addr, handler, context):
        super().__init__(addr, handler)
        self.context = context
        self.accepted = 0

    def get_request(self):
        sock, addr = super().get_request()
        self.accepted += 1
        return self.context.wrap_socket(sock, server_side=True), addr


@pytest.fixture
def tls_server():
    """A factory: tls_server() -> the running TLS echo server."""
    trustme = pytest.importorskip("trustme")
    cert = trustme.CA().issue_cert("localhost")
    started = []

    def start():
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        cert.configure_cert(ctx)
        server = TLSServer(("127.0.0.1", 0), EchoHandler, ctx)
        started.append((server, _serve(server)))
        return server

    yield start
    for server, thread in started:
        _stop(server, thread)


@pytest.fixture
def unix_server():
    """Path of a threaded Unix-socket echo server."""
    with tempfile.TemporaryDirectory(prefix="mtlg") as d:   # short path for sun_path
        path = os.path.join(d, "echo.sock")
        server = UnixServer(path, EchoHandler)
        thread = _serve(server)
        try:
            yield path
        finally:
            _stop(server, thread)


def flip_at(where):
    """A transform for EchoHandler: flips one bit of the byte at stream
    offset `where` of every connection."""
    def flip(data, offset):
        i = where - offset
        if 0 <= i < len(data):
            data = data[:i] + bytes([data[i] ^ 1]) + data[i + 1:]
        return data
    return flip


def check_ok(proc, res, connections, size, pipeline):
    assert proc.returncode == 0, (proc.stdout, proc.stderr)
    assert res["errors"] == 0, proc.stderr
    assert res["requests"] > 0
    assert res["connections"] == connections
    assert res["size"] == size
    assert res["pipeline"] == pipeline
    assert res["seconds"] > 0
    assert res["rps"] > 0 and res["mib_s"] > 0
    # (mib_s is printed to 3 decimals: a small one is within 0.0005 of it)
    assert res["mib_s"] == pytest.approx(res["rps"] * size / 2**20, rel=1e-3, abs=5e-4)
    assert 0 < res["p50_us"] <= res["p90_us"] <= res["p99_us"] <= res["p999_us"] <= res["max_us"]
    assert 0 < res["mean_us"] <= res["max_us"]


EXPECTED_KEYS = {"requests", "seconds", "rps", "mib_s", "errors", "connections", "size",
                 "pipeline", "p50_us", "p90_us", "p99_us", "p999_us", "max_us", "mean_us",
                 "tls", "reconnects", "udp", "lost", "late", "flood", "pattern", "max_read",
                 "storm"}


# --------------------------------------------------------------------------
# Tests


def test_tcp_duration(loadgen, tcp_server):
    port = tcp_server()
    proc, res = run_json(loadgen, "--port", port, "-c", 4, "-s", 1024, "-d", 0.5)
    assert set(res) == EXPECTED_KEYS
    check_ok(proc, res, 4, 1024, 1)
    assert res["seconds"] == pytest.approx(0.5, abs=0.05)


def test_tcp_requests_exact(loadgen, tcp_server):
    port = tcp_server()
    proc, res = run_json(loadgen, "--port", port, "-c", 3, "-s", 100, "-p", 2, "-n", 500)
    check_ok(proc, res, 3, 100, 2)
    assert res["requests"] == 500


def test_warmup_not_counted(loadgen, tcp_server):
    port = tcp_server()
    proc, res = run_json(loadgen, "--port", port, "-c", 2, "-n", 300, "--warmup", 0.2)
    check_ok(proc, res, 2, 1024, 1)
    assert res["requests"] == 300
    proc, res = run_json(loadgen, "--port", port, "-c", 2, "-d", 0.3, "--warmup", 0.2)
    check_ok(proc, res, 2, 1024, 1)
    assert res["seconds"] == pytest.approx(0.3, abs=0.05)


def test_large_messages_pipelined(loadgen, tcp_server):
    port = tcp_server()
    size = 300 * 1024
    proc, res = run_json(loadgen, "--port", port, "-c", 3, "-s", size, "-p", 4, "-n", 40)
    check_ok(proc, res, 3, size, 4)
    assert res["requests"] == 40


def test_tiny_messages_deep_pipeline(loadgen, tcp_server):
    # Many messages merge into one segment and split across reads.
    port = tcp_server()
    proc, res = run_json(loadgen, "--port", port, "-c", 2, "-s", 3, "-p", 64, "-d", 0.3)
    check_ok(proc, res, 2, 3, 64)


@pytest.mark.parametrize("size,pipeline", [(300 * 1024, 2), (3, 64)])
def test_level_pattern(loadgen, tcp_server, size, pipeline):
    """--pattern level: every byte checked as ever, and no read returns more
    than 64 KiB (the edge pattern's reads take up to 256 KiB at once)."""
    port = tcp_server()
    proc, res = run_json(loadgen, "--port", port, "-c", 3, "-s", size, "-p", pipeline,
                         "-n", 60, "--pattern", "level")
    check_ok(proc, res, 3, size, pipeline)
    assert res["requests"] == 60 and res["pattern"] == "level"
    assert 0 < res["max_read"] <= 64 * 1024


def test_level_pattern_unix_and_corruption(loadgen, unix_server, tcp_server):
    proc, res = run_json(loadgen, "--unix", unix_server, "-c", 2, "-s", 200_000, "-p", 3,
                         "-n", 30, "--pattern", "level")
    check_ok(proc, res, 2, 200_000, 3)

    port = tcp_server(transform=flip_at(5000))
    proc, res = run_json(loadgen, "--port", port, "-c", 2, "-s", 1024, "-d", 2,
                         "--pattern", "level")
    assert proc.returncode == 1 and res["errors"] == 2 and res["requests"] == 2 * 4
    assert "mismatch" in proc.stderr


def test_unix_socket(loadgen, unix_server):
    proc, res = run_json(loadgen, "--unix", unix_server, "-c", 4, "-s", 4096, "-p", 2,
                         "-d", 0.4)
    check_ok(proc, res, 4, 4096, 2)


def test_unix_socket_large(loadgen, unix_server):
    proc, res = run_json(loadgen, "--unix", unix_server, "-c", 2, "-s", 200_000, "-p", 3,
                         "-n", 30)
    check_ok(proc, res, 2, 200_000, 3)
    assert res["requests"] == 30


def test_human_output(loadgen, tcp_server):
    port = tcp_server()
    proc = run_loadgen(loadgen, "--port", port, "-c", 2, "-n", 50)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    for word in ("requests", "req/s", "MiB/s", "errors", "connections", "p99.9", "max"):
        assert word in out, out


def test_cpu_pinning(loadgen, tcp_server):
    port = tcp_server()
    cpu = min(os.sched_getaffinity(0))
    proc, res = run_json(loadgen, "--port", port, "-c", 1, "-n", 20, "--cpu", cpu)
    check_ok(proc, res, 1, 1024, 1)


def test_corrupting_server_detected(loadgen, tcp_server):
    def flip(data, offset):
        # Flip one byte at stream offset 5000 of every connection.
        i = 5000 - offset
        if 0 <= i < len(data):
            data = bytearray(data)
            data[i] ^= 0x01
            data = bytes(data)
        return data

    port = tcp_server(transform=flip)
    proc, res = run_json(loadgen, "--port", port, "-c", 3, "-s", 1024, "-d", 2)
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    assert res["errors"] == 3          # one per connection, each then closed
    assert res["requests"] == 3 * 4    # 4 whole messages precede offset 5000
    assert res["seconds"] < 1.5        # stops once every connection is gone
    assert "mismatch" in proc.stderr


class SwapFirstTwoHandler(socketserver.BaseRequestHandler):
    """Holds back the first 2 * server.msg_size bytes, echoes those two
    messages in swapped order, then echoes normally: every byte comes back,
    not in order."""

    def handle(self):
        sock = self.request
        n = self.server.msg_size
        buf = b""
        try:
            while len(buf) < 2 * n:
                data = sock.recv(65536)
                if not data:
                    return
                buf += data
            sock.sendall(buf[n:2 * n] + buf[:n] + buf[2 * n:])
            while True:
                data = sock.recv(65536)
                if not data:
                    return
                sock.sendall(data)
        except OSError:
            pass


def test_reordering_detected(loadgen):
    server = TCPServer(("127.0.0.1", 0), SwapFirstTwoHandler)
    server.msg_size = 100
    thread = _serve(server)
    try:
        proc, res = run_json(loadgen, "--port", server.server_address[1],
                             "-c", 2, "-s", 100, "-p", 2, "-d", 2)
    finally:
        _stop(server, thread)
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    assert res["errors"] == 2
    assert res["requests"] == 0
    assert "mismatch in message 0" in proc.stderr


def test_server_closing_counts_as_error(loadgen, tcp_server):
    port = tcp_server(close_after=2500)
    proc, res = run_json(loadgen, "--port", port, "-c", 2, "-s", 1000, "-d", 2)
    assert proc.returncode == 1
    assert res["errors"] == 2
    assert res["requests"] == 4
    assert "closed" in proc.stderr


def test_connection_refused(loadgen):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]     # bound, not listening: refused
        proc, res = run_json(loadgen, "--port", port, "-c", 2, "-d", 0.2)
    assert proc.returncode == 1
    assert res["errors"] == 2
    assert res["requests"] == 0
    assert res["connections"] == 0


def test_tls_echo(loadgen, tls_server):
    server = tls_server()
    proc, res = run_json(loadgen, "--port", server.server_address[1], "--tls", "-c", 3,
                         "-s", 40000, "-n", 60)
    check_ok(proc, res, 3, 40000, 1)
    assert res["tls"] is True and res["requests"] == 60 and res["reconnects"] == 0
    assert server.accepted == 3


def test_tls_reconnect_makes_a_connection_per_request(loadgen, tls_server):
    server = tls_server()
    proc, res = run_json(loadgen, "--port", server.server_address[1], "--tls", "--reconnect",
                         "-c", 2, "-s", 30000, "-n", 20)
    check_ok(proc, res, 2, 30000, 1)
    assert res["requests"] == 20
    # Each request but the last of each connection was followed by a new one.
    assert res["reconnects"] >= 18
    assert server.accepted >= 20


def test_tls_against_a_plain_server_fails(loadgen, tcp_server):
    port = tcp_server()
    proc = run_loadgen(loadgen, "--port", port, "--tls", "-c", 1, "-n", 1,
                       "--connect-timeout", 2)
    assert proc.returncode == 1
    assert "TLS handshake" in proc.stderr or "connect" in proc.stderr


# --------------------------------------------------------------------------
# UDP


class UdpEcho(threading.Thread):
    """A datagram echo server on a thread; `mangle(data, count)` returns
    what to send back (None: nothing)."""

    def __init__(self, mangle=lambda data, count: data):
        super().__init__(daemon=True)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.mangle = mangle
        self.stopping = False
        self.count = 0

    def run(self):
        while not self.stopping:
            try:
                data, addr = self.sock.recvfrom(65535)
            except socket.timeout:
                continue
            self.count += 1
            reply = self.mangle(data, self.count)
            if reply is not None:
                self.sock.sendto(reply, addr)

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.stopping = True
        self.join(5)
        self.sock.close()


@pytest.mark.parametrize("size", [8, 64, 1400, 60000])
def test_udp_echo(loadgen, size):
    with UdpEcho() as server:
        proc, res = run_json(loadgen, "--udp", "--port", server.port, "-c", 4, "-s", size,
                             "-n", 200)
    assert proc.returncode == 0, proc.stderr
    assert res["udp"] is True
    assert res["requests"] >= 200
    assert res["errors"] == 0 and res["lost"] == 0


def test_udp_loss_is_counted_not_waited_for(loadgen):
    # Every fifth datagram is dropped: the run goes on, and counts them.
    with UdpEcho(lambda data, count: None if count % 5 == 0 else data) as server:
        proc, res = run_json(loadgen, "--udp", "--port", server.port, "-c", 2, "-s", 64,
                             "-d", 1, "--udp-timeout", "0.02")
    assert proc.returncode == 0, proc.stderr
    assert res["lost"] > 0 and res["requests"] > 3 * res["lost"]
    assert res["errors"] == 0


def test_udp_corruption_detected(loadgen):
    def corrupt(data, count):
        if count % 3 == 0:
            return data[:-1] + bytes([data[-1] ^ 1])
        return data
    with UdpEcho(corrupt) as server:
        proc, res = run_json(loadgen, "--udp", "--port", server.port, "-c", 2, "-s", 64,
                             "-d", 0.5)
    assert proc.returncode == 1
    assert res["errors"] > 0


def test_udp_flood_sends_without_waiting(loadgen):
    # One way: nothing is echoed, yet the sends go on; "requests" counts
    # them, and what the receiver got is a subset of them.
    with UdpEcho(lambda data, count: None) as server:
        proc, res = run_json(loadgen, "--udp-flood", "--port", server.port, "-c", 3, "-s", 64,
                             "-d", 0.5)
        received = server.count
    assert proc.returncode == 0, proc.stderr
    assert res["udp"] is True and res["flood"] is True
    assert res["errors"] == 0
    assert 0 < received <= res["requests"] + 3 * 64 * 3  # sends before the measured window


def test_storm(loadgen, tcp_server):
    """--storm: every connection echoes its bytes in chunks of random size,
    one in flight (the server never reads more than the largest chunk at
    once), and the run ends when the last connection has closed."""
    reads = []

    def record(data, offset):
        reads.append(len(data))
        return data

    port = tcp_server(transform=record)
    proc, res = run_json(loadgen, "--port", port, "-c", 40, "-s", 30_000, "--storm",
                         "--storm-chunk", 2000)
    assert proc.returncode == 0, proc.stderr
    assert res["storm"] is True and res["errors"] == 0
    assert res["requests"] == 40 and res["connections"] == 40
    assert 0 < res["p50_us"] <= res["p99_us"] <= res["seconds"] * 1e6
    assert sum(reads) == 40 * 30_000
    assert max(reads) <= 2000 and len(set(reads)) > 10


def test_storm_failures_counted(loadgen, tcp_server):
    port = tcp_server(transform=flip_at(7000))
    proc, res = run_json(loadgen, "--port", port, "-c", 5, "-s", 20_000, "--storm")
    assert proc.returncode == 1 and res["errors"] == 5 and res["requests"] == 0
    assert "mismatch at offset 7000" in proc.stderr

    port = tcp_server(close_after=9000)
    proc, res = run_json(loadgen, "--port", port, "-c", 3, "-s", 20_000, "--storm")
    assert proc.returncode == 1 and res["errors"] == 3 and res["requests"] == 0
    assert "closed by the server" in proc.stderr or "reset" in proc.stderr


@pytest.mark.parametrize("args", [
    [],                                         # no --port nor --unix
    ["--port", "0"],
    ["--port", "70000"],
    ["--port", "1", "-c", "0"],
    ["--port", "1", "-s", "0"],
    ["--port", "1", "-s", "12x"],
    ["--port", "1", "-d", "-1"],
    ["--port", "1", "-d", "abc"],
    ["--port", "1", "-p", "0"],
    ["--port", "1", "--warmup", "nan"],
    ["--port", "1", "--bogus"],
    ["--port", "1", "extra"],
    ["--port", "1", "--unix", "/tmp/x.sock"],
    ["--port", "1", "--tls-reuse"],
    ["--port", "1", "--reconnect", "-p", "2"],
    ["--port", "1", "--udp", "--tls"],
    ["--port", "1", "--udp", "-s", "7"],
    ["--port", "1", "--udp", "-s", "65508"],
    ["--port", "1", "--udp", "-p", "2"],
    ["--port", "1", "--udp-timeout", "0"],
    ["--port", "1", "--pattern", "ripple"],
    ["--port", "1", "--pattern", "level", "--tls"],
    ["--port", "1", "--pattern", "level", "--udp"],
    ["--port", "1", "--storm", "--tls"],
    ["--port", "1", "--storm", "-p", "2"],
    ["--port", "1", "--storm", "-n", "5"],
    ["--port", "1", "--storm-chunk", "0"],
], ids=lambda a: " ".join(a) or "no-args")
def test_bad_usage(loadgen, args):
    proc = run_loadgen(loadgen, *args)
    assert proc.returncode == 2, (args, proc.stdout, proc.stderr)
    assert proc.stderr


def test_help(loadgen):
    proc = run_loadgen(loadgen, "--help")
    assert proc.returncode == 0
    assert "--pipeline" in proc.stdout
