"""Benchmark: the upload stage against `aws s3 sync`, to the same S3 endpoint, side by side.

Both publish the same tree, a directory of AES-128 encrypted ``.ts`` segments, to a moto server
(the real S3 HTTP API, from tests/fleet.py), each round under a fresh prefix:

- hlsvault: ``pipeline.publish.upload`` itself, the function the `media.upload` actor calls,
            with the work store a local directory holding the tree and the origin and vault
            stores ``s3://`` on the moto server. It runs in this process on stores opened once,
            as in a worker, which opens them on its first message and keeps them.
- awscli:   ``aws s3 sync TREE s3://origin/awscli/N/ --endpoint-url URL`` with default
            settings (no config file), as a subprocess: what an operator would type.

Two more are timed for context, to tell awscli's start-up from its transfers:

- aws-start:  ``aws s3 sync`` of an empty directory: the CLI's start, its client and its
              listing of the destination, with nothing to upload;
- s3transfer: awscli's transfer engine (s3transfer's ``TransferManager``, 10 concurrent
              requests, 8 MB multipart threshold and chunks, as awscli's defaults) in this
              process, on a client opened once.

The tree is the cached 120 s 1080p clip of ``sample_clip.py`` cut by ffmpeg (``-c copy -f hls``)
into segments of ``--segment-seconds`` (6: 20 files of ~4 MB) and encrypted with
``pipeline.crypto.encrypt_file``.

Rounds alternate the contenders in a rotating order; reported is the median wall clock of each
and ``median(hlsvault) / median(awscli)``. After every round both prefixes are listed to check
that each holds the whole tree, byte count for byte count, and then deleted (untimed).

    python bench/bench_upload.py [--rounds N] [--warmup N] [--segment-seconds S]
"""

from __future__ import annotations

import argparse
import base64
import os
import shutil
import statistics
import subprocess
import sys
import time
import venv
from dataclasses import replace
from pathlib import Path
from typing import Any

from machine import describe
from s3transfer.manager import TransferConfig, TransferManager
from sample_clip import WORK_DIR, ensure_clip

# The moto server of the test harness is reused as is; tests/ is a folder, not a package.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from pipeline import layout, publish
from pipeline.crypto import encrypt_file, iv_for_sequence
from pipeline.jobs import JobSpec, new_job_spec
from pipeline.playlists import AssetVersion, describe_rendition
from pipeline.segment import Segment, SegmentedRendition, parse_plain_playlist
from pipeline.services import Services, build_services
from pipeline.settings import load_settings

from fleet import MotoServer

#: The brief: publishing a tree should take at most 70 % of `aws s3 sync`'s time.
TARGET_RATIO = 0.7
DEFAULT_ROUNDS = 5
#: One untimed round opens the connections and fills the page cache for everyone.
DEFAULT_WARMUP = 1
DEFAULT_SEGMENT_SECONDS = 6.0
#: 80 MB to a local endpoint takes seconds; anything near this is a hang, not a result.
COMMAND_TIMEOUT_S = 600
#: awscli pins its own botocore, so it lives in a venv of its own, never in the project's.
AWSCLI_VENV = WORK_DIR / "awscli-venv"

RUN_DIR = WORK_DIR / "upload"
WORK_STORE = RUN_DIR / "work"
PLAIN_DIR = RUN_DIR / "plain"
EMPTY_DIR = RUN_DIR / "empty"
DATA_DIR = RUN_DIR / "hlsvault-data"
ASSET = "benchupload"
#: The tree sits where the encrypt stage leaves a job's segments: jobs/<id>/enc/<rendition>/.
TREE_JOB_ID = "benchupload"
RENDITION = "1080p"

HLSVAULT = "hlsvault"
AWSCLI = "awscli"
AWS_START = "aws-start"
TRANSFER = "s3transfer"
CONTENDERS = (HLSVAULT, AWSCLI, AWS_START, TRANSFER)
#: awscli's own defaults for `aws s3` (awscli/customizations/s3/transferconfig.py).
AWSCLI_CONCURRENCY = 10
AWSCLI_MULTIPART_BYTES = 8 * 1024 * 1024


def tree_dir() -> Path:
    return WORK_STORE / layout.encrypted_prefix(TREE_JOB_ID, RENDITION)


