"""The ops app's HTML pages: the jobs list and one job's page with its preview player.

Route handlers are sync on purpose: Starlette runs them in its thread pool, and every one of
them blocks on Redis or the job store.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import HTMLResponse, PlainTextResponse, Response

from pipeline import layout
from pipeline.errors import ConfigurationError, HlsvaultError
from pipeline.http import status_for
from pipeline.jobs import JobRecord
from pipeline.settings import Settings
from pipeline.tokens import mint_token, minting_key

from . import views
from .assets import hls_js_missing
from .auth import CsrfTokens
from .reading import OpsReader

#: Preview tokens live long enough to watch a few minutes, short enough to be worthless later.
PREVIEW_TOKEN_TTL_S = 600
#: Pages and API answers describe the fleet as it is now: never cached.
NO_STORE = {"Cache-Control": "no-store"}


def refused(error: HlsvaultError) -> Response:
    """The plain-text answer for ``error``, with its status from the error tree."""
    return PlainTextResponse(f"{error}\n", status_code=status_for(error), headers=NO_STORE)


def listed(reader: OpsReader, request: Request) -> tuple[str | None, list[JobRecord]]:
    """The ``?status=`` a jobs list asks for, and its records; BadSpec for an unknown status."""
    status = request.query_params.get("status") or None
    return status, reader.recent(status)


class Previews:
    """Playback URLs for the preview player, when this process can mint viewer tokens.

    With EdDSA or RS256 tokens the recommended setup gives the fleet only the public key: the
    customer's backend mints. Then the job page says so instead of showing a player."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.key: object | None = None
        self.unavailable = hls_js_missing()
        try:
            self.key = minting_key(settings)
        except ConfigurationError as error:
            self.unavailable = (
                f"this ops process cannot mint a viewer token ({error}); set "
                "HLSVAULT_TOKEN_PRIVATE_KEY on the ops process to preview assets here"
            )

    def of(self, asset: str) -> views.Preview:
        if self.key is None or self.unavailable is not None:
            return views.Preview(unavailable=self.unavailable)
        token = mint_token(self.key, asset, PREVIEW_TOKEN_TTL_S,
                           algorithm=self.settings.token_algorithm)
        return views.Preview(url=layout.master_url(self.settings.public_url, asset,
                                                   f"?token={token}"))


class Pages:
    def __init__(self, reader: OpsReader, *, csrf: CsrfTokens, previews: Previews) -> None:
        self.reader = reader
        self.csrf = csrf
        self.previews = previews

    def jobs(self, request: Request) -> Response:
        try:
            status, records = listed(self.reader, request)
        except HlsvaultError as error:
            return refused(error)
        fleet = self.reader.fleet()
        html = views.jobs_page(
            records, status=status, counts=self.reader.counts(), queues=fleet.queues,
            workers=fleet.workers, chart=self.reader.throughput(), now=self.reader.now(),
        )
        return HTMLResponse(html, headers=NO_STORE)

    def job(self, request: Request) -> Response:
        try:
            record = self.reader.record(request.path_params["job_id"])
        except HlsvaultError as error:
            return refused(error)
        job_id = record.job_id
        succeeded = record.status == "succeeded"
        html = views.job_page(
            record,
            csrf={action: self.csrf.token(action, job_id) for action in ("retry", "cancel")},
            preview=self.previews.of(record.asset) if succeeded else views.Preview(),
            now=self.reader.now(),
        )
        return HTMLResponse(html, headers=NO_STORE)
