"""A test upstream for lb: a real HTTP server process with endpoints that misbehave on demand.

python -m tests.upstream --port P --name NAME
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import ssl

from aiohttp import WSMsgType, web


def make_app(name: str) -> web.Application:
    seen: list[dict[str, object]] = []

    async def hello(request: web.Request) -> web.Response:
        return web.Response(text=f"hello from {name}", headers={"X-Upstream": name})

    async def health(request: web.Request) -> web.Response:
        status = int(os.environ.get("UPSTREAM_HEALTH_STATUS", "200"))
        return web.Response(status=status, text="ok")

    async def echo(request: web.Request) -> web.Response:
        body = await request.read()
        info = {
            "name": name,
            "method": request.method,
            "path": request.raw_path,
            "headers": [[k, v] for k, v in request.headers.items()],
            "body_length": len(body),
        }
        seen.append({"path": request.raw_path, "method": request.method})
        return web.json_response(info, headers={"X-Upstream": name})

    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(float(request.query.get("s", "1")))
        return web.Response(text=f"slow from {name}", headers={"X-Upstream": name})

    async def shaped(request: web.Request) -> web.Response:
        """As the query names this upstream: ``slow=a,b&s=S`` answers after S
        seconds, ``fail=a`` answers 503 at once; else at once (a gray failure of
        one server, its /health untouched)."""
        seen.append({"path": request.raw_path, "method": request.method})
        query = request.query
        if name in query.get("fail", "").split(","):
            return web.Response(status=503, text="failing", headers={"X-Upstream": name})
        if name in query.get("slow", "").split(","):
            await asyncio.sleep(float(query.get("s", "1")))
        return web.Response(text=f"shaped from {name}", headers={"X-Upstream": name})

    async def status(request: web.Request) -> web.Response:
        return web.Response(
            status=int(request.match_info["code"]), text=name, headers={"X-Upstream": name}
        )

    async def download(request: web.Request) -> web.StreamResponse:
        total = int(request.query.get("bytes", "1048576"))
        response = web.StreamResponse(headers={"X-Upstream": name})
        response.enable_chunked_encoding()
        await response.prepare(request)
        block = b"x" * 65536
        sent = 0
        while sent < total:
            part = block[: min(len(block), total - sent)]
            await response.write(part)
            sent += len(part)
        await response.write_eof()
        return response

    async def upload(request: web.Request) -> web.Response:
        digest = hashlib.sha256()
        size = 0
        async for chunk in request.content.iter_chunked(65536):
            digest.update(chunk)
            size += len(chunk)
        return web.json_response({"name": name, "bytes": size, "sha256": digest.hexdigest()})

    async def requests_seen(request: web.Request) -> web.Response:
        return web.json_response(seen)

    async def ws(request: web.Request) -> web.WebSocketResponse:
        sock = web.WebSocketResponse()
        await sock.prepare(request)
        async for msg in sock:
            if msg.type == WSMsgType.TEXT:
                await sock.send_str(f"{name}: {msg.data}")
        return sock

    async def no_content(request: web.Request) -> web.Response:
        return web.Response(status=204, headers={"X-Upstream": name})

    async def head_len(request: web.Request) -> web.Response:
        return web.Response(text="0123456789", headers={"X-Upstream": name})

    async def early_hints(request: web.Request) -> web.Response:
        # aiohttp has no API for a 1xx: written on the transport before the response
        assert request.transport is not None
        request.transport.write(
            b"HTTP/1.1 103 Early Hints\r\nLink: </app.css>; rel=preload\r\n"
            b"Connection: X-Hop\r\nX-Hop: 1\r\n\r\n"
        )
        return web.Response(text="hinted", headers={"X-Upstream": name})

    app = web.Application(client_max_size=1024**3)
    app.router.add_get("/", hello)
    app.router.add_get("/health", health)
    app.router.add_route("*", "/echo", echo)
    app.router.add_route("*", "/echo/{tail:.*}", echo)
    app.router.add_route("*", "/slow", slow)
    app.router.add_get("/shaped", shaped)
    app.router.add_route("*", "/status/{code}", status)
    app.router.add_get("/download", download)
    app.router.add_route("*", "/upload", upload)
    app.router.add_get("/seen", requests_seen)
    app.router.add_get("/ws", ws)
    app.router.add_get("/nocontent", no_content)
    app.router.add_get("/ten", head_len)
    app.router.add_get("/early-hints", early_hints)
    return app


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--name", required=True)
    p.add_argument("--tls", nargs=2, metavar=("CERT", "KEY"), help="serve HTTPS")
    args = p.parse_args()
    context = None
    if args.tls:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(*args.tls)
    web.run_app(
        make_app(args.name),
        host="127.0.0.1",
        port=args.port,
        print=None,
        access_log=None,
        ssl_context=context,
    )


if __name__ == "__main__":
    main()
