"""`python -m bench edge`: hostile and odd HTTP/1.1 inputs, sent byte for byte to
lb, nginx and HAProxy in front of the same recording backend (bench/recorder.py,
which parses as leniently as the weakest backends). For each input and proxy:
what the client got (statuses, or a close, or silence), how soon, and what
reached the backend. A request that reaches the backend more often than the
client sent it is a smuggled one.

Each proxy runs as the classic profile's configuration would (nginx with
`proxy_set_header Host $host`, HAProxy in `mode http` with `option forwardfor`),
with their 16 KiB head limits, as lb's default.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .procs import NGINX_HEAD, free_port, require, running
from .recorder import Seen, read_seen

PROXIES = ("lb", "nginx", "haproxy")
# How long a client waits for more after the last byte it got: an input no
# proxy answers within this is reported as silence.
QUIET = 1.5
# Time for a forwarded request to reach the backend after the client's answer.
SETTLE = 0.15


@dataclass(frozen=True)
class Vector:
    name: str
    group: str
    about: str
    data: bytes
    requests: int = 1  # how many requests the client means to send
    body_after: bytes = b""  # sent after ``pause`` (100-continue, a body cut short)
    pause: float = 0.0
    half_close: bool = False  # shut the write side after the last byte
    head: bool = False  # a HEAD: its response has no body
    watch: tuple[str, ...] = ()  # what of the forwarded request the table shows ("target", headers)


def _req(target: str = "/v", extra: str = "", method: str = "GET", version: str = "1.1") -> bytes:
    return f"{method} {target} HTTP/{version}\r\nHost: a.example\r\n{extra}\r\n".encode()


def _post(head: str, body: bytes) -> bytes:
    return b"POST /v HTTP/1.1\r\nHost: a.example\r\n" + head.encode() + b"\r\n" + body


SMUGGLED = b"GET /v/smuggled HTTP/1.1\r\nHost: a.example\r\n\r\n"
# A body that holds a whole request after an empty chunk: what a backend that
# obeys Transfer-Encoding reads as a second request, when a proxy went by length.
HIDDEN = b"0\r\n\r\n" + SMUGGLED
WEBSOCKET = "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"

VECTORS: tuple[Vector, ...] = (
    # -- framing: the ways to make two parsers disagree on where a request ends
    Vector(
        "cl-te",
        "framing",
        "Content-Length and Transfer-Encoding: chunked",
        _post(f"Content-Length: {len(HIDDEN)}\r\nTransfer-Encoding: chunked\r\n", HIDDEN),
    ),
    Vector(
        "te-cl",
        "framing",
        "Transfer-Encoding: chunked, then Content-Length",
        _post("Transfer-Encoding: chunked\r\nContent-Length: 3\r\n", b"5\r\nhello\r\n0\r\n\r\n"),
    ),
    Vector(
        "cl-cl-differ",
        "framing",
        "two Content-Lengths that differ",
        _post(f"Content-Length: 5\r\nContent-Length: {5 + len(SMUGGLED)}\r\n", b"hello" + SMUGGLED),
    ),
    Vector(
        "cl-cl-same",
        "framing",
        "two equal Content-Lengths",
        _post("Content-Length: 5\r\nContent-Length: 5\r\n", b"hello"),
    ),
    Vector("cl-plus", "framing", "Content-Length: +5", _post("Content-Length: +5\r\n", b"hello")),
    Vector("cl-hex", "framing", "Content-Length: 0x5", _post("Content-Length: 0x5\r\n", b"hello")),
    Vector(
        "cl-list", "framing", "Content-Length: 5, 5", _post("Content-Length: 5, 5\r\n", b"hello")
    ),
    Vector(
        "cl-negative", "framing", "Content-Length: -1", _post("Content-Length: -1\r\n", SMUGGLED)
    ),
    Vector(
        "te-chunked-identity",
        "framing",
        "Transfer-Encoding: chunked, identity",
        _post("Transfer-Encoding: chunked, identity\r\n", b"5\r\nhello\r\n0\r\n\r\n"),
    ),
    Vector(
        "te-xchunked",
        "framing",
        "Transfer-Encoding: xchunked",
        _post("Transfer-Encoding: xchunked\r\n", b"5\r\nhello\r\n0\r\n\r\n"),
    ),
    Vector(
        "te-space-colon",
        "framing",
        "`Transfer-Encoding : chunked` (space before the colon) beside Content-Length",
        _post("Content-Length: 48\r\nTransfer-Encoding : chunked\r\n", b"0\r\n\r\n" + SMUGGLED),
    ),
    Vector(
        "te-http10",
        "framing",
        "Transfer-Encoding: chunked in an HTTP/1.0 request",
        b"POST /v HTTP/1.0\r\nHost: a.example\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5\r\nhello\r\n0\r\n\r\n",
    ),
    Vector(
        "connection-cl",
        "framing",
        "`Connection: Content-Length` (a hop-by-hop claim on the framing)",
        _post(f"Content-Length: {len(SMUGGLED)}\r\nConnection: Content-Length\r\n", SMUGGLED),
    ),
    Vector(
        "chunk-overflow",
        "framing",
        "a chunk size past 64 bits",
        _post("Transfer-Encoding: chunked\r\n", b"10000000000000005\r\nhello\r\n0\r\n\r\n"),
    ),
    Vector(
        "chunk-ext-bad",
        "framing",
        "a chunk extension with an unterminated quote",
        _post("Transfer-Encoding: chunked\r\n", b'5;a="b\r\nhello\r\n0\r\n\r\n'),
    ),
    Vector(
        "chunk-bare-lf",
        "framing",
        "chunk lines ended by a bare LF",
        _post("Transfer-Encoding: chunked\r\n", b"5\nhello\n0\n\n"),
    ),
    Vector(
        "trailers",
        "framing",
        "a chunked body with a trailer field",
        _post("Transfer-Encoding: chunked\r\n", b"5\r\nhello\r\n0\r\nX-Trailer: 1\r\n\r\n"),
    ),
    # -- the head's syntax
    Vector("bare-lf", "syntax", "head lines ended by a bare LF", b"GET /v HTTP/1.1\nHost: a\n\n"),
    Vector("obs-fold", "syntax", "a folded header line", _req(extra="X-Fold: a\r\n b\r\n")),
    Vector("nul-in-value", "syntax", "NUL in a header value", _req(extra="X-Nul: a\x00b\r\n")),
    Vector("cr-in-value", "syntax", "a bare CR in a header value", _req(extra="X-Cr: a\rb\r\n")),
    Vector("space-in-name", "syntax", "a space inside a header name", _req(extra="X Y: 1\r\n")),
    Vector(
        "space-before-colon", "syntax", "a space before a header's colon", _req(extra="X-A : 1\r\n")
    ),
    Vector(
        "no-host", "syntax", "HTTP/1.1 without Host", b"GET /v HTTP/1.1\r\n\r\n", watch=("host",)
    ),
    Vector("two-hosts", "syntax", "two Host headers", _req(extra="Host: b.example\r\n")),
    Vector(
        "bad-host",
        "syntax",
        "a Host with a space and an @ in it",
        b"GET /v HTTP/1.1\r\nHost: evil.example@a.example b\r\n\r\n",
    ),
    Vector(
        "http10-no-host",
        "syntax",
        "HTTP/1.0 without Host",
        b"GET /v HTTP/1.0\r\n\r\n",
        watch=("host",),
    ),
    Vector("http09", "syntax", "an HTTP/0.9 request line (no version)", b"GET /v\r\n"),
    Vector(
        "http12",
        "syntax",
        "HTTP/1.2 (a higher minor version)",
        _req(version="1.2"),
        watch=("version",),
    ),
    Vector("http20", "syntax", "HTTP/2.0 in an HTTP/1 request line", _req(version="2.0")),
    Vector("lowercase-method", "syntax", "a method in lowercase", _req(method="get")),
    Vector("raw-utf8", "syntax", "raw UTF-8 in the target", _req("/v?q=Иван"), watch=("target",)),
    Vector("no-slash", "syntax", "a target without a leading slash", _req("v")),
    Vector(
        "absolute-form",
        "syntax",
        "an absolute-form target naming another host than Host",
        _req("http://evil.example/v/abs"),
        watch=("target", "host"),
    ),
    Vector("asterisk", "syntax", "OPTIONS *", _req("*", method="OPTIONS")),
    Vector("connect", "syntax", "CONNECT", _req("evil.example:443", method="CONNECT")),
    # -- hop-by-hop headers a client names in Connection
    Vector(
        "connection-host",
        "hop-by-hop",
        "`Connection: keep-alive, Host` (deletes Host where the list is obeyed)",
        _req("/v/connection-host", "Connection: keep-alive, Host\r\n"),
        watch=("host",),
    ),
    Vector(
        "connection-xff",
        "hop-by-hop",
        "`Connection: X-Forwarded-For` beside a forged X-Forwarded-For",
        _req("/v/connection-xff", "X-Forwarded-For: 10.9.9.9\r\nConnection: X-Forwarded-For\r\n"),
        watch=("x-forwarded-for",),
    ),
    Vector(
        "connection-request-id",
        "hop-by-hop",
        "`Connection: X-Request-ID` beside a client's X-Request-ID",
        _req("/v/connection-rid", "X-Request-ID: trace-1\r\nConnection: X-Request-ID\r\n"),
        watch=("x-request-id",),
    ),
    # -- sizes
    Vector(
        "headers-64k",
        "size",
        "64 KiB of headers (64 of 1 KiB)",
        _req(extra="".join(f"X-H{i}: {'a' * 1000}\r\n" for i in range(64))),
    ),
    Vector(
        "headers-500",
        "size",
        "500 small headers",
        _req(extra="".join(f"X-H{i}: 1\r\n" for i in range(500))),
    ),
    Vector("url-8k", "size", "an 8 KiB target", _req("/v?" + "a" * 8192)),
    # -- flow over a connection
    Vector(
        "pipeline-50",
        "flow",
        "50 pipelined GETs in one write",
        b"".join(_req(f"/v/p{i}") for i in range(50)),
        requests=50,
    ),
    Vector(
        "expect-100",
        "flow",
        "`Expect: 100-continue`, the body after a pause",
        _post("Content-Length: 5\r\nExpect: 100-continue\r\n", b""),
        body_after=b"hello",
        pause=0.3,
    ),
    Vector("head", "flow", "HEAD", _req(method="HEAD"), head=True),
    Vector(
        "half-close-mid-body",
        "flow",
        "the client shuts its write side halfway through a body",
        _post("Content-Length: 10\r\n", b"hello"),
        half_close=True,
    ),
    Vector(
        "half-close-after",
        "flow",
        "a whole GET, then the client shuts its write side",
        _req(),
        half_close=True,
    ),
    Vector(
        "upgrade-refused-pipelined",
        "flow",
        "an Upgrade the backend refuses (403), a GET pipelined behind it",
        _req("/v/refuse-upgrade", "Connection: Upgrade\r\nUpgrade: websocket\r\n" + WEBSOCKET)
        + _req("/v/after-upgrade"),
        requests=2,
    ),
)


@dataclass
class Answer:
    """What one proxy did with one vector."""

    statuses: list[int] = field(default_factory=list)  # final responses, in order
    interim: list[int] = field(default_factory=list)  # 1xx
    closed: bool = False  # the proxy closed the connection
    first_answer_s: float | None = None  # the first byte back, or the close
    reached: list[dict[str, Any]] = field(default_factory=list)  # what the backend parsed

    @property
    def refused(self) -> bool:
        return not self.reached

    def cell(self) -> str:
        said = "+".join(str(s) for s in self.statuses)
        if not said:
            said = "close" if self.closed else f"silent {QUIET:g}s"
        elif len(set(self.statuses)) == 1 and len(self.statuses) > 3:
            said = f"{len(self.statuses)}×{self.statuses[0]}"
        forwarded = f"{len(self.reached)} fwd" if self.reached else "none fwd"
        shown = [
            f"{k}: {', '.join(_printable(x) for x in v) or '(none)'}"
            for r in self.reached[:1]
            for k, v in r["watched"].items()
        ]
        return f"{said} · {forwarded}" + "".join(f" · {w}" for w in shown)


@dataclass
class _Read:
    finals: list[int] = field(default_factory=list)
    interim: list[int] = field(default_factory=list)
    partial: bool = False  # the data ends inside a response
    closing: bool = False  # the last final response said Connection: close


def _printable(text: str) -> str:
    """What the recorder read (latin-1), raw bytes past ASCII shown as \\xNN."""
    return text.encode("latin-1").decode("ascii", "backslashreplace")


def _responses(data: bytes, head: bool) -> _Read:
    read = _Read()
    at = 0
    while at < len(data):
        end = data.find(b"\r\n\r\n", at)
        if end < 0:
            read.partial = True
            return read
        lines = data[at:end].split(b"\r\n")
        try:
            status = int(lines[0].split()[1])
        except (IndexError, ValueError):
            read.partial = True
            return read
        at = end + 4
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            headers[name.strip().lower()] = value.strip()
        if 100 <= status < 200:
            read.interim.append(status)
            continue
        read.finals.append(status)
        read.closing = headers.get(b"connection", b"").lower() == b"close"
        if head or status in (204, 304):
            continue
        if b"content-length" in headers:
            at += int(headers[b"content-length"])
        elif headers.get(b"transfer-encoding", b"").lower() == b"chunked":
            while True:
                eol = data.find(b"\r\n", at)
                if eol < 0:
                    read.partial = True
                    return read
                size = int(data[at:eol].split(b";")[0], 16)
                at = eol + 2 + size + 2
                if size == 0:
                    break
        else:
            return read  # to the close
        if at > len(data):
            read.partial = True
    return read


async def probe(port: int, vector: Vector) -> Answer:
    """Send ``vector`` on a new connection; read until the answers it asked for
    came, the proxy closed, or QUIET passed without a byte."""
    answer = Answer()
    started = time.monotonic()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    got = b""
    try:
        writer.write(vector.data)
        if vector.body_after:
            await asyncio.sleep(vector.pause)
            writer.write(vector.body_after)
        if vector.half_close:
            writer.write_eof()
        while True:
            try:
                more = await asyncio.wait_for(reader.read(65536), QUIET)
            except TimeoutError:
                break
            except ConnectionError:
                more = b""
            if answer.first_answer_s is None:
                answer.first_answer_s = round(time.monotonic() - started, 3)
            if not more:
                answer.closed = True
                break
            got += more
            read = _responses(got, vector.head)
            # all answered; when the last said it closes, the close is read too
            if len(read.finals) >= vector.requests and not read.partial and not read.closing:
                break
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    read = _responses(got, vector.head)
    answer.statuses, answer.interim = read.finals, read.interim
    return answer


# -- the proxies, configured as the classic profile and lb.toml are ----------------

NGINX_CONF = (
    NGINX_HEAD
    + """  client_header_timeout 10s;
  large_client_header_buffers 4 16k;
  map $http_upgrade $balance_connection {{ default upgrade; "" ""; }}
  upstream backend {{ server 127.0.0.1:{backend}; keepalive 16; }}
  server {{
    listen 127.0.0.1:{port};
    location / {{
      proxy_pass http://backend;
      proxy_http_version 1.1;
      proxy_set_header Connection $balance_connection;
      proxy_set_header Upgrade $http_upgrade;
      proxy_set_header Host $host;
      proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
      proxy_read_timeout 10s;
    }}
  }}
}}
"""
)

HAPROXY_CFG = """
global
  maxconn 1024
