"""The access log: a line per request, in nginx's combined format or as JSON.

    access_log = "/var/log/balance/access.log"   # or "-": lb's own log (stderr)
    access_log_format = "combined"               # or "json"

Buffered as nginx's `access_log PATH buffer=32k flush=1s`: lines gather in
memory and go to the file in one write when 32 KiB have gathered, a second after
the first of them, and at shutdown. The file is opened O_APPEND and only whole
lines are ever written, in one write() each time, so the lines of several
workers never interleave. SIGUSR1 reopens it (after logrotate moved it away),
as nginx does. A write of 32 KiB to a local file is what nginx's worker does on
its loop too.

combined: `$remote_addr - - [$time_local] "$request" $status $body_bytes_sent
"$http_referer" "$http_user_agent"`, then (as the common `main` extensions)
`$request_time rid=$request_id route=.. pool=.. server=.. tries=..`.
json: the same, and the upstream's connect and first-byte times, and whether
the request was hedged.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from pathlib import Path
from typing import Final

from mypy_extensions import i64

log = logging.getLogger("lb.access")

BUFFER: Final = 32 * 1024
FLUSH_AFTER: Final = 1.0
# nginx's combined, then $request_time and what lb adds
_COMBINED: Final = (
    b'%b - - [%b] "%b %b %b" %d %d "%b" "%b" %d.%03d rid=%b route=%b pool=%b server=%b tries=%d'
)
_MONTHS: Final = (
    "Jan",
    "Feb",
    "Mar",
    "Apr",
    "May",
    "Jun",
    "Jul",
    "Aug",
    "Sep",
    "Oct",
    "Nov",
    "Dec",
)


def escaped(value: bytes) -> bytes:
    """A request's bytes as nginx writes them in a log line: printable ASCII as
    it is, the rest, '"' and '\\' as \\xHH. One compiled pass over the bytes
    for the usual value, which has nothing to escape."""
    for i in range(len(value)):
        c: i64 = value[i]
        if c < 0x20 or c > 0x7E or c == 0x22 or c == 0x5C:
            return b"".join(
                bytes((b,)) if 0x20 <= b <= 0x7E and b not in (0x22, 0x5C) else b"\\x%02X" % b
                for b in value
            )
    return value


class AccessLog:
    def __init__(self, path: str, fmt: str, loop: asyncio.AbstractEventLoop) -> None:
        self.path = path
        self.json = fmt == "json"
        self._loop = loop
        self._fd = -1
        self._lines: list[bytes] = []
        self._size = 0
        self._flush_due: asyncio.TimerHandle | None = None
        self._stamp_second = -1
        self._stamp = b""
        if path != "-":
            self._open()

    def _open(self) -> None:
        Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def _time_local(self, now: float) -> bytes:
        second = int(now)
        if second != self._stamp_second:  # formatted once a second, not per line
            self._stamp_second = second
            t = time.localtime(second)
            offset = t.tm_gmtoff // 60
            sign = "+" if offset >= 0 else "-"
            self._stamp = (
                f"{t.tm_mday:02d}/{_MONTHS[t.tm_mon - 1]}/{t.tm_year}:"
                f"{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d} "
                f"{sign}{abs(offset) // 60:02d}{abs(offset) % 60:02d}"
            ).encode()
        return self._stamp

    def request(
        self,
        *,
        client_ip: bytes,
        method: bytes,
        target: bytes,
        http11: bool,
        status: int,
        body_bytes: int,
        referer: bytes,
        user_agent: bytes,
        request_time: float,
        request_id: bytes,
        route: bytes,
        pool: bytes,
        server: bytes,
        tries: int,
        connect_time: float,
        first_byte_time: float,
        hedged: bool,
    ) -> None:
        now = time.time()
        if self.json:
            line = json.dumps(
                {
                    "time": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(now)),
                    "remote_addr": client_ip.decode("latin-1"),
                    "request_id": request_id.decode("latin-1"),
                    "method": method.decode("latin-1"),
                    "target": target.decode("latin-1"),
                    "protocol": "HTTP/1.1" if http11 else "HTTP/1.0",
                    "status": status,
                    "body_bytes_sent": body_bytes,
                    "referer": referer.decode("latin-1"),
                    "user_agent": user_agent.decode("latin-1"),
                    "request_time": round(request_time, 6),
                    "route": route.decode(),
                    "pool": pool.decode(),
                    "server": server.decode(),
                    "tries": tries,
                    "upstream_connect_time": round(connect_time, 6),
                    "upstream_first_byte_time": round(first_byte_time, 6),
                    "hedged": hedged,
                },
                ensure_ascii=False,
            ).encode()
        else:
            # milliseconds as integers: a float's formatting costs more than the rest
            ms = int(request_time * 1000.0 + 0.5)
            line = _COMBINED % (
                client_ip,
                self._time_local(now),
                escaped(method),
                escaped(target),
                b"HTTP/1.1" if http11 else b"HTTP/1.0",
                status,
                body_bytes,
                escaped(referer),
                escaped(user_agent),
                ms // 1000,
                ms % 1000,
                request_id,
                route,
                pool,
                server,
                tries,
            )
        if self._fd < 0:
            log.info("%s", line.decode("latin-1"))
            return
        data = line + b"\n"
        self._lines.append(data)
        self._size += len(data)
        if self._size >= BUFFER:
            self.flush()
        elif self._flush_due is None:
            self._flush_due = self._loop.call_later(FLUSH_AFTER, self.flush)

    def flush(self) -> None:
        if self._flush_due is not None:
            self._flush_due.cancel()
            self._flush_due = None
        if not self._lines or self._fd < 0:
            return
        data = b"".join(self._lines)
        self._lines.clear()
        self._size = 0
        # (slices of bytes, not a memoryview: compiled, a memoryview loop here wrote twice)
        written = os.write(self._fd, data)
        while written < len(data):  # a regular file takes it all at once; a short write is finished
            written += os.write(self._fd, data[written:])

    def reopen(self) -> None:
        """SIGUSR1: what was gathered goes to the old file, then a new one is opened."""
        if self._fd < 0:
            return
        self.flush()
        os.close(self._fd)
        self._open()

    def close(self) -> None:
        self.flush()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
