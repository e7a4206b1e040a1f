"""S3 uploads become jobs: S3 → SQS notification → the `ingest` process → the fleet.

moto in server mode delivers S3 ObjectCreated notifications (and the s3:TestEvent on
configuration) to a moto SQS queue, as S3 does: nothing here sends the event by hand.
"""

from __future__ import annotations

import json
import signal
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest

from pipeline.ingest import IngestError, asset_from_key, parse_request

from fleet import Fleet, MotoServer, RedisServer
from support import frame_hashes, framemd5
from test_fleet import wait_for_job

T = TypeVar("T")
PARKED = "hlsvault:ingest:parked"


def eventually(probe: Callable[[], T | None], *, timeout: float, what: str) -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen within {timeout:.0f} s")
        time.sleep(0.2)


class TestParsing:
    def test_asset_id_is_the_sanitised_file_name_stem(self) -> None:
        """Without metadata the asset is the key's file name stem, in the asset alphabet."""
        assert asset_from_key("uploads/2024/My Film (final).mp4") == "My-Film-final"
        assert asset_from_key("a.b.c.mov") == "a-b-c"
        assert asset_from_key("x/" + "y" * 300 + ".mp4") == "y" * 128
        with pytest.raises(IngestError) as refused:
            asset_from_key("uploads/(((.mp4")
        assert refused.value.status == 422 and "x-amz-meta-asset" in refused.value.message

    def test_s3_event_keys_are_url_decoded_and_removals_skipped(self) -> None:
        """Keys are decoded as S3 encodes them; only ObjectCreated records become sources."""
        requests = parse_request({"Records": [
            {"eventName": "ObjectCreated:CompleteMultipartUpload",
             "s3": {"bucket": {"name": "b"}, "object": {"key": "a+b%2Bc%C3%A9.mp4"}}},
            {"eventName": "ObjectRemoved:Delete",
             "s3": {"bucket": {"name": "b"}, "object": {"key": "gone.mp4"}}},
        ]})
        assert [(r.bucket, r.key) for r in requests] == [("b", "a b+cé.mp4")]

    def test_a_record_without_its_object_is_malformed(self) -> None:
        with pytest.raises(IngestError) as refused:
            parse_request({"Records": [{"eventName": "ObjectCreated:Put", "s3": {}}]})
        assert refused.value.status == 400 and "s3.object.key" in refused.value.message


def queue_counts(sqs: Any, url: str) -> tuple[int, int]:
    attributes = sqs.get_queue_attributes(
        QueueUrl=url,
        AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"],
    )["Attributes"]
    return (int(attributes["ApproximateNumberOfMessages"]),
            int(attributes["ApproximateNumberOfMessagesNotVisible"]))


class TestS3Events:
    def test_upload_is_packaged_once_and_garbage_is_parked(
        self, fleet: Fleet, moto_server: MotoServer, redis_server: RedisServer, copy_clip: Path
    ) -> None:
        """An upload to a notifying bucket is published and plays; uploading the same bytes
        again makes no second job; a message that is no S3 event is parked, not retried."""
        # Given a source bucket that notifies an SQS queue of every created object
        tag = uuid.uuid4().hex[:8]
        s3, sqs = moto_server.client("s3"), moto_server.client("sqs")
        queue_url = sqs.create_queue(QueueName=f"hv-ingest-{tag}")["QueueUrl"]
        queue_arn = sqs.get_queue_attributes(
            QueueUrl=queue_url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
        bucket = f"hv-uploads-{tag}"
        s3.create_bucket(Bucket=bucket)
        s3.put_bucket_notification_configuration(
            Bucket=bucket,
            NotificationConfiguration={"QueueConfigurations": [
                {"QueueArn": queue_arn, "Events": ["s3:ObjectCreated:*"]},
            ]},
        )
        # and the fleet with its ingest process reading that queue
        fleet.env.update(HLSVAULT_INGEST_QUEUE_URL=queue_url, HLSVAULT_SOURCE_BUCKETS=bucket)
        fleet.start_all()
        fleet.start("ingest")
        redis = redis_server.client()

        # When a video is uploaded with its asset id as metadata
        s3.put_object(Bucket=bucket, Key="incoming/clip one.mp4", Body=copy_clip.read_bytes(),
                      Metadata={"asset": "from-s3", "ladder": "copy"})

        # Then exactly one job packages it, and it plays frame for frame as the source
        job_id = eventually(lambda: redis.zrange("hlsvault:jobs", 0, -1), timeout=30,
                            what="a job for the upload")[0]
        record = wait_for_job(fleet, job_id, timeout=120)
        assert record["status"] == "succeeded", record
        assert record["asset"] == "from-s3"
        assert record["source"] == f"s3://{bucket}/incoming/clip one.mp4"
        url = fleet.cli("url", "from-s3").stdout.strip()
        assert frame_hashes(framemd5(url)) == frame_hashes(framemd5(str(copy_clip)))

        # When the same bytes are uploaded again (same ETag), and garbage lands on the queue
        s3.put_object(Bucket=bucket, Key="incoming/clip one.mp4", Body=copy_clip.read_bytes(),
                      Metadata={"asset": "from-s3", "ladder": "copy"})
        sqs.send_message(QueueUrl=queue_url, MessageBody="this is not {json")
        foreign = {"Records": [{"eventName": "ObjectCreated:Put", "s3": {
            "bucket": {"name": "somebody-elses-bucket"}, "object": {"key": "x.mp4"}}}]}
        sqs.send_message(QueueUrl=queue_url, MessageBody=json.dumps(foreign))

        # Then both bad messages are parked with their reason and body, the queue drains,
        # and the repeat upload was answered with the first job
        parked = eventually(
            lambda: (entries := redis.lrange(PARKED, 0, -1)) and len(entries) >= 2 and entries,
            timeout=30, what="parking of two bad messages",
        )
        reasons = {e["body"]: e["reason"] for e in map(json.loads, parked)}
        assert set(reasons) == {json.dumps(foreign), "this is not {json"}
        assert "not an allowed source bucket" in reasons[json.dumps(foreign)]
        assert "not JSON" in reasons["this is not {json"]
        eventually(lambda: queue_counts(sqs, queue_url) == (0, 0), timeout=30,
                   what="the ingest queue draining")
        eventually(lambda: '"duplicate": true' in fleet.log_text(), timeout=10,
                   what="the repeat upload being answered as a duplicate")
        assert redis.zrange("hlsvault:jobs", 0, -1) == [job_id]
        # and the s3:TestEvent S3 sent when the notification was configured was consumed
        assert "s3 test event received" in fleet.log_text()


class TestProcess:
    def test_without_a_queue_it_idles_and_stops_on_sigterm(self, fleet: Fleet) -> None:
        """Unconfigured, the process says so and stays up (honcho would otherwise stop the
        whole Procfile), then exits cleanly on SIGTERM."""
        fleet.start("ingest")
        eventually(lambda: "ingest idle" in fleet.log_text(), timeout=20,
                   what="the idle warning")
        process = fleet.processes["ingest"][0]
        assert process.poll() is None
        fleet.kill("ingest", signal.SIGTERM)
        assert process.returncode == 0
