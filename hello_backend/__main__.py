"""python -m hello_backend [--host H] [--port P] [--instance NAME]

The second service of the topology: the users service is one module of a larger
system, and the entry proxy sends ``/hello/`` to this one's own pool (two
instances, as the users service has) by a route, the way an nginx in front of
such a system does. It needs no database: GET /hello/{name} answers who it
greets and which instance answered, GET /health is its check. Environment:
HELLO_HOST, HELLO_PORT, HELLO_INSTANCE (flags win).
"""

from __future__ import annotations

import argparse
import logging
import os

import uvloop
from aiohttp import web


def make_app(instance: str) -> web.Application:
    async def hello(request: web.Request) -> web.Response:
        name = request.match_info.get("name") or "world"
        return web.json_response(
            {"hello": name, "instance": instance}, headers={"X-Instance": instance}
        )

    async def health(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "instance": instance})

    app = web.Application()
    app.router.add_get("/health", health)
    app.router.add_get("/hello/", hello)
    app.router.add_get("/hello/{name}", hello)
    return app


def main() -> None:
    p = argparse.ArgumentParser(
        prog="python -m hello_backend", description=__doc__.split("\n\n")[1]
    )
    p.add_argument("--host", default=os.environ.get("HELLO_HOST", "127.0.0.1"))
    p.add_argument("--port", type=int, default=int(os.environ.get("HELLO_PORT", "8083")))
    p.add_argument("--instance", default=os.environ.get("HELLO_INSTANCE", "hello"))
    args = p.parse_args()
    logging.basicConfig(
        level=logging.INFO,
        format=f"%(asctime)s {args.instance} %(levelname)s %(name)s: %(message)s",
    )
    web.run_app(
        make_app(args.instance),
        host=args.host,
        port=args.port,
        access_log=None,
        print=None,
        loop=uvloop.new_event_loop(),
        shutdown_timeout=5.0,
    )


if __name__ == "__main__":
    main()
