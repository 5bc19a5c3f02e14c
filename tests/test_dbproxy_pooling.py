"""dbproxy's pooled listeners on a real PostgreSQL 15: logins checked by dbproxy
(SCRAM through an auth query, md5 through an auth file), server connections
reused and reset between clients (session mode) or lent per transaction
(transaction mode, asyncpg's statement cache on), cancels to the connection a
client holds across two workers, the wait timeout, and a killed server's pool."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest

from tests.browser import page_text
from tests.dbproxyctl import DbProxyProc, spawn
from tests.lbctl import stop, wait_port
from tests.pgcluster import Cluster, cluster
from tests.stackctl import free_ports

PASSWORD = "s3cret"
AUTH_QUERY = "SELECT usename, passwd FROM public.dbproxy_user_secret($1)"

SETUP = (
    f"CREATE ROLE app LOGIN PASSWORD '{PASSWORD}'",
    "CREATE ROLE authuser LOGIN PASSWORD 'authpw'",
    "CREATE FUNCTION public.dbproxy_user_secret(role_name text, OUT usename text, "
    "OUT passwd text) RETURNS record LANGUAGE sql SECURITY DEFINER "
    "SET search_path = pg_catalog AS 'SELECT rolname::text, rolpassword FROM pg_authid "
    "WHERE rolname = role_name AND rolcanlogin AND NOT rolsuper'",
    "REVOKE ALL ON FUNCTION public.dbproxy_user_secret(text) FROM PUBLIC",
    "GRANT EXECUTE ON FUNCTION public.dbproxy_user_secret(text) TO authuser",
    "GRANT CREATE ON SCHEMA public TO app",
)


@pytest.fixture(scope="module")
def pg(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with cluster(tmp_path_factory.mktemp("pooling"), *SETUP) as c:
        yield c


@contextlib.contextmanager
def pooled(
    pg: Cluster,
    tmp: Path,
    mode: str,
    *,
    auth: str = "",
    size: int = 3,
    workers: int = 1,
    extra: str = "",
    top: str = "",
) -> Iterator[DbProxyProc]:
    """``extra``: tables after [pool]; ``top``: top-level keys."""
    port, ro, any_, admin = free_ports(4)
    auth = auth or (
        f'type = "scram-sha-256"\nuser = "authuser"\nquery = "{AUTH_QUERY}"\ndbname = "postgres"\n'
    )
    config, log = tmp / f"dbproxy-{mode}.toml", tmp / f"dbproxy-{mode}.log"
    config.write_text(
        f'admin = "127.0.0.1:{admin}"\nworkers = {workers}\n{top}'
        f'[listen]\nrw = "127.0.0.1:{port}"\nro = "127.0.0.1:{ro}"\nany = "127.0.0.1:{any_}"\n'
        '[check]\nuser = "postgres"\ndatabase = "postgres"\ninterval = "200ms"\n'
        'timeout = "1s"\nrise = 1\nfall = 1\n'
        f'[pool]\nmode = "{mode}"\nsize = {size}\nwait_timeout = "1s"\n{extra}'
        f"[auth]\n{auth}"
        f'[[server]]\nname = "pg"\naddress = "127.0.0.1:{pg.port}"\n'
    )
    env = dict(os.environ, DBPROXY_AUTH_PASSWORD="authpw")
    proc = spawn(config, log, env)
    try:
        wait_port(admin, proc)
        wait_port(port, proc)
        yield DbProxyProc({"rw": port}, admin, config, log, proc)
    finally:
        stop(proc)


async def _connect(port: int, password: str = PASSWORD, **kwargs: object) -> asyncpg.Connection:
    return await asyncpg.connect(
        host="127.0.0.1",
        port=port,
        user=kwargs.pop("user", "app"),  # type: ignore[arg-type]
        password=password,
        database="postgres",
        timeout=5,
        **kwargs,  # type: ignore[arg-type]
    )


async def cancel_each(conns: list[asyncpg.Connection]) -> None:
    """A query on each that its client cancels, then one more (and closes them):
    asyncpg sends a CancelRequest when its timeout passes; the next query waits
    for the sleep to end, 20 s unless the cancel got there."""
    try:
        for conn in conns:
            started = time.monotonic()
            with pytest.raises(TimeoutError):
                await conn.fetchval("SELECT pg_sleep(20)", timeout=0.3)
            assert await conn.fetchval("SELECT 1") == 1
            assert time.monotonic() - started < 10
    finally:
        for conn in conns:
            await conn.close()


def _pools(proxy: DbProxyProc) -> list[dict]:
    return proxy.status()["server_pools"]


def test_session_pooling_reuses_a_reset_connection(pg: Cluster, tmp_path: Path) -> None:
    """A second client gets the first one's backend, with nothing of its session:
    no SET, no temp table, no prepared statement, no LISTEN."""

    async def run(port: int) -> None:
        first = await _connect(port)
        pid = await first.fetchval("SELECT pg_backend_pid()")
        await first.execute("SET work_mem = '77MB'")
        await first.execute("CREATE TEMP TABLE scratch (x int)")
        await first.execute("PREPARE mine AS SELECT 1")
        await first.execute("LISTEN somewhere")
        await first.close()
        await asyncio.sleep(0.2)
        second = await _connect(port)
        try:
            assert await second.fetchval("SELECT pg_backend_pid()") == pid
            assert await second.fetchval("SHOW work_mem") != "77MB"
            assert await second.fetchval("SELECT to_regclass('pg_temp.scratch')") is None
            prepared = "SELECT count(*) FROM pg_prepared_statements WHERE name = 'mine'"
            assert await second.fetchval(prepared) == 0
            assert await second.fetchval("SELECT count(*) FROM pg_listening_channels()") == 0
        finally:
            await second.close()

    with pooled(pg, tmp_path, "session") as proxy:
        asyncio.run(run(proxy.ports["rw"]))
        [pool] = _pools(proxy)
        assert (pool["user"], pool["database"], pool["served"]) == ("app", "postgres", 2)
        assert pool["idle"] == 1 and pool["active"] == 0
        assert 'dbproxy_pool_idle{database="postgres",server="pg",user="app"} 1.0' in (
            proxy.metrics()
        )


def test_a_wrong_password_gets_postgres_words_and_no_secret_is_logged(
    pg: Cluster, tmp_path: Path
) -> None:
    async def refused(port: int, user: str, password: str) -> str:
        with pytest.raises(asyncpg.InvalidPasswordError) as caught:
            await _connect(port, password, user=user)
        return str(caught.value)

    with pooled(pg, tmp_path, "session") as proxy:
        port = proxy.ports["rw"]
        assert asyncio.run(refused(port, "app", "wrong")) == (
            'password authentication failed for user "app"'
        )
        # an unknown user is told the same: nothing says which users exist
        assert asyncio.run(refused(port, "nobody", PASSWORD)) == (
            'password authentication failed for user "nobody"'
        )

        async def works() -> None:
            conn = await _connect(port)
            assert await conn.fetchval("SELECT current_user") == "app"
            await conn.close()

        asyncio.run(works())
        log = proxy.log_text()
    assert PASSWORD not in log and "authpw" not in log and "SCRAM-SHA-256$" not in log
    assert "Traceback" not in log


def test_md5_logins_from_an_auth_file(pg: Cluster, tmp_path: Path) -> None:
    """The file's plain password checks an md5 client and logs in to the server
    (by SCRAM, which the server asks for)."""
    userlist = tmp_path / "userlist.txt"
    userlist.write_text(f'"app" "{PASSWORD}"\n; a comment\n"other" "md5deadbeef"\n')
    auth = f'type = "md5"\nfile = "{userlist}"\n'

    async def run(port: int) -> None:
        conn = await _connect(port)
        assert await conn.fetchval("SELECT current_user") == "app"
        await conn.close()
        with pytest.raises(asyncpg.InvalidPasswordError):
            await _connect(port, "wrong")

    with pooled(pg, tmp_path, "session", auth=auth) as proxy:
        asyncio.run(run(proxy.ports["rw"]))


def test_transaction_pooling_shares_few_connections_with_prepared_statements(
    pg: Cluster, tmp_path: Path
) -> None:
    """Twenty asyncpg clients, their statement caches on, over three server
    connections: each statement prepared where a client lands."""

    async def client(port: int, n: int) -> None:
        conn = await _connect(port)
        try:
            for i in range(30):
                assert await conn.fetchval("SELECT $1::int + $2::int", n, i) == n + i
                row = await conn.fetchrow("SELECT $1::text AS name, $2::int AS n", f"c{n}", i)
                assert (row["name"], row["n"]) == (f"c{n}", i)
                async with conn.transaction():
                    await conn.execute("SELECT pg_advisory_xact_lock($1)", n)
                    assert await conn.fetchval("SELECT $1::int * 2", i) == 2 * i
        finally:
            await conn.close()

    async def run(port: int) -> None:
        await asyncio.gather(*(client(port, n) for n in range(20)))

    with pooled(pg, tmp_path, "transaction") as proxy:
        asyncio.run(run(proxy.ports["rw"]))
        [pool] = _pools(proxy)
        assert pool["active"] + pool["idle"] <= 3
        assert pool["served"] > 20 * 30
        assert "Traceback" not in proxy.log_text()


def test_a_set_does_not_follow_the_connection_to_the_next_client(
    pg: Cluster, tmp_path: Path
) -> None:
    """Transaction mode: a client's startup parameters (any, not only those the
    server reports) are SET where it lands, and another client's do not stay."""

    async def run(port: int) -> None:
        tokyo = await _connect(
            port, server_settings={"TimeZone": "Asia/Tokyo", "statement_timeout": "1234ms"}
        )
        lima = await _connect(port, server_settings={"TimeZone": "America/Lima"})
        try:
            for _ in range(5):
                assert await tokyo.fetchval("SHOW TimeZone") == "Asia/Tokyo"
                assert await tokyo.fetchval("SHOW statement_timeout") == "1234ms"
                assert await lima.fetchval("SHOW TimeZone") == "America/Lima"
                assert await lima.fetchval("SHOW statement_timeout") == "0"
        finally:
            await tokyo.close()
            await lima.close()

    with pooled(pg, tmp_path, "transaction", size=1) as proxy:
        asyncio.run(run(proxy.ports["rw"]))


