"""Offline HLS keys: an ``offline`` token fetches the current version's playlists and keys as one
bundle, and those keys decrypt every segment of the version; an ordinary token, an offline
token past its cap, and any token after revoke are refused."""

from __future__ import annotations

import base64
import re
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from pipeline import layout
from pipeline.tokens import TokenVerifier, mint_token

from keyserver_support import (
    ASSET,
    VIEWER_IP,
    AppClient,
    Library,
    assert_json_error,
    shared_library,
)
from support import decrypt_bytes

TS_PACKET = 188
_KEY_LINE = re.compile(r'#EXT-X-KEY:METHOD=AES-128,URI="([^"]+)"')
DAY = 24 * 3600


@pytest.fixture(scope="module")
def library(tmp_path_factory: pytest.TempPathFactory, copy_clip: Path) -> Library:
    return shared_library(tmp_path_factory, copy_clip)


def bundle_of(library: Library, token: str) -> tuple[int, dict[str, object]]:
    with AppClient(library.app(), client_ip=VIEWER_IP) as client:
        response = client.get(layout.offline_url("", ASSET, f"?token={token}"))
    return response.status_code, response.json()


def is_transport_stream(data: bytes) -> bool:
    return len(data) % TS_PACKET == 0 and all(
        data[i] == 0x47 for i in range(0, len(data), TS_PACKET)
    )


class TestOfflineBundle:
    def test_the_bundles_keys_decrypt_every_segment(self, library: Library) -> None:
        # Given an offline token, when its holder fetches the bundle
        status, bundle = bundle_of(library, library.token(offline=True, ttl=7 * DAY))

        # Then it names the current version, and each key URI is the offline scheme's
        assert status == 200, bundle
        assert bundle["version"] == library.version
        keys = {int(i): base64.b64decode(k) for i, k in bundle["keys"].items()}  # type: ignore[attr-defined]
        assert sorted(keys) == [0, 1]
        decrypted = 0
        for rendition in bundle["renditions"]:  # type: ignore[attr-defined]
            playlist = rendition["playlist"]
            key_uris = _KEY_LINE.findall(playlist)
            assert key_uris and all(
                uri.startswith(f"{layout.OFFLINE_KEY_SCHEME}://{ASSET}/") for uri in key_uris)
            # and every segment it names, read from the origin, decrypts under its key
            current_key = None
            sequence = 0
            for line in playlist.splitlines():
                found = _KEY_LINE.match(line)
                if found:
                    current_key = keys[int(found.group(1).rsplit("/", 1)[1])]
                elif line and not line.startswith("#"):
                    assert current_key is not None
                    path = urlsplit(line).path.removeprefix("/cdn/")
                    encrypted = (library.origin / path).read_bytes()
                    plain = decrypt_bytes(encrypted, current_key, sequence.to_bytes(16, "big"))
                    assert is_transport_stream(plain), line
                    sequence += 1
                    decrypted += 1
        assert decrypted == 3

    def test_the_keys_are_the_versions_keys(self, library: Library) -> None:
        """The control of the decryption above: the bundle holds the vault's keys."""
        _, bundle = bundle_of(library, library.token(offline=True))
        assert base64.b64decode(bundle["keys"]["1"]) == library.key(1)  # type: ignore[index]

    def test_an_ordinary_token_is_refused(self, library: Library) -> None:
        with AppClient(library.app(), client_ip=VIEWER_IP) as client:
            response = client.get(layout.offline_url("", ASSET, f"?token={library.token()}"))
        assert "offline" in assert_json_error(response, 403)

    def test_an_offline_token_past_its_cap_is_refused(self, library: Library) -> None:
        too_long = library.token(offline=True, ttl=31 * DAY)
        with AppClient(library.app(), client_ip=VIEWER_IP) as client:
            response = client.get(layout.offline_url("", ASSET, f"?token={too_long}"))
        assert "offline TTL" in assert_json_error(response, 401)

    def test_the_offline_cap_is_a_setting(self, library: Library) -> None:
        token = library.token(offline=True, ttl=2 * DAY)
        with AppClient(library.app(HLSVAULT_OFFLINE_MAX_TTL=str(DAY)),
                       client_ip=VIEWER_IP) as client:
            response = client.get(layout.offline_url("", ASSET, f"?token={token}"))
        assert_json_error(response, 401)

    def test_after_revoke_it_is_410(self, library: Library, tmp_path: Path) -> None:
        copy = library.copy(tmp_path)
        token = copy.token(offline=True)
        assert bundle_of(copy, token)[0] == 200
        from pipeline.lifecycle import revoke
        from pipeline.services import build_services

        revoke(build_services(copy.settings), ASSET)
        with AppClient(copy.app(), client_ip=VIEWER_IP) as client:
            response = client.get(layout.offline_url("", ASSET, f"?token={token}"))
        assert_json_error(response, 410)


class TestOfflineLifetimes:
    """Ordinary tokens keep their 24 h cap; offline tokens have their own."""

    def test_caps_apply_by_kind(self) -> None:
        verifier = TokenVerifier("HS256", "s" * 40, max_ttl_s=DAY, offline_max_ttl_s=30 * DAY)
        now = time.time()
        week_offline = mint_token("s" * 40, "a", 7 * DAY, offline=True, now=now)
        week_ordinary = mint_token("s" * 40, "a", 7 * DAY, now=now)
        assert verifier.verify(week_offline, asset="a").offline
        with pytest.raises(Exception, match="maximum TTL"):
            verifier.verify(week_ordinary, asset="a")

    def test_a_non_boolean_offline_claim_is_refused(self) -> None:
        import jwt

        verifier = TokenVerifier("HS256", "s" * 40, max_ttl_s=DAY, offline_max_ttl_s=30 * DAY)
        now = int(time.time())
        token = jwt.encode({"sub": "a", "exp": now + 60, "offline": "yes"}, "s" * 40,
                           algorithm="HS256")
        with pytest.raises(Exception, match="offline is not true or false"):
            verifier.verify(token, asset="a")


class TestGarbageRequests:
    @pytest.mark.parametrize(
        ("path", "status"),
        [
            (layout.offline_url("", "a" * 300, "?token=x"), 400),
            (layout.offline_url("", "..%2Fetc", "?token=x"), 404),  # no such route
            (layout.download_url("", "a" * 300, "?token=x"), 400),
            (layout.offline_url("", ASSET, "?token=" + "e" * 5000), 401),
            (layout.download_url("", ASSET, "?token=" + "e" * 5000), 401),
            (layout.offline_url("", ASSET, "?token=eyJ.eyJ.%FF%FE"), 401),
            (layout.download_url("", ASSET, ""), 401),
        ],
        ids=["long-asset", "traversal", "download-long-asset", "huge-token",
             "download-huge-token", "binary-token", "no-token"],
    )
    def test_garbage_gets_a_json_refusal_never_a_500(
        self, library: Library, path: str, status: int
    ) -> None:
        """The offline and download routes refuse malformed ids and tokens with the key
        route's status codes, as JSON with no-store."""
        with AppClient(library.app(), client_ip=VIEWER_IP) as client:
            response = client.get(path)
        assert_json_error(response, status)
        assert response.headers["cache-control"] == "no-store"
