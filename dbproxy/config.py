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
from pathlib import Path
from typing import Any

from proxycore.balancing import SESSION_POLICIES
from proxycore.config import Address, ConfigError, Section, load_toml, parse_address
from proxycore.health import CheckTiming
from proxycore.servers import HealthParams, ServerSpec
from proxycore.tls import TlsSettings, check_files, pairs_from_flags, read_settings, resolve
from proxycore.workers import count as worker_count

from .settings import (
    AUTH_PASSWORD_ENV,
    AUTH_TYPES,
    LISTENERS,
    PASSWORD_ENV,
    POOL_MODES,
    SERVER_SSL_MODES,
    SSL_MODES,
    AuthSettings,
    CheckSettings,
    DbProxyConfig,
    PoolSettings,
    QueueSettings,
    ReadOnlyRouting,
)


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
    ssl = root.string("ssl", d.ssl, SSL_MODES)
    base = source.parent if source is not None else None  # relative paths' directory
    tls = None
    if root.has("tls"):
        t = root.section("tls")
        tls = read_settings(t, base)
        t.done()
    if ssl == "terminate" and tls is None:
        raise ConfigError(f"{root.where('ssl')}: terminate needs a [tls] table with certificates")
    server_ssl = root.string("server_ssl", d.server_ssl, SERVER_SSL_MODES)
    ca_text = root.string("server_ssl_ca", "")
    server_ssl_ca = resolve(ca_text, base) if ca_text else None
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

    pool = _pool(root.section("pool"), d.pool)
    auth = _auth(root.section("auth"), d.auth, source, env)
    if auth.user == check.user and not auth.password:
        # the checks' role asks the auth query too: its one password serves both
        auth = dataclasses.replace(auth, password=check.password)

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
        tls=tls,
        server_ssl=server_ssl,
        server_ssl_ca=server_ssl_ca,
        ssl_refusal_memory=ssl_refusal_memory,
        pool=pool,
        auth=auth,
        source=source,
    )


def _pool(p: Section, d: PoolSettings) -> PoolSettings:
    ignored = p.raw("ignore_startup_parameters", [])
    if not isinstance(ignored, list) or not all(isinstance(x, str) for x in ignored):
        raise ConfigError(f"{p.where('ignore_startup_parameters')}: expected a list of names")
    pool = PoolSettings(
        mode=p.string("mode", d.mode, POOL_MODES),
        size=p.integer("size", d.size, minimum=1),
        min_size=p.integer("min_size", d.min_size),
        idle_timeout=p.duration("idle_timeout", d.idle_timeout),
        lifetime=p.duration("lifetime", d.lifetime),
        wait_timeout=p.duration("wait_timeout", d.wait_timeout),
        reset_query=p.string("reset_query", d.reset_query),
        max_prepared_statements=p.integer("max_prepared_statements", d.max_prepared_statements),
        ignore_startup_parameters=tuple(ignored),
    )
    if pool.min_size > pool.size:
        raise ConfigError(f"{p.where('min_size')}: above size ({pool.size})")
    p.done()
    return pool


def _auth(a: Section, d: AuthSettings, source: Path | None, env: Mapping[str, str]) -> AuthSettings:
    file = a.string("file", "")
    path = None
    if file:
        path = Path(file)
        if not path.is_absolute() and source is not None:
            path = source.parent / path
    auth = AuthSettings(
        type=a.string("type", d.type, AUTH_TYPES),
        file=path,
        query=a.string("query", d.query),
        user=a.string("user", "") or None,
        password=env.get(AUTH_PASSWORD_ENV) or a.string("password", ""),
        dbname=a.string("dbname", "") or None,
        cache=a.duration("cache", d.cache),
    )
    a.done()
    return auth


def check_auth(config: DbProxyConfig, where: str) -> None:
    """A pooled listener that asks for a password must have somewhere to find it."""
    auth = config.auth
    if config.pool.mode == "none" or auth.type == "trust":
        return
    if auth.file is None and auth.user is None:
        raise ConfigError(
            f"{where}: auth type {auth.type} needs [auth] file or [auth] user "
            "(with query) to find a client's secret"
        )
    if auth.file is not None and not auth.file.is_file():
        raise ConfigError(f"{where}: auth file {auth.file} is not a readable file")


