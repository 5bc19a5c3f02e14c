"""When a failed request may be sent again: the design notes' rule, as one function.

- Nothing reached an upstream (connect failed): always, whatever the method.
- Something reached an upstream but no response byte reached the client: only an
  idempotent method, and only while its body is still at hand to send again.
- A response byte reached the client: never; the response is already under way.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Final

from .settings import RetryBudgetSettings

IDEMPOTENT: Final = frozenset({b"GET", b"HEAD", b"OPTIONS", b"PUT", b"DELETE", b"TRACE"})


def may_retry(
    *,
    method: bytes,
    reached_upstream: bool,
    answered_client: bool,
    body_replayable: bool,
    tries_done: int,
    max_tries: int,
) -> bool:
    if answered_client or tries_done >= max_tries:
        return False
    if not reached_upstream:
        return True
    return method in IDEMPOTENT and body_replayable


class RetryBudget:
    """What hedges and retries may cost a pool, so that they cannot multiply the
    load of a brownout, bounded two ways:

    - in flight at once (Envoy's retry_budget): the extra attempts are at most
      ``percent`` of the requests in flight, or ``min_concurrency``;
    - over time (Finagle's RetryBudget): over the last ``window`` seconds, at
      most ``window_percent`` of that window's requests, plus ``min_per_second``
      a second so that a quiet pool may still retry. Hedges are short-lived:
      bounded by concurrency alone, a pool slow all over could still be sent
      nearly twice its requests.

    An exchange takes one token for its first extra attempt that may add load to
    a live server (a hedge, a retry after a timeout or a configured status) and
    gives it back when it ends. A retry after a refused or reset connection
    takes none: the server it failed on is not doing the work twice. The pool
    counts its requests (``requests``) and marks the counts every second
    (``tick``).
    """

    __slots__ = (
        "_marks",
        "active",
        "exhausted",
        "extras",
        "min_concurrency",
        "min_per_second",
        "percent",
        "requests",
        "spent",
        "waiting",
        "window",
        "window_percent",
    )

    def __init__(self, settings: RetryBudgetSettings, now: float) -> None:
        self.configure(settings)
        self.active = 0
        self.exhausted = 0  # refused: too many extra attempts in flight
        self.spent = 0  # refused: the window's share was spent
        self.requests = 0  # requests the pool has had (counted by its exchanges)
        self.extras = 0  # extra attempts it has allowed
        # (time, requests, extras) each second, the oldest at most a window old
        self._marks: deque[tuple[float, int, int]] = deque([(now, 0, 0)])
        # Hedges refused for want of a token, first come first served when one
        # is given back; each says whether it still wanted one (and took it).
        self.waiting: deque[Callable[[], bool]] = deque()

    def configure(self, settings: RetryBudgetSettings) -> None:
        self.percent = settings.percent
        self.min_concurrency = settings.min_concurrency
        self.window_percent = settings.window_percent
        self.min_per_second = settings.min_per_second
        self.window = settings.window

    def tick(self, now: float) -> None:
        marks = self._marks
        marks.append((now, self.requests, self.extras))
        while len(marks) > 1 and marks[1][0] <= now - self.window:
            marks.popleft()

    def allowed(self) -> float:
        """Extra attempts the window allows now, beyond those it has had."""
        _, requests, extras = self._marks[0]
        share = (self.requests - requests) * self.window_percent / 100
        return share + self.min_per_second * self.window - (self.extras - extras)

    def take(self, in_flight: int) -> bool:
        if self.active >= max(self.min_concurrency, in_flight * self.percent // 100):
            self.exhausted += 1
            return False
        if self.allowed() < 1:
            self.spent += 1
            return False
        self.active += 1
        self.extras += 1
        return True

    def give(self) -> None:
        self.active -= 1

    def wake(self) -> None:
        """A token came back: the first waiter that still wants one takes it. Each
        waiter is asked once (one that finds no token after all waits again, at
        the back)."""
        waiting = self.waiting
        for _ in range(len(waiting)):
            if waiting.popleft()():
                return
