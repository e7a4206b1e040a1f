"""Rate limits on key requests, in-process: per token and per client address, in fixed
one-minute windows, counted in memory or in a real redis-server shared by two key servers; a
token is counted only once its signature verified, so garbage tokens are limited by address
alone and cannot fill the limiter."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import structlog
from anyio.from_thread import start_blocking_portal

from keyserver.ratelimit import MAX_BUCKETS, WINDOW_S, MemoryRateLimiter, RedisRateLimiter
from keyserver.testing import get

from fleet import RedisServer
from keyserver_support import (
    OTHER_IP,
    VIEWER_IP,
    AppClient,
    Library,
    assert_json_error,
    shared_library,
    wait_for_fresh_window,
)

#: More distinct garbage tokens than the limiter holds buckets (and than the 100k at which the
#: old limiter began rebuilding its dict on every request).
FLOOD = 150_000


@pytest.fixture(scope="module")
def library(tmp_path_factory: pytest.TempPathFactory, copy_clip: Path) -> Library:
    return shared_library(tmp_path_factory, copy_clip)


def assert_limited(response: httpx.Response, key: bytes) -> None:
    assert_json_error(response, 429)
    retry_after = response.headers["retry-after"]
    assert retry_after.isdigit() and 1 <= int(retry_after) <= WINDOW_S, retry_after
    assert key not in response.content


def _drop(*_: object) -> None:
    raise structlog.DropEvent


@pytest.fixture
def logs_dropped() -> Iterator[None]:
    """No log line at all while a flood is sent: 150k audit lines would be the test's cost."""
    config = structlog.get_config()
    structlog.configure(processors=[_drop])
    try:
        yield
    finally:
        structlog.configure(**config)


