"""`python -m bench pg --fuzz N`: a seeded differential fuzz of what dbproxy reads
from a client before it relays: first packets and their sequences (StartupMessage,
SSLRequest, GSSENCRequest, CancelRequest), with lengths, versions, truncation,
parameter oddities, pipelining and tiny writes, each case sent to dbproxy and
straight to Postgres, while a good client keeps working through dbproxy beside
them.

dbproxy relays what it does not answer itself, so for each case the answer it
must give is Postgres's own, read from Postgres as dbproxy makes the
conversation go (``expected``): a GSSENCRequest answered 'N' by dbproxy (it
offers no GSSAPI encryption; Postgres built with GSSAPI answers 'G'), the bytes
after an SSLRequest held until the server's answer (Postgres refuses bytes that
reached it before its 'N': "received unencrypted data after SSL request"), an
SSLRequest or GSSENCRequest asked again refused as Postgres refuses one (0A000),
and a first packet not whole within timeouts.first_packet refused with 08P01
(Postgres waits authentication_timeout, 60 s, then closes without a word).
Everything else is Postgres's answer relayed, byte for byte but for where the
error was raised (its file, line and routine fields are not compared).

It fails on a death or a traceback in dbproxy's log, a connection neither
answered nor closed within the first-packet timeout, any answer other than
``expected``, an error on the good client, or a session slot still taken
once the clients have gone (dbproxy's /status).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import struct
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg

from .fuzz import write_in_parts
from .procs import free_port, running
from .stackrun import local_stack

SSL = 80877103
GSSENC = 80877104
CANCEL = 80877102
V3 = 3 << 16
FIRST_PACKET = 1.0  # dbproxy's timeouts.first_packet for the run
QUIET = FIRST_PACKET + 0.6  # how long a client waits for more before it calls it silence
CONCURRENT = 8
MAX_SESSIONS = 12  # small, so that a leaked slot soon stops the good client


def packet(code: int, body: bytes = b"", length: int | None = None) -> bytes:
    size = 8 + len(body) if length is None else length
    return struct.pack("!ii", size, code) + body


def startup_body(params: list[tuple[bytes, bytes]]) -> bytes:
    return b"".join(k + b"\0" + v + b"\0" for k, v in params) + b"\0"


# -- cases --------------------------------------------------------------------------------


@dataclass
class Case:
    n: int
    about: list[str]
    data: bytes
    writes: list[int] = field(default_factory=list)  # split points: tiny writes
    half_close: bool = False


def _params(rng: random.Random, user: bytes) -> tuple[list[tuple[bytes, bytes]], list[str]]:
    params = [(b"user", user), (b"database", b"users" if user == b"users_app" else b"postgres")]
    about = []
    odd = rng.choice(
        ("none", "none", "app-8bit", "no-user", "empty-user", "no-database", "replication",
         "pq-option", "options", "many", "long", "two-users", "empty-name")
    )  # fmt: skip
    if odd == "app-8bit":
        params.append((b"application_name", b"\xff\xfe\xd0"))
    elif odd == "no-user":
        params = params[1:]
    elif odd == "empty-user":
        params[0] = (b"user", b"")
    elif odd == "no-database":
        params = params[:1]
    elif odd == "replication":
        params.append((b"replication", rng.choice((b"maybe", b"on", b"database", b"off", b""))))
    elif odd == "pq-option":
        params.append((b"_pq_.fuzz", b"1"))
    elif odd == "options":
        params.append((b"options", rng.choice((b"-c work_mem=64kB", b"-c", b"--x=", b"\\"))))
    elif odd == "many":
        params += [(b"x.p%d" % i, b"v") for i in range(rng.randint(10, 300))]
    elif odd == "long":
        # to the server's limit and around it: a whole packet of 10,004 bytes is the most
        size = rng.choice((9990, 10000, 10002, 10003, 10004, 10005, 10010))
        pad = size - 8 - len(startup_body(params)) - len(b"application_name\0\0")
        params.append((b"application_name", b"p" * max(0, pad)))
    elif odd == "two-users":
        params.append((b"user", b"postgres"))
    elif odd == "empty-name":
        params.insert(1, (b"", b"x"))
    if odd != "none":
        about.append(odd)
    return params, about


def _startup(rng: random.Random, about: list[str]) -> bytes:
    user = rng.choice((b"users_app", b"postgres"))
    params, odd = _params(rng, user)
    about += odd
    version = V3
    if rng.random() < 0.1:
        version = rng.choice((2 << 16, (3 << 16) | 1, 4 << 16, 1234 << 16 | 5678, 0))
        about.append(f"version {version >> 16}.{version & 0xFFFF}")
    body = startup_body(params)
    if rng.random() < 0.08:
        cut = rng.choice(("no-terminator", "extra-nul", "no-value"))
        about.append(cut)
        body = {"no-terminator": body[:-1], "extra-nul": body + b"\0", "no-value": body + b"x\0"}[
            cut
        ]
    return packet(version, body)


def _special(rng: random.Random, about: list[str]) -> bytes:
    kind = rng.choice(("ssl", "ssl", "gss", "cancel"))
    about.append(kind)
    if kind == "cancel":
        return packet(CANCEL, struct.pack("!ii", rng.randint(1, 1 << 30), rng.randint(0, 1 << 30)))
    return packet(SSL if kind == "ssl" else GSSENC)


def _mutate(data: bytes, rng: random.Random, about: list[str]) -> bytes:
    kind = rng.choice(("length", "truncate", "flip", "junk", "append", "code"))
    about.append(f"mutate:{kind}")
    if kind == "length" and len(data) >= 4:
        new = rng.choice((0, 4, 7, 8, 9, len(data) - 1, len(data) + 1, 10_004, 10_005, -1, 1 << 30))
        return struct.pack("!i", new) + data[4:]
    if kind == "truncate":
        return data[: rng.randrange(len(data) + 1)]
    if kind == "flip" and data:
        at = rng.randrange(len(data))
        return data[:at] + bytes([rng.randrange(256)]) + data[at + 1 :]
    if kind == "junk":
        return data + bytes(rng.randrange(256) for _ in range(rng.randint(1, 12)))
    if kind == "append":
        return data + packet(V3, startup_body([(b"user", b"postgres")]))
    if kind == "code" and len(data) >= 8:
        code = rng.choice((SSL, GSSENC, CANCEL, V3, 1234 << 16 | 5681, -1))
        return data[:4] + struct.pack("!i", code) + data[8:]
    return data


def make_case(n: int, rng: random.Random) -> Case:
    about: list[str] = []
    packets = [_special(rng, about) for _ in range(rng.choice((0, 0, 1, 1, 2, 3)))]
    packets.append(_startup(rng, about))
    data = b"".join(packets)
    if rng.random() < 0.3:
        data = _mutate(data, rng, about)
    case = Case(n, about, data)
    mode = rng.choice(("one write", "one write", "stepwise", "tiny", "split"))
    if mode == "tiny" and len(data) <= 300:  # (a byte a millisecond: longer ones are split)
        case.writes = list(range(1, len(data)))
    elif mode in ("split", "tiny") and len(data) > 1:
        case.writes = sorted(rng.sample(range(1, len(data)), min(len(data) - 1, 3)))
    elif mode == "stepwise":  # the next packet a moment after the one before
        at, cuts = 0, []
        while at + 8 <= len(data):
            size = struct.unpack_from("!i", data, at)[0]
            if size < 8:
                break
            at += size
            if at < len(data):
                cuts.append(at)
        case.writes = cuts
    case.about.append(mode)
    case.half_close = rng.random() < 0.1
    if case.half_close:
        case.about.append("half-close")
    return case


# -- what the server (or dbproxy) answers -------------------------------------------------


def negotiations(data: bytes) -> int:
    """How many one-byte answers a server owes ``data``: its SSLRequests and
    GSSENCRequests before anything else."""
    count, at = 0, 0
    while at + 8 <= len(data):
        size, code = struct.unpack_from("!ii", data, at)
        if code not in (SSL, GSSENC) or size < 8:
            break
        count += 1
        at += size
    return count


def tokens(raw: bytes, owed: int) -> list[str]:
    """A server's answer as comparable tokens: one-byte answers to negotiations
    (``owed`` of them at most, at the start), then messages (an error by its
    SQLSTATE and text; an authentication request by its code; others by type)."""
    out: list[str] = []
    at = 0
    while at < len(raw):
        kind = raw[at : at + 1]
        if owed and kind in (b"N", b"S", b"G"):
            out.append(kind.decode())
            owed -= 1
            at += 1
            continue
        owed = 0
        if len(raw) - at < 5:
            out.append(f"partial {raw[at:]!r}")
            break
        (size,) = struct.unpack_from("!i", raw, at + 1)
        if kind == b"E" and not 4 <= size <= 64 * 1024:  # an error of the old protocol
            end = raw.find(b"\0", at)
            out.append(f"E2 {raw[at + 1 : end].decode('latin-1').strip()}")
            at = len(raw) if end < 0 else end + 1
            continue
        body = raw[at + 5 : at + 1 + size]
        if kind == b"E":
            fields = {f[:1]: f[1:] for f in body.split(b"\0") if f}
            out.append(
                f"E {fields.get(b'C', b'').decode()} {fields.get(b'M', b'').decode('latin-1')}"
            )
        elif kind == b"R":
            out.append(f"R{struct.unpack_from('!i', body)[0] if len(body) >= 4 else '?'}")
        elif kind == b"S":
            name = body.split(b"\0")[0].decode("latin-1")
            out.append(f"S {name}")
        else:
            out.append(kind.decode("latin-1"))
        at += 1 + size
    return out


@dataclass
class Answer:
    raw: bytes = b""
    closed: bool = False
    reset: bool = False  # what was not read yet was lost with it
    quiet: bool = False

    def said(self, owed: int) -> list[str]:
        """The tokens, up to the first that waits for the client (an
        authentication challenge, ReadyForQuery): what comes after depends on
        what the client sends next, and when."""
        said = tokens(self.raw, owed)
        for i, token in enumerate(said):
            if token == "Z" or (token.startswith("R") and token not in ("R0", "R?")):
                return [*said[: i + 1], "waits"]
        return [*said, "close" if self.closed else "reset" if self.reset else "quiet"]


def agrees(said: list[str], expected: list[str]) -> bool:
    """``said`` is ``expected``, or the two agree up to where a reset cut one of
    them short: a close with the client's bytes unread (Postgres's closes are
    such too) loses the client what it had not read yet."""
    if said[-1] == "reset":
        return expected[: len(said) - 1] == said[:-1]
    if expected[-1] == "reset":
        return said[: len(expected) - 1] == expected[:-1]
    return said == expected


def _done(raw: bytes, owed: int) -> bool:
    """The answer is whole: an authentication challenge waits for the client, or
    the session is ready; nothing more comes unasked."""
    said = tokens(raw, owed)
    return bool(said) and (
        (said[-1].startswith("R") and said[-1] not in ("R0", "R?")) or said[-1] == "Z"
    )


async def send(port: int, case: Case) -> Answer:
    """Send ``case`` on a new connection and read the answer."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        await write_in_parts(writer, case.data, case.writes, case.half_close)
        return await _read(reader, negotiations(case.data))
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def _read(reader: asyncio.StreamReader, owed: int) -> Answer:
    """Read until the answer is whole, the peer closes or resets, or QUIET passes."""
    answer = Answer()
    while True:
        try:
            more = await asyncio.wait_for(reader.read(65536), QUIET)
        except TimeoutError:
            answer.quiet = True
            return answer
        except ConnectionError:
            answer.reset = True
            return answer
        if not more:
            answer.closed = True
            return answer
        answer.raw += more
        if _done(answer.raw, owed):
            return answer


