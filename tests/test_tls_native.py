"""TLS semantics in detail, each outcome compared with the stock loop's in
the same test: what a failure raises (type and the ssl module's
attributes), what ssl_object and the extra info answer, the order of
protocol events when the peer ends the connection cleanly or not, the
output flushed before close_notify, post-handshake client authentication,
and a connect cancelled mid-handshake.
Over asyncio, uvloop, mtloop (native TLS) and mtloop-fallback.

Then mtloop's own: which connections run natively, which fall back (a
context whose callbacks call Python: sni_callback, keylog_filename, the
message callback, PSK callbacks, an SSLObject subclass, a class that
overrides wrap_bio()), that those callbacks do run, mtloop.tls_stats()
counting both paths, and the bound on server handshakes.
"""

import asyncio
import contextlib
import logging
import os
import socket
import ssl
import sys
import threading

import pytest

from conftest import get_impl
from tlsutil import HOST, Collect, certs, close_both, loop_factory, tls_server  # noqa: F401


def on_stock_loop(coro_fn, *args):
    """Runs coro_fn(loop, *args) on a fresh stock asyncio loop: the
    reference outcome."""
    stock = asyncio.DefaultEventLoopPolicy().new_event_loop()
    try:
        return stock.run_until_complete(asyncio.wait_for(coro_fn(stock, *args), 20))
    finally:
        stock.close()


class Events(asyncio.Protocol):
    """Records the protocol's callbacks in order."""

    def __init__(self, loop, eof_result=None):
        self.events = []
        self.eof_result = eof_result
        self.transport = None
        self.lost = loop.create_future()

    def connection_made(self, transport):
        self.transport = transport
        self.events.append("made")

    def data_received(self, data):
        if self.events and self.events[-1][0] == "data":
            self.events[-1] = ("data", self.events[-1][1] + data)
        else:
            self.events.append(("data", data))

    def eof_received(self):
        self.events.append("eof")
        return self.eof_result

    def connection_lost(self, exc):
        self.events.append(("lost", type(exc).__name__ if exc else None))
        if not self.lost.done():
            self.lost.set_result(exc)


def peer_thread(lsock, ctx, body):
    """Accepts one connection on `lsock`, completes the handshake as the TLS
    server with `ctx`, and runs body(tls_socket) in a thread."""
    errors = []

    def main():
        try:
            conn, _ = lsock.accept()
            conn.settimeout(10)
            tls = ctx.wrap_socket(conn, server_side=True)
            try:
                body(tls)
            finally:
                tls.close()
        except Exception as exc:  # reported by the test
            errors.append(exc)

    thread = threading.Thread(target=main, daemon=True)
    thread.start()
    return thread, errors


def listener():
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(4)
    return lsock


# ---- failures raise what the ssl module raises ------------------------------------


def _describe(exc):
    return (type(exc), getattr(exc, "verify_code", None), getattr(exc, "verify_message", None),
            getattr(exc, "library", None), getattr(exc, "reason", None),
            getattr(exc, "errno", None))


@pytest.mark.parametrize("case", ["untrusted", "hostname-mismatch", "ip-mismatch"])
def test_verification_errors_as_the_stock_loop(loop, run, certs, case):
    async def attempt(lp):
        server, port, _ = await tls_server(lp, certs.server())
        try:
            hostname = {"hostname-mismatch": "other.example", "ip-mismatch": "10.1.2.3"}.get(
                case, HOST)
            with pytest.raises(ssl.SSLError) as info:
                await lp.create_connection(asyncio.Protocol, "127.0.0.1", port,
                                           ssl=certs.client(trust=case != "untrusted"),
                                           server_hostname=hostname)
            return _describe(info.value)
        finally:
            server.close()
            await server.wait_closed()

    expected = on_stock_loop(attempt)
    assert expected[0] is ssl.SSLCertVerificationError
    assert run(attempt(loop)) == expected