class TestRateLimits:
    def test_sixth_key_request_with_one_token_in_a_minute_is_refused(
        self, library: Library
    ) -> None:
        """With HLSVAULT_RATE_LIMIT_TOKEN=5 the sixth key request of one token is 429 with a
        Retry-After of 1-60 s and no key, from any address; other tokens still get keys."""
        app = library.app(HLSVAULT_RATE_LIMIT_TOKEN="5", HLSVAULT_RATE_LIMIT_IP="0")
        token, other_token = library.token(ttl=600), library.token(ttl=601)
        wait_for_fresh_window()
        with AppClient(app, client_ip=VIEWER_IP) as viewer, \
                AppClient(app, client_ip=OTHER_IP) as elsewhere:
            first_five = [viewer.get(library.key_path(i % 2), params={"token": token})
                          for i in range(5)]
            sixth = viewer.get(library.key_path(), params={"token": token})
            same_token_elsewhere = elsewhere.get(library.key_path(), params={"token": token})
            other_token_elsewhere = elsewhere.get(library.key_path(),
                                                  params={"token": other_token})
            other_token_same_ip = viewer.get(library.key_path(), params={"token": other_token})

        assert [r.status_code for r in first_five] == [200] * 5
        assert_limited(sixth, library.key(0))
        assert_limited(same_token_elsewhere, library.key(0))
        assert (other_token_elsewhere.status_code, other_token_elsewhere.content) == (
            200, library.key(0))
        assert other_token_same_ip.status_code == 200

    def test_fourth_key_request_from_one_address_in_a_minute_is_refused(
        self, library: Library
    ) -> None:
        """With HLSVAULT_RATE_LIMIT_IP=3 the fourth key request from one client address is 429
        whichever token it carries; another address still gets its key."""
        app = library.app(HLSVAULT_RATE_LIMIT_TOKEN="0", HLSVAULT_RATE_LIMIT_IP="3")
        tokens = [library.token(ttl=600 + i) for i in range(5)]
        wait_for_fresh_window()
        with AppClient(app, client_ip=VIEWER_IP) as viewer, \
                AppClient(app, client_ip=OTHER_IP) as elsewhere:
            first_three = [viewer.get(library.key_path(), params={"token": t})
                           for t in tokens[:3]]
            fourth = viewer.get(library.key_path(), params={"token": tokens[3]})
            unauthenticated = viewer.get(library.key_path())
            other_address = elsewhere.get(library.key_path(), params={"token": tokens[4]})

        assert [r.status_code for r in first_three] == [200] * 3
        assert_limited(fourth, library.key(0))
        assert_limited(unauthenticated, library.key(0))
        assert (other_address.status_code, other_address.content) == (200, library.key(0))

    def test_retry_after_is_the_rest_of_the_window_and_the_next_window_is_open(
        self, library: Library
    ) -> None:
        """Refused 45.2 s into a window, Retry-After is 15 (rounded up); one second into the
        next window the same token gets its key again."""
        window_start = 1_800_000_000.0 - 1_800_000_000.0 % WINDOW_S
        now = [window_start + 45.2]
        limiter = MemoryRateLimiter(clock=lambda: now[0])
        app = library.app(limiter=limiter, HLSVAULT_RATE_LIMIT_TOKEN="2",
                           HLSVAULT_RATE_LIMIT_IP="0")
        token = library.token()
        with AppClient(app, client_ip=VIEWER_IP) as viewer:
            allowed = [viewer.get(library.key_path(), params={"token": token}) for _ in "ab"]
            refused = viewer.get(library.key_path(), params={"token": token})
            now[0] = window_start + WINDOW_S + 1
            next_window = viewer.get(library.key_path(), params={"token": token})

        assert [r.status_code for r in allowed] == [200, 200]
        assert_limited(refused, library.key(0))
        assert refused.headers["retry-after"] == "15"
        assert (next_window.status_code, next_window.content) == (200, library.key(0))

    def test_redis_limiter_counts_one_token_across_two_key_servers(
        self, library: Library, redis_server: RedisServer
    ) -> None:
        """Two apps sharing a real redis-server through RedisRateLimiter enforce the limits on
        the sum of their requests: five per token, then 429 on whichever server is asked."""
        apps = [
            library.app(limiter=RedisRateLimiter(redis_server.url),
                         HLSVAULT_RATE_LIMIT_TOKEN="5", HLSVAULT_RATE_LIMIT_IP="0")
            for _ in range(2)
        ]
        token = library.token()
        wait_for_fresh_window()
        with AppClient(apps[0], client_ip=VIEWER_IP) as one, \
                AppClient(apps[1], client_ip=VIEWER_IP) as two:
            servers = [one, two]
            alternating = [servers[i % 2].get(library.key_path(), params={"token": token})
                           for i in range(5)]
            sixth_on_each = [s.get(library.key_path(), params={"token": token})
                             for s in servers]
            fresh_token = two.get(library.key_path(), params={"token": library.token(ttl=599)})

        assert [r.status_code for r in alternating] == [200] * 5
        for response in sixth_on_each:
            assert_limited(response, library.key(0))
        assert fresh_token.status_code == 200
        buckets = redis_server.client().keys("hlsvault:ratelimit:token:*")
        assert len(buckets) == 2

    def test_redis_limiter_counts_one_address_across_two_key_servers(
        self, library: Library, redis_server: RedisServer
    ) -> None:
        """With HLSVAULT_RATE_LIMIT_IP=3 and a shared Redis, the fourth request from one
        address is refused even though neither server alone saw more than two."""
        apps = [
            library.app(limiter=RedisRateLimiter(redis_server.url),
                         HLSVAULT_RATE_LIMIT_TOKEN="0", HLSVAULT_RATE_LIMIT_IP="3")
            for _ in range(2)
        ]
        wait_for_fresh_window()
        with AppClient(apps[0], client_ip=VIEWER_IP) as one, \
                AppClient(apps[1], client_ip=VIEWER_IP) as two, \
                AppClient(apps[1], client_ip=OTHER_IP) as elsewhere:
            statuses = [
                server.get(library.key_path(), params={"token": library.token(ttl=500 + i)})
                for i, server in enumerate([one, two, one, two])
            ]
            other_address = elsewhere.get(library.key_path(),
                                          params={"token": library.token()})

        assert [r.status_code for r in statuses[:3]] == [200] * 3
        assert_limited(statuses[3], library.key(0))
        assert other_address.status_code == 200

    def test_redis_limiter_lets_keys_flow_when_redis_is_gone(
        self, library: Library, redis_server: RedisServer
    ) -> None:
        """With the shared Redis stopped, the limiter fails open: a token over its limit still
        gets keys (viewers are not locked out by a limiter outage)."""
        limiter = RedisRateLimiter(redis_server.url)
        app = library.app(limiter=limiter, HLSVAULT_RATE_LIMIT_TOKEN="2",
                           HLSVAULT_RATE_LIMIT_IP="2")
        token = library.token()
        redis_server.stop()
        with AppClient(app, client_ip=VIEWER_IP) as viewer:
            statuses = [viewer.get(library.key_path(), params={"token": token}).status_code
                        for _ in range(4)]
        assert statuses == [200] * 4

    def test_padding_the_signature_does_not_reset_a_tokens_limit(
        self, library: Library
    ) -> None:
        """A token refused for its rate is refused as well when its signature is re-sent with
        base64 padding, which PyJWT accepts as the same token."""
        app = library.app(HLSVAULT_RATE_LIMIT_TOKEN="2", HLSVAULT_RATE_LIMIT_IP="0")
        token = library.token()
        padded = token + "=" * (-len(token.rsplit(".", 1)[1]) % 4)
        assert padded != token
        wait_for_fresh_window()
        with AppClient(app, client_ip=VIEWER_IP) as viewer:
            used = [viewer.get(library.key_path(), params={"token": token}) for _ in "ab"]
            refused = viewer.get(library.key_path(), params={"token": token})
            padded_retry = viewer.get(library.key_path(), params={"token": padded})

        assert [r.status_code for r in used] == [200, 200]
        assert refused.status_code == 429
        assert padded_retry.status_code == 429, "the padded token got a fresh limit"


