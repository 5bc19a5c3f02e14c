"""The client side of lb: one protocol object per client connection (asyncio's
Protocol methods without its base class: see proxycore.compiled.protocol_factory).

Its layers: Downstream (lb/downstream.py) writes, RequestReader (lb/reading.py)
reads and keeps the client to its time limits, and this module turns each
request head into an Exchange on its route, answers requests strictly in order
(a pipelined request waits, with reading paused, until the one before it is
answered), refuses bad ones, and drains on shutdown.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Final, cast

from proxycore.flow import Reason, Valve, bound_writes

from .exchange import Exchange
from .framing import ChunkedBody
from .heads import BadRequest
from .reading import WAIT_BODY, WAIT_HEAD, WAIT_IDLE, RequestReader
from .request_head import RequestInfo, new_request_id, origin_form
from .response_head import error_response
from .routes import Route
from .routing import BAD_PATH

log = logging.getLogger("lb")

_NO_HEADERS: Final[dict[bytes, bytes]] = {}


class ClientConnection(RequestReader):
    # -- asyncio.Protocol ----------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, only alike
        self.transport = transport = cast(asyncio.Transport, transport)
        self._send = transport.write
        self.valve = Valve(transport)
        lb = self.lb
        lb.metrics.client_total += 1
        if lb.metrics.client_active >= lb.config.limits.max_client_connections:
            lb.metrics.client_refused += 1
            self.closed = True
            transport.abort()
            return
        lb.metrics.client_active += 1
        lb.clients.add(self)
        peer = transport.get_extra_info("peername")
        if peer:
            self.client_ip = str(peer[0]).encode()
        # TCP_NODELAY: uvloop sets it on every TCP transport (tests/test_proxycore_loop.py).
        bound_writes(transport)
        self._wait(WAIT_HEAD, lb.config.timeouts.client_header)

    def eof_received(self) -> bool | None:
        tunnel = self.tunnel
        if tunnel is not None and tunnel.tunnel_open:
            return tunnel.tunnel_eof_from_client()
        if self.closed:
            return None  # lingering (see close): the client has closed too, so does lb
        # The client sends nothing more, but what it sent whole is still answered
        # (as HAProxy does; nginx drops it): the connection closes after the
        # last response. A body cut short can never be whole: refused.
        self.done_sending = True
        if self.queue and self.queue[0].queued:
            # Its request still waits in its pool's queue, never sent: the client
            # has given up on it (wrk and browsers close; nginx's 499), so it leaves
            # the queue now instead of taking a server's slot to answer no one.
            self.lb.metrics.gone_queued += 1
            self.closed = True
            if self.transport is not None:
                self.transport.abort()  # connection_lost takes its requests away
            return None
        if self._reading_body:
            self._reject(BadRequest(400, "bad_request", "the client ended before the request body"))
        return True if self.queue and not self.closed else None

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed:
            self.closed = True
        if self in self.lb.clients:
            self.lb.clients.discard(self)
            self.lb.metrics.client_active -= 1
        self._stop_timers(for_good=True)
        for ex in self.queue:
            ex.client_gone()
            self.lb.metrics.in_flight -= 1
        self.queue.clear()
        if self.tunnel is not None:
            self.tunnel.client_gone()
        self.lb.client_closed()

    def pause_writing(self) -> None:
        ex = self.tunnel or (self.queue[0] if self.queue else None)
        if ex is not None and ex.upstream is not None and ex.upstream.valve is not None:
            ex.upstream.valve.pause(Reason.PEER_BUFFER_FULL)

    def resume_writing(self) -> None:
        ex = self.tunnel or (self.queue[0] if self.queue else None)
        if ex is not None and ex.upstream is not None and ex.upstream.valve is not None:
            ex.upstream.valve.resume(Reason.PEER_BUFFER_FULL)

    # -- httptools callbacks (the rest: lb/reading.py) ------------------------------
    def on_headers_complete(self) -> None:
        parser = self.parser
        info = self._request
        assert parser is not None and info is not None  # (llhttp calls back: on_url made both)
        self._next_head(info)
        lb = self.lb
        # llhttp keeps an HTTP/1.0 connection alive only when a Connection header
        # asks: keep-alive without one means HTTP/1.1, and spares
        # get_http_version(), which formats a str (a tenth of a microsecond).
        if parser.should_keep_alive() and not info.has_connection_header:
            http11 = True
        else:
            version = parser.get_http_version()
            if version != "1.1" and version != "1.0":
                if version.startswith("0."):
                    raise BadRequest(400, "bad_request", f"HTTP/{version}: lb speaks HTTP/1.x")
                raise BadRequest(
                    505, "http_version_not_supported", f"HTTP/{version}: lb speaks HTTP/1.x"
                )
            http11 = version == "1.1"
        method = parser.get_method()
        target = self._url
        self._url = b""
        if not target.startswith(b"/") or method == b"CONNECT" or method == b"TRACE":
            target = origin_form(method, target, info)
        info.finish(http11, lb.max_body_bytes)
        self._head_read(info, method, target, http11)

    def _next_head(self, info: RequestInfo) -> None:
        """The next head gets a RequestInfo of its own, whatever becomes of this
        one; its Host (checked) is most likely the next head's too."""
        self._in_head = False
        self._request = None
        self._known_host = info.host

    def _head_read(self, info: RequestInfo, method: bytes, target: bytes, http11: bool) -> None:
        """A request head is whole and checked (by llhttp and RequestInfo, or by
        lb/plain_request.py): its exchange is queued, its body awaited."""
        self._next_head(info)
        lb = self.lb
        self._last = info.close
        route = self._route(info, method, target)
        ex = Exchange(self, lb, method, target, info, http11, route)
        self._current = ex
        self.queue.append(ex)
        lb.metrics.in_flight += 1
        self._stop_waiting(WAIT_HEAD)
        if info.upgrade is None:  # (an upgrade's bytes after its head are the tunnel's)
            if info.chunked:
                limits = lb.config.limits
                self._chunks = ChunkedBody(route.max_body_bytes, limits.max_header_bytes)
            elif info.content_length:
                self._body_left = info.content_length
        if not ex.body_done:
            self._reading_body = True
            self._wait(WAIT_BODY, lb.config.timeouts.client_body)
        if len(self.queue) == 1:
            self._starting = ex  # begun by _read once llhttp has read the whole head
        else:
            self.valve.pause(Reason.WAITING_TURN)

    def _route(self, info: RequestInfo, method: bytes, target: bytes) -> Route:
        """The route of a request whose head is whole; its own body limit checked."""
        lb = self.lb
        if self.side.redirect is not None:
            return self.side.redirect
        router = lb.router
        if router.single:
            route = lb.routes[0]
        else:
            captured = info.captured
            at = router.match(
                info.host, target, method, _NO_HEADERS if captured is None else captured
            )
            if at < 0:
                if at == BAD_PATH:
                    raise BadRequest(400, "bad_request", "the request path is not a valid path")
                assert lb.unrouted is not None
                return lb.unrouted
            route = lb.routes[at]
        length = info.content_length
        if length is not None and length > route.max_body_bytes:
            raise BadRequest(
                413, "payload_too_large", f"request body over {route.max_body_bytes} bytes"
            )
        return route

    # -- what an exchange calls back ----------------------------------------------------
    def last_answer(self, ex: object) -> bool:
        """Whether the connection closes after ``ex``'s response, so its head says
        so: lb is stopping or the client has ended its side, and nothing is
        queued behind it. (Requests queued behind are answered first.)"""
        return (
            (self.lb.draining or self.done_sending) and self.queue[-1] is ex and not self._in_head
        )

    def start_tunnel(self) -> None:
        self.tunnel = ex = self.queue[0]  # (the exchange being answered)
        self._stop_timers(for_good=False)
        self.valve.resume(Reason.WAITING_TURN)  # what was held went through
        if self.done_sending:
            ex.tunnel_eof_from_client()  # the client had ended its side already

    def exchange_finished(self, ex: object, keep_alive: bool, abort: bool, now: float) -> None:
        if self.queue and self.queue[0] is ex:
            self.queue.pop(0)
            self.lb.metrics.in_flight -= 1
        held = None
        tunnel = self.tunnel
        if tunnel is not None and tunnel is ex:
            if tunnel.tunnel_open:
                return
            held = self._upgrade_refused(tunnel)
        if abort:
            if self.transport is not None and not self.closed:
                self.closed = True
                self.transport.abort()
            return
        if self._rejected is not None and not self.queue:
            self.write(self._rejected)
            self.close()
            return
        if not keep_alive or (not self.queue and (self.lb.draining or self.done_sending)):
            self.close(linger=self._may_send_more(cast(Exchange, ex)))
            return
        if self.queue:
            nxt = self.queue[0]
            if len(self.queue) == 1:
                self.valve.resume(Reason.WAITING_TURN)
            nxt.begin(now)
            return
        self.valve.resume(Reason.WAITING_TURN)
        timeouts = self.lb.config.timeouts
        if self._in_head:
            self._wait(WAIT_HEAD, timeouts.client_header)
        else:
            self._wait_until(WAIT_IDLE, now + timeouts.client_keepalive)
        if held:
            self.data_received(held)

    def _may_send_more(self, ex: Exchange) -> bool:
        """Whether the client may still be sending as lb closes, so the close
        lingers (nginx's ``lingering_close on``, by its heuristics): not when it
        asked to close itself and all it sent was read: its body whole, nothing
        behind it. Then lb closes at once, as nginx does, and saves the
        wait for the client's FIN (a shutdown, a read and a timer a connection)."""
        return (
            not ex.info.close
            or not ex.body_done
            or bool(self.queue)
            or self._in_head
            or self._dropped
            or self.valve.paused
        )

    def _upgrade_refused(self, ex: Exchange) -> bytes:
        """The upstream answered an upgrade request without switching: the
        connection is HTTP again. llhttp stays in its upgrade state, so a fresh
        parser reads what the client sent meanwhile (returned) as the next requests."""
        self.tunnel = None
        held = b"".join(ex.tunnel_buffer) if ex.tunnel_buffer else b""
        ex.tunnel_buffer = None
        self._restart_head()
        return held

    # -- refusals ------------------------------------------------------------------------
    def _reject(self, exc: BadRequest) -> None:
        self._starting = None
        current = self._current
        # The refused request's own id when it has one (its head was read), so the
        # log line and the client's answer name the same request.
        request_id = current.request_id if current is not None else new_request_id()
        self._log_refusal(exc, request_id)
        answer = error_response(exc.status, exc.code, exc.message, request_id, close=True)
        self.valve.pause(Reason.WAITING_TURN)
        if current is not None and self.queue and current is self.queue[0]:
            # The bad bytes are in the body of the request being served: its
            # upstream connection is cut mid-body, so the upstream never sees a
            # whole request, and the client hears why at once.
            self._reading_body = False
            current.fail(exc.status, exc.code, exc.message)
            self.close()
            return
        if current is not None and current in self.queue:
            # Pipelined behind another: dropped before anything of it is sent.
            self.queue.remove(current)
            self.lb.metrics.in_flight -= 1
            current.client_gone()
        if self.queue and not self.queue[0].finished:
            self._rejected = answer  # after the response before it, in order
            return
        self.write(answer)
        self.close()

    def _log_refusal(self, exc: BadRequest, request_id: bytes) -> None:
        """The one line every refused request leaves, whenever it was refused."""
        self.lb.metrics.bad_requests += 1
        log.info(
            "refused a request from %s: %d %s (request id %s)",
            self.client_ip.decode(),
            exc.status,
            exc.message,
            request_id.decode(),
        )

    def refuse_body(self) -> None:
        """The body being read (chunked) grew past its route's max_body_bytes."""
        ex = self._current
        limit = ex.route.max_body_bytes if ex is not None else self.lb.max_body_bytes
        self._reject(BadRequest(413, "payload_too_large", f"request body over {limit} bytes"))

    def drain(self) -> None:
        """SIGTERM: a busy connection closes after its last response (which says
        Connection: close); an idle one after timeouts.shutdown_idle more of
        idleness, a request meanwhile answered with Connection: close. Closed at
        once, an idle connection would race the request its client may be
        sending on it: that request would get no answer at all."""
        if not self.queue and not self._in_head and self.tunnel is None:
            timeouts = self.lb.config.timeouts
            self._wait(WAIT_IDLE, min(timeouts.shutdown_idle, timeouts.client_keepalive))
