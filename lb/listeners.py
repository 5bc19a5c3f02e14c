"""lb's listeners: the addresses it serves, plain or TLS, each a ``Listener``
(nginx's ``listen``, HAProxy's ``bind``).

A listener owns its socket and server in this process, its certificates and
handshake counters when it speaks TLS (proxycore/tls.py, proxycore/tlslayer.py),
and the little its client connections need to know of it (``ClientSide``):
whether they are https (X-Forwarded-Proto, HSTS) and whether a plain listener
redirects every request to https.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import socket
from collections.abc import Callable
from typing import Any

from proxycore.compiled import protocol_factory
from proxycore.tls import TlsEnd, TlsSettings
from proxycore.tlslayer import TlsServer

from .client import ClientConnection
from .request_head import new_request_id
from .response_head import error_response
from .routes import Route
from .settings import ListenerConfig
from .state import ClientSide, LbState

log = logging.getLogger("lb")


def plain_http_answer(raw: asyncio.Transport, data: bytes) -> None:
    """Plain HTTP at a TLS port: nginx's 400, in lb's JSON, then the close."""
    log.info("plain HTTP request on a TLS listener from %s", raw.get_extra_info("peername"))
    raw.write(
        error_response(
            400,
            "plain_http_to_https",
            "The plain HTTP request was sent to HTTPS port",
            new_request_id(),
            close=True,
        )
    )
    raw.close()


class Listener:
    def __init__(
        self,
        config: ListenerConfig,
        state: LbState,
        redirect: Route | None = None,
        tickets: bytes | None = None,
    ) -> None:
        self.config = config
        self.name = config.name
        self.state = state
        self.tls = None if config.tls is None else TlsEnd(config.name, config.tls, tickets)
        self.side = ClientSide(config.tls is not None, config.hsts, redirect)
        self.sock: socket.socket | None = None
        self.server: asyncio.Server | None = None

    @property
    def factory(self) -> Callable[[], asyncio.BaseProtocol]:
        state, side, tls = self.state, self.side, self.tls
        if tls is None:
            return protocol_factory(lambda: ClientConnection(state, side))
        certs, counters, timeout = tls.certs, tls.counters, tls.handshake_timeout
        make = functools.partial(ClientConnection, state, side)
        return protocol_factory(
            lambda: TlsServer(
                None,
                certs.context,  # read per connection: a reload takes the next handshake
                counters,
                timeout,
                plain_http_answer,
                make=make,  # once the handshake is done
            )
        )

    def bind(self) -> socket.socket:
        address = self.config.address
        family = socket.AF_INET6 if ":" in address.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((address.host, address.port))
        self.sock = sock
        return sock

    async def serve(self, loop: asyncio.AbstractEventLoop, sock: socket.socket) -> None:
        self.sock = sock
        self.server = await loop.create_server(self.factory, sock=sock, backlog=4096)

    def reload(self, settings: TlsSettings | None = None) -> bool:
        return True if self.tls is None else self.tls.reload(settings)

    def stop(self, loop: asyncio.AbstractEventLoop, inherited: bool) -> None:
        """Close without resetting the connections the kernel has queued (closing a
        listening socket resets them): a duplicate keeps the socket open while
        the server closes, what is queued is accepted and served, then the
        duplicate closes. ``inherited``: a worker's socket, open still in the
        supervisor and the other workers, which serve what is queued."""
        server, sock = self.server, self.sock
        self.server = self.sock = None
        if server is None or sock is None:
            return
        if inherited:
            server.close()
            return
        spare = sock.dup()
        server.close()
        spare.setblocking(False)
        factory = self.factory
        try:
            while True:
                try:
                    conn, _ = spare.accept()
                except (BlockingIOError, InterruptedError):
                    break
                loop.create_task(loop.connect_accepted_socket(factory, conn))
        finally:
            spare.close()

    def status(self) -> dict[str, Any]:
        out: dict[str, Any] = {"address": str(self.config.address), "tls": self.tls is not None}
        if self.config.redirect_https:
            out["redirect_https"] = True
        if self.tls is not None:
            out.update(self.tls.status())
        return out
