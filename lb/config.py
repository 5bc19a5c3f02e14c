"""lb's configuration, read in one place: the TOML file (lb/settings.py's frozen
dataclasses), then the flags over it.

A file of one pool keeps the shape it always had: top-level [[server]] tables
and sections, one pool (named "http") and a catch-all route. A file of several
names them: [[pool]] tables with their [[pool.server]]s and [[route]] tables.
Either way the top-level sections ([health], [passive], [timeouts], [queue],
[retry_budget], [upstream_keepalive]) and keys (method, tries, hedge_after) are
the defaults of every pool, which a [[pool]] overrides key by key. Errors name
the file, the line of the table and the key.
"""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
from pathlib import Path
from typing import Any

from proxycore.balancing import POLICIES
from proxycore.config import ConfigError, Section, load_toml, parse_address
from proxycore.health import CheckTiming
from proxycore.servers import HealthParams, ServerSpec
from proxycore.tls import VERSIONS, resolve
from proxycore.workers import count as worker_count

from .listenerconfig import check_listeners, read_listeners, tls_flags
from .routeconfig import read_route
from .settings import (
    UPSTREAM_TIMEOUTS,
    ActiveCheck,
    LbConfig,
    Limits,
    ListenerConfig,
    PoolConfig,
    QueueSettings,
    RetryBudgetSettings,
    RouteConfig,
    Timeouts,
    UpstreamKeepalive,
    UpstreamTls,
)

# The name of the pool a file of one pool makes (and what the flags configure).
DEFAULT_POOL = "http"
ACCESS_LOG_FORMATS = ("combined", "json")


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


def _check(h: Section, d: ActiveCheck) -> ActiveCheck:
    if h.has("expect_status"):
        lo, hi = _status_range(h.string("expect_status", ""), h.where("expect_status"))
    else:
        lo, hi = d.expect_low, d.expect_high
    path = h.string("path", d.path)
    if not path.startswith("/"):
        raise ConfigError(f"{h.where('path')}: must start with '/'")
    check = ActiveCheck(
        enabled=h.boolean("enabled", d.enabled),
        path=path,
        host=h.string("host", d.host),
        timing=CheckTiming(
            interval=h.duration("interval", d.timing.interval),
            timeout=h.duration("timeout", d.timing.timeout),
        ),
        expect_low=lo,
        expect_high=hi,
    )
    if check.timing.interval <= 0 or check.timing.timeout <= 0:
        raise ConfigError(f"{h.where('interval')}: interval and timeout must be above zero")
    return check


def _upstream_tls(s: Section, d: UpstreamTls | None, base: Path | None) -> UpstreamTls | None:
    # the table's presence turns it on (enabled = false turns a default off)
    present = s.has("upstream_tls")
    t = s.section("upstream_tls")
    default = d or UpstreamTls()
    enabled = t.boolean("enabled", d is not None or present)
    ca_file = t.string("ca_file", "")
    tls = UpstreamTls(
        verify=t.boolean("verify", default.verify),
        ca_file=resolve(ca_file, base) if ca_file else default.ca_file,
        server_name=t.string("server_name", default.server_name),
        min_version=t.string("min_version", default.min_version, tuple(VERSIONS)),
    )
    t.done()
    if tls.ca_file is not None and not tls.ca_file.is_file():
        raise ConfigError(f"{t.where('ca_file')}: no such file: {tls.ca_file}")
    return tls if enabled else None


