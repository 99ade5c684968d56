"""Native TLS: OpenSSL on the I/O threads, configured by the user's
ssl.SSLContext.

The I/O thread that owns a connection runs its handshake, its record
crypto and its close_notify (src/transport/tls_ops.c); the loop thread sees
plaintext, as from a TCP transport, plus one "opened" report when the
handshake is over.  The connection's SSL object is made from the context's
own SSL_CTX, so certificates, verification, ciphers, ALPN, options and the
session cache are exactly the user's.  CPython offers no API for that
SSL_CTX: it is read from the context object, which is only done after this
module has proved, once per process, that the interpreter's ssl module and
mtloop use one and the same libssl (same loaded library, same version) and
that the object has the layout of CPython 3.11 to 3.13.

A connection falls back, silently and correctly, to asyncio's own SSL
protocol over an mtloop transport (mtloop._streams) when the native path
cannot honour its context: callbacks that call into Python with CPython's
own socket object (sni_callback, keylog_filename, the message callback, the
PSK callbacks of 3.13), an SSLObject subclass, a context class that
overrides wrap_bio() (truststore's checks the peer there), or a process
where the proof failed.  `stats()` counts both paths and the reasons.
"""

from __future__ import annotations

import _ssl
import os
import ssl
import sys
import threading
import time
from asyncio import constants, exceptions
from asyncio.log import logger
from typing import Any

from . import _mtloop
from ._transports import SocketTransport

__all__ = ["NativeSSLObject", "NativeSSLTransport", "check_timeouts", "fallback_reason",
           "new_session", "stats"]

_PROVED_VERSIONS = {(3, 11), (3, 12), (3, 13)}
_SSL_VERIFY_PEER = 0x01
_SSL_VERIFY_FAIL_IF_NO_PEER_CERT = 0x02
# CPython's _ssl numbers SSL_get_error() codes as OpenSSL does.
_SSL_ERROR_SSL = 1
_SSL_ERROR_SYSCALL = 5
_X509_V_ERR_HOSTNAME_MISMATCH = 62
_X509_V_ERR_IP_ADDRESS_MISMATCH = 64


class _Proof:
    """Computed once: whether the native path can be used in this process,
    and where the PSK callbacks live in a context object (3.13)."""

    def __init__(self) -> None:
        self.psk_offsets: tuple[int, ...] = ()
        self.unavailable = self._prove()

    def _prove(self) -> str | None:
        if os.environ.get("MTLOOP_NATIVE_TLS", "1") == "0":
            return "disabled by MTLOOP_NATIVE_TLS=0"
        if sys.version_info[:2] not in _PROVED_VERSIONS:
            return ("the ssl.SSLContext layout is proved for CPython 3.11 to 3.13, "
                    f"not {sys.version_info[0]}.{sys.version_info[1]}")
        if sys.implementation.name != "cpython":
            return f"not CPython ({sys.implementation.name})"
        ssl_file = getattr(_ssl, "__file__", None)
        if ssl_file is None:
            return "the ssl module is built into the interpreter (its libssl cannot be compared)"
        reason = _mtloop.tls_check_libssl(ssl_file, ssl.OPENSSL_VERSION_NUMBER)
        if reason is not None:
            return reason
        # The SSL_CTX read from the object must hold what Python set.
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        for mode, bits in ((ssl.CERT_REQUIRED,
                            _SSL_VERIFY_PEER | _SSL_VERIFY_FAIL_IF_NO_PEER_CERT),
                           (ssl.CERT_OPTIONAL, _SSL_VERIFY_PEER)):
            ctx.verify_mode = mode
            ctx.options ^= ssl.OP_NO_TICKET
            if not _mtloop.tls_check_context(ctx, bits, int(ctx.options)):
                return "the ssl.SSLContext object does not have the layout mtloop knows"
        if hasattr(ctx, "set_psk_client_callback"):
            offsets = []
            for proto, setter in ((ssl.PROTOCOL_TLS_CLIENT, "set_psk_client_callback"),
                                  (ssl.PROTOCOL_TLS_SERVER, "set_psk_server_callback")):
                probe = ssl.SSLContext(proto)

                def callback(*args: Any) -> Any:
                    return None

                getattr(probe, setter)(callback)
                offset = _mtloop.tls_find_ref(probe, callback)
                if offset < 0:
                    return "cannot tell whether a context has PSK callbacks"
                offsets.append(offset)
            self.psk_offsets = tuple(offsets)
        return None


