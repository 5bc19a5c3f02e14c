"""A client of a pooled listener: dbproxy itself reads its startup, logs it in
(dbproxy/auth.py) and lends it a server connection from the pool of its
(server, user, database): for the whole session (session mode), or for each
transaction (transaction mode: from its first message to the ReadyForQuery
'I' that ends it with nothing more in flight).

The client is told the server's parameters and dbproxy's own BackendKeyData:
its CancelRequest comes to dbproxy, which sends the server's key to whichever
connection the client holds at that moment (dbproxy/cancels.py). A connection
gets the client's startup parameters (client_encoding, TimeZone, any other, and
those in ``options``) by a SET before it is lent, when they differ from what it
runs with. In session mode bytes then go both ways unread; in transaction
mode the client's messages are read whole (named prepared statements renamed,
dbproxy/prepared.py) and the server's scanned for the messages that matter,
a few bytes each.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Final

from proxycore.flow import Reason
from proxycore.servers import Server

from . import routing
from .listener import Listener
from .parameters import FOLLOWED, set_statement
from .pgwire import (
    ProtocolViolation,
    backend_key_data,
    parameter_status,
    ready_for_query,
    split_messages,
)
from .pool import Pool
from .pooledlogin import AUTH, CLOSED, FIRST, LOGIN, READY, PooledLogin
from .serverconn import LENT, OWN, ServerConn
from .transactions import TERMINATE, ImpossibleMessage, Transactions

if TYPE_CHECKING:
    from .view import Proxy

log = logging.getLogger("dbproxy")

_READY_IDLE: Final = b"Z\0\0\0\x05I"
_TERMINATE_MESSAGE: Final = b"X\0\0\0\x04"
_READY: Final = ready_for_query()


def _statuses(parameters: dict[str, str]) -> bytes:
    return b"".join([parameter_status(n, v) for n, v in parameters.items()])


class PooledSession(PooledLogin):
    def __init__(self, proxy: Proxy, listener: Listener) -> None:
        super().__init__(proxy, listener)
        self.transaction_mode = proxy.config.pool.mode == "transaction"
        self.pool: Pool | None = None
        self.conn: ServerConn | None = None
        self.waiting = False
        self.failed: list[Server] = []  # servers whose connect failed for this session
        self.key = (0, 0)
        # transaction mode's reading of both ways, made at the first message
        self._reader: Transactions | None = None

    # -- asyncio.Protocol ------------------------------------------------------------
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
            if conn.state == OWN and conn.at_rest:
                # it sent nothing but the SET dbproxy put ahead of it
                conn.back_when_answered(self._reset_query())
            elif self._clean(conn):
                self._give_back(conn)
            else:
                conn.close()
        proxy.session_closed()

    def parked_on_primary(self) -> bool:
        # session-pooled: its connection's bytes go unread, as a relayed session's
        # (a transaction-pooled client chooses again at each transaction)
        conn = self.conn
        return not self.transaction_mode and conn is not None and routing.is_primary(conn.server)

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

    def _logged_in(self, answer: bytes) -> None:
        """Authenticated: AuthenticationOk goes with the rest of the welcome, in one
        write, once there are parameters to tell (a connection's, or the pool's)."""
        self._ok = answer
        self.state = LOGIN
        if self.transaction_mode:
            pool = self._pool()
            if pool is None:
                return
            statuses = pool.welcome(self.wanted)
            if statuses is not None:
                # welcomed as a connection running with its parameters was: no
                # connection needed until its first transaction
                self.write(self._ok + self._welcome(statuses))
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
        if server is None or server in self.failed or not proxy.fits(server, self.listener):
            server = proxy.choose(self.listener, self.failed)
            if server is None:
                what = (
                    f"no server answered ({len(self.failed)} tried)"
                    if self.failed
                    else ("no server is available")
                )
                self.fail("57P03", f"dbproxy: {what} for listener '{self._name}'")
                return None
            self.server = server
        pool = proxy.pools.get(server, self.user, self.database)
        auth = self._auth
        creds = pool.credentials
        creds.password = proxy.secrets.password(self.user)
        if (
            auth is not None
            and auth.client_key is not None
            and (self.secret_from is None or self.secret_from is server)
        ):
            # a ClientKey opens connections only where its secret came from (an
            # auth query's, per server) or anywhere (an auth file's, with its
            # password above); elsewhere the pool uses what its own clients gave
            creds.client_key, creds.scram_secret = auth.client_key, auth.scram_secret
        if auth is not None and auth.md5 is not None:
            creds.md5 = auth.md5
        pool.used = True
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
        if self.failed:
            self.failed.clear()  # a server that failed a connect may serve its next transaction
        if self.closed:
            self._give_back(conn)
            return
        self.conn = conn
        sql = "" if self.wanted == conn.applied else set_statement(self.wanted, conn.applied)
        known = None
        if sql and self.state == LOGIN:
            # The welcome tells what the client asked for in the server's words
            # ("euc-jp" is EUC_JP): as a connection running with them once said
            # (the pool remembers), else learnt now, the SET waited for once.
            known = None if self.transaction_mode else conn.pool.welcome(self.wanted)
            if known is None:
                conn.run(sql, self._parameters_set)
                return
        if sql:
            # the SET goes ahead of the client's first messages, not a round trip before them
            conn.applied = dict(self.wanted)
            conn.set_for(sql, self, self._parameters_failed)
        self._lent(conn, known)

    def _parameters_set(self, conn: ServerConn, error: bytes | None) -> None:
        if self.closed or error is not None:
            self._parameters_failed(conn, error)
            return
        conn.applied = dict(self.wanted)
        conn.lend(self)
        self._lent(conn)

    def _parameters_failed(self, conn: ServerConn, error: bytes | None) -> None:
        """The server refused a parameter of the client's (a bad value, a name it
        does not know): its error, and the end of the session."""
        self.conn = None
        conn.close()  # what it runs with is unknown now
        if error:
            self.write(error)
        self.close()

    def _lent(self, conn: ServerConn, known: bytes | None = None) -> None:
        """``known``: the welcome's ParameterStatus messages, when they are not the
        connection's own (yet: its SET is on the way)."""
        if self.state == LOGIN:
            if not self.transaction_mode and conn.backend_key is not None:
                # session mode: the connection is the client's for good, so it is
                # told its backend's own key: pg_backend_pid(), pg_terminate_backend()
                # and a NOTIFY's sender are what they say (pgbouncer tells its own)
                self.key = conn.backend_key
                self.proxy.cancels.remember(self.key, self)
            if known is None:
                known = _statuses(conn.parameters)
                conn.pool.remember_welcome(self.wanted, conn.parameters)
            self.write(self._ok + self._welcome(known))
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
        """The rest of a login: the server's parameters, its key (dbproxy's own in
        transaction mode, the connection's in session mode), ready."""
        if self.key == (0, 0):
            self.key = self.proxy.cancels.new_key(self)
        return statuses + backend_key_data(*self.key) + _READY

    def _release(self, conn: ServerConn) -> None:
        self.conn = None
        self._give_back(conn)

    def _give_back(self, conn: ServerConn) -> None:
        conn.pool.give_back(conn, self._reset_query())

    def _reset_query(self) -> str | None:
        """What a connection runs before its next client: session mode's reset query."""
        return None if self.transaction_mode else (self.proxy.config.pool.reset_query or None)

    def _clean(self, conn: ServerConn) -> bool:
        """Whether ``conn`` can serve another client as it is: nothing in flight,
        no transaction open."""
        if conn.state != LENT:
            return False
        if not self.transaction_mode:
            return conn.at_rest
        reader = self._reader
        return (
            conn.outstanding.idle
            and (reader is None or reader.between_messages)
            and conn.status == b"I"
        )

    def pool_failed(self, error: bytes) -> None:
        self.waiting = False
        self.write(error)
        self.close()

    def pool_lost(self, failed: Server | None) -> None:
        """Its pool's server went down, or ``failed`` a connect, while this waited:
        the next fitting server, as a relayed session's failed connect goes on."""
        self.waiting = False
        if failed is not None:
            self.failed.append(failed)
        self._acquire()

    def wait_late(self) -> None:
        if not self.waiting or self.closed:
            return
        self.waiting = False
        if self.pool is not None:
            self.pool.abandon(self, timed_out=True)
        self.fail(
            "53300",
            f"dbproxy: no server connection for user {self.user!r} on {self._name} "
            f"within {self.proxy.config.pool.wait_timeout:g}s (query_wait_timeout)",
        )

    def server_lost(self, conn: ServerConn) -> None:
        if conn is not self.conn:
            return
        self.conn = None
        self.fail("08006", "dbproxy: the server connection was lost")

    def cancel_target(self) -> tuple[Server, tuple[int, int]] | None:
        conn = self.conn
        if conn is None or conn.backend_key is None or conn.state != LENT:
            return None
        return conn.server, conn.backend_key

    # -- transaction mode: both ways (dbproxy/transactions.py) --------------------------
    def _client_messages(self) -> None:
        buffer = self._buffer
        try:
            spans, rest = split_messages(buffer)
        except ProtocolViolation as exc:
            self.fail("08P01", f"dbproxy: {exc}")
            return
        if not spans:
            return
        conn = self.conn
        if conn is None:
            if buffer[spans[0][0]] == TERMINATE:
                self.close()
                return
            if not self.waiting:
                self._acquire()
            return
        self._buffer = buffer[rest:]
        reader = self._reader
        if reader is None:
            reader = self._reader = Transactions(self.proxy.config.pool.max_prepared_statements)
        data, terminated = reader.to_server(buffer, spans, rest, conn.outstanding)
        conn.write(data)
        if terminated:
            self.close()

    def from_server(self, conn: ServerConn, data: bytes) -> None:
        transport = self.transport
        reader = self._reader
        if not self.transaction_mode or reader is None:
            if transport is not None:
                transport.write(data)
            conn.at_rest = data.endswith(_READY_IDLE)
            return
        try:
            data, ready = reader.from_server(conn, data, self._parameter)
        except ImpossibleMessage as exc:
            log.warning("server %s sent %s; closing its connection", conn.server.name, exc)
            conn.abort()
            return
        if transport is not None:
            transport.write(data)
        if ready and self._clean(conn):
            self._release(conn)
            if self._buffer:
                self._client_messages()  # pipelined past the transaction's end

    def _parameter(self, conn: ServerConn, body: bytes) -> None:
        conn.note_parameter(body)
        name = body.partition(b"\0")[0].decode("utf-8", "replace")
        key = name.lower()
        if key in FOLLOWED:
            # the client SET it: it follows the client to its next connection
            value = conn.parameters[name]
            self.wanted[key] = value
            conn.applied[key] = value
