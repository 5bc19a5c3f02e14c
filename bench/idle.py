"""What an idle keep-alive connection costs a proxy in memory: lb against nginx.

Each proxy, one worker, in front of the same upstreams: 200 clients connect,
send one GET each and keep the connection open; the proxy's resident memory
(VmRSS of its whole process tree) is read; 8,000 more do the same; it is read
again. The growth divided by 8,000 is what one more idle client costs, with
start-up and first-use allocations left out. Kernel socket buffers are not in
RSS, for either proxy. nginx preallocates its connection structures for
worker_connections at start, so its growth is what a connection touches: the
pages of that array, its buffers and pools.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .procs import running, tree_sum

IDLE_PROXIES = ("nginx", "lb")
BASE, MORE = 200, 8_000
_BATCH = 500  # connections opened at once
_SETTLE = 1.0  # seconds for the proxy to finish with the last ones before RSS is read
_REQUEST = b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"

Clients = list[tuple[asyncio.StreamReader, asyncio.StreamWriter]]


def _vm_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0  # (a zombie has none)


def rss_kib(pid: int) -> int:
    """VmRSS of ``pid`` and all its descendants, KiB."""
    return tree_sum(pid, _vm_rss)


async def _client(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A client that has had one response and keeps its connection open."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(_REQUEST)
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    await reader.readexactly(length)
    if not head.startswith(b"HTTP/1.1 200"):
        raise RuntimeError(f"the proxy answered {head[:40]!r}")
    return reader, writer


async def _open(port: int, count: int, clients: Clients) -> None:
    for start in range(0, count, _BATCH):
        batch = min(_BATCH, count - start)
        clients.extend(await asyncio.gather(*(_client(port) for _ in range(batch))))


async def _grow(port: int, pid: int, base: int, more: int) -> tuple[int, int]:
    clients: Clients = []
    try:
        await _open(port, base, clients)
        await asyncio.sleep(_SETTLE)
        before = rss_kib(pid)
        await _open(port, more, clients)
        await asyncio.sleep(_SETTLE)
        after = rss_kib(pid)
    finally:
        for _, writer in clients:
            writer.close()
    return before, after


def measure_idle(
    name: str,
    argv: list[str],
    port: int,
    core: int | None,
    work: Path,
    base: int = BASE,
    more: int = MORE,
) -> dict[str, Any]:
    """One proxy started by ``argv`` (listening on ``port``): its RSS growth per
    idle keep-alive connection, from ``base`` clients to ``base + more``."""
    with running(argv, core=core, port=port, log=work / f"idle-{name}.log") as proc:
        before, after = asyncio.run(_grow(port, proc.pid, base, more))
    return {
        "proxy": name,
        "pid": proc.pid,
        "connections": more,
        "rss_before_kib": before,
        "rss_after_kib": after,
        "kib_per_connection": round((after - before) / more, 2),
    }


def run_idle(
    argv_of: Callable[[str, int], list[str]],
    free_port: Callable[[], int],
    core: int | None,
    work: Path,
    say: Callable[[str], None],
) -> dict[str, Any]:
    """Every proxy of IDLE_PROXIES, ``argv_of(name, port)`` starting it."""
    rows = {}
    for name in IDLE_PROXIES:
        say(f"idle connections: {name} ({BASE:,} then {MORE:,} more, one GET each)")
        port = free_port()
        rows[name] = measure_idle(name, argv_of(name, port), port, core, work)
    return {"date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "proxies": rows}


def table(result: dict[str, Any]) -> str:
    lines = [
        "| proxy | RSS with 200 clients | with 8,200 | per idle keep-alive connection |",
        "|---|---:|---:|---:|",
    ]
    for name, m in result["proxies"].items():
        lines.append(
            f"| {name} | {m['rss_before_kib'] / 1024:.1f} MiB | {m['rss_after_kib'] / 1024:.1f} MiB"
            f" | {m['kib_per_connection']:.2f} KiB |"
        )
    return "\n".join(lines)
