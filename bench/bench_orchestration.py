"""Benchmark: what the fleet adds around ffmpeg and AES, per job, over Redis and S3.

Jobs of a 2 s 640x360 H.264/AAC clip (``--ladder copy``: one rendition, one segment) run
through all six stages on the Procfile's own worker processes (`upload`, `segment`,
`encrypt`, one of each, as shipped), against a private redis-server and a moto server (the
real S3 and CloudFront HTTP APIs), both from tests/fleet.py. Every store is ``s3://``, so
the job travels as it would between machines: ffprobe and ffmpeg read the source through a
presigned URL, segments go to and from the work bucket, upload copies them into the origin
bucket, and invalidate asks CloudFront.

Each round runs two batches of ``--jobs`` jobs (default 50), in an order that alternates:

- sequential: one job at a time; the next is submitted as soon as the previous one ended.
  Nothing queues behind anything, so the job's time is its own: this is the batch the
  target is judged on.
- concurrent: every job submitted back to back without waiting, then all awaited. This
  gives throughput; a job's latency then includes waiting behind the others.

Each job's source is a copy of the clip already in the work bucket (put there untimed, as
the S3-event ingest finds sources), submitted as ``s3://...`` through `hlsvault submit`'s own
code (``hlsvault.cli.main(["submit", ...])``) called in one long-lived submitter process, the
way a backend that enqueues jobs would: the CLI's interpreter start and imports, and the
upload of a local source, are not counted against the fleet (see fleet_bench.py). Two
untimed jobs warm the workers up first.

Per job, from its Redis record (epoch seconds):

    wall      = finished_at - created_at (created_at is stamped by submit before it writes
                the record and enqueues the probe)
    ffmpeg    = the wall time of the ffmpeg and ffprobe processes the job ran (ffprobe in the
                probe stage, ffmpeg in the segment stage), timed by a wrapper on the fleet's
                PATH that logs each process's start and end
    encrypt   = the encrypt stage, encrypt:<rendition>.started_at -> finished_at, whole: AES
                and everything around it (fetching the plain segment, creating and wrapping
                the key, putting the encrypted segment)
    outside   = wall - ffmpeg - encrypt: what the fleet adds around ffmpeg and crypto

``outside`` is reported with its parts: the submit call (created_at until the submit call
returned), the hops (from there to the probe starting, and from each stage's finished_at to
the next one's started_at: queue pickup and the bookkeeping around it), each stage without
its ffmpeg/ffprobe, and the end (invalidate finished to the job's finished_at); and S3 and
CloudFront requests per job, counted in the moto server's request log.

    python bench/bench_orchestration.py [--rounds N] [--jobs N] [--worker-timeout-ms MS]

``--worker-timeout-ms`` sets dramatiq's ``dramatiq_worker_timeout`` in the fleet's
environment (unset: dramatiq's default, 1000 ms): how long an idle consumer may sleep
between polls of its queue.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from fleet_bench import (
    CONCURRENT,
    SEQUENTIAL,
    BenchFleet,
    ToolRun,
    lavfi_clip,
    procfile_threads,
    source_tag,
)
from machine import describe
from sample_clip import WORK_DIR

#: The brief: the fleet should add at most 50 ms per job around ffmpeg and crypto.
TARGET_OUTSIDE_MS = 50.0
DEFAULT_JOBS = 50
DEFAULT_ROUNDS = 1
WARMUP_JOBS = 2
CLIP_SECONDS = 2
CLIP = WORK_DIR / f"clip-{CLIP_SECONDS}s-640x360p30-g30.mp4"
RUN_DIR = WORK_DIR / "orchestration"
#: Which Procfile process type runs which stages (their queues: probe + publish, segment,
#: encrypt), and how many worker threads each has, read from the Procfile itself.
PROCESS_STAGES = {
    "upload": ("probe", "playlist", "upload", "invalidate"),
    "segment": ("segment",),
    "encrypt": ("encrypt",),
}
THREADS = procfile_threads()


@dataclass
class JobTimes:
    wall: float
    ffmpeg: float
    encrypt: float
    parts: dict[str, float]

    @property
    def outside(self) -> float:
        return self.wall - self.ffmpeg - self.encrypt


@dataclass
class Batch:
    mode: str
    jobs: list[JobTimes] = field(default_factory=list)
    span: float = 0.0  # first created_at -> last finished_at
    requests: int = 0  # S3 + CloudFront requests seen by moto

    @property
    def throughput(self) -> float:
        return len(self.jobs) / self.span


def measure(bench: BenchFleet, clip: Path, mode: str, count: int) -> Batch:
    sources = bench.stage_sources(clip, count)
    requests_before = bench.moto_requests()
    submitted = bench.submit(mode, sources, "copy")
    batch = Batch(mode, requests=bench.moto_requests() - requests_before)
    tools: dict[str, list[ToolRun]] = {}
    for run in bench.tool_runs():
        tools.setdefault(run.tag, []).append(run)
    first, last = float("inf"), 0.0
    for job_id, submitted_at in submitted:
        record = bench.record(job_id)
        tag = source_tag(json.loads(record["spec"])["source"])
        batch.jobs.append(job_times(record, submitted_at, tools.get(tag, [])))
        first = min(first, float(record["created_at"]))
        last = max(last, float(record["finished_at"]))
    batch.span = last - first
    return batch


def job_times(record: dict[str, str], submitted_at: float, tools: list[ToolRun]) -> JobTimes:
    """One job's wall clock split at the record's timestamps (see the module docstring)."""

    def at(name: str) -> float:
        return float(record[name])

    stages = ["probe"]
    stages += sorted(k.removesuffix(".started_at") for k in record
                     if k.startswith("segment:") and k.endswith(".started_at"))
    stages += sorted(k.removesuffix(".started_at") for k in record
                     if k.startswith("encrypt:") and k.endswith(".started_at"))
    stages += ["playlist", "upload", "invalidate"]
    if len(stages) != 6:
        sys.exit(f"bench_orchestration: expected one rendition, got stages {stages}")
    created, finished = at("created_at"), at("finished_at")
    parts = {"submit": submitted_at - created}
    hops = at("probe.started_at") - submitted_at
    previous_end = None
    for stage in stages:
        started, ended = at(f"{stage}.started_at"), at(f"{stage}.finished_at")
        if previous_end is not None:
            hops += started - previous_end
        previous_end = ended
        parts[stage.split(":")[0]] = ended - started
    parts["hops"] = hops
    parts["finish"] = finished - at("invalidate.finished_at")
    parts["ffprobe"] = sum(run.end - run.start for run in tools if run.tool == "ffprobe")
    parts["ffmpeg"] = sum(run.end - run.start for run in tools if run.tool == "ffmpeg")
    parts["probe-rest"] = parts["probe"] - parts["ffprobe"]
    parts["segment-rest"] = parts["segment"] - parts["ffmpeg"]
    return JobTimes(
        wall=finished - created,
        ffmpeg=parts["ffprobe"] + parts["ffmpeg"],
        encrypt=parts["encrypt"],
        parts=parts,
    )


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f}"


def report(batches: list[Batch], mode: str) -> None:
    chosen = [b for b in batches if b.mode == mode]
    jobs = [job for batch in chosen for job in batch.jobs]
    median = {name: statistics.median(j.parts[name] for j in jobs) for name in jobs[0].parts}
    walls = [j.wall for j in jobs]
    outside = [j.outside for j in jobs]
    print(f"{mode}: {len(jobs)} jobs; throughput "
          + ", ".join(f"{b.throughput:.2f}" for b in chosen) + " jobs/s; "
          f"{statistics.mean(b.requests / len(b.jobs) for b in chosen):.1f} S3/CloudFront "
          "requests per job")
    print(f"  per job, ms: wall median {ms(statistics.median(walls))} (p10 "
          f"{ms(quantile(walls, 0.1))}, p90 {ms(quantile(walls, 0.9))}); ffmpeg+ffprobe "
          f"{ms(statistics.median(j.ffmpeg for j in jobs))}; encrypt stage "
          f"{ms(statistics.median(j.encrypt for j in jobs))}; outside median "
          f"{ms(statistics.median(outside))} (p10 {ms(quantile(outside, 0.1))}, "
          f"p90 {ms(quantile(outside, 0.9))})")
    order = ("submit", "hops", "probe-rest", "ffprobe", "segment-rest", "ffmpeg", "encrypt",
             "playlist", "upload", "invalidate", "finish")
    print("  median parts, ms: " + "  ".join(f"{name} {ms(median[name])}" for name in order))
    # How busy each Procfile process type's worker threads were over the batch: the one near
    # 100 % is the one the others queue behind.
    busy = []
    for kind, stages in PROCESS_STAGES.items():
        used = sum(j.parts[stage] for batch in chosen for j in batch.jobs for stage in stages)
        capacity = sum(batch.span for batch in chosen) * THREADS[kind]
        busy.append(f"{kind} ({THREADS[kind]} threads) {used / capacity:.0%}")
    print("  worker threads busy over the batch: " + ", ".join(busy))


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--rounds", type=int, default=DEFAULT_ROUNDS,
                        help="rounds of one sequential and one concurrent batch")
    parser.add_argument("--jobs", type=int, default=DEFAULT_JOBS, help="jobs per batch")
    parser.add_argument("--worker-timeout-ms", type=int, default=None,
                        help="dramatiq_worker_timeout for the fleet (default: dramatiq's)")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.jobs < 1:
        parser.error("--rounds and --jobs must be at least 1")

    clip = lavfi_clip(CLIP, seconds=CLIP_SECONDS, size="640x360", gop=30)
    extra_env = {}
    if args.worker_timeout_ms is not None:
        extra_env["dramatiq_worker_timeout"] = str(args.worker_timeout_ms)
    bench = BenchFleet(RUN_DIR, extra_env=extra_env)
    batches: list[Batch] = []
    try:
        bench.start()
        print(describe())
        timeout = (f"{args.worker_timeout_ms} ms" if args.worker_timeout_ms is not None
                   else "dramatiq's default (1000 ms)")
        print(f"clip: {clip.name} ({clip.stat().st_size / 1e3:.0f} kB), "
              f"--ladder copy; fleet: Procfile upload, segment, encrypt (one process each); "
              f"redis-server and moto server on 127.0.0.1; dramatiq_worker_timeout {timeout}")
        bench.submit(SEQUENTIAL, bench.stage_sources(clip, WARMUP_JOBS), "copy")
        for index in range(args.rounds):
            modes = (SEQUENTIAL, CONCURRENT) if index % 2 == 0 else (CONCURRENT, SEQUENTIAL)
            for mode in modes:
                started = time.perf_counter()
                batch = measure(bench, clip, mode, args.jobs)
                batches.append(batch)
                print(f"round {index + 1} {mode}: {len(batch.jobs)} jobs in "
                      f"{time.perf_counter() - started:.1f} s", flush=True)
    finally:
        bench.stop()
    for mode in (SEQUENTIAL, CONCURRENT):
        report(batches, mode)
    sequential = [job for b in batches if b.mode == SEQUENTIAL for job in b.jobs]
    concurrent = [b for b in batches if b.mode == CONCURRENT]
    outside_ms = statistics.median(j.outside for j in sequential) * 1000
    verdict = "met" if outside_ms <= TARGET_OUTSIDE_MS else "MISSED"
    print(f"RESULT orchestration: outside ffmpeg and crypto {outside_ms:.0f} ms per job "
          f"(median, sequential; target <= {TARGET_OUTSIDE_MS:.0f} ms: {verdict}); "
          f"end-to-end latency {statistics.median(j.wall for j in sequential):.2f} s; "
          f"throughput {statistics.median(b.throughput for b in concurrent):.2f} jobs/s "
          f"({len(concurrent[0].jobs)} submitted at once)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
