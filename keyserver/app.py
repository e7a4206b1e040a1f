"""The key server's ASGI app, built by :func:`create_app` from explicit settings.

    GET /v1/assets/{asset}/master.m3u8?token=…        master playlist
    GET /v1/assets/{asset}/{rendition}.m3u8?token=…   variant playlist for one rendition
    GET /v1/keys/{asset}/{version}/{index}?token=…    the 16 key bytes
    GET /cdn/…                                        embedded mode only: the local origin
    GET /healthz

401 for a missing, malformed, forged or expired token; 403 for a token of another asset;
404 for an unknown asset, rendition or key; 400 for malformed path values.
"""

from __future__ import annotations

import mimetypes
import re
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

import structlog
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Receive, Scope, Send

from pipeline.catalog import Catalog
from pipeline.errors import BadSpec
from pipeline.keys import MAX_KEY_INDEX, KeyUnwrapError, KeyVault, check_asset_id, check_version
from pipeline.playlists import (
    AssetVersion,
    PublishedSegment,
    RenditionEntry,
    render_master,
    render_variant,
)
from pipeline.settings import Settings
from pipeline.storage import LocalStore, ObjectNotFound, Store, open_store
from pipeline.tokens import TokenForbidden, TokenRejected, verify_token

from .cache import VersionCache

log = structlog.get_logger("hlsvault.keyserver")
audit = structlog.get_logger("hlsvault.audit")

PLAYLIST_TYPE = "application/vnd.apple.mpegurl"
NO_STORE = {"Cache-Control": "no-store"}
_RENDITION = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_INDEX = re.compile(r"^[0-9]{1,7}$")


def _error(status: int, message: str) -> Response:
    return JSONResponse({"error": message}, status_code=status, headers=NO_STORE)


def _token(request: Request) -> str:
    token = request.query_params.get("token", "")
    if not token:
        auth = request.headers.get("authorization", "")
        if auth.lower().startswith("bearer "):
            token = auth[7:].strip()
    return token


class KeyServer:
    """Route handlers over the catalog and the key vault."""

    def __init__(self, settings: Settings, *, catalog: Catalog, keys: KeyVault) -> None:
        self.settings = settings
        self.catalog = catalog
        self.keys = keys
        self.versions = VersionCache(catalog)

    def _authorise(self, request: Request, asset: str) -> Response | None:
        try:
            verify_token(
                _token(request),
                self.settings.token_secret,
                asset=asset,
                max_ttl_s=self.settings.token_max_ttl_s,
            )
        except TokenForbidden as error:
            return _error(403, str(error))
        except TokenRejected as error:
            return _error(401, str(error))
        return None

    def _current(self, asset: str) -> AssetVersion | None:
        return self.versions.current(asset)

    async def master(self, request: Request) -> Response:
        asset = request.path_params["asset"]
        if not _valid_asset(asset):
            return _error(400, "malformed asset id")
        denied = self._authorise(request, asset)
        if denied:
            return denied
        described = self._current(asset)
        if described is None:
            return _error(404, "unknown asset")
        token = quote(_token(request), safe="")

        def variant_uri(rendition: RenditionEntry) -> str:
            return (
                f"{self.settings.public_url}/v1/assets/{asset}/{rendition.name}.m3u8?token={token}"
            )

        body = render_master(described, variant_uri=variant_uri)
        return PlainTextResponse(body, media_type=PLAYLIST_TYPE, headers=NO_STORE)

    async def variant(self, request: Request) -> Response:
        asset = request.path_params["asset"]
        name = request.path_params["rendition"]
        if not _valid_asset(asset) or not _RENDITION.fullmatch(name):
            return _error(400, "malformed asset id or rendition")
        denied = self._authorise(request, asset)
        if denied:
            return denied
        described = self._current(asset)
        if described is None:
            return _error(404, "unknown asset")
        rendition = described.rendition(name)
        if rendition is None:
            return _error(404, "unknown rendition")
        token = quote(_token(request), safe="")
        cdn = self.settings.cdn_url
        version = described.version
        keys_base = f"{self.settings.public_url}/v1/keys/{asset}/{version}"

        def segment_uri(segment: PublishedSegment) -> str:
            return f"{cdn}/assets/{asset}/{version}/{name}/{segment.name}"

        def key_uri(index: int) -> str:
            return f"{keys_base}/{index}?token={token}"

        body = render_variant(described, rendition, segment_uri=segment_uri, key_uri=key_uri)
        return PlainTextResponse(body, media_type=PLAYLIST_TYPE, headers=NO_STORE)

    async def key(self, request: Request) -> Response:
        asset = request.path_params["asset"]
        version = request.path_params["version"]
        raw_index = request.path_params["index"]
        client = request.client.host if request.client else None
        if not _valid_asset(asset) or not _valid_version(version) or not _INDEX.fullmatch(raw_index):
            return _error(400, "malformed key path")
        index = int(raw_index)
        if index > MAX_KEY_INDEX:
            return _error(400, "malformed key path")
        denied = self._authorise(request, asset)
        if denied:
            audit.info(
                "key request",
                asset=asset,
                key_id=f"{version}/{index}",
                client_ip=client,
                outcome=f"denied {denied.status_code}",
            )
            return denied
        try:
            key = self.keys.get(asset, version, index)
        except ObjectNotFound:
            audit.info(
                "key request",
                asset=asset,
                key_id=f"{version}/{index}",
                client_ip=client,
                outcome="unknown key",
            )
            return _error(404, "unknown key")
        except KeyUnwrapError:
            log.error("wrapped key does not authenticate", asset=asset, key_id=f"{version}/{index}")
            return _error(500, "key unavailable")
        audit.info(
            "key request",
            asset=asset,
            key_id=f"{version}/{index}",
            client_ip=client,
            outcome="served",
        )
        return Response(key, media_type="application/octet-stream", headers=NO_STORE)

    async def healthz(self, request: Request) -> Response:
        return JSONResponse({"status": "ok"})


