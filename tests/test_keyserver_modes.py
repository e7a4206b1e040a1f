"""The key server's newer modes over HTTP, in-process: cookie mode, Bearer tokens, CORS, rate
limits (in memory and shared through a real redis-server), revocation and retirement, and the
audit trail of key requests.

Each app is built by ``keyserver.create_app`` from ``load_settings`` over a vault into which
the real CLI packaged real clips: ``film`` twice (an older and a current version) and
``film-b`` once. Requests go through httpx's ASGI transport from a chosen client address.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, replace
from functools import partial
from http.cookies import SimpleCookie
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
import structlog
from anyio.from_thread import BlockingPortal, start_blocking_portal

from keyserver import create_app
from keyserver.ratelimit import WINDOW_S, MemoryRateLimiter, RateLimiter, RedisRateLimiter
from keyserver.state import STATE_TTL_S
from pipeline.catalog import Catalog
from pipeline.errors import ConfigurationError
from pipeline.keys import KeyVault
from pipeline.settings import Settings, load_settings
from pipeline.storage import LocalStore
from pipeline.tokens import mint_token

from fleet import RedisServer
from support import HLSVAULT, ROOT

ASSET = "film"
OTHER = "film-b"
VIEWER_IP = "198.51.100.20"
OTHER_IP = "198.51.100.99"
APP_ORIGIN = "https://app.example"
CORS_ORIGINS = f"{APP_ORIGIN},http://127.0.0.1:9999"
#: Rate limits count in fixed one-minute windows; a test sending a burst near a window's end
#: waits for the next one rather than see its count reset halfway.
WINDOW_MARGIN_S = 5.0
#: Any JWS at all (header and payload are base64 JSON objects, so they start with "eyJ").
_JWS = re.compile(r"eyJ[A-Za-z0-9_-]*\.eyJ[A-Za-z0-9_-]*\.[A-Za-z0-9_-]*")


class AppClient:
    """httpx over ASGITransport into the app, from one client address, called synchronously
    through an anyio portal: one event loop (and one cookie jar) for the client's whole life."""

    def __init__(self, app: Any, *, client_ip: str, base_url: str = "https://keys.test") -> None:
        transport = httpx.ASGITransport(app=app, client=(client_ip, 50000))
        self.http = httpx.AsyncClient(
            transport=transport, base_url=base_url, follow_redirects=False, timeout=10
        )
        self._stack = ExitStack()
        self._portal: BlockingPortal | None = None

    def __enter__(self) -> AppClient:
        self._portal = self._stack.enter_context(start_blocking_portal())
        self._stack.callback(self._portal.call, self.http.aclose)
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._stack.close()

    def call(self, function: Callable[[], Any]) -> Any:
        """Run a coroutine function on this client's event loop."""
        assert self._portal is not None, "use AppClient as a context manager"
        return self._portal.call(function)

    def request(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        response: httpx.Response = self.call(partial(self.http.request, method, url, **kwargs))
        return response

    def get(self, url: str, **kwargs: Any) -> httpx.Response:
        return self.request("GET", url, **kwargs)


@dataclass(frozen=True)
class Library:
    """A data directory with ``film`` (two versions, the second current) and ``film-b``."""

    env: dict[str, str]
    data_dir: Path
    old_version: str
    version: str
    other_version: str
    rendition: str
    keys: dict[tuple[str, str, int], bytes]

    @property
    def settings(self) -> Settings:
        return load_settings(self.env)

    @property
    def vault(self) -> LocalStore:
        return LocalStore(Path(self.settings.vault))

    def app(self, *, limiter: RateLimiter | None = None, **env: str) -> Any:
        settings = load_settings({**self.env, **env})
        return create_app(settings, vault=self.vault, limiter=limiter)

    def token(self, asset: str = ASSET, *, ttl: int = 600, **claims: Any) -> str:
        return mint_token(self.settings.token_secret, asset, ttl, **claims)

    def key_path(self, index: int = 0, *, asset: str = ASSET, version: str | None = None) -> str:
        if version is None:
            version = self.version if asset == ASSET else self.other_version
        return f"/v1/keys/{asset}/{version}/{index}"

    def key(self, index: int = 0, *, asset: str = ASSET, version: str | None = None) -> bytes:
        if version is None:
            version = self.version if asset == ASSET else self.other_version
        return self.keys[(asset, version, index)]


def package(env: dict[str, str], clip: Path, asset: str) -> dict[str, Any]:
    done = subprocess.run(
        [*HLSVAULT, "package", str(clip), "--asset", asset, "--ladder", "copy",
         "--key-rotation-segments", "2", "--segment-seconds", "2", "--json"],
        env=env, capture_output=True, text=True, timeout=300, check=False,
        cwd=Path(env["HLSVAULT_DATA_DIR"]).parent,
    )
    assert done.returncode == 0, done.stderr
    summary: dict[str, Any] = json.loads(done.stdout)
    return summary


def read_keys(settings: Settings, asset: str, version: str) -> dict[tuple[str, str, int], bytes]:
    vault = KeyVault(LocalStore(Path(settings.vault)), settings.master_key)
    return {(asset, version, i): vault.get(asset, version, i) for i in (0, 1)}


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory, copy_clip: Path) -> Library:
    """Packaged once per module; tests that change the catalog work on a copy (``library``)."""
    data_dir = tmp_path_factory.mktemp("modes") / "data"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HLSVAULT_", "REDIS_URL"))}
    env.update(HLSVAULT_DATA_DIR=str(data_dir), PYTHONPATH=str(ROOT))
    old = package(env, copy_clip, ASSET)
    current = package(env, copy_clip, ASSET)
    other = package(env, copy_clip, OTHER)
    assert old["version"] != current["version"]
    settings = load_settings(env)
    keys = {
        **read_keys(settings, ASSET, old["version"]),
        **read_keys(settings, ASSET, current["version"]),
        **read_keys(settings, OTHER, other["version"]),
    }
    return Library(
        env=env, data_dir=data_dir, old_version=old["version"], version=current["version"],
        other_version=other["version"], rendition=current["renditions"][0]["name"], keys=keys,
    )


