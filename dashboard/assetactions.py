"""The Assets pages and their two actions, Re-key and Revoke, each behind a confirmation step.

    GET  /assets                   every asset: current version, renditions, CDN-signed,
                                   download, retired versions, key requests in the last hour
    GET  /assets/{asset}           one asset: its versions (retired ones with their shred time)
    GET  /assets/{asset}/rekey     the confirmation step: what Re-key does, and its form
    GET  /assets/{asset}/revoke    the confirmation step of Revoke
    POST /assets/{asset}/rekey     303 to the re-key job; 400 unconfirmed; 403 bad CSRF token or
                                   cross-origin; 404 no such asset (or not published)
    POST /assets/{asset}/revoke    303 back to the asset; 400; 403; 404

A POST must carry the CSRF token of its action and asset and ``confirm=<asset>``, which only the
confirmation page's form sends.
"""

from __future__ import annotations

from urllib.parse import parse_qs

import structlog
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, PlainTextResponse, RedirectResponse, Response

from pipeline import layout
from pipeline.errors import BadSpec, HlsvaultError, NotFound
from pipeline.services import Services
from workers.sending import Submit

from . import assetviews
from .auth import CsrfTokens, cross_origin
from .library import LibraryReader
from .pages import NO_STORE, refused

log = structlog.get_logger("hlsvault.ops")

#: The action forms carry two hidden fields.
MAX_FORM_BYTES = 4096
ACTIONS = ("rekey", "revoke")


def _csrf_subject(asset: str) -> str:
    return f"asset:{asset}"


class AssetPages:
    def __init__(
        self, services: Services, reader: LibraryReader, *, csrf: CsrfTokens, submit: Submit
    ) -> None:
        self.services = services
        self.reader = reader
        self.csrf = csrf
        self.submit = submit

    def _asset(self, request: Request) -> str:
        return layout.check_asset_id(request.path_params["asset"])

    def assets(self, request: Request) -> Response:
        html = assetviews.assets_page(self.reader.assets(), cdn_signing=self.reader.cdn_signing())
        return HTMLResponse(html, headers=NO_STORE)

    def asset(self, request: Request) -> Response:
        try:
            asset = self._asset(request)
            row = self.reader.asset(asset)
            if row is None:
                raise NotFound(f"no asset {asset}; the Assets page lists those that exist")
        except HlsvaultError as error:
            return refused(error)
        html = assetviews.asset_page(row, cdn_signing=self.reader.cdn_signing(),
                                     now=self.services.jobs.clock())
        return HTMLResponse(html, headers=NO_STORE)

    def confirm(self, request: Request) -> Response:
        action = request.path_params["action"]
        try:
            asset = self._asset(request)
            if action not in ACTIONS:
                raise NotFound(f"no action {action[:20]}")
            if self.reader.asset(asset) is None:
                raise NotFound(f"no asset {asset}")
        except HlsvaultError as error:
            return refused(error)
        token = self.csrf.token(action, _csrf_subject(asset))
        return HTMLResponse(assetviews.confirm_page(asset, action, csrf=token), headers=NO_STORE)

    async def act(self, request: Request) -> Response:
        action = request.path_params["action"]
        refusal = cross_origin(request)
        if refusal is not None:
            return refusal
        try:
            asset = self._asset(request)
            if action not in ACTIONS:
                raise NotFound(f"no action {action[:20]}")
        except HlsvaultError as error:
            return refused(error)
        body = await request.body()
        form = parse_qs(body[:MAX_FORM_BYTES].decode("latin-1"))
        given = form.get("csrf", [""])[0]
        if not self.csrf.valid(given, action, _csrf_subject(asset)):
            return PlainTextResponse("bad or missing CSRF token; reload the page and use its "
                                     "button\n", status_code=403)
        if form.get("confirm", [""])[0] != asset:
            return refused(BadSpec(f"{action} was not confirmed; use the confirmation page's "
                                   f"button at /assets/{asset}/{action}"))
        work = self._rekey if action == "rekey" else self._revoke
        outcome: Response = await run_in_threadpool(work, asset)
        return outcome

    def _rekey(self, asset: str) -> Response:
        from pipeline.lifecycle import new_rekey_spec

        try:
            spec = new_rekey_spec(self.services, asset)
        except HlsvaultError as error:
            return refused(error)
        self.submit(spec)
        log.info("asset re-key submitted", asset=asset, job_id=spec.job_id)
        return RedirectResponse(f"/jobs/{spec.job_id}", status_code=303)

    def _revoke(self, asset: str) -> Response:
        from pipeline.lifecycle import revoke

        try:
            result = revoke(self.services, asset)
        except HlsvaultError as error:
            return refused(error)
        log.info("asset revoked", asset=asset, keys_deleted=result["keys_deleted"],
                 downloads_deleted=result["downloads_deleted"])
        return RedirectResponse(f"/assets/{asset}", status_code=303)
