"""python -m dbproxy --config infra/balance/dbproxy.toml | --listen rw=H:P --server NAME=H:P ..."""

from __future__ import annotations

import sys

from proxycore.config import ConfigError
from proxycore.lifecycle import Runner, setup_logging

from .app import DbProxy
from .config import from_args, parser


def main() -> int:
    args = parser().parse_args()
    try:
        config = from_args(args)
    except ConfigError as exc:
        print(f"dbproxy: {exc}", file=sys.stderr)
        return 2
    if args.check_config:
        listen = ", ".join(f"{k}={v}" for k, v in config.listen.items())
        pooling = "" if config.pool.mode == "none" else f", {config.pool.mode} pooling"
        print(
            f"dbproxy: configuration OK ({len(config.servers)} server(s), listen {listen}{pooling})"
        )
        return 0
    setup_logging("dbproxy")
    return Runner(lambda: from_args(args), DbProxy, lambda c: c.workers).run(config)


if __name__ == "__main__":
    sys.exit(main())