@pytest.fixture
def library(pristine: Library, tmp_path: Path) -> Library:
    """A private copy of the packaged data directory (same secrets, versions and keys)."""
    data_dir = tmp_path / "data"
    shutil.copytree(pristine.data_dir, data_dir)
    return replace(pristine, env={**pristine.env, "HLSVAULT_DATA_DIR": str(data_dir)},
                   data_dir=data_dir)


def variant_uris(playlist: str) -> list[str]:
    return [line for line in playlist.splitlines() if line and not line.startswith("#")]


def set_cookie(response: httpx.Response) -> SimpleCookie:
    (header,) = response.headers.get_list("set-cookie")
    cookie = SimpleCookie()
    cookie.load(header)
    return cookie


def wait_for_fresh_window() -> None:
    """Sleep into the next rate-limit window if this one ends within WINDOW_MARGIN_S."""
    left = WINDOW_S - time.time() % WINDOW_S
    if left < WINDOW_MARGIN_S:
        time.sleep(left + 0.05)


def assert_limited(response: httpx.Response, key: bytes) -> None:
    assert response.status_code == 429, response.text
    retry_after = response.headers["retry-after"]
    assert retry_after.isdigit() and 1 <= int(retry_after) <= WINDOW_S, retry_after
    assert key not in response.content


# -- (a) cookie mode ------------------------------------------------------------------------


