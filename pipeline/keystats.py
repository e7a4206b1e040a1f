"""Key requests counted per asset in ten-minute windows, in Redis: what the key server writes
(:mod:`keyserver.stats`) and the ops app's Assets page reads, named in one place.

``hlsvault:stats:asset:<asset>:<window start>`` is a hash of outcome → count, expiring once it
is older than an hour: the page sums the windows of the last hour (so "the last hour" is 50 to
60 minutes, window-aligned), with one pipelined HGETALL per window and asset.
"""

from __future__ import annotations

import time
from typing import Any

from . import layout

#: Windows of this length...
WINDOW_S = 600
#: ...this many of them make "the last hour" (the current one included).
WINDOWS = 6
#: A window's hash outlives the hour it counts in.
WINDOW_TTL_S = WINDOW_S * (WINDOWS + 1)
_PREFIX = "hlsvault:stats:asset"


def window_key(asset: str, moment: float) -> str:
    start = int(moment) - int(moment) % WINDOW_S
    return f"{_PREFIX}:{asset}:{start}"


def countable(asset: str) -> bool:
    """Only well-formed asset ids get counters: a flood of made-up ids must not make keys."""
    return bool(layout.ASSET_ID_PATTERN.fullmatch(asset))


def last_hour(
    client: Any, assets: list[str], *, now: float | None = None
) -> dict[str, dict[str, int]]:
    """Per asset, requests by outcome over the last hour's windows (``client``: a sync Redis)."""
    moment = time.time() if now is None else now
    pipe = client.pipeline(transaction=False)
    for asset in assets:
        for i in range(WINDOWS):
            pipe.hgetall(window_key(asset, moment - i * WINDOW_S))
    answers = pipe.execute()
    counts: dict[str, dict[str, int]] = {}
    for n, asset in enumerate(assets):
        total: dict[str, int] = {}
        for window in answers[n * WINDOWS:(n + 1) * WINDOWS]:
            for outcome, value in window.items():
                name = outcome.decode() if isinstance(outcome, bytes) else str(outcome)
                total[name] = total.get(name, 0) + int(value)
        counts[asset] = total
    return counts
