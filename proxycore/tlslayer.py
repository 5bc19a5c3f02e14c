"""TLS between a client's socket and a proxy's protocol, on memory BIOs.

``TlsServer`` sits on the plain transport and speaks TLS (ssl.SSLObject over two
ssl.MemoryBIO, as asyncio's and uvloop's own SSL protocols do); the protocol it
carries sees a ``TlsTransport`` and cannot tell it from a plain one. Doing it
here, not with ``create_server(ssl=...)``, is what lets a listener:
- look at the first byte before any TLS: plain HTTP at an https port gets
  nginx's 400 instead of a handshake error, garbage a clean close;
- bound the handshake in time (a client that never finishes is closed after
  ``handshake_timeout``, and costs no more than a socket and two small BIOs);
- count handshakes, failures by reason, versions and resumptions;
- start TLS in the middle of a stream (dbproxy answers SSLRequest with 'S' first).

Data goes through as it comes: each read is fed to the incoming BIO and the
plaintext that decrypts from it is passed on in one ``data_received``; each write
is encrypted at once and written on. Back-pressure is the plain transport's: its
pause_writing reaches the carried protocol, and pausing reading pauses the socket
and leaves the rest in the BIO until reading resumes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import Callable
from typing import Any, Final, Protocol, cast

log = logging.getLogger("proxycore.tls")

HANDSHAKE: Final = 0
OPEN: Final = 1
CLOSING: Final = 2
CLOSED: Final = 3

_TLS_HANDSHAKE_RECORD: Final = 0x16
_READ_SIZE: Final = 256 * 1024


class Carried(Protocol):
    """What TlsServer carries: an asyncio protocol's methods (see proxycore.compiled)."""

    def connection_made(self, transport: Any) -> None: ...
    def data_received(self, data: bytes) -> None: ...
    def eof_received(self) -> bool | None: ...
    def connection_lost(self, exc: Exception | None) -> None: ...
    def pause_writing(self) -> None: ...
    def resume_writing(self) -> None: ...


class TlsCounters:
    """A listener's handshakes; summed over workers like every other counter."""

    def __init__(self) -> None:
        self.handshakes = 0  # finished
        self.resumed = 0  # of those, a session resumed (no full handshake)
        self.handshaking = 0  # now
        self.failures: dict[str, int] = {}
        self.versions: dict[str, int] = {}

    def failed(self, reason: str) -> None:
        self.failures[reason] = self.failures.get(reason, 0) + 1

    def reset(self) -> None:
        self.handshakes = self.resumed = self.handshaking = 0
        self.failures = {}
        self.versions = {}

    def absorb(self, other: dict[str, Any]) -> None:
        """Add a worker's ``as_dict`` (a supervisor's sum)."""
        self.handshakes += other["handshakes"]
        self.resumed += other["resumed"]
        self.handshaking += other["handshaking"]
        for key, n in other["failures"].items():
            self.failures[key] = self.failures.get(key, 0) + n
        for key, n in other["versions"].items():
            self.versions[key] = self.versions.get(key, 0) + n

    def as_dict(self) -> dict[str, Any]:
        return {
            "handshakes": self.handshakes,
            "resumed": self.resumed,
            "handshaking": self.handshaking,
            "failures": dict(self.failures),
            "versions": dict(self.versions),
        }


def failure_reason(exc: BaseException) -> str:
    """A short, bounded name for a failed handshake (a metric label)."""
    if isinstance(exc, ssl.SSLError):
        reason = (exc.reason or "").lower().replace("_", " ")
        if "unsupported protocol" in reason or "version" in reason:
            return "protocol_version"
        if "no shared cipher" in reason:
            return "no_shared_cipher"
        if "unrecognized name" in reason or "callback failed" in reason:
            return "unknown_sni"
        if "certificate" in reason:
            return "client_certificate"
        if "http request" in reason or "wrong version number" in reason:
            return "not_tls"
        if "alert" in reason:
            return "client_alert"
        return "protocol_error"
    return "error"


# What a listener does with bytes that are not TLS at all: lb writes a 400.
PlainAnswer = Callable[[asyncio.Transport, bytes], None]