class TestCookieMode:
    def test_master_names_cdn_variants_and_sets_a_cookie_scoped_to_the_assets_keys(
        self, pristine: Library
    ) -> None:
        """master.m3u8?auth=cookie answers 200 with token-free variant URIs on the CDN and a
        Secure, HttpOnly, SameSite=None cookie holding the token, scoped to the asset's key
        path and living no longer than the token."""
        token = pristine.token(ttl=900)
        expires_at = time.time() + 900
        with AppClient(pristine.app(), client_ip=VIEWER_IP) as client:
            response = client.get(f"/v1/assets/{ASSET}/master.m3u8",
                                  params={"token": token, "auth": "cookie"})

        assert response.status_code == 200, response.text
        cdn = pristine.settings.cdn_url
        assert variant_uris(response.text) == [
            f"{cdn}/assets/{ASSET}/{pristine.version}/{pristine.rendition}.m3u8"
        ]
        assert "token" not in response.text
        cookie = set_cookie(response)["hlsvault_token"]
        assert cookie.value == token
        assert cookie["httponly"] is True
        assert cookie["secure"] is True
        assert cookie["samesite"].lower() == "none"
        assert cookie["path"] == f"/v1/keys/{ASSET}/"
        assert 0 < int(cookie["max-age"]) <= expires_at - time.time() + 1
        assert int(cookie["max-age"]) >= 900 - 5

    def test_the_cookie_alone_unlocks_that_assets_keys_and_no_others(
        self, pristine: Library
    ) -> None:
        """After the cookie-mode master, the browser-like client's cookie jar gets both keys
        with no token in the URL; without the cookie the key is 401, and the cookie of one
        asset sent to another asset's key is 403."""
        app = pristine.app()
        token = pristine.token()
        with AppClient(app, client_ip=VIEWER_IP) as viewer, \
                AppClient(app, client_ip=VIEWER_IP) as stranger:
            # Given: a viewer whose cookie jar took the cookie from the master playlist
            master = viewer.get(f"/v1/assets/{ASSET}/master.m3u8",
                                params={"token": token, "auth": "cookie"})
            assert master.status_code == 200

            # When: keys are asked for with nothing but cookies
            with_cookie = [viewer.get(pristine.key_path(i)) for i in (0, 1)]
            without_cookie = stranger.get(pristine.key_path(0))
            jar_for_other = viewer.get(pristine.key_path(asset=OTHER))
            forced_on_other = stranger.get(pristine.key_path(asset=OTHER),
                                           headers={"Cookie": f"hlsvault_token={token}"})
            other_own_token = stranger.get(pristine.key_path(asset=OTHER),
                                           params={"token": pristine.token(OTHER)})

        # Then: only the right asset's keys, and only with the cookie
        assert [r.status_code for r in with_cookie] == [200, 200]
        assert [r.content for r in with_cookie] == [pristine.key(0), pristine.key(1)]
        assert without_cookie.status_code == 401
        assert jar_for_other.status_code == 401  # the cookie's Path kept it from being sent
        assert forced_on_other.status_code == 403
        assert pristine.key(asset=OTHER) not in forced_on_other.content
        assert other_own_token.status_code == 200
        assert other_own_token.content == pristine.key(asset=OTHER)

    def test_cookie_mode_variant_playlists_exist_on_the_origin(self, pristine: Library) -> None:
        """Each variant URI a cookie-mode master names is a static playlist served by the
        origin (here /cdn/), token-free, whose key URIs the cookie unlocks."""
        app = pristine.app()
        token = pristine.token()
        with AppClient(app, client_ip=VIEWER_IP) as viewer:
            master = viewer.get(f"/v1/assets/{ASSET}/master.m3u8",
                                params={"token": token, "auth": "cookie"})
            (uri,) = variant_uris(master.text)
            cdn_path = urlsplit(uri).path
            origin_file = pristine.data_dir / "origin" / cdn_path.removeprefix("/cdn/")
            assert origin_file.is_file(), "the upload stage wrote no static variant playlist"
            variant = viewer.get(cdn_path)
            key_uris = re.findall(r'#EXT-X-KEY:[^\n]*URI="([^"]+)"', variant.text)
            keys = [viewer.get(urlsplit(key_uri).path) for key_uri in key_uris]

        assert variant.status_code == 200
        assert "token" not in variant.text
        assert key_uris, variant.text
        assert all(urlsplit(u).path.startswith(f"/v1/keys/{ASSET}/{pristine.version}/")
                   for u in key_uris)
        assert [r.status_code for r in keys] == [200] * len(keys)
        assert {r.content for r in keys} == {pristine.key(0), pristine.key(1)}


# -- (b) Bearer tokens -----------------------------------------------------------------------


