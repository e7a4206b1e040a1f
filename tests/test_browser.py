"""A real player in a real browser: hls.js in chromium plays what hlsvault packages and serves.

The player page comes from an origin of its own (another 127.0.0.1 port), as a viewer app's page
would, so every playlist and key response must pass CORS; segments come from the embedded /cdn/.
A screenshot and the page's record of each test are left under test-artifacts/browser/.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import jwt
import pytest

from browser import Player, PlayerPageServer, PlayerState
from support import ARTIFACTS, Hlsvault, evidence_path

ASSET = "film-1"
#: The 6 s clip remuxed into 6 s segments under one key.
COPY = ["--ladder", "copy"]
#: 1 s segments with a new key every 2: six segments under three keys, so a player that got a
#: wrong IV or key index cannot play past the second segment.
ROTATED = [*COPY, "--segment-seconds", "1", "--key-rotation-segments", "2"]
#: Playback must pass this position (of the 6 s clip) for a test to call it played.
PLAYED_S = 5.0
#: Twice real time keeps the suite fast; every segment is still fetched, decrypted and decoded.
RATE = 2.0
#: PLAYED_S at RATE takes 2.5 s after start-up; a player still short of it after this stalled.
PLAY_TIMEOUT_S = 20.0
#: A refused token fails the first request; hls.js does not retry a 4xx.
REFUSAL_TIMEOUT_S = 10.0
#: How long a refused player is watched after its fatal error, for any frame it might still show.
REFUSED_WATCH_MS = 500
#: copy_clip is 640x360.
CLIP_WIDTH, CLIP_HEIGHT = 640, 360


@pytest.fixture
def publish(
    hlsvault: Hlsvault, page_server: PlayerPageServer, copy_clip: Path,
    request: pytest.FixtureRequest,
) -> Callable[..., Hlsvault]:
    """Package copy_clip as ASSET with the given options, then start the key server, allowing
    the player page's origin."""

    def published(*options: str) -> Hlsvault:
        hlsvault.env["HLSVAULT_CORS_ORIGINS"] = page_server.origin
        done = hlsvault.package(str(copy_clip), "--asset", ASSET, *options)
        assert done.returncode == 0, done.stderr
        served: Hlsvault = request.getfixturevalue("keyserver")
        return served

    return published


def assert_played(player: Player, state: PlayerState) -> None:
    assert state.fatal is None, player.describe()
    assert state.current_time > PLAYED_S, player.describe()
    assert (state.video_width, state.video_height) == (CLIP_WIDTH, CLIP_HEIGHT), player.describe()
    assert state.failed_loads == [], player.describe()


def with_token(url: str, token: str) -> str:
    return url.split("?", 1)[0] + "?token=" + token


def url_token(url: str) -> str:
    (token,) = parse_qs(urlsplit(url).query)["token"]
    return token


def tampered(token: str) -> str:
    """``token`` with one character of its signature changed (mid-signature, where every base64
    character carries six bits, so the signature bytes really change)."""
    header, payload, signature = token.split(".")
    middle = len(signature) // 2
    swapped = "B" if signature[middle] == "A" else "A"
    return ".".join([header, payload, signature[:middle] + swapped + signature[middle + 1:]])


def expired(hv: Hlsvault, asset: str) -> str:
    """A well-signed token for ``asset`` that expired ten minutes ago (well past the leeway)."""
    secret = (hv.data_dir / "secrets" / "token_secret").read_text().strip()
    now = int(time.time())
    return jwt.encode({"sub": asset, "iat": now - 3600, "exp": now - 600}, secret,
                      algorithm="HS256")


class TestTokenizedMode:
    """A viewer holding `hlsvault url`'s token plays the asset from another origin."""

    @pytest.mark.parametrize("options", [COPY, ROTATED], ids=["one-key", "rotated-keys"])
    def test_plays_from_another_origin(
        self, publish: Callable[..., Hlsvault], page_server: PlayerPageServer, player: Player,
        options: list[str],
    ) -> None:
        hv = publish(*options)
        player.open(page_server.player_url(hv.url(ASSET), rate=RATE))

        state = player.wait_until_played(PLAYED_S, timeout_s=PLAY_TIMEOUT_S)

        assert_played(player, state)
        keys = set(player.fetched("/v1/keys/"))
        assert len(keys) == (3 if options == ROTATED else 1), player.describe()

    def test_plays_from_the_key_servers_origin(
        self, publish: Callable[..., Hlsvault], player: Player
    ) -> None:
        """The harness itself, with CORS out of the picture: if this fails, so does the rest."""
        hv = publish(*COPY)
        player.open_same_origin(hv.public_url, hv.url(ASSET), rate=RATE)

        state = player.wait_until_played(PLAYED_S, timeout_s=PLAY_TIMEOUT_S)

        assert_played(player, state)


