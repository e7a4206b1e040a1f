"""S3 uploads become jobs: S3 → SQS notification → the `ingest` process → the fleet.

moto in server mode delivers S3 ObjectCreated notifications (and the s3:TestEvent on
configuration) to a moto SQS queue, as S3 does: nothing here sends the event by hand.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest

from pipeline.documents import MAX_DEPTH, load_document, nesting_depth
from pipeline.errors import BadSpec, InvalidSource
from pipeline.ingest import Ingest, asset_for_key, parse_request
from pipeline.jobs import JobStore
from pipeline.jobs.redis import RedisRecordBackend
from pipeline.parked import ParkingLot
from pipeline.redisconn import connect
from pipeline.settings import load_settings
from workers.ingest import IngestPoller

from fleet import Fleet, MotoServer, RedisServer, fleet_environment
from support import ROOT, frame_hashes, framemd5
from test_fleet import wait_for_job

T = TypeVar("T")
CLI = [sys.executable, "-m", "hlsvault"]


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
    def test_asset_id_is_the_file_name_stem_by_the_layout_rule(self) -> None:
        """Without metadata the asset is the key's file name stem, in the asset alphabet."""
        assert asset_for_key("uploads/2024/My Film (final).mp4") == "My-Film-final"
        assert asset_for_key("uploads/Café (final).mp4") == "Cafe-final"
        assert asset_for_key("x/" + "y" * 300 + ".mp4") == "y" * 128
        with pytest.raises(InvalidSource, match="set the object's x-amz-meta-asset"):
            asset_for_key("uploads/(((.mp4")

    def test_s3_event_keys_are_url_decoded_and_removals_skipped(self) -> None:
        """Keys are decoded as S3 encodes them; only ObjectCreated records become sources."""
        requests = parse_request({"Records": [
            {"eventName": "ObjectCreated:CompleteMultipartUpload",
             "s3": {"bucket": {"name": "b"}, "object": {"key": "a+b%2Bc%C3%A9.mp4"}}},
            {"eventName": "ObjectRemoved:Delete",
             "s3": {"bucket": {"name": "b"}, "object": {"key": "gone.mp4"}}},
        ]})
        assert [(r.bucket, r.key) for r in requests] == [("b", "a b+cé.mp4")]

    @pytest.mark.parametrize(("record", "says"), [
        ({"eventName": "ObjectCreated:Put", "s3": {}}, "Records[0]: s3.bucket must be an object"),
        ({"eventName": "ObjectCreated:Put", "s3": {"bucket": {"name": "b"}, "object": 3}},
         "Records[0]: s3.object must be an object"),
        ({"eventName": 7, "s3": {}}, "Records[0].eventName must be a non-empty string"),
        ({"eventName": "ObjectCreated:Put",
          "s3": {"bucket": {"name": "b"}, "object": {"key": "k", "versionId": []}}},
         "Records[0].s3.object.versionId must be a string"),
    ])
    def test_a_record_of_the_wrong_shape_is_malformed(
        self, record: dict[str, Any], says: str
    ) -> None:
        with pytest.raises(BadSpec) as refused:
            parse_request({"Records": [record]})
        assert says in str(refused.value)


class TestDocuments:
    def test_depth_counts_levels_not_brackets_inside_strings(self) -> None:
        assert nesting_depth('["[[[[", {"a": "]]]"}, "\\"[["]', limit=10) == 2
        assert nesting_depth('{"a": [[{"b": 1}]]}', limit=10) == 4
        assert nesting_depth("[" * 5000, limit=MAX_DEPTH) == MAX_DEPTH + 1

    def test_a_document_at_the_depth_bound_loads_and_one_deeper_is_refused(self) -> None:
        assert load_document("[" * MAX_DEPTH + "]" * MAX_DEPTH) is not None
        with pytest.raises(BadSpec, match=f"nests deeper than {MAX_DEPTH} levels"):
            load_document("[" * (MAX_DEPTH + 1) + "]" * (MAX_DEPTH + 1))

    @pytest.mark.parametrize(("body", "says"), [
        (b"\xff\xfe", "not UTF-8"),
        (b'{"a": ' + b"1" * 5000 + b"}", "not JSON"),
        (b'{"a": Infinity}', "Infinity is not a number a request may hold"),
    ])
    def test_what_json_allows_but_no_request_holds_is_refused(
        self, body: bytes, says: str
    ) -> None:
        with pytest.raises(BadSpec, match=says):
            load_document(body)