class TestBearer:
    def test_bearer_header_gets_playlists_and_keys(self, pristine: Library) -> None:
        """Authorization: Bearer (any case of the scheme) gets the master, the variant and both
        keys; a tampered, an empty or another scheme's credential gets 401."""
        token = pristine.token()
        paths = [f"/v1/assets/{ASSET}/master.m3u8",
                 f"/v1/assets/{ASSET}/{pristine.rendition}.m3u8",
                 pristine.key_path(0), pristine.key_path(1)]
        tampered = token[:-8] + ("A" if token[-8] != "A" else "B") + token[-7:]
        with AppClient(pristine.app(), client_ip=VIEWER_IP) as client:
            good = [client.get(p, headers={"Authorization": f"Bearer {token}"}) for p in paths]
            lower = client.get(paths[2], headers={"Authorization": f"bearer {token}"})
            refused = [
                client.get(p, headers={"Authorization": credential})
                for p in paths
                for credential in (f"Bearer {tampered}", "Bearer ", f"Basic {token}")
            ]

        assert [r.status_code for r in good] == [200] * 4
        assert good[0].text.startswith("#EXTM3U")
        assert "#EXT-X-KEY:METHOD=AES-128" in good[1].text
        assert [good[2].content, good[3].content] == [pristine.key(0), pristine.key(1)]
        assert (lower.status_code, lower.content) == (200, pristine.key(0))
        assert [r.status_code for r in refused] == [401] * len(refused)


# -- (c) CORS --------------------------------------------------------------------------------


class TestCors:
    @pytest.fixture
    def client(self, pristine: Library) -> Iterator[AppClient]:
        with AppClient(pristine.app(HLSVAULT_CORS_ORIGINS=CORS_ORIGINS),
                       client_ip=VIEWER_IP) as client:
            yield client

    def test_listed_origins_get_their_origin_and_credentials_back(
        self, client: AppClient, pristine: Library
    ) -> None:
        """A GET from either listed origin (served or refused) carries exactly that origin in
        Access-Control-Allow-Origin, never '*', with credentials allowed and Vary: Origin."""
        token = pristine.token()
        responses = {
            (origin, kind): client.get(pristine.key_path(), headers={"Origin": origin},
                                       params={"token": token} if kind == "served" else None)
            for origin in (APP_ORIGIN, "http://127.0.0.1:9999")
            for kind in ("served", "refused")
        }
        assert {pair: r.status_code for pair, r in responses.items()} == {
            pair: 200 if pair[1] == "served" else 401 for pair in responses
        }
        for (origin, _), response in responses.items():
            assert response.headers["access-control-allow-origin"] == origin
            assert response.headers["access-control-allow-credentials"] == "true"
            assert "origin" in response.headers["vary"].lower()

    def test_preflight_for_a_key_with_an_authorization_header_is_allowed(
        self, client: AppClient, pristine: Library
    ) -> None:
        """An OPTIONS preflight from a listed origin for GET with Authorization is answered
        2xx, allowing that origin, GET, the Authorization header and credentials."""
        response = client.request("OPTIONS", pristine.key_path(), headers={
            "Origin": APP_ORIGIN,
            "Access-Control-Request-Method": "GET",
            "Access-Control-Request-Headers": "authorization",
        })
        assert response.status_code in (200, 204), response.text
        assert response.headers["access-control-allow-origin"] == APP_ORIGIN
        assert response.headers["access-control-allow-credentials"] == "true"
        assert "GET" in response.headers["access-control-allow-methods"]
        assert "authorization" in response.headers["access-control-allow-headers"].lower()

    def test_unlisted_origins_are_not_allowed(self, client: AppClient, pristine: Library) -> None:
        """A GET or a preflight from an origin not in HLSVAULT_CORS_ORIGINS gets no
        Access-Control-Allow-Origin, so the browser keeps the answer from the page."""
        evil = "https://evil.example"
        get = client.get(pristine.key_path(), params={"token": pristine.token()},
                         headers={"Origin": evil})
        preflight = client.request("OPTIONS", pristine.key_path(), headers={
            "Origin": evil, "Access-Control-Request-Method": "GET",
            "Access-Control-Request-Headers": "authorization",
        })
        lookalike = client.get(pristine.key_path(), headers={"Origin": APP_ORIGIN + ".evil"})
        for response in (get, preflight, lookalike):
            assert "access-control-allow-origin" not in response.headers
        assert preflight.status_code >= 400

    def test_embedded_cdn_answers_cors_for_listed_origins(
        self, client: AppClient, pristine: Library
    ) -> None:
        """Segments under /cdn/ in embedded mode carry Access-Control-Allow-Origin for a
        listed origin and none for an unlisted one, and always Vary: Origin."""
        segment_dir = pristine.data_dir / "origin" / "assets" / ASSET / pristine.version
        segment = next((segment_dir / pristine.rendition).glob("*.ts"))
        path = "/cdn/" + segment.relative_to(pristine.data_dir / "origin").as_posix()
        listed = client.get(path, headers={"Origin": APP_ORIGIN})
        unlisted = client.get(path, headers={"Origin": "https://evil.example"})
        no_origin = client.get(path)

        assert (listed.status_code, listed.content) == (200, segment.read_bytes())
        assert listed.headers["access-control-allow-origin"] == APP_ORIGIN
        assert unlisted.status_code == 200
        assert "access-control-allow-origin" not in unlisted.headers
        # Segments are publicly cacheable for a year: a shared cache must key them by Origin,
        # or one origin's answer (with or without the header) is replayed to the others.
        for response in (listed, unlisted, no_origin):
            assert "public" in response.headers["cache-control"]
            assert "origin" in response.headers.get("vary", "").lower()

    def test_without_cors_settings_no_origin_is_allowed(self, pristine: Library) -> None:
        """With HLSVAULT_CORS_ORIGINS unset, even the app's own origin gets no CORS headers."""
        with AppClient(pristine.app(), client_ip=VIEWER_IP) as client:
            response = client.get(pristine.key_path(), params={"token": pristine.token()},
                                  headers={"Origin": APP_ORIGIN})
        assert response.status_code == 200
        assert "access-control-allow-origin" not in response.headers

    @pytest.mark.parametrize("origins", ["*", f"{APP_ORIGIN},*", " * "])
    def test_wildcard_origin_is_a_configuration_error(
        self, pristine: Library, origins: str
    ) -> None:
        """HLSVAULT_CORS_ORIGINS containing '*' fails at load time, naming the setting."""
        with pytest.raises(ConfigurationError, match="HLSVAULT_CORS_ORIGINS"):
            load_settings({**pristine.env, "HLSVAULT_CORS_ORIGINS": origins})


