"""Gray failures: a server that accepts connections (the kernel does that for a
stopped process) but answers nothing, as under SIGSTOP, `docker pause`, a hung
disk or a stop-the-world stall.

The checks find one within fall × interval. The traffic finds it sooner: bytes
went to the server since it last sent any, and it has sent nothing for
``after`` seconds. That alone may be a slow answer, so it is only a suspicion,
settled by asking the server something every live one answers at once (a
proxy's own question: an SSLRequest for Postgres, the check's GET for HTTP):
no answer within ``after`` either, and the server is marked down now, for
every worker, and traffic moves to the next fitting one. Never below the
panic threshold: a pool all of whose servers stall together (a database
behind them all frozen) is not emptied by it.

In a worker, a suspicion goes to the supervisor, which asks and decides for
every worker alike (the same as a pattern of failures, Server.report).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable

from .channel import Message
from .servers import Server
from .sides import WorkerSide

log = logging.getLogger("balance.silence")

SUSPECT = "suspect"  # a worker's message to its supervisor
HEARD = "heard"  # ... and that a server it told of has been heard from since
SWEEP = 0.1  # seconds between two looks at the byte counters

# Whether the server answers a question within the time given (any answer: a
# live server; nothing: a frozen one).
Answers = Callable[[Server, float], Awaitable[bool]]


class Silence:
    """When each server last sent anything, and whether bytes went to it since.

    Reads the relays' plain byte counters (Server.bytes_in / bytes_out) at each
    sweep: nothing is added to the per-read work."""

    __slots__ = ("_heard", "after")

    def __init__(self, after: float) -> None:
        self.after = after
        # server -> (bytes_in and bytes_out when it was last heard, and when)
        self._heard: dict[Server, tuple[int, int, float]] = {}

    def suspects(self, servers: Iterable[Server], now: float) -> list[Server]:
        """Servers taking traffic, owed an answer and silent for ``after``.

        Silence is counted from the last sweep that found the server owing
        nothing (or since it was last heard), so the first bytes sent to a
        server idle for an hour are not an hour of silence."""
        found = []
        for server in servers:
            heard = self._heard.get(server)
            if heard is None or server.bytes_in != heard[0] or server.bytes_out == heard[1]:
                self._heard[server] = (server.bytes_in, server.bytes_out, now)
            elif now - heard[2] >= self.after and server.open:
                found.append(server)
        return found

    def cleared(self, server: Server, now: float) -> None:
        """The server answered the question: a new window of silence begins."""
        self._heard[server] = (server.bytes_in, server.bytes_out, now)


class StallWatch:
    """Sweeps ``servers()`` every SWEEP seconds for silent ones and settles each
    suspicion with ``answers`` (here, or through the supervisor: ``report_to``)."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        servers: Callable[[], Iterable[Server]],
        after: float,
        answers: Answers,
        what: str,
        check_timeout: float,
        question: str,
    ) -> None:
        self.loop = loop
        # how long a question waits when sweeps are off (after = 0) and a timed-out
        # check raised the suspicion
        self.check_timeout = check_timeout
        self.silence = Silence(after)
        self._servers = servers
        self._answers = answers
        self._what = what  # what waited: "requests", "sessions"
        self._question = question  # what ``answers`` asks, for the log: "an SSLRequest"
        self._asking: set[Server] = set()
        self._sweeper: asyncio.TimerHandle | None = None
        # In a worker: suspicions go to the supervisor (report_to), and when each
        # server told of is next heard from (its bytes_in when told).
        self._worker: WorkerSide | None = None
        self._told: dict[Server, int] = {}
        # In a supervisor: when a worker last said it heard from each server.
        self._news: dict[Server, float] = {}
        self._supervising = False  # workers tell this one what they see (supervise)
        self.asked = 0  # questions asked
        self.marked_down = 0  # servers marked down for want of an answer

    @property
    def after(self) -> float:
        return self.silence.after

    @after.setter
    def after(self, seconds: float) -> None:
        self.silence.after = seconds

    def report_to(self, worker: WorkerSide) -> None:
        """In a worker: suspicions go to the supervisor, which asks (``from_worker``)
        and marks down for every worker alike."""
        self._worker = worker

    def supervise(self) -> None:
        """In a supervisor: its workers see the traffic, and say what they hear
        (``from_worker``); its own byte counters are their sums at the last
        scrape, which are no news of the server now."""
        self._supervising = True

    def from_worker(self, message: Message, find: Callable[[str], Server | None]) -> bool:
        """In a supervisor: whether ``message`` was a worker's suspicion (then
        asked) or news that a server was heard from."""
        op = message.get("op")
        if op != SUSPECT and op != HEARD:
            return False
        server = find(message.get("server", ""))
        if server is None:
            return True
        if op == HEARD:
            self._news[server] = self.loop.time()
        else:
            self.ask(server, message["why"])
        return True

    def start(self) -> None:
        if self._sweeper is None:
            self._sweep()

    def stop(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None

    def _sweep(self) -> None:
        after = self.silence.after
        if after > 0:
            for server in self.silence.suspects(self._servers(), self.loop.time()):
                self.ask(server, f"{self._what} waited {after:g}s with no byte from it")
        if self._told:
            self._tell_heard()
        self._sweeper = self.loop.call_later(SWEEP, self._sweep)

    def _tell_heard(self) -> None:
        """In a worker: the servers it told of that have been heard from since
        (the supervisor's question may go unanswered only for want of a fork)."""
        worker = self._worker
        for server, mark in list(self._told.items()):
            if server.bytes_in != mark:
                del self._told[server]
                if worker is not None and worker.channel is not None:
                    worker.channel.send({"op": HEARD, "server": server.key})

    def ask(self, server: Server, why: str) -> None:
        """Settle a suspicion of ``server`` (here: a sweep's, a check that timed
        out, or a worker's)."""
        worker = self._worker
        if worker is not None:
            if worker.channel is not None:
                worker.channel.send({"op": SUSPECT, "server": server.key, "why": why})
                self._told[server] = server.bytes_in
            # told once a window: the supervisor asks (and its answer reaches
            # every worker); a server still silent a window later is told again
            self.silence.cleared(server, self.loop.time())
            return
        if server not in self._asking:
            self._asking.add(server)
            self.loop.create_task(self._confirm(server, why))

    async def _confirm(self, server: Server, why: str) -> None:
        wait = self.silence.after or self.check_timeout
        self.asked += 1
        heard, asked_at = server.bytes_in, self.loop.time()
        try:
            alive = await self._answers(server, wait)
            if not alive and self._supervising:
                # workers tell what they hear at their sweeps: a sweep's worth of
                # news may still be on its way
                await asyncio.sleep(2 * SWEEP)
        finally:
            self._asking.discard(server)
        # A question waits behind every login the server has yet to fork for, so
        # in a burst it may go unanswered while the sessions are answered: that
        # is a swamped server, not a frozen one.
        if self._supervising:
            lives = self._news.get(server, -1.0) >= asked_at
        else:
            lives = server.bytes_in != heard
        if alive or lives:
            self.silence.cleared(server, self.loop.time())
            return
        if server.may_eject is not None and not server.may_eject(server):
            log.warning(
                "server %s is silent (%s) but stays in: marking it down would leave fewer "
                "than %d%% of the servers up (panic threshold)",
                server.name,
                why,
                server.params.panic_threshold,
            )
            self.silence.cleared(server, self.loop.time())
            return
        self.marked_down += 1
        server.mark_down(f"{why}, and no answer to {self._question} within {wait:g}s")
