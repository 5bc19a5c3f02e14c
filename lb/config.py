"""lb's configuration: frozen dataclasses built from TOML in one place, then flags on top.

Every option has an nginx or HAProxy counterpart with the same default meaning;
infra/balance/lb.toml lists them all with that counterpart beside each.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from proxycore.balancing import POLICIES
from proxycore.config import Address, ConfigError, Section, load_toml, parse_address
from proxycore.health import CheckTiming
from proxycore.servers import HealthParams, ServerSpec
from proxycore.workers import count as worker_count


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
    """Envoy's retry_budget: the extra attempts that may add load to a live
    server (hedges, retries after a timeout or a configured status) in flight
    at once are at most ``percent`` of the requests in flight, or
    ``min_concurrency``, whichever is more."""

    percent: int = 20  # budget_percent
    min_concurrency: int = 3  # min_retry_concurrency


@dataclass(frozen=True, slots=True)
class LbConfig:
    listen: Address = Address("127.0.0.1", 8080)
    admin: Address | None = Address("127.0.0.1", 9101)
    # Worker processes (nginx: worker_processes); 1: one process, no supervisor.
    # "auto" in the file or on the command line is one per core.
    workers: int = 1
    method: str = "round_robin"
    tries: int = 3  # proxy_next_upstream_tries / HAProxy retries + 1
    # No response byte within this: an idempotent request goes to another server
    # too, the first answer wins (Envoy: per_try_timeout with hedge_on_per_try_timeout);
    # 0: never
    hedge_after: float = 0.3
    retry_budget: RetryBudgetSettings = RetryBudgetSettings()
    queue: QueueSettings = QueueSettings()
    servers: tuple[ServerSpec, ...] = ()
    check: ActiveCheck = ActiveCheck()
    health: HealthParams = HealthParams()
    passive_statuses: frozenset[int] = frozenset()  # proxy_next_upstream http_502 ...
    timeouts: Timeouts = Timeouts()
    limits: Limits = Limits()
    keepalive: UpstreamKeepalive = UpstreamKeepalive()
    access_log: bool = False
    # A client's X-Request-ID (visible ASCII, at most 200 bytes) is kept and sent
    # on, so one id follows a request through every tier; off at an edge whose
    # clients must not choose the ids in the logs (Envoy: preserve_external_request_id).
    trust_request_id: bool = True
    source: Path | None = field(default=None, compare=False)


def _status_range(text: str, where: str) -> tuple[int, int]:
    low, sep, high = text.partition("-")
    try:
        lo, hi = int(low), int(high if sep else low)
    except ValueError:
        raise ConfigError(
            f"{where}: expected a status or range like '200-399', got {text!r}"
        ) from None
    if not 100 <= lo <= hi <= 599:
        raise ConfigError(f"{where}: statuses must be within 100-599, got {text!r}")
    return lo, hi


def from_section(root: Section, source: Path | None) -> LbConfig:
    d = LbConfig()
    listen = root.address("listen", d.listen)
    admin_raw = root.raw("admin")
    if admin_raw is None:
        admin = d.admin
    else:
        admin = None if admin_raw == "off" else parse_address(admin_raw, root.where("admin"))
    method = root.string("method", d.method, POLICIES)
    workers = worker_count(root.raw("workers", d.workers), root.where("workers"))
    tries = root.integer("tries", d.tries, minimum=1, maximum=100)
    hedge_raw = root.raw("hedge_after")
    hedge_after = 0.0 if hedge_raw == "off" else root.duration("hedge_after", d.hedge_after)
    access_log = root.boolean("access_log", d.access_log)
    trust_request_id = root.boolean("trust_request_id", d.trust_request_id)

    h = root.section("health")
    lo, hi = _status_range(h.string("expect_status", "200-399"), h.where("expect_status"))
    path = h.string("path", d.check.path)
    if not path.startswith("/"):
        raise ConfigError(f"{h.where('path')}: must start with '/'")
    check = ActiveCheck(
        enabled=h.boolean("enabled", True),
        path=path,
        host=h.string("host", d.check.host),
        timing=CheckTiming(
            interval=h.duration("interval", d.check.timing.interval),
            timeout=h.duration("timeout", d.check.timing.timeout),
        ),
        expect_low=lo,
        expect_high=hi,
    )
    if check.timing.interval <= 0 or check.timing.timeout <= 0:
        raise ConfigError(f"{h.where('interval')}: interval and timeout must be above zero")
    rise = h.integer("rise", d.health.rise, minimum=1)
    fall = h.integer("fall", d.health.fall, minimum=1)
    h.done()

    p = root.section("passive")
    statuses = p.raw("statuses", [])
    if not isinstance(statuses, list) or not all(
        isinstance(s, int) and 500 <= s <= 599 for s in statuses
    ):
        raise ConfigError(
            f"{p.where('statuses')}: expected a list of 5xx statuses, e.g. [502, 503, 504]"
        )
    health = HealthParams(
        rise=rise,
        fall=fall,
        max_fails=p.integer("max_fails", d.health.max_fails),
        fail_timeout=p.duration("fail_timeout", d.health.fail_timeout),
        checks_enabled=check.enabled,
        panic_threshold=p.integer("panic_threshold", d.health.panic_threshold, maximum=100),
    )
    p.done()

    t = root.section("timeouts")
    timeouts = t.durations(d.timeouts)
    t.done()
    lim = root.section("limits")
    limits = Limits(
        max_header_bytes=lim.size("max_header_bytes", d.limits.max_header_bytes),
        max_headers=lim.integer("max_headers", d.limits.max_headers, minimum=1),
        max_body_bytes=lim.size("max_body_bytes", d.limits.max_body_bytes),
        max_client_connections=lim.integer(
            "max_client_connections", d.limits.max_client_connections, minimum=1
        ),
        retry_body_buffer=lim.size("retry_body_buffer", d.limits.retry_body_buffer),
    )
    if limits.max_header_bytes < 1024:
        raise ConfigError(f"{lim.where('max_header_bytes')}: must be at least 1k")
    lim.done()
    b = root.section("retry_budget")
    budget = RetryBudgetSettings(
        percent=b.integer("percent", d.retry_budget.percent, maximum=100),
        min_concurrency=b.integer("min_concurrency", d.retry_budget.min_concurrency, minimum=0),
    )
    b.done()
    q = root.section("queue")
    queue = QueueSettings(
        max_conns=q.integer("max_conns", d.queue.max_conns),
        max_connecting=q.integer("max_connecting", d.queue.max_connecting, minimum=1),
        max_queue=q.integer("max_queue", d.queue.max_queue),
        timeout=q.duration("timeout", d.queue.timeout),
    )
    q.done()
    k = root.section("upstream_keepalive")
    keepalive = UpstreamKeepalive(
        max_idle=k.integer("max_idle", d.keepalive.max_idle),
        idle_timeout=k.duration("idle_timeout", d.keepalive.idle_timeout),
    )
    k.done()

    servers = []
    for s in root.sections("server"):
        address = s.server_address()
        servers.append(
            ServerSpec(
                name=s.string("name", str(address)),
                address=address,
                weight=s.integer("weight", 1, minimum=1, maximum=1000),
                backup=s.boolean("backup", False),
                max_conns=s.integer("max_conns", queue.max_conns),
            )
        )
        s.done()
    root.distinct_names("server", [s.name for s in servers])
    root.done()
    return LbConfig(
        listen=listen,
        admin=admin,
        workers=workers,
        method=method,
        tries=tries,
        hedge_after=hedge_after,
        retry_budget=budget,
        queue=queue,
        servers=tuple(servers),
        check=check,
        health=health,
        passive_statuses=frozenset(statuses),
        timeouts=timeouts,
        limits=limits,
        keepalive=keepalive,
        access_log=access_log,
        trust_request_id=trust_request_id,
        source=source,
    )


def load(path: Path) -> LbConfig:
    config = from_section(load_toml(path), path)
    if not config.servers:
        raise ConfigError(f"{path}: no [[server]] given")
    return config


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m lb", description="HTTP load balancer (see README).")
    p.add_argument("--config", type=Path, help="TOML file (see infra/balance/lb.toml)")
    p.add_argument("--listen", metavar="HOST:PORT", help="public listener (default 127.0.0.1:8080)")
    p.add_argument(
        "--server",
        action="append",
        default=[],
        metavar="[NAME=]HOST:PORT",
        help="an upstream; repeat for each; replaces the file's servers",
    )
    p.add_argument(
        "--admin", metavar="HOST:PORT|off", help="admin listener (default 127.0.0.1:9101)"
    )
    p.add_argument(
        "--health-path", metavar="PATH", help="path of the active check (default /health)"
    )
    p.add_argument("--method", choices=POLICIES, help="balancing method")
    p.add_argument(
        "--workers",
        metavar="N|auto",
        help="worker processes under a supervisor (default 1: one process; auto: one per core)",
    )
    p.add_argument(
        "--access-log", action="store_true", default=None, help="one log line per request"
    )
    p.add_argument(
        "--check-config", action="store_true", help="validate the configuration and exit"
    )
    return p


def from_args(args: argparse.Namespace) -> LbConfig:
    """The file (if any), then the flags over it."""
    config = load(args.config) if args.config else LbConfig()
    changes: dict[str, Any] = {}
    if args.listen:
        changes["listen"] = parse_address(args.listen, "--listen")
    if args.admin:
        changes["admin"] = None if args.admin == "off" else parse_address(args.admin, "--admin")
    if args.server:
        changes["servers"] = tuple(
            _server_flag(text, config.queue.max_conns) for text in args.server
        )
    if args.health_path:
        if not args.health_path.startswith("/"):
            raise ConfigError("--health-path: must start with '/'")
        changes["check"] = dataclasses.replace(config.check, path=args.health_path)
    if args.method:
        changes["method"] = args.method
    if args.workers:
        changes["workers"] = worker_count(args.workers, "--workers")
    if args.access_log:
        changes["access_log"] = True
    config = dataclasses.replace(config, **changes)
    if not config.servers:
        raise ConfigError("no servers: give --server HOST:PORT or a --config file with [[server]]")
    return config


def _server_flag(text: str, max_conns: int) -> ServerSpec:
    name, sep, address = text.rpartition("=")
    addr = parse_address(address, f"--server {text}")
    return ServerSpec(name=name if sep else str(addr), address=addr, max_conns=max_conns)
