"""Hedging, the Exchange's second layer: a second attempt when the first is
slow to answer (Envoy's hedge_on_per_try_timeout), and a request moved off a
server the checks marked down before it answered.

A hedge goes out when the first attempt has had no response byte for the
pool's hedge delay (its recent p95, the route's hedge_after the least:
lb/hedgepolicy.py), only for a request that may be sent twice (idempotent, its
body replayable), within the route's tries, while the pool's hedges still win,
and within the pool's retry budget (a share of the requests in flight, and of
the requests of the last seconds: lb/retry.py), so a slow pool is never sent
twice its load. The first attempt to answer wins; the other is closed.
"""

from __future__ import annotations

from proxycore.servers import Server

from .attempts import Attempts
from .retry import IDEMPOTENT, may_retry
from .upstream import UpstreamConnection


class Hedging(Attempts):
    def _arm_hedge(self, conn: UpstreamConnection, now: float) -> None:
        after = self.route.hedge_after
        if (
            after > 0
            and self.replayable
            and self.method in IDEMPOTENT
            and self.info.upgrade is None
            and not self.answered_client
        ):
            conn.hedge_timer.at(now + self.pool.hedges.after(after))

    def hedge_due(self, conn: UpstreamConnection) -> None:
        """No response byte from ``conn`` within hedge_after: the request goes to
        another server too, and the first to answer wins (``first_byte_from``).
        Never a request that may not be sent twice (_arm_hedge), never past the
        retry budget or the tries."""
        lb = self.lb
        if (
            conn is not self.upstream
            or self.finished
            or self.answered_client
            or self.hedge_conn is not None
            or self.hedging
            or len(self.tried) >= self.route.tries
        ):
            return
        pool = self.pool
        server = pool.pick(self.tried, room=True)
        if server is None:
            # asked again a hedge_after later: a server may be back up (or have room)
            conn.hedge_timer.at(lb.clock() + self.route.hedge_after)
            return
        if not pool.hedges.may_hedge(lb.clock()):
            return  # hedges stopped winning: this request waits for its first attempt
        if not self._budget():
            pool.budget.waiting.append(self._hedge_when_budget)  # as soon as a token is back
            return
        self.tried = (*self.tried, server)
        lb.metrics.hedges += 1
        pool.hedges.sent += 1
        self.hedged = True
        pooled = pool.conns.take(server)
        if pooled is not None:
            self.hedge_conn = pooled
            self._send_request(pooled, lb.clock())
            return
        self.hedging = True
        server.connecting += 1
        lb.loop.create_task(self._connect_hedge(server))

    async def _connect_hedge(self, server: Server) -> None:
        lb = self.lb
        try:
            conn = await self.pool.conns.connect(server, self.timeouts.connect)
        except (OSError, TimeoutError) as exc:
            self.hedging = False
            server.connecting -= 1
            self.pool.slot_freed()
            self._connect_failed(server, exc)
            if self.upstream is None and not self.finished:
                # the first attempt failed meanwhile and was waiting for this one
                self._after_failure(server, f"hedge connect failed: {exc}", timeout=False)
            return
        self.hedging = False
        server.connecting -= 1
        self.pool.slot_freed()
        first = self.upstream
        if self.finished or self.answered_client or (first is not None and first.answering):
            self.pool.conns.give(conn, lb.clock())  # too late: the first attempt is answering
        elif first is None:
            self._attach(conn, lb.clock())  # the first attempt failed meanwhile
        else:
            self.hedge_conn = conn
            self._send_request(conn, lb.clock())

    def _hedge_when_budget(self) -> bool:
        """A budget token came back (RetryBudget.wake): hedge now if still due."""
        conn = self.upstream
        if conn is None or conn.answering or self.finished or self.hedge_conn is not None:
            return False
        self.hedge_due(conn)
        return self.budgeted

    def first_byte_from(self, conn: UpstreamConnection) -> bool:
        """The first response byte of ``conn`` while a hedge races (the caller
        checked): the first to answer wins, the other attempt is abandoned and its
        connection closed (its response is not wanted). False when ``conn`` lost."""
        hedge = self.hedge_conn
        self.hedge_conn = None
        if conn is hedge:
            loser = self.upstream
            self.upstream = conn
            self.server = conn.server
            self.lb.metrics.hedge_wins += 1
            self.pool.hedges.won += 1
        elif conn is self.upstream:
            loser = hedge
        else:
            return False
        if loser is not None:
            self._let_go(loser, reusable=False)
        return True

    def _drop_hedge(self) -> None:
        hedge = self.hedge_conn
        if hedge is not None:
            self.hedge_conn = None
            self._let_go(hedge, reusable=False)

    def _hedge_carries_on(self, failed: UpstreamConnection) -> bool:
        """The first attempt ``failed`` before answering: a hedge racing it, or
        being connected, carries the request on alone. False when there is none."""
        if self.answered_client:
            return False
        hedge = self.hedge_conn
        if hedge is None and not self.hedging:
            return False
        self.upstream = None
        self._let_go(failed, reusable=False)
        if hedge is not None:
            self.hedge_conn = None
            self.upstream = hedge
            self.server = hedge.server
        # else: _connect_hedge attaches what it connects, or fails the request
        return True

    def server_down(self, server: Server) -> None:
        """The checks marked ``server`` down: an attempt still waiting there for
        its first byte moves on now, instead of waiting for its timeout."""
        if self.finished or self.answered_client or self.tunnel_open:
            return
        hedge = self.hedge_conn
        if hedge is not None and hedge.server is server and not hedge.answering:
            self._drop_hedge()
        conn = self.upstream
        if conn is None or conn.server is not server or conn.answering:
            return
        if self._hedge_carries_on(conn):
            return
        if self._may_send_again():
            self.lb.metrics.moved += 1
            self._retry(server, "marked down by the checks")

    def _may_send_again(self) -> bool:
        """Whether this request, sent to a server that has not answered the
        client, may go to another (retry.may_retry's rule)."""
        return may_retry(
            method=self.method,
            reached_upstream=True,
            answered_client=False,
            body_replayable=self.body_done and self.replayable,
            tries_done=len(self.tried),
            max_tries=self.route.tries,
        )
