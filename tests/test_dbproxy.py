"""dbproxy in front of a real master and logical replica."""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
import re
import shutil
import signal
import struct
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import pytest

from bench.pgfuzz import tokens
from stack.postgres import connect as superuser
from stack.postgres import run_as
from tests.browser import page_text
from tests.dbproxyctl import (
    FAST,
    DbProxyProc,
    app_password,
    connect,
    connections_to,
    dbproxy_for,
)
from tests.silent import full_backlog, never_accepting
from tests.stackctl import REPO, StackHandle, profile_stack

MASTER, REPLICA = "service-db", "service-db-replica"


pystack = profile_stack("python", name="pystack")


@pytest.fixture
def own(pystack: StackHandle, tmp_path: Path) -> Iterator[DbProxyProc]:
    with dbproxy_for(pystack, tmp_path) as proxy:
        yield proxy


async def port_of(stack: StackHandle, listener_port: int) -> int:
    conn = await connect(stack, listener_port)
    try:
        return await conn.fetchval("SELECT inet_server_port()")
    finally:
        await conn.close()


async def test_listeners_route_by_role(pystack: StackHandle) -> None:
    p = pystack.ports
    assert await port_of(pystack, p.db_rw) == p.master
    assert await port_of(pystack, p.db_ro) == p.replica
    seen = {await port_of(pystack, p.db_any) for _ in range(6)}
    assert seen == {p.master, p.replica}
    rw = await connect(pystack, p.db_rw)
    try:  # the service is read-write now: writes through rw work
        await rw.execute("CREATE TEMP TABLE t (x int); INSERT INTO t VALUES (1)")
    finally:
        await rw.close()


def psql(stack: StackHandle, port: int, sql: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PGPASSWORD=app_password(stack), PGCONNECT_TIMEOUT="5")
    return subprocess.run(
        [
            "psql",
            "-X",
            "-h",
            "127.0.0.1",
            "-p",
            str(port),
            "-U",
            "users_app",
            "-d",
            "users",
            "-Atc",
            sql,
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
    )


def test_psql_through_every_listener_and_the_no_server_error(
    pystack: StackHandle, own: DbProxyProc
) -> None:
    p = pystack.ports
    for role, expected in (("rw", p.master), ("ro", p.replica)):
        result = psql(pystack, own.ports[role], "SELECT inet_server_port()")
        assert result.stdout.strip() == str(expected), result.stderr
    own.admin(f"/servers/{MASTER}/disable")
    try:
        result = psql(pystack, own.ports["rw"], "SELECT 1")
        assert result.returncode != 0
        assert "FATAL:  dbproxy: no server is available for listener 'rw'" in result.stderr
    finally:
        own.admin(f"/servers/{MASTER}/enable")


async def test_asyncpg_sees_57P03(pystack: StackHandle, own: DbProxyProc) -> None:
    own.admin(f"/servers/{MASTER}/disable")
    try:
        with pytest.raises(asyncpg.exceptions.CannotConnectNowError, match="listener 'rw'"):
            await connect(pystack, own.ports["rw"])
    finally:
        own.admin(f"/servers/{MASTER}/enable")


@pytest.mark.parametrize("listener", ["rw", "ro", "any"])
async def test_cancel_reaches_the_right_server(
    pystack: StackHandle, own: DbProxyProc, listener: str
) -> None:
    for _ in range(2 if listener == "any" else 1):  # any: both servers in turn
        conn = await connect(pystack, own.ports[listener])
        try:
            started = time.monotonic()
            with pytest.raises(TimeoutError):
                await conn.execute("SELECT pg_sleep(30)", timeout=0.5)
            assert time.monotonic() - started < 2
            await asyncio.sleep(0.2)
            running = await conn.fetchval(
                "SELECT count(*) FROM pg_stat_activity"
                " WHERE query LIKE 'SELECT pg_sleep(30)%' AND state = 'active'"
            )
            assert running == 0
        finally:
            await conn.close()
    assert own.status()["cancels_to_session_server"] >= 1


async def test_bad_first_packets_cost_nothing_else(pystack: StackHandle, own: DbProxyProc) -> None:
    port = own.ports["rw"]
    bystander = await connect(pystack, port)
    cases = {
        "garbage": b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        "oversized": struct.pack("!ii", 20_000, 196608) + b"x" * 100,
        "unknown version": struct.pack("!ii", 8, 2 << 16),
        "no user": struct.pack("!ii", 9, 196608) + b"\0",
        "short cancel": struct.pack("!ii", 12, 80877102) + b"\0\0\0\1",
    }

    async def answer(to: int, packet: bytes) -> list[str]:
        reader, writer = await asyncio.open_connection("127.0.0.1", to)
        writer.write(packet)
        try:
            data = await asyncio.wait_for(reader.read(), 5)
        except ConnectionResetError:
            data = b""
        writer.close()
        return tokens(data, 0)

    try:
        for name, packet in cases.items():
            # what Postgres answers the same bytes: an error in its words, or a
            # close without a word (a length out of bounds, a short cancel)
            direct = await answer(pystack.ports.master, packet)
            assert await answer(port, packet) == direct, name
            silent = name in ("garbage", "oversized", "short cancel")
            assert (direct == []) if silent else direct[0].startswith("E"), (name, direct)
        # truncated: half a packet, then the client goes away
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(struct.pack("!ii", 40, 196608) + b"user\0")
        writer.close()
        assert await bystander.fetchval("SELECT 1") == 1
    finally:
        await bystander.close()
    await asyncio.sleep(0.2)
    assert "Traceback" not in own.log_text()


async def test_slow_first_packet_is_cut(pystack: StackHandle, tmp_path: Path) -> None:
    with dbproxy_for(pystack, tmp_path, FAST + '\n[timeouts]\nfirst_packet = "500ms"\n') as proxy:
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.ports["ro"])
        writer.write(b"\0\0")
        answer = await asyncio.wait_for(reader.read(), 5)
        writer.close()
        assert answer[:1] == b"E" and b"did not arrive in time" in answer