def _bound_from_environment() -> None:
    """$MTLOOP_TLS_HANDSHAKES: the bound on handshakes in progress per I/O
    thread (src/transport/tls.h; a value that is not an integer from 1 to
    1,000,000 is ignored, as $MTLOOP_IO_THREADS's are)."""
    value = os.environ.get("MTLOOP_TLS_HANDSHAKES", "")
    if value.isdigit() and 1 <= int(value) <= 1_000_000:
        _mtloop.tls_max_handshakes(int(value))


_bound_from_environment()

_proof: _Proof | None = None
_proof_lock = threading.Lock()
_counts: dict[str, Any] = {"native": 0, "fallback": 0, "fallback_reasons": {}}


def _get_proof() -> _Proof:
    global _proof
    if _proof is None:
        with _proof_lock:
            if _proof is None:
                _proof = _Proof()
    return _proof


def fallback_reason(loop: Any, sslcontext: Any) -> str | None:
    """None when a connection of `loop` with this context can run natively,
    else why it takes asyncio's SSL protocol instead."""
    if not loop._mt_native_tls:
        return "the loop was made with native_tls=False"
    proof = _get_proof()
    if proof.unavailable is not None:
        return proof.unavailable
    if not isinstance(sslcontext, ssl.SSLContext):
        return "not an ssl.SSLContext"
    if sslcontext.sni_callback is not None:
        return "sni_callback is set"
    if sslcontext.keylog_filename is not None:
        return "keylog_filename is set"
    if getattr(sslcontext, "_msg_callback", None) is not None:
        return "a message callback is set"
    if sslcontext.sslobject_class is not ssl.SSLObject:
        return "sslobject_class is not ssl.SSLObject"
    if type(sslcontext).wrap_bio is not ssl.SSLContext.wrap_bio:
        # The class takes part in every connection (truststore's context
        # verifies the peer against the OS store there): it must be called.
        return "the context's class overrides wrap_bio()"
    for offset in proof.psk_offsets:
        if _mtloop.tls_ref_set(sslcontext, offset):
            return "PSK callbacks are set"
    return None


_counts_lock = threading.Lock()  # loops in several threads count here


def count(reason: str | None) -> None:
    """Counts a connection on the path `fallback_reason` chose."""
    with _counts_lock:
        if reason is None:
            _counts["native"] += 1
        else:
            _counts["fallback"] += 1
            reasons = _counts["fallback_reasons"]
            reasons[reason] = reasons.get(reason, 0) + 1


def stats() -> dict[str, Any]:
    """How many TLS connections ran natively and how many fell back, and why."""
    proof = _get_proof()
    with _counts_lock:
        return {
            "available": proof.unavailable is None,
            "unavailable_reason": proof.unavailable,
            "native": _counts["native"],
            "fallback": _counts["fallback"],
            "fallback_reasons": dict(_counts["fallback_reasons"]),
        }


