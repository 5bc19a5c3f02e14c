"""python -m users_backend [--host H] [--port P] [--rw-dsn DSN] [--ro-dsn DSN] ..."""

from __future__ import annotations

import os

# aiohttp's C parser (llhttp, strict) answers 400 to a request target holding raw
# UTF-8, such as `curl 'localhost:8081/user/search?first_name=Ив&last_name=Пе'`,
# which nginx and HAProxy pass on. aiohttp's own Python parser accepts it; this
# documented switch selects it, and must be set before aiohttp is imported.
os.environ.setdefault("AIOHTTP_NO_EXTENSIONS", "1")

import logging

import uvloop
from aiohttp import web

from .app import make_app
from .config import parse


def main() -> None:
    config = parse()
    logging.basicConfig(
        level=logging.INFO,
        format=f"%(asctime)s {config.instance} %(levelname)s %(name)s: %(message)s",
    )
    web.run_app(
        make_app(config),
        host=config.host,
        port=config.port,
        access_log=None,
        print=None,
        loop=uvloop.new_event_loop(),
        shutdown_timeout=10.0,
    )


if __name__ == "__main__":
    main()
