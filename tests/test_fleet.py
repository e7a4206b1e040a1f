"""The distributed fleet: Redis queues, S3 stores, CloudFront, Procfile processes."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

from pipeline.keys import KeyVault
from pipeline.settings import decode_master_key
from pipeline.storage.s3 import S3Store

from fleet import Fleet, MotoServer, stop_process
from support import ROOT, VENV_BIN, frame_hashes, framemd5, wait_for_port


def wait_for_job(fleet: Fleet, job_id: str, timeout: float = 240) -> dict[str, Any]:
    done = fleet.cli(
        "status", job_id, "--wait", "--json", "--timeout", str(timeout), timeout=timeout + 30
    )
    assert done.stdout, done.stderr + fleet.log_text()[-5000:]
    record: dict[str, Any] = json.loads(done.stdout)
    return record


def submit(fleet: Fleet, source: Path, asset: str, *args: str) -> str:
    done = fleet.cli("submit", str(source), "--asset", asset, *args)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def bucket_objects(moto: MotoServer, bucket: str, prefix: str = "") -> dict[str, bytes]:
    s3 = moto.client("s3")
    listed = s3.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])
    return {o["Key"]: s3.get_object(Bucket=bucket, Key=o["Key"])["Body"].read() for o in listed}


def vault_keys(fleet: Fleet, moto: MotoServer) -> dict[str, bytes]:
    """Every content key in the vault bucket, unwrapped with the fleet's master key."""
    store = S3Store(fleet.env["TEST_BUCKET_VAULT"], "vault", client=moto.client("s3"))
    vault = KeyVault(store, decode_master_key(fleet.env["HLSVAULT_MASTER_KEY"]))
    keys = {}
    for path in store.list("keys"):
        _, asset, version, name = path.split("/")
        keys[path] = vault.get(asset, version, int(name.removesuffix(".key")))
    return keys


class TestEndToEnd:
    def test_submitted_job_is_published_to_s3_and_plays_through_the_key_server(
        self, fleet: Fleet, moto_server: MotoServer, copy_clip: Path
    ) -> None:
        """submit -> workers over Redis -> S3 origin; ffmpeg plays it with segments fetched
        from the S3 endpoint over HTTP, frame for frame equal to the source."""
        # Given the Procfile's processes running against Redis and the S3 API
        fleet.start_all()

        # When a local file is submitted and the job runs to its end
        job_id = submit(fleet, copy_clip, "fleet", "--ladder", "copy", "--segment-seconds", "2")
        record = wait_for_job(fleet, job_id)
        assert record["status"] == "succeeded", record
        version = record["version"]
        stages = {s["name"]: s["status"] for s in record["stages"]}
        assert stages["invalidate"] == "done"

        # Then ffmpeg plays it through the key server, segments from the S3 endpoint
        url = fleet.cli("url", "fleet").stdout.strip()
        assert frame_hashes(framemd5(url)) == frame_hashes(framemd5(str(copy_clip)))

        # and the origin holds versioned segments with CDN headers, and no key material
        origin = fleet.env["TEST_BUCKET_ORIGIN"]
        objects = bucket_objects(moto_server, origin)
        segments = sorted(k for k in objects if k.endswith(".ts"))
        playlists = sorted(k for k in objects if k.endswith(".m3u8"))
        assert len(segments) == 3 and len(objects) == 5
        assert playlists == ["assets/fleet/master.m3u8", f"assets/fleet/{version}/360p.m3u8"]
        s3 = moto_server.client("s3")
        head = s3.head_object(Bucket=origin, Key=segments[0])
        assert head["ContentType"] == "video/mp2t"
        assert "immutable" in head["CacheControl"]
        head = s3.head_object(Bucket=origin, Key=playlists[0])
        assert head["ContentType"] == "application/vnd.apple.mpegurl"
        assert head["CacheControl"] == "public, max-age=60"
        assert all(b"token" not in objects[p] for p in playlists)
        keys = vault_keys(fleet, moto_server)
        assert len(keys) == 1
        for key in keys.values():
            assert all(key not in body and key.hex().encode() not in body
                       for body in objects.values())

        # and CloudFront was asked, once, to invalidate the asset's stable paths
        cloudfront = moto_server.client("cloudfront")
        distribution = fleet.env["HLSVAULT_CLOUDFRONT_DISTRIBUTION_ID"]
        listed = cloudfront.list_invalidations(DistributionId=distribution)["InvalidationList"]
        assert listed["Quantity"] == 1
        batch = cloudfront.get_invalidation(
            DistributionId=distribution, Id=listed["Items"][0]["Id"]
        )["Invalidation"]["InvalidationBatch"]
        assert batch["CallerReference"] == f"hlsvault-{job_id}"
        assert batch["Paths"]["Items"] == ["/assets/fleet/master.m3u8"]

        # and no process of the fleet logged the token or a key (the key server's access and
        # audit lines included)
        logs = fleet.log_text()
        token = url.split("token=", 1)[1]
        assert '"key request"' in logs and token not in logs
        assert token.rsplit(".", 1)[1] not in logs
        for key in keys.values():
            assert key.hex() not in logs and key.hex().upper() not in logs

        # and the work bucket keeps no scratch of the finished job
        assert bucket_objects(moto_server, fleet.env["TEST_BUCKET_WORK"], "work/jobs") == {}

    def test_package_in_distributed_mode_is_submit_and_wait(
        self, fleet: Fleet, copy_clip: Path
    ) -> None:
        """`hlsvault package` with REDIS_URL set runs on the fleet and exits 0 once published."""
        fleet.start_all()
        done = fleet.cli("package", str(copy_clip), "--asset", "pkg", "--ladder", "copy", "--json")
        assert done.returncode == 0, done.stderr + fleet.log_text()[-3000:]
        summary = json.loads(done.stdout)
        assert summary["status"] == "succeeded" and summary["renditions"][0]["name"] == "360p"


