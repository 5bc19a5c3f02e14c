"""lb's own CPU per request, without sockets: a developer's yardstick for the hot path.

    .venv/bin/python scripts/lb_cost.py [--requests 300000] [--config lb.toml] [--target /path]

Drives lb's real classes (ClientConnection, Exchange, UpstreamConnection, the
pool, the balancer and its metrics) with a GET and a small keep-alive response,
over stand-in transports that only keep what is written. What it prints is the
Python (or compiled) work per request with the kernel and the loop taken away:
quick and steady enough to compare one change with the next, where `python -m
bench http` takes minutes and swings by a few percent. It is not a benchmark
against anything, and bench does not use it (bench talks to processes only).
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import sys
import time
from pathlib import Path
from typing import Any

import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.upstream import response
from lb.accesslog import AccessLog
from lb.app import Balancer
from lb.client import ClientConnection
from lb.config import from_args, parser
from lb.upstream import UpstreamConnection
from proxycore.compiled import hot_path

REQUEST = b"GET %b HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n\r\n"
# What bench's upstreams answer (its Content-Length counts the newline).
RESPONSE = response("up1")


class KeptWrites:
    """A transport that keeps what is written and does nothing else."""

    def __init__(self) -> None:
        self.out: list[bytes] = []
        self.closing = False

    def write(self, data: bytes) -> None:
        self.out.append(data)

    def writelines(self, data: list[bytes]) -> None:
        self.out.extend(data)

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def is_closing(self) -> bool:
        return self.closing

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 40000) if name == "peername" else default

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def can_write_eof(self) -> bool:
        return True

    def close(self) -> None:
        self.closing = True

    abort = close


async def measure(requests: int, config: Path | None, target: bytes) -> float:
    """``config``: a file of one pool (its first) with routes, an access log ...
    instead of the flags' two servers; ``target``: what the request asks for."""
    loop = asyncio.get_running_loop()
    flags = ["--listen", "127.0.0.1:1", "--server", "a=127.0.0.1:2", "--server", "b=127.0.0.1:3"]
    args = parser().parse_args(["--config", str(config)] if config else flags)
    lb = Balancer(from_args(args), loop)
    if lb.config.access_log:
        lb.state.access = AccessLog(lb.config.access_log, lb.config.access_log_format, loop)
    lb._use_routes(lb.config)  # what start() does before it listens
    pool = next(iter(lb.pools.values()))
    request = REQUEST % target
    upstreams: list[tuple[UpstreamConnection, KeptWrites]] = []
    for server in pool.servers:
        for _ in range(2):
            conn = UpstreamConnection(server, pool.conns)
            transport = KeptWrites()
            conn.connection_made(transport)  # type: ignore[arg-type]
            pool.conns.give(conn, loop.time())
            upstreams.append((conn, transport))
    client = ClientConnection(lb.state)
    client_transport = KeptWrites()
    client.connection_made(client_transport)  # type: ignore[arg-type]

    def one() -> None:
        client.data_received(request)
        for conn, transport in upstreams:
            if transport.out:
                transport.out.clear()
                conn.data_received(RESPONSE)
                break
        else:
            raise SystemExit("lb sent nothing upstream")
        if not client_transport.out:
            raise SystemExit("lb answered nothing")
        client_transport.out.clear()

    for _ in range(2000):  # warm up: pools, caches, the allocator
        one()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_utime
    for _ in range(requests):
        one()
    used = resource.getrusage(resource.RUSAGE_SELF).ru_utime - before
    return used / requests * 1e6


def main() -> None:
    p = argparse.ArgumentParser(prog="scripts/lb_cost.py")
    p.add_argument("--requests", type=int, default=300_000)
    p.add_argument("--config", type=Path, help="an lb file to run instead of two servers")
    p.add_argument("--target", default="/", help="the request's target (default /)")
    args = p.parse_args()
    started = time.perf_counter()
    us = uvloop.run(measure(args.requests, args.config, args.target.encode()))
    print(
        f"lb, hot path {hot_path()}: {us:.2f} µs of CPU per request "
        f"({args.requests} requests in {time.perf_counter() - started:.1f} s)"
    )


if __name__ == "__main__":
    main()
