"""Cookie mode, in-process: the master playlist sets a cookie holding the token, the key
requests carry nothing but that cookie, and the variants a master names always lead to keys of
the key server's current public URL, even after HLSVAULT_PUBLIC_URL changed."""

from __future__ import annotations

import time
from http.cookies import Morsel
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import structlog

from keyserver_support import (
    ASSET,
    OTHER,
    VIEWER_IP,
    AppClient,
    Library,
    assert_json_error,
    key_uris,
    set_cookies,
    shared_library,
    uris,
)

#: Where the key server is reached in these tests. The library was packaged for the default
#: public URL (http://127.0.0.1:8000), so serving here is "the public URL changed since".
MOVED_URL = "https://keys.test"
COOKIE = "hlsvault_token"


@pytest.fixture(scope="module")
def library(tmp_path_factory: pytest.TempPathFactory, copy_clip: Path) -> Library:
    return shared_library(tmp_path_factory, copy_clip)


def cookie_master(client: AppClient, token: str) -> tuple[list[str], dict[str, Morsel[str]]]:
    """The variant URIs and the cookies (by path) of a cookie-mode master."""
    response = client.get(f"/v1/assets/{ASSET}/master.m3u8",
                          params={"token": token, "auth": "cookie"})
    assert response.status_code == 200, response.text
    assert "token" not in response.text
    return uris(response.text), set_cookies(response)


class TestCookie:
    def test_master_sets_a_secure_httponly_cookie_scoped_to_the_assets_keys(
        self, library: Library
    ) -> None:
        """master.m3u8?auth=cookie answers 200 with token-free variant URIs and a Secure,
        HttpOnly, SameSite=None cookie holding the token on the asset's key path, living no
        longer than the token."""
        token = library.token(ttl=900)
        expires_at = time.time() + 900
        with AppClient(library.app(), client_ip=VIEWER_IP) as client:
            _, cookies = cookie_master(client, token)

        cookie = cookies[f"/v1/keys/{ASSET}/"]
        assert (cookie.key, cookie.value) == (COOKIE, token)
        assert cookie["httponly"] is True
        assert cookie["secure"] is True
        assert cookie["samesite"].lower() == "none"
        max_age = int(cookie["max-age"])
        assert 900 - 5 <= max_age <= expires_at - time.time() + 1

    def test_a_bearer_header_may_carry_the_token_to_the_cookie_master(
        self, library: Library
    ) -> None:
        """The cookie-mode master takes its token from Authorization: Bearer as well, and the
        cookie then holds that token."""
        token = library.token()
        with AppClient(library.app(), client_ip=VIEWER_IP) as client:
            response = client.get(f"/v1/assets/{ASSET}/master.m3u8", params={"auth": "cookie"},
                                  headers={"Authorization": f"Bearer {token}"})
        assert response.status_code == 200, response.text
        assert set_cookies(response)[f"/v1/keys/{ASSET}/"].value == token

    def test_the_cookie_alone_unlocks_that_assets_keys_and_no_others(
        self, library: Library
    ) -> None:
        """After the cookie-mode master, a browser-like cookie jar gets both keys with no token
        in the URL; without the cookie the key is 401, and the cookie of one asset sent to
        another asset's key is 403."""
        app = library.app()
        token = library.token()
        with AppClient(app, client_ip=VIEWER_IP) as viewer, \
                AppClient(app, client_ip=VIEWER_IP) as stranger:
            # Given: a viewer whose cookie jar took the cookie from the master playlist
            cookie_master(viewer, token)

            # When: keys are asked for with nothing but cookies
            with_cookie = [viewer.get(library.key_path(i)) for i in (0, 1)]
            without_cookie = stranger.get(library.key_path(0))
            jar_for_other = viewer.get(library.key_path(asset=OTHER))
            forced_on_other = stranger.get(library.key_path(asset=OTHER),
                                           headers={"Cookie": f"{COOKIE}={token}"})

        # Then: only the right asset's keys, and only with the cookie
        assert [r.content for r in with_cookie] == [library.key(0), library.key(1)]
        assert [r.status_code for r in with_cookie] == [200, 200]
        assert_json_error(without_cookie, 401)
        assert_json_error(jar_for_other, 401)  # the cookie's Path kept it from being sent
        assert_json_error(forced_on_other, 403)

    def test_the_key_endpoint_reads_the_query_then_bearer_then_the_cookie(
        self, library: Library
    ) -> None:
        """The first place that holds a token decides: a bad ?token= is 401 even with a good
        Bearer header or cookie, and a good ?token= wins over a bad cookie."""
        good, bad = library.token(), "not-a-token"
        with AppClient(library.app(), client_ip=VIEWER_IP) as client:
            query_over_bearer = client.get(library.key_path(), params={"token": bad},
                                           headers={"Authorization": f"Bearer {good}"})
            bearer_over_cookie = client.get(library.key_path(), headers={
                "Authorization": f"Bearer {bad}", "Cookie": f"{COOKIE}={good}"})
            query_over_cookie = client.get(library.key_path(), params={"token": good},
                                           headers={"Cookie": f"{COOKIE}={bad}"})
        assert_json_error(query_over_bearer, 401)
        assert_json_error(bearer_over_cookie, 401)
        assert (query_over_cookie.status_code, query_over_cookie.content) == (200, library.key())

    def test_static_variant_playlists_on_the_origin_are_token_free_and_the_cookie_opens_them(
        self, library: Library
    ) -> None:
        """The packaging wrote each version's static variant playlist to the origin (served
        here by /cdn/): no token in it, and its key URIs are the asset's keys, which the
        cookie unlocks."""
        static = f"/cdn/assets/{ASSET}/{library.version}/{library.rendition}.m3u8"
        with AppClient(library.app(), client_ip=VIEWER_IP) as viewer:
            cookie_master(viewer, library.token())
            variant = viewer.get(static)
            keys = [viewer.get(urlsplit(uri).path) for uri in key_uris(variant.text)]

        assert variant.status_code == 200
        assert "token" not in variant.text
        assert [urlsplit(uri).path for uri in key_uris(variant.text)] == [
            library.key_path(0), library.key_path(1)]
        assert [(r.status_code, r.content) for r in keys] == [
            (200, library.key(0)), (200, library.key(1))]

    def test_master_names_the_cdn_static_variants_when_they_name_this_key_server(
        self, library: Library
    ) -> None:
        """Served at the public URL it was packaged for, the cookie-mode master names the
        static variants on the CDN and sets one cookie, on the key path."""
        with AppClient(library.app(), client_ip=VIEWER_IP) as client:
            variants, cookies = cookie_master(client, library.token())
        cdn = library.settings.cdn_url
        assert variants == [f"{cdn}/assets/{ASSET}/{library.version}/{library.rendition}.m3u8"]
        assert list(cookies) == [f"/v1/keys/{ASSET}/"]