def aws_works(executable: str) -> bool:
    try:
        done = subprocess.run([executable, "--version"], capture_output=True, timeout=60,
                              check=False)
    except (OSError, subprocess.SubprocessError):
        return False
    return done.returncode == 0


def aws_executable() -> str:
    """The `aws` program, bypassing a pyenv shim (a bash script that adds its own start-up to
    every call); installed with pip into ``bench/.work/awscli-venv`` when none works."""
    found = shutil.which("aws")
    if found is not None and "/shims/" in found:
        done = subprocess.run(["pyenv", "which", "aws"], capture_output=True, text=True,
                              timeout=60, check=False)
        found = done.stdout.strip() if done.returncode == 0 and done.stdout.strip() else found
    if found is not None and aws_works(found):
        return found
    local = AWSCLI_VENV / "bin" / "aws"
    if not aws_works(str(local)):
        print(f"installing awscli into {AWSCLI_VENV} (once) ...", flush=True)
        venv.create(AWSCLI_VENV, with_pip=True, clear=True)
        subprocess.run([str(AWSCLI_VENV / "bin" / "pip"), "install", "--quiet", "awscli"],
                       check=True, timeout=COMMAND_TIMEOUT_S)
    return str(local)


def build_tree(clip: Path, segment_seconds: float) -> SegmentedRendition:
    """Cut the clip into plain segments, encrypt them into the work store's layout, and
    describe them as the segment stage would."""
    shutil.rmtree(RUN_DIR, ignore_errors=True)
    PLAIN_DIR.mkdir(parents=True)
    tree_dir().mkdir(parents=True)
    EMPTY_DIR.mkdir()
    subprocess.run(
        ["ffmpeg", "-nostdin", "-hide_banner", "-loglevel", "error", "-y", "-i", str(clip),
         "-c", "copy", "-f", "hls", "-hls_time", f"{segment_seconds:g}",
         "-hls_playlist_type", "vod", "-hls_segment_filename", str(PLAIN_DIR / "seg_%05d.ts"),
         str(PLAIN_DIR / "plain.m3u8")],
        check=True, timeout=COMMAND_TIMEOUT_S,
    )
    key = os.urandom(16)
    segments = []
    for seg in parse_plain_playlist(PLAIN_DIR):
        size = encrypt_file(PLAIN_DIR / seg.name, tree_dir() / seg.name, key,
                            iv_for_sequence(seg.sequence))
        segments.append(Segment(seg.sequence, seg.name, seg.duration, size))
    shutil.rmtree(PLAIN_DIR)
    return SegmentedRendition(
        rendition=RENDITION, segments=tuple(segments), width=1920, height=1080,
        frame_rate="30", video_profile="High", video_level=40, audio_codec="aac",
        audio_profile="LC",
    )


def open_services(origin_bucket: str, vault_bucket: str) -> Services:
    """The stores as a worker opens them: work local, origin and vault on S3 (AWS_* from this
    process's environment, which points boto3 at the moto server)."""
    settings = load_settings({
        "HLSVAULT_DATA_DIR": str(DATA_DIR),
        "HLSVAULT_WORK": str(WORK_STORE),
        "HLSVAULT_ORIGIN": f"s3://{origin_bucket}",
        "HLSVAULT_VAULT": f"s3://{vault_bucket}/vault",
        "HLSVAULT_TOKEN_SECRET": base64.urlsafe_b64encode(os.urandom(36)).decode(),
        "HLSVAULT_MASTER_KEY": base64.b64encode(os.urandom(32)).decode(),
    })
    return build_services(settings)


def fresh_spec(clip: Path) -> JobSpec:
    """A job spec with a version never used before, on the tree's job id."""
    return replace(new_job_spec(str(clip), asset=ASSET, ladder="copy"), job_id=TREE_JOB_ID)


def listed(s3: Any, bucket: str, prefix: str) -> dict[str, int]:
    sizes: dict[str, int] = {}
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        sizes.update({item["Key"][len(prefix):]: item["Size"] for item in page.get("Contents", [])})
    return sizes


def delete_prefix(s3: Any, bucket: str, prefix: str) -> None:
    keys = [{"Key": prefix + name} for name in listed(s3, bucket, prefix)]
    for start in range(0, len(keys), 1000):
        s3.delete_objects(Bucket=bucket, Delete={"Objects": keys[start:start + 1000]})


