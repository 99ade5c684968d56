"""getaddrinfo / getnameinfo on local addresses only."""

import asyncio
import socket

import pytest

from netutil import HAS_IPV6



def _norm(infos):
    return sorted((int(f), int(t), p, c, a) for f, t, p, c, a in infos)


def test_getaddrinfo_numeric_ipv4(loop, run):
    infos = run(loop.getaddrinfo("127.0.0.1", 80, type=socket.SOCK_STREAM))
    assert isinstance(infos, list)
    assert (socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", ("127.0.0.1", 80)) in [
        tuple(i) for i in infos
    ]
    assert _norm(infos) == _norm(socket.getaddrinfo("127.0.0.1", 80, type=socket.SOCK_STREAM))


def test_getaddrinfo_result_types(loop, run):
    infos = run(loop.getaddrinfo("127.0.0.1", 80, family=socket.AF_INET,
                                 type=socket.SOCK_STREAM))
    family, type_, proto, canon, addr = infos[0]
    assert family == socket.AF_INET
    assert isinstance(family, socket.AddressFamily)
    assert isinstance(type_, socket.SocketKind)
    assert isinstance(proto, int)
    assert isinstance(canon, str)
    assert addr == ("127.0.0.1", 80)


def test_getaddrinfo_localhost(loop, run):
    got = run(loop.getaddrinfo("localhost", 8080, type=socket.SOCK_STREAM))
    expected = socket.getaddrinfo("localhost", 8080, type=socket.SOCK_STREAM)
    assert _norm(got) == _norm(expected)
    assert any(a[4][0] in ("127.0.0.1", "::1") for a in got)


@pytest.mark.parametrize("port", [80, "80", "http", None, 0, b"80"])
def test_getaddrinfo_port_forms(loop, run, port):
    got = run(loop.getaddrinfo("127.0.0.1", port, type=socket.SOCK_STREAM))
    expected = socket.getaddrinfo("127.0.0.1", port, type=socket.SOCK_STREAM)
    assert _norm(got) == _norm(expected)


def test_getaddrinfo_all_kwargs(loop, run):
    kw = dict(family=socket.AF_INET, type=socket.SOCK_DGRAM, proto=socket.IPPROTO_UDP,
              flags=socket.AI_NUMERICHOST | socket.AI_PASSIVE)
    got = run(loop.getaddrinfo("127.0.0.1", 53, **kw))
    expected = socket.getaddrinfo("127.0.0.1", 53, **kw)
    assert _norm(got) == _norm(expected)


def test_getaddrinfo_host_none_passive(loop, run):
    kw = dict(family=socket.AF_INET, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    got = run(loop.getaddrinfo(None, 8000, **kw))
    assert _norm(got) == _norm(socket.getaddrinfo(None, 8000, **kw))


@pytest.mark.skipif(not HAS_IPV6, reason="no IPv6 loopback")
def test_getaddrinfo_ipv6_loopback(loop, run):
    got = run(loop.getaddrinfo("::1", 443, type=socket.SOCK_STREAM))
    assert _norm(got) == _norm(socket.getaddrinfo("::1", 443, type=socket.SOCK_STREAM))
    assert got[0][0] == socket.AF_INET6
    assert got[0][4][:2] == ("::1", 443)


def test_getaddrinfo_error(loop, run):
    # AI_NUMERICHOST with a name: fails locally, without any DNS traffic
    with pytest.raises(socket.gaierror):
        run(loop.getaddrinfo("not-a-number.invalid", 80, flags=socket.AI_NUMERICHOST))


def test_getaddrinfo_concurrent(loop, run):
    async def main():
        return await asyncio.gather(
            *(loop.getaddrinfo("127.0.0.1", p, type=socket.SOCK_STREAM) for p in range(1, 51))
        )

    results = run(main())
    assert [r[0][4][1] for r in results] == list(range(1, 51))


def test_getaddrinfo_in_debug_mode(loop, run):
    loop.set_debug(True)
    got = run(loop.getaddrinfo("127.0.0.1", 80, type=socket.SOCK_STREAM))
    assert _norm(got) == _norm(socket.getaddrinfo("127.0.0.1", 80, type=socket.SOCK_STREAM))


def test_getnameinfo_numeric(loop, run):
    flags = socket.NI_NUMERICHOST | socket.NI_NUMERICSERV
    assert run(loop.getnameinfo(("127.0.0.1", 80), flags)) == ("127.0.0.1", "80")


def test_getnameinfo_matches_socket_module(loop, run):
    assert run(loop.getnameinfo(("127.0.0.1", 80))) == socket.getnameinfo(("127.0.0.1", 80), 0)


@pytest.mark.skipif(not HAS_IPV6, reason="no IPv6 loopback")
def test_getnameinfo_ipv6(loop, run):
    flags = socket.NI_NUMERICHOST | socket.NI_NUMERICSERV
    assert run(loop.getnameinfo(("::1", 8080, 0, 0), flags)) == ("::1", "8080")


def test_getnameinfo_bad_sockaddr(loop, run):
    with pytest.raises(TypeError):
        run(loop.getnameinfo("127.0.0.1"))