async def reference(port: int, case: Case) -> list[str]:
    """What dbproxy must answer ``case``, read from Postgres as dbproxy makes the
    conversation go (``plan``)."""
    said, probes, rest, tail = plan(case.data)
    if case.half_close and tail == _LATE:
        tail = ["close"]  # the client ended inside a packet: no wait for the rest
    if not probes and rest is None:
        return [*said, *tail]
    answers: list[str] = []
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        for probe in probes:
            writer.write(probe)
            byte = await asyncio.wait_for(reader.read(1), QUIET)
            answers.append(byte.decode("latin-1") or "close")
        if rest is not None:
            writer.write(rest)
            if case.half_close:
                writer.write_eof()
            tail = (await _read(reader, 0)).said(0)
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    filled = iter(answers)
    return [next(filled) if s == "N?" else s for s in said] + tail


def plan(data: bytes) -> tuple[list[str], list[bytes], bytes | None, list[str]]:
    """How dbproxy makes the conversation go for ``data``: what the client is
    answered in order ('N?' for the server's answer to an SSLRequest, 'N' for
    dbproxy's own to a GSSENCRequest), the SSLRequests the server is sent each
    on its own, what goes to the server after them (None: nothing), and what
    dbproxy itself says at the end."""
    said: list[str] = []
    probes: list[bytes] = []
    at, ssl_done, gss_done = 0, False, False
    while len(data) - at >= 4:
        size = struct.unpack_from("!i", data, at)[0]
        if not 8 <= size <= 10_004:
            return said, probes, None, ["close"]  # dropped without a word, by either
        if len(data) - at < size:
            break
        code = struct.unpack_from("!i", data, at + 4)[0]
        if code == GSSENC and not gss_done:
            gss_done = True
            said.append("N")
        elif code == SSL and not ssl_done:
            ssl_done = True
            said.append("N?")
            probes.append(data[at : at + size])
        elif code in (SSL, GSSENC):
            words = f"unsupported frontend protocol {code >> 16}.{code & 0xFFFF}"
            return said, probes, None, [f"E 0A000 {words}: server supports 3.0 to 3.0", "close"]
        elif code == CANCEL:
            return said, probes, None, ["close"]  # no answer to a cancel, from either
        else:
            return said, probes, data[at:], []  # a startup packet and all after it
        at += size
    # the stream ends inside a packet: the server waits; dbproxy, not past its limit
    return said, probes, None, _LATE


