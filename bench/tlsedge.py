"""Hostile TLS input at lb's, nginx's and HAProxy's TLS listeners (part of
`python -m bench edge`): what each does with garbage instead of a ClientHello,
SSLv3 and TLS 1.0 hellos, a hello cut short or as large as a record, plain HTTP,
a client asking to renegotiate, and 2,000 connections that never finish a
handshake while a good client asks for a page.

Each proxy runs as `bench tls` runs it (TLS 1.3 and 1.2 allowed, the same ECDSA
P-256 certificate, its own defaults for everything else: nginx bounds a
handshake by client_header_timeout, 60 s; HAProxy by timeout client, 30 s here;
lb by handshake_timeout, 10 s). What a client sees is written down as it is:
an alert and the close, a 400 and the close, a close, or silence.
"""

from __future__ import annotations

import contextlib
import os
import resource
import socket
import ssl
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from stack.pki import Issued, authority

from .http import upstreams
from .procs import free_port, require, running
from .tls import proxy_argv

PROXIES = ("lb", "nginx", "haproxy")
HOST = "127.0.0.1"
WAIT = 15.0  # how long a stalled client waits to be closed
STALLED = 2000


def _hello(version: bytes) -> bytes:
    """A minimal ClientHello of ``version`` (b"\\x03\\x00" SSLv3, b"\\x03\\x01" TLS 1.0)
    with one RSA suite and no extensions: what an old client sends."""
    body = version + os.urandom(32) + b"\x00" + b"\x00\x02\x00\x2f" + b"\x01\x00"
    handshake = b"\x01" + len(body).to_bytes(3, "big") + body
    return b"\x16" + version + len(handshake).to_bytes(2, "big") + handshake


def _real_hello() -> bytes:
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    client = ssl.create_default_context().wrap_bio(incoming, outgoing, server_hostname="localhost")
    with contextlib.suppress(ssl.SSLWantReadError):
        client.do_handshake()
    return outgoing.read()


def _answer(port: int, data: bytes, wait: float = 5.0) -> str:
    """What the client got for ``data``: an alert, an HTTP status, a close, or silence."""
    started = time.monotonic()
    with socket.create_connection((HOST, port), timeout=wait) as s:
        s.sendall(data)
        got = b""
        try:
            while chunk := s.recv(65536):
                got += chunk
        except TimeoutError:
            return f"silence for {wait:g} s" + (f" after {_what(got)}" if got else "")
        except ConnectionResetError:
            return f"reset after {time.monotonic() - started:.1f} s"
    return f"{_what(got)}, closed after {time.monotonic() - started:.1f} s"


def _what(got: bytes) -> str:
    if not got:
        return "nothing"
    if got[:1] == b"\x15" and len(got) >= 7:
        return f"alert {got[6]}"
    if got.startswith(b"HTTP/"):
        return got.split(b"\r\n", 1)[0].decode(errors="replace")
    return f"{len(got)} bytes"


def _renegotiation(port: int) -> str:
    done = subprocess.run(
        ["openssl", "s_client", "-connect", f"{HOST}:{port}", "-tls1_2", "-servername", HOST],
        input=b"R\n",
        capture_output=True,
        timeout=20,
    )
    text = (done.stdout + done.stderr).decode(errors="replace")
    if "RENEGOTIATING" not in text:
        return "not asked"
    if "no renegotiation" in text:
        return "refused (no_renegotiation alert)"
    if "handshake failure" in text or "error" in text.lower():
        return "refused (error)"
    return "allowed"


