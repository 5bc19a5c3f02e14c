"""A throwaway PostgreSQL 15 cluster of the stack's settings (SCRAM for every
role but the superuser, which has trust on loopback), that a test may kill -9
and start again: for what the shared stack must not go through."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg

from stack import postgres as pg
from stack.control import pg_root_for
from tests.stackctl import free_ports


@dataclass
class Cluster:
    port: int
    root: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def datadir(self) -> Path:
        return self.root / "data"

    def start(self) -> None:
        pg.remove_stale_lock(self.datadir)
        argv = pg.server_argv(pg.find_bindir(), self.datadir)
        user = pg.run_as()
        self.proc = subprocess.Popen(
            argv if user is None else ["runuser", "-u", user, "--", *argv],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        deadline = time.monotonic() + 30
        while True:
            try:
                asyncio.run(self.sql("SELECT 1"))
                return
            except (OSError, asyncpg.PostgresError):
                assert time.monotonic() < deadline and self.proc.poll() is None, "no postgres"
                time.sleep(0.2)

    def kill(self) -> None:
        """kill -9 of the postmaster and its backends (its process group)."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()

    async def sql(self, query: str, *args: object, database: str = "postgres") -> object:
        conn = await pg.connect(self.port, database=database)
        try:
            return await conn.fetchval(query, *args)
        finally:
            await conn.close()


@contextlib.contextmanager
def cluster(tmp: Path, *statements: str) -> Iterator[Cluster]:
    """A running cluster, ``statements`` run in it as the superuser."""
    bindir, user = pg.find_bindir(), pg.run_as()
    root = pg_root_for(tmp)
    pg.initdb(bindir, root / "data", user)
    port = free_ports(1)[0]
    pg.configure(root / "data", port, publisher=False)
    c = Cluster(port, root)
    try:
        c.start()
        for statement in statements:
            asyncio.run(c.sql(statement))
        yield c
    finally:
        c.stop()
        shutil.rmtree(root, ignore_errors=True)
