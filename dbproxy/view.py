"""What a client session sees of its dbproxy: the routing, the queue, the
pools, the cancel keys and the limits, not the process around them (workers,
checks, admin). dbproxy/app.py's DbProxy is the one implementation; the
sessions (dbproxy/session.py, dbproxy/pooled.py) import only this, so neither
imports the module that imports them."""

from __future__ import annotations

import asyncio
from collections.abc import Collection
from typing import Any, Protocol

from proxycore.deadline import Expiries
from proxycore.servers import Server
from proxycore.tls import TlsEnd

from .cancels import Cancels
from .credentials import Secrets
from .listener import Listener
from .pool import Pools
from .servertls import ServerTls
from .sessionqueue import SessionQueue
from .settings import DbProxyConfig
from .sslanswers import SslAnswers


class Proxy(Protocol):
    loop: asyncio.AbstractEventLoop
    config: DbProxyConfig
    draining: bool
    sessions: set[Any]
    cancels: Cancels
    pools: Pools
    secrets: Secrets
    first_packet_limits: Expiries[Any]
    connect_limits: Expiries[Any]
    startup_limits: Expiries[Any]
    queue: SessionQueue
    redials: int
    startups_waited_on: int
    ssl_answers: SslAnswers  # ssl = "passthrough"'s
    tls: TlsEnd | None  # ssl = "terminate"'s certificates and handshakes
    server_tls: ServerTls | None  # server_ssl: TLS on the connections to the servers

    @property
    def client_count(self) -> int: ...

    def choose(
        self, listener: Listener, tried: Collection[Server], room: bool = False
    ) -> Server | None: ...
    def fits(self, server: Server, listener: Listener) -> bool: ...
    def fitting(self, listener: Listener) -> list[Server]: ...
    def attach(self, session: Any, server: Server) -> None: ...
    def detach(self, session: Any, server: Server) -> None: ...
    def session_closed(self) -> None: ...
