"""What a viewer takes away: the download redirect and the offline bundle.

Both are entitled the key route's way (:meth:`KeyServer._entitled`: 400, 429, 401/403, 404,
410, each refusal audited), then:

    GET /v1/downloads/{asset}   302 to a short-lived signed URL of the version's MP4
                                (:mod:`keyserver.downloads`), 404 when it has none
    GET /v1/offline/{asset}     an ``offline`` token only (403 otherwise): the version's
                                playlists and keys as one JSON bundle (:mod:`pipeline.offline`)
"""

from __future__ import annotations

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from pipeline import layout
from pipeline.errors import HlsvaultError
from pipeline.http import status_for
from pipeline.keys import KeyUnwrapError
from pipeline.offline import key_indices, offline_bundle
from pipeline.playlists import PublishedSegment, RenditionEntry
from pipeline.storage import ObjectNotFound

from .credentials import client_ip
from .downloads import download_expiry
from .responses import NO_STORE, error
from .server import KeyServer, log


class Exports:
    """The download and offline routes of one key server."""

    def __init__(self, server: KeyServer) -> None:
        self.server = server

    async def download(self, request: Request) -> Response:
        """302 to a short-lived signed URL of the current version's MP4."""
        asset = request.path_params["asset"]
        entitled = await self.server._entitled(request, asset, "download")
        if isinstance(entitled, Response):
            return entitled
        claims, described = entitled
        ip = client_ip(request)
        if described.download is None:
            await self.server._audit(asset, described.version, claims.sid, ip, "no download",
                              kind="download")
            return error(404, "this asset's current version has no download; package it with "
                              "--download")
        try:
            url = self.server.links.url(
                asset, described.version, described.download.key,
                expires_at=download_expiry(claims.expires_at),
            )
        except HlsvaultError as refused:
            await self.server._audit(asset, described.version, claims.sid, ip, "unavailable",
                              kind="download")
            return error(status_for(refused), str(refused))
        await self.server._audit(asset, described.version, claims.sid, ip, "redirected",
                                 kind="download")
        return Response(status_code=302, headers={**NO_STORE, "Location": url})

    async def offline(self, request: Request) -> Response:
        """The current version's playlists and keys, for an offline token only."""
        asset = request.path_params["asset"]
        entitled = await self.server._entitled(request, asset, "offline")
        if isinstance(entitled, Response):
            return entitled
        claims, described = entitled
        ip = client_ip(request)
        if not claims.offline:
            await self.server._audit(asset, described.version, claims.sid, ip, "denied 403",
                              kind="offline")
            return error(403, "not an offline token: mint one with the claim offline: true")
        version = described.version
        try:
            keys = {
                index: await run_in_threadpool(self.server.view.key, asset, version, index)
                for index in key_indices(described)
            }
        except ObjectNotFound:
            await self.server._audit(asset, version, claims.sid, ip, "unknown key", kind="offline")
            return error(404, "unknown key")
        except KeyUnwrapError:
            log.error("wrapped key does not authenticate", asset=asset, key_id=version)
            return error(500, "key unavailable")
        cdn = self.server.settings.cdn_url
        queries = {
            r.name: self.server._segment_query(asset, version, r.name, claims)
            for r in described.renditions
        }

        def segment_uri(rendition: RenditionEntry, segment: PublishedSegment) -> str:
            key = layout.segment_key(asset, version, rendition.name, segment.name)
            return layout.cdn_url(cdn, key) + queries[rendition.name]

        def init_uri(rendition: RenditionEntry, init: str) -> str:
            key = layout.segment_key(asset, version, rendition.name, init)
            return layout.cdn_url(cdn, key) + queries[rendition.name]

        bundle = offline_bundle(described, keys, segment_uri=segment_uri, init_uri=init_uri,
                                expires_at=claims.expires_at)
        await self.server._audit(asset, version, claims.sid, ip, "served", kind="offline")
        return JSONResponse(bundle, headers=NO_STORE)

