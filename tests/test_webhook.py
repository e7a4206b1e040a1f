"""POST /v1/jobs: signed job requests become one job each, against real Redis and the S3 API."""

from __future__ import annotations

import base64
import json
import os
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.testclient import TestClient

from dashboard.webhook import SIGNATURE_HEADER, sign, webhook_routes
from pipeline.documents import MAX_DEPTH, MAX_DOCUMENT_BYTES
from pipeline.ingest import Ingest
from pipeline.jobs import JobSpec, JobStore
from pipeline.jobs.redis import RedisRecordBackend
from pipeline.redisconn import connect
from pipeline.settings import load_settings

from fleet import MotoServer, RedisServer

SECRET = "whsec-" + "x" * 40
JOB_INDEX = "hlsvault:jobs"


@dataclass
class Webhook:
    client: TestClient
    bucket: str
    jobs: JobStore
    redis_server: RedisServer

    def post(self, body: bytes, *, timestamp: int | None = None, secret: str = SECRET,
             headers: dict[str, str] | None = None) -> Any:
        stamp = int(time.time()) if timestamp is None else timestamp
        signed = {SIGNATURE_HEADER: sign(secret, body, stamp), "Content-Type": "application/json"}
        return self.client.post("/v1/jobs", content=body, headers={**signed, **(headers or {})})

    def post_json(self, document: Any, **kwargs: Any) -> Any:
        return self.post(json.dumps(document).encode(), **kwargs)

    def job_index(self) -> list[str]:
        return list(self.redis_server.client().zrange(JOB_INDEX, 0, -1))


@pytest.fixture
def webhook(
    tmp_path: Path, redis_server: RedisServer, moto_server: MotoServer
) -> Iterator[Webhook]:
    """The webhook routes in a bare Starlette app; ``submit`` records the job in Redis as
    ``flow.start`` does (without a broker to enqueue on)."""
    bucket = f"hv-src-{uuid.uuid4().hex[:8]}"
    s3 = moto_server.client("s3")
    s3.create_bucket(Bucket=bucket)
    s3.put_object(Bucket=bucket, Key="uploads/clip.mp4", Body=b"not really a video")
    s3.put_object(Bucket=bucket, Key="uploads/My Film (final).mp4", Body=b"another")
    s3.put_object(Bucket=bucket, Key="uploads/Café (final).mp4", Body=b"a third")
    s3.put_object(Bucket=bucket, Key="uploads/tagged.mp4", Body=b"a fourth",
                  Metadata={"asset": "../../etc"})
    settings = load_settings({
        "REDIS_URL": redis_server.url,
        "HLSVAULT_DATA_DIR": str(tmp_path / "data"),
        "HLSVAULT_CDN_URL": "https://cdn.example",
        "HLSVAULT_TOKEN_SECRET": base64.urlsafe_b64encode(os.urandom(36)).decode(),
        "HLSVAULT_MASTER_KEY": base64.b64encode(os.urandom(32)).decode(),
        "HLSVAULT_WEBHOOK_SECRET": SECRET,
        "HLSVAULT_SOURCE_BUCKETS": f"some-other-bucket,{bucket}",
    })
    client = connect(redis_server.url)
    jobs = JobStore(RedisRecordBackend(client))

    def submit(spec: JobSpec) -> None:
        jobs.create(spec)

    ingest = Ingest(settings, redis_client=client, s3=s3, jobs=jobs, submit=submit)
    app = Starlette(routes=webhook_routes(settings, submit, ingest=ingest))
    with TestClient(app) as test_client:
        yield Webhook(test_client, bucket, jobs, redis_server)


