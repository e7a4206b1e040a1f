"""Ingest: jobs that arrive by themselves, from the webhook or from S3 event notifications.

A request is either a job request, ``{"source": "s3://bucket/key", "asset": …, "ladder": …,
"segment_seconds": …, "key_rotation_segments": …}``, or an S3 event notification document
(``{"Records": [{"eventName": "ObjectCreated:Put", "s3": {…}}]}``), as S3 sends it to SQS.

Every source is an object in one of ``settings.source_buckets``; anything else is refused.
The object is read with a HEAD, which gives its ETag and its user metadata:

- the asset id is the request's ``asset``, else the object's ``asset`` metadata
  (``x-amz-meta-asset``), else derived from the key (:func:`asset_from_key`);
- the ladder is the request's ``ladder``, else the object's ``ladder`` metadata, else
  ``default`` (as for ``hlsvault submit``).

The same object (bucket, key, and its ETag or version id) with the same asset is one job:
:class:`Ingest` records ``hlsvault:ingest:<sha256>`` → job id with SET NX, so a repeat — a
retried webhook, a redelivered SQS message — answers the existing job and enqueues nothing.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any
from urllib.parse import unquote_plus

import redis
from botocore.exceptions import BotoCoreError, ClientError

from .errors import BadSpec, HlsvaultError, TransientError
from .jobs import JobSpec, JobStore, UnknownJob, new_job_spec
from .layout import check_asset_id
from .settings import Settings

#: A repeat of the same object is answered with its first job for this long; S3 and SQS
#: redeliver within minutes, and a customer's backend retries within days at most.
IDEMPOTENCY_TTL_S = 30 * 24 * 3600
#: A claim whose job record is still missing after this long belongs to a process that died
#: between claiming and enqueueing; it may be taken over. Far above a Redis round trip.
CLAIM_GRACE_S = 60
#: The longest asset id the key server accepts (keys.ASSET_ID_PATTERN).
MAX_ASSET_ID = 128
DEFAULT_LADDER = "default"
_LEDGER_PREFIX = "hlsvault:ingest:"
_NOT_ASSET_CHAR = re.compile(r"[^A-Za-z0-9_-]+")
_OPTIONS = ("source", "asset", "ladder", "segment_seconds", "key_rotation_segments")

# Replace a stale claim only if it still names the job we found missing.
_TAKE_OVER = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[2], 'EX', ARGV[3])
  return 1
end
return 0
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


class IngestError(HlsvaultError):
    """A request refused for good, with the HTTP status that says whose fault it is:
    400 malformed request, 422 well-formed but refused (bucket not allowed, object missing)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class SourceRequest:
    """One object to package, and the options that came with it."""

    bucket: str
    key: str
    #: The version an S3 event names (versioned buckets); None means the current version.
    version_id: str | None = None
    asset: str | None = None
    ladder: str | None = None
    segment_seconds: float = 6.0
    key_rotation_segments: int = 0

    @property
    def source(self) -> str:
        return f"s3://{self.bucket}/{self.key}"


@dataclass(frozen=True)
class Accepted:
    """The job a source became; ``duplicate`` when it was already a job before this request."""

    job_id: str
    asset: str
    source: str
    duplicate: bool

    def to_dict(self) -> dict[str, Any]:
        return {"job_id": self.job_id, "asset": self.asset, "source": self.source,
                "duplicate": self.duplicate}


def is_test_event(document: Any) -> bool:
    """The ``s3:TestEvent`` S3 sends once when a notification configuration is saved."""
    return isinstance(document, dict) and document.get("Event") == "s3:TestEvent"


def parse_request(document: Any) -> list[SourceRequest]:
    """The sources a job request or S3 event document names (ObjectCreated records only)."""
    if not isinstance(document, dict):
        raise IngestError(400, 'the body must be a JSON object: {"source": "s3://bucket/key"} '
                               "or an S3 event notification")
    if "Records" in document:
        return parse_s3_event(document)
    return [parse_job_request(document)]