def check_timeouts(ssl_handshake_timeout: float | None,
                   ssl_shutdown_timeout: float | None) -> tuple[float, float]:
    """Both timeouts, the defaults for None, checked as asyncio's SSL
    protocol checks them."""
    if ssl_handshake_timeout is None:
        ssl_handshake_timeout = constants.SSL_HANDSHAKE_TIMEOUT
    elif ssl_handshake_timeout <= 0:
        raise ValueError(f"ssl_handshake_timeout should be a positive number, "
                         f"got {ssl_handshake_timeout}")
    if ssl_shutdown_timeout is None:
        ssl_shutdown_timeout = getattr(constants, "SSL_SHUTDOWN_TIMEOUT", 30.0)
    elif ssl_shutdown_timeout <= 0:
        raise ValueError(f"ssl_shutdown_timeout should be a positive number, "
                         f"got {ssl_shutdown_timeout}")
    return ssl_handshake_timeout, ssl_shutdown_timeout


def new_session(sslcontext: ssl.SSLContext, server_side: bool,
                server_hostname: str | None) -> Any:
    """The SSL of one connection, its arguments checked as asyncio's SSL
    protocol and ssl.SSLContext.wrap_bio() check them."""
    if server_side or not server_hostname:
        server_hostname = None  # as asyncio's SSLProtocol keeps it
    hostname = None
    if server_hostname is not None:
        hostname = sslcontext._encode_hostname(server_hostname)  # type: ignore[attr-defined]
        if not hostname or hostname.startswith("."):
            raise ValueError("server_hostname cannot be an empty string or start with a "
                             "leading dot.")
    elif not server_side and sslcontext.check_hostname:
        raise ValueError("check_hostname requires server_hostname")
    pha = bool(getattr(sslcontext, "post_handshake_auth", False))
    return _mtloop.tls_session(sslcontext, server_side, hostname, sslcontext.check_hostname,
                               pha)


# OpenSSL's library codes, named as the ssl module names them (ERR_LIB_*).
_LIB_NAMES = {
    2: "SYS", 3: "BN", 4: "RSA", 5: "DH", 6: "EVP", 7: "BUF", 8: "OBJ", 9: "PEM", 10: "DSA",
    11: "X509", 13: "ASN1", 14: "CONF", 15: "CRYPTO", 16: "EC", 20: "SSL", 32: "BIO",
    33: "PKCS7", 34: "X509V3", 35: "PKCS12", 36: "RAND", 37: "DSO", 38: "ENGINE", 39: "OCSP",
    40: "UI", 41: "COMP", 42: "ECDSA", 43: "ECDH", 44: "OSSL_STORE", 45: "FIPS", 46: "CMS",
    47: "TS", 48: "HMAC", 50: "CT", 51: "ASYNC", 52: "KDF", 53: "SM2", 54: "ESS", 55: "PROP",
    56: "CRMF", 57: "PROV", 58: "CMP", 59: "OSSL_ENCODER", 60: "OSSL_DECODER", 61: "HTTP",
}


def _error_names(lib: int, reason: int, reason_str: str | None) -> tuple[str | None, str | None]:
    """(library, reason) as the ssl module names them: from its own tables
    where it exports them (3.11), else as those tables are made (OpenSSL's
    names: the library's, and the reason's text in capitals)."""
    if not lib:
        return None, None
    tables = (getattr(_ssl, "lib_codes_to_names", None), getattr(_ssl, "err_codes_to_names", None))
    if tables[0] is not None and tables[1] is not None:
        library = tables[0].get(lib)
        reason_name = tables[1].get((lib, reason))
    else:
        library = _LIB_NAMES.get(lib)
        reason_name = reason_str.upper().replace(" ", "_") if reason_str else None
    return (library or str(lib)), (reason_name or (str(reason) if reason else None))