def test_missing_client_certificate_as_the_stock_loop(loop, run, certs):
    """TLS 1.3: the client's handshake completes before the server checks
    the client's (absent) certificate; the client learns it from the
    server's alert, on its next read."""

    async def attempt(lp):
        lsock = listener()

        def body(tls):
            pass  # the server's handshake fails: wrap_socket() raises

        thread, errors = peer_thread(lsock, certs.server(require_client_cert=True), body)
        try:
            p = Events(lp)
            await lp.create_connection(lambda: p, *lsock.getsockname(), ssl=certs.client(),
                                       server_hostname=HOST)
            exc = await asyncio.wait_for(p.lost, 10)
            await lp.run_in_executor(None, thread.join, 10)
            return _describe(exc), p.events, [type(e).__name__ for e in errors]
        finally:
            lsock.close()

    got = run(attempt(loop))
    assert got == on_stock_loop(attempt)
    assert got[0][0] is ssl.SSLError and got[0][4] == "TLSV13_ALERT_CERTIFICATE_REQUIRED"


@pytest.mark.parametrize("native_tls", [True, False], ids=["native", "fallback"])
def test_mtloop_server_handshake_failure_reaches_the_peer(certs, native_tls):
    """A server whose handshake fails (no client certificate): on the native
    path OpenSSL sends its alert, as a blocking ssl socket and uvloop do, so
    the client reads why; asyncio's SSL protocol (the fallback, and the
    stock loop) closes without it, and the client reads an EOF."""
    lp = _mtloop().new_event_loop(native_tls=native_tls)
    outcome = []

    def client(port):
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
            with certs.client().wrap_socket(raw, server_hostname=HOST) as tls:
                try:
                    outcome.append(tls.recv(1))
                except ssl.SSLError as exc:
                    outcome.append(exc.reason)

    async def main():
        server, port, made = await tls_server(lp, certs.server(require_client_cert=True))
        try:
            await lp.run_in_executor(None, client, port)
        finally:
            server.close()
            await server.wait_closed()
        return made

    try:
        made = lp.run_until_complete(asyncio.wait_for(main(), 20))
    finally:
        lp.close()
    assert not any(p.made.done() for p in made)  # connection_made() never ran
    assert outcome == (["TLSV13_ALERT_CERTIFICATE_REQUIRED"] if native_tls else [b""])


# ---- what a connection answers --------------------------------------------------


def _ssl_object_answers(sslobj, ctx):
    return {
        "peercert": sslobj.getpeercert(),
        "peercert_der": sslobj.getpeercert(binary_form=True),
        "cipher": sslobj.cipher(),
        "version": sslobj.version(),
        "alpn": sslobj.selected_alpn_protocol(),
        "compression": sslobj.compression(),
        "server_side": sslobj.server_side,
        "server_hostname": sslobj.server_hostname,
        "context_is_ours": sslobj.context is ctx,
        "shared_ciphers": sslobj.shared_ciphers(),
    }


def test_ssl_object_and_extra_info_as_the_stock_loop(loop, run, certs):
    async def attempt(lp):
        sctx = certs.server(require_client_cert=True, alpn=["h2", "http/1.1"])
        cctx = certs.client(cert=True, alpn=["http/1.1"])
        server, port, made = await tls_server(lp, sctx)
        try:
            t, p = await lp.create_connection(lambda: Collect(lp, 2), "127.0.0.1", port,
                                              ssl=cctx, server_hostname=HOST)
            t.write(b"hi")
            await asyncio.wait_for(p.done, 10)
            st = made[0].transport
            answers = {}
            for side, tr, ctx in (("client", t, cctx), ("server", st, sctx)):
                answers[side] = _ssl_object_answers(tr.get_extra_info("ssl_object"), ctx)
                answers[side + "-extra"] = {
                    name: tr.get_extra_info(name)
                    for name in ("peercert", "cipher", "compression")
                }
                answers[side + "-sslcontext"] = tr.get_extra_info("sslcontext") is ctx
                answers[side + "-socket"] = tr.get_extra_info("socket") is not None
        except BaseException:
            server.close()
            raise
        await close_both(t, p, server)
        return answers

    got = run(attempt(loop))
    expected = on_stock_loop(attempt)
    assert got == expected
    assert expected["client"]["alpn"] == "http/1.1"
    assert expected["server"]["peercert"]["subject"]


# ---- how a connection ends ---------------------------------------------------------


