"""TLS from dbproxy to its servers (``server_ssl``, pgbouncer's server_tls_sslmode),
on the connections dbproxy opens itself: pooled ones, and relayed sessions
whose client's TLS dbproxy ended or refused (with ``ssl = "passthrough"`` a
client's own TLS goes to the server untouched).

The modes are libpq's sslmode: ``prefer`` asks and goes on in clear after an
'N'; ``require`` insists, without checking the certificate; ``verify-ca``
checks it against ``server_ssl_ca``; ``verify-full`` checks the name too (the
server's address, as in its [[server]] table). The negotiation is the
client's: an SSLRequest, one byte back, and on 'S' the handshake
(``loop.start_tls``); the login follows on the TLS transport.
"""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path
from typing import Any, Final, Protocol, cast

from .pgwire import ssl_request

MODES: Final = ("disable", "prefer", "require", "verify-ca", "verify-full")


class ServerTlsRefused(Exception):
    """The server said 'N' and the mode insists on TLS."""


class Negotiating(Protocol):
    """A protocol whose server's one-byte answer resolves ``tls_answer``."""

    transport: asyncio.Transport | None
    tls_answer: asyncio.Future[bytes] | None


class ServerTls:
    def __init__(self, mode: str, ca_file: Path | None = None) -> None:
        self.mode = mode
        if mode in ("verify-ca", "verify-full"):
            ctx = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
            ctx.check_hostname = mode == "verify-full"
        else:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        self.context = ctx

    async def negotiate(
        self, loop: asyncio.AbstractEventLoop, protocol: Negotiating, hostname: str
    ) -> asyncio.Transport:
        """The SSLRequest on ``protocol``'s fresh connection, and TLS when the
        server answers 'S': the transport to log in on."""
        transport = protocol.transport
        assert transport is not None
        protocol.tls_answer = answered = loop.create_future()
        transport.write(ssl_request())
        try:
            answer = await answered
        finally:
            protocol.tls_answer = None
        if answer == b"S":
            carried = cast(asyncio.BaseProtocol, protocol)
            tls = await loop.start_tls(transport, carried, self.context, server_hostname=hostname)
            if tls is None:
                raise ConnectionError("the connection closed during the TLS handshake")
            return tls
        if answer == b"N" and self.mode == "prefer":
            return transport
        raise ServerTlsRefused(f"the server has no TLS ({answer!r}); server_ssl = {self.mode}")

    def for_checks(self) -> Any:
        """asyncpg's ``ssl`` for the checks' logins: the same mode."""
        return "prefer" if self.mode == "prefer" else self.context


def server_tls(mode: str, ca_file: Path | None) -> ServerTls | None:
    return None if mode == "disable" else ServerTls(mode, ca_file)