def parse_job_request(document: dict[str, Any]) -> SourceRequest:
    unknown = sorted(set(document) - set(_OPTIONS))
    if unknown:
        raise IngestError(400, f"unknown field(s) {', '.join(unknown)}; allowed: "
                               f"{', '.join(_OPTIONS)}")
    source = document.get("source")
    if not isinstance(source, str) or not source.startswith("s3://"):
        raise IngestError(400, 'field "source" must be a string like "s3://bucket/key"')
    bucket, _, key = source.removeprefix("s3://").partition("/")
    if not bucket or not key:
        raise IngestError(400, f"source {source[:200]!r} is not of the form s3://bucket/key")
    asset = _optional_str(document, "asset")
    ladder = _optional_str(document, "ladder")
    seconds = document.get("segment_seconds", 6.0)
    rotation = document.get("key_rotation_segments", 0)
    if isinstance(seconds, bool) or not isinstance(seconds, int | float):
        raise IngestError(400, 'field "segment_seconds" must be a number, e.g. 6')
    if isinstance(rotation, bool) or not isinstance(rotation, int):
        raise IngestError(400, 'field "key_rotation_segments" must be a whole number (0 = off)')
    return SourceRequest(bucket=bucket, key=key, asset=asset, ladder=ladder,
                         segment_seconds=float(seconds), key_rotation_segments=rotation)


def parse_s3_event(document: dict[str, Any]) -> list[SourceRequest]:
    """The created objects of an S3 event notification; other events (removals) are skipped.

    Object keys arrive URL-encoded the way S3 encodes them (spaces as ``+``), so they are
    decoded with ``unquote_plus``.
    """
    records = document.get("Records")
    if not isinstance(records, list):
        raise IngestError(400, 'field "Records" must be a list of S3 event records')
    requests = []
    for index, record in enumerate(records):
        try:
            name = record["eventName"]
            bucket = record["s3"]["bucket"]["name"]
            obj = record["s3"]["object"]
            key = unquote_plus(obj["key"])
        except (KeyError, TypeError):
            raise IngestError(400, f"Records[{index}] is not an S3 event record: it needs "
                                   "eventName, s3.bucket.name and s3.object.key") from None
        if not all(isinstance(v, str) and v for v in (name, bucket, key)):
            raise IngestError(400, f"Records[{index}]: eventName, bucket and key must be strings")
        if not name.removeprefix("s3:").startswith("ObjectCreated:"):
            continue
        version_id = obj.get("versionId")
        # Unversioned buckets may say "null"; that names no version to HEAD.
        version_id = str(version_id) if version_id and version_id != "null" else None
        requests.append(SourceRequest(bucket=bucket, key=key, version_id=version_id))
    return requests


def asset_from_key(key: str) -> str:
    """The asset id of an object without ``asset`` metadata: its file name without the last
    extension, every run of characters outside ``[A-Za-z0-9_-]`` replaced by ``-``, leading
    and trailing ``-``/``_`` dropped (an id starts with a letter or digit), cut to 128
    characters.

    ``uploads/2024/My Film (final).mp4`` → ``My-Film-final``.
    """
    stem = PurePosixPath(key).stem
    asset = _NOT_ASSET_CHAR.sub("-", stem).strip("-_")[:MAX_ASSET_ID]
    if not asset:
        raise IngestError(422, f"no asset id can be derived from key {key[:200]!r}; set the "
                               "object's x-amz-meta-asset metadata or pass \"asset\"")
    return asset


def ledger_key(bucket: str, key: str, revision: str, asset: str) -> str:
    digest = hashlib.sha256(json.dumps([bucket, key, revision, asset]).encode()).hexdigest()
    return _LEDGER_PREFIX + digest


