"""A local stack for a benchmark: `python -m stack` on free ports, always taken down."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from stack.topology import Ports

from .procs import BenchError, free_port

REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True, slots=True)
class LocalStack:
    state_dir: Path
    ports: Ports
    check_password: str

    @property
    def entry(self) -> str:
        return f"http://127.0.0.1:{self.ports.entry}"


def _stack(args: list[str], state_dir: Path, *, check: bool = True) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "stack", *args, "--state-dir", str(state_dir)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if check and result.returncode != 0:
        raise BenchError(f"stack {args[0]} failed: {result.stderr.strip()}")


@contextlib.contextmanager
def local_stack(work: Path, *, profile: str, users: int) -> Iterator[LocalStack]:
    state_dir = work / f"stack-{profile}"
    ports = Ports(*(free_port() for _ in Ports.names()))
    overrides = [
        arg
        for name in Ports.names()
        for arg in ("--port", f"{name}={getattr(ports, name.replace('-', '_'))}")
    ]
    try:
        _stack(["up", "--proxies", profile, "--users", str(users), *overrides], state_dir)
        topology = json.loads((state_dir / "state.json").read_text())["topology"]
        yield LocalStack(state_dir, ports, topology["credentials"]["check_password"])
    finally:
        _stack(["down", "--purge"], state_dir, check=False)
