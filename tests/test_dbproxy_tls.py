"""dbproxy terminating its clients' TLS (ssl = "terminate") on a real PostgreSQL 15:
psql, asyncpg and psycopg with verify-full against the test CA, a relayed and a
pooled listener, cancels of TLS sessions routed to their own server, a reload of
the certificate, and hostile handshakes."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import ssl
import struct
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import psycopg
import pytest

from stack.pki import Authority, authority
from tests.browser import page_text
from tests.dbproxyctl import DbProxyProc
from tests.pgcluster import Cluster, cluster
from tests.test_dbproxy_pooling import PASSWORD, SETUP, cancel_each, pooled

PSQL = "/usr/lib/postgresql/15/bin/psql"


@pytest.fixture(scope="module")
def pg(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with cluster(tmp_path_factory.mktemp("tls-pg"), *SETUP) as c:
        yield c


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> Authority:
    return authority(tmp_path_factory.mktemp("tls-ca"))


def terminating(
    pg: Cluster, tmp: Path, ca: Authority, mode: str = "none", workers: int = 1
) -> contextlib.AbstractContextManager[DbProxyProc]:
    """A dbproxy ending its clients' TLS with a certificate of ``ca`` (relative
    paths: the file's directory), relaying (``none``) or pooling."""
    leaf = ca.issue(tmp, "dbproxy", ["localhost", "127.0.0.1"])
    tls = (
        '[tls]\nhandshake_timeout = "1s"\n'
        f'certificates = [{{ cert = "{leaf.cert.name}", key = "{leaf.key.name}" }}]\n'
    )
    return pooled(pg, tmp, mode, size=4, workers=workers, top='ssl = "terminate"\n', extra=tls)


async def _connect(port: int, user: str, password: str, ssl: ssl.SSLContext | bool) -> Any:
    return await asyncpg.connect(
        host="localhost" if ssl else "127.0.0.1",
        port=port,
        user=user,
        password=password or None,
        database="postgres",
        ssl=ssl,
        timeout=5,
    )


def _client_context(ca: Authority) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(ca.cert))


