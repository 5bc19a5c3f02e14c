"""dbproxy's own authentication of a client (dbproxy/auth.py), with a real client
library: asyncpg logs in to a small listener that runs ClientAuth against a
secret as pg_authid keeps it, SCRAM and md5, right and wrong."""

from __future__ import annotations

import asyncio
import struct
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import asyncpg
import pytest

from dbproxy.auth import MD5, SCRAM, TRUST, ClientAuth, md5_secret
from dbproxy.pgwire import Startup
from dbproxy.scram import Secret
from dbproxy.serverlogin import ServerLogin

PARAMETERS = {
    "server_version": "15.0",
    "server_encoding": "UTF8",
    "client_encoding": "UTF8",
    "DateStyle": "ISO, MDY",
    "integer_datetimes": "on",
    "standard_conforming_strings": "on",
}


def _message(kind: bytes, body: bytes) -> bytes:
    return kind + struct.pack("!i", len(body) + 4) + body


@asynccontextmanager
async def listener(method: str, secrets: Callable[[str], str | None]) -> AsyncIterator[int]:
    """A server that authenticates with ClientAuth, then is ready and says goodbye."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            size = struct.unpack("!i", await reader.readexactly(4))[0]
            startup = Startup(struct.pack("!i", size) + await reader.readexactly(size - 4))
            auth = ClientAuth(method, startup.user, secrets(startup.user))
            writer.write(auth.start())
            while not (auth.done or auth.failed):
                kind = await reader.readexactly(1)
                length = struct.unpack("!i", await reader.readexactly(4))[0]
                writer.write(auth.feed(kind, await reader.readexactly(length - 4)))
            if auth.done:
                for name, value in PARAMETERS.items():
                    writer.write(_message(b"S", f"{name}\0{value}\0".encode()))
                writer.write(_message(b"K", struct.pack("!ii", 1234, 5678)))
                writer.write(_message(b"Z", b"I"))
                await reader.readexactly(5)  # Terminate: the server closes, as Postgres
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        await server.wait_closed()


SCRAM_SECRET = str(Secret.of_password("s3cret"))
MD5_SECRET = md5_secret("app", "s3cret")


async def login(port: int, user: str = "app", password: str = "s3cret") -> None:
    conn = await asyncpg.connect(
        host="127.0.0.1", port=port, user=user, password=password, database="d", ssl=False
    )
    await conn.close()


@pytest.mark.parametrize(
    ("method", "secret"),
    [(SCRAM, SCRAM_SECRET), (MD5, MD5_SECRET), (MD5, SCRAM_SECRET), (TRUST, None)],
)
async def test_the_right_password_logs_in(method: str, secret: str | None) -> None:
    async with listener(method, lambda user: secret) as port:
        await login(port)


@pytest.mark.parametrize(("method", "secret"), [(SCRAM, SCRAM_SECRET), (MD5, MD5_SECRET)])
async def test_a_wrong_password_or_unknown_user_gets_28p01_in_postgres_words(
    method: str, secret: str
) -> None:
    async with listener(method, lambda user: secret if user == "app" else None) as port:
        with pytest.raises(
            asyncpg.InvalidPasswordError, match='password authentication failed for user "app"'
        ):
            await login(port, password="wrong")
        with pytest.raises(
            asyncpg.InvalidPasswordError, match='password authentication failed for user "nobody"'
        ):
            await login(port, user="nobody")


def test_the_keys_for_the_server_login_come_only_from_a_proof_that_checked_out() -> None:
    auth = ClientAuth(SCRAM, "app", SCRAM_SECRET)
    auth.start()
    reply = auth.feed(b"p", b"SCRAM-SHA-256\0" + struct.pack("!i", 3) + b"xyz")
    assert auth.failed and reply.startswith(b"E") and auth.client_key is None
    assert b"s3cret" not in reply and SCRAM_SECRET.encode() not in reply


def test_dbproxy_answers_a_servers_md5_challenge_with_the_secret_alone() -> None:
    server = ClientAuth(MD5, "app", MD5_SECRET)  # (a server asking md5, as Postgres does)
    login = ServerLogin({"user": "app", "database": "d"}, md5=MD5_SECRET)
    login.start()
    answer = login.feed(server.start())
    assert answer[:1] == b"p" and b"s3cret" not in answer
    ok = server.feed(b"p", answer[5:])
    assert server.done
    login.feed(ok + _message(b"K", struct.pack("!ii", 7, 8)) + _message(b"Z", b"I"))
    assert login.ready and login.backend_key == (7, 8)