# Checks far apart: the only connections dbproxy holds to a server are sessions'.
QUIET_CHECKS = '\n[check]\ninterval = "30s"\ntimeout = "1s"\nrise = 2\nfall = 2\n'


async def test_the_server_is_dialled_at_accept_and_let_go_with_the_client(
    pystack: StackHandle, tmp_path: Path
) -> None:
    master = pystack.ports.master
    with dbproxy_for(pystack, tmp_path, QUIET_CHECKS) as proxy:
        pid = proxy.proc.pid
        await wait_until(lambda: connections_to(pid, master) == 0, 5)  # the first check is over
        # As HAProxy in TCP mode: connected before the client says anything.
        _, writer = await asyncio.open_connection("127.0.0.1", proxy.ports["rw"])
        await wait_until(lambda: connections_to(pid, master) == 1, 5)
        writer.close()
        await wait_until(lambda: connections_to(pid, master) == 0, 5)
        # A CancelRequest or a bad first packet: the early connection goes with the client.
        for packet in (struct.pack("!iiii", 16, 80877102, 1, 2), b"GET / HTTP/1.1\r\n\r\n"):
            reader, writer = await asyncio.open_connection("127.0.0.1", proxy.ports["rw"])
            writer.write(packet)
            await asyncio.wait_for(reader.read(), 5)
            writer.close()
            await wait_until(lambda: connections_to(pid, master) == 0, 5)
        conn = await connect(pystack, proxy.ports["rw"])
        assert await conn.fetchval("SELECT 1") == 1
        await conn.close()
        assert "Traceback" not in proxy.log_text()


