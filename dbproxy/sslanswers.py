"""What dbproxy knows of its servers' answers to SSLRequest (ssl = "passthrough").

A server that answered 'N' a moment ago is answered 'N' for, at once: forwarded,
the SSLRequest waits for the backend Postgres forks for it; answered here, the
client's startup packet is on its way meanwhile (measured under pgbench -S -C:
a tenth more connections a second). A server that says 'S' is always asked: TLS
stays end to end."""

from __future__ import annotations

from collections.abc import Callable

from proxycore.servers import Server


class SslAnswers:
    def __init__(self, clock: Callable[[], float], memory: Callable[[], float]) -> None:
        self._clock = clock
        self._memory = memory  # ssl_refusal_memory, as configured now
        self._refused_at: dict[Server, float] = {}  # when each last said 'N'
        self.forwarded = 0
        self.answered_for_server = 0

    def answered(self, server: Server, answer: bytes) -> None:
        """``server`` answered a forwarded SSLRequest."""
        self.forwarded += 1
        if answer == b"N":
            self._refused_at[server] = self._clock()
        else:
            self._refused_at.pop(server, None)

    def refuses(self, server: Server | None) -> bool:
        """Whether ``server`` said 'N' within ssl_refusal_memory: its session hears
        that 'N' from dbproxy now."""
        at = None if server is None else self._refused_at.get(server)
        if at is None or self._clock() - at >= self._memory():
            return False
        self.answered_for_server += 1
        return True

    def forget(self, server: Server) -> None:
        """Gone, or back from down (restarted, maybe with TLS on): asked again."""
        self._refused_at.pop(server, None)
