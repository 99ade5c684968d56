"""PseudoSocket: what get_extra_info('socket') wraps for a transport that
has no Python socket object (an accepted connection).

The transport's C record owns the file descriptor and closes it once both
the I/O thread and the loop have let go of it; no Python object may own
it, or a finalizer could close it under the I/O thread.  This stand-in
gives the read-only and option-setting side of a socket on that
descriptor without owning it, as uvloop's pseudo-socket does; once the
transport has let go, fileno() is -1 and every call fails with EBADF.
"""

from __future__ import annotations

import errno
import os
import socket
from typing import Any

__all__ = ["PseudoSocket"]


class PseudoSocket:
    """A non-owning, socket-like view of a transport's descriptor."""

    __slots__ = ("_core", "_family", "_type", "_proto")

    def __init__(self, core: Any, family: int, type: int, proto: int) -> None:
        self._core = core
        self._family = family
        self._type = type
        self._proto = proto

    @property
    def family(self) -> Any:
        try:
            return socket.AddressFamily(self._family)
        except ValueError:
            return self._family

    @property
    def type(self) -> Any:
        try:
            return socket.SocketKind(self._type)
        except ValueError:
            return self._type

    @property
    def proto(self) -> int:
        return self._proto

    def fileno(self) -> int:
        return self._core.fd

    def _borrow(self) -> socket.socket:
        """A socket object on the descriptor, for one call; detached after."""
        fd = self.fileno()
        if fd < 0:
            raise OSError(errno.EBADF, os.strerror(errno.EBADF))
        return socket.socket(self._family, self._type, self._proto, fileno=fd)

    def _call(self, name: str, *args: Any) -> Any:
        sock = self._borrow()
        try:
            return getattr(sock, name)(*args)
        finally:
            sock.detach()

    def getsockname(self) -> Any:
        return self._call("getsockname")

    def getpeername(self) -> Any:
        return self._call("getpeername")

    def getsockopt(self, *args: Any) -> Any:
        return self._call("getsockopt", *args)

    def setsockopt(self, *args: Any) -> Any:
        return self._call("setsockopt", *args)

    def get_inheritable(self) -> bool:
        return os.get_inheritable(self._borrow_fd())

    def _borrow_fd(self) -> int:
        fd = self.fileno()
        if fd < 0:
            raise OSError(errno.EBADF, os.strerror(errno.EBADF))
        return fd

    def dup(self) -> socket.socket:
        """A socket object of its own (a new descriptor), in non-blocking mode."""
        sock = socket.socket(self._family, self._type, self._proto,
                             fileno=os.dup(self._borrow_fd()))
        sock.setblocking(False)
        return sock

    def gettimeout(self) -> float:
        return 0.0

    def settimeout(self, value: float | None) -> None:
        if value != 0:
            raise ValueError("settimeout(): only 0 timeout is allowed on transport sockets")

    def setblocking(self, flag: bool) -> None:
        if flag:
            raise ValueError("setblocking(): transport sockets cannot be blocking")

    def __getattr__(self, name: str) -> Any:
        if hasattr(socket.socket, name):
            raise TypeError(f"transport sockets do not support {name}()")
        raise AttributeError(name)

    def __repr__(self) -> str:
        text = (f"<mtloop.PseudoSocket fd={self.fileno()}, family={self.family!s}, "
                f"type={self.type!s}, proto={self._proto}")
        if self.fileno() >= 0:
            for label, getter in (("laddr", self.getsockname), ("raddr", self.getpeername)):
                try:
                    text += f", {label}={getter()}"
                except OSError:
                    pass
        return text + ">"

    def __getstate__(self) -> Any:
        raise TypeError(f"Cannot serialize {self.__class__.__name__!r} object")