def check_server_ssl(config: DbProxyConfig, where: str) -> None:
    if config.server_ssl == "disable":
        return
    if config.ssl == "passthrough" and config.pool.mode == "none":
        raise ConfigError(
            f"{where}: server_ssl needs ssl = terminate or refuse, or a pooled listener: "
            "with passthrough a relayed client's own TLS goes to the server"
        )
    if config.server_ssl_ca is not None and not config.server_ssl_ca.is_file():
        raise ConfigError(f"{where}: server_ssl_ca {config.server_ssl_ca} is not a file")


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
        "--pool-mode",
        choices=POOL_MODES,
        help="none (a server connection per client), session or transaction pooling",
    )
    p.add_argument("--pool-size", type=int, help="server connections per (server, user, database)")
    p.add_argument("--auth-type", choices=AUTH_TYPES, help="how pooled listeners log clients in")
    p.add_argument("--auth-file", type=Path, help='pgbouncer userlist: "user" "secret" lines')
    p.add_argument(
        "--auth-user", help="role the auth query runs as (password: $DBPROXY_AUTH_PASSWORD)"
    )
    p.add_argument("--auth-query", help="SQL giving (user, secret) for $1")
    p.add_argument(
        "--ssl",
        choices=SSL_MODES,
        help="an SSLRequest: passed to the server, refused ('N'), or terminated here",
    )
    p.add_argument(
        "--ssl-cert",
        action="append",
        default=[],
        metavar="PEM",
        help="certificate (and chain) for --ssl terminate; repeat, SNI picks, the first default",
    )
    p.add_argument(
        "--ssl-key", action="append", default=[], metavar="PEM", help="its key, one per --ssl-cert"
    )
    p.add_argument(
        "--server-ssl",
        choices=SERVER_SSL_MODES,
        help="TLS to the servers on dbproxy's own connections (libpq's sslmode)",
    )
    p.add_argument("--server-ssl-ca", type=Path, metavar="PEM", help="CAs for verify-ca/-full")
    p.add_argument(
        "--check-config", action="store_true", help="validate the configuration and exit"
    )
    return p


def _given(args: argparse.Namespace, **fields: str) -> dict[str, Any]:
    """field -> the flag's value, for the flags given (``fields``: field=flag)."""
    return {f: getattr(args, a) for f, a in fields.items() if getattr(args, a)}


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
    if args.pool_mode or args.pool_size:
        if args.pool_size is not None and args.pool_size < 1:
            raise ConfigError("--pool-size: must be at least 1")
        changes["pool"] = dataclasses.replace(
            config.pool,
            mode=args.pool_mode or config.pool.mode,
            size=args.pool_size or config.pool.size,
        )
    auth_changes = _given(
        args, type="auth_type", file="auth_file", user="auth_user", query="auth_query"
    )
    if auth_changes:
        changes["auth"] = dataclasses.replace(config.auth, **auth_changes)
    changes.update(_given(args, ssl="ssl", server_ssl="server_ssl", server_ssl_ca="server_ssl_ca"))
    if args.ssl_cert or args.ssl_key:
        pairs = pairs_from_flags(args.ssl_cert, args.ssl_key, "--ssl-key")
        base = config.tls or TlsSettings(certificates=())
        changes["tls"] = dataclasses.replace(base, certificates=pairs)
    config = dataclasses.replace(config, **changes)
    check_auth(config, str(args.config) if args.config else "flags")
    check_server_ssl(config, str(args.config) if args.config else "flags")
    if config.ssl == "terminate":
        if config.tls is None:
            raise ConfigError("--ssl terminate needs --ssl-cert PEM --ssl-key PEM (or [tls])")
        check_files(config.tls, "[tls]")
    if not config.servers:
        raise ConfigError(
            "no servers: give --server NAME=HOST:PORT or a --config file with [[server]]"
        )
    if not config.listen:
        raise ConfigError("no listeners: give --listen ROLE=HOST:PORT or [listen] in the file")
    return config
