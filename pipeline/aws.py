"""AWS clients and AWS errors, in one place.

Every client comes from :func:`make_client`, with hlsvault's timeouts and retry bound, and
honours boto3's own configuration chain (credentials, region, ``AWS_ENDPOINT_URL``). Every
botocore error is read with :func:`error_code` and sorted by :func:`classify`, so that "not
found", "refused" and "try again" mean the same thing for every store, source and queue.
"""

from __future__ import annotations

import os
import threading
from enum import Enum
from typing import TYPE_CHECKING, Any

from .errors import HlsvaultError, NotFound, StorageRefused, TransientError

if TYPE_CHECKING:
    import boto3

#: Seconds to open a connection; S3 answers in milliseconds when it is up.
CONNECT_TIMEOUT_S = 5
#: Seconds to wait for a response byte; generous for multi-megabyte segment uploads, and above
#: SQS's 20 s long poll.
READ_TIMEOUT_S = 60
#: botocore's own retry bound for throttling and 5xx, before the stage's retries take over.
MAX_ATTEMPTS = 5
#: Parallel connections per client; uploads run this many segments at once.
MAX_POOL_CONNECTIONS = 32

#: Error codes that mean the thing asked for does not exist.
NOT_FOUND_CODES = frozenset(
    {"404", "NoSuchKey", "NotFound", "NoSuchVersion", "NoSuchDistribution", "NoSuchInvalidation"}
)
#: Error codes that waiting will not change: credentials, policy, a bucket that is not there.
REFUSED_CODES = frozenset(
    {
        "403", "AccessDenied", "Forbidden", "AllAccessDisabled", "NoSuchBucket",
        "InvalidAccessKeyId", "SignatureDoesNotMatch", "AccountProblem", "InvalidBucketName",
        "AccessDeniedException", "ExpiredToken", "InvalidToken",
    }
)
#: Conditional writes that lost a race (If-None-Match / If-Match).
PRECONDITION_CODES = frozenset({"PreconditionFailed", "ConditionalRequestConflict", "412"})


class Outcome(Enum):
    """What a botocore error means for the caller."""

    NOT_FOUND = "not found"
    REFUSED = "refused"
    PRECONDITION = "precondition failed"
    TRANSIENT = "transient"


def error_code(error: BaseException) -> str:
    """The AWS error code of a botocore ``ClientError`` (``NoSuchKey``, ``403`` …), or ``""``."""
    response = getattr(error, "response", None)
    if not isinstance(response, dict):
        return ""
    code = response.get("Error", {}).get("Code")
    if code:
        return str(code)
    status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return str(status) if status else ""


def classify(error: BaseException) -> Outcome:
    """Sort a botocore error (ClientError or BotoCoreError) into an :class:`Outcome`."""
    code = error_code(error)
    if code in NOT_FOUND_CODES:
        return Outcome.NOT_FOUND
    if code in REFUSED_CODES:
        return Outcome.REFUSED
    if code in PRECONDITION_CODES:
        return Outcome.PRECONDITION
    return Outcome.TRANSIENT


def describe(error: BaseException) -> str:
    """A short, credential-free name for a botocore error: its code, or its class name."""
    return error_code(error) or type(error).__name__


def translate(error: BaseException, what: str) -> HlsvaultError:
    """The hlsvault error for a botocore error raised while doing ``what`` (``"S3 GET of
    s3://bucket/key"``): not found, refused (IAM, no such bucket) or transient."""
    outcome = classify(error)
    if outcome is Outcome.NOT_FOUND:
        return NotFound(f"{what}: not found ({describe(error)})")
    if outcome is Outcome.REFUSED:
        return StorageRefused(
            f"{what} was refused: {describe(error)}; check the bucket or distribution name and "
            "the IAM policy of this process's AWS credentials"
        )
    return TransientError(f"{what} failed: {describe(error)}")


_sessions: dict[int, boto3.session.Session] = {}
_sessions_lock = threading.Lock()
_config: Any = None


def make_client(service: str = "s3") -> Any:
    """A boto3 client with hlsvault's timeouts and retry bound.

    Clients come from one session per process (a fresh session costs ~60 ms; a client from a
    warm one ~4 ms). Sessions are not thread-safe to create clients from, hence the lock, and
    not fork-safe, hence one per process id (dramatiq forks its worker processes). boto3 is
    imported here, on first use: it costs ~0.3 s, and embedded mode never needs it."""
    global _config
    import boto3
    from botocore.config import Config

    with _sessions_lock:
        if _config is None:
            _config = Config(
                connect_timeout=CONNECT_TIMEOUT_S,
                read_timeout=READ_TIMEOUT_S,
                retries={"max_attempts": MAX_ATTEMPTS, "mode": "adaptive"},
                max_pool_connections=MAX_POOL_CONNECTIONS,
            )
        session = _sessions.get(os.getpid())
        if session is None:
            session = _sessions[os.getpid()] = boto3.session.Session()
        config = _config
        if service == "s3":
            # Presigned download URLs signed with SigV4, which every region accepts (botocore
            # would presign with the deprecated SigV2 in us-east-1).
            config = _config.merge(Config(signature_version="s3v4"))
        # The service name is chosen at run time; boto3-stubs type only literal names.
        return session.client(service, config=config)  # type: ignore[call-overload]


_shared: dict[tuple[int, str], Any] = {}


def shared_client(service: str = "s3") -> Any:
    """This process's one client for ``service`` (:func:`make_client`'s, made on first use):
    for calls made once per stage, where even a warm session's ~4 ms per new client shows.
    boto3 clients are safe to share between threads."""
    key = (os.getpid(), service)
    client = _shared.get(key)
    if client is None:
        client = make_client(service)
        with _sessions_lock:
            client = _shared.setdefault(key, client)
    return client


def botocore_errors() -> tuple[type[BaseException], ...]:
    """The botocore exception classes a call can raise, for ``except`` clauses."""
    from botocore.exceptions import BotoCoreError, ClientError

    return (ClientError, BotoCoreError)
