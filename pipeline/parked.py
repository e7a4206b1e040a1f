"""Parked ingest messages: what could not become a job, kept for a human, in bounded room.

    hlsvault:ingest:parked           list of JSON entries, oldest first, at most PARKED_CAP
    hlsvault:ingest:parked:seq       the last entry id given out
    hlsvault:ingest:parked:overflow  how many entries were dropped, oldest first, for room

`hlsvault ingest parked` lists them, replays one through ingest again (after the bucket was
allowed, say) or drops one; the ops app's ``/metrics`` shows the count and the overflow.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from typing import Any

import redis

from .documents import MAX_DOCUMENT_BYTES
from .errors import NotFound
from .redisconn import transient_redis_errors

#: A person triages these: a thousand is more than anyone reads through, and with bodies
#: capped at MAX_DOCUMENT_BYTES the park holds at most ~64 MB of Redis.
PARKED_CAP = 1000
PARKED_KEY = "hlsvault:ingest:parked"

# Append, then drop the oldest beyond the cap and count them, in one step.
_PARK = """
local length = redis.call('RPUSH', KEYS[1], ARGV[1])
local over = length - tonumber(ARGV[2])
if over > 0 then
  redis.call('LTRIM', KEYS[1], over, -1)
  redis.call('INCRBY', KEYS[2], over)
end
return over
"""


@dataclass(frozen=True)
class ParkedMessage:
    """One parked message: its body as received, and why it could not become a job."""

    id: str
    reason: str
    body: str
    parked_at: float
    #: The SQS message id, when it came from the queue.
    message_id: str | None = None
    #: The body was longer than any document ingest accepts, and only its start is kept.
    truncated: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ParkedMessage:
        return cls(
            id=str(data["id"]),
            reason=str(data["reason"]),
            body=str(data["body"]),
            parked_at=float(data["parked_at"]),
            message_id=data.get("message_id"),
            truncated=bool(data.get("truncated", False)),
        )


@dataclass(frozen=True)
class ParkedStats:
    count: int
    #: Entries dropped to make room since the park was first used.
    overflow: int
    cap: int


@transient_redis_errors
class ParkingLot:
    """The park in Redis, holding at most ``cap`` entries."""

    def __init__(
        self, client: redis.Redis, *, cap: int = PARKED_CAP, key: str = PARKED_KEY
    ) -> None:
        self.client = client
        self.cap = cap
        self.key = key
        self._seq = f"{key}:seq"
        self._overflow = f"{key}:overflow"
        self._park = client.register_script(_PARK)

    def park(self, body: str, reason: str, *, message_id: str | None = None) -> ParkedMessage:
        """Keep ``body`` with ``reason``; the oldest entry makes room when the park is full."""
        raw = body.encode()
        kept = raw[:MAX_DOCUMENT_BYTES].decode("utf-8", errors="ignore")
        entry = ParkedMessage(
            id=str(self.client.incr(self._seq)),
            reason=reason,
            body=kept,
            parked_at=time.time(),
            message_id=message_id,
            truncated=len(raw) > MAX_DOCUMENT_BYTES,
        )
        self._park(keys=[self.key, self._overflow], args=[json.dumps(entry.to_dict()), self.cap])
        return entry

    def _raw_entries(self) -> list[tuple[str, ParkedMessage]]:
        found = []
        # At most `cap` entries: the list is trimmed on every park.
        for raw in self.client.lrange(self.key, 0, -1):
            try:
                found.append((str(raw), ParkedMessage.from_dict(json.loads(raw))))
            except (ValueError, KeyError, TypeError):
                continue  # not an entry this version wrote; left for a human to look at
        return found

    def entries(self) -> list[ParkedMessage]:
        """Every parked message, oldest first."""
        return [entry for _, entry in self._raw_entries()]

    def get(self, entry_id: str) -> ParkedMessage:
        for _, entry in self._raw_entries():
            if entry.id == entry_id:
                return entry
        raise NotFound(f"no parked message {entry_id[:40]!r}; `hlsvault ingest parked` lists them")

    def remove(self, entry_id: str) -> bool:
        """Drop the entry; False when it was already gone (dropped, replayed or overflowed)."""
        for raw, entry in self._raw_entries():
            if entry.id == entry_id:
                return bool(self.client.lrem(self.key, 1, raw))
        return False

    def stats(self) -> ParkedStats:
        pipe = self.client.pipeline(transaction=False)
        pipe.llen(self.key)
        pipe.get(self._overflow)
        count, overflow = pipe.execute()
        return ParkedStats(count=int(count), overflow=int(overflow or 0), cap=self.cap)
