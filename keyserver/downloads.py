"""Where a download's 302 points: a short-lived signed URL of the version's MP4.

- With CloudFront signing configured: a canned-policy signed URL on the CDN (one exact URL,
  one expiry), which CloudFront checks before it reads the private origin.
- Else, with an ``s3://`` origin: an S3 presigned GET (computed locally, no request).
- Else, in embedded mode: ``/cdn/downloads/…?expires=…&signature=…``, an HMAC under a key
  derived from the master key, which the embedded server checks (:class:`EmbeddedDownloads`);
  the rest of ``/cdn/`` never serves ``downloads/``.

Every one of them answers with ``Content-Disposition: attachment`` and serves ``Range``
requests, so a download can be resumed (with a fresh 302 once the URL has expired).
"""

from __future__ import annotations

import hashlib
import hmac
import time
from pathlib import Path
from typing import Any

from starlette.requests import Request
from starlette.responses import FileResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

from pipeline import layout
from pipeline.cdnsign import CdnSigner
from pipeline.errors import ConfigurationError
from pipeline.settings import Settings
from pipeline.storage import LocalStore, Store

from .responses import error

#: A download URL lives an hour at most (and never past the token): long enough to fetch a
#: film, short enough that a shared link soon stops working. A resumed download asks again.
DOWNLOAD_URL_TTL_S = 3600
#: The embedded signature's query parameters.
EXPIRES_PARAM, SIGNATURE_PARAM = "expires", "signature"
_EMBEDDED_KEY_LABEL = b"hlsvault-embedded-downloads"


def download_expiry(token_expires_at: int, *, now: float | None = None) -> int:
    moment = int(time.time() if now is None else now)
    return min(int(token_expires_at), moment + DOWNLOAD_URL_TTL_S)


class EmbeddedSignatures:
    """HMAC-SHA256 signatures of embedded download paths, under a key of their own derived
    from the master key (so a signature says nothing about the master key)."""

    def __init__(self, master_key: bytes) -> None:
        self._key = hmac.new(master_key, _EMBEDDED_KEY_LABEL, hashlib.sha256).digest()

    def sign(self, key: str, expires_at: int) -> str:
        return hmac.new(self._key, f"{key}\n{expires_at}".encode(), hashlib.sha256).hexdigest()

    def valid(self, key: str, expires: str, signature: str, *, now: float | None = None) -> bool:
        if not (expires.isascii() and expires.isdigit() and len(expires) <= 12):
            return False
        if int(expires) <= (time.time() if now is None else now):
            return False
        return hmac.compare_digest(self.sign(key, int(expires)), signature)


class DownloadLinks:
    """Makes the signed URL a download's 302 points at, the one way this deployment allows."""

    def __init__(
        self, settings: Settings, *, signer: CdnSigner | None, origin: Store | None
    ) -> None:
        self.settings = settings
        self.signer = signer
        self.origin = origin
        self.embedded = EmbeddedSignatures(settings.master_key)

    @property
    def method(self) -> str:
        if self.signer is not None:
            return "cloudfront"
        if self.origin is not None and self.origin.url.startswith("s3://"):
            return "s3"
        if isinstance(self.origin, LocalStore) and self.settings.embedded:
            return "embedded"
        return "none"

    def url(self, asset: str, version: str, key: str, *, expires_at: int) -> str:
        """The signed URL of the download at origin ``key``; ConfigurationError (503) when
        this deployment has no way to sign one."""
        method = self.method
        if method == "cloudfront":
            assert self.signer is not None  # noqa: S101 - method says so
            return self.signer.canned_url(
                layout.cdn_url(self.settings.cdn_url, key), expires_at=expires_at
            )
        if method == "s3":
            from pipeline.storage.s3 import S3Store

            assert isinstance(self.origin, S3Store)  # noqa: S101 - method says so
            return self.origin.presigned_get(
                key, expires_in=max(1, expires_at - int(time.time())),
                content_disposition=layout.download_disposition(asset),
            )
        if method == "embedded":
            query = (f"?{EXPIRES_PARAM}={expires_at}"
                     f"&{SIGNATURE_PARAM}={self.embedded.sign(key, expires_at)}")
            return layout.embedded_download_url(self.settings.public_url, asset, version, query)
        raise ConfigurationError(
            "downloads need a way to sign their URL: set HLSVAULT_CLOUDFRONT_KEY_PAIR_ID and "
            "HLSVAULT_CLOUDFRONT_PRIVATE_KEY, or use an s3:// HLSVAULT_ORIGIN"
        )


class EmbeddedDownloads:
    """Embedded mode's ``/cdn/downloads/…``: served only with a valid, unexpired signature;
    ``Range`` requests answered 206 (Starlette's FileResponse)."""

    def __init__(self, origin: LocalStore, signatures: EmbeddedSignatures) -> None:
        self.origin = origin
        self.signatures = signatures

    async def serve(self, request: Request) -> Response:
        asset = request.path_params["asset"]
        version = request.path_params["version"]
        name = request.path_params["name"]
        if (
            not layout.ASSET_ID_PATTERN.fullmatch(asset)
            or not layout.VERSION_PATTERN.fullmatch(version)
            or name != layout.download_file_name(asset)
        ):
            return error(404, "not found")
        key = layout.download_key(asset, version)
        query = request.query_params
        if not self.signatures.valid(
            key, query.get(EXPIRES_PARAM, ""), query.get(SIGNATURE_PARAM, "")
        ):
            return error(403, "download link missing, expired or not signed by this server; "
                              "ask /v1/downloads/{asset} for a new one")
        path = self.origin.local_path(key)
        if path is None or not Path(path).is_file():
            return error(404, "not found")
        return FileResponse(
            path, media_type="video/mp4", filename=layout.download_file_name(asset),
            content_disposition_type="attachment", headers={"Cache-Control": "private, no-store"},
        )


class NoDownloadsInStatic:
    """The embedded /cdn/ static files, minus ``downloads/``: those are private, and only the
    signed route above serves them (whatever path spelling reaches this mount)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope.get("path", "")
        root: str = scope.get("root_path", "")
        inner = path[len(root):] if root and path.startswith(root) else path
        parts = [part for part in inner.split("/") if part not in ("", ".")]
        if parts and parts[0].lower().startswith("downloads"):
            await error(404, "not found")(scope, receive, send)
            return
        await self.app(scope, receive, send)


def static_files(root: Any) -> ASGIApp:
    from starlette.staticfiles import StaticFiles

    return NoDownloadsInStatic(StaticFiles(directory=root))
