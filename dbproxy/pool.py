"""Server connection pools, one per (server, user, database), as pgbouncer keeps them.

A client asks its pool for a connection: an idle one at once (the last one
returned: its backend's caches are warm), else a new one is opened while the
pool is below its size and the server below its max_sessions (an idle one of
another pool on that server closed to make room), else the client waits, first
come first served, at most wait_timeout (then 53300). Back from a client, a
connection is reset (session mode: the reset query) and goes to the pool's first
waiter or to its idle list; past its lifetime it is closed instead. Once a
second the idle ones past idle_timeout are closed (down to min_size) and a pool
below min_size opens more. A server marked down loses its idle connections and
its waiters are sent elsewhere.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import logging
from collections.abc import Callable, Iterator
from typing import Any, Protocol, cast

from proxycore.deadline import Expiries
from proxycore.servers import Server

from .pgwire import error_response, parameter_status
from .scram import Secret
from .serverconn import IDLE, LENT, LOGIN, ServerConn
from .serverlogin import ServerLogin
from .servertls import ServerTls, ServerTlsRefused
from .settings import PoolSettings

log = logging.getLogger("dbproxy")

TICK = 1.0


class Waiter(Protocol):
    """What a pool needs of a client waiting for a connection."""

    closed: bool

    def got(self, conn: ServerConn) -> None: ...
    def pool_failed(self, error: bytes) -> None: ...
    def pool_lost(self, failed: Server | None) -> None: ...
    def wait_late(self) -> None: ...


class Credentials:
    """How the pool logs in to its server as its user: the password an auth file
    gave, or the SCRAM ClientKey of the last client that logged in with SCRAM
    against the server's own secret (an auth query's), or the user's md5 secret,
    or nothing (a server that trusts dbproxy)."""

    __slots__ = ("client_key", "md5", "password", "scram_secret")

    def __init__(self) -> None:
        self.password: str | None = None
        self.client_key: bytes | None = None
        self.scram_secret: Secret | None = None
        self.md5: str | None = None


class Pool:
    def __init__(self, pools: Pools, server: Server, user: str, database: str) -> None:
        self.pools = pools
        self.server = server
        self.user = user
        self.database = database
        self.conns: set[ServerConn] = set()
        self.idle: list[ServerConn] = []  # the last returned at the end
        self.opening = 0
        self.waiting: collections.deque[Waiter] = collections.deque()
        self.credentials = Credentials()
        # a client has logged in to this pool: min_size may open connections
        self.used = False
        # the ParameterStatus messages of a welcome, by the client parameters asked:
        # a client's login without a connection (transaction mode; pgbouncer
        # keeps the same); a server that restarts drops them (logged_in)
        self._welcomes: dict[frozenset[tuple[str, str]], bytes] = {}
        self._server_version = ""
        self.served = 0  # connections lent
        self.waited = 0  # clients that had to wait
        self.wait_timeouts = 0
        self.login_failures = 0
        self.resets = 0

    @property
    def name(self) -> str:
        return f"{self.server.name}/{self.user}/{self.database}"

    @property
    def active(self) -> int:
        return sum(1 for c in self.conns if c.state == LENT)

    @property
    def waiting_count(self) -> int:
        return sum(1 for w in self.waiting if not w.closed)

    def longest_wait(self, now: float) -> float:
        since = self.pools.waiting_since
        return max((now - since[w] for w in self.waiting if w in since), default=0.0)

    def welcome(self, wanted: dict[str, str]) -> bytes | None:
        """The ParameterStatus messages a client asking ``wanted`` is told without a
        connection of its own (transaction mode): as a connection running with
        them reported them, in the server's own words; None until one has."""
        return self._welcomes.get(frozenset(wanted.items()))

    def remember_welcome(self, wanted: dict[str, str], parameters: dict[str, str]) -> None:
        """What a connection running with ``wanted`` reports (``parameters``)."""
        if len(self._welcomes) < 64:  # a few kinds of clients, not one per client
            self._welcomes[frozenset(wanted.items())] = b"".join(
                [parameter_status(n, v) for n, v in parameters.items()]
            )

    # -- lending ----------------------------------------------------------------------
    def acquire(self, client: Waiter) -> None:
        """``client.got(conn)`` now or later; ``pool_failed``/``wait_late`` if not."""
        while self.idle:
            conn = self.idle.pop()
            if conn.state == IDLE and conn.transport is not None:
                self._lend(conn, client)
                return
        self.waiting.append(client)
        self.waited += 1
        self.pools.wait_started(client)
        self.grow()

    def _lend(self, conn: ServerConn, client: Waiter) -> None:
        self.served += 1
        self.server.total += 1
        conn.lend(client)  # type: ignore[arg-type]
        client.got(conn)

    def give_back(self, conn: ServerConn, reset: str | None) -> None:
        """A client is done with ``conn``; ``reset``: a query to run on it first."""
        conn.take_back()
        if conn.state != IDLE:
            return  # lost meanwhile
        if self._expired(conn) or not self.server.takes_traffic():
            conn.close()
            return
        if reset:
            self.resets += 1
            conn.run(reset, self._reset_done)
            return
        self._returned(conn)

    def _reset_done(self, conn: ServerConn, error: bytes | None) -> None:
        if error is not None or conn.status != b"I":
            log.warning("pool %s: the reset query failed; closing the connection", self.name)
            conn.close()
            return
        conn.applied = {}  # RESET ALL went back to the server's defaults
        self._returned(conn)

    def abandon(self, client: Waiter, timed_out: bool) -> None:
        """``client`` stops waiting: it timed out, or it left."""
        try:
            self.waiting.remove(client)
        except ValueError:
            return
        self.pools.wait_ended(client)
        if timed_out:
            self.wait_timeouts += 1

    def _returned(self, conn: ServerConn) -> None:
        conn.idle_since = self.pools.loop.time()
        while self.waiting:
            client = self.waiting.popleft()
            if client.closed:
                continue
            self.pools.wait_ended(client)
            self._lend(conn, client)
            return
        self.idle.append(conn)

    def _expired(self, conn: ServerConn) -> bool:
        lifetime = self.pools.settings.lifetime
        return lifetime > 0 and self.pools.loop.time() - conn.created > lifetime

    # -- opening ------------------------------------------------------------------------
    def grow(self) -> None:
        """Open connections for the clients waiting, within the pool's and server's limits."""
        wanted = self.waiting_count
        while self.opening < wanted and self._room():
            self._open()

    def _room(self) -> bool:
        if len(self.conns) + self.opening >= self.pools.settings.size:
            return False
        server = self.server
        if server.active < server.limit:
            return True
        return self.pools.evict_idle(server, self)

    def _open(self) -> None:
        server = self.server
        server.active += 1
        server.connecting += 1
        self.opening += 1
        creds = self.credentials
        # no client parameters at login: a RESET (and the reset query's RESET ALL)
        # then returns a connection to the server's defaults, not to whichever
        # client's parameters it was opened for; each client's are SET when lent
        parameters = {"user": self.user, "database": self.database}
        login = ServerLogin(
            parameters,
            client_key=creds.client_key,
            scram_secret=creds.scram_secret,
            md5=creds.md5,
            password=creds.password,
        )
        self.pools.loop.create_task(self._connect(login))

    async def _connect(self, login: ServerLogin) -> None:
        server, loop = self.server, self.pools.loop
        address = server.spec.address
        try:
            _, _protocol = await asyncio.wait_for(
                loop.create_connection(
                    cast(
                        Callable[[], asyncio.Protocol],
                        functools.partial(ServerConn, self, login),
                    ),
                    address.host,
                    address.port,
                ),
                self.pools.connect_timeout,
            )
        except (OSError, TimeoutError) as exc:
            self.opening -= 1
            server.connecting -= 1
            server.active -= 1
            server.connect_failed(exc)
            log.info("pool %s: connect failed: %s", self.name, exc)
            # those waiting go to the next fitting server, as a relayed session does
            self.redirect_waiters(failed=server)
            self.pools.server_freed(server)
            return
        server.connecting -= 1
        conn = cast(ServerConn, _protocol)
        tls = self.pools.server_tls
        if tls is not None:
            try:
                upgraded = await asyncio.wait_for(
                    tls.negotiate(loop, conn, address.host), self.pools.connect_timeout
                )
            except (OSError, TimeoutError, ServerTlsRefused) as exc:  # (ssl.SSLError: OSError)
                conn.abort()  # connection_lost counts it gone
                self.login_failed(conn, b"", f"TLS to the server failed: {exc}")
                return
            conn.upgraded(upgraded)
        conn.begin_login()

    def made(self, conn: ServerConn) -> None:
        conn.created = self.pools.loop.time()
        self.conns.add(conn)

    def logged_in(self, conn: ServerConn) -> None:
        self.opening -= 1
        conn.state = IDLE
        version = conn.parameters.get("server_version", "")
        if version != self._server_version:
            self._server_version = version
            self._welcomes.clear()
        self._returned(conn)

    def login_failed(self, conn: ServerConn, error: bytes, reason: str) -> None:
        self.login_failures += 1
        log.warning("pool %s: login to the server failed: %s", self.name, reason)
        self._fail_waiters(
            error or error_response("08006", f"dbproxy: login to {self.server.name}: {reason}")
        )

    def _fail_waiters(self, error: bytes) -> None:
        """A login or connect failed: those waiting would fail as it did."""
        while self.waiting:
            client = self.waiting.popleft()
            if not client.closed:
                self.pools.wait_ended(client)
                client.pool_failed(error)

    def lost(self, conn: ServerConn, was: int) -> None:
        """``conn`` closed (whoever closed it)."""
        if conn in self.conns:
            self.conns.discard(conn)
            if was == LOGIN:
                self.opening -= 1
            self.server.active -= 1
            self.pools.server_freed(self.server)

    # -- upkeep ---------------------------------------------------------------------------
    def tick(self, now: float) -> None:
        settings = self.pools.settings
        keep = settings.min_size
        for conn in list(self.idle):
            too_old = settings.lifetime > 0 and now - conn.created > settings.lifetime
            idle_long = now - conn.idle_since > settings.idle_timeout
            if too_old or (idle_long and len(self.conns) > keep):
                self.idle.remove(conn)
                conn.close()
        if keep and self.used and self.server.takes_traffic():
            while len(self.conns) + self.opening < keep and self.server.active < self.server.limit:
                self._open()

    def close_idle(self) -> None:
        for conn in self.idle:
            conn.close()
        self.idle.clear()

    def redirect_waiters(self, failed: Server | None = None) -> None:
        """Those waiting go elsewhere (the server went down, or ``failed`` a connect)."""
        while self.waiting:
            client = self.waiting.popleft()
            if not client.closed:
                self.pools.wait_ended(client)
                client.pool_lost(failed)

    def status(self, now: float) -> dict[str, Any]:
        """As pgbouncer's SHOW POOLS: clients active and waiting, servers by state."""
        return {
            "server": self.server.name,
            "user": self.user,
            "database": self.database,
            "active": self.active,
            "idle": len(self.idle),
            "opening": self.opening,
            "waiting": self.waiting_count,
            "longest_wait_seconds": round(self.longest_wait(now), 3),
            "served": self.served,
            "connections": len(self.conns),
            "wait_timeouts": self.wait_timeouts,
            "login_failures": self.login_failures,
        }