def _valid_asset(asset: str) -> bool:
    try:
        check_asset_id(asset)
        return True
    except BadSpec:
        return False


def _valid_version(version: str) -> bool:
    try:
        check_version(version)
        return True
    except BadSpec:
        return False


class CdnHeaders:
    """Give the embedded /cdn/ the headers a CDN origin would: immutable segments."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def send_with_headers(message: Any) -> None:
            if message["type"] == "http.response.start" and message["status"] in (200, 206):
                headers = list(message.get("headers", []))
                headers.append((b"cache-control", b"public, max-age=31536000, immutable"))
                message["headers"] = headers
            await send(message)

        await self.app(scope, receive, send_with_headers)


class AccessLog:
    """One structured line per request; the query string (which holds tokens) is never logged."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def record_status(message: Any) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, record_status)
        finally:
            log.info(
                "request",
                method=scope["method"],
                path=scope["path"],
                status=status,
                ms=round((time.perf_counter() - started) * 1000, 2),
            )


def create_app(
    settings: Settings, *, vault: Store | None = None, origin: Store | None = None
) -> Starlette:
    """Build the key server for ``settings``; stores may be passed in (tests, embedding)."""
    vault = vault if vault is not None else open_store(settings.vault)
    server = KeyServer(settings, catalog=Catalog(vault), keys=KeyVault(vault, settings.master_key))
    routes: list[Route | Mount] = [
        Route("/healthz", server.healthz),
        Route("/v1/assets/{asset}/master.m3u8", server.master),
        Route("/v1/assets/{asset}/{rendition}.m3u8", server.variant),
        Route("/v1/keys/{asset}/{version}/{index}", server.key),
    ]
    if settings.embedded:
        origin = origin if origin is not None else open_store(settings.origin)
        if isinstance(origin, LocalStore):
            mimetypes.add_type("video/mp2t", ".ts")
            Path(origin.root).mkdir(parents=True, exist_ok=True)
            cdn = CdnHeaders(StaticFiles(directory=origin.root))
            routes.append(Mount("/cdn", app=cdn))
    app = Starlette(routes=routes)
    app.add_middleware(AccessLog)
    return app