async def test_gssenc_is_declined_and_the_session_goes_on(
    pystack: StackHandle, own: DbProxyProc
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", own.ports["rw"])
    try:
        writer.write(struct.pack("!ii", 8, 80877104))
        assert await asyncio.wait_for(reader.readexactly(1), 5) == b"N"
        body = b"user\0users_app\0database\0users\0\0"
        writer.write(struct.pack("!ii", 8 + len(body), 196608) + body)
        kind, _, code = struct.unpack("!cii", await asyncio.wait_for(reader.readexactly(9), 5))
        assert (kind, code) == (b"R", 10)  # the server asks for SASL: the startup reached it
    finally:
        writer.close()


async def test_a_connect_that_hangs_times_out_and_the_next_server_serves(
    pystack: StackHandle, tmp_path: Path
) -> None:
    with full_backlog() as hole:
        settings = (
            QUIET_CHECKS
            + '\n[timeouts]\nconnect = "300ms"\n'
            + f'\n[[server]]\nname = "hole"\naddress = "127.0.0.1:{hole}"\n'
        )
        with dbproxy_for(pystack, tmp_path, settings, top='method = "round_robin"\n') as proxy:
            for _ in range(4):  # round robin over three: the hole comes first at least once
                conn = await connect(pystack, proxy.ports["any"])
                assert await conn.fetchval("SELECT 1") == 1
                await conn.close()
            assert proxy.server("hole")["connect_errors"] >= 1
            assert "connect timed out" in proxy.log_text()


async def test_a_server_that_accepts_but_never_answers_holds_no_session(
    pystack: StackHandle, tmp_path: Path
) -> None:
    with never_accepting() as frozen:
        settings = (
            QUIET_CHECKS
            + '\n[timeouts]\nstartup = "300ms"\n'
            + f'\n[[server]]\nname = "frozen"\naddress = "127.0.0.1:{frozen}"\n'
        )
        with dbproxy_for(pystack, tmp_path, settings, top='method = "round_robin"\n') as proxy:
            for ssl in (False, True):  # the startup packet, and an SSLRequest before it
                for _ in range(3):  # round robin over three: the frozen one comes once
                    conn = await connect(
                        pystack, proxy.ports["any"], ssl="prefer" if ssl else False
                    )
                    assert await conn.fetchval("SELECT 1") == 1
                    await conn.close()
            assert proxy.status()["sessions_redialed"] >= 1
            assert "no answer to a first packet within 0.3s" in proxy.log_text()


async def test_a_frozen_replica_is_marked_down_and_ro_moves_on(
    pystack: StackHandle, tmp_path: Path
) -> None:
    """SIGSTOP of the replica's every process (`stack freeze`, as `docker pause`):
    a session waiting on it is closed once dbproxy sees no byte from it for
    timeouts.stall and an SSLRequest confirms it, not when it thaws; new ro
    sessions go to the primary; after the thaw the replica comes back."""
    with dbproxy_for(pystack, tmp_path) as proxy:
        waiting = await connect(pystack, proxy.ports["ro"])
        assert await waiting.fetchval("SELECT inet_server_port()") == pystack.ports.replica
        await asyncio.to_thread(pystack.cli, "freeze", REPLICA)
        try:
            started = time.monotonic()
            with pytest.raises((asyncpg.PostgresConnectionError, asyncpg.InterfaceError, OSError)):
                await waiting.fetchval("SELECT 1", timeout=5)
            closed_after = time.monotonic() - started
            assert closed_after < 3  # well before the thaw, nowhere near the 5 s timeout
            assert proxy.server(REPLICA)["state"] == "DOWN"
            assert "no answer to an SSLRequest" in proxy.log_text()
            fresh = await connect(pystack, proxy.ports["ro"], timeout=5)
            assert await fresh.fetchval("SELECT inet_server_port()") == pystack.ports.master
            await fresh.close()
        finally:
            await asyncio.to_thread(pystack.cli, "thaw", REPLICA)
        waiting.terminate()
        await wait_until(lambda: proxy.server(REPLICA)["state"] == "UP", 10)


async def test_sessions_past_max_sessions_wait_for_a_slot(
    pystack: StackHandle, tmp_path: Path
) -> None:
    settings = FAST + '\n[queue]\nmax_sessions = 2\ntimeout = "10s"\n'
    with dbproxy_for(pystack, tmp_path, settings) as proxy:
        held = [await connect(pystack, proxy.ports["rw"]) for _ in range(2)]
        third = asyncio.create_task(connect(pystack, proxy.ports["rw"], timeout=15))
        await asyncio.sleep(0.5)
        assert not third.done()  # waiting for a slot, not refused
        assert proxy.status()["queue"]["waiting"]["rw"] == 1
        await held.pop().close()
        conn = await asyncio.wait_for(third, 5)
        assert await conn.fetchval("SELECT 1") == 1
        for c in (conn, *held):
            await c.close()
        assert proxy.server(MASTER)["state"] == "UP"
        assert "dbproxy_queue_wait_seconds_count" in proxy.metrics()


async def test_a_session_that_waits_past_the_queue_timeout_gets_53300(
    pystack: StackHandle, tmp_path: Path
) -> None:
    settings = FAST + '\n[queue]\nmax_sessions = 1\ntimeout = "300ms"\n'
    with dbproxy_for(pystack, tmp_path, settings) as proxy:
        held = await connect(pystack, proxy.ports["rw"])
        with pytest.raises(asyncpg.TooManyConnectionsError, match="max_sessions"):
            await connect(pystack, proxy.ports["rw"])
        await held.close()
        assert proxy.status()["queue"]["timeouts"] == 1


async def test_max_sessions_auto_is_the_servers_own_limit(
    pystack: StackHandle, own: DbProxyProc
) -> None:
    conn = await superuser(pystack.ports.master)
    try:
        slots = await conn.fetchval(
            "SELECT current_setting('max_connections')::int"
            " - current_setting('superuser_reserved_connections')::int"
        )
    finally:
        await conn.close()
    assert own.server(MASTER)["limit"] == slots - 5  # AUTO_SESSION_MARGIN


@pytest.mark.skipif(shutil.which("pgbench") is None, reason="postgresql-client has pgbench")
@pytest.mark.parametrize(("startup", "workers"), [("1s", 1), ("20ms", 1), ("20ms", 2)])
async def test_three_times_max_connections_of_short_sessions_all_get_through(
    pystack: StackHandle, tmp_path: Path, startup: str, workers: int
) -> None:
    """pgbench -C (a new session per transaction, as short-lived clients open them)
    with 3 x the master's max_connections clients through rw: every session
    waits its turn for a slot, none fails. A thread per client (-j = -c): a
    pgbench thread connects its clients one at a time and blocks while it does,
    so with fewer threads its other clients' sessions would hold the slots the
    blocked connect waits for (clients that hold sessions while they wait for
    another can only be answered by the queue's timeout, 53300).

    Such a burst queues logins behind the postmaster's forks, so first packets
    are answered late; with timeouts.startup far below what a login takes then
    (20ms), nearly every one is. rw has no other server to send them to, so
    they wait on the primary, which is never taken out: the stall watch judges
    silence, for the server as a whole (a session open throughout queries it
    and must not notice). Counted as failures, five late answers took the
    primary out, and every session with it. With workers, each judges its own
    sessions and its supervisor the server, on what the workers tell it."""
    script = tmp_path / "select1.sql"
    script.write_text("SELECT 1;\n")
    settings = (
        FAST
        + f'\n[timeouts]\nstartup = "{startup}"\n'
        + "\n[queue]\nmax_sessions = 150\n"  # the stack's own proxies hold some
    )
    top = f"workers = {workers}\n" if workers > 1 else ""
    with dbproxy_for(pystack, tmp_path, settings, top=top) as proxy:
        steady = await connect(pystack, proxy.ports["rw"])
        bench = await asyncio.create_subprocess_exec(
            *("pgbench", "-n", "-C", "-c", "600", "-j", "600", "-T", "4"),
            *("-f", str(script), "-h", "127.0.0.1", "-p", str(proxy.ports["rw"])),
            *("-U", "users_app", "users"),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env={**os.environ, "PGPASSWORD": app_password(pystack)},
        )
        output = asyncio.ensure_future(asyncio.wait_for(bench.communicate(), 120))
        while not output.done():
            assert await steady.fetchval("SELECT 1", timeout=10) == 1
        text = (await output)[0].decode()
        await steady.close()
        assert bench.returncode == 0, text + _warnings(proxy)
        assert "aborted" not in text and "number of failed transactions: 0" in text, text
        status = proxy.status()
        assert status["queue"]["timeouts"] == 0
        assert proxy.server(MASTER)["state"] == "UP"
        if startup == "20ms":
            assert status["startups_waited_on"] > 0, text


def _warnings(proxy: DbProxyProc) -> str:
    """dbproxy's warnings, for a failure's message: what it decided, and why."""
    lines = [line for line in proxy.log_text().splitlines() if " WARNING " in line]
    return "\n".join(["", "dbproxy warned:", *lines[:20]])


@pytest.fixture
def supervised(pystack: StackHandle, tmp_path: Path) -> Iterator[DbProxyProc]:
    with dbproxy_for(pystack, tmp_path, top="workers = 2\n") as proxy:
        yield proxy


async def test_workers_answer_as_one_server(pystack: StackHandle, supervised: DbProxyProc) -> None:
    assert len(supervised.status()["workers"]) == 2
    for _ in range(20):
        conn = await connect(pystack, supervised.ports["rw"])
        assert await conn.fetchval("SELECT 1") == 1
        await conn.close()
    metrics = supervised.metrics()
    assert 'dbproxy_listener_sessions_total{listener="rw"} 20.0' in metrics
    # the servers' state is the supervisor's: not summed over workers
    assert 'dbproxy_server_up{server="service-db",state="UP"} 1.0' in metrics


async def test_a_cancel_through_any_worker_reaches_the_sessions_server(
    pystack: StackHandle, supervised: DbProxyProc
) -> None:
    # asyncpg sends its CancelRequest on a new connection: it lands on either
    # worker, which may not be the one holding the session
    for _ in range(8):
        conn = await connect(pystack, supervised.ports["any"])
        try:
            started = time.monotonic()
            with pytest.raises(TimeoutError):
                await conn.execute("SELECT pg_sleep(30)", timeout=0.3)
            assert await conn.fetchval("SELECT 1", timeout=5) == 1  # the sleep was cancelled
            assert time.monotonic() - started < 5
        finally:
            await conn.close()
    status = supervised.status()
    assert status["cancels_to_session_server"] == 8 and status["cancels_to_every_server"] == 0


async def test_a_killed_worker_is_replaced_and_a_new_generation_drops_no_session(
    pystack: StackHandle, supervised: DbProxyProc
) -> None:
    first = [w["pid"] for w in supervised.status()["workers"]]
    os.kill(first[0], signal.SIGKILL)
    await wait_until(lambda: first[0] not in [w["pid"] for w in supervised.status()["workers"]], 3)
    assert f"(pid {first[0]}) died (SIGKILL)" in supervised.log_text()
    assert 'dbproxy_worker_deaths_total{how="SIGKILL"} 1.0' in supervised.metrics()

    async def short_sessions(until: float) -> int:
        done = 0
        while time.monotonic() < until:
            conn = await connect(pystack, supervised.ports["rw"])
            assert await conn.fetchval("SELECT 1") == 1
            await conn.close()
            done += 1
        return done

    until = time.monotonic() + 3
    sessions = asyncio.gather(*(short_sessions(until) for _ in range(4)))
    await asyncio.sleep(1)
    supervised.proc.send_signal(signal.SIGUSR2)
    assert sum(await sessions) > 20  # and none failed: any error would have raised
    await wait_until(lambda: all(w["generation"] == 2 for w in supervised.status()["workers"]), 5)


def self_signed_certificate(datadir: Path) -> tuple[Path, Path]:
    """A throwaway certificate and key in ``datadir``, readable by the cluster's user only."""
    crt, key = datadir / "balance-test.crt", datadir / "balance-test.key"
    subprocess.run(
        [
            *("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"),
            *("-subj", "/CN=127.0.0.1", "-keyout", str(key), "-out", str(crt)),
        ],
        check=True,
        capture_output=True,
    )
    key.chmod(0o600)
    user = run_as()
    if user is not None:
        entry = pwd.getpwnam(user)
        for path in (crt, key):
            os.chown(path, entry.pw_uid, entry.pw_gid)
    return crt, key


@contextlib.asynccontextmanager
async def tls_on_master(stack: StackHandle) -> AsyncIterator[None]:
    """The master with a self-signed certificate, for as long as the block runs."""
    datadir = Path(stack.state()["topology"]["pg_root"]) / MASTER
    crt, key = await asyncio.to_thread(self_signed_certificate, datadir)
    conn = await superuser(stack.ports.master)
    settings = {"ssl": "on", "ssl_cert_file": crt.name, "ssl_key_file": key.name}
    try:
        for name, value in settings.items():
            await conn.execute(f"ALTER SYSTEM SET {name} = '{value}'")
        await conn.execute("SELECT pg_reload_conf()")
        deadline = time.monotonic() + 5
        while await conn.fetchval("SHOW ssl") != "on":
            assert time.monotonic() < deadline, "the master did not turn TLS on"
            await asyncio.sleep(0.1)
        yield
    finally:
        for name in settings:
            await conn.execute(f"ALTER SYSTEM RESET {name}")
        await conn.execute("SELECT pg_reload_conf()")
        await conn.close()
        crt.unlink(missing_ok=True)
        key.unlink(missing_ok=True)


async def test_tls_goes_end_to_end_unless_refused(pystack: StackHandle, tmp_path: Path) -> None:
    tls_query = "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()"
    (tmp_path / "pass").mkdir()
    (tmp_path / "refuse").mkdir()
    async with tls_on_master(pystack):
        with dbproxy_for(pystack, tmp_path / "pass") as proxy:
            conn = await connect(pystack, proxy.ports["rw"], ssl="require")
            try:
                assert await conn.fetchval(tls_query) is True
                # The session's key went by encrypted; a CancelRequest in clear (as
                # libpq sends one) goes to every server of the listener and still
                # reaches the query.
                query = asyncio.ensure_future(conn.execute("SELECT pg_sleep(30)"))
                await asyncio.sleep(0.3)
                protocol = conn._protocol  # type: ignore[attr-defined]
                reader, writer = await asyncio.open_connection("127.0.0.1", proxy.ports["rw"])
                writer.write(
                    struct.pack(
                        "!iiii", 16, 80877102, protocol.backend_pid, protocol.backend_secret
                    )
                )
                await asyncio.wait_for(reader.read(), 5)
                writer.close()
                with pytest.raises(asyncpg.exceptions.QueryCanceledError):
                    await asyncio.wait_for(query, 5)
                assert proxy.status()["cancels_to_every_server"] == 1
                # A server that says 'S' is asked every time: TLS stays end to end.
                again = await connect(pystack, proxy.ports["rw"], ssl="require")
                assert await again.fetchval(tls_query) is True
                await again.close()
                assert proxy.status()["ssl_requests_answered_for_server"] == 0
            finally:
                await conn.close()
        with dbproxy_for(pystack, tmp_path / "refuse", top='ssl = "refuse"\n') as proxy:
            with pytest.raises(ConnectionError, match="SSL"):
                await connect(pystack, proxy.ports["rw"], ssl="require")
            conn = await connect(pystack, proxy.ports["rw"], ssl="prefer")
            try:
                assert await conn.fetchval(tls_query) is False
            finally:
                await conn.close()


async def test_a_servers_refusal_of_tls_is_given_again_for_a_while(
    pystack: StackHandle, tmp_path: Path
) -> None:
    tls_query = "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()"

    async def session(proxy: DbProxyProc) -> None:
        conn = await connect(pystack, proxy.ports["rw"], ssl="prefer")  # SSLRequest first
        try:
            assert await conn.fetchval(tls_query) is False
        finally:
            await conn.close()

    def counts(proxy: DbProxyProc) -> tuple[int, int]:
        status = proxy.status()
        return status["ssl_requests_forwarded"], status["ssl_requests_answered_for_server"]

    (tmp_path / "remember").mkdir()
    (tmp_path / "forget").mkdir()
    # The master has no certificate here: it answers 'N'.
    top = 'ssl_refusal_memory = "10m"\n'
    with dbproxy_for(pystack, tmp_path / "remember", top=top) as proxy:
        await session(proxy)
        assert counts(proxy) == (1, 0)  # the first is asked of the server
        for _ in range(3):
            await session(proxy)
        assert counts(proxy) == (1, 3)  # then its answer is ours to give
        assert 'dbproxy_ssl_requests_total{how="answered_for_server"} 3.0' in proxy.metrics()
    with dbproxy_for(pystack, tmp_path / "forget", top='ssl_refusal_memory = "0s"\n') as proxy:
        for _ in range(3):
            await session(proxy)
        assert counts(proxy) == (3, 0)


async def test_lag_takes_the_replica_out_of_ro_and_back(
    pystack: StackHandle, tmp_path: Path
) -> None:
    settings = FAST + '\n[ro]\nmax_lag_bytes = "64k"\n'
    with dbproxy_for(pystack, tmp_path, settings) as proxy:
        p = pystack.ports
        assert await port_of(pystack, proxy.ports["ro"]) == p.replica
        replica = await superuser(p.replica, "users")
        master = await superuser(p.master, "users")
        try:
            await replica.execute("ALTER SUBSCRIPTION users_sub DISABLE")
            await master.execute(
                "INSERT INTO users"
                " (id, first_name, second_name, birthdate, password_hash, biography)"
                " SELECT gen_random_uuid(), 'Лаг', 'Лагов', '2000-01-01', 'x', repeat('z', 500)"
                " FROM generate_series(1, 2000)"
            )
            await wait_until(
                lambda: (proxy.server(REPLICA).get("lag") or {}).get("lag_bytes", 0) > 65536, 10
            )
            assert await port_of(pystack, proxy.ports["ro"]) == p.master  # the primary as fallback
        finally:
            await replica.execute("ALTER SUBSCRIPTION users_sub ENABLE")
        await wait_until(
            lambda: (proxy.server(REPLICA).get("lag") or {}).get("lag_bytes", 1 << 30) <= 65536, 20
        )
        assert await port_of(pystack, proxy.ports["ro"]) == p.replica
        await master.execute("DELETE FROM users WHERE first_name = 'Лаг'")
        await master.close()
        await replica.close()


async def test_without_fallback_ro_refuses_when_no_replica_fits(
    pystack: StackHandle, tmp_path: Path
) -> None:
    settings = FAST + "\n[ro]\nprimary_fallback = false\n"
    with dbproxy_for(pystack, tmp_path, settings) as proxy:
        proxy.admin(f"/servers/{REPLICA}/drain")
        with pytest.raises(asyncpg.exceptions.CannotConnectNowError, match="listener 'ro'"):
            await connect(pystack, proxy.ports["ro"])


# A session-pooled ro listener, logging clients in as the stack's dbproxy does
# (infra/balance/dbproxy.toml: the auth query as the check's role).
SESSION_POOLED = """
[pool]
mode = "session"
[auth]
type = "scram-sha-256"
user = "balance_check"
query = "SELECT usename, passwd FROM public.dbproxy_user_secret($1)"
dbname = "users"
"""


@pytest.mark.parametrize(
    ("return_to_replica", "pooled"), [(True, False), (False, False), (True, True)]
)
async def test_ro_sessions_parked_on_the_primary_and_the_replicas_return(
    pystack: StackHandle, tmp_path: Path, return_to_replica: bool, pooled: bool
) -> None:
    settings = FAST + f"\n[ro]\nreturn_to_replica = {str(return_to_replica).lower()}\n"
    if pooled:
        settings += SESSION_POOLED
    with dbproxy_for(pystack, tmp_path, settings) as proxy:
        p = pystack.ports
        proxy.admin(f"/servers/{REPLICA}/drain")
        parked = await connect(pystack, proxy.ports["ro"])
        try:
            assert await parked.fetchval("SELECT inet_server_port()") == p.master
            proxy.admin(f"/servers/{REPLICA}/enable")
            assert await port_of(pystack, proxy.ports["ro"]) == p.replica  # new sessions
            if return_to_replica:
                # The parked session is closed, so its pool reconnects to the replica.
                await wait_until(parked.is_closed, 5)
                assert "closing 1 ro session(s) on the primary" in proxy.log_text()
            else:
                # As HAProxy by default: it stays where it is until the client leaves.
                await asyncio.sleep(1.5)
                assert await parked.fetchval("SELECT inet_server_port()") == p.master
        finally:
            await parked.close()


async def test_drain_keeps_sessions_and_disable_closes_them(
    pystack: StackHandle, own: DbProxyProc
) -> None:
    session = await connect(pystack, own.ports["ro"])
    try:
        own.admin(f"/servers/{REPLICA}/drain")
        assert await session.fetchval("SELECT 1") == 1  # drained: goes on
        assert (
            await port_of(pystack, own.ports["ro"]) == pystack.ports.master
        )  # new ones go elsewhere
        own.admin(f"/servers/{REPLICA}/disable")  # marked down: its sessions are closed at once
        with pytest.raises(
            (asyncpg.exceptions.ConnectionDoesNotExistError, asyncpg.InterfaceError, OSError)
        ):
            await asyncio.wait_for(session.fetchval("SELECT 1"), 5)
    finally:
        session.terminate()
        own.admin(f"/servers/{REPLICA}/enable")


async def test_the_status_page_shows_listeners_and_the_replicas_lag(
    pystack: StackHandle, own: DbProxyProc
) -> None:
    conn = await connect(pystack, own.ports["ro"])  # a session for the page to count
    try:
        text = await asyncio.to_thread(page_text, f"http://127.0.0.1:{own.admin_port}/status.html")
    finally:
        await conn.close()
    # listeners above the servers: where each would send a new session now
    assert text.index("listeners") < text.index("postgres servers"), text
    assert re.search(r" rw 127\.0\.0\.1:\d+ \d+ \d+ service-db service-db ", text), text
    assert re.search(r" ro 127\.0\.0\.1:\d+ 1 0 service-db-replica ", text), text
    # the replica's lag in units a person reads, not JSON
    assert re.search(r"replica, lag [0-9.]+ (B|KiB|MiB) / [0-9.]+ s", text), text
    assert "sessions/s" in text and '"lag_bytes"' not in text


async def test_metrics_and_status(pystack: StackHandle, own: DbProxyProc) -> None:
    conn = await connect(pystack, own.ports["rw"])
    await conn.close()
    text = await asyncio.to_thread(own.metrics)
    for needle in (
        'dbproxy_listener_sessions_total{listener="rw"}',
        f'dbproxy_server_role{{role="primary",server="{MASTER}"}} 1.0',
        f'dbproxy_server_role{{role="replica",server="{REPLICA}"}} 1.0',
        f'dbproxy_replica_lag_bytes{{server="{REPLICA}"}}',
        "dbproxy_server_bytes_received_total",
        "dbproxy_check_duration_seconds",
        "dbproxy_server_connect_failures_total",
    ):
        assert needle in text, needle
    status = own.status()
    assert {s["name"]: s["role"] for s in status["pools"]["postgres"]} == {
        MASTER: "primary",
        REPLICA: "replica",
    }


async def test_sighup_reload_and_a_bad_file(pystack: StackHandle, own: DbProxyProc) -> None:
    good = own.config.read_text()
    own.config.write_text(good.replace('name = "service-db-replica"', 'name = "replica-renamed"'))
    own.proc.send_signal(signal.SIGHUP)
    await wait_until(
        lambda: any(s["name"] == "replica-renamed" for s in own.status()["pools"]["postgres"]), 5
    )
    own.config.write_text("[listen\n")
    own.proc.send_signal(signal.SIGHUP)
    await asyncio.sleep(0.3)
    assert "reload refused, the running configuration stays" in own.log_text()
    assert await port_of(pystack, own.ports["rw"]) == pystack.ports.master


async def test_sigterm_lets_sessions_end_then_exits_0(
    pystack: StackHandle, own: DbProxyProc
) -> None:
    session = await connect(pystack, own.ports["rw"])
    own.proc.send_signal(signal.SIGTERM)
    await asyncio.sleep(0.3)
    assert await session.fetchval("SELECT 42") == 42  # in flight: goes on
    with pytest.raises(OSError):
        await connect(pystack, own.ports["rw"])  # no new sessions
    await session.close()
    assert await asyncio.to_thread(own.proc.wait, 10) == 0


def test_check_config(tmp_path: Path) -> None:
    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "dbproxy", *args], cwd=REPO, capture_output=True, text=True
        )

    assert (
        run("--config", str(REPO / "infra/balance/dbproxy.toml"), "--check-config").returncode == 0
    )
    bad = tmp_path / "bad.toml"
    bad.write_text('[ro]\nmax_lag = "1s"\n[[server]]\naddress = "127.0.0.1:1"\n')
    result = run("--config", str(bad), "--check-config")
    assert result.returncode == 2 and f"{bad}:1: [ro] max_lag: unknown key" in result.stderr


async def wait_until(predicate, timeout: float) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"not within {timeout}s"
        await asyncio.sleep(0.1)
