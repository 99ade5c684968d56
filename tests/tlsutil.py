"""What the TLS tests share: certificates made for the session by trustme
(a throwaway CA; no key is committed), protocols, a TLS server on
127.0.0.1, and the loops: asyncio, uvloop, and mtloop on both of its TLS
paths (native, the default, and "mtloop-fallback", asyncio's SSL protocol
over mtloop transports)."""

import asyncio
import ssl

import pytest
import trustme

from conftest import IMPL_IDS, get_impl
from netutil import pattern

HOST = "localhost"
PAYLOAD = pattern(1024 * 1024 + 17)


class Certs:
    """A CA, a server certificate for localhost and 127.0.0.1, and a client
    certificate; contexts made afresh for each use."""

    def __init__(self):
        self.ca = trustme.CA()
        self.server_cert = self.ca.issue_cert(HOST, "127.0.0.1")
        self.client_cert = self.ca.issue_cert("client.example")

    def server(self, *, require_client_cert=False, alpn=None):
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.server_cert.configure_cert(ctx)
        if require_client_cert:
            ctx.verify_mode = ssl.CERT_REQUIRED
            self.ca.configure_trust(ctx)
        if alpn:
            ctx.set_alpn_protocols(alpn)
        return ctx

    def client(self, *, trust=True, cert=False, alpn=None):
        ctx = ssl.create_default_context()
        if trust:
            self.ca.configure_trust(ctx)
        if cert:
            self.client_cert.configure_cert(ctx)
        if alpn:
            ctx.set_alpn_protocols(alpn)
        return ctx


@pytest.fixture(scope="session")
def certs():
    return Certs()


class Echo(asyncio.Protocol):
    """Echoes what it receives; records its transport and the end."""

    def __init__(self, loop):
        self.transport = None
        self.made = loop.create_future()
        self.lost = loop.create_future()

    def connection_made(self, transport):
        self.transport = transport
        self.made.set_result(transport)

    def data_received(self, data):
        self.transport.write(data)

    def connection_lost(self, exc):
        if not self.lost.done():
            self.lost.set_result(exc)


class Collect(asyncio.Protocol):
    """Collects what it receives until `want` bytes have come."""

    def __init__(self, loop, want=len(PAYLOAD)):
        self.want = want
        self.data = bytearray()
        self.done = loop.create_future()
        self.lost = loop.create_future()
        self.transport = None

    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        self.data += data
        if len(self.data) >= self.want and not self.done.done():
            self.done.set_result(bytes(self.data))

    def connection_lost(self, exc):
        if not self.lost.done():
            self.lost.set_result(exc)


async def tls_server(loop, sslctx, protocol=None, backlog=100):
    """A TLS server on 127.0.0.1: (server, port, the protocols it made)."""
    protocol = protocol or Echo
    made = []

    def factory():
        made.append(protocol(loop))
        return made[-1]

    server = await loop.create_server(factory, "127.0.0.1", 0, ssl=sslctx, backlog=backlog)
    return server, server.sockets[0].getsockname()[1], made


async def echo_through(transport, proto):
    transport.write(PAYLOAD)
    got = await asyncio.wait_for(proto.done, 10)
    assert got == PAYLOAD


async def close_both(client_transport, client_proto, server=None):
    client_transport.close()
    await asyncio.wait_for(client_proto.lost, 10)
    if server is not None:
        server.close()
        await asyncio.wait_for(server.wait_closed(), 10)


TLS_IMPL_IDS = (*IMPL_IDS, "mtloop-fallback")


@pytest.fixture(params=TLS_IMPL_IDS, ids=TLS_IMPL_IDS)
def loop_factory(request):
    """As conftest's, plus mtloop with native TLS off: every test here runs
    on mtloop's native path (the default) and on its fallback, asyncio's
    SSL protocol over mtloop transports."""
    if request.param == "mtloop-fallback":
        new_event_loop = get_impl("mtloop").new_event_loop
        return lambda: new_event_loop(native_tls=False)
    return get_impl(request.param).new_event_loop
