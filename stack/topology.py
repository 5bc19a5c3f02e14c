"""What the stack is made of: ports, credentials, and how each service is started."""

from __future__ import annotations

import dataclasses
import os
import signal
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Literal

from . import classic, metrics, pki
from .errors import StackError
from .postgres import REPO_ROOT, find_bindir, remove_stale_lock, run_as, server_argv

PROFILES = ("none", "python", "classic")
Profile = Literal["none", "python", "classic"]

MASTER = "service-db"
REPLICA = "service-db-replica"
BACKENDS = ("users-backend-1", "users-backend-2")
# The second service behind the entry proxy (/hello/), its own pool.
HELLO = ("hello-1", "hello-2")
LB = "lb"
DBPROXY = "dbproxy"
NGINX = "nginx"
HAPROXY = "haproxy"
NGINX_EXPORTER = "nginx-exporter"
PROMETHEUS = "prometheus"
# Per profile: (database proxies, HTTP proxies). They take the same ports either way.
PROXIES: Mapping[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "none": ((), ()),
    "python": ((DBPROXY,), (LB,)),
    "classic": ((HAPROXY,), (NGINX,)),
}
BALANCE_CONFIG = REPO_ROOT / "infra" / "balance"
# The names the stack's certificate is good for: the local addresses and the
# compose service names and aliases of the entry and database proxies.
TLS_NAMES = ["localhost", "127.0.0.1", LB, "http-proxy", NGINX, DBPROXY, "pgproxy"]


@dataclass(frozen=True, slots=True)
class Ports:
    """Every port of the stack; CLI keys are the field names with '-' for '_'.

    All below Linux's ephemeral range (32768-60999): a port in it can be held by
    an outgoing connection's TIME_WAIT after a load test, and then `up` cannot
    bind it (seen with the clusters' old 54320/54321 after a 4,096-client run).
    """

    entry: int = 8080
    entry_tls: int = 8443  # https at the entry proxy (the stack's own CA, stack/pki.py)
    backend_1: int = 8081
    backend_2: int = 8082
    hello_1: int = 8083
    hello_2: int = 8084
    master: int = 15432
    replica: int = 15433
    db_rw: int = 6432
    db_ro: int = 6433
    db_any: int = 6434
    lb_admin: int = 9101
    dbproxy_admin: int = 9102
    prometheus: int = 9090
    nginx_exporter: int = 9113

    @classmethod
    def names(cls) -> list[str]:
        return [f.name.replace("_", "-") for f in dataclasses.fields(cls)]

    def with_overrides(self, overrides: Mapping[str, int]) -> Ports:
        unknown = sorted(set(overrides) - set(self.names()))
        if unknown:
            raise StackError(
                f"unknown port name(s): {', '.join(unknown)}; known: {', '.join(self.names())}"
            )
        for key, port in overrides.items():
            if not 1 <= port <= 65535:
                raise StackError(f"port {key}={port} is out of range 1-65535")
        return dataclasses.replace(self, **{k.replace("-", "_"): v for k, v in overrides.items()})

    def backend(self, index: int) -> int:
        return (self.backend_1, self.backend_2)[index]


@dataclass(frozen=True, slots=True)
class Credentials:
    """Passwords of the local stack's roles (see infra/postgres/roles.sql).

    Development defaults, overridable from the environment; they are written to
    the state file (mode 0600) so `stack start` can restart a service alone.
    """

    app_password: str = field(default="users_app", repr=False)
    check_password: str = field(default="balance_check", repr=False)
    replication_password: str = field(default="replicator", repr=False)
    token_secret: str = field(default="local-stack-token-secret", repr=False)

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Credentials:
        d = cls()
        return cls(
            app_password=env.get("BALANCE_APP_PASSWORD", d.app_password),
            check_password=env.get("BALANCE_CHECK_PASSWORD", d.check_password),
            replication_password=env.get("BALANCE_REPLICATION_PASSWORD", d.replication_password),
            token_secret=env.get("BALANCE_TOKEN_SECRET", d.token_secret),
        )


@dataclass(frozen=True, slots=True)
class Readiness:
    kind: Literal["postgres", "http"]
    port: int
    path: str = "/health"
    # postgres: who logs in (None: the superuser, trusted on loopback); a pooled
    # dbproxy logs its clients in itself, and knows no password of the superuser
    login: tuple[str, str, str] | None = field(default=None, repr=False)  # user, password, db