def _ssl_exception(info: tuple, server_hostname: str | None) -> BaseException:
    """The exception CPython's ssl module raises for this failure."""
    ssl_error, lib, reason, verify_code, reason_str, verify_str, sys_errno, eof = info
    if eof:
        return ConnectionResetError()
    if ssl_error == _SSL_ERROR_SYSCALL:
        if sys_errno:
            return OSError(sys_errno, os.strerror(sys_errno))
        return ssl.SSLEOFError(8, "EOF occurred in violation of protocol")
    library, reason_name = _error_names(lib, reason, reason_str)
    text = reason_str or "A failure in the SSL library occurred"
    cls: type[ssl.SSLError] = ssl.SSLError
    verify_message = None
    if library == "SSL" and reason_name == "CERTIFICATE_VERIFY_FAILED":
        cls = ssl.SSLCertVerificationError
        if verify_code == _X509_V_ERR_HOSTNAME_MISMATCH:
            verify_message = (f"Hostname mismatch, certificate is not valid for "
                              f"'{server_hostname}'.")
        elif verify_code == _X509_V_ERR_IP_ADDRESS_MISMATCH:
            verify_message = (f"IP address mismatch, certificate is not valid for "
                              f"'{server_hostname}'.")
        else:
            verify_message = verify_str
    if verify_message is not None:
        msg = f"[{library}: {reason_name}] {text}: {verify_message} (mtloop native TLS)"
    elif library and reason_name:
        msg = f"[{library}: {reason_name}] {text} (mtloop native TLS)"
    else:
        msg = f"{text} (mtloop native TLS)"
    exc = cls(ssl_error or _SSL_ERROR_SSL, msg)
    exc.library = library
    exc.reason = reason_name
    if cls is ssl.SSLCertVerificationError:
        exc.verify_code = verify_code
        exc.verify_message = verify_message
    return exc


class NativeSSLObject:
    """What `get_extra_info('ssl_object')` gives on a native connection: the
    questions applications ask of an ssl.SSLObject, answered from what the
    handshake settled (the I/O thread's snapshot)."""

    __slots__ = ("_info", "_context", "_server_side", "_server_hostname", "_peer_dict")

    def __init__(self, info: tuple, context: ssl.SSLContext, server_side: bool,
                 server_hostname: str | None) -> None:
        self._info = info
        self._context = context
        self._server_side = server_side
        self._server_hostname = server_hostname
        self._peer_dict: dict | None = None

    @property
    def context(self) -> ssl.SSLContext:
        return self._context

    @property
    def server_side(self) -> bool:
        return self._server_side

    @property
    def server_hostname(self) -> str | None:
        return self._server_hostname

    @property
    def session_reused(self) -> bool:
        return self._info[7]

    def getpeercert(self, binary_form: bool = False) -> Any:
        der = self._info[0]
        if der is None:
            return None
        if binary_form:
            return der
        if not self._info[1]:
            return {}  # not verified: the ssl module gives an empty dict
        if self._peer_dict is None:
            self._peer_dict = _decode_der(der)
        return self._peer_dict

    def cipher(self) -> tuple[str, str, int] | None:
        return self._info[2]

    def shared_ciphers(self) -> list[tuple[str, str, int]] | None:
        return self._info[6]

    def version(self) -> str | None:
        return self._info[3]

    def compression(self) -> str | None:
        return self._info[4]

    def selected_alpn_protocol(self) -> str | None:
        return self._info[5]

    def selected_npn_protocol(self) -> None:
        return None

    def get_channel_binding(self, cb_type: str = "tls-unique") -> bytes | None:
        raise NotImplementedError("channel binding is not available on mtloop's native TLS")

    def pending(self) -> int:
        return 0

    def __repr__(self) -> str:
        side = "server" if self._server_side else "client"
        return f"<mtloop NativeSSLObject {side} {self.version()}>"


def _decode_der(der: bytes) -> dict:
    """The dict ssl.SSLSocket.getpeercert() gives, by the ssl module's own
    decoder (it reads a PEM file: an anonymous memory file here)."""
    pem = ssl.DER_cert_to_PEM_cert(der)
    fd = os.memfd_create("mtloop-peercert", os.MFD_CLOEXEC)
    try:
        os.write(fd, pem.encode("ascii"))
        return _ssl._test_decode_cert(f"/proc/self/fd/{fd}")  # type: ignore[attr-defined]
    finally:
        os.close(fd)