defaults
  mode http
  timeout connect 1s
  timeout client 10s
  timeout server 10s
  timeout http-request 10s
  option http-keep-alive
frontend web
  bind 127.0.0.1:{port}
  option forwardfor
  default_backend backend
backend backend
  server recorder 127.0.0.1:{backend}
"""

LB_TOML = """
listen = "127.0.0.1:{port}"
admin = "127.0.0.1:{admin}"
{settings}
[[server]]
name = "recorder"
address = "127.0.0.1:{backend}"
"""


def proxy_argv(name: str, work: Path, port: int, backend: int, lb_settings: str = "") -> list[str]:
    if name == "nginx":
        conf = work / "nginx.conf"
        conf.write_text(
            NGINX_CONF.format(dir=work, name="nginx", port=port, backend=backend, workers=1)
        )
        return ["nginx", "-c", str(conf), "-p", str(work), "-e", str(work / "nginx-error.log")]
    if name == "haproxy":
        cfg = work / "haproxy.cfg"
        cfg.write_text(HAPROXY_CFG.format(port=port, backend=backend))
        return ["haproxy", "-db", "-f", str(cfg)]
    if name == "lb":
        toml = work / "lb.toml"
        toml.write_text(
            LB_TOML.format(port=port, admin=free_port(), backend=backend, settings=lb_settings)
        )
        return [sys.executable, "-m", "lb", "--config", str(toml)]
    raise ValueError(name)


def _versions() -> dict[str, str]:
    def first_line(argv: list[str]) -> str:
        out = subprocess.run(argv, capture_output=True, text=True, check=False)
        return (out.stdout or out.stderr).splitlines()[0].strip()

    return {"nginx": first_line(["nginx", "-v"]), "haproxy": first_line(["haproxy", "-v"])}


@contextlib.contextmanager
def behind_proxy(
    name: str, work: Path, lb_settings: str = "", with_process: bool = False
) -> Iterator[Any]:
    """``name`` in front of its own recorder: (the proxy's port, the recorder's file),
    and the proxy's process with ``with_process``; ``lb_settings``: top-level
    lb.toml lines for lb."""
    backend, port = free_port(), free_port()
    seen = work / f"{name}-seen.jsonl"
    recorder = [sys.executable, "-m", "bench.recorder", "--port", str(backend), "--out", str(seen)]
    with (
        running(recorder, core=None, port=backend, log=work / f"{name}-recorder.log"),
        running(
            proxy_argv(name, work, port, backend, lb_settings),
            core=None,
            port=port,
            log=work / f"{name}.log",
        ) as proc,
    ):
        yield (port, seen, proc) if with_process else (port, seen)


def _reached(seen: list[Seen], watch: tuple[str, ...]) -> list[dict[str, Any]]:
    """The requests a vector got through (the checks' own, /health, left out),
    with what ``watch`` names of each."""

    def watched(s: Seen, name: str) -> list[str]:
        if name == "target":
            return [s.target]
        if name == "version":
            return [s.version]
        return s.header(name)

    return [
        {
            "method": s.method,
            "target": s.target,
            "body": s.body[:64],
            "watched": {name: watched(s, name) for name in watch},
        }
        for s in seen
        if s.target != "/health"
    ]


async def run_vectors(port: int, seen: Path, vectors: tuple[Vector, ...]) -> dict[str, Answer]:
    answers = {}
    for vector in vectors:
        before = len(read_seen(seen))
        answer = await probe(port, vector)
        await asyncio.sleep(SETTLE)
        answer.reached = _reached(read_seen(seen)[before:], vector.watch)
        answers[vector.name] = answer
    return answers


def run_edge(
    *,
    proxies: tuple[str, ...] = PROXIES,
    vectors: tuple[Vector, ...] = VECTORS,
    say: Callable[[str], None] = lambda _: None,
) -> dict[str, Any]:
    require(*(p for p in proxies if p in ("nginx", "haproxy")))
    answers: dict[str, dict[str, Answer]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-edge-") as tmp:
        for name in proxies:
            say(f"{name}: {len(vectors)} inputs")
            with behind_proxy(name, Path(tmp)) as (port, seen):
                answers[name] = asyncio.run(run_vectors(port, seen, vectors))
    return {
        "benchmark": "edge",
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "versions": _versions(),
        "vectors": [
            {
                "name": v.name,
                "group": v.group,
                "about": v.about,
                "requests": v.requests,
                "answers": {p: asdict(answers[p][v.name]) for p in proxies},
            }
            for v in vectors
        ],
    }


def table(result: dict[str, Any]) -> str:
    proxies = [p for p in PROXIES if p in result["vectors"][0]["answers"]]
    names = {"lb": "lb", "nginx": "nginx", "haproxy": "HAProxy"}
    lines = [
        "| input | " + " | ".join(names[p] for p in proxies) + " | lb is |",
        "|---|" + "---|" * (len(proxies) + 1),
    ]
    for v in result["vectors"]:
        answers = {p: Answer(**v["answers"][p]) for p in proxies}
        cells = [answers[p].cell() for p in proxies]
        lines.append(f"| {v['about']} | " + " | ".join(cells) + f" | {_compared(answers)} |")
    return "\n".join(lines)


def _compared(answers: dict[str, Answer]) -> str:
    """lb beside the others: stricter (it refuses what one forwards), laxer, or alike."""
    if "lb" not in answers:
        return ""
    names = {"nginx": "nginx", "haproxy": "HAProxy"}
    lb = answers["lb"].refused
    differ = [names[p] for p, a in answers.items() if p != "lb" and a.refused != lb]
    if not differ:
        return "alike"
    return ("stricter than " if lb else "laxer than ") + " and ".join(differ)
