"""`python -m bench edge --fuzz N`: a seeded differential fuzz of HTTP/1.1 request
framing through lb, nginx and HAProxy, each in front of its own recording
backend (bench/recorder.py: it obeys Transfer-Encoding over Content-Length and
parses as leniently as the weakest backends, so a request smuggled past a proxy
shows up there as one more request, or as one with a body of the wrong length).

Each case is a few seed requests (plain, Content-Length, chunked, pipelined,
HTTP/1.0, absolute-form) with one to three mutations from the request-smuggling
literature: duplicate and conflicting Content-Length, Transfer-Encoding lists,
case and whitespace, chunk sizes, extensions and overflow, bare CR, LF and NUL,
obs-fold, versions, absolute-form, sizes near the limits, bytes flipped,
inserted and deleted, and the whole sent in tiny writes or half-closed. It is
sent byte for byte to the three proxies at once; what each client got and what
reached each backend is compared. lb fails the run on:

- a death or a traceback in its log;
- a desync: a request reached its backend that lb never answered for, or with
  another target than the answer the client got;
- a length mismatch: a request lb forwarded framed one way and sent another
  (both Content-Length and Transfer-Encoding, a body whose length is not its
  Content-Length, a version or a header line lb would never write);
- a hang: lb neither answered nor closed while both nginx and HAProxy did (or,
  after the client's half-close, at all);
- forwarding a request both nginx and HAProxy refused, outside ALLOWED (each
  with its reason; docs/edge.md).

Every crash or hang it finds becomes a fixed vector in tests/test_lb_hostile.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .edge import behind_proxy
from .recorder import Seen, SeenTail, parse_request

ANCHORS = ("nginx", "haproxy")
# How long a client waits for more after the last byte it got.
QUIET = 0.6
SETTLE = 0.05  # for what a proxy forwarded to reach its backend after the answer

# -- the seeds: {n} is the case's number, {k} the request's within the case -------------


def _get(target: str, extra: str = "", version: str = "1.1") -> str:
    return f"GET {target} HTTP/{version}\r\nHost: a.example\r\nUser-Agent: fuzz\r\n{extra}\r\n"


_FORM = "name=fuzz&n=1234567"
SEEDS: dict[str, tuple[str, ...]] = {
    "get": (_get("/fz/{n}-0/a?q=1"),),
    "post-length": (
        "POST /fz/{n}-0/b HTTP/1.1\r\nHost: a.example\r\n"
        f"Content-Type: application/x-www-form-urlencoded\r\nContent-Length: 19\r\n\r\n{_FORM}",
    ),
    "post-chunked": (
        "POST /fz/{n}-0/c HTTP/1.1\r\nHost: a.example\r\nTransfer-Encoding: chunked\r\n\r\n"
        "5\r\nhello\r\n7;ext=1\r\n, world\r\n0\r\n\r\n",
    ),
    "pipelined": (
        _get("/fz/{n}-0/p"),
        f"POST /fz/{{n}}-1/p HTTP/1.1\r\nHost: a.example\r\nContent-Length: 19\r\n\r\n{_FORM}",
        _get("/fz/{n}-2/p"),
    ),
    "chunked-then-get": (
        "POST /fz/{n}-0/t HTTP/1.1\r\nHost: a.example\r\nTransfer-Encoding: chunked\r\n\r\n"
        "3\r\nabc\r\n0\r\nX-Trailer: 1\r\n\r\n",
        _get("/fz/{n}-1/t"),
    ),
    "http10": (_get("/fz/{n}-0/h", "Connection: keep-alive\r\n", version="1.0"),),
    "absolute": ("GET http://a.example/fz/{n}-0/abs HTTP/1.1\r\nHost: b.example\r\n\r\n",),
}

# Tokens from the smuggling literature, spliced in by the mutations below.
_HEADERS = (
    "Content-Length: 0",
    "Content-Length: 5",
    "Content-Length: 19",
    "Content-Length: +19",
    "Content-Length: 019",
    "Content-Length: 19 ",
    "Content-Length: 19, 19",
    "Content-Length: -1",
    "Content-Length: 0x13",
    "Content-Length: 99999999999999999999",
    "Content-Length:",
    "Content-Length : 19",
    "Transfer-Encoding: chunked",
    "Transfer-Encoding: Chunked",
    "Transfer-Encoding:  chunked",
    "Transfer-Encoding: chunked ",
    "Transfer-Encoding: chunked\t",
    "Transfer-Encoding: gzip, chunked",
    "Transfer-Encoding: chunked, gzip",
    "Transfer-Encoding: identity",
    "Transfer-Encoding: ,chunked",
    "Transfer-Encoding: xchunked",
    "Transfer-Encoding : chunked",
    "Transfer_Encoding: chunked",
    " Transfer-Encoding: chunked",
    "Transfer-Encoding:\x0bchunked",
    "Transfer-Encoding\x00: chunked",
    "Connection: close",
    "Connection: keep-alive, Content-Length",
    "Connection: Transfer-Encoding",
    "Connection: upgrade",
    "Upgrade: websocket",
    "Expect: 100-continue",
    "Expect: 101-continue",
    "Host: b.example",
    "Host: a.example@b.example",
    "X-Forwarded-For: 10.0.0.1",
    "X-Fold: a\r\n b",
    "X-Nul: a\x00b",
    "X-Cr: a\rb",
    "X-Lf: a\nb",
    "X-8bit: \xd0\x98",
)
_CHUNK_SIZES = (
    "0",
    "00005",
    "5 ",
    "5;",
    '5;a="b"',
    '5;a="b',
    "5\t",
    " 5",
    "-5",
    "0x5",
    "+5",
    "ffffffffffffffff",
    "8000000000000005",
    "10000000000000005",
    "7fffffffffffffff",
    "",
    "g",
)
_VERSIONS = ("HTTP/1.0", "HTTP/1.2", "HTTP/1.9", "HTTP/2.0", "HTTP/0.9", "HTTP/1.10",
             "http/1.1", "HTTP/1.1 ", "HTTP/1", "HTTP/11.1", "")  # fmt: skip
_METHODS = ("get", "GET ", "G\x00T", "PUT", "DELETE", "OPTIONS", "CONNECT", "TRACE", "PRI", "X")
_BYTES = b'\r\n\x00\t ;:,"-+09afAFxX\x80\xff\x0b\x0c'
_ENDINGS = ("\n", "\r", "\r\r\n", "\n\r", "\r\n\r\n", " \r\n", "\r\n ")
_TARGETS = ("http://c.example/fz/{n}-0/x", "*", "fz", "//fz", "/fz/../../etc", "/%00", "/\x7f")


@dataclass
class Case:
    n: int
    seed: str
    mutations: list[str]
    data: bytes
    requests: int
    writes: list[int] = field(default_factory=list)  # split points: tiny writes
    half_close: bool = False


def _free_at(data: bytes, rng: random.Random) -> int:
    return rng.randrange(len(data) + 1)


def _header_line_starts(data: bytes) -> list[int]:
    """Where header lines begin (after a request line's or another header's CRLF)."""
    starts, at = [], 0
    while (at := data.find(b"\r\n", at)) >= 0:
        at += 2
        if at < len(data) and data[at : at + 2] != b"\r\n":
            starts.append(at)
    return starts


def mutate(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    """One mutation of ``data``: the new bytes and what was done."""
    kind = rng.choice(
        ("flip", "insert", "delete", "header", "header", "value", "chunk", "ending",
         "version", "method", "target", "duplicate", "size")
    )  # fmt: skip
    if kind == "flip" and data:
        at = min(_free_at(data, rng), len(data) - 1)
        new = bytes([rng.choice(_BYTES)])
        return data[:at] + new + data[at + 1 :], f"flip@{at}={new!r}"
    if kind == "insert":
        at = _free_at(data, rng)
        new = bytes(rng.choice(_BYTES) for _ in range(rng.randint(1, 3)))
        return data[:at] + new + data[at:], f"insert@{at}={new!r}"
    if kind == "delete" and data:
        at = _free_at(data, rng)
        size = rng.randint(1, 4)
        return data[:at] + data[at + size :], f"delete@{at}+{size}"
    starts = _header_line_starts(data)
    if kind in ("header", "duplicate") and starts:
        at = rng.choice(starts)
        if kind == "duplicate":
            end = data.find(b"\r\n", at)
            line = data[at : end + 2]
        else:
            line = rng.choice(_HEADERS).encode("latin-1") + b"\r\n"
        return data[:at] + line + data[at:], f"{kind}:{line!r}"
    if kind == "value":
        for name in (b"Content-Length: ", b"Transfer-Encoding: "):
            at = data.find(name)
            if at >= 0:
                end = data.find(b"\r\n", at)
                new = rng.choice(_HEADERS).encode("latin-1")
                return data[:at] + new + data[end:], f"value:{new!r}"
    if kind == "chunk":
        sizes = list(re.finditer(rb"\r\n([0-9a-f]+)(;[^\r]*)?\r\n", data))
        if sizes:
            m = rng.choice(sizes)
            new = rng.choice(_CHUNK_SIZES).encode()
            return data[: m.start(1)] + new + data[m.end(1) :], f"chunk-size:{new!r}"
    if kind == "ending":
        ends = [m.start() for m in re.finditer(rb"\r\n", data)]
        if ends:
            at = rng.choice(ends)
            new = rng.choice(_ENDINGS).encode()
            return data[:at] + new + data[at + 2 :], f"ending@{at}={new!r}"
    if kind == "version" and b" HTTP/1." in data:
        at = data.find(b" HTTP/1.") + 1
        new = rng.choice(_VERSIONS).encode()
        return data[:at] + new + data[at + 8 :], f"version:{new!r}"
    if kind == "method":
        end = data.find(b" ")
        new = rng.choice(_METHODS).encode("latin-1")
        return new + data[end:], f"method:{new!r}"
    if kind == "target":
        start = data.find(b" ") + 1
        end = data.find(b" ", start)
        new = rng.choice(_TARGETS).encode("latin-1")
        return data[:start] + new + data[end:], f"target:{new!r}"
    if kind == "size" and starts:
        # a header that brings the head to a few bytes around lb's (and nginx's,
        # HAProxy's) 16 KiB limit, or a target around 8 KiB
        near = rng.choice((8192, 16384)) + rng.randint(-40, 40)
        at = rng.choice(starts)
        filler = b"X-Pad: " + b"p" * max(0, near - len(data) - 9) + b"\r\n"
        return data[:at] + filler + data[at:], f"size:{near}"
    return data, f"{kind}-skipped"


def make_case(n: int, rng: random.Random) -> Case:
    seed = rng.choice(list(SEEDS))
    parts = [p.replace("{n}", str(n)).encode("latin-1") for p in SEEDS[seed]]
    data = b"".join(parts)
    mutations = []
    for _ in range(rng.choice((1, 1, 2, 3))):
        data, did = mutate(data, rng)
        mutations.append(did)
    case = Case(n, seed, mutations, data, requests=len(parts))
    if rng.random() < 0.15 and len(data) > 1:
        case.writes = sorted(rng.sample(range(1, len(data)), min(len(data) - 1, 3)))
    case.half_close = rng.random() < 0.15
    return case


# -- sending a case and reading what came back ------------------------------------------


@dataclass
class Outcome:
    statuses: list[int] = field(default_factory=list)
    answered: list[str] = field(default_factory=list)  # the recorder's targets in the 200s
    closed: bool = False
    quiet: bool = False  # waited QUIET for more and got nothing
    reached: list[Seen] = field(default_factory=list)


_JSON_TARGET = re.compile(rb'\{"target": "((?:[^"\\]|\\.)*)", "conn": \d+\}')


async def write_in_parts(
    writer: asyncio.StreamWriter, data: bytes, splits: list[int], half_close: bool
) -> None:
    """``data`` in writes cut at ``splits`` (each sent on its own, 2 ms apart),
    then the write side shut if ``half_close``; the peer may close first."""
    with contextlib.suppress(OSError):
        at = 0
        for split in [*splits, len(data)]:
            writer.write(data[at:split])
            at = split
            if split < len(data):
                await writer.drain()
                await asyncio.sleep(0.002)
        if half_close:
            writer.write_eof()


async def send(port: int, case: Case) -> Outcome:
    out = Outcome()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    got = b""
    try:
        await write_in_parts(writer, case.data, case.writes, case.half_close)
        while True:
            try:
                more = await asyncio.wait_for(reader.read(65536), QUIET)
            except TimeoutError:
                out.quiet = True
                break
            except ConnectionError:
                more = b""
            if not more:
                out.closed = True
                break
            got += more
            finals = [int(s) for s in re.findall(rb"HTTP/1\.[01] ([2-5]\d\d) ", got)]
            if len(finals) >= case.requests and got.endswith(b"}"):
                break
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    out.statuses = [int(s) for s in re.findall(rb"HTTP/1\.[01] (\d\d\d) ", got)]
    out.answered = [json.loads(b'"' + m + b'"') for m in _JSON_TARGET.findall(got)]
    return out


# -- what lb must never do ---------------------------------------------------------------

# Requests lb forwards where nginx and HAProxy both refuse, on purpose: a name,
# what the input has, and why (docs/edge.md has the same list).
ALLOWED: tuple[tuple[str, Callable[[bytes], bool], str], ...] = (
    (
        "near-16k",
        lambda data: any(len(part) > 15_000 for part in data.split(b"\r\n\r\n")),
        "a head (or trailer section) between 15 KiB and lb's 16 KiB max_header_bytes: "
        "HAProxy keeps 1 KiB of its 16 KiB buffer for rewrites, so refuses it; lb "
        "forwards it, and nginx too unless something else in it refuses it there",
    ),
)


def _waits_for_more(data: bytes) -> bool:
    """Whether ``data``, read as leniently as the recorder reads, ends inside a
    request (a declared body not all sent): then waiting for the rest is right."""
    while data:
        try:
            parsed = parse_request(data, 0)
        except (ValueError, IndexError):
            return False
        if parsed is None:
            return True
        data = data[parsed[1] :]
    return False


def _framing_problem(seen: Seen) -> str | None:
    """What is wrong with a request as lb wrote it to the backend, if anything."""
    lengths = seen.header("content-length")
    codings = seen.header("transfer-encoding")
    if seen.version != "HTTP/1.1":
        return f"forwarded as {seen.version!r}"
    if lengths and codings:
        return "forwarded with both Content-Length and Transfer-Encoding"
    if len(lengths) > 1 or len(codings) > 1:
        return "forwarded with two framing headers"
    if codings and codings != ["chunked"]:
        return f"forwarded with Transfer-Encoding {codings}"
    if lengths and (not lengths[0].isdigit() or int(lengths[0]) != len(seen.body)):
        return f"a body of {len(seen.body)} bytes forwarded as Content-Length {lengths[0]!r}"
    if not re.fullmatch(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+", seen.method):
        return f"forwarded with the method {seen.method!r}"
    for name, value in seen.headers:
        if not name or re.search(r"[\x00-\x20\x7f:]", name) or re.search(r"[\x00\r\n]", value):
            return f"forwarded a header line {name!r}: {value!r}"
    return None


def judge(case: Case, outcomes: dict[str, Outcome]) -> list[str]:
    """What lb did wrong with ``case`` (nothing: an empty list)."""
    lb = outcomes["lb"]
    problems = []
    # Cases run one at a time: what each backend read meanwhile is the case's.
    targets = [s.target for s in lb.reached]
    if sorted(targets) != sorted(lb.answered):
        problems.append(f"desync: the backend read {targets}, the client got {lb.answered}")
    for seen in lb.reached:
        why = _framing_problem(seen)
        if why:
            problems.append(f"length: {why}")
    anchors = [outcomes[a] for a in ANCHORS if a in outcomes]
    if lb.quiet and not lb.statuses:
        if case.half_close:
            problems.append("hang: silent after the client's half-close")
        elif (
            len(anchors) == len(ANCHORS)
            and all(not a.quiet or a.statuses for a in anchors)
            and not _waits_for_more(case.data)
        ):
            problems.append("hang: silent where nginx and HAProxy both answered or closed")
    # After a half-close nginx answers nothing it has not begun (a client abort to
    # it) and HAProxy stops after the request in hand: no yardstick for lb there.
    if len(anchors) == len(ANCHORS) and not case.half_close:
        most = max(len(a.reached) for a in anchors)
        if len(lb.reached) > most and not allowed(case):
            problems.append(
                f"laxer: forwarded {len(lb.reached)} request(s), nginx and HAProxy {most}"
            )
    return problems


def allowed(case: Case) -> str | None:
    """The name of the ALLOWED entry ``case`` falls under, if any."""
    return next((name for name, has, _ in ALLOWED if has(case.data)), None)


# -- the run -----------------------------------------------------------------------------


@dataclass
class _Target:
    name: str
    port: int
    seen: SeenTail
    log: Path
    proc: Any


async def _run_cases(
    targets: list[_Target], cases: list[Case], say: Callable[[str], None]
) -> dict[str, Any]:
    counts: dict[str, int] = {}
    failures: list[dict[str, Any]] = []
    lb = next(t for t in targets if t.name == "lb")
    log_at = 0
    started = time.monotonic()
    for i, case in enumerate(cases):
        results = await asyncio.gather(*(send(t.port, case) for t in targets))
        outcomes = dict(zip([t.name for t in targets], results, strict=True))
        await asyncio.sleep(SETTLE)
        for t in targets:
            outcomes[t.name].reached = [s for s in t.seen.new() if s.target != "/health"]
        problems = judge(case, outcomes)
        text = lb.log.read_bytes()[log_at:].decode("latin-1")
        log_at += len(text)
        if "Traceback" in text:
            problems.append("traceback in lb's log")
        if lb.proc.poll() is not None:
            problems.append(f"lb died (exit status {lb.proc.returncode})")
        for key in _tally(case, outcomes):
            counts[key] = counts.get(key, 0) + 1
        if problems:
            failures.append(
                {
                    "case": case.n,
                    "seed": case.seed,
                    "mutations": case.mutations,
                    "data": case.data.decode("latin-1"),
                    "writes": case.writes,
                    "half_close": case.half_close,
                    "problems": problems,
                    "statuses": {k: v.statuses for k, v in outcomes.items()},
                }
            )
            if lb.proc.poll() is not None:
                break
        if (i + 1) % 500 == 0:
            say(f"{i + 1} cases, {len(failures)} failing ({time.monotonic() - started:.0f} s)")
    return {"counts": counts, "failures": failures}


def _tally(case: Case, outcomes: dict[str, Outcome]) -> list[str]:
    """How lb's answer compares with the anchors' for the table."""
    keys = ["cases"]
    if case.half_close:
        keys.append("half-closed after the last byte")
    elif all(a in outcomes for a in ANCHORS):
        lb = len(outcomes["lb"].reached)
        anchors = [len(outcomes[a].reached) for a in ANCHORS]
        if lb > max(anchors):
            keys.append("lb forwarded more requests than nginx and HAProxy")
        elif lb < min(anchors):
            keys.append("lb forwarded fewer requests than nginx and HAProxy")
        elif lb == 0:
            keys.append("all three refused every request")
        else:
            keys.append("lb forwarded as many as nginx or HAProxy")
    return keys


def run_fuzz(
    count: int,
    *,
    seed: int = 26,
    anchors: bool = True,
    say: Callable[[str], None] = lambda _: None,
) -> dict[str, Any]:
    """``count`` cases from ``seed``; with nginx and HAProxy where they are installed."""
    rng = random.Random(seed)
    cases = [make_case(n, rng) for n in range(count)]
    names = ["lb"]
    if anchors and all(shutil.which(a) for a in ANCHORS):
        names += ANCHORS
    say(f"fuzz: {count} cases (seed {seed}) through {', '.join(names)}")
    with tempfile.TemporaryDirectory(prefix="bench-fuzz-") as tmp, contextlib.ExitStack() as stack:
        targets = []
        for name in names:
            work = Path(tmp) / name
            work.mkdir()
            port, seen, proc = stack.enter_context(behind_proxy(name, work, with_process=True))
            targets.append(_Target(name, port, SeenTail(seen), work / f"{name}.log", proc))
        started = time.monotonic()
        result = asyncio.run(_run_cases(targets, cases, say))
        seconds = time.monotonic() - started
    return {
        "benchmark": "edge-fuzz",
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "seed": seed,
        "cases": count,
        "proxies": names,
        "seconds": round(seconds, 1),
        **result,
    }


FAILURE_KINDS = ("desync", "length", "hang", "laxer", "traceback", "lb died")


def table(result: dict[str, Any]) -> str:
    counts = result["counts"]
    kinds = {k: 0 for k in FAILURE_KINDS}
    for failure in result["failures"]:
        for kind in {p.split(":")[0] for p in failure["problems"]}:
            for known in FAILURE_KINDS:
                if kind.startswith(known):
                    kinds[known] += 1
    lines = [
        f"{result['cases']:,} cases (seed {result['seed']}) through "
        f"{', '.join(result['proxies'])} in {result['seconds']:.0f} s",
        "",
        "| | cases |",
        "|---|---:|",
    ]
    lines += [f"| {k} | {v:,} |" for k, v in sorted(counts.items()) if k != "cases"]
    lines += [f"| failing: {k} | {v:,} |" for k, v in kinds.items()]
    return "\n".join(lines)