class TestPublicUrlChanged:
    def test_cookie_mode_plays_through_the_key_server_after_the_public_url_changed(
        self, library: Library
    ) -> None:
        """Packaged for http://127.0.0.1:8000 and served at https://keys.test: the master names
        the key server's own variants, which name keys of https://keys.test without a token;
        master -> variant -> key with nothing but the cookies gets the key bytes, and one
        warning line says what happened."""
        static = library.origin / "assets" / ASSET / library.version / f"{library.rendition}.m3u8"
        assert all(uri.startswith("http://127.0.0.1:8000/") for uri in key_uris(static.read_text()))
        app = library.app(HLSVAULT_PUBLIC_URL=MOVED_URL)

        with structlog.testing.capture_logs() as events, \
                AppClient(app, client_ip=VIEWER_IP, base_url=MOVED_URL) as viewer, \
                AppClient(app, client_ip=VIEWER_IP, base_url=MOVED_URL) as stranger:
            # Given: the cookie-mode master, asked twice
            variants, cookies = cookie_master(viewer, library.token())
            cookie_master(viewer, library.token())

            # When: the player follows its URIs with the cookie jar only
            (variant_url,) = variants
            variant = viewer.get(variant_url)
            keys = [viewer.get(uri) for uri in key_uris(variant.text)]
            variant_without_cookie = stranger.get(variant_url)

        # Then: every hop on the key server's current URL, and the key bytes at the end
        assert variant_url == f"{MOVED_URL}/v1/assets/{ASSET}/{library.rendition}.m3u8?auth=cookie"
        assert sorted(cookies) == [f"/v1/assets/{ASSET}/", f"/v1/keys/{ASSET}/"]
        assert variant.status_code == 200, variant.text
        assert variant.headers["cache-control"] == "no-store"
        assert "token" not in variant.text
        assert key_uris(variant.text) == [f"{MOVED_URL}{library.key_path(i)}" for i in (0, 1)]
        assert [(r.status_code, r.content) for r in keys] == [
            (200, library.key(0)), (200, library.key(1))]
        assert_json_error(variant_without_cookie, 401)
        warnings = [e for e in events if e["log_level"] == "warning"]
        assert [(e["asset"], e["version"], e["public_url"]) for e in warnings] == [
            (ASSET, library.version, MOVED_URL)]

    def test_cookie_paths_follow_a_path_prefix_of_the_public_url(self, library: Library) -> None:
        """With HLSVAULT_PUBLIC_URL=https://keys.test/hls (a proxy strips /hls), the variants
        and both cookie paths carry the prefix, as the browser sees them."""
        app = library.app(HLSVAULT_PUBLIC_URL=f"{MOVED_URL}/hls")
        with AppClient(app, client_ip=VIEWER_IP) as client:
            variants, cookies = cookie_master(client, library.token())
        assert [urlsplit(uri).path for uri in variants] == [
            f"/hls/v1/assets/{ASSET}/{library.rendition}.m3u8"]
        assert sorted(cookies) == [f"/hls/v1/assets/{ASSET}/", f"/hls/v1/keys/{ASSET}/"]
