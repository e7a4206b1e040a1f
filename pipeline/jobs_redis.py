"""Job records as Redis hashes, for the distributed fleet."""

from __future__ import annotations

from typing import Any

import redis

from .jobs import UnknownJob

#: Redis answers in well under a millisecond; five seconds means it is gone, not busy.
SOCKET_TIMEOUT_S = 5.0
#: Finished job records are kept this long for the dashboard and `hlsvault status`.
RECORD_TTL_S = 30 * 24 * 3600
_PREFIX = "hlsvault:job:"
_INDEX = "hlsvault:jobs"

# HSETNX the marker; only a first arrival decrements. Every caller learns the count left.
_ARRIVE = """
if redis.call('HSETNX', KEYS[1], ARGV[2], '1') == 1 then
  return redis.call('HINCRBY', KEYS[1], ARGV[1], -1)
end
return tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '0')
"""


def _mapping(fields: dict[str, str]) -> dict[str | bytes, bytes | float | int | str]:
    return dict(fields.items())


class RedisRecordBackend:
    """One hash per job under ``hlsvault:job:<id>``, and a sorted set of ids by creation time."""

    def __init__(self, client: redis.Redis[Any]) -> None:
        self.client = client
        self._arrive = client.register_script(_ARRIVE)

    @classmethod
    def from_url(cls, url: str) -> RedisRecordBackend:
        client: redis.Redis[Any] = redis.Redis.from_url(
            url,
            decode_responses=True,
            socket_timeout=SOCKET_TIMEOUT_S,
            socket_connect_timeout=SOCKET_TIMEOUT_S,
            health_check_interval=30,
        )
        return cls(client)

    def create(self, job_id: str, fields: dict[str, str]) -> None:
        pipe = self.client.pipeline()
        pipe.hset(_PREFIX + job_id, mapping=_mapping(fields))
        pipe.expire(_PREFIX + job_id, RECORD_TTL_S)
        pipe.zadd(_INDEX, {job_id: float(fields.get("created_at", "0"))})
        pipe.execute()

    def read(self, job_id: str) -> dict[str, str]:
        fields: dict[str, str] = self.client.hgetall(_PREFIX + job_id)
        if not fields:
            raise UnknownJob(job_id)
        return fields

    def write(self, job_id: str, fields: dict[str, str]) -> None:
        self.client.hset(_PREFIX + job_id, mapping=_mapping(fields))

    def write_if_absent(self, job_id: str, name: str, value: str) -> bool:
        return bool(self.client.hsetnx(_PREFIX + job_id, name, value))

    def increment(self, job_id: str, name: str, amount: int) -> int:
        return int(self.client.hincrby(_PREFIX + job_id, name, amount))

    def arrive(self, job_id: str, counter: str, marker: str) -> int:
        return int(self._arrive(keys=[_PREFIX + job_id], args=[counter, marker]))

    def job_ids(self) -> list[str]:
        ids: list[str] = self.client.zrange(_INDEX, 0, -1)
        return ids
