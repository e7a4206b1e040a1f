"""Job records as Redis hashes, for the distributed fleet."""

from __future__ import annotations

from typing import Any

import redis
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry

from .jobs import UnknownJob

#: Redis answers in well under a millisecond; five seconds means it is gone, not busy.
SOCKET_TIMEOUT_S = 5.0
#: Reconnection attempts on a lost connection, backing off up to 2 s each: a Redis restart
#: of up to ~20 s is ridden out instead of failing every stage in flight.
RECONNECT_ATTEMPTS = 12
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


def connect(url: str, *, decode_responses: bool = True) -> redis.Redis:
    """A Redis client with timeouts on every call and bounded reconnection with backoff."""
    client: redis.Redis = redis.Redis.from_url(
        url,
        decode_responses=decode_responses,
        socket_timeout=SOCKET_TIMEOUT_S,
        socket_connect_timeout=SOCKET_TIMEOUT_S,
        health_check_interval=30,
        retry=Retry(ExponentialBackoff(cap=2.0, base=0.1), RECONNECT_ATTEMPTS),
        retry_on_error=[RedisConnectionError, RedisTimeoutError],
    )
    return client


def _mapping(fields: dict[str, str]) -> dict[Any, Any]:
    # redis-py types hset's mapping over every encodable key type; a str dict is one of them.
    return dict(fields)


# Write the fields only while the job's status is not terminal: a cancelled job stays cancelled.
_WRITE_UNLESS_ENDED = """
local status = redis.call('HGET', KEYS[1], 'status')
if status == 'succeeded' or status == 'failed' or status == 'cancelled' then
  return 0
end
redis.call('HSET', KEYS[1], unpack(ARGV))
return 1
"""


class RedisRecordBackend:
    """One hash per job under ``hlsvault:job:<id>``, and a sorted set of ids by creation time."""

    def __init__(self, client: redis.Redis) -> None:
        self.client = client
        self._arrive = client.register_script(_ARRIVE)
        self._write_unless_ended = client.register_script(_WRITE_UNLESS_ENDED)

    @classmethod
    def from_url(cls, url: str) -> RedisRecordBackend:
        return cls(connect(url))

    def create(self, job_id: str, fields: dict[str, str]) -> None:
        pipe = self.client.pipeline()
        pipe.hset(_PREFIX + job_id, mapping=_mapping(fields))
        pipe.expire(_PREFIX + job_id, RECORD_TTL_S)
        pipe.zadd(_INDEX, {job_id: float(fields.get("created_at", "0"))})
        pipe.execute()

    def read(self, job_id: str) -> dict[str, str]:
        fields = {str(k): str(v) for k, v in self.client.hgetall(_PREFIX + job_id).items()}
        if not fields:
            raise UnknownJob(job_id)
        return fields

    def write(self, job_id: str, fields: dict[str, str]) -> None:
        self.client.hset(_PREFIX + job_id, mapping=_mapping(fields))

    def write_if_absent(self, job_id: str, name: str, value: str) -> bool:
        return bool(self.client.hsetnx(_PREFIX + job_id, name, value))

    def increment(self, job_id: str, name: str, amount: int) -> int:
        return int(self.client.hincrby(_PREFIX + job_id, name, amount))

    def write_unless_ended(self, job_id: str, fields: dict[str, str]) -> bool:
        args = [item for pair in fields.items() for item in pair]
        return bool(self._write_unless_ended(keys=[_PREFIX + job_id], args=args))

    def arrive(self, job_id: str, counter: str, marker: str) -> int:
        return int(self._arrive(keys=[_PREFIX + job_id], args=[counter, marker]))

    def job_ids(self) -> list[str]:
        return [str(job_id) for job_id in self.client.zrange(_INDEX, 0, -1)]
