"""Counts of key requests by outcome, for the ops app's /metrics and, per asset and ten-minute
window (:mod:`pipeline.keystats`), its Assets page (shared through Redis)."""

from __future__ import annotations

import time

import structlog

from pipeline import keystats, layout

log = structlog.get_logger("hlsvault.keyserver")

#: The Redis hash the ops app reads: outcome -> count.
KEY_REQUESTS = layout.KEY_REQUESTS_HASH
#: Counting is best effort: a slow Redis never slows a key request down by more than this.
REDIS_TIMEOUT_S = 0.25


class KeyRequestStats:
    """Counts outcomes in Redis; without Redis (embedded mode) there is no ops app to read them."""

    def __init__(self, url: str | None) -> None:
        self.client = None
        if url:
            import redis.asyncio

            self.client = redis.asyncio.Redis.from_url(
                url, socket_timeout=REDIS_TIMEOUT_S, socket_connect_timeout=REDIS_TIMEOUT_S
            )

    async def count(self, outcome: str, *, asset: str | None = None) -> None:
        if self.client is None:
            return
        try:
            pipe = self.client.pipeline(transaction=False)
            pipe.hincrby(KEY_REQUESTS, outcome, 1)
            if asset is not None and keystats.countable(asset):
                window = keystats.window_key(asset, time.time())
                pipe.hincrby(window, outcome, 1)
                pipe.expire(window, keystats.WINDOW_TTL_S)
            await pipe.execute()
        except Exception as error:  # any Redis failure: the key request matters more
            log.warning("key request not counted", error=type(error).__name__)