class Contenders:
    """Everything the rounds share: the endpoint, the buckets, the stores, the tree."""

    def __init__(self, moto: MotoServer, clip: Path, produced: SegmentedRendition,
                 aws: str) -> None:
        self.moto = moto
        self.clip = clip
        self.produced = produced
        self.aws = aws
        self.s3 = moto.client("s3")
        self.origin = "bench-origin"
        self.vault = "bench-vault"
        for bucket in (self.origin, self.vault):
            self.s3.create_bucket(Bucket=bucket)
        self.svc = open_services(self.origin, self.vault)
        self.transfer_client = moto.client("s3")
        self.expected = {seg.name: seg.size for seg in produced.segments}
        self.headers: dict[str, str] = {}
        # awscli with its defaults: no config or credentials file of this machine's user.
        self.aws_env = {
            **os.environ,
            "AWS_CONFIG_FILE": str(RUN_DIR / "no-aws-config"),
            "AWS_SHARED_CREDENTIALS_FILE": str(RUN_DIR / "no-aws-credentials"),
        }

    def run(self, name: str, label: str) -> float:
        if name == HLSVAULT:
            return self.run_hlsvault()
        if name == AWSCLI:
            return self.run_aws(tree_dir(), f"awscli/{label}/", check=True)
        if name == TRANSFER:
            return self.run_transfer(f"s3transfer/{label}/")
        return self.run_aws(EMPTY_DIR, f"aws-start/{label}/", check=False)

    def run_hlsvault(self) -> float:
        spec = fresh_spec(self.clip)
        sizes = [seg.size for seg in self.produced.segments]
        # What the playlist stage records before upload runs: untimed, it is not this stage.
        self.svc.catalog.put_version(AssetVersion(
            asset=spec.asset, version=spec.version, job_id=spec.job_id, created_at=time.time(),
            key_rotation_segments=0,
            renditions=(describe_rendition(self.produced, sizes, 0),),
            key_server=self.svc.settings.public_url,
        ))
        started = time.perf_counter()
        publish.upload(self.svc, spec)
        elapsed = time.perf_counter() - started
        prefix = layout.segment_key(ASSET, spec.version, RENDITION, "")
        self.check(prefix, HLSVAULT)
        if self.svc.catalog.current_version(ASSET) != spec.version:
            sys.exit("bench_upload: hlsvault did not flip the catalog to the uploaded version")
        return elapsed

    def run_aws(self, source: Path, prefix: str, *, check: bool) -> float:
        args = [self.aws, "--endpoint-url", self.moto.endpoint, "s3", "sync", str(source),
                f"s3://{self.origin}/{prefix}"]
        started = time.perf_counter()
        done = subprocess.run(args, env=self.aws_env, capture_output=True,
                              timeout=COMMAND_TIMEOUT_S, check=False)
        elapsed = time.perf_counter() - started
        if done.returncode != 0:
            sys.exit(f"bench_upload: aws s3 sync failed ({done.returncode}):\n"
                     f"{done.stderr.decode(errors='replace')[-2000:]}")
        if check:
            self.check(prefix, AWSCLI)
        return elapsed

    def run_transfer(self, prefix: str) -> float:
        """awscli's transfer engine without awscli's process: s3transfer's TransferManager
        with awscli's defaults, in this process, on a client opened once (as hlsvault's is)."""
        config = TransferConfig(
            max_request_concurrency=AWSCLI_CONCURRENCY,
            multipart_threshold=AWSCLI_MULTIPART_BYTES,
            multipart_chunksize=AWSCLI_MULTIPART_BYTES,
        )
        started = time.perf_counter()
        with TransferManager(self.transfer_client, config) as manager:
            futures = [
                manager.upload(str(tree_dir() / name), self.origin, prefix + name)
                for name in sorted(self.expected)
            ]
            for future in futures:
                future.result()
        elapsed = time.perf_counter() - started
        self.check(prefix, TRANSFER)
        return elapsed

    def check(self, prefix: str, who: str) -> None:
        """The whole tree is there, byte count for byte count; note what a CDN would be told
        about a segment; then make room for the next round."""
        got = listed(self.s3, self.origin, prefix)
        if got != self.expected:
            sys.exit(f"bench_upload: {who} left {len(got)} objects under {prefix}, "
                     f"expected the {len(self.expected)} files of the tree with their sizes")
        head = self.s3.head_object(Bucket=self.origin, Key=prefix + min(got))
        self.headers[who] = (f"Content-Type {head.get('ContentType')}, "
                             f"Cache-Control {head.get('CacheControl')}")
        delete_prefix(self.s3, self.origin, prefix)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--rounds", type=int, default=DEFAULT_ROUNDS, help="timed rounds")
    parser.add_argument("--warmup", type=int, default=DEFAULT_WARMUP, help="untimed rounds first")
    parser.add_argument("--segment-seconds", type=float, default=DEFAULT_SEGMENT_SECONDS,
                        help="segment length of the tree (default 6: 20 files)")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.warmup < 0 or args.segment_seconds <= 0:
        parser.error("--rounds must be at least 1, --warmup at least 0, --segment-seconds > 0")

    clip = ensure_clip()
    aws = aws_executable()
    aws_version = subprocess.run([aws, "--version"], capture_output=True, text=True,
                                 timeout=60, check=True).stdout.strip()
    produced = build_tree(clip, args.segment_seconds)
    total = sum(seg.size for seg in produced.segments)
    moto = MotoServer(RUN_DIR / "moto.log")
    # boto3 in this process (the hlsvault stores) finds the endpoint as a worker would.
    os.environ.update(
        AWS_ENDPOINT_URL=moto.endpoint, AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1",  # noqa: S106 - moto
    )
    moto.start()
    try:
        contenders = Contenders(moto, clip, produced, aws)
        print(describe())
        print(f"tree: {len(produced.segments)} encrypted segments of {args.segment_seconds:g} s "
              f"cut from {clip.name}, {total / 1e6:.1f} MB; endpoint: moto server "
              f"(moto {moto_version()}) on 127.0.0.1")
        print(f"awscli: {aws} ({aws_version}), default settings; hlsvault: "
              f"publish.upload, UPLOAD_CONCURRENCY {publish.UPLOAD_CONCURRENCY}")
        print(f"{args.rounds} rounds after {args.warmup} warm-up; wall clock in seconds")
        print(f"{'round':<7}" + "".join(f"{c:>12}" for c in CONTENDERS) + "   order")
        seconds: dict[str, list[float]] = {c: [] for c in CONTENDERS}
        for index in range(args.warmup + args.rounds):
            timed = index >= args.warmup
            shift = index % len(CONTENDERS)
            order = CONTENDERS[shift:] + CONTENDERS[:shift]
            label = f"r{index - args.warmup + 1}" if timed else f"warmup{index}"
            row = {name: contenders.run(name, label) for name in order}
            if timed:
                for name, value in row.items():
                    seconds[name].append(value)
            print(f"{label.removeprefix('r') if timed else 'warmup':<7}"
                  + "".join(f"{row[c]:>12.3f}" for c in CONTENDERS)
                  + f"   {' > '.join(order)}", flush=True)
        medians = {name: statistics.median(values) for name, values in seconds.items()}
        print(f"{'median':<7}" + "".join(f"{medians[c]:>12.3f}" for c in CONTENDERS))
        print(f"{'MB/s':<7}" + "".join(
            f"{total / 1e6 / medians[c]:>12.0f}" if c != AWS_START else f"{'':>12}"
            for c in CONTENDERS))
        print(f"context: {AWS_START} (aws s3 sync of an empty directory: the CLI's start-up, "
              f"client and listing of the destination) median {medians[AWS_START]:.3f} s; "
              f"{TRANSFER} (awscli's transfer engine and defaults, in this process, client "
              f"opened once) median {medians[TRANSFER]:.3f} s, hlsvault / {TRANSFER} "
              f"{medians[HLSVAULT] / medians[TRANSFER]:.2f}")
        for who, headers in contenders.headers.items():
            print(f"segment headers, {who}: {headers}")
    finally:
        moto.stop()
    ratio = medians[HLSVAULT] / medians[AWSCLI]
    verdict = "met" if ratio <= TARGET_RATIO else "MISSED"
    print(f"RESULT upload: hlsvault {medians[HLSVAULT]:.2f} s, awscli {medians[AWSCLI]:.2f} s, "
          f"ratio {ratio:.2f} (target <= {TARGET_RATIO}: {verdict})")
    return 0


def moto_version() -> str:
    from importlib.metadata import version

    return version("moto")


if __name__ == "__main__":
    sys.exit(main())
