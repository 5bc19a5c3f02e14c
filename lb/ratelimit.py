"""Rate limits with nginx's limit_req semantics, held for the whole server.

nginx's leaky bucket, per key (a client address, a header's value): each
request adds one to the key's excess, which drains at ``rate`` a second; a
request that finds the excess at or under ``burst`` passes, delayed until the
excess it leaves has drained to nothing (or at once, with ``nodelay``); one
that would take it past ``burst`` is refused. In thousandths, as nginx keeps it.

With workers the limit holds for the server, not for each worker (a client's
connections land on any worker): the buckets live in a file in shared memory
(/dev/shm) that every worker of the supervisor maps, a fixed table of slots
found by a stable hash of the key, each read and written under an exclusive
lock on the file (flock, as nginx takes its zone's mutex): two system calls for
a request of a limited route, and nothing for the others. One process keeps its
buckets in its own memory, unlocked. A full table gives the slot that has
drained longest to the new key (nginx drops the least recently used).
"""

from __future__ import annotations

import fcntl
import hashlib
import mmap
import os
import struct
import time
from pathlib import Path
from typing import Final

from .settings import LimitConfig

SLOTS: Final = 65_536  # keys each limit tracks at once
PROBES: Final = 8
_SLOT: Final = struct.Struct("<QqQ")  # key hash, excess (thousandths), last (ms)
PASS: Final = 0.0
REFUSE: Final = -1.0


def _now_ms() -> int:
    return int(time.monotonic() * 1000)  # CLOCK_MONOTONIC: one clock for every process


def key_hash(key: bytes) -> int:
    """A key's slot key: stable across processes (Python's hash() is not)."""
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") or 1


class Limiter:
    """One route's limit: ``admit`` says what a request with ``key`` does: PASS,
    REFUSE, or the seconds to delay it by."""

    def __init__(self, config: LimitConfig, shared: Path | None = None) -> None:
        self.config = config
        # the header whose value is the key (lowercase), for key = "header:NAME"
        self.header = config.key[7:].encode() if config.key.startswith("header:") else b""
        self._rate = int(config.rate * 1000)  # requests per 1,000 s (nginx: r/s * 1000)
        self._burst = config.burst * 1000
        self.refused = 0
        self.delayed = 0
        self._fd = -1
        if shared is None:
            self._table = mmap.mmap(-1, SLOTS * _SLOT.size)
        else:
            self._fd = os.open(shared, os.O_RDWR | os.O_CREAT, 0o600)
            if os.fstat(self._fd).st_size < SLOTS * _SLOT.size:
                os.ftruncate(self._fd, SLOTS * _SLOT.size)
            self._table = mmap.mmap(self._fd, SLOTS * _SLOT.size)

    def admit(self, key: bytes, now_ms: int = -1) -> float:
        now = _now_ms() if now_ms < 0 else now_ms
        wanted = key_hash(key)
        if self._fd >= 0:
            fcntl.flock(self._fd, fcntl.LOCK_EX)
        try:
            return self._admit(wanted, now)
        finally:
            if self._fd >= 0:
                fcntl.flock(self._fd, fcntl.LOCK_UN)

    def _admit(self, wanted: int, now: int) -> float:
        table = self._table
        first = wanted % SLOTS
        at, excess, last, oldest_at, oldest = -1, 0, now, -1, now + 1
        for probe in range(PROBES):
            offset = ((first + probe) % SLOTS) * _SLOT.size
            key, slot_excess, slot_last = _SLOT.unpack_from(table, offset)
            if key == wanted:
                at, excess, last = offset, slot_excess, slot_last
                break
            drained = key == 0 or slot_excess - self._rate * (now - slot_last) // 1000 <= 0
            if drained and (oldest_at < 0 or slot_last < oldest):
                oldest_at, oldest = offset, slot_last
        if at < 0:  # a new key, in the emptiest slot of those probed: it passes (nginx)
            at = oldest_at if oldest_at >= 0 else first * _SLOT.size
            _SLOT.pack_into(table, at, wanted, 0, now)
            return PASS
        excess = max(0, excess - self._rate * max(0, now - last) // 1000 + 1000)
        if excess > self._burst:
            self.refused += 1
            return REFUSE
        _SLOT.pack_into(table, at, wanted, excess, now)
        if self.config.nodelay or excess == 0:
            return PASS
        self.delayed += 1
        return excess / self._rate  # seconds until the excess has drained

    def close(self) -> None:
        self._table.close()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def _shared_dir() -> Path:
    return Path("/dev/shm") if Path("/dev/shm").is_dir() else Path("/tmp")


def shared_path(supervisor_pid: int, route: str) -> Path:
    """Where a supervisor's workers share a route's buckets (removed when it
    stops; after a crash or SIGKILL, by the next supervisor's start)."""
    safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in route)
    return _shared_dir() / f"balance-lb-{supervisor_pid}-{safe}.limit"


def remove_stale() -> int:
    """Remove the bucket files of supervisors that are gone (killed without their
    shutdown); returns how many. A live process of that PID keeps its files."""
    removed = 0
    for path in _shared_dir().glob("balance-lb-*-*.limit"):
        pid = path.name.split("-")[2]
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
            continue  # alive
        except ProcessLookupError:
            pass
        except PermissionError:
            continue  # alive, another user's
        path.unlink(missing_ok=True)
        removed += 1
    return removed