class TlsServer:
    """The server side of TLS on one connection (asyncio Protocol methods)."""

    def __init__(
        self,
        carried: Carried | None,
        context: ssl.SSLContext,
        counters: TlsCounters,
        handshake_timeout: float,
        plain_answer: PlainAnswer | None = None,
        on_open: Callable[[TlsTransport], None] | None = None,
        make: Callable[[], Carried] | None = None,
    ) -> None:
        """``make``: the carried protocol made once the handshake is done (a
        connection that never finishes one costs no more than this object and
        its BIOs). ``on_open``: TLS starts mid-stream (dbproxy after its 'S'):
        ``carried`` has had the plain transport since its connection_made, hears
        every connection_lost and pause, and gets the TLS one from this call."""
        self.carried = carried
        self.make = make
        self.on_open = on_open
        self.context = context
        self.counters = counters
        self.handshake_timeout = handshake_timeout
        self.plain_answer = plain_answer
        self.state = HANDSHAKE
        self.raw: asyncio.Transport | None = None
        self.sslobj: ssl.SSLObject | None = None
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._timer: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sniffed = False
        self.app_paused = False
        self._reading_scheduled = False
        self.transport: TlsTransport | None = None

    # -- asyncio.Protocol -------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.raw = raw = cast(asyncio.Transport, transport)
        self._loop = loop = asyncio.get_running_loop()
        self.sslobj = self.context.wrap_bio(self._incoming, self._outgoing, server_side=True)
        self.counters.handshaking += 1
        self._timer = loop.call_later(self.handshake_timeout, self._handshake_timed_out)
        raw.set_write_buffer_limits(high=256 * 1024, low=64 * 1024)

    def data_received(self, data: bytes) -> None:
        if self.state == OPEN:
            self._incoming.write(data)
            if not self.app_paused:
                self._read_app()
            return
        if self.state != HANDSHAKE:
            return
        if not self._sniffed:
            self._sniffed = True
            if data[0] != _TLS_HANDSHAKE_RECORD:
                self._not_tls(data)
                return
        self._incoming.write(data)
        self._handshake()

    def eof_received(self) -> bool | None:
        carried = self.carried
        if self.state == OPEN and carried is not None:
            # TLS cannot half-close: the carried protocol hears the end and
            # may still write what it owes (a response to a client that
            # shut down its sending side).
            return carried.eof_received()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        was = self.state
        self.state = CLOSED
        self._stop_timer()
        if was == HANDSHAKE:
            self.counters.handshaking -= 1
        if self.transport is not None:
            self.transport.closing = True
        carried = self._hearing()
        if carried is not None:
            carried.connection_lost(exc)

    def pause_writing(self) -> None:
        carried = self._hearing()
        if carried is not None:
            carried.pause_writing()

    def resume_writing(self) -> None:
        carried = self._hearing()
        if carried is not None:
            carried.resume_writing()

    def _hearing(self) -> Carried | None:
        """The carried protocol, when it has a transport to hear about: after the
        handshake, or from the start when TLS began mid-stream."""
        if self.transport is None and self.on_open is None:
            return None
        return self.carried

    # -- the handshake ------------------------------------------------------------------
    def _not_tls(self, data: bytes) -> None:
        self._end_handshake("not_tls")
        raw = self.raw
        assert raw is not None
        if self.plain_answer is not None and data[:1].isalpha():
            self.plain_answer(raw, data)
        else:
            log.info("not TLS from %s: closed", raw.get_extra_info("peername"))
            raw.close()

    def _handshake(self) -> None:
        sslobj = self.sslobj
        assert sslobj is not None
        try:
            sslobj.do_handshake()
        except ssl.SSLWantReadError:
            self._flush()
            return
        except (ssl.SSLError, ValueError) as exc:
            self._flush()  # the alert, when there is one
            reason = failure_reason(exc)
            self._end_handshake(reason)
            log.info("TLS handshake failed (%s): %s", reason, exc)
            assert self.raw is not None
            self.raw.close()
            return
        self._flush()
        self._end_handshake(None)
        counters = self.counters
        counters.handshakes += 1
        if sslobj.session_reused:
            counters.resumed += 1
        version = sslobj.version() or "?"
        counters.versions[version] = counters.versions.get(version, 0) + 1
        self.state = OPEN
        self.transport = transport = TlsTransport(self)
        if self.on_open is not None:
            self.on_open(transport)
        else:
            carried = self.carried
            if carried is None:
                assert self.make is not None
                carried = self.carried = self.make()
            carried.connection_made(transport)
        if self.state == OPEN and not self.app_paused:
            self._read_app()

    def _end_handshake(self, failure: str | None) -> None:
        self._stop_timer()
        self.counters.handshaking -= 1
        if failure is not None:
            self.state = CLOSING
            self.counters.failed(failure)

    def _handshake_timed_out(self) -> None:
        self._timer = None
        if self.state == HANDSHAKE and self.raw is not None:
            self._end_handshake("timeout")
            self.raw.abort()

    def _stop_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    # -- application data -------------------------------------------------------------
    def _read_app(self) -> None:
        sslobj = self.sslobj
        assert sslobj is not None
        incoming = self._incoming
        chunks: list[bytes] = []
        ended = False
        try:
            # One record per read; stop when nothing is left rather than at
            # SSLWantReadError (an exception per request costs more than a check).
            while True:
                chunk = sslobj.read(_READ_SIZE)
                if not chunk:
                    break
                chunks.append(chunk)
                if not incoming.pending and not sslobj.pending():
                    break
        except ssl.SSLWantReadError:
            pass
        except ssl.SSLZeroReturnError:
            ended = True  # close_notify: the client's end of stream
        except ssl.SSLError as exc:
            log.info("TLS record error from a client, closing: %s", exc.reason or exc)
            self.counters.failed("record_error")
            self._flush()
            assert self.raw is not None
            self.raw.abort()
            return
        if self._outgoing.pending:
            self._flush()  # a TLS 1.3 key update's answer
        carried = self.carried
        if carried is None:
            return
        if chunks:
            carried.data_received(chunks[0] if len(chunks) == 1 else b"".join(chunks))
        if ended and self.state == OPEN and not carried.eof_received():
            self.close()

    def resume_app(self) -> None:
        self.app_paused = False
        if self._incoming.pending and not self._reading_scheduled and self._loop is not None:
            # not now: resume_reading is called from inside the carried protocol
            self._reading_scheduled = True
            self._loop.call_soon(self._read_scheduled)

    def _read_scheduled(self) -> None:
        self._reading_scheduled = False
        if self.state == OPEN and not self.app_paused:
            self._read_app()

    # -- writing ------------------------------------------------------------------------
    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self.state != OPEN or not data:
            return
        sslobj = self.sslobj
        assert sslobj is not None
        try:
            sslobj.write(data)
        except ssl.SSLError as exc:
            log.info("TLS write failed, closing: %s", exc)
            self.abort()
            return
        self._flush()

    def _flush(self) -> None:
        out = self._outgoing
        raw = self.raw
        if out.pending and raw is not None and not raw.is_closing():
            raw.write(out.read())

    def close(self) -> None:
        if self.state != OPEN:
            return
        self.state = CLOSING
        sslobj = self.sslobj
        assert sslobj is not None and self.raw is not None
        with contextlib.suppress(ssl.SSLError, ValueError):
            sslobj.unwrap()  # our close_notify; the client's is not waited for
        self._flush()
        self.raw.close()

    def abort(self) -> None:
        self.state = CLOSING
        if self.raw is not None:
            self.raw.abort()