class Ingest:
    """Turns source requests into jobs, each object once.

    ``submit(spec)`` records and enqueues a job (``workers.flow.start`` in the fleet); ``jobs``
    is read to tell a dead claim from a job in flight.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        redis_client: redis.Redis,
        s3: Any,
        jobs: JobStore,
        submit: Callable[[JobSpec], None],
        ttl_s: int = IDEMPOTENCY_TTL_S,
    ) -> None:
        self.settings = settings
        self.redis = redis_client
        self.s3 = s3
        self.jobs = jobs
        self.submit = submit
        self.ttl_s = ttl_s
        self._take_over = redis_client.register_script(_TAKE_OVER)
        self._release = redis_client.register_script(_RELEASE)

    def check_bucket(self, bucket: str) -> None:
        allowed = self.settings.source_buckets
        if not allowed:
            raise IngestError(422, "no source bucket is allowed: set HLSVAULT_SOURCE_BUCKETS to "
                                   "the comma-separated buckets jobs may read from")
        if bucket not in allowed:
            raise IngestError(422, f"bucket {bucket[:100]!r} is not an allowed source bucket; "
                                   "add it to HLSVAULT_SOURCE_BUCKETS or upload to one of "
                                   f"{', '.join(allowed)}")

    def accept(self, request: SourceRequest) -> Accepted:
        """The job for ``request``'s object: the existing one, or a new one just enqueued."""
        self.check_bucket(request.bucket)
        head = self._head(request)
        metadata = {k.lower(): v for k, v in (head.get("Metadata") or {}).items()}
        asset = request.asset or _metadata_asset(metadata) or asset_from_key(request.key)
        ladder = request.ladder or metadata.get("ladder") or DEFAULT_LADDER
        # What HEAD saw identifies the object's content, whichever way it was named: an
        # event and a webhook request for the same upload are one job.
        revision = head.get("VersionId") or str(head.get("ETag", "")).strip('"')
        try:
            spec = new_job_spec(
                request.source, asset=asset, ladder=ladder,
                segment_seconds=request.segment_seconds,
                key_rotation_segments=request.key_rotation_segments,
            )
        except BadSpec as error:
            raise IngestError(400, str(error)) from None
        ledger = ledger_key(request.bucket, request.key, str(revision), asset)
        existing = self._claim(ledger, spec.job_id)
        if existing is not None:
            return Accepted(existing, asset, request.source, duplicate=True)
        try:
            self.submit(spec)
        except BaseException:
            # Not enqueued: let the retry of this request claim the object again.
            self._release(keys=[ledger], args=[spec.job_id])
            raise
        return Accepted(spec.job_id, asset, request.source, duplicate=False)

    def _claim(self, ledger: str, job_id: str) -> str | None:
        """None when ``job_id`` now owns the object, else the job id that already does."""
        for _ in range(3):
            if self.redis.set(ledger, job_id, nx=True, ex=self.ttl_s):
                return None
            existing = self.redis.get(ledger)
            if existing is None:
                continue  # expired between SET and GET
            owner = str(existing)
            if self._job_exists(owner) or not self._claim_is_stale(ledger):
                return owner
            if self._take_over(keys=[ledger], args=[owner, job_id, self.ttl_s]):
                return None
        raise TransientError("the ingest ledger in Redis keeps changing; retry the request")

    def _job_exists(self, job_id: str) -> bool:
        try:
            self.jobs.get(job_id)
        except UnknownJob:
            return False
        return True

    def _claim_is_stale(self, ledger: str) -> bool:
        remaining = int(self.redis.ttl(ledger))
        return remaining >= 0 and self.ttl_s - remaining > CLAIM_GRACE_S

    def _head(self, request: SourceRequest) -> dict[str, Any]:
        extra = {"VersionId": request.version_id} if request.version_id else {}
        try:
            head: dict[str, Any] = self.s3.head_object(
                Bucket=request.bucket, Key=request.key, **extra
            )
        except ClientError as error:
            code = str(error.response.get("Error", {}).get("Code", ""))
            if code in ("404", "NoSuchKey", "NotFound", "NoSuchBucket", "NoSuchVersion"):
                raise IngestError(422, f"source {request.source[:200]} does not exist; check the "
                                       "bucket and key (S3 keys are case-sensitive)") from None
            if code in ("403", "AccessDenied", "Forbidden"):
                raise IngestError(422, f"source {request.source[:200]} is not readable by "
                                       "hlsvault's AWS credentials; grant s3:GetObject") from None
            raise TransientError(f"S3 error reading {request.source[:200]}: {code}") from None
        except BotoCoreError as error:
            raise TransientError(f"S3 unreachable: {type(error).__name__}") from None
        return head


def _metadata_asset(metadata: dict[str, str]) -> str | None:
    asset = metadata.get("asset")
    if not asset:
        return None
    try:
        return check_asset_id(asset)
    except BadSpec as error:
        raise IngestError(422, f"the object's x-amz-meta-asset is not usable: {error}") from None


def _optional_str(document: dict[str, Any], name: str) -> str | None:
    value = document.get(name)
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise IngestError(400, f'field "{name}" must be a non-empty string')
    if name == "asset":
        try:
            check_asset_id(value)
        except BadSpec as error:
            raise IngestError(400, str(error)) from None
    return value
