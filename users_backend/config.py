"""Settings of one backend instance, from flags with environment fallbacks.

Secrets (the database password, the token key) come from the environment only,
so they never show in `ps`.
"""

from __future__ import annotations

import argparse
import os
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class BackendConfig:
    host: str = "127.0.0.1"
    port: int = 8081
    instance: str = "users-backend"
    rw_dsn: str = "postgresql://users_app@127.0.0.1:15432/users"
    ro_dsn: str = "postgresql://users_app@127.0.0.1:15433/users"
    db_password: str | None = field(default=None, repr=False)
    token_secret: bytes = field(default=b"", repr=False)
    token_ttl_seconds: int = 24 * 3600
    pool_size: int = 10
    connect_timeout: float = 2.0
    query_timeout: float = 5.0
    acquire_timeout: float = 3.0
    ro_falls_back_to_rw: bool = True
    max_body_bytes: int = 64 * 1024
    # A read with a consistency token waits this long for the replica to apply
    # it, then reads on the master; a token is good this long (consistency.py).
    consistency_wait: float = 0.05
    consistency_token_ttl: float = 30.0


def parse(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> BackendConfig:
    env = os.environ if env is None else env
    d = BackendConfig()
    p = argparse.ArgumentParser(prog="python -m users_backend", description=__doc__)
    p.add_argument("--host", default=env.get("USERS_HOST", d.host))
    p.add_argument("--port", type=int, default=int(env.get("USERS_PORT", d.port)))
    p.add_argument(
        "--instance",
        default=env.get("USERS_INSTANCE", d.instance),
        help="name shown in logs and the /health answer",
    )
    p.add_argument(
        "--rw-dsn",
        default=env.get("USERS_RW_DSN", d.rw_dsn),
        help="writes and reads of one's own writes (env USERS_RW_DSN)",
    )
    p.add_argument(
        "--ro-dsn", default=env.get("USERS_RO_DSN", d.ro_dsn), help="other reads (env USERS_RO_DSN)"
    )
    p.add_argument("--pool-size", type=int, default=int(env.get("USERS_POOL_SIZE", d.pool_size)))
    p.add_argument(
        "--query-timeout",
        type=float,
        default=float(env.get("USERS_QUERY_TIMEOUT", d.query_timeout)),
    )
    p.add_argument(
        "--consistency-wait",
        type=float,
        default=float(env.get("USERS_CONSISTENCY_WAIT", d.consistency_wait)),
        help="seconds a read with a consistency token waits for the replica before it "
        "reads on the master (env USERS_CONSISTENCY_WAIT)",
    )
    p.add_argument(
        "--no-ro-fallback",
        action="store_true",
        default=env.get("USERS_RO_FALLBACK", "1") == "0",
        help="do not send reads to rw when ro is unreachable",
    )
    args = p.parse_args(argv)
    if args.pool_size < 1:
        p.error("--pool-size must be at least 1")
    secret = env.get("USERS_TOKEN_SECRET")
    return BackendConfig(
        host=args.host,
        port=args.port,
        instance=args.instance,
        rw_dsn=args.rw_dsn,
        ro_dsn=args.ro_dsn,
        db_password=env.get("USERS_DB_PASSWORD"),
        # Without a shared secret each instance signs with its own key: tokens
        # then only check on the instance that made them.
        token_secret=secret.encode() if secret else secrets.token_bytes(32),
        pool_size=args.pool_size,
        query_timeout=args.query_timeout,
        consistency_wait=args.consistency_wait,
        ro_falls_back_to_rw=not args.no_ro_fallback,
    )
