"""mtloop's main job for now: a TCP echo server on mtloop, driven by a client.

The server runs on an mtloop loop in this process: an asyncio.Protocol
whose transports live on mtloop's I/O threads (--mode protocol, the
default), or loop.sock_recv/sock_sendall on the loop thread (--mode sock).
The client is a separate process with one thread per connection that sends
messages and checks every echoed byte.  Prints what was served and, from
mtloop.runtime_stats(), the bytes the I/O threads moved.

    python tools/echo_demo.py [--seconds 3] [--connections 32] [--size 1024]
                              [--mode protocol|sock]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys

import mtloop

CLIENT = r"""
import json, socket, sys, threading, time
port, conns, size, seconds = map(float, sys.argv[1:5])
conns, size = int(conns), int(size)
deadline = time.monotonic() + seconds
results = []
def run(i):
    s = socket.create_connection(("127.0.0.1", int(port)))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    msg = bytes((i + j) % 251 for j in range(size))
    n = errors = 0
    while time.monotonic() < deadline:
        s.sendall(msg)
        got = bytearray()
        while len(got) < size:
            chunk = s.recv(size - len(got))
            if not chunk:
                break
            got += chunk
        if bytes(got) != msg:
            errors += 1
            break
        n += 1
    s.close()
    results.append((n, errors))
threads = [threading.Thread(target=run, args=(i,)) for i in range(conns)]
t0 = time.monotonic()
for t in threads: t.start()
for t in threads: t.join()
print(json.dumps({"requests": sum(r[0] for r in results),
                  "errors": sum(r[1] for r in results),
                  "seconds": time.monotonic() - t0}))
"""


async def serve_client(loop: asyncio.AbstractEventLoop, conn: socket.socket,
                       stats: dict[str, int]) -> None:
    with conn:
        while True:
            data = await loop.sock_recv(conn, 65536)
            if not data:
                return
            stats["bytes"] += len(data)
            await loop.sock_sendall(conn, data)


class EchoProtocol(asyncio.Protocol):
    def __init__(self, stats: dict[str, int]) -> None:
        self.stats = stats

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.stats["connections"] += 1

    def data_received(self, data: bytes) -> None:
        self.stats["bytes"] += len(data)
        self.transport.write(data)  # type: ignore[attr-defined]


async def run_client(loop: asyncio.AbstractEventLoop, port: int,
                     args: argparse.Namespace) -> dict[str, object]:
    # The client runs in its own process, waited for from an executor thread.
    proc = await loop.run_in_executor(None, lambda: subprocess.run(
        [sys.executable, "-c", CLIENT, str(port), str(args.connections), str(args.size),
         str(args.seconds)], capture_output=True, text=True, check=True))
    return json.loads(proc.stdout)


async def main_protocol(args: argparse.Namespace) -> dict[str, object]:
    loop = asyncio.get_running_loop()
    stats = {"bytes": 0, "connections": 0}
    server = await loop.create_server(lambda: EchoProtocol(stats), "127.0.0.1", 0,
                                      backlog=1024)
    async with server:
        result = await run_client(loop, server.sockets[0].getsockname()[1], args)
    return {**result, "served_bytes": stats["bytes"], "connections": stats["connections"]}


async def main_sock(args: argparse.Namespace) -> dict[str, object]:
    loop = asyncio.get_running_loop()
    listener = socket.create_server(("127.0.0.1", 0), backlog=1024)
    listener.setblocking(False)
    port = listener.getsockname()[1]
    stats = {"bytes": 0, "connections": 0}
    tasks: set[asyncio.Task[None]] = set()

    async def accept_loop() -> None:
        while True:
            conn, _ = await loop.sock_accept(listener)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            stats["connections"] += 1
            task = asyncio.create_task(serve_client(loop, conn, stats))
            tasks.add(task)
            task.add_done_callback(tasks.discard)

    acceptor = asyncio.create_task(accept_loop())
    result = await run_client(loop, port, args)
    acceptor.cancel()
    for task in list(tasks):
        task.cancel()
    await asyncio.gather(acceptor, *tasks, return_exceptions=True)
    listener.close()
    return {**result, "served_bytes": stats["bytes"], "connections": stats["connections"]}


def cli() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--mode", choices=("protocol", "sock"), default="protocol")
    args = parser.parse_args()
    before = sum(t["bytes_read"] + t["bytes_written"] for t in mtloop.runtime_stats())
    r = mtloop.run(main_protocol(args) if args.mode == "protocol" else main_sock(args))
    moved = sum(t["bytes_read"] + t["bytes_written"] for t in mtloop.runtime_stats()) - before
    rate = r["requests"] / r["seconds"]
    print(f"mtloop {mtloop.__version__} (libevent {mtloop.libevent_version()}), "
          f"Python {sys.version.split()[0]}, pid {os.getpid()}")
    print(f"echo server on mtloop ({args.mode}): {r['connections']} connections, "
          f"{args.size}-byte messages, {r['seconds']:.1f} s")
    print(f"  requests echoed: {r['requests']} ({rate:,.0f}/s), "
          f"bytes served: {r['served_bytes']:,}, errors: {r['errors']}")
    print(f"  bytes read + written by the I/O threads: {moved:,} "
          f"({len(mtloop.runtime_stats())} threads)")
    return 1 if r["errors"] or not r["requests"] else 0


if __name__ == "__main__":
    sys.exit(cli())
