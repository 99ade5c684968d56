"""Datagram endpoints (issue #12, first step): asyncio's own datagram
transport over mtloop's fd watchers, on the loop thread.

BaseEventLoop.create_datagram_endpoint() does the argument checks, address
resolution and socket setup as on the stock loop, then calls
_make_datagram_transport() here.  The transport is the stock selector
loop's, reading and sending with recvfrom()/sendto() from the loop thread
through add_reader/add_writer, which mtloop implements in C; it needs of
the loop only those watchers and a `_transports` map.  So datagram
endpoints behave exactly as on the stock loop, at the stock loop's cost.

The next step moves them to the I/O threads as a transport kind of their
own (batched with recvmmsg/sendmmsg), on the seam in docs/transport-kinds.md.
"""

from __future__ import annotations

import socket
from asyncio import selector_events
from typing import Any

__all__ = ["DatagramMethods", "DatagramTransport"]


class DatagramTransport(selector_events._SelectorDatagramTransport):
    """The stock datagram transport; its repr does not look for a selector,
    which mtloop has none of."""

    def __repr__(self) -> str:
        info = [self.__class__.__name__]
        if self._sock is None:
            info.append("closed")
        elif self._closing:
            info.append("closing")
        info.append(f"fd={self._sock_fd}")
        if self._loop is not None and not self._loop.is_closed() and self._sock is not None:
            info.append(f"bufsize={self.get_write_buffer_size()}")
        return "<{}>".format(" ".join(info))


class DatagramMethods:
    """Mixin for mtloop.Loop: the hook of BaseEventLoop.create_datagram_endpoint()."""

    _transports: Any

    def _make_datagram_transport(self, sock: socket.socket, protocol: Any, address: Any = None,
                                 waiter: Any = None, extra: dict | None = None) -> Any:
        return DatagramTransport(self, sock, protocol, address, waiter, extra)
