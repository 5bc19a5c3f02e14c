"""dbproxy's settings: the frozen dataclasses dbproxy/config.py builds from the
TOML file and the flags (lb/settings.py is lb's twin). infra/balance/dbproxy.toml
documents every one with its HAProxy or pgbouncer counterpart."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from proxycore.config import Address
from proxycore.health import CheckTiming
from proxycore.servers import HealthParams, ServerSpec
from proxycore.tls import TlsSettings

LISTENERS = ("rw", "ro", "any")
DEFAULT_PORTS = {"rw": 6432, "ro": 6433, "any": 6434}
PASSWORD_ENV = "DBPROXY_CHECK_PASSWORD"
AUTH_PASSWORD_ENV = "DBPROXY_AUTH_PASSWORD"
POOL_MODES = ("none", "session", "transaction")
SSL_MODES = ("passthrough", "refuse", "terminate")
SERVER_SSL_MODES = ("disable", "prefer", "require", "verify-ca", "verify-full")
AUTH_TYPES = ("trust", "md5", "scram-sha-256")
# pgbouncer's auth_query default: the role's secret, none past its VALID UNTIL.
DEFAULT_AUTH_QUERY = (
    "SELECT rolname, CASE WHEN rolvaliduntil < now() THEN NULL ELSE rolpassword END "
    "FROM pg_authid WHERE rolname = $1 AND rolcanlogin"
)


@dataclass(frozen=True, slots=True)
class CheckSettings:
    user: str = "balance_check"
    password: str = field(default="", repr=False)
    database: str = "users"
    timing: CheckTiming = CheckTiming(interval=1.0, timeout=1.0)


@dataclass(frozen=True, slots=True)
class ReadOnlyRouting:
    max_lag_bytes: int = 16 * 1024 * 1024  # one WAL segment
    max_lag_seconds: float = 10.0
    primary_fallback: bool = True
    # When a replica fits ro again, close the ro sessions that fell back to the
    # primary, so reads move back at once instead of when the clients' pools
    # happen to reconnect (HAProxy: on-marked-up shutdown-backup-sessions).
    return_to_replica: bool = False


@dataclass(frozen=True, slots=True)
class Timeouts:
    connect: float = 1.0  # HAProxy: timeout connect
    first_packet: float = 10.0  # how long a client may take to send its first packet
    # a connected server must answer a session's first packet within this, else
    # the next fitting server is dialled (a frozen server's kernel still accepts)
    startup: float = 1.0
    # sessions owed an answer, and not a byte from the server for this long: it
    # is asked an SSLRequest, and marked down if that goes unanswered as long
    # (dbproxy/liveness.py); 0 turns it off
    stall: float = 0.5
    shutdown: float = 10.0  # SIGTERM: how long sessions may go on before they are closed


@dataclass(frozen=True, slots=True)
class QueueSettings:
    """A burst of sessions waits for a slot instead of failing (HAProxy: server
    maxconn + timeout queue). max_sessions: per server unless its [[server]]
    says; "auto" (max_sessions_auto): the server's max_connections less its
    superuser_reserved_connections less a few, read by the checks; 0: no limit."""

    max_sessions_auto: bool = True
    max_sessions: int = 0
    max_queue: int = 10_000
    timeout: float = 10.0  # HAProxy: timeout queue


@dataclass(frozen=True, slots=True)
class PoolSettings:
    """Pooled server connections (pgbouncer's names). ``mode`` "none": today's
    relay, a server connection per client; "session": a client holds a pooled
    connection while it is connected; "transaction": while a transaction runs."""

    mode: str = "none"  # pgbouncer: pool_mode
    size: int = 20  # default_pool_size: server connections per (server, user, database)
    min_size: int = 0  # min_pool_size: kept open once the pool has logged in once
    idle_timeout: float = 600.0  # server_idle_timeout
    lifetime: float = 3600.0  # server_lifetime: closed when next idle past it
    wait_timeout: float = 120.0  # query_wait_timeout: a client waiting for a connection
    reset_query: str = "DISCARD ALL"  # server_reset_query (session mode)
    max_prepared_statements: int = 200  # transaction mode, per server connection
    # startup parameters a client may send that are neither passed nor refused
    ignore_startup_parameters: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class AuthSettings:
    """How a pooled listener authenticates its clients (pgbouncer's auth_*)."""

    type: str = "trust"  # auth_type
    file: Path | None = None  # auth_file: "user" "secret" lines, pgbouncer's userlist.txt
    query: str = DEFAULT_AUTH_QUERY  # auth_query, run as auth_user on the client's server
    user: str | None = None  # auth_user
    password: str = field(default="", repr=False)  # auth_user's ($DBPROXY_AUTH_PASSWORD)
    dbname: str | None = None  # auth_dbname: where auth_query runs (None: the client's)
    cache: float = 10.0  # how long a looked-up secret is used again (0: every login asks)


@dataclass(frozen=True, slots=True)
class DbProxyConfig:
    listen: Mapping[str, Address] = field(
        default_factory=lambda: {k: Address("127.0.0.1", p) for k, p in DEFAULT_PORTS.items()}
    )
    admin: Address | None = Address("127.0.0.1", 9102)
    workers: int = 1  # worker processes under a supervisor; "auto": one per core
    method: str = "least_conn"
    servers: tuple[ServerSpec, ...] = ()
    slots: Mapping[str, str] = field(default_factory=dict)  # server name -> its subscription's slot
    check: CheckSettings = CheckSettings()
    health: HealthParams = HealthParams()
    ro: ReadOnlyRouting = ReadOnlyRouting()
    timeouts: Timeouts = Timeouts()
    queue: QueueSettings = QueueSettings()
    max_client_connections: int = 10_000
    close_sessions_on_down: bool = True
    # passthrough: the server answers SSLRequest (TLS end to end, the session
    # unseen); refuse: 'N' from dbproxy; terminate: 'S' from dbproxy and TLS
    # with [tls]'s certificate, the session in clear to dbproxy (pgbouncer's
    # client_tls_sslmode), so cancel keys and roles stay visible
    ssl: str = "passthrough"
    tls: TlsSettings | None = None  # [tls]: ssl = "terminate"'s certificates and protocol
    # TLS to the servers on the connections dbproxy opens itself (libpq's
    # sslmode: disable, prefer, require, verify-ca, verify-full; pgbouncer's
    # server_tls_sslmode), checked against server_ssl_ca (None: the system's CAs)
    server_ssl: str = "disable"
    server_ssl_ca: Path | None = None
    # passthrough: how long a server's 'N' to an SSLRequest is given again on its
    # behalf, sparing the client a round trip to a backend still starting (0: never)
    ssl_refusal_memory: float = 1.0
    pool: PoolSettings = PoolSettings()
    auth: AuthSettings = AuthSettings()
    source: Path | None = field(default=None, compare=False)