async def _peer_ends(lp, certs, how):
    lsock = listener()

    def body(tls):
        tls.sendall(b"last words")
        if how == "close_notify":
            raw = tls.unwrap()
            raw.recv(1)  # until the client closes
            raw.close()
        else:
            tls.shutdown(socket.SHUT_RDWR)

    thread, errors = peer_thread(lsock, certs.server(), body)
    try:
        p = Events(lp)
        await lp.create_connection(lambda: p, *lsock.getsockname(), ssl=certs.client(),
                                   server_hostname=HOST)
        await asyncio.wait_for(p.lost, 10)
        await lp.run_in_executor(None, thread.join, 10)
        return p.events, [type(e).__name__ for e in errors]
    finally:
        lsock.close()


def test_peer_sends_close_notify_as_the_stock_loop(loop, run, certs):
    """The peer sends data, then close_notify: data, eof_received(), the
    answer, connection_lost(None), as on the stock loop."""
    got = run(_peer_ends(loop, certs, "close_notify"))
    assert got == on_stock_loop(_peer_ends, certs, "close_notify")
    assert got[0][-2:] == ["eof", ("lost", None)]


@pytest.mark.uvloop_xfail("uvloop's SSL protocol calls connection_lost() without "
                          "eof_received() when the peer closes TCP without close_notify")
def test_peer_closes_without_close_notify_as_the_stock_loop(loop, run, certs):
    """The peer sends data, then closes TCP without close_notify: asyncio
    takes that as the end of the stream too."""
    got = run(_peer_ends(loop, certs, "tcp-eof"))
    assert got == on_stock_loop(_peer_ends, certs, "tcp-eof")
    assert got[0][-2:] == ["eof", ("lost", None)]


def test_eof_received_true_has_no_effect(loop, run, certs, caplog):
    """A protocol that returns True from eof_received() gets asyncio's
    warning, and the connection closes anyway."""

    async def attempt(lp):
        lsock = listener()

        def body(tls):
            tls.sendall(b"x")
            tls.unwrap().close()

        thread, _ = peer_thread(lsock, certs.server(), body)
        try:
            p = Events(lp, eof_result=True)
            await lp.create_connection(lambda: p, *lsock.getsockname(), ssl=certs.client(),
                                       server_hostname=HOST)
            await asyncio.wait_for(p.lost, 10)
            await lp.run_in_executor(None, thread.join, 10)
            return p.events
        finally:
            lsock.close()

    with caplog.at_level(logging.WARNING, logger="asyncio"):
        got = run(attempt(loop))
    assert got == on_stock_loop(attempt)
    assert "returning true from eof_received() has no effect when using ssl" in caplog.text


def test_output_is_flushed_before_close_notify(loop, run, certs):
    """write() of megabytes then close(): the peer reads every byte, then
    the close_notify (its unwrap() succeeds), and connection_lost(None)
    comes after the peer's close_notify."""
    size = 8 * 1024 * 1024
    data = os.urandom(size)

    async def attempt(lp):
        lsock = listener()
        got = bytearray()

        def body(tls):
            while len(got) < size:
                chunk = tls.recv(1 << 20)
                if not chunk:
                    break
                got.extend(chunk)
            tls.unwrap().close()  # reads the client's close_notify, answers with its own

        thread, errors = peer_thread(lsock, certs.server(), body)
        try:
            p = Events(lp)
            t, _ = await lp.create_connection(lambda: p, *lsock.getsockname(),
                                              ssl=certs.client(), server_hostname=HOST)
            t.write(data)
            t.close()
            exc = await asyncio.wait_for(p.lost, 15)
            await lp.run_in_executor(None, thread.join, 10)
            return exc, bytes(got) == data, [type(e).__name__ for e in errors], p.events
        finally:
            lsock.close()

    result = run(attempt(loop))
    assert result == on_stock_loop(attempt)
    assert result[:3] == (None, True, [])


def test_cancelled_mid_handshake(loop, run, certs):
    """The connect is cancelled while its handshake waits for a server that
    never answers: the connection is closed (the server sees the end)."""
    lsock = listener()
    lsock.setblocking(False)

    async def main():
        task = loop.create_task(loop.create_connection(
            asyncio.Protocol, *lsock.getsockname(), ssl=certs.client(), server_hostname=HOST))
        conn, _ = await loop.sock_accept(lsock)
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return conn

    try:
        conn = run(main())
        conn.settimeout(5)
        while conn.recv(65536):  # the ClientHello, then the end
            pass
        conn.close()
    finally:
        lsock.close()