# -- (d) rate limits -------------------------------------------------------------------------


class TestRateLimits:
    def test_sixth_key_request_with_one_token_in_a_minute_is_refused(
        self, pristine: Library
    ) -> None:
        """With HLSVAULT_RATE_LIMIT_TOKEN=5 the sixth key request of one token is 429 with a
        Retry-After of 1-60 s and no key, from any address; other tokens still get keys."""
        app = pristine.app(HLSVAULT_RATE_LIMIT_TOKEN="5", HLSVAULT_RATE_LIMIT_IP="0")
        token, other_token = pristine.token(ttl=600), pristine.token(ttl=601)
        wait_for_fresh_window()
        with AppClient(app, client_ip=VIEWER_IP) as viewer, \
                AppClient(app, client_ip=OTHER_IP) as elsewhere:
            first_five = [viewer.get(pristine.key_path(i % 2), params={"token": token})
                          for i in range(5)]
            sixth = viewer.get(pristine.key_path(), params={"token": token})
            same_token_elsewhere = elsewhere.get(pristine.key_path(), params={"token": token})
            other_token_elsewhere = elsewhere.get(pristine.key_path(),
                                                  params={"token": other_token})
            other_token_same_ip = viewer.get(pristine.key_path(), params={"token": other_token})

        assert [r.status_code for r in first_five] == [200] * 5
        assert_limited(sixth, pristine.key(0))
        assert_limited(same_token_elsewhere, pristine.key(0))
        assert (other_token_elsewhere.status_code, other_token_elsewhere.content) == (
            200, pristine.key(0))
        assert other_token_same_ip.status_code == 200

    def test_fourth_key_request_from_one_address_in_a_minute_is_refused(
        self, pristine: Library
    ) -> None:
        """With HLSVAULT_RATE_LIMIT_IP=3 the fourth key request from one client address is 429
        whichever token it carries; another address still gets its key."""
        app = pristine.app(HLSVAULT_RATE_LIMIT_TOKEN="0", HLSVAULT_RATE_LIMIT_IP="3")
        tokens = [pristine.token(ttl=600 + i) for i in range(5)]
        wait_for_fresh_window()
        with AppClient(app, client_ip=VIEWER_IP) as viewer, \
                AppClient(app, client_ip=OTHER_IP) as elsewhere:
            first_three = [viewer.get(pristine.key_path(), params={"token": t})
                           for t in tokens[:3]]
            fourth = viewer.get(pristine.key_path(), params={"token": tokens[3]})
            unauthenticated = viewer.get(pristine.key_path())
            other_address = elsewhere.get(pristine.key_path(), params={"token": tokens[4]})

        assert [r.status_code for r in first_three] == [200] * 3
        assert_limited(fourth, pristine.key(0))
        assert_limited(unauthenticated, pristine.key(0))
        assert (other_address.status_code, other_address.content) == (200, pristine.key(0))

    def test_retry_after_is_the_rest_of_the_window_and_the_next_window_is_open(
        self, pristine: Library
    ) -> None:
        """Refused 45.2 s into a window, Retry-After is 15 (rounded up); one second into the
        next window the same token gets its key again."""
        window_start = 1_800_000_000.0 - 1_800_000_000.0 % WINDOW_S
        now = [window_start + 45.2]
        limiter = MemoryRateLimiter(clock=lambda: now[0])
        app = pristine.app(limiter=limiter, HLSVAULT_RATE_LIMIT_TOKEN="2",
                           HLSVAULT_RATE_LIMIT_IP="0")
        token = pristine.token()
        with AppClient(app, client_ip=VIEWER_IP) as viewer:
            allowed = [viewer.get(pristine.key_path(), params={"token": token}) for _ in "ab"]
            refused = viewer.get(pristine.key_path(), params={"token": token})
            now[0] = window_start + WINDOW_S + 1
            next_window = viewer.get(pristine.key_path(), params={"token": token})

        assert [r.status_code for r in allowed] == [200, 200]
        assert_limited(refused, pristine.key(0))
        assert refused.headers["retry-after"] == "15"
        assert (next_window.status_code, next_window.content) == (200, pristine.key(0))

    def test_redis_limiter_counts_one_token_across_two_key_servers(
        self, pristine: Library, redis_server: RedisServer
    ) -> None:
        """Two apps sharing a real redis-server through RedisRateLimiter enforce the limits on
        the sum of their requests: five per token, then 429 on whichever server is asked."""
        apps = [
            pristine.app(limiter=RedisRateLimiter(redis_server.url),
                         HLSVAULT_RATE_LIMIT_TOKEN="5", HLSVAULT_RATE_LIMIT_IP="0")
            for _ in range(2)
        ]
        token = pristine.token()
        wait_for_fresh_window()
        with AppClient(apps[0], client_ip=VIEWER_IP) as one, \
                AppClient(apps[1], client_ip=VIEWER_IP) as two:
            servers = [one, two]
            alternating = [servers[i % 2].get(pristine.key_path(), params={"token": token})
                           for i in range(5)]
            sixth_on_each = [s.get(pristine.key_path(), params={"token": token})
                             for s in servers]
            fresh_token = two.get(pristine.key_path(), params={"token": pristine.token(ttl=599)})

        assert [r.status_code for r in alternating] == [200] * 5
        for response in sixth_on_each:
            assert_limited(response, pristine.key(0))
        assert fresh_token.status_code == 200
        buckets = redis_server.client().keys("hlsvault:ratelimit:token:*")
        assert len(buckets) == 2

    def test_redis_limiter_counts_one_address_across_two_key_servers(
        self, pristine: Library, redis_server: RedisServer
    ) -> None:
        """With HLSVAULT_RATE_LIMIT_IP=3 and a shared Redis, the fourth request from one
        address is refused even though neither server alone saw more than two."""
        apps = [
            pristine.app(limiter=RedisRateLimiter(redis_server.url),
                         HLSVAULT_RATE_LIMIT_TOKEN="0", HLSVAULT_RATE_LIMIT_IP="3")
            for _ in range(2)
        ]
        wait_for_fresh_window()
        with AppClient(apps[0], client_ip=VIEWER_IP) as one, \
                AppClient(apps[1], client_ip=VIEWER_IP) as two, \
                AppClient(apps[1], client_ip=OTHER_IP) as elsewhere:
            statuses = [
                server.get(pristine.key_path(), params={"token": pristine.token(ttl=500 + i)})
                for i, server in enumerate([one, two, one, two])
            ]
            other_address = elsewhere.get(pristine.key_path(),
                                          params={"token": pristine.token()})

        assert [r.status_code for r in statuses[:3]] == [200] * 3
        assert_limited(statuses[3], pristine.key(0))
        assert other_address.status_code == 200

    def test_redis_limiter_lets_keys_flow_when_redis_is_gone(
        self, pristine: Library, redis_server: RedisServer
    ) -> None:
        """With the shared Redis stopped, the limiter fails open: a token over its limit still
        gets keys (viewers are not locked out by a limiter outage)."""
        limiter = RedisRateLimiter(redis_server.url)
        app = pristine.app(limiter=limiter, HLSVAULT_RATE_LIMIT_TOKEN="2",
                           HLSVAULT_RATE_LIMIT_IP="2")
        token = pristine.token()
        redis_server.stop()
        with AppClient(app, client_ip=VIEWER_IP) as viewer:
            statuses = [viewer.get(pristine.key_path(), params={"token": token}).status_code
                        for _ in range(4)]
        assert statuses == [200] * 4

    def test_padding_the_signature_does_not_reset_a_tokens_limit(
        self, pristine: Library
    ) -> None:
        """A token refused for its rate is refused as well when its signature is re-sent with
        base64 padding, which PyJWT accepts as the same token."""
        app = pristine.app(HLSVAULT_RATE_LIMIT_TOKEN="2", HLSVAULT_RATE_LIMIT_IP="0")
        token = pristine.token()
        padded = token + "=" * (-len(token.rsplit(".", 1)[1]) % 4)
        assert padded != token
        wait_for_fresh_window()
        with AppClient(app, client_ip=VIEWER_IP) as viewer:
            used = [viewer.get(pristine.key_path(), params={"token": token}) for _ in "ab"]
            refused = viewer.get(pristine.key_path(), params={"token": token})
            padded_retry = viewer.get(pristine.key_path(), params={"token": padded})

        assert [r.status_code for r in used] == [200, 200]
        assert refused.status_code == 429
        assert padded_retry.status_code == 429, "the padded token got a fresh limit"


