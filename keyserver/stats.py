"""Counts of key requests by outcome, for the ops app's /metrics and, per asset and ten-minute
window (:mod:`pipeline.keystats`), its Assets page (shared through Redis)."""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

import structlog

from pipeline import keystats, layout

if TYPE_CHECKING:
    from .auditlog import LineWriter

log = structlog.get_logger("hlsvault.keyserver")

#: The Redis hash the ops app reads: outcome -> count.
KEY_REQUESTS = layout.KEY_REQUESTS_HASH
#: The Redis counter of log lines the key servers dropped (the ops app exports it).
LOG_LINES_DROPPED = layout.LOG_LINES_DROPPED_KEY
#: How often a key server adds its newly dropped log lines to that counter.
DROPPED_REPORT_INTERVAL_S = 1.0
#: Counting is best effort: a slow Redis never slows a key request down by more than this.
REDIS_TIMEOUT_S = 0.25


class KeyRequestStats:
    """Counts outcomes in Redis; without Redis (embedded mode) there is no ops app to read them."""

    def __init__(self, url: str | None) -> None:
        self.client = None
        self._dropped_published = 0
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

    async def publish_dropped(self, dropped_total: int) -> None:
        """Add the log lines dropped since the last call to the fleet's counter."""
        delta = dropped_total - self._dropped_published
        if self.client is None or delta <= 0:
            return
        try:
            await self.client.incrby(LOG_LINES_DROPPED, delta)
        except Exception as error:  # any Redis failure: counted at the next report
            log.warning("dropped log lines not counted yet", error=type(error).__name__)
            return
        self._dropped_published += delta

    async def report_dropped(self, lines: LineWriter) -> None:
        """Publish ``lines``' drops every :data:`DROPPED_REPORT_INTERVAL_S` until cancelled."""
        if self.client is None:
            return
        while True:
            await asyncio.sleep(DROPPED_REPORT_INTERVAL_S)
            await self.publish_dropped(lines.dropped)
