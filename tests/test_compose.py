"""docker-compose-balance.yml, its images' files and the stack cannot drift apart.

There is no Docker engine here: compose's own `config` validates and resolves
the file for each profile, and the parts that run inside containers (the
Postgres init script, the proxies' configs) run for real against local
processes (see also test_stack_classic.py).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import yaml

from lb.config import load as load_lb
from stack import metrics, postgres, processes
from stack.classic import COMPOSE_ADDRESSES
from stack.control import pg_root_for
from stack.readiness import wait_ready
from stack.topology import BACKENDS, HELLO, MASTER, REPLICA, Ports, Topology
from tests.stackctl import REPO, random_ports

COMPOSE = REPO / "docker-compose-balance.yml"
# Grafana has no local stand-in; tls-init makes in a volume what `stack up` makes on disk
EXTRAS = {"python": {"grafana", "tls-init"}, "classic": {"grafana", "tls-init"}}
ALIASES = {"lb": "http-proxy", "nginx": "http-proxy", "dbproxy": "pgproxy", "haproxy": "pgproxy"}


def compose_config(profile: str) -> dict[str, Any]:
    tool = shutil.which("docker-compose")
    assert tool is not None, "docker-compose is missing: `make setup` installs it"
    env = {k: v for k, v in os.environ.items() if not k.startswith("BALANCE_")}
    result = subprocess.run(
        [tool, "-f", str(COMPOSE), "--profile", profile, "config"],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    config = yaml.safe_load(result.stdout)
    # Compose v1's `config` prints every service; `up --profile` starts those
    # without profiles and those of the profile asked for.
    config["services"] = {
        name: service
        for name, service in config["services"].items()
        if profile in service.get("profiles", [profile])
    }
    return config


def published(service: dict[str, Any]) -> set[tuple[int, int]]:
    """(host port, container port) of each published port."""
    return {(int(p["published"]), int(p["target"])) for p in service.get("ports", [])}


@pytest.fixture(scope="module", params=["python", "classic"])
def profile(request: pytest.FixtureRequest) -> Iterator[tuple[str, dict[str, Any]]]:
    yield request.param, compose_config(request.param)


def test_services_are_the_stacks_plus_metrics(profile: tuple[str, dict[str, Any]]) -> None:
    name, config = profile
    stack = Topology(state_dir=Path("/nonexistent"), pg_root=Path("/nonexistent"), proxies=name)
    assert set(config["services"]) == set(stack.services()) | EXTRAS[name]


def test_ports_agree_with_the_stack_and_the_proxies_configs(
    profile: tuple[str, dict[str, Any]],
) -> None:
    name, config = profile
    stack = Topology(state_dir=Path("/x"), pg_root=Path("/x"), proxies=name)
    defaults = Ports()
    field_of_port = {getattr(defaults, f): f for f in COMPOSE_ADDRESSES}
    for service in stack.services():
        ports = published(config["services"][service])
        # Published on the host exactly where `stack` listens.
        assert {host for host, _ in ports} == set(stack.spec(service).listens), service
        # Inside the network, where infra/balance's files expect the service.
        for host, container in ports:
            host_part, _, port = COMPOSE_ADDRESSES[field_of_port[host]].rpartition(":")
            assert int(port) == container, (service, host)
            assert host_part in ("0.0.0.0", service), (service, host_part)


def test_backends_reach_the_db_proxy_by_alias_on_its_ports(
    profile: tuple[str, dict[str, Any]],
) -> None:
    _name, config = profile
    services = config["services"]
    for proxy, alias in ALIASES.items():
        if proxy in services:
            assert alias in services[proxy]["networks"]["default"]["aliases"]
    rw_port = COMPOSE_ADDRESSES["db_rw"].rpartition(":")[2]
    ro_port = COMPOSE_ADDRESSES["db_ro"].rpartition(":")[2]
    for backend in BACKENDS:
        env = services[backend]["environment"]
        tls = "?sslmode=prefer"  # TLS where the database proxy offers it
        assert env["USERS_RW_DSN"] == f"postgresql://users_app@pgproxy:{rw_port}/users{tls}"
        assert env["USERS_RO_DSN"] == f"postgresql://users_app@pgproxy:{ro_port}/users{tls}"
        assert env["USERS_INSTANCE"] == backend
        # Ready before any proxy starts, as `stack` starts them tier by tier.
        assert services[backend]["depends_on"][MASTER]["condition"] == "service_healthy"
    # Prometheus scrapes only the stack's services (stack/metrics.py refuses any
    # other target), each job of the profile's proxies with its target
    stack = Topology(state_dir=Path("/x"), pg_root=Path("/x"), proxies=_name)
    scrape = json.loads(metrics.local_config(stack.scrape_targets()))["scrape_configs"]
    targets = {job["job_name"]: job["static_configs"][0]["targets"] for job in scrape}
    expected = {"backends": 2, "db-proxy": 1}
    expected.update({"http-proxy": 1, "nginx": 0} if _name == "python" else {"nginx": 1})
    expected.setdefault("http-proxy", 0)
    assert {job: len(t) for job, t in targets.items()} == expected


def test_python_proxies_servers_are_the_compose_addresses() -> None:
    services = compose_config("python")["services"]
    dbproxy = services["dbproxy"]["command"]
    assert services["lb"]["command"][-1] == "--config=/etc/balance/lb.toml"
    # dbproxy ends its clients' TLS with tls-init's certificate, as lb.toml's https does
    assert "--ssl=terminate" in dbproxy
    assert "balance-tls:/etc/balance/tls:ro" in services["lb"]["volumes"]
    lb = load_lb(REPO / "infra/balance/lb.toml")
    servers = {p.name: {s.name: f"{s.address}" for s in p.servers} for p in lb.pools}
    assert servers == {
        "users": {b: COMPOSE_ADDRESSES[f"backend_{i}"] for i, b in enumerate(BACKENDS, start=1)},
        "hello": {h: COMPOSE_ADDRESSES[f"hello_{i}"] for i, h in enumerate(HELLO, start=1)},
    }
    assert (str(lb.listen), str(lb.admin)) == (
        COMPOSE_ADDRESSES["entry"],
        COMPOSE_ADDRESSES["lb_admin"],
    )
    [https] = lb.listeners
    assert str(https.address) == COMPOSE_ADDRESSES["entry_tls"] and https.tls is not None
    assert https.tls.certificates[0].cert == REPO / "infra/balance/tls/site.pem"  # /etc/balance/tls
    assert f"--server={MASTER}={COMPOSE_ADDRESSES['master']}" in dbproxy
    assert f"--server={REPLICA}={COMPOSE_ADDRESSES['replica']}" in dbproxy


def test_every_file_the_compose_file_and_dockerfile_use_exists() -> None:
    text = COMPOSE.read_text()
    for source in re.findall(r"- \./([\w./-]+):", text):
        assert (REPO / source).exists(), source
    dockerfile = (REPO / "infra/Dockerfile").read_text()
    # From the build context (a COPY --from=stage takes what an earlier stage made).
    for source in re.findall(r"^COPY (?!--from)(.+) \S+$", dockerfile, re.M):
        for part in source.split():
            assert (REPO / part).exists(), part
    stages = re.findall(r"^FROM \S+ AS (\w+)$", dockerfile, re.M)
    for stage, source in re.findall(r"^COPY --from=(\w+) /src/(\S+) \S+$", dockerfile, re.M):
        assert stage in stages and (REPO / source).exists(), (stage, source)
    dashboard = json.loads((REPO / "infra/grafana/dashboards/balance.json").read_text())
    assert dashboard["panels"] and all(p["targets"] for p in dashboard["panels"])


def dashboard_metrics() -> set[str]:
    dashboard = json.loads((REPO / "infra/grafana/dashboards/balance.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    names = {m for e in exprs for m in re.findall(r"\b([a-z]+_[a-z_]+)\s*[\[{)]", e)}
    return names - {"histogram_quantile"}


def test_the_init_script_builds_master_and_replica_as_the_stack_does(tmp_path: Path) -> None:
    topology = Topology(state_dir=tmp_path, pg_root=pg_root_for(tmp_path), ports=random_ports())
    bindir, user = postgres.find_bindir(), postgres.run_as()
    refs = []
    try:
        for name, port, publisher in (
            (MASTER, topology.ports.master, True),
            (REPLICA, topology.ports.replica, False),
        ):
            postgres.initdb(bindir, topology.datadir(name), user)
            postgres.configure(topology.datadir(name), port, publisher=publisher)
            spec = topology.spec(name)
            ref = processes.spawn(spec.argv, log_path=spec.log, env=spec.env, user=spec.user)
            refs.append(ref)
            asyncio.run(wait_ready(spec, ref))
        for name, port, role in (
            (MASTER, topology.ports.master, "master"),
            (REPLICA, topology.ports.replica, "replica"),
        ):
            env = dict(
                os.environ,
                POSTGRES_USER="postgres",
                PGHOST="127.0.0.1",
                PGPORT=str(port),
                PGDATA=str(topology.datadir(name)),
                BALANCE_ROLE=role,
                BALANCE_SQL_DIR=str(REPO / "infra/postgres"),
                BALANCE_MASTER_HOST="127.0.0.1",
                BALANCE_MASTER_PORT=str(topology.ports.master),
                BALANCE_APP_PASSWORD="app-pw",
                BALANCE_CHECK_PASSWORD="check-pw",
                BALANCE_REPLICATION_PASSWORD='it\'s a "quoted" \\ $pw',
            )
            script = REPO / "infra/postgres/docker-init.sh"
            result = subprocess.run([str(script)], env=env, capture_output=True, text=True)
            assert result.returncode == 0, result.stdout + result.stderr
            hba = (topology.datadir(name) / "pg_hba.conf").read_text().splitlines()
            assert hba[0] == "host balance_check balance_check all password"
        asyncio.run(_replicates(topology))
    finally:
        for ref in refs:
            processes.kill_tree(ref)
        shutil.rmtree(topology.pg_root, ignore_errors=True)


async def _replicates(topology: Topology) -> None:
    master = await postgres.connect(topology.ports.master, "users")
    replica = await postgres.connect(topology.ports.replica, "users")
    try:
        await master.execute(
            "INSERT INTO users (id, first_name, second_name, birthdate, biography, city,"
            " password_hash) VALUES (gen_random_uuid(), 'Ком', 'Поуз', '1990-01-01', '', '', 'x')"
        )
        for _ in range(100):
            if await replica.fetchval("SELECT count(*) FROM users") == 1:
                break
            await asyncio.sleep(0.1)
        else:
            raise AssertionError("the replica never received the master's row")
        # The service's role logs in with the password the script was given, and
        # finds the replica read-only.
        for port, read_only in ((topology.ports.master, "off"), (topology.ports.replica, "on")):
            app = await asyncpg.connect(
                host="127.0.0.1", port=port, user="users_app", password="app-pw", database="users"
            )
            try:
                assert await app.fetchval("SHOW default_transaction_read_only") == read_only
            finally:
                await app.close()
    finally:
        await master.close()
        await replica.close()