def flood_address(i: int) -> str:
    return f"10.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}"


class TestGarbageTokens:
    def test_garbage_tokens_from_one_address_hit_its_limit_and_create_no_token_bucket(
        self, library: Library
    ) -> None:
        """With HLSVAULT_RATE_LIMIT_IP=20, twenty distinct garbage (and forged) tokens from one
        address get 401 and the next ones 429; the limiter holds that address's bucket and no
        other, and a viewer elsewhere then gets its key (its address and token counted)."""
        limiter = MemoryRateLimiter()
        app = library.app(limiter=limiter, HLSVAULT_RATE_LIMIT_IP="20",
                          HLSVAULT_RATE_LIMIT_TOKEN="5")
        genuine = library.token()
        forged = [genuine[:-10] + f"{i:06d}" + genuine[-4:] for i in range(10)]
        garbage = [f"eyJ{i:04d}.eyJ.garbage" for i in range(20)] + forged
        wait_for_fresh_window()
        with AppClient(app, client_ip=VIEWER_IP) as attacker, \
                AppClient(app, client_ip=OTHER_IP) as viewer:
            refused = [attacker.get(library.key_path(), params={"token": t}) for t in garbage]
            held_after_garbage = len(limiter)
            served = viewer.get(library.key_path(), params={"token": genuine})

        assert [r.status_code for r in refused] == [401] * 20 + [429] * 10
        for response in refused[20:]:
            assert_limited(response, library.key())
        assert held_after_garbage == 1
        assert (served.status_code, served.content) == (200, library.key())
        assert len(limiter) == 3

    @pytest.mark.slow
    def test_a_flood_of_distinct_garbage_tokens_stays_within_the_cap_and_viewers_are_served(
        self, library: Library, logs_dropped: None
    ) -> None:
        """150,000 key requests, each with a garbage token of its own from an address of its
        own, all get 401 and leave the limiter at or under its cap; a real viewer then gets its
        key, and its token's limit (2) still holds."""
        limiter = MemoryRateLimiter()
        app = library.app(limiter=limiter, HLSVAULT_RATE_LIMIT_IP="1000",
                          HLSVAULT_RATE_LIMIT_TOKEN="2")
        path, token = library.key_path(), library.token()

        async def flood_then_view() -> tuple[set[int], int, list[tuple[int, bytes]]]:
            statuses = set()
            for i in range(FLOOD):
                answer = await get(app, path, query=f"token=eyJ{i}.eyJ.x",
                                   client_ip=flood_address(i))
                statuses.add(answer.status)
            held = len(limiter)
            viewer = [await get(app, path, query=f"token={token}", client_ip=VIEWER_IP)
                      for _ in range(3)]
            return statuses, held, [(a.status, a.body) for a in viewer]

        wait_for_fresh_window()
        # A portal's own thread: the session's Playwright keeps an event loop in this one.
        with start_blocking_portal() as portal:
            statuses, held, viewer = portal.call(flood_then_view)

        assert statuses == {401}
        assert held <= MAX_BUCKETS
        assert len(limiter) <= MAX_BUCKETS
        assert viewer[:2] == [(200, library.key())] * 2
        assert viewer[2][0] == 429