# -- (e) revocation and retirement -----------------------------------------------------------


class TestRevocation:
    def test_revoked_asset_is_gone_everywhere_within_the_state_cache(
        self, library: Library
    ) -> None:
        """After Catalog.revoke, a running server that had the key cached answers 410 for the
        master, the variant and the key within STATE_TTL_S; a new server at once; the other
        asset is unaffected."""
        token = library.token()
        paths = [f"/v1/assets/{ASSET}/master.m3u8",
                 f"/v1/assets/{ASSET}/{library.rendition}.m3u8", library.key_path(0)]
        # Rate limits off: the poll below asks many times a second.
        unlimited = {"HLSVAULT_RATE_LIMIT_TOKEN": "0", "HLSVAULT_RATE_LIMIT_IP": "0"}
        with AppClient(library.app(**unlimited), client_ip=VIEWER_IP) as running:
            # Given: a running server that has served (and cached) everything
            before = [running.get(p, params={"token": token}).status_code for p in paths]
            assert before == [200, 200, 200]

            # When: the asset is revoked in the catalog
            Catalog(library.vault).revoke(ASSET)
            revoked_at = time.monotonic()
            while True:
                after = [running.get(p, params={"token": token}) for p in paths]
                if all(r.status_code == 410 for r in after):
                    break
                assert time.monotonic() - revoked_at < STATE_TTL_S + 1.0, [
                    r.status_code for r in after]
                assert after[2].status_code in (200, 410)
                time.sleep(0.1)
            other = running.get(library.key_path(asset=OTHER),
                                params={"token": library.token(OTHER)})
        with AppClient(library.app(), client_ip=VIEWER_IP) as new:
            fresh = [new.get(p, params={"token": token}) for p in paths]

        # Then: gone, with no key in any answer; film-b still plays
        assert [r.status_code for r in fresh] == [410, 410, 410]
        assert all(library.key(0) not in r.content for r in after + fresh)
        assert (other.status_code, other.content) == (200, library.key(asset=OTHER))

    def test_retired_version_keys_are_gone_while_the_current_version_serves(
        self, library: Library
    ) -> None:
        """A version retired with a past deadline has its keys answered 410 (even by a server
        that had them cached), while the current version's keys and playlists still serve."""
        token = library.token()
        old = [library.key_path(i, version=library.old_version) for i in (0, 1)]
        with AppClient(library.app(), client_ip=VIEWER_IP) as running:
            cached = [running.get(p, params={"token": token}) for p in old]
            Catalog(library.vault).retire(ASSET, library.old_version,
                                          delete_after=time.time() - 1)
            time.sleep(STATE_TTL_S + 0.2)
            retired = [running.get(p, params={"token": token}) for p in old]
            current = [running.get(library.key_path(i), params={"token": token})
                       for i in (0, 1)]
            master = running.get(f"/v1/assets/{ASSET}/master.m3u8", params={"token": token})

        assert [r.status_code for r in cached] == [200, 200]
        assert [r.status_code for r in retired] == [410, 410]
        assert all(r.content not in library.keys.values() for r in retired)
        assert [r.content for r in current] == [library.key(0), library.key(1)]
        assert master.status_code == 200

    def test_retired_version_keys_serve_until_the_deadline(self, library: Library) -> None:
        """A version retired with a deadline an hour away still has its keys served: the 410
        above comes from the deadline passing, not from retirement as such."""
        Catalog(library.vault).retire(ASSET, library.old_version,
                                      delete_after=time.time() + 3600)
        with AppClient(library.app(), client_ip=VIEWER_IP) as client:
            response = client.get(library.key_path(0, version=library.old_version),
                                  params={"token": library.token()})
        assert (response.status_code, response.content) == (
            200, library.key(0, version=library.old_version))


