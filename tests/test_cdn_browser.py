"""Cookie mode behind CloudFront signing: hls.js in Chromium plays on the cookies the master
response sets (hlsvault's for the keys, CloudFront's three for the static variant playlists and
segments), through the CloudFront stand-in; without credentials the CDN refuses it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from pipeline import layout
from pipeline.tokens import mint_token

from browser import Player, PlayerPageServer
from cdn_support import ASSET, CdnLibrary
from support import serving

PLAYED_S, RATE, PLAY_TIMEOUT_S, REFUSAL_TIMEOUT_S = 5.0, 2.0, 20.0, 10.0


@pytest.fixture
def cookie_master(
    cdn_library: CdnLibrary, page_server: PlayerPageServer, tmp_path: Path
) -> Iterator[str]:
    """The key server of the signing deployment, allowing the player page's origin (as does
    the CDN's response headers policy); the master URL of cookie mode."""
    env = {**cdn_library.env, "HLSVAULT_CORS_ORIGINS": page_server.origin}
    cdn_library.cdn.cors_origins.add(page_server.origin)
    token = mint_token(cdn_library.env["HLSVAULT_TOKEN_SECRET"], ASSET, 600)
    with serving(env, cdn_library.port, tmp_path / "serve.log") as base:
        yield layout.master_url(base, ASSET, f"?token={token}&auth=cookie")


def test_hls_js_plays_cookie_mode_on_cloudfront_cookies(
    cdn_library: CdnLibrary, page_server: PlayerPageServer, player: Player, cookie_master: str
) -> None:
    # Given cookie mode's master URL, when hls.js plays it sending credentials
    before = len(cdn_library.cdn.served)
    player.open(page_server.player_url(cookie_master, credentials=True, rate=RATE))
    state = player.wait_until_played(PLAYED_S, timeout_s=PLAY_TIMEOUT_S)

    # Then it plays, its static variant and every segment came from the CDN on the cookies
    assert state.fatal is None and state.current_time > PLAYED_S, player.describe()
    served = cdn_library.cdn.served[before:]
    fetched = [s for s in served if s.path.endswith((".m3u8", ".ts"))]
    assert any(s.path.endswith(".m3u8") for s in fetched), served
    assert sum(s.path.endswith(".ts") for s in fetched) >= 5, served
    assert {s.reason for s in fetched} == {"signed"}, served
    assert not [s for s in served if s.status == 403], served
    cookies = {c["name"]: c for c in player.page.context.cookies(
        f"{cdn_library.cdn.url}/assets/{ASSET}/any")}
    for name in ("CloudFront-Policy", "CloudFront-Signature", "CloudFront-Key-Pair-Id"):
        cookie = cookies[name]
        assert cookie["httpOnly"] and cookie["secure"] and cookie["sameSite"] == "None", cookie
        assert cookie["path"].rstrip("/") == f"/assets/{ASSET}", cookie


def test_without_credentials_the_cdn_refuses(
    cdn_library: CdnLibrary, page_server: PlayerPageServer, player: Player, cookie_master: str
) -> None:
    before = len(cdn_library.cdn.served)
    player.open(page_server.player_url(cookie_master, credentials=False))

    player.wait_for_refusal(timeout_s=REFUSAL_TIMEOUT_S)
    state = player.state()

    assert state.current_time == 0, player.describe()
    refused = [s for s in cdn_library.cdn.served[before:] if s.status == 403]
    assert refused and {s.reason for s in refused} == {"missing signature"}, refused
