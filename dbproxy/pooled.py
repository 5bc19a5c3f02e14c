"""A client of a pooled listener: dbproxy itself reads its startup, logs it in
(dbproxy/auth.py) and lends it a server connection from the pool of its
(server, user, database): for the whole session (session mode), or for each
transaction (transaction mode: from its first message to the ReadyForQuery
'I' that ends it with nothing more in flight).

The client is told the server's parameters and dbproxy's own BackendKeyData:
its CancelRequest comes to dbproxy, which sends the server's key to whichever
connection the client holds at that moment (dbproxy/cancels.py). A connection
gets the client's startup parameters that matter (client_encoding, DateStyle,
TimeZone ...: TRACKED) by a SET before it is lent, when they differ from what
it runs with. In session mode bytes then go both ways unread; in transaction
mode the client's messages are read whole (named prepared statements renamed,
dbproxy/prepared.py) and the server's scanned for the messages that matter,
a few bytes each.
"""

from __future__ import annotations

import asyncio
import logging
import struct
from typing import TYPE_CHECKING, Final, cast

from proxycore.flow import Reason, Valve, bound_writes
from proxycore.servers import Server

from .auth import TRUST, ClientAuth
from .listener import Listener
from .pgwire import (
    CancelRequest,
    GSSENCRequest,
    ProtocolViolation,
    SSLRequest,
    Startup,
    backend_key_data,
    error_response,
    packet_length,
    parameter_status,
    parse_first_packet,
    ready_for_query,
    split_messages,
)
from .pool import Pool
from .prepared import BATCH_ENDS, Statements
from .serverconn import LENT, ServerConn

if TYPE_CHECKING:
    from .view import Proxy

log = logging.getLogger("dbproxy")

_INT32: Final = struct.Struct("!i")
# Startup parameters a pooled connection is given by a SET when a client's differ.
TRACKED: Final = (
    "client_encoding",
    "DateStyle",
    "TimeZone",
    "IntervalStyle",
    "standard_conforming_strings",
    "application_name",
    "extra_float_digits",
    "search_path",
)
_TRACKED_LOWER: Final = {name.lower(): name for name in TRACKED}
_REWRITTEN: Final = frozenset(b"PBDC")
_TERMINATE: Final = ord("X")
_Z: Final = ord("Z")
_S: Final = ord("S")
_READY_IDLE: Final = b"Z\0\0\0\x05I"
_TERMINATE_MESSAGE: Final = b"X\0\0\0\x04"
_READY: Final = ready_for_query()

FIRST, AUTH, LOGIN, READY, CLOSED = range(5)


def set_statement(wanted: dict[str, str], applied: dict[str, str]) -> str:
    """The SQL that makes a connection running with ``applied`` run with ``wanted``."""
    parts = []
    for name in TRACKED:
        value = wanted.get(name)
        if value == applied.get(name):
            continue
        if value is None:
            parts.append(f"RESET {name}")
        else:
            parts.append(f"SET {name} TO '" + value.replace("'", "''") + "'")
    return "; ".join(parts)


def _statuses(parameters: dict[str, str]) -> bytes:
    return b"".join([parameter_status(n, v) for n, v in parameters.items()])


