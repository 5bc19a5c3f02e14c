"""Read your own writes over a logical replica: a consistency token.

Reads go to the replica, which applies the master's writes a moment later. A
client that has just written must still see its write on its next read,
whichever backend answers it and whichever database server serves it. So a
write's answer carries a token: the master's WAL position once the write has
committed, signed (a client cannot make up a position that is never reached)
and dated (a replica within its lag limits has long applied an old one). The
client sends it back with its next requests (a header, or the cookie a browser
keeps). A read that carries one is served by the replica only once the replica
has applied that position; it waits for that a bounded time (50 ms by
default), then reads on the master instead.

What the replica has applied is what its subscription's apply worker reported
to the master (pg_stat_subscription.latest_end_lsn: it covers every
transaction applied up to there, and moves on with keepalives when nothing is
pending); the check rides on the read's own connection, so a read that goes
to the master anyway (the database proxy's fallback) is fresh at once.

Nothing here is specific to this service: any asyncpg application with a
read-write and a read-only pool can take this module as it is (docs/dbproxy.md,
"Read your own writes", says why a proxy cannot do it alone).
"""

from __future__ import annotations

import hashlib
import hmac
import re
import time
from dataclasses import dataclass
from typing import Final

HEADER: Final = "X-Consistency-Token"
COOKIE: Final = "balance_consistency"
# The position of the master's WAL once the write committed (a statement of its
# own after the write: one in the write's transaction would read it before the
# commit record).
WRITE_POSITION: Final = "SELECT pg_current_wal_lsn()::text"
# Whether the server of this connection has applied ``$1``: the master has
# everything; a replica what its subscription confirmed (no apply worker, as
# when the subscription is disabled: not applied).
APPLIED: Final = """
SELECT current_setting('default_transaction_read_only') = 'off'
    OR coalesce(
        (SELECT max(latest_end_lsn) FROM pg_stat_subscription WHERE relid IS NULL)
            >= $1::text::pg_lsn,
        false)
"""
_LSN: Final = re.compile(r"[0-9A-F]{1,8}/[0-9A-F]{1,8}")


def lsn_bytes(lsn: str) -> int:
    """A WAL position as Postgres writes it ("16/B374D848") as a number of bytes."""
    high, _, low = lsn.partition("/")
    return (int(high, 16) << 32) + int(low, 16)


@dataclass(frozen=True, slots=True)
class Tokens:
    """Consistency tokens: ``<lsn>.<issued, ms>.<signature>``."""

    secret: bytes
    ttl_seconds: float = 30.0

    def issue(self, lsn: str, now: float | None = None) -> str:
        payload = f"{lsn}.{int((time.time() if now is None else now) * 1000)}"
        return f"{payload}.{self._sign(payload)}"

    def position(self, token: str | None, now: float | None = None) -> str | None:
        """The WAL position a token asks for; None when there is none, or it is
        malformed, forged or older than ttl_seconds (then it asks for nothing)."""
        if not token or len(token) > 100:
            return None
        lsn, _, rest = token.partition(".")
        issued, _, signature = rest.partition(".")
        if not _LSN.fullmatch(lsn) or not issued.isdigit():
            return None
        if not hmac.compare_digest(signature, self._sign(f"{lsn}.{issued}")):
            return None
        age = (time.time() if now is None else now) - int(issued) / 1000
        return lsn if -5 <= age <= self.ttl_seconds else None

    def _sign(self, payload: str) -> str:
        return hmac.new(self.secret, payload.encode(), hashlib.sha256).hexdigest()[:24]