def _pool(
    s: Section, d: PoolConfig, timeouts: Timeouts | None = None, base: Path | None = None
) -> PoolConfig:
    """A pool's settings read from ``s`` (the file's top level, or a [[pool]]),
    each defaulting to ``d``'s; ``timeouts``: the top level's, read already."""
    method = s.string("method", d.method, POLICIES)
    tries = s.integer("tries", d.tries, minimum=1, maximum=100)
    hedge_raw = s.raw("hedge_after")
    hedge_after = 0.0 if hedge_raw == "off" else s.duration("hedge_after", d.hedge_after)
    hedge_percentile = s.integer("hedge_percentile", d.hedge_percentile, maximum=99)
    hedge_min_wins = s.integer("hedge_min_wins", d.hedge_min_wins, maximum=100)
    h = s.section("health")
    check = _check(h, d.check)
    rise = h.integer("rise", d.health.rise, minimum=1)
    fall = h.integer("fall", d.health.fall, minimum=1)
    h.done()
    p = s.section("passive")
    statuses = p.raw("statuses", sorted(d.passive_statuses))
    if not isinstance(statuses, list) or not all(
        isinstance(x, int) and 500 <= x <= 599 for x in statuses
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
    if timeouts is None:
        t = s.section("timeouts")
        timeouts = dataclasses.replace(
            d.timeouts, **{k: t.duration(k, getattr(d.timeouts, k)) for k in UPSTREAM_TIMEOUTS}
        )
        t.done()
    b = s.section("retry_budget")
    budget = RetryBudgetSettings(
        percent=b.integer("percent", d.retry_budget.percent, maximum=100),
        min_concurrency=b.integer("min_concurrency", d.retry_budget.min_concurrency, minimum=0),
        window_percent=b.integer("window_percent", d.retry_budget.window_percent, maximum=100),
        min_per_second=b.number("min_per_second", d.retry_budget.min_per_second),
        window=b.duration("window", d.retry_budget.window),
    )
    if budget.window <= 0:
        raise ConfigError(f"{b.where('window')}: must be above zero")
    b.done()
    q = s.section("queue")
    queue = QueueSettings(
        max_conns=q.integer("max_conns", d.queue.max_conns),
        max_connecting=q.integer("max_connecting", d.queue.max_connecting, minimum=1),
        max_queue=q.integer("max_queue", d.queue.max_queue),
        timeout=q.duration("timeout", d.queue.timeout),
    )
    q.done()
    k = s.section("upstream_keepalive")
    keepalive = UpstreamKeepalive(
        max_idle=k.integer("max_idle", d.keepalive.max_idle),
        idle_timeout=k.duration("idle_timeout", d.keepalive.idle_timeout),
    )
    k.done()
    return dataclasses.replace(
        d,
        tls=_upstream_tls(s, d.tls, base),
        method=method,
        tries=tries,
        hedge_after=hedge_after,
        hedge_percentile=hedge_percentile,
        hedge_min_wins=hedge_min_wins,
        retry_budget=budget,
        queue=queue,
        check=check,
        health=health,
        passive_statuses=frozenset(statuses),
        timeouts=timeouts,
        keepalive=keepalive,
    )


def _servers(s: Section, max_conns: int) -> tuple[ServerSpec, ...]:
    servers = []
    for t in s.sections("server"):
        address = t.server_address()
        servers.append(
            ServerSpec(
                name=t.string("name", str(address)),
                address=address,
                weight=t.integer("weight", 1, minimum=1, maximum=1000),
                backup=t.boolean("backup", False),
                max_conns=t.integer("max_conns", max_conns),
            )
        )
        t.done()
    s.distinct_names("server", [x.name for x in servers])
    return tuple(servers)


def from_section(root: Section, source: Path | None) -> LbConfig:
    d = LbConfig()
    listen = None if root.raw("listen") == "off" else root.address("listen", d.listen)
    base = source.parent if source is not None else None
    listeners = read_listeners(root, base)
    admin_raw = root.raw("admin")
    if admin_raw is None:
        admin = d.admin
    else:
        admin = None if admin_raw == "off" else parse_address(admin_raw, root.where("admin"))
    workers = worker_count(root.raw("workers", d.workers), root.where("workers"))
    access_log = root.raw("access_log", "")
    if access_log is True:
        access_log = "-"  # (a file of before: `access_log = true`, to lb's log)
    elif access_log is False:
        access_log = ""
    elif not isinstance(access_log, str):
        raise ConfigError(f"{root.where('access_log')}: expected a path, '-' or false")
    access_log_format = root.string("access_log_format", d.access_log_format, ACCESS_LOG_FORMATS)
    trust_request_id = root.boolean("trust_request_id", d.trust_request_id)
    trusted = root.raw("trusted_proxies", [])
    if not isinstance(trusted, list) or not all(isinstance(x, str) for x in trusted):
        raise ConfigError(f"{root.where('trusted_proxies')}: expected a list of networks")
    for network in trusted:
        try:
            ipaddress.ip_network(network, strict=False)
        except ValueError:
            raise ConfigError(
                f"{root.where('trusted_proxies')}: not a network like '10.0.0.0/8': {network!r}"
            ) from None

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

    defaults = _pool(root, PoolConfig(timeouts=timeouts), timeouts, base)
    pools = []
    top_servers = _servers(root, defaults.queue.max_conns)
    pool_sections = root.sections("pool")
    if top_servers and pool_sections:
        raise ConfigError(
            f"{root.where('server')}: top-level [[server]] tables beside [[pool]] tables: "
            "put the servers in a [[pool]] ([[pool.server]])"
        )
    if top_servers:
        pools.append(dataclasses.replace(defaults, name=DEFAULT_POOL, servers=top_servers))
    for s in pool_sections:
        if not s.has("name"):
            raise ConfigError(f"{s.where('name')}: every [[pool]] needs a name")
        pool = _pool(s, dataclasses.replace(defaults, name=s.string("name", "")), None, base)
        pools.append(dataclasses.replace(pool, servers=_servers(s, pool.queue.max_conns)))
        if not pool.name or "/" in pool.name:
            raise ConfigError(f"{s.where('name')}: a pool's name is a word, got {pool.name!r}")
        s.done()
    root.distinct_names("pool", [p.name for p in pools])
    names = [p.name for p in pools]
    routes = [read_route(s, i, names) for i, s in enumerate(root.sections("route"))]
    root.distinct_names("route", [r.name for r in routes])
    if not routes and len(pools) > 1:
        raise ConfigError(f"{root.where('route')}: several pools need [[route]] tables")
    if not routes and pools:
        routes = [RouteConfig(name="default", pool=pools[0].name)]
    root.done()
    config = LbConfig(
        listen=listen,
        listeners=listeners,
        admin=admin,
        workers=workers,
        pools=tuple(pools),
        routes=tuple(routes),
        timeouts=timeouts,
        limits=limits,
        access_log=access_log,
        access_log_format=access_log_format,
        trust_request_id=trust_request_id,
        trusted_proxies=tuple(trusted),
        source=source,
    )
    check_listeners(config, root.where("listener"))
    return config


def load(path: Path) -> LbConfig:
    config = from_section(load_toml(path), path)
    if not any(p.servers for p in config.pools):
        raise ConfigError(f"{path}: no [[server]] given")
    return config


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m lb", description="HTTP load balancer (see README).")
    p.add_argument("--config", type=Path, help="TOML file (see infra/balance/lb.toml)")
    p.add_argument(
        "--listen", metavar="HOST:PORT|off", help="plain HTTP listener (default 127.0.0.1:8080)"
    )
    p.add_argument("--tls-listen", metavar="HOST:PORT", help="an HTTPS listener (named https)")
    p.add_argument(
        "--tls-cert",
        action="append",
        default=[],
        metavar="PEM",
        help="certificate (and chain) of --tls-listen; repeat, SNI picks; the first is the default",
    )
    p.add_argument(
        "--tls-key", action="append", default=[], metavar="PEM", help="its key, one per --tls-cert"
    )
    p.add_argument(
        "--redirect-https",
        action="store_true",
        help="answer the plain listener's requests 308 to the HTTPS listener",
    )
    p.add_argument(
        "--server",
        action="append",
        default=[],
        metavar="[NAME=]HOST:PORT",
        help="an upstream; repeat for each; replaces the servers of a file of one pool",
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
        "--access-log",
        nargs="?",
        const="-",
        default=None,
        metavar="PATH",
        help="a line per request: to PATH, or to lb's log when no PATH is given",
    )
    p.add_argument(
        "--check-config", action="store_true", help="validate the configuration and exit"
    )
    return p


def from_args(args: argparse.Namespace) -> LbConfig:
    """The file (if any), then the flags over it. The flags that name servers and
    their checks are for a file of one pool (or none)."""
    config = load(args.config) if args.config else LbConfig()
    changes: dict[str, Any] = {}
    if args.listen:
        changes["listen"] = None if args.listen == "off" else parse_address(args.listen, "--listen")
    if args.tls_listen or args.tls_cert or args.tls_key:
        changes["listeners"] = tls_flags(args, config)
    if args.redirect_https:
        plain = changes.get("listen", config.listen)
        if plain is None:
            raise ConfigError("--redirect-https: no plain listener (--listen) to redirect")
        changes["listen"] = None
        changes["listeners"] = (
            ListenerConfig("http", plain, redirect_https=True),
            *changes.get("listeners", config.listeners),
        )
    if args.admin:
        changes["admin"] = None if args.admin == "off" else parse_address(args.admin, "--admin")
    if args.workers:
        changes["workers"] = worker_count(args.workers, "--workers")
    if args.access_log:
        changes["access_log"] = args.access_log
    pool_changes: dict[str, Any] = {}
    pool = config.pools[0] if config.pools else PoolConfig(timeouts=config.timeouts)
    if args.server:
        max_conns = pool.queue.max_conns
        pool_changes["servers"] = tuple(_server_flag(text, max_conns) for text in args.server)
    if args.health_path:
        if not args.health_path.startswith("/"):
            raise ConfigError("--health-path: must start with '/'")
        pool_changes["check"] = dataclasses.replace(pool.check, path=args.health_path)
    if args.method:
        pool_changes["method"] = args.method
    if pool_changes:
        if len(config.pools) > 1:
            raise ConfigError(
                "--server, --health-path and --method are for a file of one pool; "
                f"{config.source} has {len(config.pools)}"
            )
        changes["pools"] = (dataclasses.replace(pool, **pool_changes),)
        if not config.routes:
            changes["routes"] = (RouteConfig(name="default", pool=pool.name),)
    config = dataclasses.replace(config, **changes)
    check_listeners(config, "the flags")
    if not any(p.servers for p in config.pools):
        raise ConfigError("no servers: give --server HOST:PORT or a --config file with [[server]]")
    return config


def _server_flag(text: str, max_conns: int) -> ServerSpec:
    name, sep, address = text.rpartition("=")
    addr = parse_address(address, f"--server {text}")
    return ServerSpec(name=name if sep else str(addr), address=addr, max_conns=max_conns)
