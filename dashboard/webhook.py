"""``POST /v1/jobs``: jobs submitted by the customer's backend, signed with a shared secret.

The request carries ``X-Hlsvault-Signature: t=<unix seconds>,v1=<hex>``, where the hex is
HMAC-SHA256 under ``HLSVAULT_WEBHOOK_SECRET`` of ``"<t>.<raw body>"``. A request signed more
than five minutes away from now (either way) is refused, so a captured request cannot be
replayed later; within the window a replay is harmless, since the same object is the same job.

The body is a job request or an S3 event notification (see :mod:`pipeline.ingest`). Answers,
all JSON: 202 ``{"job_id", "duplicate", "jobs": [...]}``; 400 malformed; 401 unsigned, badly
signed or stale; 413 too large; 422 refused source; 503 not configured or storage unreachable.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
import time
from collections.abc import Callable
from typing import Any

import structlog
from redis.exceptions import RedisError
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from pipeline.errors import TransientError
from pipeline.ingest import Accepted, Ingest, IngestError, parse_request
from pipeline.jobs import JobSpec
from pipeline.settings import Settings

log = structlog.get_logger(__name__)

SIGNATURE_HEADER = "X-Hlsvault-Signature"
#: How far a signature's timestamp may be from the server's clock: room for clock skew and a
#: few retries, short enough that a captured request soon stops being accepted.
REPLAY_WINDOW_S = 300
#: A job request is a few hundred bytes and an S3 event a few KB; nothing legitimate is bigger.
MAX_BODY_BYTES = 64 * 1024


def sign(secret: str, body: bytes, timestamp: int) -> str:
    """The signature header value for ``body`` sent at ``timestamp``: what a sender computes."""
    return f"t={timestamp},v1={_digest(secret, body, str(timestamp))}"


def _digest(secret: str, body: bytes, timestamp: str) -> str:
    return hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()


def verify_signature(secret: str, header: str | None, body: bytes, *, now: float) -> None:
    """Raise ``IngestError(401)`` unless ``header`` signs ``body`` within the replay window."""
    if not header:
        raise IngestError(401, f"missing {SIGNATURE_HEADER} header; sign the body as "
                               "t=<unix seconds>,v1=<hex HMAC-SHA256 of '<t>.<body>'>")
    timestamp, candidates = "", []
    for part in header.split(","):
        name, _, value = part.strip().partition("=")
        if name == "t":
            timestamp = value
        elif name == "v1":
            candidates.append(value)
    # isascii: str.isdigit also accepts digits like '¹' that int() refuses.
    if not (timestamp.isascii() and timestamp.isdigit()) or not candidates:
        raise IngestError(401, f"malformed {SIGNATURE_HEADER} header; expected "
                               "t=<unix seconds>,v1=<hex>")
    if abs(now - int(timestamp)) > REPLAY_WINDOW_S:
        raise IngestError(401, f"signature timestamp is more than {REPLAY_WINDOW_S} s from the "
                               "server's clock; sign each request when sending it and check "
                               "the sender's clock (NTP)")
    expected = _digest(secret, body, timestamp)
    # Every candidate is compared, so the time taken says nothing about which one was close.
    matches = [
        hmac.compare_digest(expected.encode(), candidate.encode("utf-8", "replace"))
        for candidate in candidates
    ]
    if not any(matches):
        raise IngestError(401, "signature does not match the body; sign the exact raw body "
                               "with HLSVAULT_WEBHOOK_SECRET")


async def read_capped(request: Request, limit: int) -> bytes:
    """The body, refused with 413 as soon as it exceeds ``limit``, whatever Content-Length says."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise IngestError(413, f"body of {declared} bytes is over the {limit}-byte limit")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise IngestError(413, f"body is over the {limit}-byte limit")
    return bytes(body)


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


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

    def accept(document: Any) -> list[Accepted]:
        requests = parse_request(document)
        if not requests:
            raise IngestError(422, "the S3 event has no ObjectCreated record: nothing to package")
        target = get_ingest()
        return [target.accept(request) for request in requests]

    async def create_job(request: Request) -> Response:
        secret = settings.webhook_secret
        if secret is None or settings.redis_url is None:
            missing = "HLSVAULT_WEBHOOK_SECRET" if secret is None else "REDIS_URL"
            return _error(503, f"the webhook is disabled: set {missing} on the ops process")
        try:
            body = await read_capped(request, MAX_BODY_BYTES)
            verify_signature(secret, request.headers.get(SIGNATURE_HEADER), body, now=time.time())
            try:
                document = json.loads(body)
            except ValueError as error:  # JSONDecodeError and UnicodeDecodeError alike
                reason = error.msg if isinstance(error, json.JSONDecodeError) else "not UTF-8"
                raise IngestError(400, f"body is not JSON ({reason}); send "
                                       '{"source": "s3://bucket/key"}') from None
            accepted = await run_in_threadpool(accept, document)
        except IngestError as error:
            log.info("webhook request refused", status=error.status, reason=error.message)
            return _error(error.status, error.message)
        except ClientDisconnect:
            return _error(400, "the client went away before sending the whole body")
        except (TransientError, RedisError) as error:
            log.warning("webhook request failed; sender should retry", reason=str(error))
            return _error(503, f"{error}; retry the same request later")
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


def _open_ingest(settings: Settings, submit: Callable[[JobSpec], None]) -> Ingest:
    from pipeline.aws import make_client
    from pipeline.jobs import JobStore
    from pipeline.jobs_redis import RedisRecordBackend, connect

    assert settings.redis_url is not None  # noqa: S101 - checked by the route before calling
    client = connect(settings.redis_url)
    return Ingest(
        settings,
        redis_client=client,
        s3=make_client(),
        jobs=JobStore(RedisRecordBackend(client)),
        submit=submit,
    )
