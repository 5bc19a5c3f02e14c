"""dbproxy's configuration: frozen dataclasses built from TOML in one place, then flags on top.

Options mirror what an HAProxy user sets for Postgres (inter, rise, fall,
timeouts, maxconn); the Postgres-aware ones (roles, lag, cancel routing) have
no HAProxy counterpart. infra/balance/dbproxy.toml documents every one.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from proxycore.balancing import SESSION_POLICIES
from proxycore.config import Address, ConfigError, Section, load_toml, parse_address
from proxycore.health import CheckTiming
from proxycore.servers import HealthParams, ServerSpec
from proxycore.workers import count as worker_count

LISTENERS = ("rw", "ro", "any")
DEFAULT_PORTS = {"rw": 6432, "ro": 6433, "any": 6434}
PASSWORD_ENV = "DBPROXY_CHECK_PASSWORD"


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
    ssl: str = "passthrough"  # or "refuse": answer SSLRequest with 'N' ourselves
    # passthrough: how long a server's 'N' to an SSLRequest is given again on its
    # behalf, sparing the client a round trip to a backend still starting (0: never)
    ssl_refusal_memory: float = 1.0
    source: Path | None = field(default=None, compare=False)


def from_section(root: Section, source: Path | None, env: Mapping[str, str]) -> DbProxyConfig:
    d = DbProxyConfig()
    listen_section = root.section("listen")
    listen: dict[str, Address] = {}
    for name in LISTENERS:
        address = listen_section.address(name, d.listen[name])
        if address is not None:
            listen[name] = address
    listen_section.done()
    admin_raw = root.raw("admin")
    if admin_raw is None:
        admin = d.admin
    else:
        admin = None if admin_raw == "off" else parse_address(admin_raw, root.where("admin"))
    method = root.string("method", d.method, SESSION_POLICIES)
    workers = worker_count(root.raw("workers", d.workers), root.where("workers"))
    ssl = root.string("ssl", d.ssl, ("passthrough", "refuse"))
    ssl_refusal_memory = root.duration("ssl_refusal_memory", d.ssl_refusal_memory)
    close_sessions = root.boolean("close_sessions_on_down", d.close_sessions_on_down)
    max_clients = root.integer("max_client_connections", d.max_client_connections, minimum=1)

    c = root.section("check")
    check = CheckSettings(
        user=c.string("user", d.check.user),
        password=env.get(PASSWORD_ENV) or c.string("password", ""),
        database=c.string("database", d.check.database),
        timing=CheckTiming(
            interval=c.duration("interval", d.check.timing.interval),
            timeout=c.duration("timeout", d.check.timing.timeout),
        ),
    )
    if check.timing.interval <= 0 or check.timing.timeout <= 0:
        raise ConfigError(f"{c.where('interval')}: interval and timeout must be above zero")
    rise = c.integer("rise", d.health.rise, minimum=1)
    fall = c.integer("fall", d.health.fall, minimum=1)
    c.done()
    p = root.section("passive")
    health = HealthParams(
        rise=rise,
        fall=fall,
        max_fails=p.integer("max_fails", d.health.max_fails),
        fail_timeout=p.duration("fail_timeout", d.health.fail_timeout),
        panic_threshold=p.integer("panic_threshold", d.health.panic_threshold, maximum=100),
    )
    p.done()
    r = root.section("ro")
    ro = ReadOnlyRouting(
        max_lag_bytes=r.size("max_lag_bytes", d.ro.max_lag_bytes),
        max_lag_seconds=r.duration("max_lag_seconds", d.ro.max_lag_seconds),
        primary_fallback=r.boolean("primary_fallback", d.ro.primary_fallback),
        return_to_replica=r.boolean("return_to_replica", d.ro.return_to_replica),
    )
    r.done()
    t = root.section("timeouts")
    timeouts = t.durations(d.timeouts)
    t.done()
    q = root.section("queue")
    raw_max = q.raw("max_sessions", "auto")
    if raw_max != "auto" and (
        not isinstance(raw_max, int) or isinstance(raw_max, bool) or raw_max < 0
    ):
        raise ConfigError(
            f'{q.where("max_sessions")}: expected "auto" or a whole number, got {raw_max!r}'
        )
    queue = QueueSettings(
        max_sessions_auto=raw_max == "auto",
        max_sessions=0 if raw_max == "auto" else raw_max,
        max_queue=q.integer("max_queue", d.queue.max_queue),
        timeout=q.duration("timeout", d.queue.timeout),
    )
    q.done()

    servers, slots = [], {}
    for s in root.sections("server"):
        address = s.server_address()
        name = s.string("name", str(address))
        servers.append(
            ServerSpec(
                name=name,
                address=address,
                weight=s.integer("weight", 1, minimum=1),
                max_conns=s.integer("max_sessions", queue.max_sessions),
            )
        )
        if s.has("slot"):
            slots[name] = s.string("slot", "")
        s.done()
    root.distinct_names("server", [s.name for s in servers])
    root.done()
    return DbProxyConfig(
        listen=listen,
        admin=admin,
        workers=workers,
        method=method,
        servers=tuple(servers),
        slots=slots,
        check=check,
        health=health,
        ro=ro,
        timeouts=timeouts,
        queue=queue,
        max_client_connections=max_clients,
        close_sessions_on_down=close_sessions,
        ssl=ssl,
        ssl_refusal_memory=ssl_refusal_memory,
        source=source,
    )


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m dbproxy", description="PostgreSQL-aware proxy (see README)."
    )
    p.add_argument("--config", type=Path, help="TOML file (see infra/balance/dbproxy.toml)")
    p.add_argument(
        "--listen",
        action="append",
        default=[],
        metavar="ROLE=HOST:PORT",
        help="a listener: rw, ro or any; repeat; replaces the file's listeners",
    )
    p.add_argument(
        "--server",
        action="append",
        default=[],
        metavar="NAME=HOST:PORT",
        help="a server; repeat; replaces the file's servers (slots are kept by name)",
    )
    p.add_argument(
        "--workers",
        metavar="N|auto",
        help="worker processes under a supervisor (default 1: one process; auto: one per core)",
    )
    p.add_argument("--check-user", help="role the checks log in as")
    p.add_argument("--check-database", help="database the checks connect to")
    p.add_argument(
        "--admin", metavar="HOST:PORT|off", help="admin listener (default 127.0.0.1:9102)"
    )
    p.add_argument(
        "--check-config", action="store_true", help="validate the configuration and exit"
    )
    return p


def from_args(args: argparse.Namespace, env: Mapping[str, str] | None = None) -> DbProxyConfig:
    env = os.environ if env is None else env
    if args.config:
        config = from_section(load_toml(args.config), args.config, env)
    else:
        config = from_section(Section({}, "", "flags"), None, env)
    changes: dict[str, Any] = {}
    if args.listen:
        listen = {}
        for text in args.listen:
            role, sep, address = text.partition("=")
            if not sep or role not in LISTENERS:
                raise ConfigError(
                    f"--listen {text}: expected ROLE=HOST:PORT, ROLE one of {', '.join(LISTENERS)}"
                )
            listen[role] = parse_address(address, f"--listen {text}")
        changes["listen"] = listen
    if args.server:
        servers = []
        for text in args.server:
            name, sep, address = text.partition("=")
            if not sep or not name:
                raise ConfigError(f"--server {text}: expected NAME=HOST:PORT")
            servers.append(
                ServerSpec(name=name, address=parse_address(address, f"--server {text}"))
            )
        changes["servers"] = tuple(servers)
    if args.check_user or args.check_database:
        changes["check"] = dataclasses.replace(
            config.check,
            user=args.check_user or config.check.user,
            database=args.check_database or config.check.database,
        )
    if args.admin:
        changes["admin"] = None if args.admin == "off" else parse_address(args.admin, "--admin")
    if args.workers:
        changes["workers"] = worker_count(args.workers, "--workers")
    config = dataclasses.replace(config, **changes)
    if not config.servers:
        raise ConfigError(
            "no servers: give --server NAME=HOST:PORT or a --config file with [[server]]"
        )
    if not config.listen:
        raise ConfigError("no listeners: give --listen ROLE=HOST:PORT or [listen] in the file")
    return config
