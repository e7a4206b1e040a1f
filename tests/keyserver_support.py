"""What the key server's tests share: one packaged library, an in-process client, and helpers
that read what a player reads (playlist URIs, cookies, JSON errors).

The library is packaged by the real CLI once per test session (:func:`shared_library`): ``film``
twice (an older and a current version) and ``film-b`` once, 2 s segments with a new key every
two, so three segments and two keys per version. Tests that change the catalog work on a
private copy (:meth:`Library.copy`). Apps are built by ``keyserver.create_app`` from
``load_settings`` over that vault; :class:`AppClient` reaches one through httpx's ASGI
transport from a chosen client address, lifespan included, as uvicorn would run it.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, replace
from functools import partial
from http.cookies import Morsel, SimpleCookie
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx
import pytest
from anyio.from_thread import BlockingPortal, start_blocking_portal

from keyserver import create_app
from keyserver.ratelimit import WINDOW_S, RateLimiter
from pipeline import layout
from pipeline.keys import KeyVault
from pipeline.settings import Settings, load_settings
from pipeline.storage import LocalStore
from pipeline.tokens import mint_token

from support import CLI_TIMEOUT_S, HLSVAULT, ROOT

ASSET = "film"
OTHER = "film-b"
VIEWER_IP = "198.51.100.20"
OTHER_IP = "198.51.100.99"
#: What the library is packaged with: three 2 s segments, a new key every two segments.
PACKAGE_OPTIONS = ("--ladder", "copy", "--key-rotation-segments", "2", "--segment-seconds", "2")
_KEY_URI = re.compile(r'#EXT-X-KEY:METHOD=AES-128,URI="([^"]+)"')
#: Rate limits count in fixed one-minute windows; a test sending a burst near a window's end
#: waits for the next one rather than see its count reset halfway.
WINDOW_MARGIN_S = 5.0


class AppClient:
    """httpx over ASGITransport into the app, from one client address, called synchronously
    through an anyio portal: one event loop (and one cookie jar) for the client's whole life.
    The app's lifespan runs for as long as the client does."""

    def __init__(
        self, app: Any, *, client_ip: str, base_url: str = "https://keys.test",
        raise_app_exceptions: bool = True,
    ) -> None:
        self.app = app
        transport = httpx.ASGITransport(app=app, client=(client_ip, 50000),
                                        raise_app_exceptions=raise_app_exceptions)
        self.http = httpx.AsyncClient(
            transport=transport, base_url=base_url, follow_redirects=False, timeout=10
        )
        self._stack = ExitStack()
        self._portal: BlockingPortal | None = None

    def __enter__(self) -> AppClient:
        self._portal = self._stack.enter_context(start_blocking_portal())
        self._stack.enter_context(
            self._portal.wrap_async_context_manager(self.app.router.lifespan_context(self.app))
        )
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

    @property
    def origin(self) -> Path:
        return Path(self.settings.origin)

    def app(self, *, limiter: RateLimiter | None = None, **env: str) -> Any:
        settings = load_settings({**self.env, **env})
        return create_app(settings, vault=self.vault, limiter=limiter)

    def token(self, asset: str = ASSET, *, ttl: int = 600, **claims: Any) -> str:
        return mint_token(self.settings.token_secret, asset, ttl, **claims)

    def version_of(self, asset: str) -> str:
        return self.version if asset == ASSET else self.other_version

    def key_path(self, index: int = 0, *, asset: str = ASSET, version: str | None = None) -> str:
        return f"/v1/keys/{asset}/{version or self.version_of(asset)}/{index}"

    def key(self, index: int = 0, *, asset: str = ASSET, version: str | None = None) -> bytes:
        return self.keys[(asset, version or self.version_of(asset), index)]

    def master_path(self, asset: str = ASSET) -> str:
        return f"/v1/assets/{asset}/master.m3u8"

    def variant_path(self, asset: str = ASSET) -> str:
        return f"/v1/assets/{asset}/{self.rendition}.m3u8"

    def retire_until(self, version: str, deadline: float, asset: str = ASSET) -> None:
        """Set ``version``'s grace deadline in the stored state document, as time passing (or
        a re-key with that grace) would: the key server sees only what the vault says."""
        path = Path(self.settings.vault) / layout.state_key(asset)
        state = json.loads(path.read_text())
        state["retired"][version] = deadline
        self.vault.put_bytes(layout.state_key(asset), json.dumps(state).encode())

    def copy(self, directory: Path) -> Library:
        """A private copy (same secrets, versions and keys) for a test that changes it."""
        data_dir = directory / "data"
        shutil.copytree(self.data_dir, data_dir)
        return replace(self, env={**self.env, "HLSVAULT_DATA_DIR": str(data_dir)},
                       data_dir=data_dir)


