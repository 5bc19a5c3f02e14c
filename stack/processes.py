"""Starting services detached, and stopping them by PID, with everything they started.

A service runs in a session of its own, so it outlives `python -m stack up`.
Some programs (postgres) put their children in sessions of their own too, so a
process-group signal is not enough: we walk /proc for the whole tree. A PID is
only trusted together with its start time, so a recycled PID is never signalled.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True, slots=True)
class ProcessRef:
    pid: int
    start_ticks: int  # field 22 of /proc/PID/stat: tells a PID's owner from a recycled one

    def to_json(self) -> dict[str, int]:
        return {"pid": self.pid, "start_ticks": self.start_ticks}

    @classmethod
    def from_json(cls, data: Mapping[str, int]) -> ProcessRef:
        return cls(pid=int(data["pid"]), start_ticks=int(data["start_ticks"]))


def _stat(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # The command name (field 2) may hold spaces and parentheses: split after its last ')'.
    head, _, tail = raw.rpartition(")")
    return [head.split(" ", 1)[0], head, *tail.split()]


def _state(fields: list[str]) -> str:
    return fields[2]


def _ppid(fields: list[str]) -> int:
    return int(fields[3])


def _start_ticks(fields: list[str]) -> int:
    return int(fields[21])


def ref_of(pid: int) -> ProcessRef | None:
    fields = _stat(pid)
    return None if fields is None else ProcessRef(pid, _start_ticks(fields))


def is_alive(ref: ProcessRef) -> bool:
    """True while the process runs; a zombie or a recycled PID is not alive."""
    fields = _stat(ref.pid)
    return fields is not None and _state(fields) != "Z" and _start_ticks(fields) == ref.start_ticks


def _children_map() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        fields = _stat(int(entry.name))
        if fields is not None:
            children.setdefault(_ppid(fields), []).append(int(entry.name))
    return children


def tree(ref: ProcessRef) -> list[int]:
    """The process and all its living descendants, parents before children."""
    if not is_alive(ref):
        return []
    children = _children_map()
    found, queue = [], [ref.pid]
    while queue:
        pid = queue.pop(0)
        found.append(pid)
        queue.extend(children.get(pid, ()))
    return found


def _signal_all(pids: Sequence[int], sig: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def kill_tree(ref: ProcessRef) -> None:
    """SIGKILL the process, its descendants and its process group, as `docker kill` would."""
    pids = tree(ref)
    _signal_all(pids, signal.SIGKILL)
    if pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(ref.pid, signal.SIGKILL)
    _wait_gone(pids, timeout=5.0)


def freeze_tree(ref: ProcessRef) -> list[int]:
    """SIGSTOP the process and every descendant, as `docker pause` freezes a
    container: alive and holding its sockets (the kernel still accepts
    connections for it), answering nothing. The PIDs stopped."""
    pids = tree(ref)
    _signal_all(pids, signal.SIGSTOP)
    return pids


def thaw_tree(ref: ProcessRef) -> list[int]:
    """SIGCONT what freeze_tree stopped (`docker unpause`)."""
    pids = tree(ref)
    _signal_all(pids, signal.SIGCONT)
    return pids


def is_frozen(ref: ProcessRef) -> bool:
    fields = _stat(ref.pid)
    return fields is not None and _state(fields) == "T" and _start_ticks(fields) == ref.start_ticks


def _wait_gone(pids: Sequence[int], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        alive = [p for p in pids if (f := _stat(p)) is not None and _state(f) != "Z"]
        if not alive:
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)


def stop(ref: ProcessRef, sig: int, timeout: float) -> bool:
    """Ask the process to stop with ``sig``; SIGKILL what is left after ``timeout``.

    True when it stopped by itself.
    """
    pids = tree(ref)
    if not pids:
        return True
    _signal_all(pids, signal.SIGCONT)  # a frozen process would not act on ``sig``
    _signal_all(pids[:1], sig)
    if _wait_gone(pids, timeout):
        return True
    kill_tree(ref)
    _signal_all(pids, signal.SIGKILL)  # descendants that outlived their parent
    return False


def spawn(
    argv: Sequence[str],
    *,
    log_path: Path,
    env: Mapping[str, str],
    user: str | None = None,
    cwd: Path | None = None,
) -> ProcessRef:
    """Start ``argv`` detached (own session, output to ``log_path``)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=dict(env),
            cwd=cwd,
            start_new_session=True,
            user=user,
            group=user,
            extra_groups=[] if user else None,
        )
    ref = ref_of(proc.pid)
    if ref is None:
        raise RuntimeError(f"{argv[0]} exited at once; see {log_path}")
    return ref
