"""Shared fixtures: generated test media (cached across runs), an isolated hlsvault
environment per test, the real CLI as a subprocess, and a running key server."""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from playwright.sync_api import Browser, sync_playwright

from browser import launch_chromium
from faultproxy import FaultProxy
from fleet import Fleet, MotoServer, RedisServer, fleet_environment

ROOT = Path(__file__).resolve().parent.parent
MEDIA_CACHE = ROOT / ".cache" / "test-media"
HLSVAULT = [sys.executable, "-m", "hlsvault"]
#: A CLI call in a test packages a few seconds of video; a minute means it hung.
CLI_TIMEOUT_S = 300


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def generate_media(name: str, ffmpeg_args: list[str]) -> Path:
    """Generate a clip with ffmpeg's lavfi sources once; later runs reuse the cached file."""
    digest = hashlib.sha256(" ".join(ffmpeg_args).encode()).hexdigest()[:12]
    suffix = Path(name).suffix
    path = MEDIA_CACHE / f"{Path(name).stem}-{digest}{suffix}"
    if not path.exists():
        MEDIA_CACHE.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}{suffix}")
        subprocess.run(
            ["ffmpeg", "-nostdin", "-v", "error", "-y", *ffmpeg_args, str(tmp)],
            check=True, timeout=300,
        )
        os.replace(tmp, path)
    return path


def lavfi_clip(
    name: str, *, seconds: float, size: str = "640x360", rate: int = 30, audio: bool = True,
    gop: int | None = None, vcodec: str = "libx264", extra: list[str] | None = None,
) -> Path:
    args = ["-f", "lavfi", "-i", f"testsrc2=size={size}:rate={rate}"]
    if audio:
        args += ["-f", "lavfi", "-i", "sine=frequency=440:sample_rate=48000"]
    args += ["-t", f"{seconds:g}", "-c:v", vcodec, "-pix_fmt", "yuv420p"]
    if vcodec == "libx264":
        args += ["-preset", "veryfast", "-g", str(gop or rate)]
    if audio:
        args += ["-c:a", "aac", "-b:a", "128k"]
    args += extra or []
    return generate_media(name, args)


@pytest.fixture(scope="session")
def copy_clip() -> Path:
    """6 s of 640x360 H.264 + AAC with a keyframe every second: remuxable as it is."""
    return lavfi_clip("copy.mp4", seconds=6)


@pytest.fixture(scope="session")
def hd_clip() -> Path:
    """4 s of 1280x720 H.264 + AAC: the default ladder makes 720p, 480p and 360p of it."""
    return lavfi_clip("hd.mp4", seconds=4, size="1280x720")


@pytest.fixture(scope="session")
def long_hd_clip() -> Path:
    """10 s of 1280x720: transcoding it takes long enough to kill a worker mid-stage."""
    return lavfi_clip("long-hd.mp4", seconds=10, size="1280x720")


def framemd5(
    target: str, *, extra: list[str] | None = None, stream: str = "0:v:0"
) -> list[str]:
    """The per-frame MD5 lines of one decoded stream of ``target`` (a file or an HLS URL)."""
    done = subprocess.run(
        ["ffmpeg", "-nostdin", "-v", "error", *(extra or []), "-i", target,
         "-map", stream, "-f", "framemd5", "-"],
        capture_output=True, timeout=300, check=False,
    )
    assert done.returncode == 0, done.stderr.decode(errors="replace")[-2000:]
    return [line for line in done.stdout.decode().splitlines() if line and not line.startswith("#")]


def frame_hashes(lines: list[str]) -> list[str]:
    """The hash column of framemd5 lines: what a frame looks like, not when it is shown."""
    return [line.rsplit(",", 1)[-1].strip() for line in lines]


@dataclass
class Hlsvault:
    """An isolated embedded hlsvault: its own data dir and key server port."""

    env: dict[str, str]
    data_dir: Path
    port: int

    @property
    def public_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def run(self, *args: str, timeout: float = CLI_TIMEOUT_S) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*HLSVAULT, *args], env=self.env, capture_output=True, text=True,
            timeout=timeout, check=False, cwd=self.data_dir.parent,
        )

    def package(self, *args: str) -> subprocess.CompletedProcess[str]:
        return self.run("package", *args)

    def url(self, asset: str, *args: str) -> str:
        done = self.run("url", asset, *args)
        assert done.returncode == 0, done.stderr
        return done.stdout.strip()

    @property
    def origin(self) -> Path:
        return self.data_dir / "origin"

    @property
    def vault(self) -> Path:
        return self.data_dir / "vault"


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


def wait_for_http(url: str, *, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url} did not answer within {timeout:.0f} s")
        time.sleep(0.1)


@pytest.fixture
def keyserver(hlsvault: Hlsvault, tmp_path: Path) -> Iterator[Hlsvault]:
    """`hlsvault serve` running for the test's hlsvault; its log is at tmp_path/serve.log."""
    log = (tmp_path / "serve.log").open("w")
    process = subprocess.Popen(
        [*HLSVAULT, "serve", "--port", str(hlsvault.port)], env=hlsvault.env,
        stdout=log, stderr=subprocess.STDOUT,
    )
    try:
        wait_for_http(f"{hlsvault.public_url}/healthz")
        yield hlsvault
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


@pytest.fixture(scope="session")
def moto_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoServer]:
    """One moto server for the session; every test makes buckets of its own."""
    server = MotoServer(tmp_path_factory.mktemp("moto") / "moto.log")
    server.start()
    yield server
    server.stop()


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
    with sync_playwright() as playwright:
        launched = launch_chromium(playwright)
        yield launched
        launched.close()


def pytest_configure(config: pytest.Config) -> None:
    if shutil.which("ffmpeg") is None or shutil.which("ffprobe") is None:
        raise pytest.UsageError("ffmpeg and ffprobe are required: apt-get install -y ffmpeg")
