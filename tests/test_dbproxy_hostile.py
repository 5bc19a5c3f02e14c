"""What dbproxy reads from a client before it relays, against real Postgres: the
sequences that once leaked a session slot per session, and the seeded
differential fuzz of first packets (bench/pgfuzz.py), bounded for `make test`
(`python -m bench pg --fuzz N` is the long run)."""

from __future__ import annotations

import asyncio
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.pgfuzz import DIFFERENCES, run_pg_fuzz
from tests.dbproxyctl import FAST, DbProxyProc, dbproxy_for
from tests.stackctl import StackHandle

SSL = struct.pack("!ii", 8, 80877103)
GSSENC = struct.pack("!ii", 8, 80877104)
MAX_SESSIONS = 12


def startup(**params: str) -> bytes:
    body = b"".join(k.encode() + b"\0" + v.encode() + b"\0" for k, v in params.items()) + b"\0"
    return struct.pack("!ii", len(body) + 8, 3 << 16) + body


def message(kind: bytes, body: bytes) -> bytes:
    return kind + struct.pack("!i", len(body) + 4) + body


@pytest.fixture(scope="module")
def proxy(stack: StackHandle, tmp_path_factory: pytest.TempPathFactory) -> Iterator[DbProxyProc]:
    extra = FAST + f'[queue]\nmax_sessions = {MAX_SESSIONS}\ntimeout = "3s"\n'
    # every SSLRequest to the server: a remembered 'N' would be dbproxy's own answer
    top = 'ssl_refusal_memory = "0s"\n'
    work = tmp_path_factory.mktemp("dbproxy-hostile")
    with dbproxy_for(stack, work, extra=extra, top=top) as p:
        yield p


async def _session(port: int, opening: tuple[bytes, ...], negotiations: int) -> int:
    """Open a session with the packets of ``opening`` (the superuser logs in by
    trust on loopback), each sent on its own right after the one before, none
    waiting for an answer, once dbproxy has had the time to connect to the
    server; run a query, and say goodbye; the query's answer."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        await asyncio.sleep(0.05)
        for part in opening:
            writer.write(part)  # a send of its own, with nothing in between
            await writer.drain()
        answers = await reader.readexactly(negotiations)
        assert answers == b"N" * negotiations, answers
        ready = False
        while not ready:
            kind, size = struct.unpack("!ci", await reader.readexactly(5))
            body = await reader.readexactly(size - 4)
            assert kind != b"E", body
            ready = kind == b"Z"
        writer.write(message(b"Q", b"SELECT 41 + 1\0"))
        value = None
        while True:
            kind, size = struct.unpack("!ci", await reader.readexactly(5))
            body = await reader.readexactly(size - 4)
            if kind == b"D":
                value = int(body[6:])
            if kind == b"Z":
                break
        writer.write(message(b"X", b""))
        assert value is not None
        return value
    finally:
        writer.close()


async def _slots_free(proxy: DbProxyProc, within: float = 5.0) -> dict[str, int]:
    deadline = time.monotonic() + within
    while True:
        status = await asyncio.to_thread(proxy.status)
        taken = {s["name"]: s["active"] for s in status["pools"]["postgres"] if s["active"]}
        if not taken or time.monotonic() > deadline:
            return taken
        await asyncio.sleep(0.1)


@pytest.mark.parametrize(
    ("name", "opening", "negotiations"),
    [
        ("ssl then startup", (SSL, startup(user="postgres")), 1),
        ("in one write", (SSL + startup(user="postgres"),), 1),
        ("gssenc, ssl then startup", (GSSENC, SSL, startup(user="postgres")), 2),
        ("ssl, gssenc then startup", (SSL, GSSENC, startup(user="postgres")), 2),
    ],
)
async def test_sessions_that_do_not_wait_for_the_answer_to_ssl_work_and_free_their_slots(
    proxy: DbProxyProc, name: str, opening: tuple[bytes, ...], negotiations: int
) -> None:
    # Once: the StartupMessage was read while the SSLRequest's answer was owed,
    # a second server connection dialled, the first one's slot never freed, and
    # the client's first query read as a startup packet. 200 such sessions, 16
    # at a time, against a dbproxy of 12 slots.
    for start in range(0, 200, 16):
        values = await asyncio.gather(
            *(_session(proxy.ports["rw"], opening, negotiations) for _ in range(start, start + 16))
        )
        assert values == [42] * len(values)
    assert await _slots_free(proxy) == {}


async def test_a_negotiation_asked_again_is_refused_as_postgres_refuses_it(
    proxy: DbProxyProc,
) -> None:
    for opening, code in ((SSL + SSL, "1234.5679"), (GSSENC + GSSENC, "1234.5680")):
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.ports["rw"])
        writer.write(opening)
        data = await asyncio.wait_for(reader.read(), 5)
        writer.close()
        assert data[:1] == b"N" and b"C0A000\0" in data
        assert f"unsupported frontend protocol {code}".encode() in data
    assert await _slots_free(proxy) == {}


def test_first_packet_fuzz_answers_as_postgres(stack: StackHandle, tmp_path: Path) -> None:
    password = stack.state()["topology"]["credentials"]["check_password"]
    result = run_pg_fuzz(1_000, master=stack.ports.master, check_password=password)
    failures = [f"{f.get('case')} {f.get('about')}: {f['problems']}" for f in result["failures"]]
    assert not failures, "\n".join(failures[:20])
    counts = result["counts"]
    # Not vacuous: most cases answered as Postgres answers, each documented
    # difference met, and the good client worked all along.
    assert counts["answered as Postgres"] > 500
    assert {"gss", "held", "late"} <= set(counts) and set(counts) - {
        "cases",
        "answered as Postgres",
        "good queries",
    } <= set(DIFFERENCES)
    assert counts["good queries"] > 500


async def test_a_session_whose_client_leaves_the_queue_gives_its_place_up_at_once(
    proxy: DbProxyProc,
) -> None:
    """Every slot held: sessions that sent their startup packet wait in the
    queue; their clients give up and close. They leave the queue then, not when
    a slot frees or the queue's timeout (3 s) passes, and the slot that frees
    goes to a client still there."""
    port = proxy.ports["rw"]
    held = []
    for _ in range(MAX_SESSIONS):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(startup(user="postgres"))
        while (await reader.readexactly(1)) != b"Z":  # (the tail of each message is skipped)
            size = struct.unpack("!i", await reader.readexactly(4))[0]
            await reader.readexactly(size - 4)
        await reader.readexactly(5)
        held.append(writer)
    before = (await asyncio.to_thread(proxy.status))["queue"]["abandoned"]
    leaving = []
    for _ in range(5):
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(startup(user="postgres"))
        leaving.append(writer)
    await asyncio.sleep(0.3)
    assert (await asyncio.to_thread(proxy.status))["queue"]["waiting"]["rw"] == 5
    for writer in leaving:
        writer.close()
    await asyncio.sleep(0.3)  # a tenth of the queue's timeout
    status = await asyncio.to_thread(proxy.status)
    assert status["queue"]["waiting"]["rw"] == 0
    assert status["queue"]["abandoned"] - before == 5
    held.pop().close()
    assert await _session(port, (startup(user="postgres"),), 0) == 42
    for writer in held:
        writer.close()
    assert await _slots_free(proxy) == {}