_LATE = ["E 08P01 the first packet did not arrive in time", "close"]

# Where dbproxy answers otherwise than Postgres does to the same bytes, on purpose
# (docs/dbproxy.md has the same list).
DIFFERENCES = {
    "gss": "a GSSENCRequest: dbproxy answers 'N' (no GSSAPI encryption), Postgres built "
    "with GSSAPI 'G'",
    "held": "bytes after an SSLRequest, before its answer: dbproxy holds them for after the "
    "server's 'N'; Postgres refuses bytes that reached it first (08P01)",
    "late": "a first packet not whole: dbproxy refuses it after timeouts.first_packet (08P01); "
    "Postgres waits authentication_timeout (60 s) and closes without a word",
    "again": "an SSLRequest or GSSENCRequest asked again: dbproxy refuses it as Postgres "
    "refuses an SSLRequest asked again (0A000), even where it answered the first itself",
    "timing": "a close with the client's bytes unread (a reset) cut one answer shorter than "
    "the other",
}


def difference(data: bytes, said: list[str], direct: list[str], expected: list[str]) -> str:
    """Which of DIFFERENCES sets dbproxy's answer apart from Postgres's."""
    if any("received unencrypted data" in t for t in direct):
        return "held"
    if "G" in direct[: negotiations(data)]:
        return "gss"
    if expected[-2:] == _LATE:
        return "late"
    if any(t.startswith("E 0A000 unsupported frontend protocol 1234.") for t in said):
        return "again"
    return "timing"