class TestAccepted:
    def test_signed_request_creates_one_job(self, webhook: Webhook) -> None:
        """A correctly signed request answers 202 with the id of the one job it created."""
        response = webhook.post_json({"source": f"s3://{webhook.bucket}/uploads/clip.mp4",
                                      "asset": "clip-1", "ladder": "copy"})
        assert response.status_code == 202, response.text
        answer = response.json()
        assert answer["duplicate"] is False
        assert webhook.job_index() == [answer["job_id"]]
        spec = webhook.jobs.get(answer["job_id"]).spec
        assert (spec.asset, spec.ladder, spec.source) == (
            "clip-1", "copy", f"s3://{webhook.bucket}/uploads/clip.mp4")

    def test_repeated_request_answers_the_same_job(self, webhook: Webhook) -> None:
        """The same request again (a sender's retry) gets the same job id and no second job."""
        document = {"source": f"s3://{webhook.bucket}/uploads/clip.mp4", "asset": "clip-1"}
        first = webhook.post_json(document).json()
        again = webhook.post_json(document)
        assert again.status_code == 202, again.text
        assert again.json()["job_id"] == first["job_id"] and again.json()["duplicate"] is True
        assert webhook.job_index() == [first["job_id"]]

    def test_s3_event_key_is_url_decoded_and_names_the_asset(self, webhook: Webhook) -> None:
        """An S3 event document's key is decoded as S3 encodes it (+ for space), and without
        metadata the asset id is the sanitised file name stem."""
        event = {"Records": [{
            "eventName": "ObjectCreated:Put",
            "s3": {"bucket": {"name": webhook.bucket},
                   "object": {"key": "uploads/My+Film+%28final%29.mp4", "size": 7}},
        }]}
        response = webhook.post_json(event)
        assert response.status_code == 202, response.text
        spec = webhook.jobs.get(response.json()["job_id"]).spec
        assert spec.asset == "My-Film-final"
        assert spec.source == f"s3://{webhook.bucket}/uploads/My Film (final).mp4"

    def test_an_accented_file_name_gives_the_asset_id_every_entry_point_gives(
        self, webhook: Webhook
    ) -> None:
        """The asset id comes from pipeline.layout's one rule: accents dropped, not the letter."""
        response = webhook.post_json(s3_event(webhook.bucket, "uploads/Caf%C3%A9+%28final%29.mp4"))
        assert response.status_code == 202, response.text
        assert webhook.jobs.get(response.json()["job_id"]).spec.asset == "Cafe-final"


def s3_event(bucket: str, key: Any, *, event: str = "ObjectCreated:Put") -> dict[str, Any]:
    return {"Records": [{"eventName": event,
                         "s3": {"bucket": {"name": bucket}, "object": {"key": key}}}]}


def nested(depth: int) -> bytes:
    """A JSON array nested ``depth`` deep: well under the size cap, deep enough to recurse."""
    return b"[" * depth + b"]" * depth


#: What each refusal is sent, by name: (webhook, a good body, now) -> response.
REFUSALS: dict[str, Callable[[Webhook, bytes, int], Any]] = {
    "missing signature": lambda w, good, now: w.client.post("/v1/jobs", content=good),
    "bad signature": lambda w, good, now: w.post(good, secret="not-the-secret"),
    "stale timestamp": lambda w, good, now: w.post(good, timestamp=now - 360),
    "future timestamp": lambda w, good, now: w.post(good, timestamp=now + 360),
    # finding 4: int("9" * 309) is fine, but comparing it with a float clock overflowed (500)
    "timestamp of 309 digits": lambda w, good, now: w.client.post(
        "/v1/jobs", content=good,
        headers={SIGNATURE_HEADER: f"t={'9' * 309},v1={'0' * 64}"}),
    "oversized body": lambda w, good, now: w.post(b" " * (MAX_DOCUMENT_BYTES + 1) + good),
    # No Content-Length to trust: the body is counted as it arrives.
    "oversized chunked body": lambda w, good, now: w.client.post(
        "/v1/jobs", content=iter([b" " * 16384] * 5 + [good]),
        headers={SIGNATURE_HEADER: sign(SECRET, b" " * 16384 * 5 + good, now)}),
    "malformed JSON": lambda w, good, now: w.post(b'{"source": "s3://'),
    # finding 6: signed, under the size cap, and deep enough to make the parser recurse (500)
    "deeply nested JSON": lambda w, good, now: w.post(nested(5000)),
    "JSON one level too deep": lambda w, good, now: w.post(nested(MAX_DEPTH + 1)),
    # finding 6: an S3 event whose key is a number made unquote_plus raise (500)
    "integer key in an S3 event": lambda w, good, now: w.post_json(s3_event(w.bucket, 5)),
    "record that is not an object": lambda w, good, now: w.post_json({"Records": [7]}),
    "bucket that is not an object": lambda w, good, now: w.post_json(
        {"Records": [{"eventName": "ObjectCreated:Put", "s3": {"bucket": "b"}}]}),
    "NaN segment length": lambda w, good, now: w.post(
        b'{"source": "s3://' + w.bucket.encode() + b'/uploads/clip.mp4", '
        b'"segment_seconds": NaN}'),
    "segment length of 400 digits": lambda w, good, now: w.post_json(
        {"source": f"s3://{w.bucket}/uploads/clip.mp4", "segment_seconds": 10**400}),
    "unknown field": lambda w, good, now: w.post_json(
        {"source": f"s3://{w.bucket}/a.mp4", "colour": "blue"}),
    "source outside the allowed buckets": lambda w, good, now: w.post_json(
        {"source": "s3://somebody-elses-bucket/clip.mp4"}),
    "missing object": lambda w, good, now: w.post_json(
        {"source": f"s3://{w.bucket}/uploads/nope.mp4"}),
    "unusable asset metadata": lambda w, good, now: w.post_json(
        {"source": f"s3://{w.bucket}/uploads/tagged.mp4"}),
    "event with no created object": lambda w, good, now: w.post_json(
        s3_event(w.bucket, "uploads/clip.mp4", event="ObjectRemoved:Delete")),
}