def isolated_env(data_dir: Path) -> dict[str, str]:
    """The test process's environment without any hlsvault setting, on ``data_dir``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HLSVAULT_", "REDIS_URL"))}
    env.update(HLSVAULT_DATA_DIR=str(data_dir), PYTHONPATH=str(ROOT))
    return env


def package(env: dict[str, str], clip: Path, asset: str) -> dict[str, Any]:
    """`hlsvault package … --json` of ``clip`` as ``asset``; its summary."""
    done = subprocess.run(
        [*HLSVAULT, "package", str(clip), "--asset", asset, *PACKAGE_OPTIONS, "--json"],
        env=env, capture_output=True, text=True, timeout=CLI_TIMEOUT_S, check=False,
        cwd=Path(env["HLSVAULT_DATA_DIR"]).parent,
    )
    assert done.returncode == 0, done.stderr
    summary: dict[str, Any] = json.loads(done.stdout)
    return summary


def package_library(data_dir: Path, clip: Path) -> Library:
    data_dir.parent.mkdir(parents=True, exist_ok=True)
    env = isolated_env(data_dir)
    old = package(env, clip, ASSET)
    current = package(env, clip, ASSET)
    other = package(env, clip, OTHER)
    assert old["version"] != current["version"]
    settings = load_settings(env)
    vault = KeyVault(LocalStore(Path(settings.vault)), settings.master_key)
    versions = [(ASSET, old["version"]), (ASSET, current["version"]), (OTHER, other["version"])]
    keys = {(a, v, i): vault.get(a, v, i) for a, v in versions for i in (0, 1)}
    return Library(
        env=env, data_dir=data_dir, old_version=old["version"], version=current["version"],
        other_version=other["version"], rendition=current["renditions"][0]["name"], keys=keys,
    )


def shared_library(tmp_path_factory: pytest.TempPathFactory, clip: Path) -> Library:
    """The session's library, packaged on first use. Read-only: a test that changes it works
    on :meth:`Library.copy`."""
    return _library_in(tmp_path_factory.getbasetemp(), clip)


@functools.cache  # one entry per session: the base temp directory is the session's own
def _library_in(session_dir: Path, clip: Path) -> Library:
    return package_library(session_dir / "library" / "data", clip)


def wait_for_fresh_window() -> None:
    """Sleep into the next rate-limit window if this one ends within WINDOW_MARGIN_S."""
    left = WINDOW_S - time.time() % WINDOW_S
    if left < WINDOW_MARGIN_S:
        time.sleep(left + 0.05)


# -- what a player reads ---------------------------------------------------------------------


def uris(playlist: str) -> list[str]:
    """The URI lines of a playlist (variants of a master, segments of a variant)."""
    return [line for line in playlist.splitlines() if line and not line.startswith("#")]


def key_uris(playlist: str) -> list[str]:
    return _KEY_URI.findall(playlist)


def set_cookies(response: httpx.Response) -> dict[str, Morsel[str]]:
    """The response's Set-Cookie headers, by cookie path."""
    found = {}
    for header in response.headers.get_list("set-cookie"):
        cookie: SimpleCookie = SimpleCookie()
        cookie.load(header)
        for morsel in cookie.values():
            found[morsel["path"]] = morsel
    return found


def tamper(token: str) -> str:
    """Flip a character in the middle of the signature (not the last one: its low bits are
    base64 padding, and changing only those leaves the signature intact)."""
    head, _, signature = token.rpartition(".")
    i = len(signature) // 2
    flipped = "A" if signature[i] != "A" else "B"
    return f"{head}.{signature[:i]}{flipped}{signature[i + 1:]}"


def assert_json_error(response: httpx.Response, status: int) -> str:
    """``response`` is the JSON error the docs promise (status, ``{"error": …}``, no-store);
    its message."""
    assert response.status_code == status, (response.status_code, response.text[:200])
    assert response.headers["content-type"] == "application/json", response.headers
    assert response.headers["cache-control"] == "no-store", response.headers
    body = response.json()
    assert isinstance(body, dict) and isinstance(body.get("error"), str) and body["error"], body
    message: str = body["error"]
    return message