@pytest.mark.parametrize("native_tls", [True, False], ids=["native", "fallback"])
def test_mtloop_closed_mid_handshake(certs, native_tls):
    """mtloop closes the transports of a loop that closes: with a handshake
    in flight, the I/O thread lets go of its SSL (what it pinned is
    released), and the server sees the connection end."""
    lsock = listener()
    lsock.setblocking(False)
    lp = _mtloop().new_event_loop(native_tls=native_tls)
    tasks = []
    try:
        async def main():
            tasks.append(lp.create_task(lp.create_connection(
                asyncio.Protocol, *lsock.getsockname(), ssl=certs.client(),
                server_hostname=HOST)))
            conn, _ = await lp.sock_accept(lsock)
            await asyncio.sleep(0.05)
            return conn

        conn = lp.run_until_complete(main())
    finally:
        lp.close()
        # The connect never finishes: end its coroutine here rather than in
        # whatever test the garbage collector happens to run in.
        for task in tasks:
            task._log_destroy_pending = False
            with contextlib.suppress(RuntimeError):  # "Event loop is closed"
                task.get_coro().close()
    try:
        conn.settimeout(5)
        while conn.recv(65536):
            pass
        conn.close()
    finally:
        lsock.close()


# ---- start_tls() ----------------------------------------------------------------------


def starttls_peer(lsock, tls_ctx=None):
    """A plain server in a thread: reads "STARTTLS\n", answers "GO\n", then
    takes the TLS handshake as the server with `tls_ctx` (None: never
    speaks again, until the client goes)."""
    errors = []

    def main():
        try:
            conn, _ = lsock.accept()
            conn.settimeout(10)
            with conn:
                got = b""
                while not got.endswith(b"\n"):
                    got += conn.recv(1)
                conn.sendall(b"GO\n")
                if tls_ctx is None:
                    while conn.recv(65536):
                        pass
                    return
                tls_ctx.wrap_socket(conn, server_side=True).close()
        except Exception as exc:  # reported by the test
            errors.append(exc)

    thread = threading.Thread(target=main, daemon=True)
    thread.start()
    return thread, errors


@pytest.mark.parametrize("case", [
    "untrusted",
    pytest.param("timeout", marks=pytest.mark.uvloop_xfail(
        "uvloop tells the protocol of a start_tls() handshake that timed out "
        "(connection_lost(ConnectionAbortedError)); the stock loop does not")),
])
def test_start_tls_failure_as_the_stock_loop(loop, run, certs, case):
    """start_tls() that fails: what it raises, and what the protocol is told
    (a failed handshake ends the connection it had; one that timed out is
    aborted without a word to it)."""

    async def attempt(lp):
        lsock = listener()
        thread, _ = starttls_peer(lsock, certs.server() if case == "untrusted" else None)
        try:
            p = Events(lp)
            t, _ = await lp.create_connection(lambda: p, *lsock.getsockname())
            t.write(b"STARTTLS\n")
            while p.events[-1:] != [("data", b"GO\n")]:
                await asyncio.sleep(0.01)
            with pytest.raises(OSError) as info:
                await lp.start_tls(t, p, certs.client(trust=case != "untrusted"),
                                   server_hostname=HOST, ssl_handshake_timeout=0.3)
            for _ in range(20):  # what the protocol is told comes on later iterations
                await asyncio.sleep(0)
            t.close()
            await lp.run_in_executor(None, thread.join, 10)
            return _describe(info.value), p.events
        finally:
            lsock.close()

    got = run(attempt(loop))
    assert got == on_stock_loop(attempt)
    assert got[0][0] is (ssl.SSLCertVerificationError if case == "untrusted"
                         else ConnectionAbortedError)


# ---- mtloop: which path a connection takes --------------------------------------------

def _mtloop():
    return get_impl("mtloop").module


def _count_paths(run_connection):
    mtloop = _mtloop()
    before = mtloop.tls_stats()
    result = run_connection()
    after = mtloop.tls_stats()
    reasons = {
        reason: n - before["fallback_reasons"].get(reason, 0)
        for reason, n in after["fallback_reasons"].items()
        if n != before["fallback_reasons"].get(reason, 0)
    }
    return after["native"] - before["native"], reasons, result