def queue_counts(sqs: Any, url: str) -> tuple[int, int]:
    attributes = sqs.get_queue_attributes(
        QueueUrl=url,
        AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"],
    )["Attributes"]
    return (int(attributes["ApproximateNumberOfMessages"]),
            int(attributes["ApproximateNumberOfMessagesNotVisible"]))


@dataclass
class Rig:
    """The ingest poller in-process over moto's SQS and S3 and a real redis-server; its jobs
    are recorded (as flow.start records them) but not enqueued, as no worker runs."""

    poller: IngestPoller
    queue_url: str
    bucket: str
    sqs: Any
    jobs: JobStore
    parking: ParkingLot
    redis: RedisServer

    def send(self, *bodies: str) -> None:
        for body in bodies:
            self.sqs.send_message(QueueUrl=self.queue_url, MessageBody=body)

    def drain(self) -> None:
        """Poll until the queue is empty (a batch holds at most ten messages)."""
        for _ in range(10):
            if queue_counts(self.sqs, self.queue_url) == (0, 0):
                return
            self.poller.poll_once()
        raise AssertionError(f"queue not drained: {queue_counts(self.sqs, self.queue_url)}")

    def job_ids(self) -> list[str]:
        return list(self.redis.client().zrange("hlsvault:jobs", 0, -1))


def created_event(bucket: str, key: Any) -> str:
    return json.dumps({"Records": [{"eventName": "ObjectCreated:Put", "s3": {
        "bucket": {"name": bucket}, "object": {"key": key}}}]})


def make_rig(tmp: Path, redis_server: RedisServer, moto_server: MotoServer, *,
             allowed: str | None = None) -> Rig:
    tag = uuid.uuid4().hex[:8]
    s3, sqs = moto_server.client("s3"), moto_server.client("sqs")
    bucket = f"hv-uploads-{tag}"
    s3.create_bucket(Bucket=bucket)
    s3.put_object(Bucket=bucket, Key="incoming/clip.mp4", Body=b"not really a video")
    queue_url = sqs.create_queue(QueueName=f"hv-ingest-{tag}")["QueueUrl"]
    settings = load_settings({"HLSVAULT_DATA_DIR": str(tmp / "data"),
                              "HLSVAULT_SOURCE_BUCKETS": allowed or bucket})
    client = connect(redis_server.url)
    jobs = JobStore(RedisRecordBackend(client))
    parking = ParkingLot(client)
    ingest = Ingest(settings, redis_client=client, s3=s3, jobs=jobs, submit=jobs.create)
    poller = IngestPoller(ingest, sqs, queue_url, parking=parking, wait_s=0)
    return Rig(poller, queue_url, bucket, sqs, jobs, parking, redis_server)


class TestPoller:
    def test_hostile_messages_are_parked_and_the_batch_carries_on(
        self, tmp_path: Path, redis_server: RedisServer, moto_server: MotoServer
    ) -> None:
        """Finding 5: a 5 KB body of '[' made the parser recurse until RecursionError escaped
        the poller: the message was neither parked nor deleted and the rest of its batch was
        dropped. Now each bad message is parked with its reason, and good ones become jobs."""
        # Given a queue holding hostile messages around one real upload's event
        rig = make_rig(tmp_path, redis_server, moto_server)
        rig.send("[" * 5000, created_event(rig.bucket, "incoming/clip.mp4"),
                 created_event(rig.bucket, 5), "this is not {json")

        # When the poller has received them
        rig.drain()

        # Then the upload became one job, and each hostile message is parked with its reason
        (job_id,) = rig.job_ids()
        assert rig.jobs.get(job_id).spec.asset == "clip"
        reasons = {entry.body[:20]: entry.reason for entry in rig.parking.entries()}
        assert set(reasons) == {"[" * 20, created_event(rig.bucket, 5)[:20], "this is not {json"}
        assert f"nests deeper than {MAX_DEPTH} levels" in reasons["[" * 20]
        assert "s3.object.key must be a non-empty string" in reasons[
            created_event(rig.bucket, 5)[:20]]
        assert "not JSON" in reasons["this is not {json"]


def cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=120, check=False)


class TestParkedCommand:
    def test_parked_messages_are_listed_replayed_and_dropped(
        self, tmp_path: Path, redis_server: RedisServer, moto_server: MotoServer
    ) -> None:
        """`hlsvault ingest parked` shows why each message was parked; once the cause is
        fixed, --replay runs it through ingest again and it becomes a job on the fleet."""
        # Given an upload's event parked because its bucket was not yet allowed, and garbage
        rig = make_rig(tmp_path, redis_server, moto_server, allowed="some-other-bucket")
        rig.send(created_event(rig.bucket, "incoming/clip.mp4"))
        rig.drain()
        rig.send("this is not {json")
        rig.drain()
        env = fleet_environment(tmp_path, redis_server, moto_server)

        # When they are listed
        listed = cli(env, "ingest", "parked")
        as_json = json.loads(cli(env, "ingest", "parked", "--json").stdout)

        # Then each shows with its id and reason
        assert listed.returncode == 0, listed.stderr
        assert listed.stdout.startswith("2 parked (room for 1000); 0 dropped")
        assert "not an allowed source bucket" in listed.stdout and "not JSON" in listed.stdout
        event_id, garbage_id = (entry["id"] for entry in as_json["parked"])
        assert (as_json["count"], as_json["overflow"]) == (2, 0)

        # When the garbage is replayed it is refused again, says why, and stays parked
        again = cli(env, "ingest", "parked", "--replay", garbage_id)
        assert again.returncode == 2
        assert again.stderr.startswith("hlsvault: the document is not JSON")

        # When the bucket is allowed, the event is replayed: a job on the fleet, out of the park
        env["HLSVAULT_SOURCE_BUCKETS"] = rig.bucket
        replayed = cli(env, "ingest", "parked", "--replay", event_id)
        assert replayed.returncode == 0, replayed.stderr
        job_id = replayed.stdout.split("job ")[1].split()[0]
        assert replayed.stdout == f"replayed {event_id}: job {job_id} for asset clip\n"
        status = subprocess.run(
            [sys.executable, "-m", "hlsvault", "status", job_id, "--json"], env=env, cwd=ROOT,
            capture_output=True, text=True, timeout=60, check=False)
        record = json.loads(status.stdout)
        assert (record["asset"], record["status"]) == ("clip", "queued")
        assert record["source"] == f"s3://{rig.bucket}/incoming/clip.mp4"
        assert redis_server.client().llen("hlsvault:probe") == 1  # its first stage is enqueued
        gone = cli(env, "ingest", "parked", "--replay", event_id)
        assert gone.returncode == 1
        assert f"no parked message '{event_id}'" in gone.stderr

        # and the same upload parked again is answered by its job, making no second one
        rig.parking.park(created_event(rig.bucket, "incoming/clip.mp4"), "parked by hand")
        (entry,) = [e for e in rig.parking.entries() if e.reason == "parked by hand"]
        duplicate = cli(env, "ingest", "parked", "--replay", entry.id)
        assert duplicate.stdout == (
            f"replayed {entry.id}: job {job_id} for asset clip (already a job)\n")

        # When the garbage is dropped, the park is empty
        dropped = cli(env, "ingest", "parked", "--drop", garbage_id)
        assert (dropped.returncode, dropped.stdout) == (0, f"dropped {garbage_id}\n")
        assert cli(env, "ingest", "parked").stdout.startswith("0 parked")

    def test_without_redis_it_says_what_to_set(self, tmp_path: Path) -> None:
        env = {"PATH": "/usr/bin:/bin", "HLSVAULT_DATA_DIR": str(tmp_path), "PYTHONPATH": str(ROOT)}
        done = cli(env, "ingest", "parked")
        assert done.returncode == 78
        assert done.stderr == (
            "hlsvault: parked ingest messages live in the fleet's Redis: set REDIS_URL\n")


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
        parking = ParkingLot(redis)
        parked = eventually(
            lambda: (entries := parking.entries()) and len(entries) >= 2 and entries,
            timeout=30, what="parking of two bad messages",
        )
        reasons = {entry.body: entry.reason for entry in parked}
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