class TestRefusedTokens:
    """A forged or expired token gets a load error the player can see, and no frame plays."""

    @pytest.mark.parametrize("spoil", ["tampered", "expired"])
    def test_refused_token_plays_nothing(
        self, publish: Callable[..., Hlsvault], page_server: PlayerPageServer, player: Player,
        spoil: str,
    ) -> None:
        hv = publish(*COPY)
        good = hv.url(ASSET)
        token = tampered(url_token(good)) if spoil == "tampered" else expired(hv, ASSET)
        player.open(page_server.player_url(with_token(good, token)))

        player.wait_for_refusal(timeout_s=REFUSAL_TIMEOUT_S)
        player.page.wait_for_timeout(REFUSED_WATCH_MS)
        state = player.state()

        assert state.fatal is not None, player.describe()
        refused = state.failed("manifest") + state.failed("key")
        # 401, not 0: the refusal itself carries CORS headers, so the viewer app can tell a
        # refused token from a network failure.
        assert [load["code"] for load in refused] == [401], player.describe()
        assert state.current_time == 0, player.describe()
        assert not state.playing, player.describe()


class TestCookieMode:
    """A viewer whose key requests carry an HttpOnly cookie instead of a token in the URL."""

    def test_plays_with_credentials(
        self, publish: Callable[..., Hlsvault], page_server: PlayerPageServer, player: Player
    ) -> None:
        # Given an asset and `hlsvault url --auth cookie`'s master playlist URL
        hv = publish(*COPY)
        master = hv.url(ASSET, "--auth", "cookie")

        # When hls.js sends credentials with every request
        player.open(page_server.player_url(master, credentials=True, rate=RATE))
        state = player.wait_until_played(PLAYED_S, timeout_s=PLAY_TIMEOUT_S)

        # Then it plays; its variant playlists came from the CDN, and its keys were fetched
        # without a token in their URLs, on the cookie that the master playlist's response set
        assert_played(player, state)
        variants = [url for url in player.fetched(".m3u8")
                    if not urlsplit(url).path.endswith("/master.m3u8")]
        assert variants, player.describe()
        assert all(url.startswith(f"{hv.public_url}/cdn/") for url in variants), player.describe()
        keys = player.fetched("/v1/keys/")
        assert keys, player.describe()
        assert not [url for url in keys if "token=" in url], player.describe()
        (cookie,) = player.page.context.cookies(f"{hv.public_url}/v1/keys/{ASSET}/0/0")
        assert cookie["httpOnly"] and cookie["secure"], cookie
        assert cookie["sameSite"] == "None", cookie
        assert cookie["path"].rstrip("/") == f"/v1/keys/{ASSET}", cookie

    def test_without_credentials_gets_no_key(
        self, publish: Callable[..., Hlsvault], page_server: PlayerPageServer, player: Player
    ) -> None:
        """The cookie is what authorises the keys: a player that sends none plays nothing."""
        hv = publish(*COPY)
        player.open(page_server.player_url(hv.url(ASSET, "--auth", "cookie")))

        player.wait_for_refusal(timeout_s=REFUSAL_TIMEOUT_S)
        player.page.wait_for_timeout(REFUSED_WATCH_MS)
        state = player.state()

        # (hls.js tries a refused key again a few times before it gives up for good)
        refusals = {load["code"] for load in state.failed("key")}
        assert refusals == {401}, player.describe()
        assert state.current_time == 0, player.describe()


class TestEvidenceNames:
    def test_two_files_tests_of_one_name_leave_two_files(self) -> None:
        """Tests of one name (and parameters) in two files, which two xdist processes may run
        at once, never write each other's screenshot."""
        first = evidence_path("browser", "tests/test_browser.py::TestA::test_plays[ts]", ".png")
        second = evidence_path("browser", "tests/test_chunks.py::TestA::test_plays[ts]", ".png")

        assert first != second
        assert first.parent == second.parent == ARTIFACTS / "browser"
        assert first.name == "tests_test_browser.py_TestA_test_plays_ts.png"

    def test_a_long_parametrized_id_stays_a_valid_distinct_file_name(self) -> None:
        ids = [f"tests/test_x.py::test_y[{'a' * 300}-{n}]" for n in (1, 2)]
        paths = [evidence_path("browser", nodeid, ".json", label="after") for nodeid in ids]

        assert paths[0] != paths[1]
        assert all(len(path.name.encode()) <= 255 for path in paths)
        for path in paths:
            path.write_text("{}")  # the filesystem takes the name
            path.unlink()
