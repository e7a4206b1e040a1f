"""Redis connections: every client hlsvault opens has a timeout on every call and a bounded,
backing-off reconnect, so a Redis restart is ridden out and a dead Redis is an error, not a hang.
"""

from __future__ import annotations

import redis
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry

#: Redis answers in well under a millisecond; five seconds means it is gone, not busy.
SOCKET_TIMEOUT_S = 5.0
#: Reconnection attempts on a lost connection, backing off up to 2 s each: a Redis restart
#: of up to ~20 s is ridden out instead of failing every stage in flight.
RECONNECT_ATTEMPTS = 12

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
