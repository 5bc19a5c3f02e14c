"""A request on its way to a server: the Exchange's first layer (lb/exchange.py
has the whole; lb/hedging.py the layer between).

From the end of a request head: choose a server of the route's pool, wait in
its queue when every fitting server is at max_conns, connect (or take a pooled
connection), send the head and the body as it comes, keep what a retry must
replay (up to ``limits.retry_body_buffer``), hold a token of the pool's retry
budget for an extra attempt, let the connection go when the exchange is done.
"""

from __future__ import annotations

import logging
from typing import Final

from proxycore.balancing import failed, observe
from proxycore.flow import Reason
from proxycore.servers import Server

from .downstream import Downstream
from .pools import Pool, Waiter
from .request_head import RequestInfo, new_request_id, upstream_request_head
from .routes import Route
from .state import LbState
from .upstream import UpstreamConnection

log = logging.getLogger("lb")

CONTINUE: Final = b"HTTP/1.1 100 Continue\r\n\r\n"
# "The caller has not read the clock": a plain float, not None, so that compiled
# a time passed down stays a C double (an optional float is a boxed object,
# allocated and freed per call).
NOT_READ: Final = -1.0
LAST_CHUNK: Final = b"0\r\n\r\n"


def frame_chunk(data: bytes) -> bytes:
    return b"%x\r\n%b\r\n" % (len(data), data)


