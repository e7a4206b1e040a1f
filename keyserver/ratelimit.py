"""Rate limits on key requests, per token and per client address: fixed one-minute windows,
counted in memory (one key server) or in Redis (shared by every key server of a fleet)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Protocol

import structlog

log = structlog.get_logger("hlsvault.keyserver")

WINDOW_S = 60
#: A Redis that does not answer within this long is skipped: keys keep flowing (fail open).
REDIS_TIMEOUT_S = 0.25


class RateLimiter(Protocol):
    async def hit(self, bucket: str, limit: int) -> float | None:
        """Count one request against ``bucket``; None when allowed, else the seconds until
        the window resets (the Retry-After)."""


class MemoryRateLimiter:
    def __init__(self, *, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self._counts: dict[str, tuple[int, int]] = {}
        self._lock = threading.Lock()

    async def hit(self, bucket: str, limit: int) -> float | None:
        if limit <= 0:
            return None
        now = self.clock()
        window = int(now // WINDOW_S)
        with self._lock:
            start, count = self._counts.get(bucket, (window, 0))
            if start != window:
                start, count = window, 0
            count += 1
            self._counts[bucket] = (start, count)
            if len(self._counts) > 100_000:
                # Drop finished windows; live ones are at most one per active client.
                self._counts = {b: c for b, c in self._counts.items() if c[0] == window}
        if count > limit:
            return max(1.0, (window + 1) * WINDOW_S - now)
        return None


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
        if int(count) > limit:
            return max(1.0, (window + 1) * WINDOW_S - now)
        return None
