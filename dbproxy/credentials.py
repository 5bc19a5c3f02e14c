"""Where a pooled listener finds a client's secret: an auth file, an auth query, or
nowhere (trust).

The auth file is pgbouncer's userlist.txt: a line per user, ``"name" "secret"``,
a double quote inside written twice; the secret as pg_authid keeps it
("SCRAM-SHA-256$...", "md5...") or a plain password (then made into the secret
the listener's auth type checks, once, when the file is read). The auth query
(pgbouncer's auth_query) runs as auth_user on the server the client is going
to, on one connection per server kept for it; what it returns is used again
for ``cache`` seconds. Nothing here logs a secret.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import asyncpg

from proxycore.config import ConfigError
from proxycore.servers import Server

from .auth import MD5, SCRAM, md5_secret
from .scram import Secret
from .settings import AuthSettings

log = logging.getLogger("dbproxy")

# how many times ``cache`` an answer may be used while it is asked again behind it
STALE = 6
# an auth query's connect and answer: a live server answers in milliseconds
QUERY_TIMEOUT = 1.0


class LookupFailed(Exception):
    """The auth query could not be run on that server (down, refused, timed out)."""


def parse_userlist(text: str, where: str) -> dict[str, str]:
    """pgbouncer's auth_file: ``"user" "secret"`` per line; other lines (comments) skipped."""
    users: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        fields = _quoted(line)
        if not fields:
            continue
        if len(fields) < 2:
            raise ConfigError(f'{where}:{number}: expected "user" "secret"')
        users[fields[0]] = fields[1]
    return users


def _quoted(line: str) -> list[str]:
    fields: list[str] = []
    i = 0
    while i < len(line):
        if line[i] != '"':
            if line[i] in ";#" and not fields:
                return []
            i += 1
            continue
        value: list[str] = []
        i += 1
        while i < len(line):
            if line[i] == '"':
                if line[i + 1 : i + 2] == '"':
                    value.append('"')
                    i += 2
                    continue
                break
            value.append(line[i])
            i += 1
        fields.append("".join(value))
        i += 1
    return fields


def as_secret(method: str, user: str, stored: str) -> str:
    """What the check of ``method`` needs from what a file or pg_authid holds: a
    plain password becomes a secret (SCRAM, or md5 for an md5 listener)."""
    if stored.startswith(("SCRAM-SHA-256$", "md5")) and len(stored) > 3:
        return stored
    if method == MD5:
        return md5_secret(user, stored)
    return str(Secret.of_password(stored))


class Secrets:
    def __init__(self, settings: AuthSettings, loop: asyncio.AbstractEventLoop) -> None:
        self.settings = settings
        self._loop = loop
        self._file: dict[str, str] = {}
        self._passwords: dict[str, str] = {}  # the file's plain passwords, for server logins
        self._cache: dict[tuple[str, str], tuple[float, str | None]] = {}
        # per server: the auth connection and the database it is on
        self._conns: dict[str, tuple[str, asyncpg.Connection]] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._refreshing: set[tuple[str, str]] = set()
        self.queries = 0  # auth queries run (not answered from the cache)
        self.query_errors = 0
        if settings.file is not None:
            self._read(settings.file, settings.type)

    def _read(self, path: Path, method: str) -> None:
        try:
            text = path.read_text()
        except OSError as exc:
            raise ConfigError(f"auth file {path}: {exc.strerror}") from None
        method = method if method in (MD5, SCRAM) else SCRAM
        for user, stored in parse_userlist(text, str(path)).items():
            self._file[user] = as_secret(method, user, stored)
            if self._file[user] != stored:
                self._passwords[user] = stored

    def in_file(self, user: str) -> bool:
        return user in self._file

    def password(self, user: str) -> str | None:
        """The user's plain password, when the auth file gave one."""
        return self._passwords.get(user)

    async def lookup(self, user: str, server: Server, database: str) -> str | None:
        """The secret of ``user`` (None: unknown, or no password); LookupFailed
        when ``server`` could not be asked. An answer younger than ``cache`` is
        used again; one up to STALE × ``cache`` old too, while the query runs
        again behind it (a server that has just frozen then costs a login no
        wait: nginx's proxy_cache_use_stale updating)."""
        secret = self._file.get(user)
        if secret is not None or self.settings.user is None:
            return secret
        key = (server.name, user)
        cached = self._cache.get(key)
        now = self._loop.time()
        if cached is not None:
            age = now - cached[0]
            if age < self.settings.cache:
                return cached[1]
            if age < STALE * self.settings.cache:
                if key not in self._refreshing:
                    self._refreshing.add(key)
                    self._loop.create_task(self._refresh(user, server, database))
                return cached[1]
        return await self._ask(user, server, database)

    async def _refresh(self, user: str, server: Server, database: str) -> None:
        try:
            await self._ask(user, server, database)
        except LookupFailed:
            pass  # logged; the stale answer ages out
        finally:
            self._refreshing.discard((server.name, user))

    async def _ask(self, user: str, server: Server, database: str) -> str | None:
        dbname = self.settings.dbname or database
        now = self._loop.time()
        lock = self._locks.setdefault(server.name, asyncio.Lock())
        async with lock:  # one query at a time on the server's auth connection
            try:
                secret = await self._query(server, dbname, user)
            except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
                self.query_errors += 1
                log.warning("auth query on %s for user %r failed: %r", server.name, user, exc)
                self._drop(server.name)
                raise LookupFailed(server.name) from exc
        if secret is not None:
            secret = as_secret(self.settings.type, user, secret)
        if self.settings.cache > 0:
            self._cache[(server.name, user)] = (now, secret)
        return secret

    async def _query(self, server: Server, dbname: str, user: str) -> str | None:
        held = self._conns.get(server.name)
        conn = None if held is None else held[1]
        if held is not None and (held[1].is_closed() or held[0] != dbname):
            self._drop(server.name)
            conn = None
        if conn is None:
            address = server.spec.address
            conn = await asyncpg.connect(
                host=address.host,
                port=address.port,
                user=self.settings.user,
                password=self.settings.password or None,
                database=dbname,
                timeout=QUERY_TIMEOUT,
                statement_cache_size=0,
                server_settings={"application_name": "dbproxy auth_query"},
            )
            self._conns[server.name] = (dbname, conn)
        self.queries += 1
        row = await conn.fetchrow(self.settings.query, user, timeout=QUERY_TIMEOUT)
        if row is None or len(row) < 2:
            return None
        secret = row[1]
        return secret if isinstance(secret, str) and secret else None

    def _drop(self, name: str) -> None:
        held = self._conns.pop(name, None)
        if held is not None:
            held[1].terminate()

    def forget(self, server_name: str) -> None:
        """A server went away: its auth connection and what it answered."""
        self._drop(server_name)
        for key in [k for k in self._cache if k[0] == server_name]:
            del self._cache[key]

    async def close(self) -> None:
        for name in list(self._conns):
            _, conn = self._conns.pop(name)
            try:
                await asyncio.wait_for(conn.close(), 1.0)
            except (OSError, TimeoutError, asyncpg.PostgresError):
                conn.terminate()