# -- the run ------------------------------------------------------------------------------


class _GoodClient:
    """A client that keeps working through dbproxy: a query every 20 ms on one
    session, and a new session every half second."""

    def __init__(self, port: int, password: str) -> None:
        self.port, self.password = port, password
        self.errors: list[str] = []
        self.queries = 0
        self._stop = asyncio.Event()

    async def _connect(self) -> asyncpg.Connection:
        return await asyncpg.connect(
            host="127.0.0.1",
            port=self.port,
            user="balance_check",
            password=self.password,
            database="postgres",
            timeout=5,
        )

    async def run(self) -> None:
        conn = await self._connect()
        last = time.monotonic()
        try:
            while not self._stop.is_set():
                try:
                    await conn.fetchval("SELECT 1")
                    self.queries += 1
                    if time.monotonic() - last > 0.5:
                        last = time.monotonic()
                        other = await self._connect()
                        await other.close()
                except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
                    self.errors.append(f"{type(exc).__name__}: {exc}")
                await asyncio.sleep(0.02)
        finally:
            await conn.close()

    def stop(self) -> None:
        self._stop.set()


def _status(admin: int) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://127.0.0.1:{admin}/status", timeout=5) as r:
        return json.loads(r.read())


async def _slots_free(admin: int, within: float = 5.0) -> str | None:
    """None once no session slot is taken; else what is still taken."""
    deadline = time.monotonic() + within
    while True:
        status = await asyncio.to_thread(_status, admin)
        taken = {s["name"]: s["active"] for s in status["pools"]["postgres"] if s["active"]}
        taken.update({f"listener {k}": v for k, v in status["sessions"].items() if v})
        if not taken or time.monotonic() > deadline:
            return None if not taken else f"slots still taken once every client left: {taken}"
        await asyncio.sleep(0.1)


