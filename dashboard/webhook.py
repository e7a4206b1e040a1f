"""``POST /v1/jobs``: jobs submitted by the customer's backend, signed with a shared secret.

The request carries ``X-Hlsvault-Signature: t=<unix seconds>,v1=<hex>``, where the hex is
HMAC-SHA256 under ``HLSVAULT_WEBHOOK_SECRET`` of ``"<t>.<raw body>"``. A request signed more
than five minutes away from now (either way) is refused, so a captured request cannot be
replayed later; within the window a replay is harmless, since the same object is the same job.

The body is a job request or an S3 event notification (see :mod:`pipeline.ingest`), at most
:data:`~pipeline.documents.MAX_DOCUMENT_BYTES` and nested at most
:data:`~pipeline.documents.MAX_DEPTH` deep. Answers, all JSON (``{"error": "<what to do>"}``
when refused), with the status :func:`pipeline.http.status_for` gives the error:
202 ``{"job_id", "duplicate", "jobs": [...]}``; 400 malformed (:class:`BadSpec`); 401 unsigned,
badly signed or stale (:class:`Unauthenticated`); 413 too large (:class:`TooLarge`); 422 a
source that may not or cannot be packaged (:class:`InvalidSource`); 503 not configured, or
Redis or S3 not answering (:class:`ConfigurationError`, :class:`TransientError`).
"""

from __future__ import annotations

import hashlib
import hmac
import threading
import time
from collections.abc import Callable

import structlog
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from pipeline.documents import MAX_DOCUMENT_BYTES
from pipeline.errors import (
    BadSpec,
    ConfigurationError,
    HlsvaultError,
    InvalidSource,
    TooLarge,
    TransientError,
    Unauthenticated,
)
from pipeline.http import status_for
from pipeline.ingest import Accepted, Ingest
from pipeline.jobs import JobSpec
from pipeline.settings import Settings

log = structlog.get_logger(__name__)

SIGNATURE_HEADER = "X-Hlsvault-Signature"
#: How far a signature's timestamp may be from the server's clock: room for clock skew and a
#: few retries, short enough that a captured request soon stops being accepted.
REPLAY_WINDOW_S = 300
#: Unix seconds have 10 digits until the year 2286; more is not a time anyone signs at.
MAX_TIMESTAMP_DIGITS = 12
#: A sender passes one or two signatures (during a secret rotation); more is not a signer.
MAX_SIGNATURES = 4
_HEADER_FORM = "t=<unix seconds>,v1=<hex HMAC-SHA256 of '<t>.<body>'>"


def sign(secret: str, body: bytes, timestamp: int) -> str:
    """The signature header value for ``body`` sent at ``timestamp``: what a sender computes."""
    return f"t={timestamp},v1={_digest(secret, body, str(timestamp))}"


def _digest(secret: str, body: bytes, timestamp: str) -> str:
    return hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()


def verify_signature(secret: str, header: str | None, body: bytes, *, now: float) -> None:
    """Raise :class:`Unauthenticated` unless ``header`` signs ``body`` within the window."""
    if not header:
        raise Unauthenticated(f"missing {SIGNATURE_HEADER} header; sign the body as "
                              f"{_HEADER_FORM}")
    timestamp, candidates = "", []
    for part in header.split(","):
        name, _, value = part.strip().partition("=")
        if name == "t":
            timestamp = value
        elif name == "v1":
            candidates.append(value)
    # isascii: str.isdigit also accepts digits like '¹' that int() refuses. The length bound
    # keeps int() and the comparison below in range of a clock (a float overflows at 309).
    well_formed = (
        timestamp.isascii() and timestamp.isdigit() and len(timestamp) <= MAX_TIMESTAMP_DIGITS
    )
    if not well_formed or not 0 < len(candidates) <= MAX_SIGNATURES:
        raise Unauthenticated(f"malformed {SIGNATURE_HEADER} header; expected {_HEADER_FORM}")
    if abs(int(now) - int(timestamp)) > REPLAY_WINDOW_S:
        raise Unauthenticated(f"signature timestamp is more than {REPLAY_WINDOW_S} s from the "
                              "server's clock; sign each request when sending it and check "
                              "the sender's clock (NTP)")
    expected = _digest(secret, body, timestamp)
    # Every candidate is compared, so the time taken says nothing about which one was close.
    matches = [
        hmac.compare_digest(expected.encode(), candidate.encode("utf-8", "replace"))
        for candidate in candidates
    ]
    if not any(matches):
        raise Unauthenticated("signature does not match the body; sign the exact raw body "
                              "with HLSVAULT_WEBHOOK_SECRET")


