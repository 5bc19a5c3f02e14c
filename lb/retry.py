"""When a failed request may be sent again: the design notes' rule, as one function.

- Nothing reached an upstream (connect failed): always, whatever the method.
- Something reached an upstream but no response byte reached the client: only an
  idempotent method, and only while its body is still at hand to send again.
- A response byte reached the client: never; the response is already under way.
"""

from __future__ import annotations

from typing import Final

IDEMPOTENT: Final = frozenset({b"GET", b"HEAD", b"OPTIONS", b"PUT", b"DELETE", b"TRACE"})


def may_retry(
    *,
    method: bytes,
    reached_upstream: bool,
    answered_client: bool,
    body_replayable: bool,
    tries_done: int,
    max_tries: int,
) -> bool:
    if answered_client or tries_done >= max_tries:
        return False
    if not reached_upstream:
        return True
    return method in IDEMPOTENT and body_replayable
