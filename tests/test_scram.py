"""SCRAM-SHA-256 both ways, without sockets: RFC 7677's exchange, a wrong
password, and dbproxy logging in as a client with only what the client's own
login gave away (dbproxy/scram.py)."""

from __future__ import annotations

import asyncio
import base64
import struct
from collections.abc import Iterator

import pytest

from dbproxy.auth import SCRAM, ClientAuth
from dbproxy.scram import ClientExchange, ScramError, Secret, ServerExchange
from dbproxy.serverlogin import ServerLogin
from stack import postgres as pg
from tests.pgcluster import cluster

# RFC 7677, section 3
SALT = base64.b64decode("W22ZaJ0SNY7soEsUEjb6gQ==")
CLIENT_NONCE = "rOprNGfwEbeRWgbNEkqO"
SERVER_NONCE = "%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0"


def test_rfc_7677_exchange() -> None:
    secret = Secret.of_password("pencil", SALT, 4096)
    client = ClientExchange(password="pencil", nonce=CLIENT_NONCE, user="user")
    server = ServerExchange(secret, nonce=SERVER_NONCE)
    assert client.first() == b"n,,n=user,r=rOprNGfwEbeRWgbNEkqO"
    server_first = server.first(client.first())
    assert server_first == (
        b"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096"
    )
    client_final = client.final(server_first)
    assert client_final == (
        b"c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,"
        b"p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ="
    )
    server_final = server.final(client_final)
    assert server_final == b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="
    client.verify(server_final)


def test_a_secret_reads_and_writes_as_pg_authid_keeps_it() -> None:
    secret = Secret.of_password("pencil", SALT, 4096)
    assert Secret.parse(str(secret)) == secret
    assert str(secret).startswith("SCRAM-SHA-256$4096:W22ZaJ0SNY7soEsUEjb6gQ==$")
    assert "pencil" not in repr(secret) and str(secret.stored_key) not in repr(secret)
    for bad in ("md5abc", "SCRAM-SHA-256$x:y$z:w", "SCRAM-SHA-256$4096:!!$a:b"):
        with pytest.raises(ScramError):
            Secret.parse(bad)


def test_a_wrong_password_fails_and_gives_no_key() -> None:
    server = ServerExchange(Secret.of_password("right"))
    client = ClientExchange(password="wrong")
    final = client.final(server.first(client.first()))
    with pytest.raises(ScramError, match="password authentication failed"):
        server.final(final)
    assert server.client_key is None


def test_dbproxy_logs_in_to_a_server_with_the_key_the_client_gave_away() -> None:
    secret = Secret.of_password("s3cret")  # what the server (and dbproxy's auth_query) keep
    # the client logs in to dbproxy
    client = ClientExchange(password="s3cret")
    front = ServerExchange(secret)
    client.verify(front.final(client.final(front.first(client.first()))))
    assert front.client_key is not None
    # dbproxy logs in to the server as that client, with no password
    back = ServerExchange(secret)  # the server's side of it
    as_client = ClientExchange.from_keys(front.client_key, secret)
    as_client.verify(back.final(as_client.final(back.first(as_client.first()))))


def test_malformed_messages_are_refused_not_crashed_on() -> None:
    server = ServerExchange(Secret.of_password("x"))
    for bad in (b"", b"p=tls-server-end-point,,n=,r=abc", b"n,,r", b"n,a=admin,n=,r=x", b"\xff"):
        with pytest.raises(ScramError):
            ServerExchange(Secret.of_password("x")).first(bad)
    server.first(b"n,,n=,r=abc")
    for bad in (b"c=biws,r=abc", b"c=biws,r=wrong,p=AAAA", b"c=biws,r=abc" + b"x,p=!!"):
        with pytest.raises(ScramError):
            server.final(bad)


# -- against a real PostgreSQL 15 -------------------------------------------------


