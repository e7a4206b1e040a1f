"""Nothing lost when a piece of the fleet dies: workers killed with SIGKILL, Redis restarted,
S3 throttling, permanent S3 refusals, and two jobs racing for one asset."""

from __future__ import annotations

import signal
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

from pipeline.catalog import Catalog
from pipeline.crypto import iv_for_sequence
from pipeline.keys import KeyVault
from pipeline.settings import decode_master_key
from pipeline.storage.s3 import S3Store

from faultproxy import ACCESS_DENIED, SLOW_DOWN, FaultProxy, Rule
from fleet import Fleet, MotoServer, RedisServer
from support import decrypt_bytes, frame_hashes, framemd5
from test_fleet import bucket_objects, submit, wait_for_job

#: How long a test waits for a stage to be seen running before giving up.
STAGE_WAIT_S = 120


def job_fields(redis_server: RedisServer, job_id: str) -> dict[str, str]:
    fields: dict[str, str] = redis_server.client().hgetall(f"hlsvault:job:{job_id}")
    return fields


def wait_until(condition: Callable[[], bool], what: str, timeout: float = STAGE_WAIT_S) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} did not happen within {timeout:.0f} s")
        time.sleep(0.05)


def stage_running(redis_server: RedisServer, job_id: str, prefix: str) -> bool:
    fields = job_fields(redis_server, job_id)
    return any(
        name.startswith(prefix) and name.endswith(".status") and value == "running"
        for name, value in fields.items()
    )


def published_plaintext(fleet: Fleet, moto: MotoServer, asset: str) -> dict[str, bytes]:
    """Every published segment of the asset's current version, decrypted with the vault's
    keys as a player would: ``rendition/name`` -> clear MPEG-TS bytes."""
    client = moto.client("s3")
    vault_store = S3Store(fleet.env["TEST_BUCKET_VAULT"], "vault", client=client)
    described = Catalog(vault_store).current(asset)
    assert described is not None, f"{asset} was not published"
    vault = KeyVault(vault_store, decode_master_key(fleet.env["HLSVAULT_MASTER_KEY"]))
    origin = {
        key: body
        for key, body in bucket_objects(
            moto, fleet.env["TEST_BUCKET_ORIGIN"], f"assets/{asset}/{described.version}/"
        ).items()
        if key.endswith(".ts")
    }
    clear = {}
    for rendition in described.renditions:
        for segment in rendition.segments:
            key = f"assets/{asset}/{described.version}/{rendition.name}/{segment.name}"
            content_key = vault.get(asset, described.version, segment.key)
            clear[f"{rendition.name}/{segment.name}"] = decrypt_bytes(
                origin[key], content_key, iv_for_sequence(segment.sequence)
            )
    # exactly the catalog's segments were published for this version, nothing more
    assert sorted(origin) == sorted(
        f"assets/{asset}/{described.version}/{name}" for name in clear
    )
    return clear


def key_files(fleet: Fleet, moto: MotoServer, asset: str) -> list[str]:
    store = S3Store(fleet.env["TEST_BUCKET_VAULT"], "vault", client=moto.client("s3"))
    return store.list(f"keys/{asset}")


