"""One request and its response: the Exchange, from the end of a request head
until its response is written (or fails).

It is built in layers, each a module with one concern: lb/attempts.py chooses
and reaches a server and sends the request; lb/hedging.py races a second
attempt against a slow one; this module admits the request (the route's fixed
answer and rate limit), writes the response to the client, decides what a
failure becomes (another try, or lb's own answer), finishes the exchange (its
counters and its access-log line) and carries a tunnel after a 101. What the
upstream connection, the pool and the client connection see of it are its
bases' views (Receiver, Waiter) and Downstream: none of them imports it.
"""

from __future__ import annotations

import logging

from proxycore.balancing import any_available
from proxycore.flow import HIGH_WATER, HalfClose, Reason
from proxycore.servers import Server

from .attempts import LAST_CHUNK, NOT_READ, frame_chunk
from .heads import REASONS
from .hedging import Hedging
from .ratelimit import REFUSE
from .response_head import ResponseInfo, client_response_head, error_response
from .retry import may_retry
from .routes import expand_location, forwarded_client
from .upstream import UpstreamConnection

log = logging.getLogger("lb")


class Exchange(Hedging):
    # What the client sends after an upgrade request, before the upstream's
    # answer: held, to go through the tunnel after a 101 or to be read as the
    # next requests after a refusal; bounded.
    tunnel_buffer: list[bytes] | None = None
    tunnel_held = 0
    tunnel_ends: HalfClose | None = None

    # -- admission: the route's own answer, its rate limit -------------------------
    def _admit(self) -> bool:
        """The route's own answer, or its rate limit: True when the request goes
        on to a server now (False: answered, refused, or delayed to the rate)."""
        self.admitted = True
        route = self.route
        if route.answer is not None:
            self._answer_fixed()
            return False
        if route.unrouted:
            self.fail(404, "no_route", "no route takes this request")
            return False
        limiter = route.limiter
        if limiter is None:
            return True
        key = self._limit_key()
        if not key:
            return True  # as nginx: a request without the key is not limited
        verdict = limiter.admit(key)
        if verdict == 0.0:
            return True
        if verdict == REFUSE:
            route.limited += 1
            wait = max(1, int(1 / limiter.config.rate + 0.999))
            self.fail(
                limiter.config.status,
                "rate_limited",
                f"over the rate of route {route.name}",
                retry_after=wait,
            )
            return False
        self.lb.loop.call_later(verdict, self._begin_delayed)  # nginx's delay to the rate
        return False

    def _begin_delayed(self) -> None:
        if not self.finished:
            self.begin()

    def _limit_key(self) -> bytes:
        route = self.route
        assert route.limiter is not None
        key = route.limiter.config.key
        ip = self.client.client_ip
        if key == "client":
            return ip
        if key == "forwarded":
            return forwarded_client(ip, self.info.x_forwarded_for, self.lb.trusted)
        return self.info.header(route.limiter.header) or b""

    def _answer_fixed(self) -> None:
        """The route's fixed answer (nginx: return): a redirect, or a body."""
        answer = self.route.answer
        assert answer is not None
        if not self.body_done:
            self.client_keep_alive = False  # the body is not read: the connection ends
        lines = [
            b"HTTP/1.1 %d %b%b"
            % (answer.status, REASONS.get(answer.status, b"OK"), self.client.status_line_end)
        ]
        if answer.location:
            location = expand_location(answer.location, self.info.host, self.target)
            lines.append(b"Location: " + location + b"\r\n")
        body = answer.body.encode()
        if body:
            lines.append(b"Content-Type: text/plain; charset=utf-8\r\n")
        lines.append(b"Content-Length: %d\r\nX-Request-ID: %b\r\n" % (len(body), self.request_id))
        if not self.client_keep_alive:
            lines.append(b"Connection: close\r\n")
        lines.append(b"\r\n")
        self.client.write(b"".join(lines) + (b"" if self.method == b"HEAD" else body))
        self.answered_client = True
        self.body_bytes = len(body)
        self._finish(answer.status)

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
        self.client.start_tunnel()
        return True

    def on_response_head(
        self, status: int, reason: bytes, info: ResponseInfo, upstream_keep_alive: bool
    ) -> bool:
        """Write the head to the client; True when the response has no body to wait for (HEAD)."""
        lb = self.lb
        server = self.server
        if status >= 500 and status != 501 and status != 505 and self.upstream is not None:
            # the server failed (501 and 505 are about the request, not the server)
            self._attempt_failed(self.upstream)
        if server is None:
            pass
        elif status not in self.pool.config.passive_statuses:
            server.fails_in_a_row = 0  # an answer: failures are counted in a row
        else:
            server.record_failure(f"answered {status}")
            # Retried only when another server can answer; else this answer is
            # the best there is and goes through (as nginx's proxy_next_upstream).
            if (
                self._may_send_again()
                and any_available(self.pool.servers, self.tried)
                and self._budget()
            ):
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
            status_line_end=self.client.status_line_end,
        )
        self.answered_client = True
        self.client.write_parts(head)
        if lb.access is not None:
            self.first_byte_time = lb.clock() - self.started
        return is_head

    def on_response_body(self, data: bytes) -> None:
        if self.answered_client and not self.finished:
            self.body_bytes += len(data)
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
            self._attempt_failed(conn)
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
        timeouts = self.timeouts
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
            max_tries=self.route.tries,
        ) and (not timeout or self._budget()):
            self._retry(server, why)
            return
        name = server.name if server is not None else "upstream"
        if timeout:
            self.fail(504, "gateway_timeout", f"{name}: {why}")
        else:
            self.fail(502, "bad_gateway", f"{name}: {why}")

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
            self.pool.left_queue(self)
        server = self.server
        if now == NOT_READ:
            now = lb.clock()
        elapsed = now - self.started
        status_class = status // 100 if 100 <= status < 600 else 0
        self.route.by_class[status_class] += 1
        if server is not None:
            server.by_class[status_class] += 1
            # one histogram per request: lb's own is the servers' summed at scrape time
            server.latency.observe(elapsed)
        else:
            lb.metrics.latency.observe(elapsed)  # answered by lb itself
        if lb.access is not None:
            self._log(status, elapsed)
        self.client.exchange_finished(self, self.client_keep_alive and not abort, abort, now)

    def _log(self, status: int, elapsed: float) -> None:
        access = self.lb.access
        assert access is not None
        info = self.info
        access.request(
            client_ip=self.client.client_ip,
            method=self.method,
            target=self.target,
            http11=self.http11,
            status=status,
            body_bytes=self.body_bytes,
            referer=info.header(b"referer") or b"-",
            user_agent=info.header(b"user-agent") or b"-",
            request_time=elapsed,
            request_id=self.request_id,
            route=self.route.name_bytes,
            pool=self.route.pool_name,
            server=self.server.name.encode() if self.server is not None else b"-",
            tries=len(self.tried),
            connect_time=self.connect_time,
            first_byte_time=self.first_byte_time,
            hedged=self.hedged,
        )

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
            self.pool.left_queue(self)
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
