"""The ops app: dashboard, JSON API and Prometheus metrics, built by :func:`create_app`.

    GET  /                       jobs list (?status=queued|running|succeeded|failed|cancelled)
                                 with each status's count, throughput of the last hour, queues,
                                 workers; 400 for an unknown status
    GET  /jobs/{job_id}          one job: per-stage timeline, Retry / Cancel, preview player
                                 (or why there is none); 404 no such job
    POST /jobs/{job_id}/retry    a failed or cancelled job again, as a new job with the same
                                 spec (dashboard/actions.py: 303, 403, 404, 409)
    POST /jobs/{job_id}/cancel   mark a job cancelled; stages still queued skip it
    GET  /assets, /assets/{asset}                    every asset; one asset with its versions
    GET  /assets/{asset}/{rekey|revoke}              the confirmation step of an asset action
    POST /assets/{asset}/{rekey|revoke}              the action (dashboard/assetactions.py:
                                                     303, 400 unconfirmed, 403, 404)
    GET  /api/jobs, /api/jobs/{job_id}, /api/fleet    what the pages poll (JSON); 400, 404
    GET  /metrics                Prometheus text format
    GET  /static/{name}          the pages' stylesheet and scripts, and hls.js (503 when hls.js
                                 is not installed)
    GET  /healthz                unauthenticated
    POST /v1/jobs                the HMAC-signed webhook (dashboard/webhook.py), unauthenticated

Everything else needs HTTP Basic auth as ``ops`` with ``HLSVAULT_OPS_PASSWORD``; without a
password only /healthz and the webhook are served, and every other path answers 503 saying what
to set (dashboard/auth.py). Forms are CSRF-safe: a POST must carry an HMAC token bound to the
action and job, and a cross-origin ``Origin`` header is refused outright. Every response carries
the security headers of dashboard/headers.py (no framing, a strict CSP, nosniff).

Modules: auth (who may), reading (what is read, redacted once), pages and api (the views),
actions (retry, cancel), library, assetviews and assetactions (the Assets pages, Re-key,
Revoke), assets (static files), headers, metrics, webhook, serve (the process).
"""

from __future__ import annotations

import redis
import structlog
from redis.exceptions import RedisError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import BaseRoute, Route

from pipeline.errors import HlsvaultError
from pipeline.http import AccessLog, status_for
from pipeline.logs import redact_text
from pipeline.services import Services, build_services
from pipeline.settings import Settings
from workers.sending import Submit, submitter

from .actions import Actions
from .api import Api
from .assetactions import AssetPages
from .assets import static_file
from .auth import BasicAuth, CsrfTokens
from .headers import SecurityHeaders, content_security_policy, origin_of
from .library import LibraryReader
from .pages import Pages, Previews
from .reading import OpsReader
from .webhook import webhook_routes

log = structlog.get_logger("hlsvault.ops")


def healthz(request: Request) -> Response:
    return PlainTextResponse("ok\n")


def create_app(
    settings: Settings,
    *,
    services: Services | None = None,
    redis: redis.Redis | None = None,
    submit: Submit | None = None,
) -> Starlette:
    """Build the ops app for ``settings``. Services, the Redis client (queues, heartbeats,
    parked messages) and the job submitter may be passed in; by default they are opened from
    ``settings``. Without ``settings.ops_password`` the dashboard is not served at all."""
    services = services if services is not None else build_services(settings)
    submit = submit if submit is not None else submitter(settings, services=services)
    routes: list[BaseRoute] = [
        Route("/healthz", healthz),
        *webhook_routes(settings, submit),
    ]
    if settings.ops_password:
        routes += _dashboard_routes(settings, settings.ops_password, services, redis, submit)
    player = (origin_of(settings.public_url), origin_of(settings.cdn_url))
    middleware = [
        # Outermost, so that the 401 and 503 of BasicAuth carry the headers too.
        Middleware(SecurityHeaders, csp=content_security_policy(player)),
        Middleware(AccessLog, logger=log),
        Middleware(BasicAuth, password=settings.ops_password),
    ]
    return Starlette(
        routes=routes, middleware=middleware,
        exception_handlers={
            HlsvaultError: _tree_error, RedisError: _redis_error, HTTPException: _http_error,
        },
    )


def _http_error(request: Request, error: Exception) -> Response:
    """Starlette's own refusals (an unknown path, a GET of the webhook) as JSON, like the rest."""
    assert isinstance(error, HTTPException)  # noqa: S101 - registered for that class only
    return JSONResponse({"error": error.detail}, status_code=error.status_code,
                        headers={**(error.headers or {}), "Cache-Control": "no-store"})


def _tree_error(request: Request, error: Exception) -> Response:
    """An error of the tree answered with its status and its reason, as JSON (never a 500
    page): a fleet-only action on embedded stores, storage that does not answer."""
    assert isinstance(error, HlsvaultError)  # noqa: S101 - registered for that class only
    status = status_for(error)
    return JSONResponse({"error": redact_text(str(error))}, status_code=status,
                        headers={"Cache-Control": "no-store"})


def _redis_error(request: Request, error: Exception) -> Response:
    return JSONResponse(
        {"error": f"Redis did not answer ({type(error).__name__}); check REDIS_URL and that "
                  "Redis is up, then reload"},
        status_code=503, headers={"Cache-Control": "no-store"},
    )


def _dashboard_routes(
    settings: Settings,
    password: str,
    services: Services,
    client: redis.Redis | None,
    submit: Submit,
) -> list[BaseRoute]:
    if client is None and settings.redis_url is not None:
        from pipeline.redisconn import connect

        client = connect(settings.redis_url)
    reader = OpsReader(services, redis_client=client,
                       heartbeat_timeout_ms=settings.heartbeat_timeout_ms)
    csrf = CsrfTokens(password)
    pages = Pages(reader, csrf=csrf, previews=Previews(settings))
    api = Api(reader)
    actions = Actions(services.jobs, csrf=csrf, submit=submit)
    library = AssetPages(
        services,
        LibraryReader(services, redis_client=client, key_server_url=settings.public_url),
        csrf=csrf, submit=submit,
    )
    return [
        Route("/", pages.jobs),
        Route("/assets", library.assets),
        Route("/assets/{asset}", library.asset),
        Route("/assets/{asset}/{action}", library.confirm, methods=["GET"]),
        Route("/assets/{asset}/{action}", library.act, methods=["POST"]),
        Route("/jobs/{job_id}", pages.job),
        Route("/jobs/{job_id}/retry", actions.retry, methods=["POST"]),
        Route("/jobs/{job_id}/cancel", actions.cancel, methods=["POST"]),
        Route("/api/jobs", api.jobs),
        Route("/api/jobs/{job_id}", api.job),
        Route("/api/fleet", api.fleet),
        Route("/metrics", api.metrics),
        Route("/static/{name}", static_file),
    ]