async def _run_cases(
    cases: list[Case],
    proxy: int,
    master: int,
    admin: int,
    proc: Any,
    password: str,
    say: Callable[[str], None],
) -> dict[str, Any]:
    good = _GoodClient(proxy, password)
    good_task = asyncio.create_task(good.run())
    failures: list[dict[str, Any]] = []
    counts: dict[str, int] = {"cases": 0, "answered as Postgres": 0}
    gate = asyncio.Semaphore(CONCURRENT)

    async def one(case: Case) -> None:
        async with gate:
            owed = negotiations(case.data)
            got, direct, expected = await asyncio.gather(
                send(proxy, case), send(master, case), reference(master, case)
            )
            said = got.said(owed)
            counts["cases"] += 1
            if agrees(said, direct.said(owed)):
                counts["answered as Postgres"] += 1
            else:
                why = difference(case.data, said, direct.said(owed), expected)
                counts[why] = counts.get(why, 0) + 1
            problems = []
            if not agrees(said, expected):
                problems.append(f"answered {said}, expected {expected}")
            if got.quiet and not got.raw:
                problems.append("neither answered nor closed within the first-packet time")
            if problems:
                failures.append(
                    {
                        "case": case.n,
                        "about": case.about,
                        "data": case.data.hex(),
                        "writes": case.writes,
                        "problems": problems,
                        "postgres": direct.said(owed),
                    }
                )

    started = time.monotonic()
    for i in range(0, len(cases), 100):
        await asyncio.gather(*(one(c) for c in cases[i : i + 100]))
        if proc.poll() is not None:
            failures.append({"problems": [f"dbproxy died (exit status {proc.returncode})"]})
            break
        if (i + 100) % 1000 == 0:
            say(f"{i + 100} cases, {len(failures)} failing ({time.monotonic() - started:.0f} s)")
    good.stop()
    await good_task
    for problem in (
        await _slots_free(admin),
        f"the good client: {good.errors[:3]}" if good.errors else None,
    ):
        if problem:
            failures.append({"problems": [problem]})
    counts["good queries"] = good.queries
    return {"counts": counts, "failures": failures}