def _echo_once(sctx, cctx, *, native_tls=True, check=None):
    mtloop = _mtloop()
    lp = mtloop.new_event_loop(native_tls=native_tls)

    async def main():
        server, port, made = await tls_server(lp, sctx)
        try:
            t, p = await lp.create_connection(lambda: Collect(lp, 5), "127.0.0.1", port,
                                              ssl=cctx, server_hostname=HOST)
            t.write(b"hello")
            assert await asyncio.wait_for(p.done, 10) == b"hello"
            kinds = (type(t.get_extra_info("ssl_object")).__name__,
                     type(made[0].transport.get_extra_info("ssl_object")).__name__)
        except BaseException:
            server.close()
            raise
        await close_both(t, p, server)
        return kinds

    try:
        return lp.run_until_complete(asyncio.wait_for(main(), 20))
    finally:
        lp.close()


def test_native_is_the_default(certs):
    mtloop = _mtloop()
    if not mtloop.tls_stats()["available"] and mtloop.tls_stats()["unavailable_reason"]:
        pytest.fail(f"native TLS unavailable: {mtloop.tls_stats()['unavailable_reason']}")
    native, reasons, kinds = _count_paths(lambda: _echo_once(certs.server(), certs.client()))
    assert (native, reasons) == (2, {})
    assert kinds == ("NativeSSLObject", "NativeSSLObject")
    assert mtloop.tls_stats()["available"]


def test_native_tls_false_falls_back(certs):
    native, reasons, kinds = _count_paths(
        lambda: _echo_once(certs.server(), certs.client(), native_tls=False))
    assert (native, reasons) == (0, {"the loop was made with native_tls=False": 2})
    assert kinds == ("SSLObject", "SSLObject")


def test_sni_callback_falls_back_and_runs(certs):
    seen = []
    sctx = certs.server()
    sctx.sni_callback = lambda sslobj, name, ctx: seen.append(name)
    native, reasons, _ = _count_paths(lambda: _echo_once(sctx, certs.client()))
    assert (native, reasons) == (1, {"sni_callback is set": 1})
    assert seen == [HOST]


def test_keylog_filename_falls_back_and_logs(certs, tmp_path):
    keylog = tmp_path / "keys.log"
    cctx = certs.client()
    cctx.keylog_filename = str(keylog)
    native, reasons, _ = _count_paths(lambda: _echo_once(certs.server(), cctx))
    assert (native, reasons) == (1, {"keylog_filename is set": 1})
    assert "CLIENT_TRAFFIC_SECRET_0" in keylog.read_text()


def test_message_callback_falls_back_and_runs(certs):
    messages = []
    cctx = certs.client()
    cctx._msg_callback = lambda *args: messages.append(args[1])
    native, reasons, _ = _count_paths(lambda: _echo_once(certs.server(), cctx))
    assert (native, reasons) == (1, {"a message callback is set": 1})
    assert messages


def test_sslobject_subclass_falls_back(certs):
    class Mine(ssl.SSLObject):
        pass

    cctx = certs.client()
    cctx.sslobject_class = Mine
    native, reasons, kinds = _count_paths(lambda: _echo_once(certs.server(), cctx))
    assert (native, reasons) == (1, {"sslobject_class is not ssl.SSLObject": 1})
    assert kinds == ("Mine", "NativeSSLObject")


def test_context_class_overriding_wrap_bio_falls_back_and_is_called(certs):
    """A context class that takes part in each connection through wrap_bio()
    (truststore's verifies the peer there) keeps doing so."""
    calls = []

    class Checking(ssl.SSLContext):
        def wrap_bio(self, *args, **kwargs):
            calls.append(kwargs.get("server_hostname"))
            return super().wrap_bio(*args, **kwargs)

    cctx = Checking(ssl.PROTOCOL_TLS_CLIENT)
    certs.ca.configure_trust(cctx)
    native, reasons, kinds = _count_paths(lambda: _echo_once(certs.server(), cctx))
    assert (native, reasons) == (1, {"the context's class overrides wrap_bio()": 1})
    assert calls == [HOST]


