"""The key server's route handlers over a cached view of the vault (see :mod:`keyserver.app`
for the routes and status codes).

The three viewer routes (master playlist, variant playlist, key) take a request's
:class:`~keyserver.credentials.Credentials` and path values and return an
:class:`~keyserver.responses.Answer`, free of any web framework: the fast path
(:mod:`keyserver.fastpath`) and the Starlette routes both call them, so their answers cannot
drift apart. Nothing on the way formats a log line or blocks the event loop: audit and access
lines are queued for :class:`~keyserver.auditlog.LineWriter`, and the vault is read on the
thread pool only when the in-memory view misses.
"""

from __future__ import annotations

import re
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any
from urllib.parse import quote, urlsplit

import structlog
from anyio.to_thread import run_sync
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from pipeline import layout
from pipeline.catalog import AssetState
from pipeline.cdnsign import CdnSigner
from pipeline.cdnsign import describe as describe_signing
from pipeline.errors import HlsvaultError, Refused
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
from pipeline.thumbnails import render_vtt
from pipeline.tokens import TokenClaims, TokenVerifier

from .auditlog import LineWriter
from .credentials import COOKIE_NAME, Credentials, ip_bucket, token_bucket
from .downloads import DownloadLinks, download_expiry
from .ratelimit import RateLimiter
from .responses import (
    Answer,
    error_answer,
    key_answer,
    playlist_answer,
    set_cookie_value,
    to_response,
    webvtt_answer,
)
from .state import STALE, VaultView
from .statesync import StateListener
from .stats import KeyRequestStats
from .templates import PlaylistTemplates

log = structlog.get_logger("hlsvault.keyserver")
#: The logger names of the lines queued for the writer.
AUDIT_LOGGER = "hlsvault.audit"
ACCESS_LOGGER = "hlsvault.keyserver"

#: A key index as a URL names it: decimal, no sign, no leading zero (int() accepts far more).
_INDEX = re.compile(r"(0|[1-9][0-9]{0,6})")
#: The audit line's event of each kind of audited request.
_AUDIT_EVENTS = {kind: f"{kind} request" for kind in ("key", "download", "offline")}
#: Well-formed key paths remembered at most (a player asks for the same few keys; a valid
#: path is at most ~200 characters, so this bounds the memo near 1 MB).
MAX_KEY_PATHS = 4096


def _check_key_path(asset: str, version: str, raw_index: str) -> tuple[int, str] | None:
    """A key path's index and key id (``version/index``) when its values are well formed,
    else None (a 400)."""
    if (
        not layout.ASSET_ID_PATTERN.fullmatch(asset)
        or not layout.VERSION_PATTERN.fullmatch(version)
        or not _INDEX.fullmatch(raw_index)
        or int(raw_index) > layout.MAX_KEY_INDEX
    ):
        return None
    index = int(raw_index)
    return index, f"{version}/{index}"


#: Versions whose cookie-mode fallback was logged: one warning per version, not per request.
MAX_WARNED_VERSIONS = 1024


def playlist_cookie_path(public_url: str, asset: str) -> str:
    """The path under which the key server serves ``asset``'s playlists, as the browser sees it:
    the directory of :func:`pipeline.layout.variant_url`, so it follows that rule."""
    return urlsplit(layout.variant_url(public_url, asset, "")).path.rsplit("/", 1)[0] + "/"