def _get(port: int, context: ssl.SSLContext) -> float:
    """A good client's GET over a new TLS connection: milliseconds to its answer."""
    started = time.monotonic()
    with (
        socket.create_connection((HOST, port), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        tls.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        while tls.recv(65536):
            pass
    return (time.monotonic() - started) * 1000


def _stalled(port: int, context: ssl.SSLContext) -> dict[str, Any]:
    """2,000 handshakes begun and never ended; a good client meanwhile; then how
    many of the 2,000 the proxy closed within WAIT."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 8192), hard))
    held: list[socket.socket] = []
    try:
        for _ in range(STALLED):
            s = socket.create_connection((HOST, port), timeout=5)
            s.sendall(b"\x16\x03\x01")
            held.append(s)
        good_ms = _get(port, context)
        deadline = time.monotonic() + WAIT
        closed = 0
        for s in held:
            s.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                if s.recv(1) == b"":
                    closed += 1
            except TimeoutError:
                pass  # still open
            except ConnectionResetError:
                closed += 1
        return {"good_get_ms": round(good_ms, 1), "closed_within_wait": closed}
    finally:
        for s in held:
            s.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


CASES: dict[str, Callable[[int], str]] = {
    "garbage instead of a ClientHello": lambda p: _answer(p, b"\x00\x01garbage\xff" * 10),
    "an SSLv3 ClientHello": lambda p: _answer(p, _hello(b"\x03\x00")),
    "a TLS 1.0 ClientHello": lambda p: _answer(p, _hello(b"\x03\x01")),
    "a ClientHello cut short": lambda p: _answer(p, _real_hello()[:40], wait=WAIT),
    "a 16 KiB record of garbage": lambda p: _answer(
        p, b"\x16\x03\x01\x40\x00" + b"\x01" * 0x4000, wait=WAIT
    ),
    "plain HTTP to the TLS port": lambda p: _answer(p, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"),
    "client-initiated renegotiation": _renegotiation,
}


@contextlib.contextmanager
def _proxy(name: str, work: Path, cert: Issued, up: tuple[int, int]) -> Iterator[int]:
    port = free_port()
    argv = proxy_argv(name, work, port, up[0], up[1], cert)
    with running(argv, core=None, port=port, log=work / f"edge-{name}.log"):
        yield port


def run_tls_edge(say: Callable[[str], None], proxies: tuple[str, ...] = PROXIES) -> dict[str, Any]:
    require("openssl", *(p for p in proxies if p in ("nginx", "haproxy")))
    out: dict[str, dict[str, Any]] = {p: {} for p in proxies}
    with tempfile.TemporaryDirectory(prefix="bench-tls-edge-") as tmp:
        work = Path(tmp)
        ca = authority(work / "ca")
        cert = ca.issue(work, "site", ["localhost", "127.0.0.1"])
        context = ssl.create_default_context(cafile=str(ca.cert))
        with upstreams(work, core=None) as up:
            for name in proxies:
                with _proxy(name, work, cert, up) as port:
                    for case, probe in CASES.items():
                        say(f"tls edge: {name}: {case}")
                        out[name][case] = probe(port)
                    say(f"tls edge: {name}: {STALLED} stalled handshakes")
                    out[name]["stalled"] = _stalled(port, context)
                    # and it serves on
                    out[name]["serves after"] = f"{_get(port, context):.1f} ms"
    return {"proxies": out, "stalled": STALLED, "wait_seconds": WAIT}


def table(result: dict[str, Any]) -> str:
    proxies = list(result["proxies"])
    lines = ["| TLS input | " + " | ".join(proxies) + " |", "|---" * (len(proxies) + 1) + "|"]
    for case in CASES:
        answers = " | ".join(result["proxies"][p][case] for p in proxies)
        lines.append(f"| {case} | {answers} |")
    stalled = {p: result["proxies"][p]["stalled"] for p in proxies}
    lines.append(
        f"| {result['stalled']:,} stalled handshakes: a good GET | "
        + " | ".join(f"{stalled[p]['good_get_ms']} ms" for p in proxies)
        + " |"
    )
    lines.append(
        f"| ... of them closed within {result['wait_seconds']:g} s | "
        + " | ".join(f"{stalled[p]['closed_within_wait']:,}" for p in proxies)
        + " |"
    )
    lines.append(
        "| a good GET after all that | "
        + " | ".join(result["proxies"][p]["serves after"] for p in proxies)
        + " |"
    )
    return "\n".join(lines)
