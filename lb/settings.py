"""lb's settings: frozen dataclasses, what lb/config.py builds from the TOML file
and the flags.

Every option has an nginx or HAProxy counterpart with the same default meaning;
infra/balance/lb.toml lists them all with that counterpart beside each. The
shape: listeners' limits and timeouts for clients (the whole server), pools of
servers (each with its balancing, checks, queue, timeouts towards the servers,
hedging and retry budget), and routes from a request to a pool (or to a fixed
answer), each with its own overrides and rate limit.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from proxycore.config import Address
from proxycore.health import CheckTiming
from proxycore.servers import HealthParams, ServerSpec
from proxycore.tls import TlsSettings


@dataclass(frozen=True, slots=True)
class Timeouts:
    connect: float = 1.0  # proxy_connect_timeout
    first_byte: float = 10.0  # proxy_read_timeout, until the response starts
    upstream_idle: float = 60.0  # proxy_read_timeout, between reads of a response
    client_header: float = 10.0  # client_header_timeout: the whole head, however it trickles in
    client_body: float = 60.0  # client_body_timeout: between two reads of a request body
    client_keepalive: float = 75.0  # keepalive_timeout
    shutdown: float = 10.0  # how long SIGTERM waits for in-flight requests
    # SIGTERM: a keep-alive connection idle this long is closed; a request on it
    # meanwhile is answered, with Connection: close (closing an idle connection
    # at once races the request its client may be sending on it)
    shutdown_idle: float = 1.0
    # After lb's own close mid-conversation (a refusal, Connection: close): what
    # the client still sends is read and dropped this long, so that the close
    # is no reset that costs the client its answer (nginx: lingering_timeout)
    lingering: float = 5.0
    # A server owed a response with no byte from it this long is asked (its
    # pool's check GET) and, silent still as long again, marked down
    # (proxycore/silence.py; dbproxy: timeouts.stall); 0: off
    stall: float = 0.2


# The timeouts towards the servers: a pool's, and a route's overrides of them.
UPSTREAM_TIMEOUTS = ("connect", "first_byte", "upstream_idle")


@dataclass(frozen=True, slots=True)
class Limits:
    max_header_bytes: int = 16 * 1024  # large_client_header_buffers: past it, 431
    max_headers: int = 100  # HAProxy: tune.http.maxhdr (101); past it, 431
    max_body_bytes: int = 100 * 1024 * 1024  # client_max_body_size: past it, 413
    max_client_connections: int = 10_000  # worker_connections
    retry_body_buffer: int = 64 * 1024  # a request body up to this size is kept to replay on retry


@dataclass(frozen=True, slots=True)
class UpstreamKeepalive:
    max_idle: int = 64  # keepalive (idle connections kept per server)
    idle_timeout: float = 30.0  # keepalive_timeout of the upstream block


@dataclass(frozen=True, slots=True)
class UpstreamTls:
    """TLS to a pool's servers (nginx: proxy_pass https:// with proxy_ssl_*;
    HAProxy: server ... ssl verify required ca-file). Unlike nginx's
    proxy_ssl_verify, verifying is the default: off only when said."""

    verify: bool = True  # proxy_ssl_verify
    ca_file: Path | None = None  # proxy_ssl_trusted_certificate (None: the system's)
    server_name: str = ""  # proxy_ssl_name: SNI and the name verified ("": the address)
    min_version: str = "1.2"  # proxy_ssl_protocols' lowest


@dataclass(frozen=True, slots=True)
class ActiveCheck:
    enabled: bool = True
    path: str = "/health"
    host: str = "localhost"
    timing: CheckTiming = CheckTiming(interval=1.0, timeout=0.5)
    expect_low: int = 200
    expect_high: int = 399


@dataclass(frozen=True, slots=True)
class QueueSettings:
    """Overload is not failure: past a server's max_conns a request waits for a
    slot (HAProxy: server maxconn + timeout queue; nginx: max_conns, its queue
    is nginx Plus only) instead of piling onto the server."""

    # Requests in flight per server, unless its [[server]] says otherwise. A users
    # backend (aiohttp, 10 database connections per pool) serves fastest with a
    # few dozen at once; more only wait inside it (asyncpg's acquire_timeout, 3 s,
    # then 503). 0: no limit.
    max_conns: int = 64
    max_connecting: int = 16  # connects in progress per server; a burst waits for them
    max_queue: int = 10_000  # requests waiting for a slot, in all; past it 503
    timeout: float = 10.0  # HAProxy: timeout queue; past it 503 with Retry-After


@dataclass(frozen=True, slots=True)
class RetryBudgetSettings:
    """What the extra attempts that may add load to a live server (hedges,
    retries after a timeout or a configured status) may cost, two ways:
    in flight at once, at most ``percent`` of the requests in flight or
    ``min_concurrency``, whichever is more (Envoy's retry_budget); and over
    the last ``window`` seconds, at most ``window_percent`` of that window's
    requests plus ``min_per_second`` a second (Finagle's RetryBudget), so that
    short-lived hedges cannot add up to a second load either."""

    percent: int = 20  # budget_percent
    min_concurrency: int = 3  # min_retry_concurrency
    window_percent: int = 10  # Finagle: percentCanRetry
    min_per_second: float = 2.0  # Finagle: minRetriesPerSec
    window: float = 10.0  # Finagle: ttl


@dataclass(frozen=True, slots=True)
class PoolConfig:
    """A pool of servers (nginx: upstream; HAProxy: backend; Envoy: cluster)."""

    name: str = "http"
    # peak_ewma: the power of two choices over latency and requests in flight
    # (Finagle, Linkerd); round_robin and least_conn as nginx's
    method: str = "peak_ewma"
    tries: int = 3  # proxy_next_upstream_tries / HAProxy retries + 1
    # No response byte within this: an idempotent request goes to another server
    # too, the first answer wins (Envoy: per_try_timeout with hedge_on_per_try_timeout);
    # 0: never
    hedge_after: float = 0.3
    # Hedge after the pool's own recent latency at this percentile ("The Tail at
    # Scale"), hedge_after being the least; 0: after hedge_after always
    hedge_percentile: int = 95
    # Hedges pause while fewer than this percent of the last window's won (a
    # pool slow all over gains nothing from them): one a second still goes, to
    # see whether they win again; 0: never paused
    hedge_min_wins: int = 10
    retry_budget: RetryBudgetSettings = RetryBudgetSettings()
    queue: QueueSettings = QueueSettings()
    servers: tuple[ServerSpec, ...] = ()
    check: ActiveCheck = ActiveCheck()
    health: HealthParams = HealthParams()
    passive_statuses: frozenset[int] = frozenset()  # proxy_next_upstream http_502 ...
    timeouts: Timeouts = Timeouts()  # (only connect, first_byte and upstream_idle are a pool's)
    keepalive: UpstreamKeepalive = UpstreamKeepalive()
    tls: UpstreamTls | None = None  # [upstream_tls]: None speaks plain HTTP to the servers


@dataclass(frozen=True, slots=True)
class LimitConfig:
    """A rate limit (nginx: limit_req): ``rate`` requests a second per key, up to
    ``burst`` more waiting (delayed to the rate, or let through at once with
    ``nodelay``); past that, ``status`` with Retry-After."""

    rate: float  # requests per second
    burst: int = 0
    nodelay: bool = False
    key: str = "client"  # "client" | "forwarded" | "header:NAME"
    status: int = 429


@dataclass(frozen=True, slots=True)
class AnswerConfig:
    """A route's fixed answer (nginx: return): a status, and a Location for a
    redirect or a body otherwise."""

    status: int
    location: str = ""
    body: str = ""


@dataclass(frozen=True, slots=True)
class RouteConfig:
    """A route (nginx: server_name + location; HAProxy: acl + use_backend; Envoy:
    virtual host + route). No match field: the catch-all."""

    name: str
    hosts: tuple[str, ...] = ()  # exact, "*.example.com", "www.example.*"; none: every host
    path_kind: str = ""  # "exact" | "prefix" | "prefix_first" | "regex"; "": any path
    path: str = ""
    methods: frozenset[str] = frozenset()
    headers: tuple[tuple[str, str], ...] = ()  # (lowercase name, exact value)
    pool: str = ""
    answer: AnswerConfig | None = None
    # overrides of the pool's settings for this route's requests (None: the pool's)
    tries: int | None = None
    hedge_after: float | None = None
    timeouts: tuple[tuple[str, float], ...] = ()  # (field of UPSTREAM_TIMEOUTS, seconds)
    max_body_bytes: int | None = None
    limit: LimitConfig | None = None
    line: int = 0  # where the file defines it (for messages)


@dataclass(frozen=True, slots=True)
class ListenerConfig:
    """One address lb serves (nginx's ``listen``, HAProxy's ``bind``)."""

    name: str
    address: Address
    tls: TlsSettings | None = None  # listen ... ssl; bind ... ssl crt
    # A plain listener's requests answered 308 to https (nginx: return 308
    # https://$host$request_uri): to the first TLS listener's port.
    redirect_https: bool = False
    # Strict-Transport-Security on a TLS listener's responses ("" none;
    # nginx: add_header Strict-Transport-Security "max-age=..." always)
    hsts: str = ""


@dataclass(frozen=True, slots=True)
class LbConfig:
    # The plain HTTP listener named "http" (None: "off", only [[listener]]s).
    listen: Address | None = Address("127.0.0.1", 8080)
    # More listeners, plain or TLS, each by name ([[listener]], --tls-listen).
    listeners: tuple[ListenerConfig, ...] = ()
    admin: Address | None = Address("127.0.0.1", 9101)
    # Worker processes (nginx: worker_processes); 1: one process, no supervisor.
    # "auto" in the file or on the command line is one per core.
    workers: int = 1
    pools: tuple[PoolConfig, ...] = ()
    routes: tuple[RouteConfig, ...] = ()
    timeouts: Timeouts = Timeouts()  # the clients' (and every pool's default)
    limits: Limits = Limits()
    # The access log: "" off; "-" lb's log (stderr); else a file, buffered
    # (nginx: access_log PATH buffer=32k flush=1s), reopened on SIGUSR1.
    access_log: str = ""
    access_log_format: str = "combined"  # nginx's combined, or "json"
    # A client's X-Request-ID (visible ASCII, at most 200 bytes) is kept and sent
    # on, so one id follows a request through every tier; off at an edge whose
    # clients must not choose the ids in the logs (Envoy: preserve_external_request_id).
    trust_request_id: bool = True
    # Addresses whose X-Forwarded-For is believed (a rate limit's key "forwarded";
    # nginx: set_real_ip_from): networks like "10.0.0.0/8".
    trusted_proxies: tuple[str, ...] = ()
    source: Path | None = field(default=None, compare=False)

    def pool(self, name: str) -> PoolConfig:
        return next(p for p in self.pools if p.name == name)

    @property
    def all_listeners(self) -> tuple[ListenerConfig, ...]:
        plain = () if self.listen is None else (ListenerConfig("http", self.listen),)
        return plain + self.listeners

    @property
    def main_address(self) -> Address:
        """The first listener's: the Host an HTTP/1.0 request without one gets."""
        return self.all_listeners[0].address

    # The single-pool view: what a file of one pool (and the flags) configure.
    @property
    def servers(self) -> tuple[ServerSpec, ...]:
        return tuple(s for p in self.pools for s in p.servers)

    @property
    def check(self) -> ActiveCheck:
        return self.pools[0].check if self.pools else ActiveCheck()

    @property
    def health(self) -> HealthParams:
        return self.pools[0].health if self.pools else HealthParams()

    @property
    def method(self) -> str:
        return self.pools[0].method if self.pools else PoolConfig().method
