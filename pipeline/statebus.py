"""The state bus: a publish, rekey or revoke is announced to every running key server, so that
it takes effect at once instead of when their cached state expires.

An announcement names only the asset; a key server that hears it forgets what it cached of the
asset and reads the vault again (:mod:`keyserver.statesync`). It is a hint, never the truth:
the vault's state document is, and a key server that missed the announcement (a Redis outage,
a reconnect) still sees the change within ``keyserver.state.STATE_TTL_S``. So announcing never
fails the change it announces, and :meth:`StateBus.announce` only says how many key servers it
reached: the bus cannot know how many run, so a caller that reports a change as in effect
everywhere waits the TTL as well.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import structlog

from .layout import ASSET_ID_PATTERN

if TYPE_CHECKING:
    import redis

log = structlog.get_logger("hlsvault.statebus")

#: The one Redis pub/sub channel of state changes; each message is an asset id.
CHANNEL = "hlsvault:state"
#: An announcement is one round trip; a Redis slower than this is treated as unreachable.
REDIS_TIMEOUT_S = 2.0


class StateBus(Protocol):
    def announce(self, asset: str) -> int:
        """Tell every listening key server that ``asset``'s state changed; the number of
        receivers reached (0 when none listens, or the bus is unreachable)."""


class NullStateBus:
    """Embedded mode: the one key server reads the vault within its TTL; nobody to tell."""

    def announce(self, asset: str) -> int:
        return 0


class RedisStateBus:
    """Announcements published on :data:`CHANNEL` of the fleet's Redis."""

    def __init__(self, client: redis.Redis) -> None:
        self.client = client

    @classmethod
    def from_url(cls, url: str) -> RedisStateBus:
        import redis

        return cls(redis.Redis.from_url(
            url, socket_timeout=REDIS_TIMEOUT_S, socket_connect_timeout=REDIS_TIMEOUT_S
        ))

    def announce(self, asset: str) -> int:
        try:
            return int(self.client.publish(CHANNEL, asset))
        except Exception as error:  # any Redis failure: the change is made, only not pushed
            log.warning("state change not announced; key servers see it within their TTL",
                        asset=asset, error=type(error).__name__)
            return 0


def announced_asset(data: object) -> str | None:
    """The asset a message on :data:`CHANNEL` names, or None when it is not an asset id (a
    message nobody of ours sent)."""
    if isinstance(data, bytes):
        data = data.decode("utf-8", "replace")
    if isinstance(data, str) and ASSET_ID_PATTERN.fullmatch(data):
        return data
    return None