@pytest.mark.parametrize("mode", ["session", "transaction"])
def test_cancels_reach_the_connection_a_client_holds_through_two_workers(
    pg: Cluster, tmp_path: Path, mode: str
) -> None:
    async def run(port: int) -> None:
        await cancel_each([await _connect(port) for _ in range(4)])

    with pooled(pg, tmp_path, mode, workers=2, size=4) as proxy:
        asyncio.run(run(proxy.ports["rw"]))
        assert proxy.status()["cancels_to_session_server"] == 4


def test_the_wait_for_a_connection_ends_in_53300(pg: Cluster, tmp_path: Path) -> None:
    async def run(port: int) -> None:
        holder = await _connect(port)
        waiter = await _connect(port)
        try:
            transaction = holder.transaction()
            await transaction.start()  # holds the only connection
            started = time.monotonic()
            with pytest.raises(asyncpg.PostgresError) as caught:
                await waiter.fetchval("SELECT 1")
            # a FATAL 53300 then the close: asyncpg reports it as the connection lost
            # with the server's message
            assert "query_wait_timeout" in str(caught.value)
            assert time.monotonic() - started < 5
            await transaction.rollback()
        finally:
            await holder.close()
            waiter.terminate()

    with pooled(pg, tmp_path, "transaction", size=1) as proxy:
        asyncio.run(run(proxy.ports["rw"]))
        [pool] = _pools(proxy)
        assert pool["wait_timeouts"] == 1