_OPENING, _OPEN, _FAILED = 0, 1, 2


class NativeSSLTransport(SocketTransport):
    """A TLS connection whose handshake and records run on its I/O thread.
    The protocol sees asyncio's SSL transport: connection_made() after the
    handshake, plaintext, eof_received() on the peer's close_notify, and
    connection_lost() after the close_notify exchange."""

    __slots__ = ("_sslcontext", "_server_side", "_server_hostname", "_waiter", "_tls_state",
                 "_handshake_timeout", "_shutdown_timeout", "_handshake_timer",
                 "_shutdown_timer", "_handshake_start", "_eof_told", "_upgrade")

    _sendfile_compatible = constants._SendfileMode.FALLBACK
    _start_tls_compatible = True  # TLS over TLS: asyncio's SSL protocol on top

    def __init__(self, loop: Any, sock: Any, protocol: Any, sslcontext: ssl.SSLContext,
                 waiter: Any, server_side: bool, server_hostname: str | None,
                 extra: dict | None, server: Any, ssl_handshake_timeout: float | None,
                 ssl_shutdown_timeout: float | None, *, session: Any, fd: int = -1,
                 sockinfo: tuple[int, int, int] | None = None, upgrade: bool = False) -> None:
        """`upgrade`: start_tls() on a connection the protocol already has,
        whose connection_made() is not called again (asyncio's
        call_connection_made=False)."""
        self._upgrade = upgrade
        self._sslcontext = sslcontext
        self._server_side = server_side
        self._server_hostname = server_hostname
        self._waiter = waiter
        self._tls_state = _OPENING
        self._eof_told = False  # eof_received() was called
        self._handshake_timeout, self._shutdown_timeout = check_timeouts(ssl_handshake_timeout,
                                                                         ssl_shutdown_timeout)
        self._handshake_timer = None
        self._shutdown_timer = None
        self._handshake_start = 0.0
        extra = dict(extra) if extra else {}
        extra["sslcontext"] = sslcontext
        super().__init__(loop, sock, protocol, None, extra, server, fd=fd, sockinfo=sockinfo,
                         tls=session)

    # ---- the handshake ------------------------------------------------------

    def _mt_start(self, protocol: Any, waiter: Any) -> None:
        # The I/O thread starts the handshake when the flow attaches.
        if self._loop.get_debug():
            logger.debug("%r starts SSL handshake", self)
            self._handshake_start = time.monotonic()
        self._handshake_timer = self._loop.call_later(self._handshake_timeout,
                                                      self._mt_handshake_timed_out)

    def _mt_handshake_timed_out(self) -> None:
        self._handshake_timer = None
        if self._tls_state == _OPENING:
            self._fatal_error(ConnectionAbortedError(
                f"SSL handshake is taking longer than {self._handshake_timeout} seconds: "
                f"aborting the connection"))

    def _mt_opened(self, err: int) -> None:
        if self._handshake_timer is not None:
            self._handshake_timer.cancel()
            self._handshake_timer = None
        if self._lost_scheduled or self._tls_state != _OPENING:
            return
        if err:
            self._tls_state = _FAILED
            exc = self._mt_error(err)
            msg = ("SSL handshake failed on verifying the certificate"
                   if isinstance(exc, ssl.CertificateError) else "SSL handshake failed")
            self._fatal_error(exc, msg)
            return
        self._tls_state = _OPEN
        info = self._core.tls_info()
        sslobj = NativeSSLObject(info, self._sslcontext, self._server_side,
                                 self._server_hostname)
        try:
            peercert = sslobj.getpeercert()
        except Exception as exc:  # the ssl module could not decode it
            self._fatal_error(exc, "SSL handshake failed")
            return
        if self._loop.get_debug():
            dt = time.monotonic() - self._handshake_start
            logger.debug("%r: SSL handshake took %.1f ms", self, dt * 1e3)
        self._extra.update(peercert=peercert, cipher=sslobj.cipher(),
                           compression=sslobj.compression(), ssl_object=sslobj)
        if not self._upgrade:
            try:
                self._protocol.connection_made(self)
            except (SystemExit, KeyboardInterrupt):
                raise
            except BaseException as exc:
                self._fatal_error(exc, "Error on protocol.connection_made()")
                return
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.cancelled():
            waiter.set_result(None)
        self._core.start_reading()

    def _mt_error(self, err: int) -> BaseException:
        info = self._core.tls_error()
        if info is not None:
            return _ssl_exception(info, self._server_hostname)
        return OSError(err, os.strerror(err))

    # ---- asyncio.WriteTransport ---------------------------------------------

    def write_eof(self) -> None:
        raise NotImplementedError

    def can_write_eof(self) -> bool:
        return False

    def close(self) -> None:
        core = self._core
        if core.closing:
            return
        if self._tls_state != _OPEN:
            self._force_close(None)  # as asyncio: closing during the handshake aborts
            return
        # The I/O thread flushes the output, exchanges close_notify, then
        # releases the flow: connection_lost() comes with that.
        core.close()
        if self._eof_told and core.get_write_buffer_size() == 0:
            # The peer has ended the stream: all that is left is our own
            # close_notify, which the I/O thread sends on its own.  asyncio's
            # SSL protocol finishes at once here too, and connection_lost()
            # comes on the next iteration.
            core.conn_lost += 1
            self._schedule_connection_lost(None)
            return
        self._shutdown_timer = self._loop.call_later(self._shutdown_timeout,
                                                     self._mt_shutdown_timed_out)

    def _mt_shutdown_timed_out(self) -> None:
        self._shutdown_timer = None
        if not self._lost_scheduled:
            self._force_close(exceptions.TimeoutError())

    # ---- the end of the connection ------------------------------------------

    def _mt_after_eof(self, keep_open: Any) -> None:
        self._eof_told = True
        if keep_open:
            logger.warning("returning true from eof_received() has no effect when using ssl")
        self.close()

    def _mt_closed(self, err: int) -> None:
        """The I/O thread is done: after close(), once close_notify went
        both ways (asyncio's SSL protocol then tells the protocol of the
        end with eof_received() too, if it had not), or failed."""
        if self._lost_scheduled:
            return
        if err:
            self._schedule_connection_lost(self._mt_error(err))
            return
        if (self._tls_state == _OPEN and not self._eof_told
                and self._core.tls_shutdown_clean()):
            self._eof_told = True
            try:
                if self._protocol.eof_received():
                    logger.warning("returning true from eof_received() has no effect when "
                                   "using ssl")
            except (SystemExit, KeyboardInterrupt):
                raise
            except BaseException as exc:
                self._fatal_error(exc, "Error calling eof_received()")
                return
        self._schedule_connection_lost(None)

    def _mt_read_error(self, err: int) -> None:
        if not self._lost_scheduled:
            self._fatal_error(self._mt_error(err), "Fatal error on SSL protocol")

    def _mt_write_error(self, err: int) -> None:
        if not self._lost_scheduled:
            self._fatal_error(self._mt_error(err), "Fatal error on SSL protocol")

    def _mt_notify_lost(self, protocol: Any, exc: BaseException | None) -> None:
        for name in ("_handshake_timer", "_shutdown_timer"):
            timer = getattr(self, name)
            if timer is not None:
                timer.cancel()
                setattr(self, name, None)
        if self._tls_state == _OPEN or (self._upgrade and self._tls_state == _FAILED):
            # After start_tls() the protocol had the connection already: as
            # asyncio's SSL protocol, a failed handshake ends it (one that
            # timed out, still in progress, does not).
            protocol.connection_lost(exc)
        # The protocol never saw the connection: the waiter tells.
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            if exc is None:
                waiter.set_result(None)
            else:
                waiter.set_exception(exc)
