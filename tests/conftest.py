"""Shared fixtures: generated test media (cached across runs), an isolated hlsvault
environment per test, the real CLI as a subprocess, a running key server, Redis, moto and the
fleet. Helpers that are not fixtures live in support.py.

Nothing heavy is imported at module level: the browser stack (Playwright) is imported by the
``browser`` fixture only, so a unit test needs neither Playwright nor Chromium.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from faultproxy import FaultProxy
from fleet import Fleet, MotoServer, RedisServer, fleet_environment
from support import ROOT, Hlsvault, free_port, generate_media, lavfi_clip, serving

if TYPE_CHECKING:
    from playwright.sync_api import Browser

    from browser import Player, PlayerPageServer
    from cdn_support import CdnLibrary


@pytest.fixture(scope="session")
def copy_clip() -> Path:
    """6 s of 640x360 H.264 + AAC with a keyframe every second: remuxable as it is."""
    return lavfi_clip("copy.mp4", seconds=6)


@pytest.fixture(scope="session")
def hd_clip() -> Path:
    """4 s of 1280x720 H.264 + AAC: the default ladder makes 720p, 480p and 360p of it."""
    return lavfi_clip("hd.mp4", seconds=4, size="1280x720")


def two_audio(english_hz: int, german_hz: int) -> Path:
    """6 s of 640x360 H.264 with two AAC tracks: English (``english_hz``, default) and German
    (``german_hz``, titled "Deutsch"), remuxable as it is."""
    return generate_media("two-audio.mp4", [
        "-f", "lavfi", "-i", "testsrc2=size=640x360:rate=30",
        "-f", "lavfi", "-i", f"sine=frequency={english_hz}:sample_rate=48000",
        "-f", "lavfi", "-i", f"sine=frequency={german_hz}:sample_rate=48000",
        "-t", "6", "-map", "0:v", "-map", "1:a", "-map", "2:a",
        "-c:v", "libx264", "-preset", "veryfast", "-g", "30", "-pix_fmt", "yuv420p",
        "-c:a", "aac", "-b:a", "96k",
        "-metadata:s:a:0", "language=eng", "-metadata:s:a:1", "language=deu",
        "-metadata:s:a:1", "title=Deutsch", "-disposition:a:0", "default",
        "-disposition:a:1", "0",
    ])


@pytest.fixture(scope="session")
def two_audio_clip() -> Path:
    """:func:`two_audio` with tones of 440 Hz (English) and 660 Hz (German)."""
    return two_audio(440, 660)


@pytest.fixture(scope="session")
def retuned_two_audio_clip() -> Path:
    """:func:`two_audio_clip`'s shape (length, tracks, codecs) with other tones (550 Hz and
    770 Hz): a source that cuts to other bytes."""
    return two_audio(550, 770)


@pytest.fixture(scope="session")
def long_hd_clip() -> Path:
    """10 s of 1280x720: transcoding it takes long enough to kill a worker mid-stage."""
    return lavfi_clip("long-hd.mp4", seconds=10, size="1280x720")


@pytest.fixture
def hlsvault(tmp_path: Path) -> Hlsvault:
    data_dir = tmp_path / "data"
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HLSVAULT_", "REDIS_URL"))}
    env.update(
        HLSVAULT_DATA_DIR=str(data_dir),
        HLSVAULT_PUBLIC_URL=f"http://127.0.0.1:{port}",
        PYTHONPATH=str(ROOT),
    )
    return Hlsvault(env=env, data_dir=data_dir, port=port)


@pytest.fixture
def keyserver(hlsvault: Hlsvault, tmp_path: Path) -> Iterator[Hlsvault]:
    """`hlsvault serve` running for the test's hlsvault; its log is at tmp_path/serve.log."""
    with serving(hlsvault.env, hlsvault.port, tmp_path / "serve.log"):
        yield hlsvault


