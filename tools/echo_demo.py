"""mtloop's main job for now: a TCP echo server on mtloop, driven by a client.

The server runs on an mtloop loop in this process (sock_accept/sock_recv/
sock_sendall: transports arrive with the I/O threads); the client is a
separate process with one thread per connection that sends messages and
checks every echoed byte.  Prints what was served.

    python tools/echo_demo.py [--seconds 3] [--connections 32] [--size 1024]
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


async def main(args: argparse.Namespace) -> dict[str, object]:
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
    # The client runs in its own process, waited for from an executor thread.
    proc = await loop.run_in_executor(None, lambda: subprocess.run(
        [sys.executable, "-c", CLIENT, str(port), str(args.connections), str(args.size),
         str(args.seconds)], capture_output=True, text=True, check=True))
    result = json.loads(proc.stdout)
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
    args = parser.parse_args()
    r = mtloop.run(main(args))
    rate = r["requests"] / r["seconds"]
    print(f"mtloop {mtloop.__version__} (libevent {mtloop.libevent_version()}), "
          f"Python {sys.version.split()[0]}, pid {os.getpid()}")
    print(f"echo server on mtloop: {r['connections']} connections, {args.size}-byte messages, "
          f"{r['seconds']:.1f} s")
    print(f"  requests echoed: {r['requests']} ({rate:,.0f}/s), "
          f"bytes served: {r['served_bytes']:,}, errors: {r['errors']}")
    return 1 if r["errors"] or not r["requests"] else 0


if __name__ == "__main__":
    sys.exit(cli())
