"""Benchmark: what the fleet adds around ffmpeg and AES, per job, over Redis and S3.

Jobs of a 2 s 640x360 H.264/AAC clip (``--ladder copy``: one rendition, one segment) run
through all six stages on the Procfile's own worker processes (`upload`, `segment`,
`encrypt`, one of each, as shipped), against a private redis-server and a moto server (the
real S3 and CloudFront HTTP APIs), both from tests/fleet.py. Every store is ``s3://``, so
the job travels as it would between machines: ffprobe and ffmpeg read the source through a
presigned URL, segments go to and from the work bucket, upload copies them into the origin
bucket, and invalidate asks CloudFront.

Each round runs three batches of ``--jobs`` jobs (default 50), in an order that alternates:

- sequential: one job at a time on the fleet; the next is submitted as soon as the previous
  one ended. Nothing queues behind anything, so the job's time is its own: this is the batch
  the target is judged on.
- direct (the baseline): the same jobs' stages called one after another in one process, the
  actors' own bodies with their job records in the same Redis and their files in the same
  buckets, but no queue, no worker process and no hop between them. What the fleet adds over
  it is the price of running the stages as separate messages on separate machines.
- concurrent: every job submitted back to back on the fleet without waiting, then all
  awaited. This gives throughput; a job's latency then includes waiting behind the others.

Each job's source is a copy of the clip already in the work bucket (put there untimed, as
the S3-event ingest finds sources), submitted as ``s3://...`` by one long-lived submitter
process through the call a backend makes (see fleet_bench.py). Two untimed jobs warm the
workers up first, and one the direct process.

Per job, from its Redis record (epoch seconds):

    wall      = finished_at - created_at (created_at is stamped when the job is made, before
                its record is written and its probe enqueued)
    ffmpeg    = the wall time of the ffmpeg and ffprobe processes the job ran (ffprobe in the
                probe stage, ffmpeg in the segment stage), timed by a wrapper on the fleet's
                PATH that logs each process's start and end
    encrypt   = the encrypt stage, encrypt:<chunk>.started_at -> finished_at, whole: AES
                and everything around it (fetching the plain segment, creating and wrapping
                the key, putting the encrypted segment)
    outside   = wall - ffmpeg - encrypt: what the fleet adds around ffmpeg and crypto

``outside`` is reported with its parts: the submit call (created_at until the submit call
returned), the hops (from there to the probe starting, and from each stage's finished_at to
the next one's started_at: queue pickup and the bookkeeping around it), each stage without
its ffmpeg/ffprobe, and the end (invalidate finished to the job's finished_at).

Round trips per job: S3 and CloudFront requests of each batch from the moto server's request
log (S3 split into the stages' own requests and ffmpeg's reads of the source, which are
inside ffmpeg's time); Redis commands sent by clients (a Lua script is one, whatever it runs
inside), seen through MONITOR over two untimed batches of 5 jobs before the timed ones (on
the fleet, and direct), net of what the idle fleet sends on its own (its consumers' fallback
polls, watched for a few seconds first) and of the submitter's reads of job statuses.

    python bench/bench_orchestration.py [--rounds N] [--jobs N] [--worker-timeout-ms MS]
                                        [--poll-ms MS]

``--poll-ms`` (default 50) is how often the submitter looks whether the job of the sequential
batch ended. It does not enter any job's figures (they come from the record's stamps), only
the gap between jobs; but its polls and the job's tail after ``finished_at`` (discarding the
scratch, acks) run on the same two CPUs as the next job when the gap is short, which the
direct run never has: it runs its jobs strictly one after another. Earlier runs polled
every 5 ms.

``--worker-timeout-ms`` sets dramatiq's ``dramatiq_worker_timeout`` in the fleet's
environment (unset: dramatiq's default, 1000 ms): how long an idle consumer waits before it
polls its queue anyway (it wakes as soon as a message arrives; see workers/broker.py).
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import redis
from fleet_bench import (
    CONCURRENT,
    DIRECT,
    SEQUENTIAL,
    BenchFleet,
    ToolRun,
    lavfi_clip,
    procfile_threads,
    source_tag,
)
from machine import describe
from sample_clip import WORK_DIR

#: Issue 10: the fleet should add at most 20 ms per job around ffmpeg and crypto.
TARGET_OUTSIDE_MS = 20.0
DEFAULT_JOBS = 50
DEFAULT_ROUNDS = 1
WARMUP_JOBS = 2
CLIP_SECONDS = 2
CLIP = WORK_DIR / f"clip-{CLIP_SECONDS}s-640x360p30-g30.mp4"
RUN_DIR = WORK_DIR / "orchestration"
#: How long the idle fleet's own Redis traffic (fallback polls) is measured, before the batches.
IDLE_WINDOW_S = 5.0
#: Jobs per untimed batch whose Redis round trips are counted (fleet, and direct).
COUNTED_JOBS = 5
#: How often the sequential batch's submitter looks whether its job ended (see --poll-ms).
DEFAULT_POLL_MS = 50
#: Which Procfile process type runs which stages (their queues: probe + publish, segment,
#: encrypt), and how many worker threads each has, read from the Procfile itself.
PROCESS_STAGES = {
    "upload": ("probe", "playlist", "upload", "invalidate"),
    "segment": ("segment",),
    "encrypt": ("encrypt",),
}
THREADS = procfile_threads()
#: The five hops between stages on the fleet, split at their messages' stamps (epoch s):
#: send = the previous stage's finish until the next message is made (the sender's record
#: writes); fetch = until the consumer fetched it (the enqueue script, the BLMOVE wake-up,
#: dramatiq's fetch script; message_timestamp is in whole ms); pickup = until a worker thread
#: took it (dramatiq's work queue, middleware); start = until the stage started (the job
#: record's read and the stage_started script).
HOP_PARTS = ("hop-send", "hop-fetch", "hop-pickup", "hop-start")
#: A request line of moto's (werkzeug's) access log, colours and all.
_REQUEST = re.compile(r'\] "(?:\x1b\[[0-9;]*m)*(GET|PUT|POST|HEAD|DELETE) (\S+)')


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
    #: requests per kind over the batch: s3 (the stages'), source (ffmpeg's reads), cloudfront
    requests: dict[str, int] = field(default_factory=dict)

    @property
    def throughput(self) -> float:
        return len(self.jobs) / self.span

    def per_job(self, kind: str) -> float:
        return self.requests.get(kind, 0) / len(self.jobs)


def moto_requests(bench: BenchFleet) -> list[tuple[str, str]]:
    """(method, path) of every request the moto server has answered so far."""
    text = (bench.run_dir / "moto.log").read_text(errors="replace")
    return [(m.group(1), m.group(2)) for m in _REQUEST.finditer(text)]


def request_kinds(requests: list[tuple[str, str]]) -> dict[str, int]:
    kinds = {"s3": 0, "source": 0, "cloudfront": 0}
    for method, path in requests:
        if path.startswith("/2020-05-31/"):
            kinds["cloudfront"] += 1
        elif method == "GET" and "/bench-sources/" in path:
            kinds["source"] += 1  # ffmpeg or ffprobe reading the presigned source
        else:
            kinds["s3"] += 1
    return kinds


class RedisRoundTrips:
    """Counts the Redis commands clients send (one round trip each; a script's own commands
    are not counted), by command, through MONITOR on a connection of its own. MONITOR slows
    Redis down, so it watches only the untimed counting batches."""

    def __init__(self, bench: BenchFleet) -> None:
        self.url = bench.redis.url
        self.counts: Counter[str] = Counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def _watch(self) -> None:
        client = redis.Redis.from_url(self.url, decode_responses=True, socket_timeout=30)
        # redis-py leaves monitor() unannotated.
        with client.monitor() as monitor:  # type: ignore[no-untyped-call]
            self._ready.set()
            while not self._stop.is_set():
                seen = monitor.next_command()
                if seen["client_type"] != "lua":
                    self.counts[seen["command"].split(" ", 1)[0].lower()] += 1

    def __enter__(self) -> RedisRoundTrips:
        self._ready = threading.Event()
        self._thread.start()
        self._ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        redis.Redis.from_url(self.url, socket_timeout=5).ping()  # ends the watcher's wait
        self._thread.join(10)


def count_round_trips(
    bench: BenchFleet, clip: Path, poll_s: float
) -> dict[str, dict[str, float]]:
    """Redis round trips per job, by command, on the fleet and in the direct baseline: small
    untimed batches watched by :class:`RedisRoundTrips`, net of what the idle fleet sends by
    itself (its consumers' fallback polls) and of the submitter's status reads."""
    with RedisRoundTrips(bench) as idle:
        time.sleep(IDLE_WINDOW_S)
    idle_rate = {name: calls / IDLE_WINDOW_S for name, calls in idle.counts.items()}
    counted: dict[str, dict[str, float]] = {}
    for mode in (SEQUENTIAL, DIRECT):
        warmup = 1 if mode == DIRECT else 0
        sources = bench.stage_sources(clip, COUNTED_JOBS + warmup)
        started = time.monotonic()
        with RedisRoundTrips(bench) as watched:
            bench.submit(mode, sources, "copy", poll_s=poll_s)
        elapsed = time.monotonic() - started
        net: dict[str, float] = {}
        for name, calls in watched.counts.items():
            made = calls - idle_rate.get(name, 0.0) * elapsed - (
                bench.status_reads if name == "hget" else 0)
            if made > 0.5:
                # The direct batch's warm-up job sends what any other does: its share is out.
                net[name] = made / (COUNTED_JOBS + warmup)
        counted[mode] = net
    counted["idle"] = idle_rate
    return counted


def measure(bench: BenchFleet, clip: Path, mode: str, count: int, poll_s: float) -> Batch:
    # The direct baseline's process is new each batch: its first job (imports, clients) is
    # a warm-up and is not counted.
    warmup = 1 if mode == DIRECT else 0
    sources = bench.stage_sources(clip, count + warmup)
    requests_before = len(moto_requests(bench))
    # The concurrent batch waits for all of its jobs at the harness's own pace.
    submitted = bench.submit(mode, sources, "copy",
                             poll_s=poll_s if mode == SEQUENTIAL else None)
    requests = moto_requests(bench)[requests_before:]
    batch = Batch(mode)
    tools: dict[str, list[ToolRun]] = {}
    for run in bench.tool_runs():
        tools.setdefault(run.tag, []).append(run)
    records = [bench.record(job_id) for job_id, _ in submitted]
    # The direct batch's warm-up job makes the same requests as any other: its share is out.
    share = count / (count + warmup)
    batch.requests = {k: round(v * share) for k, v in request_kinds(requests).items()}
    first, last = float("inf"), 0.0
    for (_, submitted_at), record in list(zip(submitted, records, strict=True))[warmup:]:
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
    for name in HOP_PARTS:
        parts[name] = 0.0
    for stage in stages:
        started, ended = at(f"{stage}.started_at"), at(f"{stage}.finished_at")
        if previous_end is not None:
            hops += started - previous_end
            if f"{stage}.fetched_at" in record:
                # The fleet's hop, split at its message's stamps (workers.flow.note_delivery).
                enqueued, fetched = at(f"{stage}.enqueued_at"), at(f"{stage}.fetched_at")
                picked = at(f"{stage}.picked_at")
                parts["hop-send"] += enqueued - previous_end
                parts["hop-fetch"] += fetched - enqueued
                parts["hop-pickup"] += picked - fetched
                parts["hop-start"] += started - picked
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


def fleet_overhead(fleet: list[JobTimes], direct: list[JobTimes]) -> dict[str, float]:
    """What running the stages as messages on separate workers adds per job, in ms: the
    fleet's median outside ffmpeg and crypto minus the direct run's (``total``), split into
    the submit call, the hops between stages, each stage's own work (without ffmpeg and
    ffprobe; encrypt is crypto and left out), and ``stages``, the total less the submit call
    and the hops: the stages' own work running slower in the worker processes (three
    processes and their threads share the CPUs). Medians do not add up exactly, so this is
    the remainder rather than the sum of the stage lines."""

    def median_ms(jobs: list[JobTimes], name: str) -> float:
        return statistics.median(j.parts[name] for j in jobs) * 1000

    total = (statistics.median(j.outside for j in fleet)
             - statistics.median(j.outside for j in direct)) * 1000
    parts = {"total": total}
    for name in ("submit", "hops", "probe-rest", "segment-rest", "playlist", "upload",
                 "invalidate", "finish"):
        parts[name] = median_ms(fleet, name) - median_ms(direct, name)
    parts["stages"] = total - parts["hops"] - parts["submit"]
    return parts


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f}"


def chosen_jobs(batches: list[Batch], mode: str) -> list[JobTimes]:
    return [job for batch in batches if batch.mode == mode for job in batch.jobs]


def requests_per_job(batches: list[Batch]) -> tuple[float, float, float]:
    """S3 requests of the stages, ffmpeg's S3 reads and CloudFront requests per job (mean over
    the batches)."""
    return (
        statistics.mean(b.per_job("s3") for b in batches),
        statistics.mean(b.per_job("source") for b in batches),
        statistics.mean(b.per_job("cloudfront") for b in batches),
    )


def report(batches: list[Batch], mode: str, redis_calls: dict[str, float] | None) -> None:
    chosen = [b for b in batches if b.mode == mode]
    jobs = chosen_jobs(batches, mode)
    median = {name: statistics.median(j.parts[name] for j in jobs) for name in jobs[0].parts}
    walls = [j.wall for j in jobs]
    outside = [j.outside for j in jobs]
    s3, source, cloudfront = requests_per_job(chosen)
    print(f"{mode}: {len(jobs)} jobs; throughput "
          + ", ".join(f"{b.throughput:.2f}" for b in chosen) + " jobs/s")
    redis_text = ""
    if redis_calls is not None:
        top = sorted(redis_calls.items(), key=lambda item: -item[1])[:7]
        redis_text = (f"Redis {sum(redis_calls.values()):.0f} ("
                      + ", ".join(f"{name} {calls:.1f}" for name, calls in top) + "); ")
    print(f"  round trips per job: {redis_text}S3 {s3:.1f} (+ {source:.1f} reads of the "
          f"source by ffmpeg/ffprobe); CloudFront {cloudfront:.1f}")
    print(f"  per job, ms: wall median {ms(statistics.median(walls))} (p10 "
          f"{ms(quantile(walls, 0.1))}, p90 {ms(quantile(walls, 0.9))}); ffmpeg+ffprobe "
          f"{ms(statistics.median(j.ffmpeg for j in jobs))}; encrypt stage "
          f"{ms(statistics.median(j.encrypt for j in jobs))}; outside median "
          f"{ms(statistics.median(outside))} (p10 {ms(quantile(outside, 0.1))}, "
          f"p90 {ms(quantile(outside, 0.9))})")
    order = ("submit", "hops", "probe-rest", "ffprobe", "segment-rest", "ffmpeg", "encrypt",
             "playlist", "upload", "invalidate", "finish")
    print("  median parts, ms: " + "  ".join(f"{name} {ms(median[name])}" for name in order))
    if any(j.parts["hop-fetch"] for j in jobs):
        split = {name: statistics.median(j.parts[name] for j in jobs) for name in HOP_PARTS}
        print("  the five hops between stages, median sums, ms: "
              + "  ".join(f"{name.removeprefix('hop-')} {value * 1000:.1f}"
                          for name, value in split.items()))
    if mode == DIRECT:
        return
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
                        help="rounds of one sequential, one direct and one concurrent batch")
    parser.add_argument("--jobs", type=int, default=DEFAULT_JOBS, help="jobs per batch")
    parser.add_argument("--worker-timeout-ms", type=int, default=None,
                        help="dramatiq_worker_timeout for the fleet (default: dramatiq's)")
    parser.add_argument("--poll-ms", type=float, default=DEFAULT_POLL_MS,
                        help="how often the sequential submitter looks whether its job ended")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.jobs < 1:
        parser.error("--rounds and --jobs must be at least 1")
    if not 1 <= args.poll_ms <= 1000:
        parser.error("--poll-ms must be between 1 and 1000")
    poll_s = args.poll_ms / 1000

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
        print(f"sequential submitter: looks whether its job ended every {args.poll_ms:g} ms")
        bench.submit(SEQUENTIAL, bench.stage_sources(clip, WARMUP_JOBS), "copy", poll_s=poll_s)
        trips = count_round_trips(bench, clip, poll_s)
        print(f"idle fleet: {sum(trips['idle'].values()):.1f} Redis round trips/s by itself "
              "(its consumers' fallback polls), left out of the counts below")
        for index in range(args.rounds):
            modes = (SEQUENTIAL, DIRECT, CONCURRENT)
            for mode in modes if index % 2 == 0 else reversed(modes):
                started = time.perf_counter()
                batch = measure(bench, clip, mode, args.jobs, poll_s)
                batches.append(batch)
                print(f"round {index + 1} {mode}: {len(batch.jobs)} jobs in "
                      f"{time.perf_counter() - started:.1f} s", flush=True)
    finally:
        bench.stop()
    for mode in (SEQUENTIAL, DIRECT, CONCURRENT):
        report(batches, mode, trips.get(mode))
    sequential = chosen_jobs(batches, SEQUENTIAL)
    baseline = chosen_jobs(batches, DIRECT)
    concurrent = [b for b in batches if b.mode == CONCURRENT]
    outside_ms = statistics.median(j.outside for j in sequential) * 1000
    direct_ms = statistics.median(j.outside for j in baseline) * 1000
    hops_ms = statistics.median(j.parts["hops"] for j in sequential) * 1000
    s3, _, cloudfront = requests_per_job([b for b in batches if b.mode == SEQUENTIAL])
    direct_s3, _, _ = requests_per_job([b for b in batches if b.mode == DIRECT])
    redis_calls = sum(trips[SEQUENTIAL].values())
    direct_redis = sum(trips[DIRECT].values())
    overhead = fleet_overhead(sequential, baseline)
    print("fleet overhead (fleet minus direct, medians per job), ms: "
          + "  ".join(f"{name} {value:+.0f}" for name, value in overhead.items())
          + f"; Redis round trips {redis_calls - direct_redis:+.0f} ({redis_calls:.0f} vs "
          f"{direct_redis:.0f}), S3 {s3 - direct_s3:+.1f}")
    absolute = "met" if outside_ms <= TARGET_OUTSIDE_MS else "MISSED"
    own = "met" if overhead["total"] <= TARGET_OUTSIDE_MS else "MISSED"
    print(f"RESULT orchestration: the fleet's own overhead (fleet minus the same stages in one "
          f"process, no queue) {overhead['total']:.0f} ms per job (target <= "
          f"{TARGET_OUTSIDE_MS:.0f} ms: {own}; hops {overhead['hops']:+.0f}, submit "
          f"{overhead['submit']:+.0f}, stages' own work {overhead['stages']:+.0f}); absolute "
          f"outside ffmpeg and crypto {outside_ms:.0f} ms on the fleet (median, sequential; "
          f"target <= {TARGET_OUTSIDE_MS:.0f} ms: "
          f"{absolute}) vs {direct_ms:.0f} ms direct (ratio {outside_ms / direct_ms:.2f}); "
          f"hops {hops_ms:.0f} ms; round trips per job: Redis {redis_calls:.0f} (direct "
          f"{direct_redis:.0f}), S3 {s3:.1f}, CloudFront {cloudfront:.1f}; end-to-end latency "
          f"{statistics.median(j.wall for j in sequential):.2f} s; throughput "
          f"{statistics.median(b.throughput for b in concurrent):.2f} jobs/s "
          f"({len(concurrent[0].jobs)} submitted at once)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
