"""Revocation and retirement, in-process: a revoked asset is gone (410) for its playlists and
keys, at once in a fleet (the state bus, over a real redis-server) and within STATE_TTL_S
without one; a retired version's keys serve until their deadline, then 410."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from keyserver import create_app
from keyserver.state import STATE_TTL_S
from pipeline.catalog import Catalog
from pipeline.settings import load_settings
from pipeline.statebus import RedisStateBus

from fleet import RedisServer
from keyserver_support import (
    ASSET,
    OTHER,
    VIEWER_IP,
    AppClient,
    Library,
    assert_json_error,
    shared_library,
)

#: The state cache of the bus tests' key servers: far longer than any of their waits, so only
#: the announcement can make a change visible.
LONG_TTL_S = 60.0
#: How long a test waits for the key server's state bus to be (re)subscribed or heard.
BUS_WAIT_S = 20.0


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory, copy_clip: Path) -> Library:
    return shared_library(tmp_path_factory, copy_clip)


@pytest.fixture
def library(pristine: Library, tmp_path: Path) -> Library:
    """A private copy: these tests revoke and retire."""
    return pristine.copy(tmp_path)


def health(client: AppClient) -> dict[str, Any]:
    response = client.get("/healthz")
    assert response.status_code == 200
    answer: dict[str, Any] = response.json()
    return answer


def wait_for_health(client: AppClient, **expected: Any) -> None:
    """Poll /healthz until it reports ``expected`` (bounded by BUS_WAIT_S)."""
    deadline = time.monotonic() + BUS_WAIT_S
    while {k: health(client).get(k) for k in expected} != expected:
        assert time.monotonic() < deadline, (expected, health(client))
        time.sleep(0.05)


def wait_until_heard(client: AppClient, before: int) -> None:
    deadline = time.monotonic() + BUS_WAIT_S
    while health(client)["state_changes_heard"] == before:
        assert time.monotonic() < deadline, "the announcement never reached the key server"
        time.sleep(0.01)


@pytest.fixture
def fleet_app(library: Library, redis_server: RedisServer) -> Iterator[Any]:
    """A fleet key server (REDIS_URL set) over the library's vault, with LONG_TTL_S."""
    secrets = library.data_dir / "secrets"
    settings = load_settings({
        **library.env,
        "REDIS_URL": redis_server.url,
        "HLSVAULT_CDN_URL": "https://cdn.test",
        "HLSVAULT_TOKEN_SECRET": (secrets / "token_secret").read_text().strip(),
        "HLSVAULT_MASTER_KEY": (secrets / "master_key").read_text().strip(),
        # Off: the bus tests ask many times; a shared Redis would count them across tests.
        "HLSVAULT_RATE_LIMIT_TOKEN": "0",
        "HLSVAULT_RATE_LIMIT_IP": "0",
    })
    yield create_app(settings, vault=library.vault, state_ttl_s=LONG_TTL_S)


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
            library.retire_until(library.old_version, time.time() - 1)
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
        library.retire_until(library.old_version, time.time() + 3600)
        with AppClient(library.app(), client_ip=VIEWER_IP) as client:
            response = client.get(library.key_path(0, version=library.old_version),
                                  params={"token": library.token()})
        assert (response.status_code, response.content) == (
            200, library.key(0, version=library.old_version))


class TestStateBus:
    def test_a_revoke_announced_on_the_bus_is_in_effect_at_the_next_request(
        self, library: Library, redis_server: RedisServer, fleet_app: Any
    ) -> None:
        """A fleet key server that cached the asset (state kept 60 s) still serves it after
        the vault says revoked; once the revoke is announced and heard, the very next master,
        variant and key requests are 410, and the other asset still plays."""
        token = library.token()
        paths = [library.master_path(), library.variant_path(), library.key_path(0)]
        with AppClient(fleet_app, client_ip=VIEWER_IP) as running:
            wait_for_health(running, state_bus="subscribed")
            # Given: a running server that has served (and cached) everything
            before = [running.get(p, params={"token": token}).status_code for p in paths]

            # When: the asset is revoked in the vault, then announced
            Catalog(library.vault).revoke(ASSET)
            unannounced = running.get(library.key_path(0), params={"token": token})
            heard = health(running)["state_changes_heard"]
            reached = RedisStateBus(redis_server.client()).announce(ASSET)
            wait_until_heard(running, heard)
            after = [running.get(p, params={"token": token}) for p in paths]
            other = running.get(library.key_path(asset=OTHER),
                                params={"token": library.token(OTHER)})

        # Then: the cache held the old state until the announcement, and not a moment after
        assert before == [200, 200, 200]
        assert (unannounced.status_code, unannounced.content) == (200, library.key(0))
        assert reached == 1
        for response in after:
            assert_json_error(response, 410)
            assert library.key(0) not in response.content
        assert (other.status_code, other.content) == (200, library.key(asset=OTHER))

    def test_the_key_server_resubscribes_after_redis_restarts(
        self, library: Library, redis_server: RedisServer, fleet_app: Any
    ) -> None:
        """With Redis stopped, /healthz says the bus is reconnecting and keys still serve from
        the cache; with Redis back it subscribes again, and a revoke announced then is in
        effect at the next request (and not before: the state was cached again)."""
        token = library.token()
        with AppClient(fleet_app, client_ip=VIEWER_IP) as running:
            wait_for_health(running, state_bus="subscribed")
            redis_server.stop()
            wait_for_health(running, state_bus="reconnecting")
            during = running.get(library.key_path(0), params={"token": token})
            redis_server.start()
            wait_for_health(running, state_bus="subscribed")

            cached = running.get(library.key_path(0), params={"token": token})
            Catalog(library.vault).revoke(ASSET)
            unannounced = running.get(library.key_path(0), params={"token": token})
            heard = health(running)["state_changes_heard"]
            assert RedisStateBus(redis_server.client()).announce(ASSET) == 1
            wait_until_heard(running, heard)
            after = running.get(library.key_path(0), params={"token": token})

        assert (during.status_code, during.content) == (200, library.key(0))
        assert [cached.status_code, unannounced.status_code] == [200, 200]
        assert_json_error(after, 410)

    def test_embedded_key_servers_have_no_bus_and_say_so(self, library: Library) -> None:
        """Without REDIS_URL, /healthz reports the state bus off: changes take STATE_TTL_S."""
        with AppClient(library.app(), client_ip=VIEWER_IP) as client:
            assert health(client) == {"status": "ok", "state_bus": "off",
                                      "state_changes_heard": 0, "cdn_signing": "off"}
