"""The servers and clients people run, on each loop (issue #14): uvicorn
serving an ASGI app (`--loop mtloop:new_event_loop`), Hypercorn and
Granian serving one on the running loop, aiohttp's server and client (bodies, a streamed
response, WebSocket echo), and redis-py against a redis-server the test
starts.  Everything binds to 127.0.0.1; a test
skips only when its server binary is missing (tools/env.sh installs them).
"""

import asyncio
import hashlib
import http.client
import os
import shutil
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from conftest import HANG_TIMEOUT

aiohttp = pytest.importorskip("aiohttp", reason="aiohttp is not installed (tools/env.sh)")
from aiohttp import web  # noqa: E402

START_TIMEOUT = 30


def free_listener():
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    return sock


def body_of(n, seed=b"body"):
    block = hashlib.sha256(seed).digest()
    return (block * (n // len(block) + 1))[:n]


# --------------------------------------------------------------------------
# uvicorn

ASGI_APP = '''
import asyncio, hashlib

async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    loop = type(asyncio.get_running_loop())
    answer = f"{loop.__module__}.{loop.__qualname__} {len(body)} {hashlib.sha256(body).hexdigest()}"
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/plain"),
                            (b"content-length", str(len(answer)).encode())]})
    await send({"type": "http.response.body", "body": answer.encode()})
'''


def http_request(port, method, path, body=None):
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=HANG_TIMEOUT)
        try:
            conn.request(method, path, body=body)
            resp = conn.getresponse()
            return resp.status, resp.read().decode()
        except (ConnectionError, http.client.RemoteDisconnected):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
        finally:
            conn.close()


def test_uvicorn_serves_on_mtloop(tmp_path):
    """`uvicorn --loop mtloop:new_event_loop` (the README's line) runs the
    app on an mtloop loop: GETs and a 1 MB POST come back checked."""
    pytest.importorskip("uvicorn")
    (tmp_path / "asgi_app.py").write_text(ASGI_APP)
    lsock = free_listener()
    port = lsock.getsockname()[1]
    cmd = [sys.executable, "-m", "uvicorn", "asgi_app:app", "--loop", "mtloop:new_event_loop",
           "--http", "h11", "--fd", str(lsock.fileno()), "--lifespan", "off",
           "--log-level", "warning"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, pass_fds=[lsock.fileno()],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lsock.close()
    try:
        status, text = http_request(port, "GET", "/")
        assert status == 200, text
        loop_name, size, digest = text.split()
        assert loop_name == "mtloop._loop.Loop"
        assert size == "0"
        body = body_of(1_000_000)
        for _ in range(3):
            status, text = http_request(port, "POST", "/upload", body)
            assert status == 200
            assert text.split()[1:] == [str(len(body)), hashlib.sha256(body).hexdigest()]
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=HANG_TIMEOUT)
    assert "Traceback" not in out, out


# --------------------------------------------------------------------------
# aiohttp


async def aiohttp_round_trips(loop):
    """An aiohttp server and client on `loop`: bodies both ways, a streamed
    response, WebSocket echo.  Returns what the client saw."""

    async def echo(request):
        data = await request.read()
        return web.Response(body=hashlib.sha256(data).hexdigest().encode())

    async def stream(request):
        resp = web.StreamResponse()
        await resp.prepare(request)
        for i in range(100):
            await resp.write(body_of(10_000, seed=b"%d" % i))
        await resp.write_eof()
        return resp

    async def websocket(request):
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for msg in ws:
            if msg.type == aiohttp.WSMsgType.TEXT:
                await ws.send_str(msg.data.upper())
            elif msg.type == aiohttp.WSMsgType.BINARY:
                await ws.send_bytes(msg.data[::-1])
        return ws

    app = web.Application(client_max_size=8 * 1024 * 1024)
    app.router.add_post("/echo", echo)
    app.router.add_get("/stream", stream)
    app.router.add_get("/ws", websocket)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    seen = {}
    try:
        async with aiohttp.ClientSession() as session:
            body = body_of(3_000_000)
            async with session.post(f"http://127.0.0.1:{port}/echo", data=body) as resp:
                seen["echo"] = (resp.status, await resp.text())
            streamed = hashlib.sha256()
            async with session.get(f"http://127.0.0.1:{port}/stream") as resp:
                async for chunk in resp.content.iter_chunked(4096):
                    streamed.update(chunk)
            seen["stream"] = streamed.hexdigest()
            async with session.ws_connect(f"http://127.0.0.1:{port}/ws") as ws:
                answers = []
                for i in range(50):
                    await ws.send_str(f"message {i}")
                    answers.append((await ws.receive()).data)
                await ws.send_bytes(body_of(100_000))
                answers.append((await ws.receive()).data)
                await ws.close()
            seen["ws"] = answers
    finally:
        await runner.cleanup()
    return seen


def test_aiohttp_server_and_client(loop, run):
    seen = run(aiohttp_round_trips(loop), timeout=60)
    assert seen["echo"] == (200, hashlib.sha256(body_of(3_000_000)).hexdigest())
    expected = hashlib.sha256()
    for i in range(100):
        expected.update(body_of(10_000, seed=b"%d" % i))
    assert seen["stream"] == expected.hexdigest()
    assert seen["ws"][:50] == [f"MESSAGE {i}" for i in range(50)]
    assert seen["ws"][50] == body_of(100_000)[::-1]


# --------------------------------------------------------------------------
# redis-py against redis-server


@pytest.fixture(scope="module")
def redis_port(tmp_path_factory):
    server = shutil.which("redis-server")
    if server is None:
        pytest.skip("redis-server is not installed (tools/env.sh installs it)")
    workdir = tmp_path_factory.mktemp("redis")
    lsock = free_listener()
    port = lsock.getsockname()[1]
    lsock.close()  # redis binds it itself; a race with another binder fails loudly below
    proc = subprocess.Popen([server, "--bind", "127.0.0.1", "--port", str(port), "--save", "",
                             "--appendonly", "no", "--dir", str(workdir)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail("redis-server did not start: " + proc.communicate()[0])
            time.sleep(0.05)
    yield port
    proc.terminate()
    proc.communicate(timeout=HANG_TIMEOUT)


async def redis_rows(port, prefix, n):
    import redis.asyncio as aioredis

    pool = aioredis.BlockingConnectionPool(host="127.0.0.1", port=port, max_connections=32,
                                           timeout=HANG_TIMEOUT)
    client = aioredis.Redis(connection_pool=pool)
    try:
        rows = {f"{prefix}:{i}": body_of(i * 37 % 5000 + 1, seed=b"%d" % i) for i in range(n)}
        async with client.pipeline(transaction=False) as pipe:
            for key, value in rows.items():
                pipe.set(key, value)
                pipe.hset(f"{prefix}:meta:{key}", mapping={
                    "len": len(value), "sha": hashlib.sha256(value).hexdigest()})
            await pipe.execute()
        # Read back concurrently over the pool's 32 connections, a command per key.
        values = await asyncio.gather(*(client.get(key) for key in rows))
        metas = await asyncio.gather(*(client.hgetall(f"{prefix}:meta:{key}") for key in rows))
        big = body_of(4 * 1024 * 1024, seed=prefix.encode())
        await client.set(f"{prefix}:big", big)
        big_back = await client.get(f"{prefix}:big")
        return rows, values, metas, big, big_back
    finally:
        await client.aclose()
        await pool.aclose()


def test_redis_rows_round_trip(loop, run, redis_port, impl_name):
    pytest.importorskip("redis")
    rows, values, metas, big, big_back = run(redis_rows(redis_port, impl_name, 2000), timeout=60)
    assert values == list(rows.values())
    for value, meta in zip(values, metas):
        assert int(meta[b"len"]) == len(value)
        assert meta[b"sha"].decode() == hashlib.sha256(value).hexdigest()
    assert big_back == big


# --------------------------------------------------------------------------
# Hypercorn (its API serves on the running loop; the CLI picks its own)


async def asgi_round_trips(connect, server):
    """Once connect() succeeds (the `server` task must not end first): a
    GET, a 1 MB POST and a GET over one keep-alive HTTP/1.1 connection.
    Returns ([(status, ASGI_APP's answer)], the running loop's type)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + START_TIMEOUT
    while True:
        try:
            reader, writer = await connect()
            break
        except (ConnectionError, FileNotFoundError):
            if loop.time() > deadline or server.done():
                raise
            await asyncio.sleep(0.05)
    answers = []
    body = body_of(1_000_000)
    for method, payload in (("GET", b""), ("POST", body), ("GET", b"")):
        writer.write(f"{method} / HTTP/1.1\r\nHost: test\r\n"
                     f"Content-Length: {len(payload)}\r\n\r\n".encode() + payload)
        head = await reader.readuntil(b"\r\n\r\n")
        length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length:"))
        answers.append((head.split(b" ")[1], (await reader.readexactly(length)).decode()))
    writer.close()
    return answers, type(loop)


def check_asgi_answers(answers, loop_type):
    expected_loop = f"{loop_type.__module__}.{loop_type.__qualname__}"
    assert [status for status, _ in answers] == [b"200"] * 3
    assert answers[0][1].split() == [expected_loop, "0", hashlib.sha256(b"").hexdigest()]
    body = body_of(1_000_000)
    assert answers[1][1].split() == [expected_loop, str(len(body)),
                                     hashlib.sha256(body).hexdigest()]


def test_hypercorn_serves_on_the_running_loop(loop, run, tmp_path):
    """hypercorn.asyncio.serve() on each loop: an ASGI app answers HTTP/1.1
    GETs and a 1 MB POST over one keep-alive connection, then shuts down."""
    pytest.importorskip("hypercorn", reason="hypercorn is not installed (tools/env.sh)")
    from hypercorn.asyncio import serve
    from hypercorn.config import Config

    namespace = {}
    exec(textwrap.dedent(ASGI_APP), namespace)
    lsock = free_listener()
    port = lsock.getsockname()[1]
    config = Config()
    config.bind = [f"fd://{lsock.detach()}"]  # hypercorn's from now on: it closes it
    config.loglevel = "WARNING"
    config.accesslog = None

    async def main():
        stop = asyncio.Event()
        server = asyncio.ensure_future(serve(namespace["app"], config,
                                             shutdown_trigger=stop.wait))
        try:
            return await asgi_round_trips(
                lambda: asyncio.open_connection("127.0.0.1", port), server)
        finally:
            stop.set()
            await asyncio.wait_for(server, HANG_TIMEOUT)

    check_asgi_answers(*run(main(), timeout=60))


# --------------------------------------------------------------------------
# Granian (its embedded server runs on the running loop; its CLI's --loop
# offers only its own list)


def test_granian_serves_on_the_running_loop(loop, run, tmp_path):
    """granian.server.embed.Server on each loop: Granian's Rust runtime owns
    the socket (a Unix one here) and hands each request to the running loop
    from its own threads; the ASGI app answers GETs and a 1 MB POST over one
    keep-alive connection, then the server stops."""
    pytest.importorskip("granian", reason="granian is not installed (tools/env.sh)")
    from granian.constants import Interfaces
    from granian.server.embed import Server

    namespace = {}
    exec(textwrap.dedent(ASGI_APP), namespace)
    path = tmp_path / "granian.sock"

    async def main():
        granian = Server(namespace["app"], uds=path, interface=Interfaces.ASGI,
                         log_enabled=False)
        server = asyncio.ensure_future(granian.serve())
        try:
            return await asgi_round_trips(
                lambda: asyncio.open_unix_connection(str(path)), server)
        finally:
            granian.stop()
            await asyncio.wait_for(server, HANG_TIMEOUT)

    check_asgi_answers(*run(main(), timeout=60))