@pytest.fixture(scope="module")
def postgres(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """A throwaway cluster of the stack's settings (SCRAM for all but the superuser)."""
    with cluster(tmp_path_factory.mktemp("scram"), "CREATE ROLE app LOGIN PASSWORD 's3cret'") as c:
        yield c.port


async def _sql(port: int, query: str) -> object:
    conn = await pg.connect(port)
    try:
        return await conn.fetchval(query)
    finally:
        await conn.close()


def _message(kind: bytes, body: bytes) -> bytes:
    return kind + struct.pack("!i", len(body) + 4) + body


async def _read(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    kind = await reader.readexactly(1)
    size = struct.unpack("!i", await reader.readexactly(4))[0]
    return kind, await reader.readexactly(size - 4)


async def _log_in(port: int, exchange: ClientExchange) -> bytes:
    """A login by SCRAM on a raw connection; the kind of the message after it
    (Z: ready for a query; E: refused)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        body = b"user\0app\0database\0postgres\0\0"
        writer.write(struct.pack("!ii", len(body) + 8, 3 << 16) + body)
        kind, body = await _read(reader)
        assert kind == b"R" and struct.unpack_from("!i", body)[0] == 10, (kind, body)
        assert b"SCRAM-SHA-256\0" in body[4:]
        first = exchange.first()
        writer.write(_message(b"p", b"SCRAM-SHA-256\0" + struct.pack("!i", len(first)) + first))
        kind, body = await _read(reader)
        if kind == b"E":
            return kind
        assert struct.unpack_from("!i", body)[0] == 11
        writer.write(_message(b"p", exchange.final(body[4:])))
        kind, body = await _read(reader)
        if kind == b"E":
            return kind
        assert struct.unpack_from("!i", body)[0] == 12
        exchange.verify(body[4:])
        while kind != b"Z":
            kind, body = await _read(reader)
            if kind == b"E":
                return kind
        return kind
    finally:
        writer.close()


def test_a_real_server_takes_the_password_and_the_key_a_client_gave_away(postgres: int) -> None:
    assert asyncio.run(_log_in(postgres, ClientExchange(password="s3cret"))) == b"Z"
    assert asyncio.run(_log_in(postgres, ClientExchange(password="wrong"))) == b"E"
    # what an auth_query returns: the server's own secret
    secret = Secret.parse(
        str(asyncio.run(_sql(postgres, "SELECT rolpassword FROM pg_authid WHERE rolname = 'app'")))
    )
    # a client logs in to dbproxy with its password; dbproxy to the server with its key
    client = ClientExchange(password="s3cret")
    front = ServerExchange(secret)
    client.verify(front.final(client.final(front.first(client.first()))))
    assert front.client_key is not None
    assert (
        asyncio.run(_log_in(postgres, ClientExchange.from_keys(front.client_key, secret))) == b"Z"
    )


async def _server_login(port: int, login: ServerLogin) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(login.start())
        while not (login.ready or login.failed):
            data = await asyncio.wait_for(reader.read(65536), 5)
            assert data, "the server closed"
            writer.write(login.feed(data))
        if login.ready:
            writer.write(b"X\0\0\0\4")
    finally:
        writer.close()


def test_dbproxy_logs_in_to_a_real_server_as_a_client_it_authenticated(postgres: int) -> None:
    """The whole of it: the client's SCRAM login checked by dbproxy (ClientAuth),
    then dbproxy's own login to Postgres as that client (ServerLogin), with no
    password anywhere on dbproxy's side."""
    secret = str(
        asyncio.run(_sql(postgres, "SELECT rolpassword FROM pg_authid WHERE rolname = 'app'"))
    )
    auth = ClientAuth(SCRAM, "app", secret)
    auth.start()
    client = ClientExchange(password="s3cret")
    first = client.first()
    reply = auth.feed(b"p", b"SCRAM-SHA-256\0" + struct.pack("!i", len(first)) + first)
    reply = auth.feed(b"p", client.final(reply[9:]))
    assert auth.done and auth.client_key is not None
    login = ServerLogin(
        {"user": "app", "database": "postgres", "application_name": "dbproxy-test"},
        client_key=auth.client_key,
        scram_secret=auth.scram_secret,
    )
    asyncio.run(_server_login(postgres, login))
    assert login.ready, login.reason
    assert login.backend_key is not None and login.server_parameters["server_version"] >= "15"
    # a ClientKey that is not the user's: the server refuses, with its own ErrorResponse
    wrong = ServerLogin(
        {"user": "app", "database": "postgres"},
        client_key=bytes(32),
        scram_secret=auth.scram_secret,
    )
    asyncio.run(_server_login(postgres, wrong))
    assert wrong.failed and b"28P01" in wrong.error
