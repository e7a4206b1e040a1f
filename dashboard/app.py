"""The ops app: dashboard, JSON API and Prometheus metrics, built by :func:`create_app`.

    GET  /                       jobs list (?status=queued|running|succeeded|failed|cancelled),
                                 throughput of the last hour, queues, workers
    GET  /jobs/{job_id}          one job: per-stage timeline, Retry / Cancel, preview player
    POST /jobs/{job_id}/retry    a failed or cancelled job again, as a new job with the same spec
    POST /jobs/{job_id}/cancel   mark a job cancelled; stages still queued skip it
    GET  /api/jobs, /api/jobs/{job_id}, /api/fleet    what the pages poll (JSON)
    GET  /metrics                Prometheus text format
    GET  /static/hls.min.js      hls.js for the preview player
    GET  /healthz                unauthenticated
    POST /v1/jobs                the HMAC-signed webhook (dashboard/webhook.py), unauthenticated

Everything else needs HTTP Basic auth as ``ops`` with ``HLSVAULT_OPS_PASSWORD``. Forms are
CSRF-safe: a POST must carry an HMAC token bound to the action and job, and a cross-origin
``Origin`` header is refused outright.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import dataclasses
import hmac
import importlib
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, urlsplit

import redis
import structlog
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import (
    FileResponse,
    HTMLResponse,
    JSONResponse,
    PlainTextResponse,
    RedirectResponse,
    Response,
)
from starlette.routing import BaseRoute, Route
from starlette.types import ASGIApp, Receive, Scope, Send

from pipeline.errors import ConfigurationError
from pipeline.http import AccessLog
from pipeline.jobs import TERMINAL, JobRecord, JobSpec, UnknownJob
from pipeline.services import Services, build_services
from pipeline.settings import Settings
from pipeline.tokens import mint_token, minting_key

from . import metrics, views

log = structlog.get_logger("hlsvault.ops")

OPS_USER = "ops"
REALM = "hlsvault ops"
#: Paths served without Basic auth: the load balancer's health check, and the webhook, which
#: authenticates each request with its own HMAC signature.
PUBLIC_PATHS = ("/healthz", "/v1/jobs")
#: The jobs list and the job-level metrics read at most this many of the newest records.
MAX_LISTED_JOBS = 200
MAX_SCANNED_JOBS = 1000
#: Preview tokens live long enough to watch a few minutes, short enough to be worthless later.
PREVIEW_TOKEN_TTL_S = 600
#: hls.js as scripts/setup.sh installs it; without it the page loads it from jsDelivr.
HLS_JS = (
    Path(__file__).resolve().parent.parent / "tests/browser/node_modules/hls.js/dist/hls.min.js"
)
#: The action forms carry one hidden field.
MAX_FORM_BYTES = 4096
HLS_JS_CDN = "https://cdn.jsdelivr.net/npm/hls.js@1/dist/hls.min.js"

Submit = Callable[[JobSpec], None]


class BasicAuth:
    """HTTP Basic auth for every path but :data:`PUBLIC_PATHS`; compared in constant time."""

    def __init__(self, app: ASGIApp, *, password: str, public_paths: Sequence[str]) -> None:
        self.app = app
        self.expected = f"{OPS_USER}:{password}".encode()
        self.public_paths = tuple(public_paths)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in self.public_paths:
            await self.app(scope, receive, send)
            return
        if self._authorised(dict(scope["headers"]).get(b"authorization", b"")):
            await self.app(scope, receive, send)
            return
        response = PlainTextResponse(
            "authentication required\n",
            status_code=401,
            headers={"WWW-Authenticate": f'Basic realm="{REALM}", charset="UTF-8"'},
        )
        await response(scope, receive, send)

    def _authorised(self, header: bytes) -> bool:
        scheme, _, encoded = header.partition(b" ")
        if scheme.lower() != b"basic":
            return False
        try:
            given = base64.b64decode(encoded.strip(), validate=True)
        except (binascii.Error, ValueError):
            return False
        return hmac.compare_digest(given, self.expected)


class OpsApp:
    """Route handlers. Sync on purpose: Starlette runs them in its thread pool, and every one
    of them blocks on Redis or the job store."""

    def __init__(
        self,
        settings: Settings,
        *,
        services: Services,
        redis_client: redis.Redis | None,
        submit: Submit,
        password: str,
    ) -> None:
        self.settings = settings
        self.services = services
        self.redis = redis_client
        self.submit = submit
        self._csrf_key = hmac.new(password.encode(), b"hlsvault-ops-csrf", "sha256").digest()

    # -- reading ---------------------------------------------------------------------------

    def _records(self, limit: int) -> list[JobRecord]:
        """The newest ``limit`` job records, newest first (expired records are skipped)."""
        records = []
        for job_id in reversed(self.services.jobs.job_ids()[-limit:]):
            try:
                records.append(self.services.jobs.get(job_id))
            except UnknownJob:
                continue
        return records

    def _record(self, request: Request) -> JobRecord | Response:
        job_id = request.path_params["job_id"]
        try:
            return self.services.jobs.get(job_id)
        except UnknownJob:
            return PlainTextResponse(f"no job {job_id}\n", status_code=404)

    def _fleet(self) -> tuple[list[metrics.QueueStats] | None, list[metrics.Heartbeat] | None]:
        if self.redis is None:
            return None, None
        return (
            metrics.queue_stats(self.redis),
            metrics.heartbeats(self.redis, timeout_ms=self.settings.heartbeat_timeout_ms),
        )

    def csrf_token(self, action: str, job_id: str) -> str:
        return hmac.new(self._csrf_key, f"{action}:{job_id}".encode(), "sha256").hexdigest()

    # -- pages -----------------------------------------------------------------------------

    def jobs(self, request: Request) -> Response:
        status = request.query_params.get("status") or None
        now = time.time()
        records = self._records(MAX_SCANNED_JOBS)
        listed = [r for r in records if status is None or r.status == status][:MAX_LISTED_JOBS]
        queues, workers = self._fleet()
        html = views.jobs_page(
            listed, status=status, queues=queues, workers=workers,
            chart=metrics.throughput(records, now=now), now=now,
        )
        return HTMLResponse(html, headers=views_headers())

    def job(self, request: Request) -> Response:
        record = self._record(request)
        if isinstance(record, Response):
            return record
        job_id = record.spec.job_id
        html = views.job_page(
            record,
            csrf={a: self.csrf_token(a, job_id) for a in ("retry", "cancel")},
            preview_url=self._preview_url(record),
            now=time.time(),
        )
        return HTMLResponse(html, headers=views_headers())

    def _preview_url(self, record: JobRecord) -> str | None:
        if record.status != "succeeded":
            return None
        token = mint_token(
            minting_key(self.settings), record.spec.asset, PREVIEW_TOKEN_TTL_S,
            algorithm=self.settings.token_algorithm,
        )
        asset = quote(record.spec.asset, safe="")
        return f"{self.settings.public_url}/v1/assets/{asset}/master.m3u8?token={token}"

    def hls_js(self, request: Request) -> Response:
        if HLS_JS.is_file():
            return FileResponse(HLS_JS, media_type="text/javascript; charset=utf-8")
        return RedirectResponse(HLS_JS_CDN, status_code=307)

    # -- JSON ------------------------------------------------------------------------------

    def api_jobs(self, request: Request) -> Response:
        status = request.query_params.get("status") or None
        now = time.time()
        records = [r for r in self._records(MAX_SCANNED_JOBS) if status in (None, r.status)]
        return JSONResponse(
            {"jobs": [views.job_summary(r, now) for r in records[:MAX_LISTED_JOBS]]},
            headers=views_headers(),
        )

    def api_job(self, request: Request) -> Response:
        record = self._record(request)
        if isinstance(record, Response):
            return record
        body = record.to_dict()
        body["progress"] = round(metrics.job_progress(record), 4)
        body["retry_of"] = record.fields.get("retry_of")
        body["retried_as"] = record.fields.get("retried_as")
        return JSONResponse(body, headers=views_headers())

    def api_fleet(self, request: Request) -> Response:
        queues, workers = self._fleet()
        return JSONResponse(
            {
                "queues": None if queues is None else [dataclasses.asdict(q) for q in queues],
                "workers": None if workers is None else [dataclasses.asdict(w) for w in workers],
            },
            headers=views_headers(),
        )

    def metrics(self, request: Request) -> Response:
        queues, workers = self._fleet()
        text = metrics.render_metrics(
            self._records(MAX_SCANNED_JOBS),
            queues=queues,
            workers=workers,
            key_requests=None if self.redis is None else metrics.key_request_counts(self.redis),
        )
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4; charset=utf-8")

    def healthz(self, request: Request) -> Response:
        return PlainTextResponse("ok\n")

    # -- actions ---------------------------------------------------------------------------

    async def retry(self, request: Request) -> Response:
        return await self._action(request, "retry")

    async def cancel(self, request: Request) -> Response:
        return await self._action(request, "cancel")

    async def _action(self, request: Request, action: str) -> Response:
        job_id = request.path_params["job_id"]
        refused = _cross_origin(request)
        if refused is not None:
            return refused
        # The forms are urlencoded and tiny; parsed here, as request.form() would need
        # python-multipart installed even for them.
        body = await request.body()
        given = parse_qs(body[:MAX_FORM_BYTES].decode("latin-1")).get("csrf", [""])[0]
        if not hmac.compare_digest(given, self.csrf_token(action, job_id)):
            return PlainTextResponse("bad or missing CSRF token; reload the page\n", 403)
        outcome: Response = await run_in_threadpool(
            self._retry if action == "retry" else self._cancel, job_id
        )
        return outcome

    def _retry(self, job_id: str) -> Response:
        """Retry = the same spec as a new job (new id, new version). A failed job's scratch is
        discarded when it fails, so re-running only its failed stage would find nothing to
        work on; and a new job keeps the failed one's record intact for the post-mortem."""
        try:
            record = self.services.jobs.get(job_id)
        except UnknownJob:
            return PlainTextResponse(f"no job {job_id}\n", status_code=404)
        if record.status not in ("failed", "cancelled"):
            return PlainTextResponse(
                f"job {job_id} is {record.status}; only failed or cancelled jobs are retried\n",
                status_code=409,
            )
        spec = retry_spec(record.spec)
        self.submit(spec)
        self.services.jobs.backend.write(spec.job_id, {"retry_of": job_id})
        self.services.jobs.backend.write(job_id, {"retried_as": spec.job_id})
        log.info("job retried", job_id=job_id, new_job_id=spec.job_id)
        return RedirectResponse(f"/jobs/{spec.job_id}", status_code=303)

    def _cancel(self, job_id: str) -> Response:
        try:
            record = self.services.jobs.get(job_id)
        except UnknownJob:
            return PlainTextResponse(f"no job {job_id}\n", status_code=404)
        if record.status not in TERMINAL and self.services.jobs.cancel(job_id):
            log.info("job cancelled", job_id=job_id)
        return RedirectResponse(f"/jobs/{job_id}", status_code=303)