@dataclass(frozen=True, slots=True)
class ServiceSpec:
    name: str
    argv: tuple[str, ...]
    env: Mapping[str, str]
    listens: tuple[int, ...]
    # all must answer: a proxy in workers serves its listener before its
    # supervisor's admin API is up, and a caller of `stack up` may use either
    ready: tuple[Readiness, ...]
    log: Path
    address: str
    user: str | None = None
    stop_signal: int = signal.SIGTERM
    before_start: Callable[[], None] | None = None


@dataclass(frozen=True, slots=True)
class Topology:
    state_dir: Path
    pg_root: Path
    ports: Ports = Ports()
    proxies: Profile = "none"
    users: int = 100_000
    seed: int = 1
    credentials: Credentials = Credentials()

    @property
    def log_dir(self) -> Path:
        return self.state_dir / "logs"

    def datadir(self, name: str) -> Path:
        return self.pg_root / name

    def tiers(self) -> list[tuple[str, ...]]:
        """The services in start order, by tier: each tier needs the ones before it."""
        db_proxies, http_proxies = PROXIES[self.proxies]
        exporters = (NGINX_EXPORTER,) if NGINX in http_proxies else ()
        # the second service only where an entry proxy routes to it
        backends = (*BACKENDS, *HELLO) if http_proxies else BACKENDS
        tiers = [(MASTER, REPLICA), db_proxies, backends, http_proxies, exporters, (PROMETHEUS,)]
        return [t for t in tiers if t]

    def services(self) -> list[str]:
        """Every service, in start order."""
        return [name for tier in self.tiers() for name in tier]

    def backend_dsns(self) -> tuple[str, str]:
        """(rw, ro) for the backends: the database proxy's listeners, or the clusters themselves."""
        if self.proxies == "none":
            rw_port, ro_port = self.ports.master, self.ports.replica
        else:
            rw_port, ro_port = self.ports.db_rw, self.ports.db_ro
        base = "postgresql://users_app@127.0.0.1:{}/users"
        if self.proxies == "python":
            base += "?sslmode=require"  # dbproxy terminates TLS (ssl = "terminate")
        return base.format(rw_port), base.format(ro_port)

    def local_addresses(self) -> dict[str, str]:
        """Each compose address of infra/balance's files, and where it is on this machine."""
        return {
            address: f"127.0.0.1:{getattr(self.ports, field)}"
            for field, address in classic.COMPOSE_ADDRESSES.items()
        }

    def _render_config(self, source: Path, target: Path) -> None:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(classic.render(source, self.local_addresses()))

    @property
    def tls_dir(self) -> Path:
        """The stack's CA (ca.pem: what a client trusts) and its certificate."""
        return self.state_dir / "tls"

    def certificate(self) -> pki.Issued:
        """The entry's and dbproxy's certificate, made with the CA at the first `up`."""
        site = pki.Issued(self.tls_dir / "site.pem", self.tls_dir / "site.key")
        if not (site.cert.exists() and site.key.exists()):
            site = pki.authority(self.tls_dir).issue(self.tls_dir, "site", TLS_NAMES)
        return site

    def _with_tls(self, then: Callable[[], None] | None = None, link: Path | None = None) -> None:
        """Before a TLS proxy starts: the certificate made; ``link``: a tls/ beside
        a rendered config that names its files relative to itself (nginx's)."""
        self.certificate()
        if link is not None:
            link.parent.mkdir(parents=True, exist_ok=True)
            if not link.is_symlink():
                link.symlink_to(self.tls_dir, target_is_directory=True)
        if then is not None:
            then()

    def spec(self, name: str) -> ServiceSpec:
        log = self.log_dir / f"{name}.log"
        if name in (MASTER, REPLICA):
            port = self.ports.master if name == MASTER else self.ports.replica
            return ServiceSpec(
                name=name,
                argv=tuple(server_argv(find_bindir(), self.datadir(name))),
                env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C"},
                listens=(port,),
                ready=(Readiness("postgres", port),),
                log=log,
                address=f"127.0.0.1:{port}",
                user=run_as(),
                stop_signal=signal.SIGINT,  # Postgres' "fast" shutdown
                before_start=partial(remove_stale_lock, self.datadir(name)),
            )
        if name in BACKENDS:
            index = BACKENDS.index(name)
            port = self.ports.backend(index)
            rw, ro = self.backend_dsns()
            env = dict(os.environ)
            env.update(
                USERS_DB_PASSWORD=self.credentials.app_password,
                USERS_TOKEN_SECRET=self.credentials.token_secret,
                PYTHONUNBUFFERED="1",
            )
            argv = (
                sys.executable,
                "-m",
                "users_backend",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--instance",
                name,
                "--rw-dsn",
                rw,
                "--ro-dsn",
                ro,
            )
            return ServiceSpec(
                name=name,
                argv=argv,
                env=env,
                listens=(port,),
                ready=(Readiness("http", port),),
                log=log,
                address=f"127.0.0.1:{port}",
            )
        if name in HELLO:
            port = (self.ports.hello_1, self.ports.hello_2)[HELLO.index(name)]
            argv = (sys.executable, "-m", "hello_backend", "--port", str(port), "--instance", name)
            return ServiceSpec(
                name=name,
                argv=argv,
                env=dict(os.environ, PYTHONUNBUFFERED="1"),
                listens=(port,),
                ready=(Readiness("http", port),),
                log=log,
                address=f"127.0.0.1:{port}",
            )
        if name == LB and name in self.services():
            conf = self.state_dir / LB / "lb.toml"
            argv = (sys.executable, "-m", "lb", "--config", str(conf))
            render = partial(self._render_config, BALANCE_CONFIG / "lb.toml", conf)
            return ServiceSpec(
                name=name,
                argv=argv,
                env=dict(os.environ),
                listens=(self.ports.entry, self.ports.entry_tls, self.ports.lb_admin),
                ready=(
                    Readiness("http", self.ports.entry),
                    Readiness("http", self.ports.lb_admin, "/status"),
                ),
                log=log,
                address=(
                    f"127.0.0.1:{self.ports.entry}, https :{self.ports.entry_tls} "
                    f"(admin :{self.ports.lb_admin})"
                ),
                before_start=partial(self._with_tls, render, conf.parent / "tls"),
            )
        if name == DBPROXY and name in self.services():
            p = self.ports
            argv = (
                sys.executable,
                "-m",
                "dbproxy",
                "--config",
                str(BALANCE_CONFIG / "dbproxy.toml"),
                "--listen",
                f"rw=127.0.0.1:{p.db_rw}",
                "--listen",
                f"ro=127.0.0.1:{p.db_ro}",
                "--listen",
                f"any=127.0.0.1:{p.db_any}",
                "--server",
                f"{MASTER}=127.0.0.1:{p.master}",
                "--server",
                f"{REPLICA}=127.0.0.1:{p.replica}",
                "--admin",
                f"127.0.0.1:{p.dbproxy_admin}",
                *("--ssl", "terminate"),
                *("--ssl-cert", str(self.tls_dir / "site.pem")),
                *("--ssl-key", str(self.tls_dir / "site.key")),
            )
            env = dict(os.environ, DBPROXY_CHECK_PASSWORD=self.credentials.check_password)
            return ServiceSpec(
                name=name,
                argv=argv,
                env=env,
                listens=(p.db_rw, p.db_ro, p.db_any, p.dbproxy_admin),
                ready=(
                    Readiness(
                        "postgres",
                        p.db_rw,
                        login=("users_app", self.credentials.app_password, "users"),
                    ),
                    Readiness("http", p.dbproxy_admin, "/status"),
                ),
                log=log,
                address=f"127.0.0.1:{p.db_rw}/{p.db_ro}/{p.db_any} (admin :{p.dbproxy_admin})",
                before_start=self._with_tls,
            )
        if name == NGINX and name in self.services():
            prefix = self.state_dir / NGINX
            conf = prefix / "nginx.conf"
            return ServiceSpec(
                name=name,
                # -e: errors before the config is read go to the log, not /var/log.
                argv=(
                    classic.find_program("nginx"),
                    *("-p", f"{prefix}/", "-c", str(conf), "-e", "stderr"),
                    *("-g", "daemon off;"),
                ),
                env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")},
                listens=(self.ports.entry, self.ports.entry_tls, self.ports.lb_admin),
                ready=(Readiness("http", self.ports.entry),),
                log=log,
                address=(
                    f"127.0.0.1:{self.ports.entry}, https :{self.ports.entry_tls} "
                    f"(status :{self.ports.lb_admin})"
                ),
                stop_signal=signal.SIGQUIT,  # nginx's graceful shutdown, as lb's SIGTERM
                before_start=partial(
                    self._with_tls,
                    partial(self._render_config, BALANCE_CONFIG / "nginx.conf", conf),
                    prefix / "tls",
                ),
            )
        if name == HAPROXY and name in self.services():
            p = self.ports
            cfg = self.state_dir / HAPROXY / "haproxy.cfg"
            return ServiceSpec(
                name=name,
                argv=(classic.find_program("haproxy"), "-db", "-f", str(cfg)),
                env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")},
                listens=(p.db_rw, p.db_ro, p.db_any, p.dbproxy_admin),
                ready=(Readiness("postgres", p.db_rw),),
                log=log,
                address=f"127.0.0.1:{p.db_rw}/{p.db_ro}/{p.db_any} (stats :{p.dbproxy_admin})",
                before_start=partial(self._render_config, BALANCE_CONFIG / "haproxy.cfg", cfg),
            )
        if name == NGINX_EXPORTER and name in self.services():
            p = self.ports
            return ServiceSpec(
                name=name,
                argv=(
                    classic.find_program("prometheus-nginx-exporter"),
                    f"-nginx.scrape-uri=http://127.0.0.1:{p.lb_admin}/status",
                    f"-web.listen-address=127.0.0.1:{p.nginx_exporter}",
                ),
                env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")},
                listens=(p.nginx_exporter,),
                ready=(Readiness("http", p.nginx_exporter, "/metrics"),),
                log=log,
                address=f"127.0.0.1:{p.nginx_exporter}",
            )
        if name == PROMETHEUS:
            p = self.ports
            home = self.state_dir / PROMETHEUS
            return ServiceSpec(
                name=name,
                argv=(
                    classic.find_program("prometheus"),
                    f"--config.file={home / 'prometheus.yml'}",
                    f"--storage.tsdb.path={home / 'data'}",
                    f"--web.listen-address=127.0.0.1:{p.prometheus}",
                ),
                env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")},
                listens=(p.prometheus,),
                ready=(Readiness("http", p.prometheus, "/-/ready"),),
                log=log,
                address=f"127.0.0.1:{p.prometheus}",
                before_start=partial(self._write_prometheus_config, home / "prometheus.yml"),
            )
        raise StackError(f"unknown service '{name}'; services: {', '.join(self.services())}")

    def scrape_targets(self) -> dict[str, str | None]:
        """infra/prometheus/prometheus.yml's targets, each the local address of its
        service, or None where this profile does not run it."""
        p, running = self.ports, set(self.services())

        def when(service: str, port: int) -> str | None:
            return f"127.0.0.1:{port}" if service in running else None

        db_proxy = next(iter(PROXIES[self.proxies][0]), "")
        return {
            "users-backend-1:8081": when(BACKENDS[0], p.backend_1),
            "users-backend-2:8082": when(BACKENDS[1], p.backend_2),
            "lb:9101": when(LB, p.lb_admin),
            "nginx-exporter:9113": when(NGINX_EXPORTER, p.nginx_exporter),
            "pgproxy:9102": when(db_proxy, p.dbproxy_admin),
        }

    def _write_prometheus_config(self, target: Path) -> None:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(metrics.local_config(self.scrape_targets()))

    def to_json(self) -> dict[str, Any]:
        return {
            "state_dir": str(self.state_dir),
            "pg_root": str(self.pg_root),
            "ports": dataclasses.asdict(self.ports),
            "proxies": self.proxies,
            "users": self.users,
            "seed": self.seed,
            "credentials": dataclasses.asdict(self.credentials),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Topology:
        return cls(
            state_dir=Path(data["state_dir"]),
            pg_root=Path(data["pg_root"]),
            ports=Ports(**data["ports"]),
            proxies=data["proxies"],
            users=int(data["users"]),
            seed=int(data["seed"]),
            credentials=Credentials(**data["credentials"]),
        )


def work_dir(cwd: Path | None = None) -> Path:
    return (cwd or REPO_ROOT) / ".stack"
