"""A backend that records every request it parses, parsing as leniently as the
worst backends do: the smuggling detector behind `python -m bench edge`.

It obeys Transfer-Encoding over Content-Length whatever else the head says,
accepts bare LF, obs-fold, a space before the colon and any digits in
Content-Length, and keeps reading requests on the connection after a body. So
a request that a proxy forwards ambiguously shows up here as what a weak
backend would make of it: one request too many is a smuggled one.

python -m bench.recorder --port P --out FILE   (a JSON line per parsed request)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path

_DIGITS = re.compile(rb"[+-]?\d+")
_MAX_HEAD = 1024 * 1024


@dataclass
class Seen:
    """One request as the recorder parsed it."""

    conn: int
    method: str
    target: str
    version: str
    headers: list[tuple[str, str]]
    body: str

    def header(self, name: str) -> list[str]:
        return [v for n, v in self.headers if n.lower() == name.lower()]


class _Incomplete(Exception):
    pass


def _head_end(data: bytes) -> tuple[int, int] | None:
    """Where the head ends (its blank line) and where the body begins."""
    ends = [(i, i + len(m)) for m in (b"\r\n\r\n", b"\n\n") if (i := data.find(m)) >= 0]
    return min(ends) if ends else None


def parse_head(head: bytes) -> tuple[str, str, str, list[tuple[str, str]]]:
    lines = head.decode("latin-1").replace("\r\n", "\n").split("\n")
    method, _, rest = lines[0].partition(" ")
    target, _, version = rest.partition(" ")
    headers: list[tuple[str, str]] = []
    for line in lines[1:]:
        if line[:1] in (" ", "\t") and headers:  # obs-fold: joined to the line before
            name, value = headers[-1]
            headers[-1] = (name, value + " " + line.strip())
            continue
        name, _, value = line.partition(":")
        headers.append((name.strip(), value.strip()))
    return method, target, version, headers


def _chunked(data: bytes, start: int) -> tuple[bytes, int]:
    """A chunked body from ``start``: (body, where it ends); _Incomplete when short."""
    body, at = [], start
    while True:
        eol = data.find(b"\n", at)
        if eol < 0:
            raise _Incomplete
        size_text = data[at:eol].split(b";")[0].strip()
        size = int(size_text or b"0", 16)
        if size >= 1 << 63:
            raise ValueError("a chunk size no reader can wait for")
        at = eol + 1
        if size == 0:
            while True:  # trailers, up to a blank line
                eol = data.find(b"\n", at)
                if eol < 0:
                    raise _Incomplete
                line, at = data[at:eol].strip(), eol + 1
                if not line:
                    return b"".join(body), at
        if len(data) < at + size:
            raise _Incomplete
        body.append(data[at : at + size])
        at += size
        eol = data.find(b"\n", at)
        if eol < 0:
            raise _Incomplete
        at = eol + 1


def parse_request(data: bytes, conn: int) -> tuple[Seen, int] | None:
    """The first request in ``data`` and its length; None while it is not whole."""
    end = _head_end(data)
    if end is None:
        return None
    method, target, version, headers = parse_head(data[: end[0]])
    te = " ".join(v for n, v in headers if n.lower() == "transfer-encoding")
    lengths = [v for n, v in headers if n.lower() == "content-length"]
    try:
        if "chunked" in te.lower():
            body, stop = _chunked(data, end[1])
        else:
            digits = _DIGITS.match(lengths[0].encode()) if lengths else None
            size = max(0, int(digits.group())) if digits else 0
            if len(data) < end[1] + size:
                return None
            body, stop = data[end[1] : end[1] + size], end[1] + size
    except _Incomplete:
        return None
    except ValueError:  # a chunk size that is no number: take the rest as the body
        body, stop = data[end[1] :], len(data)
    return Seen(conn, method, target, version, headers, body.decode("latin-1")), stop


class Recorder:
    """An asyncio server: every parsed request goes to ``seen`` (and ``out``), and
    gets a 200 (a 403 to an Upgrade it is asked to refuse: any target with
    "refuse-upgrade" in it)."""

    def __init__(self, out: Path | None = None) -> None:
        self.seen: list[Seen] = []
        self._out = out
        self._ids = itertools.count(1)

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = next(self._ids)
        data = b""
        continued = False  # a 100 Continue was sent for the request being read
        with contextlib.suppress(ConnectionError):
            while True:
                parsed = parse_request(data, conn)
                if parsed is None:
                    if len(data) > _MAX_HEAD:
                        break
                    more = await reader.read(65536)
                    if not more:
                        break
                    data += more
                    if not continued and _head_end(data) and b"100-continue" in data.lower():
                        writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
                        continued = True
                    continue
                seen, used = parsed
                data = data[used:]
                continued = False
                self._record(seen)
                writer.write(_answer(seen))
                await writer.drain()
        writer.close()

    def _record(self, seen: Seen) -> None:
        self.seen.append(seen)
        if self._out is not None:
            with self._out.open("a") as out:
                out.write(json.dumps(asdict(seen)) + "\n")


def _answer(seen: Seen) -> bytes:
    if "refuse-upgrade" in seen.target:
        return b"HTTP/1.1 403 Forbidden\r\nContent-Length: 7\r\n\r\nrefused"
    body = json.dumps({"target": seen.target, "conn": seen.conn}).encode()
    head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
    return head % len(body) + (b"" if seen.method == "HEAD" else body)


def read_seen(path: Path) -> list[Seen]:
    """What a recorder process wrote to ``--out`` so far."""
    return _parse(path.read_bytes()) if path.exists() else []


def _parse(lines: bytes) -> list[Seen]:
    rows = [json.loads(line) for line in lines.splitlines() if line.strip()]
    return [Seen(**{**r, "headers": [tuple(h) for h in r["headers"]]}) for r in rows]


class SeenTail:
    """What a recorder process wrote to ``--out`` since the last call: a file
    read on from where it was left, not again from its start."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._at = 0

    def new(self) -> list[Seen]:
        if not self._path.exists():
            return []
        with self._path.open("rb") as f:
            f.seek(self._at)
            data = f.read()
        whole = data[: data.rfind(b"\n") + 1]  # a line still being written waits
        self._at += len(whole)
        return _parse(whole)


async def _main(port: int, out: Path) -> None:
    recorder = Recorder(out)
    server = await asyncio.start_server(recorder.serve, "127.0.0.1", port)
    async with server:
        await server.serve_forever()


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.recorder")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--out", type=Path, required=True, help="a JSON line per request parsed")
    args = p.parse_args()
    asyncio.run(_main(args.port, args.out))


if __name__ == "__main__":
    main()