def test_a_killed_server_s_pool_is_drained_and_refilled(pg: Cluster, tmp_path: Path) -> None:
    async def three(port: int) -> None:
        conns = [await _connect(port) for _ in range(3)]
        for conn in conns:
            await conn.close()

    with pooled(pg, tmp_path, "session") as proxy:
        port = proxy.ports["rw"]
        asyncio.run(three(port))
        time.sleep(0.2)
        assert _pools(proxy)[0]["idle"] == 3, json.dumps(_pools(proxy))
        pg.kill()
        try:
            deadline = time.monotonic() + 10
            while proxy.server("pg")["state"] != "DOWN":
                assert time.monotonic() < deadline, "pg not marked down"
                time.sleep(0.1)
            pool = _pools(proxy)[0]
            assert (pool["idle"], pool["active"]) == (0, 0)

            async def refused() -> None:
                with pytest.raises((asyncpg.PostgresError, OSError)):
                    await _connect(port)

            asyncio.run(refused())
        finally:
            pg.start()
        deadline = time.monotonic() + 10
        while proxy.server("pg")["state"] != "UP":
            assert time.monotonic() < deadline, "pg not back up"
            time.sleep(0.1)

        async def again() -> None:
            conn = await _connect(port)
            assert await conn.fetchval("SELECT 1") == 1
            await conn.close()

        asyncio.run(again())
        assert "Traceback" not in proxy.log_text()


