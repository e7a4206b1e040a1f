"""The key server's route handlers over a cached view of the vault (see :mod:`keyserver.app`
for the routes and status codes)."""

from __future__ import annotations

import re
import time
from collections import OrderedDict
from collections.abc import Callable
from urllib.parse import quote, urlsplit

import structlog
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from pipeline import layout
from pipeline.catalog import AssetState
from pipeline.cdnsign import CdnSigner
from pipeline.cdnsign import describe as describe_signing
from pipeline.errors import Refused
from pipeline.http import status_for
from pipeline.keys import KeyUnwrapError
from pipeline.playlists import (
    AssetVersion,
    PublishedSegment,
    RenditionEntry,
    render_master,
    render_variant,
)
from pipeline.settings import Settings
from pipeline.storage import ObjectNotFound
from pipeline.tokens import TokenClaims, TokenVerifier

from .credentials import COOKIE_NAME, client_ip, ip_bucket, request_sid, request_token, token_bucket
from .downloads import DownloadLinks
from .ratelimit import RateLimiter
from .responses import NO_STORE, error, playlist
from .state import STALE, VaultView
from .statesync import StateListener
from .stats import KeyRequestStats

log = structlog.get_logger("hlsvault.keyserver")
audit = structlog.get_logger("hlsvault.audit")

#: A key index as a URL names it: decimal, no sign, no leading zero (int() accepts far more).
_INDEX = re.compile(r"(0|[1-9][0-9]{0,6})")
#: Versions whose cookie-mode fallback was logged: one warning per version, not per request.
MAX_WARNED_VERSIONS = 1024


def playlist_cookie_path(public_url: str, asset: str) -> str:
    """The path under which the key server serves ``asset``'s playlists, as the browser sees it:
    the directory of :func:`pipeline.layout.variant_url`, so it follows that rule."""
    return urlsplit(layout.variant_url(public_url, asset, "")).path.rsplit("/", 1)[0] + "/"


