"""An echo server on a chosen event loop, for tools/bench.py.

    python tools/bench_server.py --loop mtloop --mode protocol [--size 1024]
                                 [--work-us 0] [--unix PATH]
                                 [--tls-cert CHAIN --tls-key KEY]

Loops: asyncio (the stock loop), uvloop, rloop, mtloop.  Modes: protocol
(asyncio.Protocol), buffered (asyncio.BufferedProtocol), streams
(asyncio.start_server), sock (loop.sock_accept/sock_recv/sock_sendall),
asgi (uvicorn serving a small ASGI app over HTTP/1.1 with h11, on the loop;
not an echo server: for an HTTP client such as wrk).
With --work-us the server frames the byte stream into --size messages and
spends that many microseconds of pure-Python work on each before echoing
it (the "heavy handler" scenario); otherwise it echoes bytes as they come.
With --tls-cert it serves TLS (not in sock mode).

Prints "READY <port or path> <the loop module's file>" on stdout once it
listens (the file tells tools/bench.py which mtloop a baseline run really
imported), then serves until SIGTERM or SIGINT.

udp: a datagram echo endpoint (create_datagram_endpoint), for the load
generator's --udp.  udp-sink: a datagram endpoint that only counts, for
its --udp-flood; each "COUNT" line on stdin is answered with a JSON line
{"received": n}.

Two modes drive subprocesses instead of serving (port 0): each line "RUN
<seconds>" on stdin runs the workload once and prints its figures as a
JSON line.  pipe: bytes through one `cat` child for that long, written in
256 KiB chunks with drain() and read back concurrently ("requests" are
MiB).  spawn: a burst of --size children (`true`), all started at once and
waited for ("requests" are children).  Both report the loop's stall: the
gaps between the wakeups of a task sleeping 1 ms (p50, p99 and the
largest).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import ssl
import sys
import time
from typing import Any, Callable


def make_loop_factory(name: str) -> Callable[[], asyncio.AbstractEventLoop]:
    if name == "asyncio":
        return asyncio.new_event_loop
    if name == "uvloop":
        import uvloop
        return uvloop.new_event_loop
    if name == "rloop":
        import rloop  # type: ignore[import-not-found]
        return rloop.new_event_loop
    if name == "mtloop":
        import mtloop
        return mtloop.new_event_loop
    raise SystemExit(f"unknown loop {name!r}")


def spin(us: float) -> None:
    """Pure-Python work for about `us` microseconds (holds the GIL)."""
    end = time.perf_counter() + us * 1e-6
    x = 0
    while time.perf_counter() < end:
        x += 1


class Framer:
    """Cuts a byte stream into `size`-byte messages, working on each."""

    def __init__(self, size: int, work_us: float, send: Callable[[bytes], Any]) -> None:
        self.size, self.work_us, self.send = size, work_us, send
        self.buf = bytearray()

    def feed(self, data: bytes) -> None:
        if not self.work_us:
            self.send(data)
            return
        self.buf += data
        while len(self.buf) >= self.size:
            msg = bytes(self.buf[:self.size])
            del self.buf[:self.size]
            spin(self.work_us)
            self.send(msg)


class EchoProtocol(asyncio.Protocol):
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args

    def connection_made(self, transport: Any) -> None:
        self.framer = Framer(self.args.size, self.args.work_us, transport.write)

    def data_received(self, data: bytes) -> None:
        self.framer.feed(data)


class EchoBufferedProtocol(asyncio.BufferedProtocol):
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.buffer = bytearray(256 * 1024)
        self.view = memoryview(self.buffer)

    def connection_made(self, transport: Any) -> None:
        self.framer = Framer(self.args.size, self.args.work_us, transport.write)

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.view

    def buffer_updated(self, nbytes: int) -> None:
        self.framer.feed(bytes(self.view[:nbytes]))


async def hello_app(scope: dict, receive: Any, send: Any) -> None:
    """The ASGI app of --mode asgi: a fixed 13-byte body."""
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/plain"), (b"content-length", b"13")]})
    await send({"type": "http.response.body", "body": b"Hello, world!"})


async def serve_asgi(args: argparse.Namespace, sock: socket.socket, where: str) -> None:
    """uvicorn on the running loop (whatever its kind), on `sock`."""
    import uvicorn
    config = uvicorn.Config(hello_app, http="h11", lifespan="off", log_level="warning",
                            access_log=False, ssl_certfile=args.tls_cert,
                            ssl_keyfile=args.tls_key)
    server = uvicorn.Server(config)
    task = asyncio.get_running_loop().create_task(server.serve(sockets=[sock]))
    while not server.started:
        if task.done():
            task.result()
            raise SystemExit("bench_server: uvicorn did not start")
        await asyncio.sleep(0.01)
    origin = getattr(sys.modules.get(args.loop), "__file__", None) or "-"
    print(f"READY {where} {origin}", flush=True)
    await task  # uvicorn handles SIGTERM and SIGINT itself


class Heartbeat:
    """Gaps between the wakeups of a task that sleeps 1 ms: how long the
    loop stalls while a workload runs."""

    def __init__(self) -> None:
        self.gaps: list[float] = []
        self.task = asyncio.get_running_loop().create_task(self.beat())

    async def beat(self) -> None:
        last = time.perf_counter()
        while True:
            await asyncio.sleep(0.001)
            now = time.perf_counter()
            self.gaps.append(now - last)
            last = now

    def stop(self) -> dict:
        self.task.cancel()
        gaps = sorted(self.gaps) or [0.0]
        return {"p50_us": gaps[len(gaps) // 2] * 1e6,
                "p99_us": gaps[min(len(gaps) - 1, int(len(gaps) * 0.99))] * 1e6,
                "max_gap_us": gaps[-1] * 1e6}


async def pipe_run(seconds: float) -> dict:
    chunk = os.urandom(256 * 1024)
    proc = await asyncio.create_subprocess_exec(
        "cat", stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
    assert proc.stdin is not None and proc.stdout is not None
    received = 0

    async def reader() -> None:
        nonlocal received
        while True:
            data = await proc.stdout.read(256 * 1024)  # type: ignore[union-attr]
            if not data:
                return
            received += len(data)

    beat = Heartbeat()
    t0 = time.perf_counter()
    reading = asyncio.get_running_loop().create_task(reader())
    sent = 0
    while time.perf_counter() - t0 < seconds:
        proc.stdin.write(chunk)
        sent += len(chunk)
        await proc.stdin.drain()
    proc.stdin.close()
    await reading
    await proc.wait()
    wall = time.perf_counter() - t0
    mib = received / (1 << 20)
    return {"requests": mib, "rps": mib / wall, "errors": int(received != sent),
            "connections": 1, **beat.stop()}


async def spawn_run(children: int) -> dict:
    async def one() -> int:
        proc = await asyncio.create_subprocess_exec("true")
        return await proc.wait()

    beat = Heartbeat()
    t0 = time.perf_counter()
    codes = await asyncio.gather(*(one() for _ in range(children)))
    wall = time.perf_counter() - t0
    return {"requests": children, "rps": children / wall,
            "errors": sum(1 for c in codes if c != 0), "connections": children, **beat.stop()}


async def serve_procs(args: argparse.Namespace) -> None:
    """The pipe and spawn modes: a workload per "RUN <seconds>" line."""
    import json
    loop = asyncio.get_running_loop()
    origin = getattr(sys.modules.get(args.loop), "__file__", None) or "-"
    print(f"READY 0 {origin}", flush=True)
    while True:
        line = await loop.run_in_executor(None, sys.stdin.readline)
        if not line.startswith("RUN"):
            return  # EOF: the benchmark is done with this process
        seconds = float(line.split()[1])
        result = await (pipe_run(seconds) if args.mode == "pipe" else spawn_run(args.size))
        print(json.dumps(result), flush=True)


class UdpEcho(asyncio.DatagramProtocol):
    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.transport.sendto(data, addr)


async def serve_udp(args: argparse.Namespace) -> None:
    """The udp mode: a datagram echo endpoint."""
    loop = asyncio.get_running_loop()
    stop = loop.create_future()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda: stop.done() or stop.set_result(None))
    transport, _ = await loop.create_datagram_endpoint(UdpEcho, local_addr=("127.0.0.1", args.port))
    origin = getattr(sys.modules.get(args.loop), "__file__", None) or "-"
    print(f"READY {transport.get_extra_info('sockname')[1]} {origin}", flush=True)
    await stop
    transport.close()


class UdpSink(asyncio.DatagramProtocol):
    received = 0

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.received += 1


async def serve_udp_sink(args: argparse.Namespace) -> None:
    """The udp-sink mode: a datagram endpoint that only counts what it
    receives, and says how many on each "COUNT" line."""
    import json
    loop = asyncio.get_running_loop()
    transport, sink = await loop.create_datagram_endpoint(UdpSink,
                                                          local_addr=("127.0.0.1", args.port))
    origin = getattr(sys.modules.get(args.loop), "__file__", None) or "-"
    print(f"READY {transport.get_extra_info('sockname')[1]} {origin}", flush=True)
    while (await loop.run_in_executor(None, sys.stdin.readline)).startswith("COUNT"):
        print(json.dumps({"received": sink.received}), flush=True)
    transport.close()


async def serve(args: argparse.Namespace) -> None:
    loop = asyncio.get_running_loop()
    if args.mode in ("pipe", "spawn"):
        await serve_procs(args)
        return
    if args.mode == "udp":
        await serve_udp(args)
        return
    if args.mode == "udp-sink":
        await serve_udp_sink(args)
        return
    stop = loop.create_future()
    if args.mode != "asgi":  # uvicorn installs its own
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, lambda: stop.done() or stop.set_result(None))
    if args.unix:
        if os.path.exists(args.unix):
            os.unlink(args.unix)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(args.unix)
        where = args.unix
    else:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", args.port))
        where = str(sock.getsockname()[1])
    sock.setblocking(False)
    if args.mode == "asgi":
        await serve_asgi(args, sock, where)
        return
    sslctx = None
    if args.tls_cert:
        if args.mode == "sock":
            raise SystemExit("bench_server: --mode sock has no TLS")
        sslctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        sslctx.load_cert_chain(args.tls_cert, args.tls_key)

    if args.mode == "protocol":
        server = await loop.create_server(lambda: EchoProtocol(args), sock=sock,
                                          backlog=args.backlog, ssl=sslctx)
    elif args.mode == "buffered":
        server = await loop.create_server(lambda: EchoBufferedProtocol(args), sock=sock,
                                          backlog=args.backlog, ssl=sslctx)
    elif args.mode == "streams":
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            framer = Framer(args.size, args.work_us, writer.write)
            try:
                while True:
                    data = await reader.read(256 * 1024)
                    if not data:
                        break
                    framer.feed(data)
                    await writer.drain()
            except ConnectionError:
                pass
            finally:
                writer.close()
                try:
                    # Takes the connection's end, as asyncio's docs ask.  Left in
                    # the protocol's closed future, a reset was logged as "Future
                    # exception was never retrieved" when the collector freed the
                    # future before the protocol: the exception's traceback holds
                    # this frame, a cycle the stock loop's connections form too
                    # (mtloop's server logged one such future at every exit).
                    await writer.wait_closed()
                except ConnectionError:
                    pass
        server = await asyncio.start_server(handle, sock=sock, backlog=args.backlog, ssl=sslctx)
    else:  # sock
        sock.listen(args.backlog)
        tasks: set[asyncio.Task[None]] = set()

        async def client(conn: socket.socket) -> None:
            out: list[bytes] = []
            framer = Framer(args.size, args.work_us, out.append)
            with conn:
                try:
                    while True:
                        data = await loop.sock_recv(conn, 256 * 1024)
                        if not data:
                            return
                        framer.feed(data)
                        for chunk in out:
                            await loop.sock_sendall(conn, chunk)
                        out.clear()
                except ConnectionError:
                    pass

        async def accept() -> None:
            while True:
                conn, _ = await loop.sock_accept(sock)
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1) \
                    if conn.family != socket.AF_UNIX else None
                task = loop.create_task(client(conn))
                tasks.add(task)
                task.add_done_callback(tasks.discard)

        server = None
        acceptor = loop.create_task(accept())

    origin = getattr(sys.modules.get(args.loop), "__file__", None) or "-"
    print(f"READY {where} {origin}", flush=True)
    await stop
    if server is not None:
        server.close()
    else:
        acceptor.cancel()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--loop", required=True,
                        choices=("asyncio", "uvloop", "rloop", "mtloop"))
    parser.add_argument("--mode", default="protocol",
                        choices=("protocol", "buffered", "streams", "sock", "asgi",
                                 "pipe", "spawn", "udp", "udp-sink"))
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--work-us", type=float, default=0.0)
    parser.add_argument("--backlog", type=int, default=4096,
                        help="the listen backlog (asyncio's default is 100)")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--unix", default=None)
    parser.add_argument("--tls-cert", default=None, help="serve TLS with this certificate chain")
    parser.add_argument("--tls-key", default=None, help="... and this key")
    args = parser.parse_args()
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # for the many-connection runs
    loop = make_loop_factory(args.loop)()
    try:
        loop.run_until_complete(serve(args))
    finally:
        loop.close()
    sys.exit(0)


if __name__ == "__main__":
    main()