class Pools:
    """Every pool of one dbproxy process, and what they share: the settings, the
    timer, the wait limits."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        settings: PoolSettings,
        connect_timeout: float,
        server_tls: ServerTls | None = None,
    ) -> None:
        self.loop = loop
        self.settings = settings
        self.connect_timeout = connect_timeout
        self.server_tls = server_tls  # server_ssl: TLS on the connections opened
        self.by_key: dict[tuple[Server, str, str], Pool] = {}
        self.waiting_since: dict[Waiter, float] = {}
        self.wait_limits: Expiries[Any] = Expiries(loop, _late)
        self._timer: asyncio.TimerHandle | None = None

    def __iter__(self) -> Iterator[Pool]:
        return iter(list(self.by_key.values()))

    def start(self) -> None:
        self._timer = self.loop.call_later(TICK, self._tick)

    def get(self, server: Server, user: str, database: str) -> Pool:
        key = (server, user, database)
        pool = self.by_key.get(key)
        if pool is None:
            pool = self.by_key[key] = Pool(self, server, user, database)
        return pool

    def wait_started(self, client: Waiter) -> None:
        now = self.loop.time()
        self.waiting_since[client] = now
        self.wait_limits.set(client, now + self.settings.wait_timeout)

    def wait_ended(self, client: Waiter) -> None:
        self.waiting_since.pop(client, None)
        self.wait_limits.clear(client)

    def evict_idle(self, server: Server, wanting: Pool) -> bool:
        """Close the longest idle connection another pool holds on ``server``, so
        that ``wanting`` may open one (pgbouncer does so at max_db_connections)."""
        oldest: tuple[float, Pool, ServerConn] | None = None
        for pool in self.by_key.values():
            if pool is wanting or pool.server is not server or not pool.idle:
                continue
            conn = pool.idle[0]
            if oldest is None or conn.idle_since < oldest[0]:
                oldest = (conn.idle_since, pool, conn)
        if oldest is None:
            return False
        _, pool, conn = oldest
        pool.idle.remove(conn)
        conn.close()
        return False  # its slot frees when it has closed: server_freed grows the pool then

    def server_freed(self, server: Server) -> None:
        """A connection to ``server`` closed: pools waiting for room may open one."""
        for pool in list(self.by_key.values()):
            if pool.server is server and pool.waiting:
                pool.grow()

    def server_down(self, server: Server, close_lent: bool) -> None:
        """``server`` was marked down: its idle connections close, its waiters go
        elsewhere, and (``close_lent``) the clients using one lose it now."""
        for pool in list(self.by_key.values()):
            if pool.server is server:
                pool.close_idle()
                pool.redirect_waiters()
                if close_lent:
                    for conn in [c for c in pool.conns if c.state == LENT]:
                        conn.abort()

    def forget(self, server: Server) -> None:
        """``server`` left the configuration."""
        for key in [k for k in self.by_key if k[0] is server]:
            pool = self.by_key.pop(key)
            pool.close_idle()
            pool.redirect_waiters()
            for conn in list(pool.conns):
                conn.abort()

    def _tick(self) -> None:
        now = self.loop.time()
        for pool in list(self.by_key.values()):
            pool.tick(now)
        self._timer = self.loop.call_later(TICK, self._tick)

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.wait_limits.close()
        for pool in self.by_key.values():
            pool.close_idle()
            for conn in list(pool.conns):
                conn.close()

    def status(self) -> list[dict[str, Any]]:
        now = self.loop.time()
        return [pool.status(now) for pool in self.by_key.values()]


def _late(client: Waiter) -> None:
    client.wait_late()
