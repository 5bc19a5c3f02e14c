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
    """Envoy's retry budget, so that hedges and retries cannot multiply the load
    of a brownout: the extra attempts in flight at once are at most ``percent``
    of the requests in flight, or ``min_concurrency``, whichever is more.

    An exchange takes one token for its first extra attempt that may add load to
    a live server (a hedge, a retry after a timeout or a configured status) and
    gives it back when it ends. A retry after a refused or reset connection
    takes none: the server it failed on is not doing the work twice.
    """

    __slots__ = ("active", "exhausted", "min_concurrency", "percent", "waiting")

    def __init__(self, percent: int, min_concurrency: int) -> None:
        self.percent = percent
        self.min_concurrency = min_concurrency
        self.active = 0
        self.exhausted = 0
        # Hedges refused for want of a token, first come first served when one
        # is given back; each says whether it still wanted one (and took it).
        self.waiting: deque[Callable[[], bool]] = deque()

    def take(self, in_flight: int) -> bool:
        if self.active >= max(self.min_concurrency, in_flight * self.percent // 100):
            self.exhausted += 1
            return False
        self.active += 1
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
