"""Waiting until a started service really serves: a query answers, /health answers."""

from __future__ import annotations

import asyncio
import socket
import time
from pathlib import Path

import aiohttp
import asyncpg

from .errors import StackError
from .postgres import connect
from .processes import ProcessRef, is_alive
from .topology import Readiness, ServiceSpec


def ensure_port_free(port: int, service: str) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # As the servers themselves bind: TIME_WAIT leftovers do not count as taken.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            raise StackError(
                f"port {port} for {service} is already in use; free it or choose another "
                f"with --port (see `python -m stack up --help`)"
            ) from None


def log_tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except FileNotFoundError:
        return "(no log)"
    return "\n".join(text[-lines:])


async def _probe(ready: Readiness) -> bool:
    try:
        if ready.kind == "postgres":
            if ready.login is None:
                conn = await connect(ready.port, timeout=1.0)
            else:
                user, password, database = ready.login
                conn = await asyncpg.connect(
                    host="127.0.0.1",
                    port=ready.port,
                    user=user,
                    password=password,
                    database=database,
                    timeout=1.0,
                )
            try:
                return await conn.fetchval("SELECT 1") == 1
            finally:
                await conn.close()
        timeout = aiohttp.ClientTimeout(total=1.0)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            url = f"http://127.0.0.1:{ready.port}{ready.path}"
            async with session.get(url) as response:
                return response.status == 200
    except Exception:
        # Not ready yet, whatever the reason; the deadline below ends the wait.
        return False


async def _all_ready(spec: ServiceSpec) -> bool:
    for ready in spec.ready:
        if not await _probe(ready):
            return False
    return True


async def wait_ready(spec: ServiceSpec, ref: ProcessRef, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if await _all_ready(spec):
            return
        if not is_alive(ref):
            raise StackError(
                f"{spec.name} exited while starting; its log ends:\n{log_tail(spec.log)}"
            )
        if time.monotonic() > deadline:
            raise StackError(
                f"{spec.name} did not get ready within {timeout:.0f}s; its log ends:\n"
                f"{log_tail(spec.log)}"
            )
        await asyncio.sleep(0.1)
