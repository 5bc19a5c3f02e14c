"""python -m lb --config infra/balance/lb.toml | --listen H:P --server H:P --server H:P ..."""

from __future__ import annotations

import logging
import sys

from proxycore.config import ConfigError
from proxycore.lifecycle import Runner, setup_logging

from .app import Balancer
from .config import from_args, parser
from .listenerconfig import check_certificates


def main() -> int:
    args = parser().parse_args()
    try:
        config = from_args(args)
        check_certificates(config)
    except ConfigError as exc:
        print(f"lb: {exc}", file=sys.stderr)
        return 2
    if args.check_config:
        print(
            f"lb: configuration OK ({len(config.pools)} pool(s) of {len(config.servers)} "
            f"server(s), {len(config.routes)} route(s), listen {config.listen})"
        )
        return 0
    setup_logging("lb")
    if not config.access_log:
        logging.getLogger("lb.access").setLevel(logging.WARNING)
    # SIGHUP re-reads the file and re-applies the same flags over it.
    return Runner(lambda: from_args(args), Balancer, lambda c: c.workers).run(config)


if __name__ == "__main__":
    sys.exit(main())
