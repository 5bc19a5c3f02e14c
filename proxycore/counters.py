"""Counters summed over processes: a worker's plain-integer counters, named by
field, go to the supervisor as JSON at scrape time, and the supervisor adds them
up so that /metrics and /status answer for the whole server, as one process does.

A field is an int or float, a list of ints (counts by class), or a Histogram.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from .histogram import Histogram


def snapshot(obj: object, fields: Iterable[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in fields:
        value = getattr(obj, name)
        if isinstance(value, Histogram):
            out[name] = value.to_json()
        elif isinstance(value, list):
            out[name] = list(value)
        else:
            out[name] = value
    return out


def zero(obj: object, fields: Iterable[str]) -> None:
    for name in fields:
        value = getattr(obj, name)
        if isinstance(value, Histogram):
            setattr(obj, name, Histogram())
        elif isinstance(value, list):
            setattr(obj, name, [0] * len(value))
        else:
            setattr(obj, name, type(value)())


def add(obj: object, snap: dict[str, Any]) -> None:
    """``snap`` (a snapshot of the same fields) added into ``obj``'s."""
    for name, theirs in snap.items():
        ours = getattr(obj, name)
        if isinstance(ours, Histogram):
            ours.add(theirs)
        elif isinstance(ours, list):
            for i, n in enumerate(theirs):
                ours[i] += n
        else:
            setattr(obj, name, ours + theirs)
