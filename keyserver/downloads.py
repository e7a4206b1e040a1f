"""Where a download's 302 points: a short-lived signed URL of the version's MP4; and the URL
of each thumbnail sheet a thumbnail track names, made the same way (both are clear files in the
origin's private prefixes, ``layout.PRIVATE_ORIGIN_DIRS``).

- With CloudFront signing configured: a canned-policy signed URL on the CDN (one exact URL,
  one expiry), which CloudFront checks before it reads the private origin.
- Else, with an ``s3://`` origin: an S3 presigned GET (computed locally, no request).
- Else, in embedded mode: ``/cdn/downloads/…?expires=…&signature=…``, an HMAC under a key
  derived from the master key, which the embedded server checks (:class:`EmbeddedDownloads`,
  :class:`EmbeddedThumbnails`); the rest of ``/cdn/`` never serves ``downloads/`` or
  ``thumbnails/``.

Every one of them answers with ``Content-Disposition: attachment`` and serves ``Range``
requests, so a download can be resumed (with a fresh 302 once the URL has expired).
"""

from __future__ import annotations

import hashlib
import hmac
import re
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
from pipeline.storage import LocalStore, Store, is_s3_url

from .responses import error

#: A download URL lives an hour at most (and never past the token): long enough to fetch a
#: film, short enough that a shared link soon stops working. A resumed download asks again.
DOWNLOAD_URL_TTL_S = 3600
#: The embedded signature's query parameters.
EXPIRES_PARAM, SIGNATURE_PARAM = "expires", "signature"
_EMBEDDED_KEY_LABEL = b"hlsvault-embedded-downloads"
#: A thumbnail sheet's file name (``layout.thumbnail_sheet_name``).
_SHEET = re.compile(r"sheet_[0-9]{3,6}\.jpg")


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
        if self.origin is not None and is_s3_url(self.origin.url):
            return "s3"
        if isinstance(self.origin, LocalStore) and self.settings.embedded:
            return "embedded"
        return "none"

    def url(self, asset: str, version: str, key: str, *, expires_at: int) -> str:
        """The signed URL of the download at origin ``key``; ConfigurationError (503) when
        this deployment has no way to sign one."""
        return self.signed(key, expires_at=expires_at, what="downloads",
                           disposition=layout.download_disposition(asset))

    def sheet_url(self, asset: str, version: str, sheet: str, *, expires_at: int) -> str:
        """The signed URL of a thumbnail sheet; ConfigurationError (503) likewise."""
        return self.signed(layout.thumbnail_sheet_key(asset, version, sheet),
                           expires_at=expires_at, what="thumbnails")

    def signed(self, key: str, *, expires_at: int, what: str,
               disposition: str | None = None) -> str:
        """A signed URL of the private origin file ``key``, valid until ``expires_at``, the
        one way this deployment allows."""
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
                content_disposition=disposition,
            )
        if method == "embedded":
            query = (f"?{EXPIRES_PARAM}={expires_at}"
                     f"&{SIGNATURE_PARAM}={self.embedded.sign(key, expires_at)}")
            return layout.embedded_origin_url(self.settings.public_url, key, query)
        raise ConfigurationError(
            f"{what} need a way to sign their URL: set HLSVAULT_CLOUDFRONT_KEY_PAIR_ID and "
            "HLSVAULT_CLOUDFRONT_PRIVATE_KEY, or use an s3:// HLSVAULT_ORIGIN"
        )


class EmbeddedDownloads:
    """Embedded mode's ``/cdn/downloads/…``: served only with a valid, unexpired signature;
    ``Range`` requests answered 206 (Starlette's FileResponse)."""

    #: What a refused request is told to do.
    ask_again = "download link missing, expired or not signed by this server; ask " \
                "/v1/downloads/{asset} for a new one"

    def __init__(self, origin: LocalStore, signatures: EmbeddedSignatures) -> None:
        self.origin = origin
        self.signatures = signatures

    def origin_key(self, asset: str, version: str, name: str) -> str | None:
        """The origin key a path names, or None when it names no file of this kind."""
        if name != layout.download_file_name(asset):
            return None
        return layout.download_key(asset, version)

    def answer(self, path: Path, asset: str) -> Response:
        return FileResponse(
            path, media_type="video/mp4", filename=layout.download_file_name(asset),
            content_disposition_type="attachment", headers={"Cache-Control": "private, no-store"},
        )

    async def serve(self, request: Request) -> Response:
        asset = request.path_params["asset"]
        version = request.path_params["version"]
        name = request.path_params["name"]
        key = None
        if layout.ASSET_ID_PATTERN.fullmatch(asset) and layout.VERSION_PATTERN.fullmatch(version):
            key = self.origin_key(asset, version, name)
        if key is None:
            return error(404, "not found")
        query = request.query_params
        if not self.signatures.valid(
            key, query.get(EXPIRES_PARAM, ""), query.get(SIGNATURE_PARAM, "")
        ):
            return error(403, self.ask_again)
        path = self.origin.local_path(key)
        if path is None or not Path(path).is_file():
            return error(404, "not found")
        return self.answer(Path(path), asset)


class EmbeddedThumbnails(EmbeddedDownloads):
    """Embedded mode's ``/cdn/thumbnails/…``: a thumbnail sheet, served only with a valid,
    unexpired signature, as downloads are."""

    ask_again = "thumbnail sheet link missing, expired or not signed by this server; fetch " \
                "the thumbnail track again for new ones"

    def origin_key(self, asset: str, version: str, name: str) -> str | None:
        if not _SHEET.fullmatch(name):
            return None
        return layout.thumbnail_sheet_key(asset, version, name)

    def answer(self, path: Path, asset: str) -> Response:
        return FileResponse(path, media_type="image/jpeg",
                            headers={"Cache-Control": "private, no-store"})


class NoDownloadsInStatic:
    """The embedded /cdn/ static files, minus ``downloads/`` and ``thumbnails/``: those are
    private, and only the signed routes above serve them (whatever path spelling reaches this
    mount)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope.get("path", "")
        root: str = scope.get("root_path", "")
        inner = path[len(root):] if root and path.startswith(root) else path
        parts = [part for part in inner.split("/") if part not in ("", ".")]
        if parts and parts[0].lower().startswith(layout.PRIVATE_ORIGIN_DIRS):
            await error(404, "not found")(scope, receive, send)
            return
        await self.app(scope, receive, send)


def static_files(root: Any) -> ASGIApp:
    from starlette.staticfiles import StaticFiles

    return NoDownloadsInStatic(StaticFiles(directory=root))