class TestWorkerKilled:
    def test_segment_worker_killed_mid_job(
        self, faulty_fleet: Fleet, fault_proxy: FaultProxy, redis_server: RedisServer,
        moto_server: MotoServer, long_hd_clip: Path,
    ) -> None:
        """SIGKILL of the segmenting process mid-remux: once it is started again the job
        completes, its published segments decrypt to the same bytes as an undisturbed run's,
        and the vault holds one key per (asset, version, index)."""
        fleet = faulty_fleet
        fleet.start_all()
        options = ("--ladder", "copy", "--segment-seconds", "1", "--key-rotation-segments", "4")
        reference = submit(fleet, long_hd_clip, "calm", *options)
        calm_record = wait_for_job(fleet, reference)
        assert calm_record["status"] == "succeeded", calm_record["error"]

        # Given a job whose segmenting is under way, slowed by a slow source (each read of it
        # takes 0.3 s), so that there is time to kill it in the middle
        fault_proxy.add(Rule("GET", "/sources/", delay_s=0.3))
        job_id = submit(fleet, long_hd_clip, "crash", *options)
        wait_until(lambda: stage_running(redis_server, job_id, "segment:"), "segmenting")
        time.sleep(0.5)

        # When the segmenting process is killed outright, then started again
        fleet.kill("segment", signal.SIGKILL)
        fault_proxy.clear()
        time.sleep(1.0)
        fleet.start("segment")

        # Then the job completes, and the segment stage shows the second delivery
        record = wait_for_job(fleet, job_id)
        assert record["status"] == "succeeded", record
        segment_stage = next(s for s in record["stages"] if s["name"].startswith("segment:"))
        assert segment_stage["attempts"] == 2

        # and what was published is what the undisturbed run published, byte for byte
        calm = published_plaintext(fleet, moto_server, "calm")
        crash = published_plaintext(fleet, moto_server, "crash")
        assert len(crash) == 10
        assert crash == calm

        # and each (version, index) has exactly one key: 10 segments, a new key every 4
        assert len(key_files(fleet, moto_server, "crash")) == 3

    def test_upload_worker_killed_mid_upload(
        self, faulty_fleet: Fleet, fault_proxy: FaultProxy, redis_server: RedisServer,
        moto_server: MotoServer, long_hd_clip: Path,
    ) -> None:
        """SIGKILL of the uploading process halfway through publishing: restarted, it
        finishes the job, players never saw a half-published version, and the result equals
        an undisturbed run's."""
        fleet = faulty_fleet
        fleet.start_all()
        options = ("--ladder", "copy", "--segment-seconds", "1")
        reference = submit(fleet, long_hd_clip, "calm", *options)
        calm_record = wait_for_job(fleet, reference)
        assert calm_record["status"] == "succeeded", calm_record["error"]

        # Given a job that has published 3 of its 10 segments, the other uploads hanging
        origin = fleet.env["TEST_BUCKET_ORIGIN"]
        fault_proxy.add(Rule("PUT", f"^/{origin}/assets/crash/", delay_s=0.2, times=3))
        fault_proxy.add(Rule("PUT", f"^/{origin}/assets/crash/", delay_s=10, status=503))
        job_id = submit(fleet, long_hd_clip, "crash", *options)
        wait_until(lambda: stage_running(redis_server, job_id, "upload"), "uploading")
        wait_until(
            lambda: bool(bucket_objects(moto_server, origin, "assets/crash/")), "a first upload"
        )

        # When the uploading process is killed mid-upload
        fleet.kill("upload", signal.SIGKILL)
        partial = bucket_objects(moto_server, origin, "assets/crash/")
        s3 = moto_server.client("s3")
        vault_store = S3Store(fleet.env["TEST_BUCKET_VAULT"], "vault", client=s3)
        assert Catalog(vault_store).current_version("crash") is None, "flipped before upload"
        assert len(partial) == 3
        fault_proxy.clear()
        time.sleep(1.0)
        fleet.start("upload")

        # Then the job completes with the same bytes as the undisturbed run
        record = wait_for_job(fleet, job_id)
        assert record["status"] == "succeeded", record
        assert published_plaintext(fleet, moto_server, "crash") == published_plaintext(
            fleet, moto_server, "calm"
        )
        assert len(key_files(fleet, moto_server, "crash")) == 1


class TestRedisRestart:
    def test_no_job_is_lost_when_redis_restarts_mid_run(
        self, fleet: Fleet, redis_server: RedisServer, moto_server: MotoServer,
        long_hd_clip: Path,
    ) -> None:
        """Redis killed and restarted (AOF on) while a job is segmenting: the job, its
        messages and its record survive, and it is published."""
        fleet.start_all()
        job_id = submit(fleet, long_hd_clip, "survivor", "--ladder", "default",
                        "--segment-seconds", "2")
        wait_until(lambda: stage_running(redis_server, job_id, "segment:"), "segmenting")

        redis_server.stop(signal.SIGKILL)
        time.sleep(2.0)
        redis_server.start()

        record = wait_for_job(fleet, job_id)
        assert record["status"] == "succeeded", record
        assert len(published_plaintext(fleet, moto_server, "survivor")) == 15


