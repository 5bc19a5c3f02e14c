"""One request and its response: server choice, retries, framing both ways.

An Exchange lives from the end of a request head until its response is written
(or fails). It never buffers a body beyond what a retry may replay
(``limits.retry_body_buffer``) plus one read while an upstream connects.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Final

from proxycore.balancing import any_available, pick
from proxycore.flow import HIGH_WATER, HalfClose, Reason
from proxycore.servers import Server

from .heads import (
    RequestInfo,
    ResponseInfo,
    client_response_head,
    error_response,
    new_request_id,
    upstream_request_head,
)
from .retry import IDEMPOTENT, may_retry
from .upstream import UpstreamConnection

if TYPE_CHECKING:
    from .app import Balancer
    from .client import ClientConnection

log = logging.getLogger("lb")
access_log = logging.getLogger("lb.access")

CONTINUE: Final = b"HTTP/1.1 100 Continue\r\n\r\n"
# "The caller has not read the clock": a plain float, not None, so that compiled
# a time passed down stays a C double (an optional float is a boxed object,
# allocated and freed per call).
NOT_READ: Final = -1.0
LAST_CHUNK: Final = b"0\r\n\r\n"


def frame_chunk(data: bytes) -> bytes:
    return b"%x\r\n%b\r\n" % (len(data), data)


class Exchange:
    # No __slots__: most attributes keep their class default for the whole of a
    # plain request, so __init__ stores only what every request needs (measured:
    # 32 stores per request were a tenth of lb's Python time).
    upstream: UpstreamConnection | None = None
    server: Server | None = None
    reached_upstream = False
    answered_client = False
    sent_continue = False
    connecting = False
    finished = False
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
    response_until_close = False
    tunnel_open = False
    tunnel_buffer: list[bytes] | None = None
    tunnel_held = 0
    # A second attempt racing the first (a hedge), or being connected; and
    # whether this exchange holds a token of the retry budget.
    hedge_conn: UpstreamConnection | None = None
    hedging = False
    budgeted = False
    queued = False  # waiting in lb's queue for a slot on a server
    dials = 0  # connects in flight for this request (a slow one gets a second)
    queued_at = 0.0
    tunnel_ends: HalfClose | None = None

    def __init__(
        self,
        client: ClientConnection,
        method: bytes,
        target: bytes,
        info: RequestInfo,
        http11: bool,
    ) -> None:
        self.client = client
        self.lb: Balancer = client.lb
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
        every fitting server is at its max_conns, wait in the queue for a slot."""
        lb = self.lb
        if lb.queue and not self.tried:
            lb.enqueue(self)  # others wait already: behind them, first come first served
            return
        server = pick(lb.servers.order, lb.policy, self.tried)
        if server is not None and not lb.has_room(server):
            server = pick(lb.servers.order, lb.policy, self.tried, lb.has_room)
            if server is None:
                lb.enqueue(self)
                return
        if server is None:
            if not self.tried:
                lb.metrics.no_server += 1
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
        conn = lb.pool.take(server)
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
        if lb.hedge_after > 0 and self.dials == 1:
            lb.slow_connects.set(self, lb.clock() + lb.hedge_after)
        lb.loop.create_task(self._connect(server))

    def connect_slow(self) -> None:
        """A connect still not made after hedge_after (a frozen server's full
        accept queue drops the SYN, and it would take timeouts.connect): another
        server is dialled beside it, and the first connection made carries the
        request. Nothing was sent yet, so this is safe for any method."""
        lb = self.lb
        if not self.connecting or self.finished or self.upstream is not None:
            return
        server = pick(lb.servers.order, lb.policy, self.tried, lb.has_room)
        if server is None or len(self.tried) >= lb.config.tries:
            return
        self.tried = (*self.tried, server)
        lb.metrics.hedges += 1
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
        lb = self.lb
        server = pick(lb.servers.order, lb.policy, self.tried, lb.has_room)
        if server is None:
            return False
        lb.left_queue(self)
        self._go(server, NOT_READ)
        return True

    def queue_expired(self) -> None:
        """queue.timeout passed with no slot free on any fitting server."""
        lb = self.lb
        if not self.queued or self.finished:
            return
        lb.left_queue(self)
        lb.metrics.queue_timeouts += 1
        self.fail(
            503,
            "queue_timeout",
            f"every server was busy for {lb.config.queue.timeout:g}s",
            retry_after=1,
        )

    async def _connect(self, server: Server) -> None:
        try:
            conn = await self.lb.pool.connect(server)
        except (OSError, TimeoutError) as exc:
            self._connected(server)
            server.connect_errors += 1
            self._connect_failed(server, exc)
            # another dial of this request may still make it (connect_slow)
            if not self.finished and self.upstream is None and not self.connecting:
                why = "connect timed out" if isinstance(exc, TimeoutError) else "connect failed"
                self._after_failure(server, f"{why}: {exc}" if str(exc) else why, timeout=False)
            return
        self._connected(server)
        if self.finished or self.upstream is not None:
            # the client went away meanwhile, or another dial won: kept warm
            self.lb.pool.give(conn, self.lb.clock())
            return
        if self.connecting:  # the other dial is a leftover now: the body goes on
            self.connecting = False
            self.lb.slow_connects.clear(self)
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
            self.lb.slow_connects.clear(self)
            self.client.valve.resume(Reason.NO_PEER_YET)
        self.lb.slot_freed()

    @staticmethod
    def _connect_failed(server: Server, exc: BaseException) -> None:
        """Passive evidence from a failed connect: a refused one (nothing listens)
        takes the server out at once; a timed-out one counts only when it was
        the server's only connect in flight (with others it may be lb's own
        burst, not a dead server: the checks settle that)."""
        if isinstance(exc, ConnectionRefusedError):
            server.record_failure(f"connect refused: {exc}", at_once=True)
        elif not isinstance(exc, TimeoutError):
            server.record_failure(f"connect failed: {exc}")
        elif server.connecting == 0:
            server.record_failure("connect timed out")

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
            head = self.head = upstream_request_head(
                self.method,
                self.target,
                self.info,
                self.request_id,
                self.client.client_ip,
                self.lb.default_host,
            )
        conn.send(head)
        self.reached_upstream = True
        server.bytes_out += len(head)
        if self.sent_body:
            conn.transport.writelines(self.sent_body)

    def _let_go(self, conn: UpstreamConnection, reusable: bool, now: float = NOT_READ) -> None:
        conn.server.active -= 1
        lb = self.lb
        if reusable:
            conn.release(lb.clock() if now == NOT_READ else now)
        else:
            conn.abort()
        if lb.queue:
            lb.slot_freed()

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

    # -- hedging: a second attempt when the first is slow to answer -------------
    def _arm_hedge(self, conn: UpstreamConnection, now: float) -> None:
        after = self.lb.hedge_after
        if (
            after > 0
            and self.replayable
            and self.method in IDEMPOTENT
            and self.info.upgrade is None
            and not self.answered_client
        ):
            conn.hedge_timer.at(now + after)

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
            or len(self.tried) >= lb.config.tries
        ):
            return
        server = pick(lb.servers.order, lb.policy, self.tried, lb.has_room)
        if server is None:
            # asked again a hedge_after later: a server may be back up (or have room)
            conn.hedge_timer.at(lb.clock() + lb.config.hedge_after)
            return
        if not self._budget():
            lb.budget.waiting.append(self._hedge_when_budget)  # as soon as a token is back
            return
        self.tried = (*self.tried, server)
        lb.metrics.hedges += 1
        pooled = lb.pool.take(server)
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
            conn = await lb.pool.connect(server)
        except (OSError, TimeoutError) as exc:
            self.hedging = False
            server.connecting -= 1
            lb.slot_freed()
            server.connect_errors += 1
            self._connect_failed(server, exc)
            if self.upstream is None and not self.finished:
                # the first attempt failed meanwhile and was waiting for this one
                self._after_failure(server, f"hedge connect failed: {exc}", timeout=False)
            return
        self.hedging = False
        server.connecting -= 1
        lb.slot_freed()
        first = self.upstream
        if self.finished or self.answered_client or (first is not None and first.answering):
            lb.pool.give(conn, lb.clock())  # too late: the first attempt is answering
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

    def _budget(self) -> bool:
        """A token of the retry budget for an extra attempt that may add load to a
        live server; one per exchange, given back when it ends."""
        if self.budgeted:
            return True
        lb = self.lb
        if lb.budget.take(lb.metrics.in_flight):
            self.budgeted = True
            return True
        return False

    def _give_budget(self) -> None:
        self.budgeted = False
        budget = self.lb.budget
        budget.give()
        if budget.waiting:
            # not from inside this exchange's own ending: on the loop's next turn
            self.lb.loop.call_soon(budget.wake)

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
            max_tries=self.lb.config.tries,
        )

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
        if self.body_received > self.lb.config.limits.max_body_bytes:
            self.client.refuse_body(self)
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

    # -- the response ------------------------------------------------------------
    def on_interim_response(self, status: int, reason: bytes, info: ResponseInfo) -> None:
        # 100 is ours to send (see begin); other 1xx (103 Early Hints) go through,
        # less hop-by-hop headers.
        if status != 100 and self.http11:
            self.client.write(b"HTTP/1.1 %d %b\r\n%b\r\n" % (status, reason, info.lines))

    def on_switching_protocols(
        self, conn: UpstreamConnection, reason: bytes, info: ResponseInfo
    ) -> bool:
        if self.info.upgrade is None:
            self.upstream_failed(conn, "101 without an upgrade request", failure=True)
            return False
        self.status = 101
        self.answered_client = True
        head = client_response_head(
            101,
            reason,
            info,
            content_length=None,
            chunked_to_client=False,
            keep_alive=True,
            request_id=self.request_id,
            upgrade=True,
        )
        self.client.write_parts(head)
        self.tunnel_open = True
        if self.tunnel_buffer and self.upstream is not None and self.upstream.transport is not None:
            self.upstream.transport.writelines(self.tunnel_buffer)
        self.tunnel_buffer = None
        self.client.start_tunnel(self)
        return True

    def on_response_head(
        self, status: int, reason: bytes, info: ResponseInfo, upstream_keep_alive: bool
    ) -> bool:
        """Write the head to the client; True when the response has no body to wait for (HEAD)."""
        lb = self.lb
        server = self.server
        if server is None:
            pass
        elif status not in lb.config.passive_statuses:
            server.fails_in_a_row = 0  # an answer: failures are counted in a row
        else:
            server.record_failure(f"answered {status}")
            # Retried only when another server can answer; else this answer is
            # the best there is and goes through (as nginx's proxy_next_upstream).
            if self._may_send_again() and any_available(lb.servers, self.tried) and self._budget():
                self._retry(server, f"answered {status}")
                return False
        self.status = status
        content_length = info.content_length
        upstream_chunked = info.chunked
        is_head = self.method == b"HEAD"
        no_body = is_head or status in (204, 304)
        if status in (204, 304):
            content_length = None
        elif not no_body and content_length is None:
            if upstream_chunked or not upstream_keep_alive:
                self.response_until_close = not upstream_chunked
            if self.http11:
                self.chunked_to_client = True
            else:
                self.client_keep_alive = False  # an HTTP/1.0 client reads to the close
        if self.client_keep_alive and (lb.draining or self.client.done_sending):
            self.client_keep_alive = not self.client.last_answer(self)
        head = client_response_head(
            status,
            reason,
            info,
            content_length=content_length,
            chunked_to_client=self.chunked_to_client,
            keep_alive=self.client_keep_alive,
            request_id=self.request_id,
        )
        self.answered_client = True
        self.client.write_parts(head)
        return is_head

    def on_response_body(self, data: bytes) -> None:
        if self.answered_client and not self.finished:
            self.client.write(frame_chunk(data) if self.chunked_to_client else data)

    def on_response_complete(self, upstream_reusable: bool) -> None:
        if self.finished:
            self._detach(reusable=False)
            return
        if self.chunked_to_client:
            self.client.write(LAST_CHUNK)
        reusable = upstream_reusable and self.body_done and not self.response_until_close
        now = self.lb.clock()  # once, for the pool, the histogram and the client's idle timer
        self._detach(reusable, now)
        self._finish(self.status, now=now)

    # -- failures --------------------------------------------------------------
    def upstream_failed(
        self, conn: UpstreamConnection, why: str, *, failure: bool, timeout: bool = False
    ) -> None:
        server = conn.server
        if failure:
            server.record_failure(why)
        if conn is self.hedge_conn:
            self._drop_hedge()  # the first attempt carries on
            return
        if conn is not self.upstream or self._hedge_carries_on(conn):
            return
        self._detach(reusable=False)
        if self.finished:
            return
        if self.answered_client:
            # Mid-response: nothing can be saved; a cut connection tells the client so.
            log.warning(
                "%s %s: upstream %s failed mid-response: %s",
                self.method.decode(),
                self.target[:200].decode("latin-1"),
                server.name,
                why,
            )
            self._finish(self.status, abort=True)
            return
        self._after_failure(server, why, timeout=timeout)

    def upstream_timed_out(self, conn: UpstreamConnection, got_first_byte: bool) -> None:
        self.lb.metrics.timeouts += 1
        timeouts = self.lb.config.timeouts
        if got_first_byte:
            why = f"no data for {timeouts.upstream_idle:g}s"
        else:
            why = f"no response within {timeouts.first_byte:g}s"
        self.upstream_failed(conn, why, failure=True, timeout=True)

    def _after_failure(self, server: Server | None, why: str, *, timeout: bool) -> None:
        # After a timeout the server may still be doing the work: a retry then
        # takes a token of the budget; after a refused or reset connection it is not.
        if may_retry(
            method=self.method,
            reached_upstream=self.reached_upstream,
            answered_client=self.answered_client,
            body_replayable=self.replayable,
            tries_done=len(self.tried),
            max_tries=self.lb.config.tries,
        ) and (not timeout or self._budget()):
            self._retry(server, why)
            return
        name = server.name if server is not None else "upstream"
        if timeout:
            self.fail(504, "gateway_timeout", f"{name}: {why}")
        else:
            self.fail(502, "bad_gateway", f"{name}: {why}")

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

    def fail(self, status: int, code: str, message: str, retry_after: int | None = None) -> None:
        """Answer with our own error, unless the response has already begun."""
        self._detach(reusable=False)
        if self.finished:
            return
        if self.answered_client:
            self._finish(self.status, abort=True)
            return
        if not self.body_done:
            self.client_keep_alive = False  # the rest of the body is not ours to read
        self.client.write(
            error_response(
                status,
                code,
                message,
                self.request_id,
                close=not self.client_keep_alive,
                retry_after=retry_after,
            )
        )
        self.answered_client = True
        if status >= 500:
            log.warning(
                "%s %s -> %d %s (request id %s)",
                self.method.decode(),
                self.target[:200].decode("latin-1"),
                status,
                message,
                self.request_id.decode(),
            )
        self._finish(status)

    def _finish(self, status: int, abort: bool = False, now: float = NOT_READ) -> None:
        self.finished = True
        lb = self.lb
        if self.budgeted:
            self._give_budget()
        if self.queued:
            lb.left_queue(self)
        server = self.server
        if now == NOT_READ:
            now = lb.clock()
        elapsed = now - self.started
        if server is not None:
            server.by_class[status // 100 if 100 <= status < 600 else 0] += 1
            # one histogram per request: lb's own is the servers' summed at scrape time
            server.latency.observe(elapsed)
        else:
            lb.metrics.latency.observe(elapsed)  # answered by lb itself
        if lb.config.access_log:
            access_log.info(
                '%s "%s %s" %d %.3f %s tries=%d id=%s',
                self.client.client_ip.decode(),
                self.method.decode(),
                self.target.decode("latin-1"),
                status,
                elapsed,
                server.name if server else "-",
                len(self.tried),
                self.request_id.decode(),
            )
        self.client.exchange_finished(self, self.client_keep_alive and not abort, abort, now)

    def client_gone(self) -> None:
        """The client connection closed: stop, and do not keep a half-used upstream."""
        if self.finished:
            if self.tunnel_open:
                self._detach(reusable=False)
            return
        self.finished = True
        if self.budgeted:
            self._give_budget()
        if self.queued:
            self.lb.left_queue(self)
        self._detach(reusable=False)

    # -- the tunnel after 101 ------------------------------------------------------
    def tunnel_from_client(self, data: bytes) -> None:
        conn = self.upstream
        if self.tunnel_open and conn is not None and conn.transport is not None:
            conn.send(data)
            return
        # Before the upstream's answer: held, to go through the tunnel after a
        # 101 or to be read as the next requests after a refusal; bounded.
        if self.tunnel_buffer is None:
            self.tunnel_buffer = [data]
        else:
            self.tunnel_buffer.append(data)
        self.tunnel_held += len(data)
        if self.tunnel_held > HIGH_WATER:
            self.client.valve.pause(Reason.WAITING_TURN)

    def tunnel_to_client(self, data: bytes) -> None:
        if data:
            self.client.write(data)

    def tunnel_eof_from_client(self) -> bool:
        conn = self.upstream
        return self._tunnel_ends().ended(
            conn.transport if conn is not None else None, self._close_tunnel
        )

    def tunnel_eof_from_upstream(self) -> bool:
        client = self.client
        return self._tunnel_ends().ended(
            None if client.closed else client.transport, self._close_tunnel
        )

    def _tunnel_ends(self) -> HalfClose:
        if self.tunnel_ends is None:
            self.tunnel_ends = HalfClose()
        return self.tunnel_ends

    def _close_tunnel(self) -> None:
        self.client.close()
        self._detach(reusable=False)

    def tunnel_closed_by_upstream(self) -> None:
        conn = self.upstream
        self.upstream = None
        if conn is not None:
            conn.server.active -= 1
        self.client.close()
