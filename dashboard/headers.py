"""Security headers on every response of the ops app, whatever route or middleware made it.

The pages have state-changing buttons (Retry, Cancel), so no other site may frame them
(``X-Frame-Options`` and CSP ``frame-ancestors``). The policy allows scripts and styles from the
app's own ``/static/`` only, so the pages carry no inline script or style at all; the preview
player may reach the key server (playlists and keys) and the CDN (segments), and play what
hls.js feeds the video element through Media Source Extensions (``blob:`` URLs).
"""

from __future__ import annotations

from collections.abc import Iterable
from urllib.parse import urlsplit

from starlette.types import ASGIApp, Message, Receive, Scope, Send


def origin_of(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


def content_security_policy(player_origins: Iterable[str]) -> str:
    """The ops app's policy; ``player_origins`` are where the preview player fetches from."""
    connect = " ".join(["'self'", *sorted(set(player_origins))])
    return "; ".join([
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self'",
        f"connect-src {connect}",
        "media-src 'self' blob:",
        # hls.js runs its demuxer in a worker made from a blob: URL when it may.
        "worker-src blob:",
        "frame-ancestors 'none'",
        "base-uri 'none'",
        "form-action 'self'",
    ])


class SecurityHeaders:
    """Adds ``headers`` to every HTTP response that does not set them itself."""

    def __init__(self, app: ASGIApp, *, csp: str) -> None:
        self.app = app
        self.headers = [
            (b"content-security-policy", csp.encode()),
            (b"x-frame-options", b"DENY"),
            (b"x-content-type-options", b"nosniff"),
            # The key server never learns the ops app's URLs from a preview's requests.
            (b"referrer-policy", b"same-origin"),
        ]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                present = {name.lower() for name, _ in message.get("headers", [])}
                extra = [(n, v) for n, v in self.headers if n not in present]
                message["headers"] = [*message.get("headers", []), *extra]
            await send(message)

        await self.app(scope, receive, with_headers)
