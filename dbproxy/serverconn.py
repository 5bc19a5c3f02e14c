"""One pooled server connection: its login as a client dbproxy authenticated,
then lent to one client at a time (proxycore's Valve carrying back-pressure
across), and between clients the few queries dbproxy runs on it itself (the
reset query, a SET of a client's parameters), whose answers it reads and keeps.

The pool (dbproxy/pool.py) decides who gets it; a client session
(dbproxy/pooled.py) decides what goes through it. Both see it through the few
methods below.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Final, Protocol, cast

from proxycore.flow import Reason, Valve, bound_writes
from proxycore.servers import Server

from .pgwire import ProtocolViolation, query, split_messages
from .prepared import Outstanding
from .serverlogin import ServerLogin

if TYPE_CHECKING:
    from .pool import Pool

log = logging.getLogger("dbproxy")

LOGIN: Final = 0
IDLE: Final = 1  # in its pool
LENT: Final = 2  # a client's
OWN: Final = 3  # running dbproxy's own query
CLOSED: Final = 4

_S: Final = ord("S")
_E: Final = ord("E")
_Z: Final = ord("Z")
_C: Final = ord("C")


class Borrower(Protocol):
    """What a server connection needs of the client it is lent to."""

    def from_server(self, conn: ServerConn, data: bytes) -> None: ...
    def server_lost(self, conn: ServerConn) -> None: ...
    def pause_reading(self) -> None: ...
    def resume_reading(self) -> None: ...


# what dbproxy's own query ended with: None when it went well, else the server's ErrorResponse
OwnDone = Callable[["ServerConn", bytes | None], None]


class ServerConn:
    def __init__(self, pool: Pool, login: ServerLogin) -> None:
        self.pool = pool
        self.server: Server = pool.server
        self.transport: asyncio.Transport | None = None
        self.valve: Valve | None = None
        self.state = LOGIN
        self.login: ServerLogin | None = login
        self.parameters: dict[str, str] = {}  # as the server reported them
        # the client parameters SET on it (none at login: the server's defaults)
        self.applied: dict[str, str] = {}
        self.backend_key: tuple[int, int] | None = None
        self.created = 0.0
        self.idle_since = 0.0
        self.client: Borrower | None = None
        self.outstanding = Outstanding()
        self.status = b"I"  # the last ReadyForQuery's transaction status
        # session mode: the server's last bytes were ReadyForQuery 'I' and the
        # client sent nothing since: it can go back to its pool as it is
        self.at_rest = True
        self._buffer = b""
        self._own_done: OwnDone | None = None
        self._own_error: bytes | None = None
        self._set_failed: OwnDone | None = None
        self._reset_after: str | None = None
        # dbproxy's SSLRequest (server_ssl), answered before the login starts
        self.tls_answer: asyncio.Future[bytes] | None = None

    # -- asyncio.Protocol -------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.valve = Valve(self.transport)
        bound_writes(self.transport)
        self.pool.made(self)

    def upgraded(self, transport: asyncio.Transport) -> None:
        """TLS to the server is on (server_ssl): this is the transport from now."""
        self.transport = transport
        self.valve = Valve(transport)
        bound_writes(transport)

    def begin_login(self) -> None:
        """Connected (over TLS when server_ssl asks): the startup packet."""
        if self.transport is not None and self.login is not None:
            self.transport.write(self.login.start())

    def data_received(self, data: bytes) -> None:
        self.server.bytes_in += len(data)
        client = self.client
        if self.state == LENT and client is not None:
            client.from_server(self, data)
            return
        if self.state == LOGIN:
            answer = self.tls_answer
            if answer is not None:
                if not answer.done():
                    answer.set_result(data[:1])
                return
            self._login_data(data)
            return
        self._read_own(data)

    def eof_received(self) -> bool | None:
        return None  # the transport closes; connection_lost says the rest

    def connection_lost(self, exc: Exception | None) -> None:
        was = self.state
        self.state = CLOSED
        answer = self.tls_answer
        if answer is not None and not answer.done():
            answer.set_exception(ConnectionError("the server closed before answering"))
        client, self.client = self.client, None
        done, self._own_done = self._own_done, None
        self.pool.lost(self, was)
        if client is not None:
            client.server_lost(self)
        elif done is not None:
            done(self, b"")

    def pause_writing(self) -> None:
        if self.client is not None:
            self.client.pause_reading()

    def resume_writing(self) -> None:
        if self.client is not None:
            self.client.resume_reading()

    # -- the login ----------------------------------------------------------------------
    def _login_data(self, data: bytes) -> None:
        login = self.login
        assert login is not None and self.transport is not None
        reply = login.feed(data)
        if reply:
            self.transport.write(reply)
        if login.ready:
            self.login = None
            self.parameters = dict(login.server_parameters)
            self.backend_key = login.backend_key
            self.pool.logged_in(self)
        elif login.failed:
            self.login = None
            self.pool.login_failed(self, login.error, login.reason)
            self.close()

    # -- lent to a client ----------------------------------------------------------------
    def lend(self, client: Borrower) -> None:
        self.state = LENT
        self.client = client
        self.at_rest = True

    def take_back(self) -> None:
        """The client is done with it (its pool decides what comes next)."""
        self.client = None
        if self.valve is not None:
            self.valve.release()
        if self.state == LENT:
            self.state = IDLE

    def write(self, data: bytes) -> None:
        transport = self.transport
        if transport is not None:
            self.server.bytes_out += len(data)
            transport.write(data)
            self.at_rest = False

    # -- dbproxy's own queries ------------------------------------------------------------
    def set_for(self, sql: str, client: Borrower, failed: OwnDone) -> None:
        """``sql`` (a SET of the client's parameters) ahead of whatever ``client``
        sends, which goes on meanwhile: lent to it at once; of the answer to
        ``sql`` only its ParameterStatus messages go on to the client (the
        server's words for what was SET), the server's bytes after it are the
        client's. ``failed``: the SET was refused (with its ErrorResponse)."""
        self.run(sql, self._set_answered)
        self.client = client
        self._set_failed = failed

    def back_when_answered(self, reset: str | None) -> None:
        """The client left with nothing sent but its SET on the way: the connection
        goes back to its pool once that is answered (``reset`` first)."""
        self.client = None
        self._set_failed = None
        self._reset_after = reset
        self._own_done = self._answered_then_back

    def _answered_then_back(self, conn: ServerConn, error: bytes | None) -> None:
        if error is not None:
            self.close()
            return
        self.pool.give_back(self, self._reset_after)

    def _set_answered(self, conn: ServerConn, error: bytes | None) -> None:
        failed, self._set_failed = self._set_failed, None
        if error is not None:
            if failed is not None:
                failed(self, error)
            return
        self.state = LENT  # the rest of what the server sends is the client's

    def run(self, sql: str, done: OwnDone) -> None:
        """``sql`` as a simple query; ``done`` once it is answered (ReadyForQuery)."""
        self.state = OWN
        self._own_done = done
        self._own_error = None
        self._buffer = b""
        assert self.transport is not None
        self.transport.write(query(sql))

    def _read_own(self, data: bytes) -> None:
        buffer = self._buffer + data if self._buffer else data
        try:
            spans, rest = split_messages(buffer)
        except ProtocolViolation as exc:
            log.warning("server %s: %s; closing its connection", self.server.name, exc)
            self.abort()
            return
        self._buffer = buffer[rest:]
        statuses = []  # set_for's, for the client
        for start, end in spans:
            kind = buffer[start]
            if kind == _S:
                self.note_parameter(buffer[start + 5 : end])
                if self._set_failed is not None:
                    statuses.append(buffer[start:end])
            elif kind == _E:
                if self.state != OWN:
                    # unasked, between clients: the server is ending the session
                    # (an administrator's pg_terminate_backend, a shutdown)
                    self.close()
                    return
                self._own_error = buffer[start:end]
            elif kind == _Z and self.state == OWN:
                self.status = buffer[start + 5 : start + 6]
                done, self._own_done = self._own_done, None
                self.state = IDLE
                if done is not None:
                    done(self, self._own_error)
                client = self.client
                if self.state == LENT and client is not None:
                    # lent on (set_for): what followed the answer is the client's
                    self._buffer = b""
                    after = buffer[end:]
                    at_rest = self.at_rest
                    statuses.append(after)
                    client.from_server(self, b"".join(statuses))
                    if not after:
                        # ParameterStatus alone ends no answer: as at rest as before
                        self.at_rest = at_rest
                    return

    def note_parameter(self, body: bytes) -> None:
        name, _, value = body.partition(b"\0")
        self.parameters[name.decode("utf-8", "replace")] = value.rstrip(b"\0").decode(
            "utf-8", "replace"
        )

    # -- the end ----------------------------------------------------------------------------
    def close(self) -> None:
        transport = self.transport
        if transport is not None and not transport.is_closing():
            # Terminate first, as a client leaving says goodbye: no "unexpected EOF" log line
            transport.write(b"X\0\0\0\x04")
            transport.close()

    def abort(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.abort()

    def resume(self) -> None:
        if self.valve is not None:
            self.valve.resume(Reason.PEER_BUFFER_FULL)