class TestS3Failures:
    def test_throttling_is_retried_and_the_job_completes(
        self, faulty_fleet: Fleet, fault_proxy: FaultProxy, moto_server: MotoServer,
        copy_clip: Path,
    ) -> None:
        """503 SlowDown on a dozen uploads to the origin: retried with backoff, published."""
        fleet = faulty_fleet
        fleet.start_all()
        origin = fleet.env["TEST_BUCKET_ORIGIN"]
        throttle = fault_proxy.add(
            Rule("PUT", f"^/{origin}/", status=503, body=SLOW_DOWN, times=12)
        )

        job_id = submit(fleet, copy_clip, "throttled", "--ladder", "copy",
                        "--segment-seconds", "1")
        record = wait_for_job(fleet, job_id)

        assert throttle.hits == 12
        assert record["status"] == "succeeded", record
        assert len(published_plaintext(fleet, moto_server, "throttled")) == 6

    def test_missing_source_object_fails_the_job_and_publishes_nothing(
        self, fleet: Fleet, moto_server: MotoServer
    ) -> None:
        """An s3:// source that does not exist fails at probe with that reason."""
        fleet.start_all()
        source = f"s3://{fleet.env['TEST_BUCKET_WORK']}/uploads/nope.mp4"
        done = fleet.cli("submit", source, "--asset", "ghost", "--ladder", "copy")
        assert done.returncode == 0, done.stderr

        record = wait_for_job(fleet, done.stdout.strip())

        assert record["status"] == "failed"
        assert record["failed_stage"] == "probe"
        assert f"source {source} not found" in record["error"]
        assert bucket_objects(moto_server, fleet.env["TEST_BUCKET_ORIGIN"]) == {}
        assert key_files(fleet, moto_server, "ghost") == []

    def test_source_without_read_permission_fails_the_job(
        self, faulty_fleet: Fleet, fault_proxy: FaultProxy, moto_server: MotoServer,
        copy_clip: Path,
    ) -> None:
        """403 on the source: the job fails with what permission is missing; nothing published."""
        fleet = faulty_fleet
        fleet.start_all()
        for method in ("HEAD", "GET"):
            fault_proxy.add(Rule(method, "/sources/", status=403, body=ACCESS_DENIED))

        job_id = submit(fleet, copy_clip, "forbidden", "--ladder", "copy")
        record = wait_for_job(fleet, job_id)

        assert record["status"] == "failed"
        assert "s3:GetObject" in record["error"]
        assert bucket_objects(moto_server, fleet.env["TEST_BUCKET_ORIGIN"]) == {}

    def test_origin_that_refuses_writes_fails_the_job_naming_the_store(
        self, faulty_fleet: Fleet, fault_proxy: FaultProxy, moto_server: MotoServer,
        copy_clip: Path,
    ) -> None:
        """AccessDenied on the origin bucket is the deployment's IAM policy, not the source: the
        job fails at upload with a reason naming the origin store and the policy, at once (no
        retries), and the asset is not published."""
        fleet = faulty_fleet
        fleet.start_all()
        origin = fleet.env["TEST_BUCKET_ORIGIN"]
        denied = fault_proxy.add(Rule("PUT", f"^/{origin}/", status=403, body=ACCESS_DENIED))

        job_id = submit(fleet, copy_clip, "refused", "--ladder", "copy")
        record = wait_for_job(fleet, job_id)

        assert record["status"] == "failed" and record["failed_stage"] == "upload"
        assert f"s3://{origin}" in record["error"] and "IAM policy" in record["error"]
        assert "source" not in record["error"]
        upload = next(s for s in record["stages"] if s["name"] == "upload")
        assert upload["attempts"] == 1 and denied.hits >= 1
        assert fleet.cli("status", job_id).returncode == 1


class TestConcurrentJobs:
    def test_two_jobs_for_one_asset_end_on_one_complete_version(
        self, fleet: Fleet, moto_server: MotoServer, copy_clip: Path
    ) -> None:
        """Two packagings of one asset at once: players get exactly one version, complete,
        never a playlist mixing the two."""
        fleet.start_all()
        fleet.start("segment")  # two segmenters, so the jobs really overlap
        first = submit(fleet, copy_clip, "twice", "--ladder", "copy", "--segment-seconds", "1")
        second = submit(fleet, copy_clip, "twice", "--ladder", "copy", "--segment-seconds", "2")
        records = [wait_for_job(fleet, first), wait_for_job(fleet, second)]
        assert [r["status"] for r in records] == ["succeeded", "succeeded"]

        clear = published_plaintext(fleet, moto_server, "twice")
        assert len(clear) in (6, 3)
        url = fleet.cli("url", "twice").stdout.strip()

        with urllib.request.urlopen(url, timeout=10) as response:
            variant_url = next(
                line for line in response.read().decode().splitlines() if line[:1] != "#"
            )
        with urllib.request.urlopen(variant_url, timeout=10) as response:
            segments = [
                line for line in response.read().decode().splitlines() if line[:1] != "#"
            ]
        versions = {segment.split("/assets/twice/")[1].split("/")[0] for segment in segments}
        assert len(versions) == 1
        assert frame_hashes(framemd5(url)) == frame_hashes(framemd5(str(copy_clip)))


class TestPoisonJob:
    def test_a_job_that_kills_its_worker_every_time_is_failed_after_the_bound(
        self, faulty_fleet: Fleet, fault_proxy: FaultProxy, redis_server: RedisServer,
        moto_server: MotoServer, copy_clip: Path,
    ) -> None:
        """A stage whose every delivery dies with its worker (dramatiq never counts those) is
        failed as poison once the record has counted HLSVAULT_MAX_DELIVERIES deliveries."""
        fleet = faulty_fleet
        fleet.env["HLSVAULT_MAX_DELIVERIES"] = "2"
        fleet.start_all()
        fault_proxy.add(Rule("GET", "/sources/", delay_s=0.3))
        job_id = submit(fleet, copy_clip, "poison", "--ladder", "copy", "--segment-seconds", "1")

        # Each time the segment stage is delivered, its worker dies (SIGKILL) mid-stage
        for delivery in (1, 2):
            def delivered(count: str = str(delivery)) -> bool:
                fields = job_fields(redis_server, job_id)
                return fields.get("segment:c000.attempts") == count and stage_running(
                    redis_server, job_id, "segment:"
                )

            wait_until(delivered, f"delivery {delivery}")
            fleet.kill("segment", signal.SIGKILL)
            fleet.start("segment")

        record = wait_for_job(fleet, job_id)
        assert record["status"] == "failed"
        assert record["failed_stage"] == "segment:c000"
        assert "delivered 3 times" in record["error"]
        assert bucket_objects(moto_server, fleet.env["TEST_BUCKET_ORIGIN"]) == {}