@pytest.mark.skipif(sys.version_info < (3, 13), reason="PSK callbacks are new in Python 3.13")
def test_psk_callbacks_fall_back_and_work():
    """A PSK-only connection: it works only if the callbacks run, so the
    native path (which cannot call them) must not be taken."""
    key = bytes.fromhex("c0ffee" * 8)
    sctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    sctx.maximum_version = ssl.TLSVersion.TLSv1_2
    sctx.set_ciphers("PSK")
    sctx.set_psk_server_callback(lambda identity: key if identity == "me" else b"")
    cctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    cctx.check_hostname = False
    cctx.verify_mode = ssl.CERT_NONE
    cctx.maximum_version = ssl.TLSVersion.TLSv1_2
    cctx.set_ciphers("PSK")
    cctx.set_psk_client_callback(lambda hint: ("me", key))
    native, reasons, _ = _count_paths(lambda: _echo_once(sctx, cctx))
    assert (native, reasons) == (0, {"PSK callbacks are set": 2})


def test_handshakes_in_progress_are_bounded(certs):
    """With the bound at 1 and one I/O thread, a server connection whose
    client never says hello holds the only handshake slot: a second client
    completes its handshake only after the first connection is gone."""
    mtloop = _mtloop()
    c_module = mtloop._mtloop
    old = c_module.tls_max_handshakes()
    lp = mtloop.new_event_loop(io_threads=1)
    events = []

    def tls_client(port):
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
            with certs.client().wrap_socket(raw, server_hostname=HOST) as tls:
                events.append("second handshake done")
                tls.sendall(b"x")
                tls.recv(1)

    async def main():
        server, port, _ = await tls_server(lp, certs.server())
        try:
            silent = socket.create_connection(("127.0.0.1", port))
            await asyncio.sleep(0.2)  # the server's flow takes the slot, waits for hello
            second = lp.run_in_executor(None, tls_client, port)
            await asyncio.sleep(0.5)  # unbounded, the second handshake would be done
            events.append("silent client closed")
            silent.close()
            await asyncio.wait_for(second, 10)
        finally:
            server.close()
            await server.wait_closed()

    try:
        c_module.tls_max_handshakes(1)
        lp.run_until_complete(asyncio.wait_for(main(), 20))
    finally:
        c_module.tls_max_handshakes(old)
        lp.close()
    assert events == ["silent client closed", "second handshake done"]


def test_handshake_bound_is_checked():
    c_module = _mtloop()._mtloop
    with pytest.raises(ValueError):
        c_module.tls_max_handshakes(0)
    assert c_module.tls_max_handshakes() >= 1


def test_post_handshake_client_auth_as_the_stock_loop(loop, run, certs):
    """TLS 1.3 post-handshake authentication: once the connection is open the
    server asks for the client's certificate.  The request arrives with data
    the client reads, and the answer must go out from inside that read (on
    mtloop, from the I/O thread's SSL_read)."""

    async def attempt(lp):
        lsock = listener()
        seen = {}

        sctx = certs.server()
        sctx.verify_mode = ssl.CERT_OPTIONAL
        sctx.post_handshake_auth = True
        certs.ca.configure_trust(sctx)

        def body(tls):
            seen["before"] = tls.getpeercert()
            tls.verify_client_post_handshake()
            tls.sendall(b"hi")  # carries the certificate request
            seen["reply"] = tls.recv(2)  # processes the client's certificate first
            seen["after"] = (tls.getpeercert() or {}).get("subjectAltName")

        thread, errors = peer_thread(lsock, sctx, body)
        try:
            cctx = certs.client(cert=True)
            cctx.post_handshake_auth = True
            p = Collect(lp, 2)
            t, _ = await lp.create_connection(lambda: p, *lsock.getsockname(), ssl=cctx,
                                              server_hostname=HOST)
            assert await asyncio.wait_for(p.done, 10) == b"hi"
            t.write(b"ok")
            await lp.run_in_executor(None, thread.join, 10)
            t.close()
            await asyncio.wait_for(p.lost, 10)
            return seen, [repr(e) for e in errors]
        finally:
            lsock.close()

    got = run(attempt(loop))
    assert got == on_stock_loop(attempt)
    assert got[0]["before"] is None and got[0]["after"] == (("DNS", "client.example"),)


# ---- mtloop: start_tls() on the I/O thread ----------------------------------------------