@pytest.fixture(scope="session")
def moto_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoServer]:
    """One moto server for the session; every test makes buckets of its own."""
    server = MotoServer(tmp_path_factory.mktemp("moto") / "moto.log")
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def cdn_library(
    tmp_path_factory: pytest.TempPathFactory, moto_server: MotoServer, copy_clip: Path
) -> Iterator[CdnLibrary]:
    """A library packaged into a private S3 origin behind the CloudFront stand-in, with
    CloudFront signing configured (tests/cdn_support.py); read-only."""
    from cdn_support import cdn_library as packaged

    library = packaged(tmp_path_factory.getbasetemp(), moto_server, copy_clip)
    yield library
    library.cdn.stop()


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of the test's own on a free port, AOF on, killable and restartable."""
    server = RedisServer(tmp_path / "redis")
    server.start()
    yield server
    server.stop()


@pytest.fixture
def fault_proxy(moto_server: MotoServer) -> Iterator[FaultProxy]:
    """A fault-injecting proxy in front of the moto server."""
    proxy = FaultProxy(moto_server.port)
    proxy.start()
    yield proxy
    proxy.stop()


@pytest.fixture
def faulty_fleet(
    tmp_path: Path, redis_server: RedisServer, moto_server: MotoServer, fault_proxy: FaultProxy
) -> Iterator[Fleet]:
    """A fleet whose every AWS call passes through ``fault_proxy`` (players still fetch
    segments from moto directly, as from a CDN)."""
    env = fleet_environment(tmp_path, redis_server, moto_server, endpoint=fault_proxy.endpoint)
    running = Fleet(env, tmp_path / "logs")
    yield running
    running.stop()


@pytest.fixture
def fleet(tmp_path: Path, redis_server: RedisServer, moto_server: MotoServer) -> Iterator[Fleet]:
    """The Procfile's processes against the test's Redis and moto; started by the test."""
    env = fleet_environment(tmp_path, redis_server, moto_server)
    running = Fleet(env, tmp_path / "logs")
    yield running
    running.stop()


@pytest.fixture(scope="session")
def browser() -> Iterator[Browser]:
    """One headless Debian Chromium for the session, driven by Playwright. (Playwright's sync
    API allows one instance per thread, so every browser test shares this one.)"""
    from playwright.sync_api import sync_playwright

    from browser import launch_chromium

    with sync_playwright() as playwright:
        launched = launch_chromium(playwright)
        yield launched
        launched.close()


@pytest.fixture(scope="session")
def page_server() -> Iterator[PlayerPageServer]:
    """The player page (hls.js) on an origin of its own, for every browser test."""
    from browser import PlayerPageServer

    server = PlayerPageServer()
    server.start()
    yield server
    server.stop()


@pytest.fixture
def player(browser: Browser, request: pytest.FixtureRequest) -> Iterator[Player]:
    """A tab of its own (fresh cookies); its screenshot is saved whether the test passed or not."""
    from browser import Player

    context = browser.new_context(viewport={"width": 660, "height": 520})
    opened = Player(context.new_page())
    try:
        yield opened
    finally:
        opened.save_evidence(request.node.nodeid)
        context.close()


#: Fixtures that mean a test runs the real thing end to end (the CLI packaging clips, a
#: redis-server, moto, the Procfile's processes, Chromium): a test using one is marked ``slow``,
#: so `pytest -m "not slow"` (`make pytest-fast`) runs the rest in well under a minute. Tests that
#: transcode with x264 or wait out a timeout are marked by hand.
SLOW_FIXTURES = frozenset({
    "hlsvault", "keyserver", "redis_server", "moto_server", "fault_proxy", "fleet",
    "faulty_fleet", "browser", "hd_clip", "long_hd_clip",
})


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if SLOW_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


def pytest_configure(config: pytest.Config) -> None:
    if shutil.which("ffmpeg") is None or shutil.which("ffprobe") is None:
        raise pytest.UsageError("ffmpeg and ffprobe are required: apt-get install -y ffmpeg")