class TlsTransport:
    """The transport a carried protocol writes to: asyncio.Transport's methods."""

    def __init__(self, tls: TlsServer) -> None:
        self._tls = tls
        self.closing = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self._tls.write(data)

    def writelines(self, parts: list[bytes]) -> None:
        self._tls.write(b"".join(parts))

    def close(self) -> None:
        self.closing = True
        self._tls.close()

    def abort(self) -> None:
        self.closing = True
        self._tls.abort()

    def is_closing(self) -> bool:
        raw = self._tls.raw
        return self.closing or raw is None or raw.is_closing()

    def can_write_eof(self) -> bool:
        return False

    def write_eof(self) -> None:
        raise NotImplementedError("TLS has no half close")

    def pause_reading(self) -> None:
        tls = self._tls
        tls.app_paused = True
        if tls.raw is not None and not tls.raw.is_closing():
            tls.raw.pause_reading()

    def resume_reading(self) -> None:
        tls = self._tls
        if tls.raw is not None and not tls.raw.is_closing():
            tls.raw.resume_reading()
        tls.resume_app()

    def is_reading(self) -> bool:
        return not self._tls.app_paused

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        if self._tls.raw is not None:
            self._tls.raw.set_write_buffer_limits(high=high, low=low)

    def get_write_buffer_size(self) -> int:
        raw = self._tls.raw
        return raw.get_write_buffer_size() if raw is not None else 0

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        tls = self._tls
        sslobj = tls.sslobj
        if name == "ssl_object":
            return sslobj
        if name == "sslcontext":
            return sslobj.context if sslobj is not None else tls.context
        if name == "peercert":
            return sslobj.getpeercert() if sslobj is not None else default
        if name == "cipher":
            return sslobj.cipher() if sslobj is not None else default
        raw = tls.raw
        return raw.get_extra_info(name, default) if raw is not None else default

    def get_protocol(self) -> Any:
        return self._tls.carried

    def set_protocol(self, protocol: Any) -> None:
        self._tls.carried = protocol
