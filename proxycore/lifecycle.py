"""Running a proxy process: uvloop, signals, reload and graceful stop.

SIGTERM / SIGINT: stop accepting and let in-flight work finish, then exit 0.
SIGHUP: read the configuration again; a file that does not validate is refused
with one log line and the running configuration stays.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import sys
from collections.abc import Callable
from typing import Generic, Protocol, TypeVar

import uvloop

from .config import ConfigError

log = logging.getLogger("balance.lifecycle")

C = TypeVar("C")
C_contra = TypeVar("C_contra", contravariant=True)


class Service(Protocol[C_contra]):
    async def start(self) -> None: ...
    def apply(self, config: C_contra) -> None: ...
    async def shutdown(self) -> None: ...


class Runner(Generic[C]):
    def __init__(
        self,
        load: Callable[[], C],
        build: Callable[[C, asyncio.AbstractEventLoop], Service[C]],
    ) -> None:
        self._load = load
        self._build = build

    def run(self, config: C) -> int:
        loop = uvloop.new_event_loop()
        asyncio.set_event_loop(loop)
        try:
            return loop.run_until_complete(self._main(config, loop))
        finally:
            loop.close()

    async def _main(self, config: C, loop: asyncio.AbstractEventLoop) -> int:
        service = self._build(config, loop)
        try:
            await service.start()
        except OSError as exc:
            print(f"cannot start: {exc}", file=sys.stderr)
            return 1
        # What start-up made (modules, config, the app) lives as long as the
        # process: out of the collector's sight, later collections walk only
        # what connections allocate.
        gc.freeze()
        stop = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        loop.add_signal_handler(signal.SIGINT, stop.set)
        loop.add_signal_handler(signal.SIGHUP, lambda: self._reload(service))
        await stop.wait()
        log.warning("stopping: finishing in-flight work")
        await service.shutdown()
        return 0

    def _reload(self, service: Service[C]) -> None:
        try:
            config = self._load()
        except ConfigError as exc:
            log.error("reload refused, the running configuration stays: %s", exc)
            return
        service.apply(config)


def log_reloaded(
    logger: logging.Logger, source: object, servers: int, added: int, removed: int
) -> None:
    """The one line a reload leaves, in both proxies' words alike."""
    logger.warning(
        "reloaded %s: %d server(s) (+%d -%d)", source or "flags", servers, added, removed
    )


def setup_logging(name: str) -> None:
    logging.basicConfig(
        level=logging.INFO,
        format=f"%(asctime)s {name} %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