def views_headers() -> dict[str, str]:
    return {"Cache-Control": "no-store"}


def _cross_origin(request: Request) -> Response | None:
    """403 when the browser says the form was posted from another origin."""
    origin = request.headers.get("origin") or request.headers.get("referer")
    if origin is None:
        return None  # the CSRF token alone decides
    parts = urlsplit(origin)
    host = request.headers.get("host", "")
    if parts.netloc != host:
        return PlainTextResponse("cross-origin form post refused\n", status_code=403)
    return None


def retry_spec(spec: JobSpec) -> JobSpec:
    """``spec`` again under a new job id and version (versions sort by time, as new jobs')."""
    job_id = uuid.uuid4().hex
    now = time.time()
    version = time.strftime("v%Y%m%dT%H%M%SZ", time.gmtime(now)) + f"-{job_id[:8]}"
    return dataclasses.replace(spec, job_id=job_id, version=version, created_at=now)


def _default_submit(services: Services) -> Submit:
    def submit(spec: JobSpec) -> None:
        from workers import install

        install(services.settings, services=services).enqueue(spec)

    return submit


def _webhook_routes(settings: Settings, submit: Submit) -> list[BaseRoute]:
    """The webhook's routes, when dashboard/webhook.py is installed."""
    try:
        webhook: Any = importlib.import_module("dashboard.webhook")
    except ModuleNotFoundError as error:
        if error.name != "dashboard.webhook":
            raise
        return []
    routes: list[BaseRoute] = webhook.webhook_routes(settings, submit)
    return routes