class TestRefused:
    @pytest.mark.parametrize(
        ("case", "status", "says"),
        [
            ("missing signature", 401, "missing X-Hlsvault-Signature"),
            ("bad signature", 401, "does not match"),
            ("stale timestamp", 401, "more than 300 s"),
            ("future timestamp", 401, "more than 300 s"),
            ("timestamp of 309 digits", 401, "malformed X-Hlsvault-Signature header; expected"),
            ("oversized body", 413, "limit"),
            ("oversized chunked body", 413, "limit"),
            ("malformed JSON", 400, "not JSON"),
            ("deeply nested JSON", 400, f"nests deeper than {MAX_DEPTH} levels"),
            ("JSON one level too deep", 400, f"nests deeper than {MAX_DEPTH} levels"),
            ("integer key in an S3 event", 400,
             "Records[0].s3.object.key must be a non-empty string"),
            ("record that is not an object", 400, "Records[0]: the record must be an object"),
            ("bucket that is not an object", 400, "Records[0]: s3.bucket must be an object"),
            ("NaN segment length", 400, "NaN is not a number a request may hold"),
            ("segment length of 400 digits", 400, '"segment_seconds" is out of range'),
            ("unknown field", 400, "unknown field(s) colour"),
            ("source outside the allowed buckets", 422, "not an allowed source bucket"),
            ("missing object", 422, "does not exist"),
            ("unusable asset metadata", 422, "x-amz-meta-asset is not usable"),
            ("event with no created object", 422, "no ObjectCreated record"),
        ],
    )
    def test_refusal_says_why_and_creates_no_job(
        self, webhook: Webhook, case: str, status: int, says: str
    ) -> None:
        """Each refusal has its status, a JSON error naming the problem, and no job."""
        good = json.dumps({"source": f"s3://{webhook.bucket}/uploads/clip.mp4"}).encode()
        response = REFUSALS[case](webhook, good, int(time.time()))
        assert response.status_code == status, response.text
        assert response.headers["content-type"] == "application/json"
        assert says in response.json()["error"]
        assert webhook.job_index() == []
        assert webhook.redis_server.client().keys("hlsvault:ingest:*") == []

    def test_a_webhook_without_redis_says_what_to_set(self, tmp_path: Path) -> None:
        """Unconfigured, the route answers 503 naming the setting, not a 500 or a 404."""
        settings = load_settings({"HLSVAULT_DATA_DIR": str(tmp_path),
                                  "HLSVAULT_WEBHOOK_SECRET": SECRET})
        app = Starlette(routes=webhook_routes(settings, lambda spec: None))
        with TestClient(app) as client:
            response = client.post("/v1/jobs", content=b"{}")
        assert response.status_code == 503
        assert response.json() == {
            "error": "the webhook is disabled: set REDIS_URL on the ops process"}