@pytest.mark.parametrize("mode", ["session", "transaction"])
def test_psycopg_prepared_pipelined_and_copy(pg: Cluster, tmp_path: Path, mode: str) -> None:
    """psycopg 3 as a second driver: every query prepared (its names, _pg3_0 ...,
    the same in each client for different queries), a pipeline, COPY both ways."""
    import psycopg

    with pooled(pg, tmp_path, mode, size=4) as proxy:
        dsn = (
            f"host=127.0.0.1 port={proxy.ports['rw']} user=app password={PASSWORD} "
            "dbname=postgres connect_timeout=5"
        )
        conns = [psycopg.connect(dsn, autocommit=True, prepare_threshold=0) for _ in range(4)]
        try:
            first = conns[0]
            first.execute("CREATE TABLE IF NOT EXISTS copied (n int)")
            for r in range(10):
                for i, conn in enumerate(conns):
                    query = "SELECT %s::int + %s::int" if i % 2 else "SELECT %s::int * %s::int"
                    got = conn.execute(query, (i, r)).fetchone()
                    assert got == ((i + r) if i % 2 else (i * r),)
            with first.pipeline():
                cursors = [first.execute("SELECT %s::text", (f"p{n}",)) for n in range(20)]
            assert [c.fetchone() for c in cursors] == [(f"p{n}",) for n in range(20)]
            with first.transaction(), first.cursor().copy("COPY copied FROM STDIN") as copy:
                for n in range(1000):
                    copy.write_row((n,))
            out = []
            with first.cursor().copy("COPY (SELECT n FROM copied ORDER BY n) TO STDOUT") as copy:
                out = [int(row[0]) for row in copy.rows()]
            assert out == list(range(1000))
            first.execute("DROP TABLE copied")
        finally:
            for conn in conns:
                conn.close()
        assert "Traceback" not in proxy.log_text()


@pytest.mark.parametrize("mode", ["session", "transaction"])
def test_the_welcome_tells_a_client_s_parameters_in_the_server_s_words(
    pg: Cluster, tmp_path: Path, mode: str
) -> None:
    """A client asking client_encoding=euc-jp is told EUC_JP at login, as Postgres
    tells it (psycopg's test_encoding_env_var), whether the pool has seen such a
    client before or not, and whatever the connection ran with before."""
    import psycopg

    with pooled(pg, tmp_path, mode, size=1) as proxy:
        base = (
            f"host=127.0.0.1 port={proxy.ports['rw']} user=app password={PASSWORD} "
            "dbname=postgres connect_timeout=5"
        )
        for encoding, told in [("euc-jp", "EUC_JP"), ("LATIN1", "LATIN1"), ("euc-jp", "EUC_JP")]:
            for _ in range(2):
                with psycopg.connect(f"{base} client_encoding={encoding}") as conn:
                    assert conn.info.parameter_status("client_encoding") == told
                    assert conn.execute("SHOW client_encoding").fetchone() == (told,)


def test_idle_connections_close_down_to_min_size_and_the_page_shows_the_pools(
    pg: Cluster, tmp_path: Path
) -> None:
    """idle_timeout closes what the pool does not need, min_size keeps some;
    the status page has a row per pool (pgbouncer's SHOW POOLS)."""

    async def four(port: int) -> None:
        conns = [await _connect(port) for _ in range(4)]
        for conn in conns:
            await conn.close()

    with pooled(pg, tmp_path, "session", size=4, extra='min_size = 1\nidle_timeout = "1s"\n') as (
        proxy
    ):
        asyncio.run(four(proxy.ports["rw"]))
        time.sleep(0.3)
        assert _pools(proxy)[0]["idle"] == 4
        text = page_text(f"http://127.0.0.1:{proxy.admin_port}/status.html")
        assert "rw (session pooling)" in text, text
        assert re.search(r"server connection pools .* pg app postgres 0 4 0 0 — 4 0 0", text), text
        deadline = time.monotonic() + 10
        while _pools(proxy)[0]["idle"] > 1:
            assert time.monotonic() < deadline, _pools(proxy)
            time.sleep(0.2)
        time.sleep(1.5)  # and it stays at min_size
        assert _pools(proxy)[0]["idle"] == 1