def create_app(
    settings: Settings,
    *,
    services: Services | None = None,
    redis: redis.Redis | None = None,
    submit: Submit | None = None,
) -> Starlette:
    """Build the ops app for ``settings``. Services, the Redis client (queues, heartbeats) and
    the job submitter may be passed in; by default they are opened from ``settings``."""
    password = settings.ops_password
    if not password:
        raise ConfigurationError(
            "HLSVAULT_OPS_PASSWORD is not set: the ops app (dashboard, metrics, retry and "
            "cancel) is only served behind HTTP Basic auth as user 'ops'. Generate one with "
            "python3 -c 'import secrets; print(secrets.token_urlsafe(24))'"
        )
    services = services if services is not None else build_services(settings)
    if redis is None and settings.redis_url is not None:
        from pipeline.jobs_redis import connect

        redis = connect(settings.redis_url)
    submit = submit if submit is not None else _default_submit(services)
    ops = OpsApp(settings, services=services, redis_client=redis, submit=submit,
                 password=password)
    routes: list[BaseRoute] = [
        Route("/", ops.jobs),
        Route("/jobs/{job_id}", ops.job),
        Route("/jobs/{job_id}/retry", ops.retry, methods=["POST"]),
        Route("/jobs/{job_id}/cancel", ops.cancel, methods=["POST"]),
        Route("/api/jobs", ops.api_jobs),
        Route("/api/jobs/{job_id}", ops.api_job),
        Route("/api/fleet", ops.api_fleet),
        Route("/metrics", ops.metrics),
        Route("/static/hls.min.js", ops.hls_js),
        Route("/healthz", ops.healthz),
        *_webhook_routes(settings, submit),
    ]
    middleware = [
        Middleware(AccessLog),
        Middleware(BasicAuth, password=password, public_paths=PUBLIC_PATHS),
    ]
    return Starlette(routes=routes, middleware=middleware)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m dashboard [--host H] [--port P]``: serve the ops app with uvicorn."""
    import uvicorn

    from pipeline.logs import ensure_logging
    from pipeline.settings import load_settings

    parser = argparse.ArgumentParser(prog="python -m dashboard", description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=None, help="port (default: $OPS_PORT, 8001)")
    args = parser.parse_args(argv)
    try:
        settings = load_settings()
        app = create_app(settings)
    except ConfigurationError as error:
        print(f"hlsvault ops: {error}", file=sys.stderr)
        return 2
    ensure_logging()
    uvicorn.run(
        app,
        host=args.host,
        port=args.port if args.port is not None else settings.ops_port,
        access_log=False,
        log_config=None,
        timeout_keep_alive=5,
    )
    return 0
