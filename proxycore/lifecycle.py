"""Running a proxy process: uvloop, signals, reload and graceful stop, in one of
three roles (proxycore/workers.py):

- single: one process does everything (``workers = 1``, the default);
- supervisor: owns the listening sockets, the checks and the admin API, and
  runs ``workers`` worker processes;
- worker: started by a supervisor (BALANCE_WORKER in its environment): serves
  the inherited sockets, follows the supervisor's view of the servers, and stops
  when the supervisor goes away.

SIGTERM / SIGINT: stop accepting and let in-flight work finish, then exit 0.
SIGHUP: read the configuration again; a file that does not validate is refused
with one log line and the running configuration stays (a supervisor passes
SIGHUP on to its workers). SIGUSR1: reopen the log files (after logrotate moved
them; nginx's). SIGUSR2 (a supervisor): a new generation of workers.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import resource
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, Generic, Protocol, TypeVar

import uvloop

from .config import ConfigError
from .tickets import new_keys
from .workers import ENV, Inherited

log = logging.getLogger("balance.lifecycle")

C = TypeVar("C")
C_contra = TypeVar("C_contra", contravariant=True)

SINGLE: Final = "single"
SUPERVISOR: Final = "supervisor"
WORKER: Final = "worker"


@dataclass(frozen=True)
class Placement:
    """The role of this process, and what it needs for it."""

    role: str = SINGLE
    workers: int = 1  # a supervisor's
    inherited: Inherited | None = None  # a worker's
    # A worker calls it when its supervisor is gone: it then stops as on SIGTERM.
    stop: Callable[[], None] = lambda: None
    # TLS session tickets sealed alike in a supervisor and all its workers
    # (proxycore/tickets.py); one process keeps OpenSSL's own key.
    tickets: bytes | None = None

    @classmethod
    def of(cls, workers: int, stop: Callable[[], None]) -> Placement:
        inherited = Inherited.from_env()
        if inherited is not None:
            return cls(WORKER, 1, inherited, stop, inherited.tickets)
        if workers > 1:
            return cls(SUPERVISOR, workers, None, stop, new_keys())
        return cls(SINGLE, workers, None, stop)


class Service(Protocol[C_contra]):
    async def start(self) -> None: ...
    def apply(self, config: C_contra) -> None: ...
    async def shutdown(self) -> None: ...
    async def new_generation(self) -> None: ...
    def reopen_logs(self) -> None: ...


class Runner(Generic[C]):
    def __init__(
        self,
        load: Callable[[], C],
        build: Callable[[C, asyncio.AbstractEventLoop, Placement], Service[C]],
        workers: Callable[[C], int],
    ) -> None:
        self._load = load
        self._build = build
        self._workers = workers

    def run(self, config: C) -> int:
        raise_file_limit()
        loop = uvloop.new_event_loop()
        asyncio.set_event_loop(loop)
        try:
            return loop.run_until_complete(self._main(config, loop))
        finally:
            loop.close()

    async def _main(self, config: C, loop: asyncio.AbstractEventLoop) -> int:
        stop = asyncio.Event()
        placement = Placement.of(self._workers(config), stop.set)
        service = self._build(config, loop, placement)
        try:
            await service.start()
        except (OSError, RuntimeError) as exc:
            print(f"cannot start: {exc}", file=sys.stderr)
            await service.shutdown()
            return 1
        # What start-up made (modules, config, the app) lives as long as the
        # process: out of the collector's sight, later collections walk only
        # what connections allocate.
        gc.freeze()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        loop.add_signal_handler(signal.SIGINT, stop.set)
        loop.add_signal_handler(signal.SIGHUP, lambda: self._reload(service))
        loop.add_signal_handler(signal.SIGUSR1, service.reopen_logs)
        loop.add_signal_handler(
            signal.SIGUSR2, lambda: loop.create_task(self._new_generation(service, placement))
        )
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

    async def _new_generation(self, service: Service[C], placement: Placement) -> None:
        if placement.role != SUPERVISOR:
            log.warning("SIGUSR2: only a supervisor (workers > 1) starts a new generation")
            return
        log.warning("SIGUSR2: starting a new generation of workers")
        await service.new_generation()


def raise_file_limit() -> None:
    """Every client and upstream connection is a descriptor: the soft limit goes
    up to the hard one (nginx: worker_rlimit_nofile)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def log_reloaded(
    logger: logging.Logger, source: object, servers: int, added: int, removed: int
) -> None:
    """The one line a reload leaves, in both proxies' words alike."""
    logger.warning(
        "reloaded %s: %d server(s) (+%d -%d)", source or "flags", servers, added, removed
    )


def setup_logging(name: str) -> None:
    role = " worker" if os.environ.get(ENV) else ""
    logging.basicConfig(
        level=logging.INFO,
        format=f"%(asctime)s {name}{role}[%(process)d] %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
