"""A pooled client's login, run by dbproxy: its first packets (an SSLRequest or
GSSENCRequest answered 'N', a CancelRequest delivered), its startup packet (the
parameters a pool can carry, dbproxy/parameters.py), then the authentication
exchange (dbproxy/auth.py) against the secret dbproxy/credentials.py finds.
What follows the login is dbproxy/pooled.py's, a subclass of this."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from proxycore.servers import Server

from .auth import TRUST, ClientAuth
from .clientend import ClientEnd
from .credentials import LookupFailed
from .listener import Listener
from .parameters import carried
from .pgwire import (
    CancelRequest,
    GSSENCRequest,
    ProtocolViolation,
    SSLRequest,
    Startup,
    split_messages,
)

if TYPE_CHECKING:
    from .view import Proxy

log = logging.getLogger("dbproxy")

FIRST, AUTH, LOGIN, READY, CLOSED = range(5)


class PooledLogin(ClientEnd):
    def __init__(self, proxy: Proxy, listener: Listener) -> None:
        super().__init__(proxy, listener)
        self.state = FIRST
        self.user = ""
        self.database = ""
        self.wanted: dict[str, str] = {}
        self._auth: ClientAuth | None = None
        self.server: Server | None = None  # the one chosen for it (its auth query runs there)
        # the server whose secret checked the client's proof: a SCRAM ClientKey
        # logs in there (each cluster salts its own), not elsewhere
        self.secret_from: Server | None = None
        self._ok = b""  # AuthenticationOk, sent with the rest of the welcome

    def _logged_in(self, answer: bytes) -> None:
        """Authenticated; ``answer`` ends the exchange (AuthenticationOk)."""
        raise NotImplementedError

    # -- the first packet ------------------------------------------------------------
    def _first_packet(self) -> None:
        while self.state == FIRST:
            got = self.next_first_packet()
            if got is None:
                return
            first = got[1]
            if isinstance(first, SSLRequest):
                if self.terminates_tls:
                    self.start_tls()
                    return
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
        wanted, refused = carried(parameters, self.proxy.config.pool.ignore_startup_parameters)
        if refused is not None:
            # pgbouncer's words: what a pool cannot carry from client to client
            self.refuse("08P01", f"unsupported startup parameter: {refused}")
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

    async def _look_up(self, server: Server | None) -> None:
        """The user's secret, asked of the chosen server, else of the next that
        fits: a server that cannot answer is no wrong password (57P03, which
        drivers retry, not 28P01)."""
        tried: list[Server] = []
        while server is not None:
            try:
                secret = await self.proxy.secrets.lookup(self.user, server, self.database)
            except LookupFailed:
                tried.append(server)
                server = self.proxy.choose(self.listener, tried)
                continue
            if self.closed:
                return
            self.server = server
            self.secret_from = None if self.proxy.secrets.in_file(self.user) else server
            self._auth = ClientAuth(self.proxy.config.auth.type, self.user, secret)
            self._begin_auth()
            return
        if not self.closed:
            self.refuse(
                "57P03",
                f"dbproxy: no server of listener '{self._name}' could be asked for the "
                f"secret of user {self.user!r} ({len(tried)} tried)",
            )

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

    # -- the end ------------------------------------------------------------------------------
    @property
    def _name(self) -> str:
        return self.listener.name

    def first_packet_late(self) -> None:
        if self.state == FIRST and not self.closed:
            self.refuse("08P01", "the first packet did not arrive in time")
