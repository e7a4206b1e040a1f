"""The browser tests' harness: hls.js in Debian's chromium, driven by Playwright.

:class:`PlayerPageServer` serves ``tests/browser/player.html`` and hls.js (installed from npm by
``scripts/setup.sh``) on a free 127.0.0.1 port of its own, so the page is a different origin than
the key server, as a viewer app would be, and every key server response must pass CORS.
:class:`Player` opens that page in a browser tab and reads back what the page recorded in
``window.player``: the first fatal error, failed loads, the playback position and the frame size.
"""

from __future__ import annotations

import json
import re
import threading
from dataclasses import asdict, dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit

from playwright.sync_api import Browser, Page, Playwright, Request, Response

from support import evidence_path

ROOT = Path(__file__).resolve().parent.parent
PLAYER_DIR = Path(__file__).resolve().parent / "browser"
PLAYER_HTML = PLAYER_DIR / "player.html"
HLS_JS = ROOT / "dashboard" / "static" / "node_modules" / "hls.js" / "dist" / "hls.min.js"
#: Debian's chromium: test tools may not download browsers, so Playwright drives this one.
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless=new",
    "--no-sandbox",  # root in CI containers, where the setuid sandbox is unavailable
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--autoplay-policy=no-user-gesture-required",
    "--mute-audio",
]
#: Launching chromium takes about a second; a minute means it hung.
LAUNCH_TIMEOUT_MS = 60_000
#: The page path under which :meth:`Player.open_same_origin` intercepts requests.
SAME_ORIGIN_PREFIX = "/__player__"
#: True once the page saw a refusal: a failed manifest or key load, or a fatal error. Playback
#: counts too, so that a player wrongly let in is caught at once rather than by the timeout.
_REFUSED = """() => window.player && (window.player.fatal || window.player.currentTime > 0
    || window.player.failedLoads.some(load => ["manifest", "key"].includes(load.kind)))"""
#: A token in a query string, also URL-encoded inside another URL's (the player page's ?src=).
_TOKEN = re.compile(r"(token(?:=|%3D))[A-Za-z0-9_.-]+")


def redact(url: str) -> str:
    """``url`` with its token elided: artifacts and assertion messages never hold a token."""
    return _TOKEN.sub(r"\1…", url)


def check_installed() -> None:
    """Fail with the mend in the message when chromium or hls.js is not installed."""
    missing = [str(path) for path in (CHROMIUM, HLS_JS) if not path.exists()]
    if missing:
        raise RuntimeError(
            f"browser tests need {' and '.join(missing)}; run scripts/setup.sh "
            "(it installs chromium with apt-get and hls.js with npm ci)"
        )


def launch_chromium(playwright: Playwright) -> Browser:
    check_installed()
    return playwright.chromium.launch(
        executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, timeout=LAUNCH_TIMEOUT_MS
    )


_PAGE_FILES = {
    "/player.html": (PLAYER_HTML, "text/html; charset=utf-8"),
    "/hls.min.js": (HLS_JS, "text/javascript; charset=utf-8"),
}


