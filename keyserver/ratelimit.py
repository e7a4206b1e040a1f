"""Rate limits on key requests, per token and per client address: fixed one-minute windows,
counted in memory (one key server) or in Redis (shared by every key server of a fleet).

The key server counts a token's bucket only once the token's signature verified, so buckets
are created by what a client address sends (bounded by the address limit) and by tokens your
backend minted, never by made-up tokens.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

import structlog

if TYPE_CHECKING:
    from pipeline.settings import Settings

log = structlog.get_logger("hlsvault.keyserver")

WINDOW_S = 60
#: A Redis that does not answer within this long is skipped: keys keep flowing (fail open).
REDIS_TIMEOUT_S = 0.25
#: Buckets one in-memory limiter holds at most (a bucket is ~200 bytes: ~20 MB). Far more than
#: the addresses and viewers one key server sees in a minute; beyond it the least recently hit
#: bucket is forgotten, so a flood from many addresses costs memory it cannot grow and at worst
#: lets a forgotten bucket start counting again: it never refuses anyone it should not.
MAX_BUCKETS = 100_000


def per_process_limits(settings: Settings, workers: int) -> str | None:
    """What to tell an operator who runs ``workers`` key server processes that each count in
    memory (no Redis), or None when nothing multiplies. A warning, not a refusal: one machine
    with several cores and no Redis is a fair setup, as long as its operator knows that a
    client reaching every worker gets up to ``workers`` times each limit."""
    limits = {"HLSVAULT_RATE_LIMIT_TOKEN": settings.rate_limit_token_per_min,
              "HLSVAULT_RATE_LIMIT_IP": settings.rate_limit_ip_per_min}
    counted = [f"{name}={limit}/min" for name, limit in limits.items() if limit > 0]
    if workers <= 1 or settings.redis_url or not counted:
        return None
    return (f"rate limits are counted per worker process without Redis: with --workers "
            f"{workers} a client whose connections reach every worker may make up to {workers} "
            f"times {' and '.join(counted)}; set REDIS_URL to count once for all workers, or "
            f"divide the limits by {workers}")


class RateLimiter(Protocol):
    async def hit(self, bucket: str, limit: int) -> float | None:
        """Count one request against ``bucket``; None when allowed, else the seconds until
        the window resets (the Retry-After)."""


def _retry_after(window: int, now: float) -> float:
    return max(1.0, (window + 1) * WINDOW_S - now)


class MemoryRateLimiter:
    """Counts in a least-recently-hit ordered dict with a hard cap: O(1) per hit, whatever it
    holds. A bucket's count restarts when its window has passed, so finished windows need no
    sweep; they are simply the first to be evicted."""

    def __init__(
        self, *, clock: Callable[[], float] = time.time, max_buckets: int = MAX_BUCKETS
    ) -> None:
        if max_buckets < 1:
            raise ValueError("max_buckets must be at least 1")
        self.clock = clock
        self.max_buckets = max_buckets
        #: bucket -> (window number, requests counted in it)
        self._counts: OrderedDict[str, tuple[int, int]] = OrderedDict()
        # Apps in tests (and a threaded server) may share one limiter across event loops.
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._counts)

    async def hit(self, bucket: str, limit: int) -> float | None:
        if limit <= 0:
            return None
        now = self.clock()
        window = int(now // WINDOW_S)
        with self._lock:
            start, count = self._counts.get(bucket, (window, 0))
            count = count + 1 if start == window else 1
            self._counts[bucket] = (window, count)
            self._counts.move_to_end(bucket)
            if len(self._counts) > self.max_buckets:
                self._counts.popitem(last=False)
        return _retry_after(window, now) if count > limit else None


class RedisRateLimiter:
    def __init__(self, url: str) -> None:
        import redis.asyncio

        self.client = redis.asyncio.Redis.from_url(
            url, socket_timeout=REDIS_TIMEOUT_S, socket_connect_timeout=REDIS_TIMEOUT_S
        )

    async def hit(self, bucket: str, limit: int) -> float | None:
        if limit <= 0:
            return None
        now = time.time()
        window = int(now // WINDOW_S)
        key = f"hlsvault:ratelimit:{bucket}:{window}"
        try:
            async with self.client.pipeline(transaction=False) as pipe:
                pipe.incr(key)
                pipe.expire(key, WINDOW_S * 2)
                count, _ = await pipe.execute()
        except Exception as error:
            log.warning("rate limiter unavailable; allowing", error=type(error).__name__)
            return None
        return _retry_after(window, now) if int(count) > limit else None
