"""Redis connections: every client hlsvault opens has a timeout on every call and a bounded,
backing-off reconnect, so a Redis restart is ridden out and a dead Redis is an error, not a hang.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

import redis
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry

from .errors import TransientError

T = TypeVar("T")

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


def transient_redis_errors(cls: type[T]) -> type[T]:
    """Wrap every public method so that a Redis failure (after the client's own bounded
    reconnects) leaves as a :class:`~pipeline.errors.TransientError`: stages retry it, the CLI
    exits 75 with one line, the HTTP edges answer 503."""
    for name, method in list(vars(cls).items()):
        if name.startswith("_") or not callable(method):
            continue

        def wrapped(*args: Any, __method: Callable[..., Any] = method, **kwargs: Any) -> Any:
            try:
                return __method(*args, **kwargs)
            except redis.RedisError as error:
                raise TransientError(
                    f"Redis did not answer ({type(error).__name__}); check REDIS_URL and that "
                    "Redis is up, then try again"
                ) from error

        functools.update_wrapper(wrapped, method)
        setattr(cls, name, wrapped)
    return cls
