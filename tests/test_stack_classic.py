"""The classic profile: real nginx and HAProxy, from infra/balance's files, on the same ports."""

from __future__ import annotations

import subprocess
from pathlib import Path

import aiohttp
import pytest

from stack.classic import COMPOSE_ADDRESSES, compose_addresses_in, render
from stack.errors import StackError
from stack.postgres import connect
from stack.topology import BALANCE_CONFIG, Topology
from tests.stackctl import (
    StackHandle,
    hello_instances,
    profile_stack,
    prometheus_scrapes,
    random_ports,
    scrape,
)
from tests.test_compose import dashboard_metrics

NGINX_CONF, HAPROXY_CFG = BALANCE_CONFIG / "nginx.conf", BALANCE_CONFIG / "haproxy.cfg"


def local_topology(tmp_path: Path) -> Topology:
    return Topology(
        state_dir=tmp_path, pg_root=tmp_path / "pg", ports=random_ports(), proxies="classic"
    )


def test_each_file_uses_only_stack_addresses_and_all_of_its_own() -> None:
    known = set(COMPOSE_ADDRESSES.values())
    nginx = set(compose_addresses_in(NGINX_CONF.read_text()))
    haproxy = set(compose_addresses_in(HAPROXY_CFG.read_text()))
    assert nginx | haproxy <= known
    entry = {"entry", "entry_tls", "lb_admin", "backend_1", "backend_2", "hello_1", "hello_2"}
    assert nginx == {COMPOSE_ADDRESSES[k] for k in entry}
    # like for like: lb.toml reaches the same servers (and is rendered the same way)
    lb = set(compose_addresses_in((NGINX_CONF.parent / "lb.toml").read_text()))
    assert lb == nginx
    assert haproxy == {
        COMPOSE_ADDRESSES[k]
        for k in ("db_rw", "db_ro", "db_any", "dbproxy_admin", "master", "replica")
    }


def test_rendering_changes_addresses_and_nothing_else(tmp_path: Path) -> None:
    topology = local_topology(tmp_path)
    source = HAPROXY_CFG.read_text()
    rendered = render(HAPROXY_CFG, topology.local_addresses())
    assert f"127.0.0.1:{topology.ports.master}" in rendered
    assert "service-db:5432" not in rendered.replace("# ", "")
    assert len(rendered.splitlines()) == len(source.splitlines())
    for before, after in zip(source.splitlines(), rendered.splitlines(), strict=True):
        if before != after:
            assert compose_addresses_in(before), (before, after)
            assert before.partition("#")[2] == after.partition("#")[2]


def test_an_address_outside_the_stack_is_refused_naming_it(tmp_path: Path) -> None:
    conf = tmp_path / "nginx.conf"
    conf.write_text("upstream u { server users-backend-3:8083; }\n")
    with pytest.raises(StackError, match=r"nginx\.conf.*users-backend-3:8083"):
        render(conf, local_topology(tmp_path).local_addresses())


def test_the_rendered_files_pass_nginx_and_haproxy_own_checks(tmp_path: Path) -> None:
    topology = local_topology(tmp_path)
    nginx, haproxy = topology.spec("nginx"), topology.spec("haproxy")
    assert nginx.before_start is not None and haproxy.before_start is not None
    nginx.before_start()
    haproxy.before_start()
    # The same argv the stack runs, with the binaries' own "test the config" flag.
    for argv in ([*nginx.argv[:7], "-t"], [haproxy.argv[0], "-c", *haproxy.argv[2:]]):
        checked = subprocess.run(argv, capture_output=True, text=True)
        assert checked.returncode == 0, checked.stdout + checked.stderr
        assert "warning" not in (checked.stdout + checked.stderr).lower(), checked.stderr


classic_stack = profile_stack("classic")


async def test_entry_serves_through_nginx_reads_and_writes(classic_stack: StackHandle) -> None:
    entry = f"http://127.0.0.1:{classic_stack.ports.entry}"
    async with aiohttp.ClientSession() as http:
        params = {"first_name": "Ан", "last_name": "К"}
        async with http.get(entry + "/user/search", params=params) as r:
            assert r.status == 200 and isinstance(await r.json(), list)
            assert r.headers["Server"].startswith("nginx")
            assert r.headers["X-Request-ID"]
        body = {"first_name": "Классик", "second_name": "Тест", "birthdate": "1990-01-01"}
        async with http.post(entry + "/user/register", json={**body, "password": "p"}) as r:
            assert r.status == 200, await r.text()
        async with http.get(f"http://127.0.0.1:{classic_stack.ports.lb_admin}/status") as r:
            assert "Active connections" in await r.text()
        # the second service, by its route
        assert await hello_instances(http, entry, "classic") == {"hello-1", "hello-2"}
    status = classic_stack.cli("status").stdout
    assert "nginx" in status and "haproxy" in status and "lb" not in status.split()


async def test_haproxy_sends_rw_to_the_master_ro_to_the_replica(classic_stack: StackHandle) -> None:
    p = classic_stack.ports
    for listener, cluster in ((p.db_rw, p.master), (p.db_ro, p.replica)):
        conn = await connect(listener, "users")
        try:
            assert int(await conn.fetchval("SHOW port")) == cluster
        finally:
            await conn.close()
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"http://127.0.0.1:{p.dbproxy_admin}/metrics") as r,
    ):
        text = await r.text()
    # Both servers up by pgsql-check, as the balance_check user is let in pg_hba.
    assert 'haproxy_server_status{proxy="master",server="service-db",state="UP"} 1' in text
    assert 'haproxy_server_status{proxy="replica",server="service-db-replica",state="UP"} 1' in text


async def test_haproxy_serves_the_dashboards_metrics(classic_stack: StackHandle) -> None:
    served = await scrape(classic_stack.ports.dbproxy_admin)
    wanted = {m for m in dashboard_metrics() if m.startswith("haproxy_")}
    assert wanted and wanted <= served, wanted - served


async def test_the_stacks_prometheus_scrapes_every_target(classic_stack: StackHandle) -> None:
    health = await prometheus_scrapes(classic_stack.ports.prometheus, "nginx_http_requests_total")
    assert set(health) == {"backends", "db-proxy", "nginx"}