class Attempts(Waiter):
    # No __slots__: most attributes keep their class default for the whole of a
    # plain request, so __init__ stores only what every request needs (measured:
    # 32 stores per request were a tenth of lb's Python time).
    server: Server | None = None
    reached_upstream = False
    answered_client = False
    sent_continue = False
    connecting = False
    head: bytes | None = None
    # What a retry must replay: the body sent so far, while it is within
    # limits.retry_body_buffer (then ``replayable`` goes False for good).
    sent_body: list[bytes] | None = None
    sent_size = 0
    replayable = True
    pending: list[bytes] | None = None  # body that came while the upstream was connecting
    body_received = 0
    status = 0
    chunked_to_client = False
    # A second attempt racing the first (a hedge), or being connected; and
    # whether this exchange holds a token of the retry budget.
    hedging = False
    budgeted = False
    dials = 0  # connects in flight for this request (a slow one gets a second)
    admitted = False  # past the route's fixed answer and rate limit (retries skip them)
    hedged = False  # a second attempt went out beside the first
    body_bytes = 0  # response body bytes written to the client
    tunnel_open = False  # after a 101: bytes go both ways as they come
    # For the access log only (read when it is on): when the connect and the first
    # response byte came, relative to the request's start.
    connect_time = 0.0
    first_byte_time = 0.0

    def __init__(
        self,
        client: Downstream,
        lb: LbState,
        method: bytes,
        target: bytes,
        info: RequestInfo,
        http11: bool,
        route: Route,
    ) -> None:
        self.client = client
        self.lb = lb
        self.route = route
        pool: Pool = route.pool
        self.pool = pool
        pool.budget.requests += 1  # the retry budget's share is of these
        self.timeouts = route.timeouts
        self.method = method
        self.target = target
        self.info = info
        self.http11 = http11
        self.request_id = (
            info.request_id
            if info.request_id is not None and self.lb.config.trust_request_id
            else new_request_id()
        )
        # An upgrade the upstream refuses leaves an HTTP connection like any other.
        self.client_keep_alive = not info.close
        self.started = self.lb.clock()
        self.tried: tuple[Server, ...] = ()  # a tuple: a request usually tries one
        self.body_done = not info.chunked and not info.content_length and info.upgrade is None

    # -- choosing and reaching a server --------------------------------------
    def begin(self, now: float = NOT_READ) -> None:
        """Choose a server and send; ``now``: the loop time when the caller has it
        (a request begun as soon as its head is read), else it is read here. When
        every fitting server is at its max_conns, wait in the queue for a slot. The
        first time, the route may answer itself, and its rate limit decides."""
        if not self.admitted and not self._admit():
            return
        pool = self.pool
        if pool.queue and not self.tried:
            pool.enqueue(self)  # others wait already: behind them, first come first served
            return
        server = pool.pick(self.tried)
        if server is not None and not pool.has_room(server):
            server = pool.pick(self.tried, room=True)
            if server is None:
                pool.enqueue(self)
                return
        if server is None:
            if not self.tried:
                self.lb.metrics.no_server += 1
                self.fail(503, "no_server", "no upstream server is available", retry_after=1)
            else:
                self.fail(
                    502, "bad_gateway", f"no other server to try after {len(self.tried)} attempt(s)"
                )
            return
        self._go(server, now)

    def _go(self, server: Server, now: float) -> None:
        """Send to ``server``, which has room: on a pooled connection, or a new one."""
        lb = self.lb
        tried = self.tried
        # built, not added: compiled, tuple + tuple is a generic call
        self.tried = (server,) if not tried else (*tried, server)
        if (
            self.info.expect_continue
            and not self.body_done
            and not self.sent_continue
            and self.http11
        ):
            # Like nginx: lb asks for the body itself; the upstream never sees Expect.
            self.sent_continue = True
            self.client.write(CONTINUE)
        conn = self.pool.conns.take(server)
        if conn is not None:
            self._attach(conn, lb.clock() if now == NOT_READ else now)
            return
        self.connecting = True
        self.client.valve.pause(Reason.NO_PEER_YET)
        self._dial(server)

    def _dial(self, server: Server) -> None:
        lb = self.lb
        self.dials += 1
        server.connecting += 1
        hedge_after = self.route.hedge_after
        if hedge_after > 0 and self.dials == 1:
            self.pool.slow_connects.set(self, lb.clock() + hedge_after)
        lb.loop.create_task(self._connect(server))

    def connect_slow(self) -> None:
        """A connect still not made after hedge_after (a frozen server's full
        accept queue drops the SYN, and it would take timeouts.connect): another
        server is dialled beside it, and the first connection made carries the
        request. Nothing was sent yet, so this is safe for any method."""
        lb = self.lb
        if not self.connecting or self.finished or self.upstream is not None:
            return
        server = self.pool.pick(self.tried, room=True)
        if server is None or len(self.tried) >= self.route.tries:
            return
        self.tried = (*self.tried, server)
        lb.metrics.hedges += 1
        self.hedged = True
        log.info(
            "connect to %s slow for %s; dialling %s too",
            self.tried[0].name,
            self.request_id.decode(),
            server.name,
        )
        self._dial(server)

    def dequeue(self) -> bool:
        """At the head of the queue when a slot freed: go if a server has room
        (True); False to keep waiting."""
        server = self.pool.pick(self.tried, room=True)
        if server is None:
            return False
        self.pool.left_queue(self)
        self._go(server, NOT_READ)
        return True

    def queue_expired(self) -> None:
        """queue.timeout passed with no slot free on any fitting server."""
        lb = self.lb
        if not self.queued or self.finished:
            return
        self.pool.left_queue(self)
        lb.metrics.queue_timeouts += 1
        self.fail(
            503,
            "queue_timeout",
            f"every server was busy for {self.pool.config.queue.timeout:g}s",
            retry_after=1,
        )

    async def _connect(self, server: Server) -> None:
        try:
            conn = await self.pool.conns.connect(server, self.timeouts.connect)
        except (OSError, TimeoutError) as exc:
            self._connected(server)
            self._connect_failed(server, exc)
            # another dial of this request may still make it (connect_slow)
            if not self.finished and self.upstream is None and not self.connecting:
                why = "connect timed out" if isinstance(exc, TimeoutError) else "connect failed"
                self._after_failure(server, f"{why}: {exc}" if str(exc) else why, timeout=False)
            return
        self._connected(server)
        if self.lb.access is not None and not self.connect_time:
            self.connect_time = self.lb.clock() - self.started
        if self.finished or self.upstream is not None:
            # the client went away meanwhile, or another dial won: kept warm
            self.pool.conns.give(conn, self.lb.clock())
            return
        if self.connecting:  # the other dial is a leftover now: the body goes on
            self.connecting = False
            self.pool.slow_connects.clear(self)
            self.client.valve.resume(Reason.NO_PEER_YET)
        try:
            self._attach(conn, self.lb.clock())
        except Exception:  # a bug must cost this request, not leave it hanging
            log.exception("internal error while sending %s", self.request_id.decode())
            conn.abort()
            self.fail(502, "internal_error", "internal error in lb")

    def _connected(self, server: Server) -> None:
        """A connect is over, either way; with none left in flight the client is
        read again (a retry, an error answer or the next pipelined request all
        need that)."""
        server.connecting -= 1
        self.dials -= 1
        if self.dials == 0:
            self.connecting = False
            self.pool.slow_connects.clear(self)
            self.client.valve.resume(Reason.NO_PEER_YET)
        self.pool.slot_freed()

    def _connect_failed(self, server: Server, exc: BaseException) -> None:
        """Passive evidence (Server.connect_failed), and a cost in the balancing
        (a failure counts as slow)."""
        failed(server, self.lb.clock())
        server.connect_failed(exc)

    def _attach(self, conn: UpstreamConnection, now: float) -> None:
        """Send the request on ``conn``, the attempt whose answer the client gets
        (unless a hedge answers first); ``now``: the loop time, read by the caller."""
        self.upstream = conn
        self.server = conn.server
        self._send_request(conn, now)
        if self.pending:
            pending, self.pending = self.pending, None
            for chunk in pending:
                self._send_body(chunk)
        if self.body_done:
            self._arm_hedge(conn, now)

    def _send_request(self, conn: UpstreamConnection, now: float) -> None:
        """The head and what there is of the body so far, on ``conn``."""
        assert conn.transport is not None
        server = conn.server
        server.active += 1
        server.total += 1
        conn.start_exchange(self, now)
        head = self.head
        if head is None:
            self.lb.metrics.dispatch_wait.observe(now - self.started)
            head = self.head = upstream_request_head(
                self.method,
                self.target,
                self.info,
                self.request_id,
                self.client.client_ip,
                self.lb.default_host,
                self.client.https,
            )
        conn.send(head)
        self.reached_upstream = True
        server.bytes_out += len(head)
        if self.sent_body:
            conn.transport.writelines(self.sent_body)

    def _let_go(self, conn: UpstreamConnection, reusable: bool, now: float = NOT_READ) -> None:
        server = conn.server
        server.active -= 1
        if now == NOT_READ:
            now = self.lb.clock()
        sent = conn.sent_at
        if sent >= 0:
            # answered, or given up on (a hedge won, the client left): either
            # way the server took this long at least
            conn.sent_at = -1.0
            observe(server, now - sent, now)
        if reusable:
            conn.release(now)
        else:
            conn.abort()
        if self.pool.queue:
            self.pool.slot_freed()

    def _detach(self, reusable: bool, now: float = NOT_READ) -> None:
        """Let go of the upstream (and of a hedge racing it); a reusable one goes
        back to the pool (``now``: the loop time when the caller has read it)."""
        if self.hedge_conn is not None:
            self._drop_hedge()
        conn = self.upstream
        if conn is None:
            return
        self.upstream = None
        self._let_go(conn, reusable, now)

    def _attempt_failed(self, conn: UpstreamConnection) -> None:
        """The attempt on ``conn`` failed (no answer, or a 5xx): it counts as slow
        in the balancing, instead of as the time it took."""
        if conn.sent_at >= 0:
            conn.sent_at = -1.0
            failed(conn.server, self.lb.clock())

    def _budget(self) -> bool:
        """A token of the retry budget for an extra attempt that may add load to a
        live server; one per exchange, given back when it ends."""
        if self.budgeted:
            return True
        lb = self.lb
        if self.pool.budget.take(lb.metrics.in_flight):
            self.budgeted = True
            return True
        return False

    def _give_budget(self) -> None:
        self.budgeted = False
        budget = self.pool.budget
        budget.give()
        if budget.waiting:
            # not from inside this exchange's own ending: on the loop's next turn
            self.lb.loop.call_soon(budget.wake)

    # -- the request body ------------------------------------------------------
    def _send_body(self, chunk: bytes) -> None:
        conn = self.upstream
        if conn is None or self.connecting or conn.transport is None:
            if self.pending is None:
                self.pending = []
            self.pending.append(chunk)
            return
        conn.send(chunk)
        conn.server.bytes_out += len(chunk)
        if self.replayable:
            if self.sent_size + len(chunk) <= self.lb.config.limits.retry_body_buffer:
                if self.sent_body is None:
                    self.sent_body = []
                self.sent_body.append(chunk)
                self.sent_size += len(chunk)
            else:
                # too big to keep: once sent, this request cannot be retried
                self.replayable = False
                self.sent_body = None

    def request_body(self, data: bytes) -> None:
        if self.finished:
            return
        self.body_received += len(data)
        if self.body_received > self.route.max_body_bytes:
            self.client.refuse_body()
            return
        self._send_body(frame_chunk(data) if self.info.chunked else data)

    def request_body_end(self) -> None:
        if self.body_done:
            return
        self.body_done = True
        if self.info.chunked and not self.finished:
            self._send_body(LAST_CHUNK)
        conn = self.upstream
        if conn is not None and not conn.answering and not self.finished:
            self._arm_hedge(conn, self.lb.clock())

    def _retry(self, server: Server | None, why: str) -> None:
        self._detach(reusable=False)
        self.lb.metrics.retries += 1
        log.info(
            "retrying %s %s after %s: %s",
            self.method.decode(),
            self.target[:200].decode("latin-1"),
            server.name if server else "?",
            why,
        )
        self.begin()

    # -- what the layers above do (lb/hedging.py, lb/exchange.py) ---------------------
    def _admit(self) -> bool:
        """The route's fixed answer and rate limit; True: on to a server now."""
        raise NotImplementedError

    def _arm_hedge(self, conn: UpstreamConnection, now: float) -> None:
        raise NotImplementedError

    def _drop_hedge(self) -> None:
        raise NotImplementedError

    def _after_failure(self, server: Server | None, why: str, *, timeout: bool) -> None:
        raise NotImplementedError