# -- (f) audit log ---------------------------------------------------------------------------


class TestAuditLog:
    def test_every_key_request_is_one_audit_event_without_token_or_key(
        self, library: Library
    ) -> None:
        """Each key request (served, 401, 403, unknown, gone, rate limited) yields exactly one
        "key request" event with asset, key_id, sid, client_ip and outcome; no captured event
        holds a token, a signature, or a key in bytes or hex."""
        Catalog(library.vault).retire(ASSET, library.old_version, delete_after=time.time() - 1)
        app = library.app(HLSVAULT_RATE_LIMIT_TOKEN="2", HLSVAULT_RATE_LIMIT_IP="0")
        bound = library.token(sid="sess-a", ip=VIEWER_IP)
        plain = library.token()
        other = library.token(OTHER)
        tampered = plain[:-8] + ("A" if plain[-8] != "A" else "B") + plain[-7:]
        old = library.old_version
        # (path, token, sid, expected outcome, expected sid in the event)
        requests = [
            (library.key_path(0), bound, "sess-a", "served", "sess-a"),
            (library.key_path(1), bound, "sess-a", "served", "sess-a"),
            (library.key_path(0), bound, "sess-a", "rate limited", None),
            (library.key_path(0), tampered, None, "denied 401", None),
            (library.key_path(0), other, None, "denied 403", None),
            (library.key_path(0), None, None, "denied 401", None),
            (library.key_path(7), plain, None, "unknown key", None),
            (library.key_path(0, version=old), plain, None, "gone", None),
        ]
        wait_for_fresh_window()
        with structlog.testing.capture_logs() as events, \
                AppClient(app, client_ip=VIEWER_IP) as client:
            for path, token, sid, _, _ in requests:
                params = {"token": token} if token else {}
                if sid:
                    params["sid"] = sid
                client.get(path, params=params)
            # Playlists with the token in the query and in a header are logged too.
            client.get(f"/v1/assets/{ASSET}/master.m3u8", params={"token": plain})
            client.get(f"/v1/assets/{ASSET}/{library.rendition}.m3u8",
                       headers={"Authorization": f"Bearer {plain}"})

        audits = [e for e in events if e.get("event") == "key request"]
        assert [
            (e["asset"], e["key_id"], e["sid"], e["client_ip"], e["outcome"]) for e in audits
        ] == [
            (ASSET, path.split("/", 4)[4], event_sid, VIEWER_IP, outcome)
            for path, _, _, outcome, event_sid in requests
        ]
        secrets = [bound, plain, other, tampered]
        secrets += [t.rsplit(".", 1)[1] for t in secrets]
        for event in events:
            text = repr(event)
            assert not [s for s in secrets if s in text], event
            assert not _JWS.search(text), event
            for key in library.keys.values():
                assert key.hex() not in text.lower() and repr(key) not in text, event
        assert len(events) > len(audits)  # the access log's lines were captured as well