def test_start_tls_runs_natively(certs):
    """Both ends of a connection upgraded by start_tls() run natively: the
    plain flow is handed over to a TLS flow on the same socket."""
    mtloop = _mtloop()
    lp = mtloop.new_event_loop()

    async def main():
        upgraded = lp.create_future()

        class Plain(asyncio.Protocol):
            def connection_made(self, transport):
                self.transport = transport

            def data_received(self, data):
                assert data == b"STARTTLS\n"
                self.transport.write(b"GO\n")  # sent before the TLS begins
                lp.create_task(self.upgrade())

            async def upgrade(self):
                echo = Collect(lp, 0)
                tls = await lp.start_tls(self.transport, echo, certs.server(), server_side=True)
                upgraded.set_result((self.transport, tls))

        server = await lp.create_server(Plain, "127.0.0.1", 0)
        reader, writer = await asyncio.open_connection(*server.sockets[0].getsockname())
        writer.write(b"STARTTLS\n")
        assert await reader.readline() == b"GO\n"
        await writer.start_tls(certs.client(), server_hostname=HOST)
        plain, tls = await asyncio.wait_for(upgraded, 10)
        kinds = (type(writer.get_extra_info("ssl_object")).__name__,
                 type(tls.get_extra_info("ssl_object")).__name__)
        assert plain.is_closing() and not tls.is_closing()
        assert tls.get_extra_info("peername") == writer.get_extra_info("sockname")
        assert tls.get_extra_info("socket").fileno() >= 0
        tls.write(b"over TLS")
        assert await reader.readexactly(8) == b"over TLS"
        writer.close()
        await writer.wait_closed()
        server.close()
        await asyncio.wait_for(server.wait_closed(), 10)
        return kinds

    try:
        native, reasons, kinds = _count_paths(lambda: lp.run_until_complete(
            asyncio.wait_for(main(), 20)))
    finally:
        lp.close()
    assert (native, reasons) == (2, {})
    assert kinds == ("NativeSSLObject", "NativeSSLObject")


def test_start_tls_takes_what_was_read_past_the_upgrade(certs, monkeypatch):
    """The peer's ClientHello arrived while the plain protocol had paused
    reading (the I/O thread had read it already): it is the start of the
    TLS stream, fed to the SSL before the socket, and the handshake
    completes.  The loop thread is held while both the request and the
    hello come, 0.1 s apart, so that they are two reads (by an I/O thread:
    inline, nothing reads while the loop thread is held)."""
    import time

    mtloop = _mtloop()
    lp = mtloop.new_event_loop(io_threads=1)
    prefixes = []
    real_prefix = mtloop._mtloop.tls_session_prefix

    def spy(session, data):
        prefixes.append(data)
        real_prefix(session, data)

    monkeypatch.setattr(mtloop._mtloop, "tls_session_prefix", spy)
    seen = []

    class Plain(asyncio.Protocol):
        def connection_made(self, transport):
            self.transport = transport

        def data_received(self, data):
            seen.append(data)
            self.transport.pause_reading()
            lp.create_task(self.upgrade())

        async def upgrade(self):
            echo = Collect(lp, 0)
            tls = await lp.start_tls(self.transport, echo, certs.server(), server_side=True)
            echo.transport = tls
            tls.write(b"hello over TLS")

    def client(port, errors, answer):
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
                time.sleep(0.1)  # the server reads
                lp.call_soon_threadsafe(time.sleep, 0.6)
                time.sleep(0.1)
                sock.sendall(b"STARTTLS\n")
                time.sleep(0.1)
                with certs.client().wrap_socket(sock, server_hostname=HOST) as tls:
                    answer.append(tls.recv(64))
        except Exception as exc:  # reported by the test
            errors.append(exc)

    async def main():
        server = await lp.create_server(Plain, "127.0.0.1", 0)
        errors, answer = [], []
        thread = threading.Thread(target=client, daemon=True,
                                  args=(server.sockets[0].getsockname()[1], errors, answer))
        thread.start()
        await lp.run_in_executor(None, thread.join, 15)
        server.close()
        return errors, answer

    try:
        errors, answer = lp.run_until_complete(asyncio.wait_for(main(), 20))
    finally:
        lp.close()
    assert errors == []
    assert answer == [b"hello over TLS"]
    assert seen == [b"STARTTLS\n"]
    assert len(prefixes) == 1 and prefixes[0][:1] == b"\x16"  # a TLS handshake record