class PooledSession:
    def __init__(self, proxy: Proxy, listener: Listener) -> None:
        self.proxy = proxy
        self.listener = listener
        self.transaction_mode = proxy.config.pool.mode == "transaction"
        self.transport: asyncio.Transport | None = None
        self.valve: Valve | None = None
        self.state = FIRST
        self.closed = False
        self._buffer = b""
        self._ssl_done = False
        self._gss_done = False
        self.user = ""
        self.database = ""
        self.wanted: dict[str, str] = {}
        self._auth: ClientAuth | None = None
        self.server: Server | None = None
        self.pool: Pool | None = None
        self.conn: ServerConn | None = None
        self.waiting = False
        self.key = (0, 0)
        # named prepared statements (transaction mode), made at the first Parse
        self.statements: Statements | None = None
        self._ok = b""  # AuthenticationOk, sent with the rest of the welcome
        self._unsynced = False  # sent the server messages with no Sync after them yet
        self._head = b""  # the start of a server message header, held to decide on it
        self._pass = 0  # bytes of the server message under way, passed unread

    # -- asyncio.Protocol ------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.valve = Valve(self.transport)
        proxy = self.proxy
        if proxy.draining or proxy.client_count >= proxy.config.max_client_connections:
            self.closed = True
            self.transport.write(error_response("53300", "sorry, too many clients already"))
            self.transport.close()
            return
        bound_writes(self.transport)
        proxy.sessions.add(self)
        self.listener.active += 1
        self.listener.total += 1
        proxy.first_packet_limits.set(self, proxy.loop.time() + proxy.config.timeouts.first_packet)

    def data_received(self, data: bytes) -> None:
        conn = self.conn
        if conn is not None and self.state == READY and not self.transaction_mode:
            if conn.at_rest and data.startswith(_TERMINATE_MESSAGE):
                # at rest, its next bytes begin a message: a goodbye is not the
                # server's to hear, the connection goes back to its pool
                self.close()
                return
            conn.write(data)  # session mode: straight through
            return
        self._buffer += data
        if self.state == READY:
            self._client_messages()
        elif self.state == FIRST:
            self._first_packet()
        elif self.state == AUTH:
            self._auth_messages()
        elif len(self._buffer) > 64 * 1024:
            assert self.valve is not None
            self.valve.pause(Reason.NO_PEER_YET)

    def eof_received(self) -> bool | None:
        return None  # closes; connection_lost gives the connection back

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.state = CLOSED
        proxy = self.proxy
        proxy.first_packet_limits.clear(self)
        if self in proxy.sessions:
            proxy.sessions.discard(self)
            self.listener.active -= 1
        if self.key != (0, 0):
            proxy.cancels.forget(self.key, self)
        if self.waiting and self.pool is not None:
            self.waiting = False
            self.pool.abandon(self, timed_out=False)
        conn, self.conn = self.conn, None
        if conn is not None and self.pool is not None:
            if self._clean(conn):
                self._give_back(conn)
            else:
                conn.close()
        proxy.session_closed()

    def pause_writing(self) -> None:
        if self.conn is not None and self.conn.valve is not None:
            self.conn.valve.pause(Reason.PEER_BUFFER_FULL)

    def resume_writing(self) -> None:
        if self.conn is not None:
            self.conn.resume()

    # what a lent server connection calls (serverconn.Borrower)
    def pause_reading(self) -> None:
        if self.valve is not None:
            self.valve.pause(Reason.PEER_BUFFER_FULL)

    def resume_reading(self) -> None:
        if self.valve is not None:
            self.valve.resume(Reason.PEER_BUFFER_FULL)

    # -- the first packet ------------------------------------------------------------
    def _first_packet(self) -> None:
        while self.state == FIRST:
            try:
                length = packet_length(self._buffer)
                if length is None or len(self._buffer) < length:
                    return
                packet, self._buffer = self._buffer[:length], self._buffer[length:]
                first = parse_first_packet(packet, self._ssl_done, self._gss_done)
            except ProtocolViolation as exc:
                log.info("session from %s dropped: %s", self.peer(), exc)
                self.close()
                return
            if isinstance(first, SSLRequest):
                self._ssl_done = True  # a pooled listener reads the session: no TLS through it
                self.write(b"N")
            elif isinstance(first, GSSENCRequest):
                self._gss_done = True
                self.write(b"N")
            elif isinstance(first, CancelRequest):
                self.proxy.cancels.deliver(first, self.listener.name, pooled=True)
                self.close()
                return
            else:
                self.proxy.first_packet_limits.clear(self)
                self._startup(first)

    def _startup(self, startup: Startup) -> None:
        if startup.protocol != 196608:
            self.refuse("0A000", "dbproxy: a pooled listener speaks protocol 3.0 only")
            return
        parameters = startup.parameters
        ignored = self.proxy.config.pool.ignore_startup_parameters
        wanted = {}
        for name, value in parameters.items():
            if name in ("user", "database"):
                continue
            known = _TRACKED_LOWER.get(name.lower())
            if known is not None:
                wanted[known] = value
            elif name not in ignored:
                # pgbouncer's words: what a pool cannot carry from client to client
                self.refuse("08P01", f"unsupported startup parameter: {name}")
                return
        self.user = parameters.get("user", "")
        if not self.user:
            self.refuse("28000", "no PostgreSQL user name specified in startup packet")
            return
        self.database = parameters.get("database") or self.user
        self.wanted = wanted
        server = self.proxy.choose(self.listener, ())
        if server is None:
            self.refuse("57P03", f"dbproxy: no server is available for listener '{self._name}'")
            return
        self.server = server
        self.state = AUTH
        method = self.proxy.config.auth.type
        if method == TRUST:
            self._auth = ClientAuth(TRUST, self.user, None)
            self._begin_auth()
            return
        self.proxy.loop.create_task(self._look_up(server))

    async def _look_up(self, server: Server) -> None:
        secret = await self.proxy.secrets.lookup(self.user, server, self.database)
        if self.closed:
            return
        self._auth = ClientAuth(self.proxy.config.auth.type, self.user, secret)
        self._begin_auth()

    def _begin_auth(self) -> None:
        assert self._auth is not None
        answer = self._auth.start()
        if self._auth.done:
            self._logged_in(answer)
            return
        self.write(answer)
        if self._buffer:
            self._auth_messages()

    def _auth_messages(self) -> None:
        auth = self._auth
        if auth is None:
            return  # its secret is still being looked up
        try:
            spans, rest = split_messages(self._buffer)
        except ProtocolViolation as exc:
            self.refuse("08P01", str(exc))
            return
        buffer = self._buffer
        self._buffer = buffer[rest:]
        for start, end in spans:
            answer = auth.feed(buffer[start : start + 1], buffer[start + 5 : end])
            if auth.failed:
                log.info(
                    "session from %s on %s: authentication of user %r failed",
                    self.peer(),
                    self._name,
                    self.user,
                )
                self.write(answer)
                self.close()
                return
            if auth.done:
                self._logged_in(answer)
                return
            self.write(answer)

    def _logged_in(self, answer: bytes) -> None:
        """Authenticated: AuthenticationOk goes with the rest of the welcome, in one
        write, once there are parameters to tell (a connection's, or the pool's)."""
        self._ok = answer
        self.state = LOGIN
        if self.transaction_mode:
            pool = self._pool()
            if pool is None:
                return
            if pool.parameters:
                # welcomed as the pool's last login was: no connection needed
                # until its first transaction (which is SET as it asked then)
                self.write(self._ok + self._welcome(pool.welcome(self.wanted)))
                self.state = READY
                if self._buffer:
                    self._client_messages()
                return
        self._acquire()

    # -- borrowing a server connection ------------------------------------------------
    def _pool(self) -> Pool | None:
        """The pool of the server this session goes to now (chosen again when the
        one it had no longer fits the listener), its credentials refreshed."""
        proxy = self.proxy
        server = self.server
        if server is None or not proxy.fits(server, self.listener):
            server = proxy.choose(self.listener, ())
            if server is None:
                self._fail("57P03", f"dbproxy: no server is available for listener '{self._name}'")
                return None
            self.server = server
        pool = proxy.pools.get(server, self.user, self.database)
        auth = self._auth
        creds = pool.credentials
        creds.password = proxy.secrets.password(self.user)
        if auth is not None and auth.client_key is not None:
            creds.client_key, creds.scram_secret = auth.client_key, auth.scram_secret
        if auth is not None and auth.md5 is not None:
            creds.md5 = auth.md5
        pool.startup = self.wanted
        self.pool = pool
        return pool

    def _acquire(self) -> None:
        pool = self._pool()
        if pool is None:
            return
        self.waiting = True
        pool.acquire(self)
        if self.waiting:
            # no connection at once: what the client sends meanwhile waits unread
            assert self.valve is not None
            self.valve.pause(Reason.NO_PEER_YET)

    def got(self, conn: ServerConn) -> None:
        """The pool lends this session ``conn``."""
        self.waiting = False
        if self.closed:
            self._give_back(conn)
            return
        self.conn = conn
        sql = "" if self.wanted == conn.applied else set_statement(self.wanted, conn.applied)
        if sql:
            conn.run(sql, self._parameters_set)
            return
        self._lent(conn)

    def _parameters_set(self, conn: ServerConn, error: bytes | None) -> None:
        if self.closed or error is not None:
            self.conn = None
            conn.close()  # what it runs with is unknown now
            if error:
                self.write(error)
            self.close()
            return
        conn.applied = dict(self.wanted)
        conn.lend(self)
        self._lent(conn)

    def _lent(self, conn: ServerConn) -> None:
        if self.state == LOGIN:
            self.write(self._ok + self._welcome(_statuses(conn.parameters)))
            self.state = READY
            if self.transaction_mode:
                self._release(conn)
        assert self.valve is not None
        self.valve.resume(Reason.NO_PEER_YET)
        if self._buffer:
            if self.transaction_mode:
                self._client_messages()
            else:
                data, self._buffer = self._buffer, b""
                conn.write(data)

    def _welcome(self, statuses: bytes) -> bytes:
        """The rest of a login: the server's parameters, dbproxy's key, ready."""
        if self.key == (0, 0):
            self.key = self.proxy.cancels.new_key(self)
        return statuses + backend_key_data(*self.key) + _READY

    def _release(self, conn: ServerConn) -> None:
        self.conn = None
        self._give_back(conn)

    def _give_back(self, conn: ServerConn) -> None:
        pool = conn.pool
        reset = None if self.transaction_mode else self.proxy.config.pool.reset_query
        pool.give_back(conn, reset or None)

    def _clean(self, conn: ServerConn) -> bool:
        """Whether ``conn`` can serve another client as it is: nothing in flight,
        no transaction open."""
        if conn.state != LENT:
            return False
        if not self.transaction_mode:
            return conn.at_rest
        return (
            conn.outstanding.idle
            and not self._unsynced
            and not self._pass
            and not self._head
            and conn.status == b"I"
        )

    def pool_failed(self, error: bytes) -> None:
        self.waiting = False
        self.write(error)
        self.close()

    def pool_lost(self) -> None:
        """Its pool's server went down while this waited: another server, if one fits."""
        self.waiting = False
        self._acquire()

    def wait_late(self) -> None:
        if not self.waiting or self.closed:
            return
        self.waiting = False
        if self.pool is not None:
            self.pool.abandon(self, timed_out=True)
        self._fail(
            "53300",
            f"dbproxy: no server connection for user {self.user!r} on {self._name} "
            f"within {self.proxy.config.pool.wait_timeout:g}s (query_wait_timeout)",
        )

    def server_lost(self, conn: ServerConn) -> None:
        if conn is not self.conn:
            return
        self.conn = None
        self._fail("08006", "dbproxy: the server connection was lost")

    def cancel_target(self) -> tuple[Server, tuple[int, int]] | None:
        conn = self.conn
        if conn is None or conn.backend_key is None or conn.state != LENT:
            return None
        return conn.server, conn.backend_key

    # -- transaction mode: the client's messages ----------------------------------------
    def _client_messages(self) -> None:
        buffer = self._buffer
        try:
            spans, rest = split_messages(buffer)
        except ProtocolViolation as exc:
            self._fail("08P01", f"dbproxy: {exc}")
            return
        if not spans:
            return
        conn = self.conn
        if conn is None:
            if buffer[spans[0][0]] == _TERMINATE:
                self.close()
                return
            if not self.waiting:
                self._acquire()
            return
        self._buffer = buffer[rest:]
        out = conn.outstanding
        statements = self.statements
        if statements is None and self.proxy.config.pool.max_prepared_statements:
            statements = self.statements = Statements(
                self.proxy.config.pool.max_prepared_statements
            )
        pieces = []
        run = spans[0][0]
        for start, end in spans:
            kind = buffer[start]
            if kind == _TERMINATE:
                pieces.append(buffer[run:start])
                conn.write(b"".join(pieces))
                self.close()
                return
            if statements is not None and kind in _REWRITTEN:
                pieces.append(buffer[run:start])
                pieces.append(statements.rewrite(kind, buffer[start + 5 : end], out))
                run = end
            if kind in BATCH_ENDS:
                out.sent += 1
                self._unsynced = False
            else:
                self._unsynced = True
        pieces.append(buffer[run:rest])
        conn.write(b"".join(pieces))

    # -- transaction mode: the server's messages -----------------------------------------
    def from_server(self, conn: ServerConn, data: bytes) -> None:
        transport = self.transport
        if not self.transaction_mode:
            if transport is not None:
                transport.write(data)
            conn.at_rest = data.endswith(_READY_IDLE)
            return
        if self._head:
            data = self._head + data
            self._head = b""
        n = len(data)
        i = min(self._pass, n)
        self._pass -= i
        out = conn.outstanding
        pieces = []
        run = 0
        ready = False
        while i < n:
            kind = data[i]
            if n - i < 5 or (kind == _Z and n - i < 6):
                # a header cut short (or a ReadyForQuery's status): held to decide on
                self._head = data[i:]
                break
            (length,) = _INT32.unpack_from(data, i + 1)
            if length < 4:
                log.warning("server %s sent a message of impossible length", conn.server.name)
                conn.abort()
                return
            end = i + 1 + length
            if kind == _Z:
                conn.status = data[i + 5 : i + 6]
                ready = True
            elif kind == _S and end <= n:
                self._parameter(conn, data[i + 5 : end])
            if not out.answer(kind, b""):
                pieces.append(data[run:i])
                run = end
            if end > n:
                self._pass = end - n
                i = n
                break
            i = end
        pieces.append(data[run:i])
        if transport is not None:
            transport.write(b"".join(pieces))
        if ready and self._clean(conn):
            self._release(conn)
            if self._buffer:
                self._client_messages()  # pipelined past the transaction's end

    def _parameter(self, conn: ServerConn, body: bytes) -> None:
        conn.note_parameter(body)
        name = body.partition(b"\0")[0].decode("utf-8", "replace")
        known = _TRACKED_LOWER.get(name.lower())
        if known is not None:
            # the client SET it: it follows the client to its next connection
            value = conn.parameters[name]
            self.wanted[known] = value
            conn.applied[known] = value

    # -- the end ------------------------------------------------------------------------------
    @property
    def _name(self) -> str:
        return self.listener.name

    def peer(self) -> str:
        peer = self.transport.get_extra_info("peername") if self.transport else None
        return f"{peer[0]}:{peer[1]}" if peer else "-"

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.closed:
            self.transport.write(data)

    def refuse(self, code: str, message: str) -> None:
        log.info("session from %s on %s refused: %s", self.peer(), self._name, message)
        self._fail(code, message)

    def _fail(self, code: str, message: str) -> None:
        self.write(error_response(code, message))
        self.close()

    def first_packet_late(self) -> None:
        if self.state == FIRST and not self.closed:
            self.refuse("08P01", "the first packet did not arrive in time")

    def close(self) -> None:
        if self.transport is not None and not self.closed:
            self.closed = True
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None and not self.closed:
            self.closed = True
            self.transport.abort()
