"""Keeps a fleet key server's cached asset states in step with the state bus.

A task started with the app (see ``create_app``'s lifespan) subscribes to
:data:`pipeline.statebus.CHANNEL` and makes the :class:`~keyserver.state.VaultView` forget each
announced asset, so a revoke or rekey takes effect at the next request. Announcements sent
while it was not subscribed are lost, so every (re)subscription forgets every cached state.
A connection that stops answering is dropped and made again, with a bounded backoff; while
there is none, the view's TTL alone bounds staleness, as it does in embedded mode.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import structlog

from pipeline.statebus import CHANNEL, announced_asset

from .state import VaultView

if TYPE_CHECKING:
    import redis.asyncio

log = structlog.get_logger("hlsvault.keyserver")

#: Connect, subscribe and each command wait this long at most.
REDIS_TIMEOUT_S = 2.0
#: How long one wait for a message lasts: how soon a stop or a due ping is noticed.
POLL_S = 1.0
#: A connection silent this long is pinged; one silent for DEAD_AFTER_S is dropped (a PING is
#: answered within a round trip, so three missed periods is a dead peer, not a slow one).
PING_EVERY_S = 5.0
DEAD_AFTER_S = 3 * PING_EVERY_S
#: Reconnect backoff: doubling from the first to the last, so a Redis restart is caught within
#: seconds and a long outage costs one attempt every few seconds.
RECONNECT_FIRST_S = 0.1
RECONNECT_MAX_S = 5.0


class StateListener:
    """Subscribes to the state bus of the Redis at ``url`` until cancelled."""

    def __init__(self, url: str, view: VaultView) -> None:
        self.url = url
        self.view = view
        #: Whether announcements reach this server now, how many times they began to, and how
        #: many it has acted on (what /healthz reports).
        self.subscribed = False
        self.subscriptions = 0
        self.heard = 0

    async def run(self) -> None:
        """Listen, reconnecting after every failure, until the task is cancelled."""
        delay = RECONNECT_FIRST_S
        while True:
            subscriptions = self.subscriptions
            try:
                await self._listen()
            except Exception as error:  # any Redis failure: listen again after the backoff
                if self.subscriptions != subscriptions:  # it worked: a new outage, fresh backoff
                    delay = RECONNECT_FIRST_S
                log.warning("state bus unreachable; reconnecting",
                            error=type(error).__name__, retry_in_s=delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, RECONNECT_MAX_S)

    async def _listen(self) -> None:
        client = self._client()
        pubsub = client.pubsub(ignore_subscribe_messages=True)
        try:
            await pubsub.subscribe(CHANNEL)
            self.view.forget_states()
            self.subscribed = True
            self.subscriptions += 1
            log.info("state bus subscribed", channel=CHANNEL)
            await self._receive(pubsub)
        finally:
            self.subscribed = False
            await pubsub.aclose()  # type: ignore[no-untyped-call, unused-ignore]  # untyped before redis-py 8
            await client.aclose()

    async def _receive(self, pubsub: redis.asyncio.client.PubSub) -> None:
        """Forget each announced asset; return only by raising, when the connection is lost."""
        loop = asyncio.get_running_loop()
        heard = pinged = loop.time()
        while True:
            message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=POLL_S)
            now = loop.time()
            if message is not None:
                heard = now
                asset = announced_asset(message["data"]) if message["type"] == "message" else None
                if asset is not None:
                    self.view.forget(asset)
                    self.heard += 1
                    log.info("state change announced", asset=asset)
            elif now - heard > DEAD_AFTER_S:
                raise ConnectionError(f"no answer from Redis for {DEAD_AFTER_S:.0f} s")
            elif now - pinged > PING_EVERY_S:
                await pubsub.ping()  # its PONG comes back as a message, which counts as heard
                pinged = now

    def _client(self) -> redis.asyncio.Redis:
        import redis.asyncio
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        # No retries inside redis-py: it would reconnect and resubscribe silently, and the
        # announcements missed meanwhile would go unnoticed. A failure reaches run() instead.
        return redis.asyncio.Redis.from_url(
            self.url, socket_timeout=REDIS_TIMEOUT_S, socket_connect_timeout=REDIS_TIMEOUT_S,
            retry=Retry(NoBackoff(), 0),
        )