@pytest.mark.parametrize("mode", ["none", "session"])
def test_clients_connect_with_verify_full(
    pg: Cluster, tmp_path: Path, ca: Authority, mode: str
) -> None:
    user, password = ("postgres", "") if mode == "none" else ("app", PASSWORD)
    with terminating(pg, tmp_path, ca, mode) as proxy:
        port = proxy.ports["rw"]
        env = dict(
            os.environ,
            PGSSLMODE="verify-full",
            PGSSLROOTCERT=str(ca.cert),
            PGPASSWORD=password,
            PGCONNECT_TIMEOUT="5",
        )
        # dbproxy holds the TLS: the server sees a session in clear
        query = "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()"
        done = subprocess.run(
            [PSQL, "-h", "localhost", "-p", str(port), "-U", user, "-d", "postgres", "-Atc", query],
            env=env,
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == "f"

        async def with_asyncpg() -> None:
            conn = await _connect(port, user, password, _client_context(ca))
            try:
                assert await conn.fetchval("SELECT 41 + 1") == 42
                # asyncpg's statement cache over TLS: prepared and run again
                for _ in range(3):
                    assert await conn.fetchval("SELECT $1::int * 2", 21) == 42
            finally:
                await conn.close()

        asyncio.run(with_asyncpg())
        dsn = (
            f"host=localhost port={port} user={user} dbname=postgres sslmode=verify-full "
            f"sslrootcert={ca.cert} connect_timeout=5"
        )
        with psycopg.connect(dsn, password=password or None) as conn:
            assert conn.execute("SELECT 'tls'").fetchone() == ("tls",)
            assert conn.pgconn.ssl_in_use

        # a client that will not have TLS still gets in, in clear
        async def in_clear() -> None:
            conn = await _connect(port, user, password, False)
            assert await conn.fetchval("SELECT 1") == 1
            await conn.close()

        asyncio.run(in_clear())
        tls = proxy.status()["tls"]
        assert tls["handshakes"]["handshakes"] >= 3
        assert tls["handshakes"]["versions"].get("TLSv1.3", 0) >= 3
        assert "dbproxy_tls_handshakes_total" in proxy.metrics()
        text = page_text(f"http://127.0.0.1:{proxy.admin_port}/status.html")
        assert "TLS from clients" in text and "days left" in text, text[:400]


@pytest.mark.parametrize("mode", ["none", "transaction"])
def test_a_cancel_of_a_tls_session_reaches_its_own_server_connection(
    pg: Cluster, tmp_path: Path, ca: Authority, mode: str
) -> None:
    user, password = ("postgres", "") if mode == "none" else ("app", PASSWORD)

    async def run(port: int) -> None:
        tls = _client_context(ca)
        await cancel_each([await _connect(port, user, password, tls) for _ in range(2)])

    with terminating(pg, tmp_path, ca, mode, workers=2) as proxy:
        asyncio.run(run(proxy.ports["rw"]))
        status = proxy.status()
        # each cancel went to the session's own server, none to every server
        # (which a TLS session passed through gets: its key is unseen)
        assert status["cancels_to_session_server"] == 2
        assert status["cancels_to_every_server"] == 0
        # and the workers seal session tickets with one key (proxycore/tickets.py)
        assert status["tls"]["tickets_shared"]


def _ssl_request() -> bytes:
    return struct.pack("!II", 8, 80877103)


def test_garbage_after_an_ssl_request_and_a_stalled_handshake_are_closed(
    pg: Cluster, tmp_path: Path, ca: Authority
) -> None:
    with terminating(pg, tmp_path, ca) as proxy:
        port = proxy.ports["rw"]
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(_ssl_request())
            assert s.recv(1) == b"S"
            s.sendall(b"\x00garbage, not a ClientHello" * 4)
            assert s.recv(100) == b""
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(_ssl_request())
            assert s.recv(1) == b"S"
            s.sendall(b"\x16\x03\x01")  # a handshake begun, never ended
            started = time.monotonic()
            assert s.recv(100) == b""  # closed at the handshake timeout (1 s)
            assert time.monotonic() - started < 8
        deadline = time.monotonic() + 5
        while proxy.status()["sessions"]["rw"] and time.monotonic() < deadline:
            time.sleep(0.1)
        status = proxy.status()
        assert status["sessions"]["rw"] == 0
        failures = status["tls"]["handshakes"]["failures"]
        assert failures.get("not_tls") == 1 and failures.get("timeout") == 1
        assert "Traceback" not in proxy.log_text()


def test_sighup_swaps_the_certificate(pg: Cluster, tmp_path: Path, ca: Authority) -> None:
    def serial(port: int) -> int:
        from cryptography import x509

        with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
            raw.sendall(_ssl_request())
            assert raw.recv(1) == b"S"
            with _client_context(ca).wrap_socket(raw, server_hostname="localhost") as tls:
                der = tls.getpeercert(binary_form=True)
        assert der is not None
        return x509.load_der_x509_certificate(der).serial_number

    with terminating(pg, tmp_path, ca) as proxy:
        port = proxy.ports["rw"]
        before = serial(port)
        ca.issue(tmp_path, "dbproxy", ["localhost", "127.0.0.1"])
        os.kill(proxy.proc.pid, signal.SIGHUP)
        deadline = time.monotonic() + 10
        while serial(port) == before and time.monotonic() < deadline:
            time.sleep(0.1)
        after = serial(port)
        assert after != before
        (tmp_path / "dbproxy.key").write_text("garbage\n")
        os.kill(proxy.proc.pid, signal.SIGHUP)
        time.sleep(0.5)
        assert serial(port) == after
        assert "reload refused" in proxy.log_text()


@pytest.fixture(scope="module")
def tls_pg(tmp_path_factory: pytest.TempPathFactory, ca: Authority) -> Iterator[Cluster]:
    """A cluster with TLS on, its certificate from ``ca`` for 127.0.0.1."""
    with cluster(tmp_path_factory.mktemp("tls-server-pg"), *SETUP) as c:
        leaf = ca.issue(tmp_path_factory.mktemp("tls-server-cert"), "server", ["127.0.0.1"])
        owner = c.datadir.stat()
        for source, name in ((leaf.cert, "server.crt"), (leaf.key, "server.key")):
            target = c.datadir / name
            shutil.copy(source, target)
            os.chown(target, owner.st_uid, owner.st_gid)
            target.chmod(0o600)
        for statement in (
            "ALTER SYSTEM SET ssl_cert_file = 'server.crt'",
            "ALTER SYSTEM SET ssl_key_file = 'server.key'",
            "ALTER SYSTEM SET ssl = on",
            "SELECT pg_reload_conf()",
        ):
            asyncio.run(c.sql(statement))
        yield c


def _server_tls_proxy(
    pg: Cluster, tmp: Path, ca: Authority, mode: str, server_ssl: str, server_ca: Path
) -> contextlib.AbstractContextManager[DbProxyProc]:
    tmp.mkdir(parents=True, exist_ok=True)
    leaf = ca.issue(tmp, "dbproxy", ["localhost", "127.0.0.1"])
    top = f'ssl = "terminate"\nserver_ssl = "{server_ssl}"\nserver_ssl_ca = "{server_ca}"\n'
    tls = f'[tls]\ncertificates = [{{ cert = "{leaf.cert}", key = "{leaf.key}" }}]\n'
    return pooled(pg, tmp, mode, size=2, top=top, extra=tls)


SERVER_SSL_QUERY = "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()"


@pytest.mark.parametrize("mode", ["none", "session", "transaction"])
def test_server_ssl_verify_full_reaches_the_server_over_tls(
    tls_pg: Cluster, tmp_path: Path, ca: Authority, mode: str
) -> None:
    user, password = ("postgres", "") if mode == "none" else ("app", PASSWORD)

    async def run(port: int) -> None:
        # TLS from the client to dbproxy, and from dbproxy to the server
        conn = await _connect(port, user, password, _client_context(ca))
        try:
            assert await conn.fetchval(SERVER_SSL_QUERY) is True
            for _ in range(3):
                assert await conn.fetchval("SELECT $1::int + 1", 41) == 42
        finally:
            await conn.close()

    with _server_tls_proxy(tls_pg, tmp_path, ca, mode, "verify-full", ca.cert) as proxy:
        asyncio.run(run(proxy.ports["rw"]))
        assert proxy.server("pg")["state"] == "UP"  # the checks log in over TLS too
        assert "Traceback" not in proxy.log_text()


@pytest.mark.parametrize("mode", ["none", "session"])
def test_server_ssl_refused_or_unverified_keeps_the_session_out(
    pg: Cluster, tls_pg: Cluster, tmp_path: Path, ca: Authority, mode: str
) -> None:
    """require against a server without TLS, and verify-full against a CA that did
    not sign the server's certificate: the client gets an error, never a session
    in clear; prefer against the same server goes on in clear."""
    user, password = ("postgres", "") if mode == "none" else ("app", PASSWORD)
    stranger = authority(tmp_path / "stranger", "another CA")

    async def refused(port: int) -> str:
        with pytest.raises((asyncpg.PostgresError, OSError)) as raised:
            await _connect(port, user, password, _client_context(ca))
        return str(raised.value)

    async def in_clear(port: int) -> bool:
        conn = await _connect(port, user, password, _client_context(ca))
        try:
            return bool(await conn.fetchval(SERVER_SSL_QUERY))
        finally:
            await conn.close()

    with _server_tls_proxy(pg, tmp_path / "require", ca, mode, "require", ca.cert) as proxy:
        message = asyncio.run(refused(proxy.ports["rw"]))
        assert "dbproxy" in message, message
        # the checks log in as the sessions do: the server is down for want of TLS
        # (or, had it been up, the session's own connect would say so)
        log = proxy.log_text()
        assert "rejected SSL upgrade" in log or "TLS to the server failed" in log, log
    with _server_tls_proxy(
        tls_pg, tmp_path / "wrong-ca", ca, mode, "verify-full", stranger.cert
    ) as proxy:
        asyncio.run(refused(proxy.ports["rw"]))
        assert "certificate verify failed" in proxy.log_text()
    with _server_tls_proxy(pg, tmp_path / "prefer", ca, mode, "prefer", ca.cert) as proxy:
        assert asyncio.run(in_clear(proxy.ports["rw"])) is False
