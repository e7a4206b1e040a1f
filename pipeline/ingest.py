"""Ingest: jobs that arrive by themselves, from the webhook or from S3 event notifications.

A request is either a job request, ``{"source": "s3://bucket/key", "asset": …, "ladder": …,
"segment_seconds": …, "key_rotation_segments": …, "download": true | "720p", "container": "ts" |
"fmp4", "codec": "h264" | "hevc", "audio_only": true, "subtitles": [{"language": "en",
"source": "s3://bucket/talk.en.vtt"}], "trick_play": true}``, or an S3 event notification
document
(``{"Records": [{"eventName": "ObjectCreated:Put", "s3": {…}}]}``), as S3 sends it to SQS.

Every source is an object in one of ``settings.source_buckets``; anything else is refused.
The object is read with a HEAD, which gives its ETag and its user metadata:

- the asset id is the request's ``asset``, else the object's ``asset`` metadata
  (``x-amz-meta-asset``), else derived from the key (:func:`pipeline.layout.asset_from_name`);
- the ladder is the request's ``ladder``, else the object's ``ladder`` metadata, else
  :data:`pipeline.layout.DEFAULT_LADDER` (as for ``hlsvault submit``).

Bodies are read with :func:`pipeline.documents.load_document` (size and nesting bounded) and
their shape checked field by field. Refusals are errors of the tree: :class:`BadSpec` for a
malformed request (400 at the webhook), :class:`InvalidSource` for a well-formed one naming a
source that may not or cannot be packaged (422), :class:`TransientError` when S3 or Redis did
not answer (503; the poller retries).

The same object (bucket, key, and its ETag or version id) with the same asset is one job:
:class:`Ingest` records ``hlsvault:ingest:<sha256>`` → job id with SET NX, so a repeat — a
retried webhook, a redelivered SQS message — answers the existing job and enqueues nothing.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote_plus

import redis
import structlog
from redis.exceptions import RedisError

from . import layout
from .aws import Outcome, botocore_errors, classify, describe
from .documents import load_document
from .errors import BadSpec, InvalidSource, TransientError
from .jobs import JobSpec, JobStore, UnknownJob, new_job_spec
from .plan import LADDERS, check_segment_seconds
from .settings import Settings
from .sources import split_s3_url
from .storage import S3_SCHEME, is_s3_url
from .subtitles import check_sidecars

log = structlog.get_logger(__name__)

#: A repeat of the same object is answered with its first job for this long; S3 and SQS
#: redeliver within minutes, and a customer's backend retries within days at most.
IDEMPOTENCY_TTL_S = 30 * 24 * 3600
#: A claim whose job record is still missing after this long belongs to a process that died
#: between claiming and enqueueing; it may be taken over. Far above a Redis round trip.
CLAIM_GRACE_S = 60
_LEDGER_PREFIX = "hlsvault:ingest:"
_OPTIONS = (
    "source", "asset", "ladder", "segment_seconds", "key_rotation_segments", "download",
    "container", "codec", "audio_only", "subtitles", "trick_play",
)

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


@dataclass(frozen=True)
class SourceRequest:
    """One object to package, and the options that came with it."""

    bucket: str
    key: str
    #: The version an S3 event names (versioned buckets); None means the current version.
    version_id: str | None = None
    asset: str | None = None
    ladder: str | None = None
    segment_seconds: float = layout.DEFAULT_SEGMENT_SECONDS
    key_rotation_segments: int = layout.DEFAULT_KEY_ROTATION_SEGMENTS
    #: The rendition of an MP4 download (layout.DOWNLOAD_TOP for the top one), or None.
    download: str | None = None
    container: str = layout.DEFAULT_CONTAINER
    codec: str = layout.DEFAULT_VIDEO_CODEC
    audio_only: bool = False
    #: Sidecar subtitle files, ``(language, "s3://bucket/key")``, each in an allowed bucket.
    subtitles: tuple[tuple[str, str], ...] = ()
    trick_play: bool = layout.DEFAULT_TRICK_PLAY

    @property
    def source(self) -> str:
        return f"{S3_SCHEME}{self.bucket}/{self.key}"


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
    """The sources a job request or S3 event document names (ObjectCreated records only);
    none for the ``s3:TestEvent``."""
    if is_test_event(document):
        return []
    if not isinstance(document, dict):
        raise BadSpec('the body must be a JSON object: {"source": "s3://bucket/key"} '
                      "or an S3 event notification")
    if "Records" in document:
        return parse_s3_event(document)
    return [parse_job_request(document)]


def parse_job_request(document: dict[str, Any]) -> SourceRequest:
    unknown = sorted(str(name)[:40] for name in set(document) - set(_OPTIONS))
    if unknown:
        named = ", ".join(unknown[:10]) + (f" and {len(unknown) - 10} more" if unknown[10:] else "")
        raise BadSpec(f"unknown field(s) {named}; allowed: {', '.join(_OPTIONS)}")
    source = document.get("source")
    if not isinstance(source, str) or not is_s3_url(source):
        raise BadSpec('field "source" must be a string like "s3://bucket/key"')
    try:
        bucket, key = split_s3_url(source)
    except InvalidSource as error:  # a request's fault, answered as every other of its faults
        raise BadSpec(str(error)) from None
    asset = _optional_str(document, "asset")
    if asset is not None:
        layout.check_asset_id(asset)
    seconds = document.get("segment_seconds", layout.DEFAULT_SEGMENT_SECONDS)
    rotation = document.get("key_rotation_segments", layout.DEFAULT_KEY_ROTATION_SEGMENTS)
    if isinstance(seconds, bool) or not isinstance(seconds, int | float):
        raise BadSpec('field "segment_seconds" must be a number, e.g. 6')
    if isinstance(rotation, bool) or not isinstance(rotation, int):
        raise BadSpec('field "key_rotation_segments" must be a whole number (0 = off)')
    try:
        seconds = float(seconds)
    except OverflowError:  # a JSON integer of hundreds of digits
        raise BadSpec('field "segment_seconds" is out of range; send a number of seconds such '
                      "as 6") from None
    check_segment_seconds(seconds)
    audio_only = document.get("audio_only", False)
    if not isinstance(audio_only, bool):
        raise BadSpec('field "audio_only" must be true or false')
    trick_play = document.get("trick_play", layout.DEFAULT_TRICK_PLAY)
    if not isinstance(trick_play, bool):
        raise BadSpec('field "trick_play" must be true or false')
    return SourceRequest(bucket=bucket, key=key, asset=asset,
                         ladder=_optional_str(document, "ladder"),
                         segment_seconds=seconds, key_rotation_segments=rotation,
                         download=_download(document),
                         container=_optional_str(document, "container")
                         or layout.DEFAULT_CONTAINER,
                         codec=_optional_str(document, "codec") or layout.DEFAULT_VIDEO_CODEC,
                         audio_only=audio_only, subtitles=_subtitles(document),
                         trick_play=trick_play)


def _subtitles(document: dict[str, Any]) -> tuple[tuple[str, str], ...]:
    """``"subtitles"``: a list of ``{"language": "en", "source": "s3://bucket/key"}``."""
    value = document.get("subtitles", [])
    shape = ('field "subtitles" must be a list of {"language": "en", "source": '
             '"s3://bucket/key"} objects')
    if not isinstance(value, list) or not all(
        isinstance(item, dict) and set(item) == {"language", "source"} for item in value
    ):
        raise BadSpec(shape)
    return check_sidecars([(item["language"], item["source"]) for item in value], s3_only=True)


def _download(document: dict[str, Any]) -> str | None:
    """``"download"``: true (the top rendition), false or absent (none), or a rendition name."""
    value = document.get("download")
    if value is None or value is False:
        return None
    if value is True:
        return layout.DOWNLOAD_TOP
    if isinstance(value, str) and layout.RENDITION_PATTERN.fullmatch(value):
        return value
    raise BadSpec('field "download" must be true, false or a rendition name such as "720p"')


def parse_s3_event(document: dict[str, Any]) -> list[SourceRequest]:
    """The created objects of an S3 event notification; other events (removals) are skipped.

    Object keys arrive URL-encoded the way S3 encodes them (spaces as ``+``), so they are
    decoded with ``unquote_plus``.
    """
    records = document.get("Records")
    if not isinstance(records, list):
        raise BadSpec('field "Records" must be a list of S3 event records')
    requests = []
    for index, record in enumerate(records):
        name = _path(record, index, "eventName")
        bucket = _path(record, index, "s3", "bucket", "name")
        key = unquote_plus(_path(record, index, "s3", "object", "key"))
        if not key:
            raise BadSpec(f"Records[{index}].s3.object.key decodes to an empty key")
        if not name.removeprefix("s3:").startswith("ObjectCreated:"):
            continue
        version_id = record["s3"]["object"].get("versionId")
        if version_id is not None and not isinstance(version_id, str):
            raise BadSpec(f"Records[{index}].s3.object.versionId must be a string")
        # Unversioned buckets may say "null"; that names no version to HEAD.
        version_id = version_id if version_id and version_id != "null" else None
        requests.append(SourceRequest(bucket=bucket, key=key, version_id=version_id))
    return requests


def _path(record: Any, index: int, *names: str) -> str:
    """The non-empty string at ``record[names[0]][names[1]]…``, or BadSpec naming the path."""
    value = record
    for depth, name in enumerate(names):
        if not isinstance(value, dict):
            where = ".".join(names[:depth]) or "the record"
            raise BadSpec(f"Records[{index}]: {where} must be an object; an S3 event record "
                          "has eventName, s3.bucket.name and s3.object.key")
        value = value.get(name)
    if not isinstance(value, str) or not value:
        raise BadSpec(f"Records[{index}].{'.'.join(names)} must be a non-empty string")
    return value


def asset_for_key(key: str) -> str:
    """The asset id an object without ``asset`` metadata gets from its key."""
    asset = layout.asset_from_name(key)
    if asset is None:
        raise InvalidSource(f"no asset id can be derived from key {key[:200]!r}; set the "
                            "object's x-amz-meta-asset metadata or pass \"asset\"")
    return asset


def ledger_key(bucket: str, key: str, revision: str, asset: str, *asked: Any) -> str:
    """The ingest ledger's key for one object's revision packaged as ``asset``; ``asked``:
    what else a request asks for that makes it another job (its sidecars' revisions, trick
    play), nothing for a request an S3 event could have made."""
    digest = hashlib.sha256(json.dumps([bucket, key, revision, asset, *asked]).encode())
    return _LEDGER_PREFIX + digest.hexdigest()


class Ingest:
    """Turns source requests into jobs, each object once.

    ``submit(spec)`` records and enqueues a job (see ``workers.sending``); ``jobs`` is read to
    tell a dead claim from a job in flight.
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
            raise InvalidSource("no source bucket is allowed: set HLSVAULT_SOURCE_BUCKETS to "
                                "the comma-separated buckets jobs may read from")
        if bucket not in allowed:
            raise InvalidSource(f"bucket {bucket[:100]!r} is not an allowed source bucket; "
                                "add it to HLSVAULT_SOURCE_BUCKETS or upload to one of "
                                f"{', '.join(allowed)}")

    def accept_body(self, body: bytes | str) -> list[Accepted]:
        """The jobs of a webhook body or SQS message: what the webhook, the ingest poller and
        a replay of a parked message all do. None for an S3 test event or removals only."""
        document = load_document(body)
        if is_test_event(document):
            log.info("s3 test event received; the bucket's notifications reach hlsvault",
                     bucket=str(document.get("Bucket"))[:100])
        return [self.accept(request) for request in parse_request(document)]

    def accept(self, request: SourceRequest) -> Accepted:
        """The job for ``request``'s object: the existing one, or a new one just enqueued."""
        self.check_bucket(request.bucket)
        for _, sidecar in request.subtitles:
            self.check_bucket(split_s3_url(sidecar)[0])
        head = self._head(request)
        meta_asset, meta_ladder = _from_metadata(head.get("Metadata") or {})
        asset = request.asset or meta_asset or asset_for_key(request.key)
        ladder = request.ladder or meta_ladder or layout.DEFAULT_LADDER
        # What HEAD saw identifies the object's content, whichever way it was named: an
        # event and a webhook request for the same upload are one job. Sidecars (by their
        # content too) and trick play make another.
        revision = _revision(head)
        sidecars = [[language, sidecar, _revision(self._head_object(sidecar, *split_s3_url(
            sidecar), what="subtitle file"))] for language, sidecar in request.subtitles]
        asked = ([sidecars, request.trick_play]
                 if sidecars or request.trick_play != layout.DEFAULT_TRICK_PLAY else [])
        spec = new_job_spec(
            request.source, asset=asset, ladder=ladder,
            segment_seconds=request.segment_seconds,
            key_rotation_segments=request.key_rotation_segments,
            download=request.download,
            container=request.container,
            codec=request.codec,
            audio_only=request.audio_only,
            subtitles=request.subtitles,
            trick_play=request.trick_play,
        )
        ledger = ledger_key(request.bucket, request.key, revision, asset, *asked)
        try:
            existing = self._claim(ledger, spec.job_id)
            if existing is not None:
                return Accepted(existing, asset, request.source, duplicate=True)
            try:
                self.submit(spec)
            except BaseException:
                # Not enqueued: let the retry of this request claim the object again.
                self._release(keys=[ledger], args=[spec.job_id])
                raise
        except RedisError as error:
            raise TransientError(f"Redis did not answer ({type(error).__name__}); the job "
                                 "was not created, send the request again") from None
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
        return self._head_object(request.source, request.bucket, request.key, **extra)

    def _head_object(self, source: str, bucket: str, key: str, *, what: str = "source",
                     **extra: str) -> dict[str, Any]:
        shown = source[:200]
        try:
            head: dict[str, Any] = self.s3.head_object(Bucket=bucket, Key=key, **extra)
        except botocore_errors() as error:
            outcome = classify(error)
            if outcome is Outcome.NOT_FOUND:
                raise InvalidSource(f"{what} {shown} does not exist; check the bucket and key "
                                    "(S3 keys are case-sensitive)") from None
            if outcome is Outcome.REFUSED:
                raise InvalidSource(f"{what} {shown} cannot be read ({describe(error)}): check "
                                    "that the bucket exists and grant hlsvault's AWS "
                                    "credentials s3:GetObject on it") from None
            raise TransientError(f"S3 did not answer for {shown} ({describe(error)}); "
                                 "send the request again later") from None
        return head


def _revision(head: dict[str, Any]) -> str:
    """What identifies an object's content in its HEAD: its version, else its ETag."""
    return str(head.get("VersionId") or str(head.get("ETag", "")).strip('"'))


def _from_metadata(metadata: dict[str, str]) -> tuple[str | None, str | None]:
    """The asset and ladder an object's user metadata names, if it names them usably."""
    named = {k.lower(): v for k, v in metadata.items()}
    asset, ladder = named.get("asset") or None, named.get("ladder") or None
    if asset is not None:
        try:
            layout.check_asset_id(asset)
        except BadSpec as error:
            raise InvalidSource(f"the object's x-amz-meta-asset is not usable: {error}") from None
    if ladder is not None and ladder not in LADDERS:
        raise InvalidSource(f"the object's x-amz-meta-ladder {ladder[:40]!r} is not a ladder; "
                            f"use one of {', '.join(LADDERS)} or remove it")
    return asset, ladder


def _optional_str(document: dict[str, Any], name: str) -> str | None:
    value = document.get(name)
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise BadSpec(f'field "{name}" must be a non-empty string')
    return value