def run_pg_fuzz(
    count: int,
    *,
    master: int,
    check_password: str,
    seed: int = 26,
    say: Callable[[str], None] = lambda _: None,
) -> dict[str, Any]:
    """``count`` cases from ``seed`` through a dbproxy of the run's own in front of
    the Postgres on port ``master`` (the stack's, with its check role)."""
    rng = random.Random(seed)
    cases = [make_case(n, rng) for n in range(count)]
    port, admin, ro, any_ = (free_port() for _ in range(4))
    with tempfile.TemporaryDirectory(prefix="bench-pgfuzz-") as tmp:
        work = Path(tmp)
        config = work / "dbproxy.toml"
        config.write_text(
            f'admin = "127.0.0.1:{admin}"\n[listen]\nrw = "127.0.0.1:{port}"\n'
            f'ro = "127.0.0.1:{ro}"\nany = "127.0.0.1:{any_}"\n'
            f'[timeouts]\nfirst_packet = "{FIRST_PACKET}s"\n[queue]\ntimeout = "2s"\n'
            f'[check]\ninterval = "500ms"\ndatabase = "postgres"\n'
            f'[[server]]\nname = "service-db"\naddress = "127.0.0.1:{master}"\n'
            f"max_sessions = {MAX_SESSIONS}\n"
        )
        log = work / "dbproxy.log"
        argv = [sys.executable, "-m", "dbproxy", "--config", str(config)]
        say(f"pg fuzz: {count} cases (seed {seed}) through dbproxy and straight to Postgres")
        env = {"DBPROXY_CHECK_PASSWORD": check_password}
        with running(argv, core=None, port=admin, log=log, env=env) as proc:
            started = time.monotonic()
            result = asyncio.run(_run_cases(cases, port, master, admin, proc, check_password, say))
            seconds = time.monotonic() - started
        text = log.read_text(errors="replace")
        if "Traceback" in text:
            at = text.index("Traceback")
            shown = text[max(0, text.rfind("\n", 0, at - 300)) : at + 2000]
            result["failures"].append({"problems": [f"traceback in dbproxy's log:\n{shown}"]})
    return {
        "benchmark": "pg-fuzz",
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "seed": seed,
        "cases": count,
        "seconds": round(seconds, 1),
        **result,
    }


def run_pg_fuzz_stack(
    count: int, *, seed: int = 26, say: Callable[[str], None] = lambda _: None
) -> dict[str, Any]:
    """run_pg_fuzz on a local stack of the run's own (no proxies), taken down after."""
    with tempfile.TemporaryDirectory(prefix="bench-pgfuzz-stack-") as tmp:
        say("starting a local stack for the fuzz")
        with local_stack(Path(tmp), profile="none", users=100) as stack:
            return run_pg_fuzz(
                count, master=stack.ports.master, check_password=stack.check_password,
                seed=seed, say=say,
            )  # fmt: skip


def table(result: dict[str, Any]) -> str:
    counts = result["counts"]
    lines = [
        f"{result['cases']:,} cases (seed {result['seed']}) in {result['seconds']:.0f} s",
        "",
        "| | |",
        "|---|---:|",
        "| cases answered as Postgres answers the same bytes | "
        f"{counts['answered as Postgres']:,} |",
        *(
            f"| answered otherwise: {DIFFERENCES[k]} | {counts[k]:,} |"
            for k in DIFFERENCES
            if k in counts
        ),
        f"| failing cases and checks | {len(result['failures']):,} |",
        f"| the good client's queries meanwhile | {counts['good queries']:,} |",
    ]
    return "\n".join(lines)