async def read_capped(request: Request, limit: int) -> bytes:
    """The body, refused as soon as it exceeds ``limit``, whatever Content-Length says."""
    declared = request.headers.get("content-length", "")
    if declared.isascii() and declared.isdigit() and int(declared) > limit:
        raise TooLarge(f"body of {declared[:20]} bytes is over the {limit}-byte limit")
    body = bytearray()
    try:
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise TooLarge(f"body is over the {limit}-byte limit")
    except ClientDisconnect:
        raise BadSpec("the client went away before sending the whole body") from None
    return bytes(body)


def refusal(error: HlsvaultError) -> JSONResponse:
    """The JSON answer for ``error``, with the status :func:`pipeline.http.status_for` gives."""
    status = status_for(error)
    if isinstance(error, TransientError):
        log.warning("webhook request failed; the sender should retry", reason=str(error))
    else:
        log.info("webhook request refused", status=status, reason=str(error))
    return JSONResponse({"error": str(error)}, status_code=status,
                        headers={"Cache-Control": "no-store"})


def webhook_routes(
    settings: Settings,
    submit: Callable[[JobSpec], None],
    *,
    ingest: Ingest | None = None,
) -> list[Route]:
    """The webhook's routes; ``submit(spec)`` records and enqueues a job.

    Redis and S3 clients are opened on the first request (``ingest`` replaces them), so
    building the routes has no side effect. Without ``HLSVAULT_WEBHOOK_SECRET`` or
    ``REDIS_URL`` the route answers 503 saying which is missing.
    """
    lock = threading.Lock()
    opened: list[Ingest] = [ingest] if ingest is not None else []

    def get_ingest() -> Ingest:
        with lock:
            if not opened:
                opened.append(_open_ingest(settings, submit))
            return opened[0]

    def accept(body: bytes) -> list[Accepted]:
        accepted = get_ingest().accept_body(body)
        if not accepted:
            raise InvalidSource("the S3 event has no ObjectCreated record: nothing to package")
        return accepted

    async def create_job(request: Request) -> Response:
        try:
            secret = _secret(settings)
            body = await read_capped(request, MAX_DOCUMENT_BYTES)
            verify_signature(secret, request.headers.get(SIGNATURE_HEADER), body, now=time.time())
            accepted = await run_in_threadpool(accept, body)
        except HlsvaultError as error:
            return refusal(error)
        for item in accepted:
            log.info("webhook job", job_id=item.job_id, asset=item.asset,
                     duplicate=item.duplicate)
        first = accepted[0]
        return JSONResponse(
            {"job_id": first.job_id, "duplicate": first.duplicate,
             "jobs": [item.to_dict() for item in accepted]},
            status_code=202,
        )

    return [Route("/v1/jobs", create_job, methods=["POST"])]


def _secret(settings: Settings) -> str:
    if settings.webhook_secret is None or settings.redis_url is None:
        missing = "HLSVAULT_WEBHOOK_SECRET" if settings.webhook_secret is None else "REDIS_URL"
        raise ConfigurationError(f"the webhook is disabled: set {missing} on the ops process")
    return settings.webhook_secret


def _open_ingest(settings: Settings, submit: Callable[[JobSpec], None]) -> Ingest:
    from pipeline.aws import make_client
    from pipeline.jobs import JobStore
    from pipeline.jobs.redis import RedisRecordBackend
    from pipeline.redisconn import connect

    assert settings.redis_url is not None  # noqa: S101 - checked by the route before calling
    client = connect(settings.redis_url)
    return Ingest(
        settings,
        redis_client=client,
        s3=make_client(),
        jobs=JobStore(RedisRecordBackend(client)),
        submit=submit,
    )