class QueuedLogger:
    """A logger whose ``info`` lines go through the writer (what :class:`AccessLog` calls)."""

    def __init__(self, lines: LineWriter, name: str) -> None:
        self.lines = lines
        self.name = name

    def info(self, event: str, **fields: Any) -> None:
        self.lines.write(self.name, event, fields)


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
        lines: LineWriter | None = None,
        listener: StateListener | None = None,
        signer: CdnSigner | None = None,
        links: DownloadLinks | None = None,
    ) -> None:
        self.settings = settings
        self.view = view
        self.verifier = verifier
        self.limiter = limiter
        self.stats = stats
        self.lines = lines if lines is not None else LineWriter()
        self.listener = listener
        self.signer = signer
        self.links = links if links is not None else DownloadLinks(
            settings, signer=signer, origin=None
        )
        self._warned: OrderedDict[tuple[str, str], None] = OrderedDict()
        #: Key paths (asset, version, index as sent) known to be well formed: their index and
        #: key id.
        self._key_paths: dict[tuple[str, str, str], tuple[int, str]] = {}
        #: Playlists rendered once per version and rendition (keyserver.templates).
        self.templates = PlaylistTemplates()

    # -- what every route shares -------------------------------------------------------------

    def _authorise(
        self, creds: Credentials, asset: str, *, cookie: bool = False
    ) -> TokenClaims | Answer:
        try:
            return self.verifier.verify(
                creds.token(cookie=cookie), asset=asset, client_ip=creds.client_ip,
                sid=creds.sid,
            )
        except Refused as refused:
            return error_answer(status_for(refused), str(refused))

    async def _state(self, asset: str) -> AssetState | None:
        state = self.view.fresh_state(asset)
        if state is STALE:
            # A vault read (file or S3) blocks: off the event loop, on the thread pool.
            return await run_sync(self.view.state, asset)
        return state if isinstance(state, AssetState) else None

    async def _version(self, asset: str, version: str) -> AssetVersion | None:
        described = self.view.cached_version(asset, version)
        if described is None:
            described = await run_sync(self.view.version, asset, version)
        return described

    async def _published(self, asset: str) -> tuple[AssetState, AssetVersion] | Answer:
        state = await self._state(asset)
        if state is None or state.version is None:
            return error_answer(404, "unknown asset")
        if state.revoked:
            return error_answer(410, "asset revoked")
        described = await self._version(asset, state.version)
        if described is None:
            return error_answer(404, "unknown asset")
        return state, described

    async def _limited(self, bucket: Callable[[], str], limit: int) -> Answer | None:
        if limit <= 0:  # the limit is off: not even the bucket's name is worth computing
            return None
        wait = await self.limiter.hit(bucket(), limit)
        if wait is None:
            return None
        return error_answer(429, "too many key requests", {"Retry-After": str(int(wait + 0.999))})

    async def _audit(
        self, asset: str, key_id: str | None, sid: str | None, ip: str | None, outcome: str,
        *, kind: str = "key",
    ) -> None:
        """One audit line per key, download or offline request (queued for the writer), and
        its outcome counted for the ops metrics (per asset for the Assets page)."""
        self._audit_line(kind, asset, key_id, sid, ip, outcome)
        if self.stats.client is not None:  # embedded mode counts nothing: no coroutine either
            await self.stats.count(outcome if kind == "key" else f"{kind} {outcome}", asset=asset)

    def _audit_line(
        self, kind: str, asset: str, key_id: str | None, sid: str | None, ip: str | None,
        outcome: str,
    ) -> None:
        self.lines.write(AUDIT_LOGGER, _AUDIT_EVENTS.get(kind) or f"{kind} request", {
            "asset": asset, "key_id": key_id, "sid": sid, "client_ip": ip, "outcome": outcome,
        })

    # -- the viewer routes -------------------------------------------------------------------

    def _suffix(self, creds: Credentials, token: str) -> str:
        """The query string a tokenized playlist passes on to the URIs it names."""
        suffix = f"?token={quote(token, safe='')}" if token else ""
        sid = creds.sid
        if sid:
            suffix += f"{'&' if suffix else '?'}sid={quote(sid, safe='')}"
        return suffix

    async def _playlist_access(
        self, creds: Credentials, asset: str, *, cookie: bool = False
    ) -> tuple[TokenClaims, AssetVersion] | Answer:
        """The viewer's claims and the asset's current version, or the refusal to send."""
        claims = self._authorise(creds, asset, cookie=cookie)
        if isinstance(claims, Answer):
            return claims
        published = await self._published(asset)
        if isinstance(published, Answer):
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

    async def master(self, creds: Credentials, asset: str) -> Answer:
        if not layout.ASSET_ID_PATTERN.fullmatch(asset):
            return error_answer(400, "malformed asset id")
        access = await self._playlist_access(creds, asset)
        if isinstance(access, Answer):
            return access
        claims, described = access
        base, cdn, version = self.settings.public_url, self.settings.cdn_url, described.version
        # The static variants on the CDN name the key URIs of the public URL they were written
        # for: None for versions packaged before AssetVersion recorded it.
        packaged_for = described.key_server
        variant_uri: Callable[[RenditionEntry, str], str]  # the rendition, the viewer's query
        cookie_paths: list[str] = []
        cookie_mode = creds.query.get("auth") == "cookie"
        if not cookie_mode:
            def variant_uri(rendition: RenditionEntry, query: str) -> str:
                return layout.variant_url(base, asset, rendition.name, query)
        elif packaged_for == base:
            def variant_uri(rendition: RenditionEntry, query: str) -> str:
                static = layout.static_variant_key(asset, version, rendition.name)
                return layout.cdn_url(cdn, static)

            cookie_paths = [layout.key_cookie_path(base, asset)]
            if described.thumbnails is not None:
                # The thumbnail track is served beside the variants: the cookie goes there too.
                cookie_paths.append(playlist_cookie_path(base, asset))
        else:
            # The key server renders the variants itself, with its current public URL in the
            # key URIs; the browser sends the cookie there too, so it gets a second path.
            def variant_uri(rendition: RenditionEntry, query: str) -> str:
                return layout.variant_url(base, asset, rendition.name, "?auth=cookie")

            cookie_paths = [layout.key_cookie_path(base, asset), playlist_cookie_path(base, asset)]
            self._fallback_logged(described, packaged_for)
        # Browsers keep cookies by name and path: one per path, each sent only there.
        cookies = [
            set_cookie_value(COOKIE_NAME, creds.token(),
                             max_age=max(1, claims.expires_at - int(time.time())), path=path)
            for path in cookie_paths
        ]
        if cookie_paths and self.signer is not None:
            cookies.extend(self._cdn_cookies(asset, claims))
        text = self.templates.render(
            ("master", asset, version, cookie_mode),
            lambda query, _: render_master(described, variant_uri=lambda r: variant_uri(r, query)),
            "" if cookie_mode else self._suffix(creds, creds.token()),
        )
        return playlist_answer(text, cookies)

    def _cdn_cookies(self, asset: str, claims: TokenClaims) -> list[bytes]:
        """Cookie mode's CloudFront cookies: the asset's whole CDN directory (static variant
        playlists and segments), for as long as the token (capped), from its address only when
        the token is bound to one."""
        assert self.signer is not None  # noqa: S101 - the caller checked
        cdn = self.settings.cdn_url
        signed = self.signer.asset_cookies(
            cdn, asset, token_expires_at=claims.expires_at, ip=_cidr(claims.ip)
        )
        return [
            set_cookie_value(
                name, value, max_age=max(1, signed.expires_at - int(time.time())),
                path=layout.cdn_cookie_path(cdn, asset), domain=self.settings.cdn_cookie_domain,
            )
            for name, value in signed.cookies().items()
        ]

    async def _per_viewer(
        self, creds: Credentials, asset: str, rendition: str | None = None
    ) -> tuple[TokenClaims, AssetVersion, bool] | Answer:
        """What every per-viewer playlist or track checks first: the path values, then the
        token (cookie mode's from the cookie too) and the asset's current version; the claims,
        the version and whether it is cookie mode, or the refusal to send."""
        if not layout.ASSET_ID_PATTERN.fullmatch(asset):
            return error_answer(400, "malformed asset id")
        if rendition is not None and not layout.RENDITION_PATTERN.fullmatch(rendition):
            return error_answer(400, "malformed rendition")
        cookie_mode = creds.query.get("auth") == "cookie"
        access = await self._playlist_access(creds, asset, cookie=cookie_mode)
        if isinstance(access, Answer):
            return access
        return (*access, cookie_mode)

    async def variant(self, creds: Credentials, asset: str, name: str) -> Answer:
        access = await self._per_viewer(creds, asset, name)
        if isinstance(access, Answer):
            return access
        claims, described, cookie_mode = access
        rendition = described.rendition(name)
        if rendition is None:
            return error_answer(404, "unknown rendition")
        # Cookie mode's key URIs carry no token, as the static playlists' do: the cookie is it.
        suffix = "" if cookie_mode else self._suffix(creds, creds.token())
        cdn, base, version = self.settings.cdn_url, self.settings.public_url, described.version
        # Tokenized mode: one signature for every segment of the rendition (cookie mode's
        # CloudFront cookies already cover them).
        signed = "" if cookie_mode else self._segment_query(asset, version, name, claims)

        def render(query: str, signature: str) -> str:
            def segment_uri(segment: PublishedSegment) -> str:
                uri = layout.cdn_url(cdn, layout.segment_key(asset, version, name, segment.name))
                return f"{uri}{signature}"

            def key_uri(index: int) -> str:
                return layout.key_url(base, asset, version, index, query)

            def init_uri(init: str) -> str:
                # Under the rendition's signed resource, like its segments.
                segment = layout.segment_key(asset, version, name, init)
                return f"{layout.cdn_url(cdn, segment)}{signature}"

            return render_variant(described, rendition, segment_uri=segment_uri,
                                  key_uri=key_uri, init_uri=init_uri)

        key = ("variant", asset, version, name, cookie_mode)
        return playlist_answer(self.templates.render(key, render, suffix, signed))

    async def thumbnails(self, creds: Credentials, asset: str) -> Answer:
        """Trick play's thumbnail track, under the variant playlists' token rules. The sheets
        are clear pictures in the origin's private ``thumbnails/`` prefix: each URI is a
        short-lived signed URL made as a download's is (:class:`DownloadLinks`), in cookie
        mode too; 503 when this deployment cannot sign one."""
        access = await self._per_viewer(creds, asset)
        if isinstance(access, Answer):
            return access
        claims, described, _ = access
        if described.thumbnails is None:
            return error_answer(404, "no thumbnails: package the asset with --trick-play")
        expires_at = download_expiry(claims.expires_at)

        def sheet_uri(sheet: str) -> str:
            return self.links.sheet_url(asset, described.version, sheet, expires_at=expires_at)

        try:
            text = render_vtt(described.thumbnails, sheet_uri=sheet_uri)
        except HlsvaultError as refused:  # no way to sign (503), as a download's 302
            return error_answer(status_for(refused), str(refused))
        return webvtt_answer(text)

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

    async def key(self, creds: Credentials, asset: str, version: str, raw_index: str) -> Answer:
        ip = creds.client_ip
        # Well-formed paths are remembered (only those: their length is bounded).
        path = (asset, version, raw_index)
        checked = self._key_paths.get(path)
        if checked is None:
            checked = _check_key_path(asset, version, raw_index)
            if checked is None:
                await self._audit(asset[:128], None, None, ip, "malformed path")
                return error_answer(400, "malformed key path")
            if len(self._key_paths) >= MAX_KEY_PATHS:
                self._key_paths.clear()
            self._key_paths[path] = checked
        index, key_id = checked
        settings = self.settings
        # The address is counted first, whatever the token: that bounds what one client can
        # make the server verify. A token is counted only once verified, so made-up tokens
        # never create buckets. (A limit that is off costs not even a coroutine.)
        if settings.rate_limit_ip_per_min > 0:
            limited = await self._limited(lambda: ip_bucket(ip), settings.rate_limit_ip_per_min)
            if limited is not None:
                await self._audit(asset, key_id, None, ip, "rate limited")
                return limited
        claims = self._authorise(creds, asset, cookie=True)
        if isinstance(claims, Answer):
            await self._audit(asset, key_id, None, ip, f"denied {claims.status}")
            return claims
        if settings.rate_limit_token_per_min > 0:
            limited = await self._limited(
                lambda: token_bucket(creds.token(cookie=True)),
                settings.rate_limit_token_per_min,
            )
            if limited is not None:
                await self._audit(asset, key_id, claims.sid, ip, "rate limited")
                return limited
        state = self.view.fresh_state(asset)
        if state is STALE:
            state = await run_sync(self.view.state, asset)
        # What almost every request is: a servable version whose key is in memory, answered
        # without another coroutine.
        key = (self.view.cached_key(asset, version, index)
               if isinstance(state, AssetState) and state.key_servable(version) else None)
        if key is not None:
            outcome, answer = "served", key_answer(key)
        else:
            outcome, answer = await self._key_answer(
                state if isinstance(state, AssetState) else None, asset, version, index)
        self._audit_line("key", asset, key_id, claims.sid, ip, outcome)
        if self.stats.client is not None:  # embedded mode counts nothing: no coroutine either
            await self.stats.count(outcome, asset=asset)
        return answer

    async def _key_answer(
        self, state: AssetState | None, asset: str, version: str, index: int
    ) -> tuple[str, Answer]:
        if state is None:
            return "unknown asset", error_answer(404, "unknown key")
        if not state.key_servable(version):
            self.view.forget_keys(asset, version)
            if state.revoked or version in state.retired:
                return "gone", error_answer(410, "key withdrawn: the asset was revoked or re-keyed")
            known = await self._version(asset, version)
            if known is None:
                return "unknown key", error_answer(404, "unknown key")
            return "gone", error_answer(410, "key withdrawn: the version was replaced")
        key = self.view.cached_key(asset, version, index)
        if key is None:
            try:
                key = await run_sync(self.view.key, asset, version, index)
            except ObjectNotFound:
                return "unknown key", error_answer(404, "unknown key")
            except KeyUnwrapError:
                log.error("wrapped key does not authenticate", asset=asset,
                          key_id=f"{version}/{index}")
                return "unwrap failed", error_answer(500, "key unavailable")
        return "served", key_answer(key)

    # -- downloads and offline bundles (keyserver.exports) ----------------------------------

    async def _entitled(
        self, request: Request, asset: str, kind: str
    ) -> tuple[TokenClaims, AssetVersion] | Response:
        """A download's or offline bundle's checks, in the key route's order and with its
        status codes: 400, 429 per address, 401/403, 429 per token, 404, 410; each refusal
        audited."""
        creds = Credentials(request.scope)
        ip = creds.client_ip
        if not layout.ASSET_ID_PATTERN.fullmatch(asset):
            await self._audit(asset[:128], None, None, ip, "malformed path", kind=kind)
            return to_response(error_answer(400, "malformed asset id"))
        limited = await self._limited(lambda: ip_bucket(ip), self.settings.rate_limit_ip_per_min)
        if limited is not None:
            await self._audit(asset, None, None, ip, "rate limited", kind=kind)
            return to_response(limited)
        claims = self._authorise(creds, asset)
        if isinstance(claims, Answer):
            await self._audit(asset, None, None, ip, f"denied {claims.status}", kind=kind)
            return to_response(claims)
        limited = await self._limited(
            lambda: token_bucket(creds.token()), self.settings.rate_limit_token_per_min
        )
        if limited is not None:
            await self._audit(asset, None, claims.sid, ip, "rate limited", kind=kind)
            return to_response(limited)
        published = await self._published(asset)
        if isinstance(published, Answer):
            outcome = "gone" if published.status == 410 else "unknown asset"
            await self._audit(asset, None, claims.sid, ip, outcome, kind=kind)
            return to_response(published)
        return claims, published[1]

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