class TestScratch:
    def test_workers_leave_no_temporary_files_behind(
        self, fleet: Fleet, copy_clip: Path, tmp_path: Path
    ) -> None:
        """On an S3 fleet each stage works in a local temporary directory: after a job nothing
        of it is left on the workers' disk (a segment host would fill up film by film)."""
        scratch = tmp_path / "worker-tmp"
        scratch.mkdir()
        fleet.env["TMPDIR"] = str(scratch)
        fleet.start_all()

        published = wait_for_job(fleet, submit(fleet, copy_clip, "tidy", "--ladder", "copy"))

        assert published["status"] == "succeeded", published
        assert sorted(p.name for p in scratch.iterdir()) == []


class TestInvalidation:
    def test_a_refused_invalidation_leaves_the_job_published_with_a_warning(
        self, fleet: Fleet, copy_clip: Path
    ) -> None:
        """A wrong distribution id (NoSuchDistribution) cannot unpublish what is already on the
        origin: the job succeeds, the invalidate stage says why it failed, and the old version's
        shred is still scheduled."""
        fleet.env["HLSVAULT_CLOUDFRONT_DISTRIBUTION_ID"] = "EWRONGDISTRIBUTION"
        fleet.start_all()

        record = wait_for_job(fleet, submit(fleet, copy_clip, "cdnwarn", "--ladder", "copy"))

        assert record["status"] == "succeeded", record
        invalidate = next(s for s in record["stages"] if s["name"] == "invalidate")
        assert invalidate["status"] == "failed"
        assert "EWRONGDISTRIBUTION" in invalidate["detail"]
        assert invalidate["attempts"] == 1


class TestProcfile:
    def test_honcho_runs_the_stack_with_two_segmenting_processes(
        self, fleet: Fleet, long_hd_clip: Path
    ) -> None:
        """`honcho start -c segment=2` runs every process type, two of them segmenting, and
        both segmenting processes take work from the shared queue."""
        # 2 s chunks: each 10 s job is five segment messages, ten for both processes to share
        fleet.env["HLSVAULT_CHUNK_SECONDS"] = "2"
        honcho = subprocess.Popen(
            [str(VENV_BIN / "honcho"), "start", "-c", "segment=2", "-p", str(fleet.web_port)],
            cwd=ROOT, env=fleet.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            wait_for_port(fleet.web_port)
            jobs = [
                submit(fleet, long_hd_clip, f"honcho{i}", "--ladder", "default",
                       "--segment-seconds", "2")
                for i in range(2)
            ]
            records = [wait_for_job(fleet, job) for job in jobs]
            assert [r["status"] for r in records] == ["succeeded", "succeeded"]
        finally:
            stop_process(honcho)
        assert honcho.stdout is not None
        output = honcho.stdout.read().decode(errors="replace")
        for process in ("web.1", "upload.1", "encrypt.1", "segment.1", "segment.2"):
            assert re.search(rf" {re.escape(process)} +\| ", output), output[-3000:]
        for process in ("segment.1", "segment.2"):
            lines = [
                line for line in output.splitlines()
                if re.search(rf" {re.escape(process)} +\| ", line)
            ]
            assert any('"stage done"' in line and '"segment:' in line for line in lines), (
                f"{process} did no segmenting:\n" + "\n".join(lines[-20:])
            )