class _PageHandler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        served = _PAGE_FILES.get(urlsplit(self.path).path)
        if served is None:
            self.send_error(HTTPStatus.NOT_FOUND)
            return
        path, content_type = served
        body = path.read_bytes()
        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: the tests record what the browser fetched themselves."""


class PlayerPageServer:
    """The player page and hls.js, served from ``http://127.0.0.1:<free port>``."""

    def __init__(self) -> None:
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _PageHandler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="player-page-server", daemon=True
        )

    @property
    def origin(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def player_url(self, src: str, *, credentials: bool = False, rate: float = 1.0) -> str:
        query = _player_query(src, credentials=credentials, rate=rate)
        return f"{self.origin}/player.html?{query}"


def _player_query(src: str, *, credentials: bool, rate: float) -> str:
    return urlencode({"src": src, "credentials": "1" if credentials else "0", "rate": f"{rate:g}"})


@dataclass(frozen=True)
class PlayerState:
    """What the page recorded in ``window.player``."""

    current_time: float
    video_width: int
    video_height: int
    playing: bool
    fatal: dict[str, Any] | None
    failed_loads: list[dict[str, Any]]
    errors: list[dict[str, Any]]
    hls_version: str | None

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> PlayerState:
        return cls(
            current_time=float(raw["currentTime"]),
            video_width=int(raw["videoWidth"]),
            video_height=int(raw["videoHeight"]),
            playing=bool(raw["playing"]),
            fatal=raw["fatal"],
            failed_loads=list(raw["failedLoads"]),
            errors=list(raw["errors"]),
            hls_version=raw["hlsVersion"],
        )

    def failed(self, kind: str) -> list[dict[str, Any]]:
        """Failed loads of one kind: ``manifest``, ``playlist``, ``key`` or ``segment``."""
        return [load for load in self.failed_loads if load["kind"] == kind]


@dataclass(frozen=True)
class Fetch:
    """One request the page made: its status, or why it failed (CORS, refused connection)."""

    method: str
    url: str  # token redacted
    status: int | None
    failure: str | None = None

    def __str__(self) -> str:
        outcome = self.status if self.failure is None else f"FAILED ({self.failure})"
        return f"{outcome} {self.method} {self.url}"


@dataclass
class Player:
    """One browser tab with the player page, and what the browser saw while it played."""

    page: Page
    network: list[Fetch] = field(default_factory=list)
    console: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.page.on("response", self._on_response)
        self.page.on("requestfailed", self._on_request_failed)
        self.page.on("console", lambda message: self.console.append(
            f"{message.type}: {redact(message.text)}"))
        self.page.on("pageerror", lambda error: self.console.append(f"pageerror: {error}"))

    def __repr__(self) -> str:
        return f"Player({redact(self.page.url)})"

    def _on_response(self, response: Response) -> None:
        self.network.append(Fetch(response.request.method, redact(response.url), response.status))

    def _on_request_failed(self, request: Request) -> None:
        self.network.append(Fetch(request.method, redact(request.url), None, request.failure))

    def fetched(self, path_part: str, *, status: int = 200) -> list[str]:
        """URLs (tokens redacted) answered with ``status`` whose path contains ``path_part``."""
        return [fetch.url for fetch in self.network
                if fetch.status == status and path_part in urlsplit(fetch.url).path]

    def open(self, url: str) -> None:
        self.page.goto(url, wait_until="load")

    def open_same_origin(
        self, origin: str, src: str, *, credentials: bool = False, rate: float = 1.0
    ) -> None:
        """Open the player as if ``origin`` (the key server) served it: no CORS involved.

        The page and hls.js are answered by Playwright from the files; every other request
        goes to the network. This tells a broken harness apart from missing CORS headers.
        """
        files = {f"{origin}{SAME_ORIGIN_PREFIX}{path}": served
                 for path, served in _PAGE_FILES.items()}

        def fulfil(route: Any) -> None:
            path, content_type = files[route.request.url.split("?", 1)[0]]
            route.fulfill(status=200, body=path.read_bytes(), content_type=content_type)

        for url in files:
            self.page.route(f"{url}*", fulfil)
        query = _player_query(src, credentials=credentials, rate=rate)
        self.open(f"{origin}{SAME_ORIGIN_PREFIX}/player.html?{query}")

    def state(self) -> PlayerState:
        raw = self.page.evaluate("() => window.player")
        if raw is None:
            raise AssertionError(f"the player page did not start; console: {self.console}")
        return PlayerState.from_dict(raw)

    def wait_until_played(self, seconds: float, *, timeout_s: float) -> PlayerState:
        """Wait until playback passes ``seconds`` or a fatal error; the state then."""
        self.page.wait_for_function(
            "s => window.player && (window.player.currentTime > s || window.player.fatal)",
            arg=seconds, timeout=timeout_s * 1000, polling=100,
        )
        return self.state()

    def wait_for_refusal(self, *, timeout_s: float) -> PlayerState:
        """Wait until a manifest or key load fails, hls.js gives up, or (wrongly) playback
        starts; the state then."""
        self.page.wait_for_function(_REFUSED, timeout=timeout_s * 1000, polling=100)
        return self.state()

    def describe(self) -> str:
        """Everything a failing assertion should show: state, network, console."""
        try:
            state: Any = asdict(self.state())
        except Exception as error:  # a description for a failure message must not raise
            state = f"unreadable: {error}"
        return json.dumps(
            {"state": state, "network": [str(fetch) for fetch in self.network],
             "console": self.console[-20:]}, indent=1
        )

    def save_evidence(self, nodeid: str) -> Path:
        """A screenshot and the description of the test ``nodeid`` under
        test-artifacts/browser/ (:func:`support.evidence_path`); the PNG's path."""
        screenshot = evidence_path("browser", nodeid, ".png")
        self.page.screenshot(path=str(screenshot))
        evidence_path("browser", nodeid, ".json").write_text(self.describe() + "\n")
        return screenshot