class KeyServer:
    """Route handlers: playlists and keys for the holders of a token, over the vault's view."""

    def __init__(
        self,
        settings: Settings,
        *,
        view: VaultView,
        verifier: TokenVerifier,
        limiter: RateLimiter,
        stats: KeyRequestStats,
        listener: StateListener | None = None,
        signer: CdnSigner | None = None,
        links: DownloadLinks | None = None,
    ) -> None:
        self.settings = settings
        self.view = view
        self.verifier = verifier
        self.limiter = limiter
        self.stats = stats
        self.listener = listener
        self.signer = signer
        self.links = links if links is not None else DownloadLinks(
            settings, signer=signer, origin=None
        )
        self._warned: OrderedDict[tuple[str, str], None] = OrderedDict()

    def _authorise(
        self, request: Request, asset: str, *, cookie: bool = False
    ) -> TokenClaims | Response:
        try:
            return self.verifier.verify(
                request_token(request, cookie=cookie),
                asset=asset,
                client_ip=client_ip(request),
                sid=request_sid(request),
            )
        except Refused as refused:
            return error(status_for(refused), str(refused))

    async def _state(self, asset: str) -> AssetState | None:
        state = self.view.fresh_state(asset)
        if state is STALE:
            # A vault read (file or S3) blocks: off the event loop, on the thread pool.
            return await run_in_threadpool(self.view.state, asset)
        return state if isinstance(state, AssetState) else None

    async def _published(self, asset: str) -> tuple[AssetState, AssetVersion] | Response:
        state = await self._state(asset)
        if state is None or state.version is None:
            return error(404, "unknown asset")
        if state.revoked:
            return error(410, "asset revoked")
        described = await run_in_threadpool(self.view.version, asset, state.version)
        if described is None:
            return error(404, "unknown asset")
        return state, described

    def _suffix(self, request: Request, token: str) -> str:
        """The query string a tokenized playlist passes on to the URIs it names."""
        suffix = f"?token={quote(token, safe='')}" if token else ""
        sid = request_sid(request)
        if sid:
            suffix += f"{'&' if suffix else '?'}sid={quote(sid, safe='')}"
        return suffix

    async def _playlist_access(
        self, request: Request, asset: str, *, cookie: bool = False
    ) -> tuple[TokenClaims, AssetVersion] | Response:
        """The viewer's claims and the asset's current version, or the refusal to send."""
        claims = self._authorise(request, asset, cookie=cookie)
        if isinstance(claims, Response):
            return claims
        published = await self._published(asset)
        if isinstance(published, Response):
            return published
        return claims, published[1]

    def _fallback_logged(self, described: AssetVersion, packaged_for: str | None) -> None:
        """One warning per version (not per request) that cookie mode left the CDN's variants."""
        seen = (described.asset, described.version)
        if seen in self._warned:
            return
        self._warned[seen] = None
        if len(self._warned) > MAX_WARNED_VERSIONS:
            self._warned.popitem(last=False)
        log.warning(
            "cookie mode: the static variant playlists name another key server; serving the "
            "variants from this one", asset=described.asset, version=described.version,
            packaged_for=packaged_for, public_url=self.settings.public_url,
        )

    async def master(self, request: Request) -> Response:
        asset = request.path_params["asset"]
        if not layout.ASSET_ID_PATTERN.fullmatch(asset):
            return error(400, "malformed asset id")
        access = await self._playlist_access(request, asset)
        if isinstance(access, Response):
            return access
        claims, described = access
        base, cdn, version = self.settings.public_url, self.settings.cdn_url, described.version
        # The static variants on the CDN name the key URIs of the public URL they were written
        # for: None for versions packaged before AssetVersion recorded it.
        packaged_for = described.key_server
        variant_uri: Callable[[RenditionEntry], str]
        cookie_paths: list[str] = []
        if request.query_params.get("auth") != "cookie":
            suffix = self._suffix(request, request_token(request))

            def variant_uri(rendition: RenditionEntry) -> str:
                return layout.variant_url(base, asset, rendition.name, suffix)
        elif packaged_for == base:
            def variant_uri(rendition: RenditionEntry) -> str:
                static = layout.static_variant_key(asset, version, rendition.name)
                return layout.cdn_url(cdn, static)

            cookie_paths = [layout.key_cookie_path(base, asset)]
        else:
            # The key server renders the variants itself, with its current public URL in the
            # key URIs; the browser sends the cookie there too, so it gets a second path.
            def variant_uri(rendition: RenditionEntry) -> str:
                return layout.variant_url(base, asset, rendition.name, "?auth=cookie")

            cookie_paths = [layout.key_cookie_path(base, asset), playlist_cookie_path(base, asset)]
            self._fallback_logged(described, packaged_for)
        response = playlist(render_master(described, variant_uri=variant_uri))
        for path in cookie_paths:
            # Browsers keep cookies by name and path: one per path, each sent only there.
            response.set_cookie(
                COOKIE_NAME,
                request_token(request),
                max_age=max(1, claims.expires_at - int(time.time())),
                path=path,
                secure=True,
                httponly=True,
                samesite="none",
            )
        if cookie_paths and self.signer is not None:
            self._set_cdn_cookies(response, asset, claims)
        return response

    def _set_cdn_cookies(self, response: Response, asset: str, claims: TokenClaims) -> None:
        """Cookie mode's CloudFront cookies: the asset's whole CDN directory (static variant
        playlists and segments), for as long as the token (capped), from its address only when
        the token is bound to one."""
        assert self.signer is not None  # noqa: S101 - the caller checked
        cdn = self.settings.cdn_url
        signed = self.signer.asset_cookies(
            cdn, asset, token_expires_at=claims.expires_at, ip=_cidr(claims.ip)
        )
        for name, value in signed.cookies().items():
            response.set_cookie(
                name, value,
                max_age=max(1, signed.expires_at - int(time.time())),
                path=layout.cdn_cookie_path(cdn, asset),
                domain=self.settings.cdn_cookie_domain,
                secure=True,
                httponly=True,
                samesite="none",
            )

    async def variant(self, request: Request) -> Response:
        asset = request.path_params["asset"]
        name = request.path_params["rendition"]
        if not layout.ASSET_ID_PATTERN.fullmatch(asset):
            return error(400, "malformed asset id")
        if not layout.RENDITION_PATTERN.fullmatch(name):
            return error(400, "malformed rendition")
        cookie_mode = request.query_params.get("auth") == "cookie"
        access = await self._playlist_access(request, asset, cookie=cookie_mode)
        if isinstance(access, Response):
            return access
        claims, described = access
        rendition = described.rendition(name)
        if rendition is None:
            return error(404, "unknown rendition")
        # Cookie mode's key URIs carry no token, as the static playlists' do: the cookie is it.
        suffix = "" if cookie_mode else self._suffix(request, request_token(request))
        cdn, base, version = self.settings.cdn_url, self.settings.public_url, described.version
        # Tokenized mode: one signature for every segment of the rendition (cookie mode's
        # CloudFront cookies already cover them).
        signed = "" if cookie_mode else self._segment_query(asset, version, name, claims)

        def segment_uri(segment: PublishedSegment) -> str:
            uri = layout.cdn_url(cdn, layout.segment_key(asset, version, name, segment.name))
            return f"{uri}{signed}"

        def key_uri(index: int) -> str:
            return layout.key_url(base, asset, version, index, suffix)

        def init_uri(init: str) -> str:
            # Under the rendition's signed resource, like its segments.
            return f"{layout.cdn_url(cdn, layout.segment_key(asset, version, name, init))}{signed}"

        return playlist(
            render_variant(described, rendition, segment_uri=segment_uri, key_uri=key_uri,
                           init_uri=init_uri)
        )

    def _segment_query(
        self, asset: str, version: str, rendition: str, claims: TokenClaims
    ) -> str:
        """``?Policy=…&Signature=…&Key-Pair-Id=…`` for the rendition's segments, or ``""``."""
        if self.signer is None:
            return ""
        return "?" + self.signer.rendition_query(
            self.settings.cdn_url, asset, version, rendition,
            token_expires_at=claims.expires_at, ip=_cidr(claims.ip),
        )

    async def _limited(self, bucket: str, limit: int) -> Response | None:
        wait = await self.limiter.hit(bucket, limit)
        if wait is None:
            return None
        return error(429, "too many key requests", {"Retry-After": str(int(wait + 0.999))})

    async def key(self, request: Request) -> Response:
        asset = request.path_params["asset"]
        version = request.path_params["version"]
        raw_index = request.path_params["index"]
        ip = client_ip(request)
        if (
            not layout.ASSET_ID_PATTERN.fullmatch(asset)
            or not layout.VERSION_PATTERN.fullmatch(version)
            or not _INDEX.fullmatch(raw_index)
            or int(raw_index) > layout.MAX_KEY_INDEX
        ):
            await self._audit(asset[:128], None, None, ip, "malformed path")
            return error(400, "malformed key path")
        index = int(raw_index)
        key_id = f"{version}/{index}"
        # The address is counted first, whatever the token: that bounds what one client can
        # make the server verify. A token is counted only once verified, so made-up tokens
        # never create buckets.
        limited = await self._limited(ip_bucket(ip), self.settings.rate_limit_ip_per_min)
        if limited is not None:
            await self._audit(asset, key_id, None, ip, "rate limited")
            return limited
        claims = self._authorise(request, asset, cookie=True)
        if isinstance(claims, Response):
            await self._audit(asset, key_id, None, ip, f"denied {claims.status_code}")
            return claims
        limited = await self._limited(
            token_bucket(request_token(request, cookie=True)),
            self.settings.rate_limit_token_per_min,
        )
        if limited is not None:
            await self._audit(asset, key_id, claims.sid, ip, "rate limited")
            return limited
        state = await self._state(asset)
        outcome, response = await self._key_response(state, asset, version, index)
        await self._audit(asset, key_id, claims.sid, ip, outcome)
        return response

    async def _audit(
        self, asset: str, key_id: str | None, sid: str | None, ip: str | None, outcome: str,
        *, kind: str = "key",
    ) -> None:
        """One audit line per key, download or offline request, and its outcome counted for
        the ops metrics (per asset for the Assets page)."""
        audit.info(
            f"{kind} request", asset=asset, key_id=key_id, sid=sid, client_ip=ip, outcome=outcome
        )
        await self.stats.count(outcome if kind == "key" else f"{kind} {outcome}", asset=asset)

    async def _entitled(
        self, request: Request, asset: str, kind: str
    ) -> tuple[TokenClaims, AssetVersion] | Response:
        """A download's or offline bundle's checks, in the key route's order and with its
        status codes: 400, 429 per address, 401/403, 429 per token, 404, 410; each refusal
        audited."""
        ip = client_ip(request)
        if not layout.ASSET_ID_PATTERN.fullmatch(asset):
            await self._audit(asset[:128], None, None, ip, "malformed path", kind=kind)
            return error(400, "malformed asset id")
        limited = await self._limited(ip_bucket(ip), self.settings.rate_limit_ip_per_min)
        if limited is not None:
            await self._audit(asset, None, None, ip, "rate limited", kind=kind)
            return limited
        claims = self._authorise(request, asset)
        if isinstance(claims, Response):
            await self._audit(asset, None, None, ip, f"denied {claims.status_code}", kind=kind)
            return claims
        limited = await self._limited(
            token_bucket(request_token(request)), self.settings.rate_limit_token_per_min
        )
        if limited is not None:
            await self._audit(asset, None, claims.sid, ip, "rate limited", kind=kind)
            return limited
        published = await self._published(asset)
        if isinstance(published, Response):
            outcome = "gone" if published.status_code == 410 else "unknown asset"
            await self._audit(asset, None, claims.sid, ip, outcome, kind=kind)
            return published
        return claims, published[1]

    async def _key_response(
        self, state: AssetState | None, asset: str, version: str, index: int
    ) -> tuple[str, Response]:
        if state is None:
            return "unknown asset", error(404, "unknown key")
        if not state.key_servable(version):
            self.view.forget_keys(asset, version)
            if state.revoked or version in state.retired:
                return "gone", error(410, "key withdrawn: the asset was revoked or re-keyed")
            known = await run_in_threadpool(self.view.version, asset, version)
            if known is None:
                return "unknown key", error(404, "unknown key")
            return "gone", error(410, "key withdrawn: the version was replaced")
        key = self.view.cached_key(asset, version, index)
        if key is None:
            try:
                key = await run_in_threadpool(self.view.key, asset, version, index)
            except ObjectNotFound:
                return "unknown key", error(404, "unknown key")
            except KeyUnwrapError:
                log.error("wrapped key does not authenticate", asset=asset,
                          key_id=f"{version}/{index}")
                return "unwrap failed", error(500, "key unavailable")
        return "served", Response(key, media_type="application/octet-stream", headers=NO_STORE)

    async def healthz(self, request: Request) -> Response:
        """200 while the process serves; says whether state changes reach it at once (the state
        bus: off in embedded mode) and how many it has heard."""
        signing = describe_signing(self.signer)
        if self.listener is None:
            return JSONResponse(
                {"status": "ok", "state_bus": "off", "state_changes_heard": 0, **signing}
            )
        bus = "subscribed" if self.listener.subscribed else "reconnecting"
        heard = self.listener.heard
        return JSONResponse(
            {"status": "ok", "state_bus": bus, "state_changes_heard": heard, **signing}
        )


def _cidr(ip: str | None) -> str | None:
    """A token's address as a CloudFront policy names it: one address, ``/32`` (``/128``)."""
    if ip is None:
        return None
    return f"{ip}/128" if ":" in ip else f"{ip}/32"
