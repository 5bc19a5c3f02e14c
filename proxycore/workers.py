"""Supervised workers, the way nginx's master, uvicorn's multiprocess supervisor
and gunicorn's arbiter run them: one supervisor owns the listening sockets, the
health checks and the admin API; N workers, each a process of its own on its own
core, accept from the same sockets and do only the hot path.

- The listening sockets are made by the supervisor and inherited by every
  worker (not SO_REUSEPORT: closing a SO_REUSEPORT listener resets the
  connections queued on it). A worker that stops accepting leaves the queue to
  the others; nothing queued is lost while the supervisor holds the socket.
- Each worker gets a control channel (proxycore/channel.py): the supervisor
  sends it the servers' state, it reports failure patterns and answers for its
  counters at scrape time.
- A worker that dies is replaced, logged with the signal or status that ended
  it and counted in /metrics (<service>_worker_deaths_total); SIGHUP goes on to every worker; on
  SIGTERM the workers drain as one process does. SIGUSR2 starts a new
  generation from the code and configuration on disk and drains the old one
  once every new worker is ready: a restart that drops no request.

A worker is the same program started with BALANCE_WORKER in its environment,
naming the inherited descriptors: "channel=5,listen.http=6" (and "tickets=7", a
pipe holding the TLS session ticket key: proxycore/tickets.py). What each
app does as a supervisor or a worker is in proxycore/sides.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from .channel import Channel, Message

log = logging.getLogger("balance.workers")

ENV = "BALANCE_WORKER"
# A worker that dies this soon after its start is restarted after a pause, which
# doubles each time (to MAX_BACKOFF): a crash loop must not spin a core.
YOUNG = 2.0
MAX_BACKOFF = 10.0


def count(value: object, where: str) -> int:
    """``workers`` as configured: a whole number of at least 1, or "auto" (one per core)."""
    from .config import ConfigError

    if value == "auto":
        return os.cpu_count() or 1
    if isinstance(value, str) and value.isdigit():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(
            f'{where}: expected a number of workers (1 or more) or "auto", got {value!r}'
        )
    return value


@dataclass(frozen=True)
class Inherited:
    """What a worker got from its supervisor: the listening sockets by name, and
    its end of the control channel."""

    channel: socket.socket
    listeners: dict[str, socket.socket]
    tickets: bytes | None = None  # the TLS session ticket key (proxycore/tickets.py)

    @classmethod
    def from_env(cls, environ: dict[str, str] | os._Environ[str] = os.environ) -> Inherited | None:
        text = environ.get(ENV)
        if not text:
            return None
        fds = dict(item.split("=", 1) for item in text.split(","))
        listeners = {
            name.removeprefix("listen."): socket.socket(fileno=int(fd))
            for name, fd in fds.items()
            if name.startswith("listen.")
        }
        tickets = None
        if "tickets" in fds:
            with os.fdopen(int(fds["tickets"]), "rb") as pipe:
                tickets = pipe.read()
        return cls(socket.socket(fileno=int(fds["channel"])), listeners, tickets)


@dataclass(eq=False)
class Worker:
    generation: int
    index: int
    process: asyncio.subprocess.Process
    channel: Channel
    started: float = field(default_factory=time.monotonic)
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    stopping: bool = False

    @property
    def pid(self) -> int:
        return self.process.pid

    def status(self) -> dict[str, Any]:
        return {
            "pid": self.pid,
            "generation": self.generation,
            "ready": self.ready.is_set(),
            "uptime_seconds": round(time.monotonic() - self.started, 1),
        }


WorkerHandler = Callable[[Worker, Message], Any]


class Workers:
    """The supervisor's side: ``size`` workers running ``argv`` with ``listeners``."""

    def __init__(
        self,
        argv: Sequence[str],
        listeners: dict[str, socket.socket],
        size: int,
        handler: WorkerHandler,
        welcome: Callable[[], Message],
        tickets: bytes | None = None,
    ) -> None:
        self._argv = list(argv)
        self._listeners = listeners
        self._tickets = tickets
        self.size = size
        self._handler = handler
        self._welcome = welcome  # the first message of every new worker (the servers' state)
        self.generation = 0
        self.current: list[Worker] = []
        self._old: list[Worker] = []
        self._watchers: set[asyncio.Task[None]] = set()
        self._stopping = False
        self._backoff: dict[int, float] = {}
        self._replacing = False
        # how workers died unasked ("SIGSEGV", "exit status 1") and how often: a
        # crash under attack shows in /metrics, not only in the log
        self.deaths: dict[str, int] = {}

    # -- starting and watching ----------------------------------------------------------
    async def start(self, timeout: float = 30.0) -> None:
        self.generation = 1
        self.current = [await self._spawn(1, i) for i in range(self.size)]
        await self._all_ready(self.current, timeout)

    async def _spawn(self, generation: int, index: int) -> Worker:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        fds = {"channel": theirs.fileno()}
        fds.update({f"listen.{n}": s.fileno() for n, s in self._listeners.items()})
        pipe = None
        if self._tickets is not None:
            # a secret: through a pipe the worker reads at its start, not its environment
            pipe = os.pipe()
            os.write(pipe[1], self._tickets)  # 80 bytes, far within a pipe's buffer
            os.close(pipe[1])
            fds["tickets"] = pipe[0]
        env = {**os.environ, ENV: ",".join(f"{k}={v}" for k, v in fds.items())}
        try:
            process = await asyncio.create_subprocess_exec(
                *self._argv, pass_fds=tuple(fds.values()), env=env
            )
        finally:
            theirs.close()
            if pipe is not None:
                os.close(pipe[0])
        worker: Worker | None = None

        def handle(message: Message) -> Any:
            assert worker is not None
            if message.get("op") == "ready":
                worker.ready.set()
                return None
            return self._handler(worker, message)

        channel = await Channel.over(ours, handle)
        worker = Worker(generation, index, process, channel)
        channel.send(self._welcome())
        task = asyncio.get_running_loop().create_task(self._watch(worker))
        self._watchers.add(task)
        task.add_done_callback(self._watchers.discard)
        log.info("worker %d of generation %d started (pid %d)", index, generation, process.pid)
        return worker

    async def _all_ready(self, workers: list[Worker], timeout: float) -> None:
        waits = [asyncio.ensure_future(w.ready.wait()) for w in workers]
        _, pending = await asyncio.wait(waits, timeout=timeout)
        for task in pending:
            task.cancel()
        if pending:
            raise RuntimeError(f"{len(pending)} worker(s) not ready within {timeout:g}s")

    async def _watch(self, worker: Worker) -> None:
        code = await worker.process.wait()
        worker.channel.close()
        if self._stopping or worker.stopping or worker not in self.current:
            log.info("worker %d (pid %d) exited with %s", worker.index, worker.pid, code)
            return
        how = death(code)
        self.deaths[how] = self.deaths.get(how, 0) + 1
        log.warning(
            "worker %d (pid %d) died (%s); starting another in its place",
            worker.index,
            worker.pid,
            how,
        )
        pause = 0.0
        if time.monotonic() - worker.started < YOUNG:
            pause = min(MAX_BACKOFF, max(0.1, self._backoff.get(worker.index, 0.05) * 2))
            self._backoff[worker.index] = pause
            await asyncio.sleep(pause)
        else:
            self._backoff.pop(worker.index, None)
        if self._stopping or worker not in self.current:
            return
        replacement = await self._spawn(worker.generation, worker.index)
        self.current[self.current.index(worker)] = replacement

    # -- talking to them ---------------------------------------------------------------
    def broadcast(self, message: Message) -> None:
        for worker in (*self.current, *self._old):
            worker.channel.send(message)

    async def gather(self, message: Message, timeout: float = 2.0) -> list[Message]:
        """Every current worker's answer to ``message``; a worker that does not
        answer in time (dying, just started) is left out, with a log line."""
        workers = [w for w in self.current if not w.channel.closed]
        answers = await asyncio.gather(
            *(w.channel.request(message, timeout) for w in workers), return_exceptions=True
        )
        out = []
        for worker, answer in zip(workers, answers, strict=True):
            if isinstance(answer, BaseException):
                log.warning(
                    "worker %d (pid %d) did not answer: %r", worker.index, worker.pid, answer
                )
            else:
                out.append(answer)
        return out

    def signal(self, sig: int) -> None:
        for worker in self.current:
            _kill(worker.pid, sig)

    def status(self) -> list[dict[str, Any]]:
        return [w.status() for w in (*self.current, *self._old)]

    # -- a new generation (SIGUSR2) and the stop (SIGTERM) -------------------------------
    async def replace(self, timeout: float = 30.0) -> None:
        """Start a new generation, and once all of it is ready drain the old one.
        A new generation that does not come up is stopped; the old one serves on."""
        if self._replacing or self._stopping:
            log.warning("a new generation is already being started; this one is ignored")
            return
        self._replacing = True
        try:
            generation = self.generation + 1
            fresh = [await self._spawn(generation, i) for i in range(self.size)]
            try:
                await self._all_ready(fresh, timeout)
            except RuntimeError as exc:
                log.error("new generation %d failed (%s); the old one serves on", generation, exc)
                for worker in fresh:
                    worker.stopping = True
                    _kill(worker.pid, signal.SIGKILL)
                return
            old, self.current, self.generation = self.current, fresh, generation
            self._old += old
            log.warning(
                "generation %d ready (pids %s); draining generation %d",
                generation,
                ", ".join(str(w.pid) for w in fresh),
                generation - 1,
            )
            for worker in old:
                worker.stopping = True
                _kill(worker.pid, signal.SIGTERM)
            await asyncio.gather(*(w.process.wait() for w in old))
            self._old = [w for w in self._old if w not in old]
        finally:
            self._replacing = False

    async def stop(self, timeout: float) -> None:
        """SIGTERM to every worker (each drains as one process does), SIGKILL to any
        still running after ``timeout``."""
        self._stopping = True
        workers = [*self.current, *self._old]
        for worker in workers:
            worker.stopping = True
            _kill(worker.pid, signal.SIGTERM)
        waits = [asyncio.ensure_future(w.process.wait()) for w in workers]
        if waits:
            _, pending = await asyncio.wait(waits, timeout=timeout)
            for worker in workers:
                if worker.process.returncode is None:
                    log.warning(
                        "worker pid %d still running after %gs; killed", worker.pid, timeout
                    )
                    _kill(worker.pid, signal.SIGKILL)
            if pending:
                await asyncio.wait(pending, timeout=5)
        for task in list(self._watchers):
            task.cancel()


def death(code: int) -> str:
    """How a process ended, from its exit code: the signal's name, or the status."""
    if code < 0:
        try:
            return signal.Signals(-code).name
        except ValueError:
            return f"signal {-code}"
    return f"exit status {code}"


def _kill(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)
