"""Counts of key requests by outcome, for the ops app's /metrics (shared through Redis)."""

from __future__ import annotations

import structlog

from pipeline import layout

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

    async def count(self, outcome: str) -> None:
        if self.client is None:
            return
        try:
            await self.client.hincrby(KEY_REQUESTS, outcome, 1)
        except Exception as error:  # any Redis failure: the key request matters more
            log.warning("key request not counted", error=type(error).__name__)
