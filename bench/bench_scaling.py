"""Benchmark: transcoding throughput with one segmenting process against two.

Batches of ``--jobs`` jobs (default 4) of a 12 s 1280x720p30 H.264/AAC clip, ``--ladder
default`` (720p, 480p and 360p transcodes, never upscaled), run through the whole fleet:
the Procfile's `upload` and `encrypt` processes, and either one or two `segment` processes
(``Fleet.start("segment", count=N)``; each is the Procfile's ``dramatiq ... --processes 1
--threads 1``, so one ffmpeg at a time per process), against a private redis-server and a
moto server from tests/fleet.py, every store ``s3://``.

Each batch is submitted at once (through the call a backend makes, see fleet_bench.py)
and timed from the first job's ``created_at`` to the last job's ``finished_at``. Rounds run
both configurations in an order that alternates; reported are the median throughputs and
``throughput(two) / throughput(one)``.

To explain the figure it also reports, per batch, from a wrapper that times every ffmpeg the
workers run: how many ffmpeg processes ran at once on average (their summed wall time over
the batch's span), and how many cores they kept busy (their CPU time over the span); and
from /proc/stat how busy the machine's CPUs were, whoever used them.

    python bench/bench_scaling.py [--rounds N] [--jobs N]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from fleet_bench import CONCURRENT, BenchFleet, lavfi_clip, source_tag
from machine import describe
from sample_clip import WORK_DIR

#: The brief: two segmenting processes should do at least 1.6 times the work of one.
TARGET_RATIO = 1.6
DEFAULT_ROUNDS = 2
DEFAULT_JOBS = 4
CLIP_SECONDS = 12
CLIP = WORK_DIR / f"clip-{CLIP_SECONDS}s-1280x720p30-g60.mp4"
RUN_DIR = WORK_DIR / "scaling"
#: A dramatiq worker imports the actors and connects before it says it is ready.
READY_TIMEOUT_S = 60
READY_LINE = "Worker process is ready for action."


@dataclass(frozen=True)
class Batch:
    processes: int
    span: float
    jobs: int
    ffmpeg_parallel: float  # mean number of ffmpeg processes running
    ffmpeg_cores: float  # mean cores kept busy by ffmpeg
    machine_busy: float  # fraction of all CPUs busy, any process

    @property
    def jobs_per_minute(self) -> float:
        return self.jobs * 60 / self.span


def cpu_ticks() -> tuple[int, int]:
    """(busy, total) jiffies over all CPUs since boot."""
    fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    total = sum(fields[:8])  # guest time is already counted in user
    return total - idle, total


def start_segment(bench: BenchFleet, count: int) -> None:
    """Start ``count`` segment processes and wait until each says it is ready."""
    logs = [bench.run_dir / "logs" / f"segment.{index}.log" for index in range(count)]
    sizes = {log: log.stat().st_size if log.exists() else 0 for log in logs}
    bench.fleet.start("segment", count=count)
    deadline = time.monotonic() + READY_TIMEOUT_S
    for log in logs:
        while True:
            text = log.read_text(errors="replace")[sizes[log]:] if log.exists() else ""
            if READY_LINE in text:
                break
            if time.monotonic() > deadline:
                sys.exit(f"bench_scaling: {log.name} not ready after {READY_TIMEOUT_S} s")
            time.sleep(0.1)


def run_batch(bench: BenchFleet, clip: Path, processes: int, jobs: int) -> Batch:
    sources = bench.stage_sources(clip, jobs)
    start_segment(bench, processes)
    busy_before, total_before = cpu_ticks()
    submitted = bench.submit(CONCURRENT, sources, "default")
    busy_after, total_after = cpu_ticks()
    bench.fleet.kill("segment", signal.SIGTERM)
    records = [bench.record(job_id) for job_id, _ in submitted]
    first = min(float(r["created_at"]) for r in records)
    last = max(float(r["finished_at"]) for r in records)
    tags = {source_tag(json.loads(r["spec"])["source"]) for r in records}
    runs = [run for run in bench.tool_runs() if run.tool == "ffmpeg" and run.tag in tags]
    span = last - first
    return Batch(
        processes=processes,
        span=span,
        jobs=len(records),
        ffmpeg_parallel=sum(run.end - run.start for run in runs) / span,
        ffmpeg_cores=sum(run.cpu for run in runs) / span,
        machine_busy=(busy_after - busy_before) / max(1, total_after - total_before),
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--rounds", type=int, default=DEFAULT_ROUNDS,
                        help="rounds of one batch per configuration")
    parser.add_argument("--jobs", type=int, default=DEFAULT_JOBS, help="jobs per batch")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.jobs < 1:
        parser.error("--rounds and --jobs must be at least 1")

    clip = lavfi_clip(CLIP, seconds=CLIP_SECONDS, size="1280x720", gop=60)
    bench = BenchFleet(RUN_DIR)
    batches: list[Batch] = []
    try:
        bench.start(("upload", "encrypt"))
        print(describe())
        print(f"clip: {clip.name} ({clip.stat().st_size / 1e6:.1f} MB), --ladder default "
              f"(720p, 480p, 360p); {args.jobs} jobs submitted at once per batch; "
              f"{os.cpu_count()} CPUs")
        print(f"{'round':<6}{'segment procs':>14}{'span s':>9}{'jobs/min':>10}"
              f"{'ffmpeg at once':>16}{'ffmpeg cores':>14}{'CPUs busy':>11}")
        for index in range(args.rounds):
            for processes in ((1, 2) if index % 2 == 0 else (2, 1)):
                batch = run_batch(bench, clip, processes, args.jobs)
                batches.append(batch)
                print(f"{index + 1:<6}{processes:>14}{batch.span:>9.1f}"
                      f"{batch.jobs_per_minute:>10.2f}{batch.ffmpeg_parallel:>16.2f}"
                      f"{batch.ffmpeg_cores:>14.2f}{batch.machine_busy:>10.0%}", flush=True)
    finally:
        bench.stop()
    medians = {
        n: statistics.median(b.jobs_per_minute for b in batches if b.processes == n)
        for n in (1, 2)
    }
    for n in (1, 2):
        chosen = [b for b in batches if b.processes == n]
        print(f"{n} segment process{'es' if n > 1 else ''}: median {medians[n]:.2f} jobs/min; "
              f"ffmpeg kept {statistics.median(b.ffmpeg_cores for b in chosen):.2f} cores busy, "
              f"CPUs {statistics.median(b.machine_busy for b in chosen):.0%} busy")
    ratio = medians[2] / medians[1]
    verdict = "met" if ratio >= TARGET_RATIO else "MISSED"
    print(f"RESULT scaling: one segment process {medians[1]:.2f} jobs/min, two "
          f"{medians[2]:.2f} jobs/min, ratio {ratio:.2f} (target >= {TARGET_RATIO}: {verdict})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
