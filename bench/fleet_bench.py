"""The distributed fleet for benchmarks: tests/fleet.py's redis-server, moto server and
Procfile processes, run with the product's defaults, plus what a benchmark needs to see.

- ``BenchFleet`` starts them; the test harness's fast heartbeat and every-fetch maintenance
  (for its kill tests) are dropped from the environment, so the fleet runs as shipped.
- A wrapper put first on the fleet's PATH times every ffmpeg and ffprobe process the workers
  run (start, end, CPU seconds of the process, job id) into ``ffmpeg-times.log``.
- Sources are put in the work bucket beforehand, one copy per job under
  ``bench-sources/<tag>/`` (as sources arrive through the S3-event ingest), so a job is
  submitted with an ``s3://`` source: no upload by the submitter, and the tag in the
  presigned URL ffmpeg is given tells which job an ffmpeg process worked for.
- Jobs are submitted by ``python bench/fleet_bench.py submit ...``: one long-lived process
  that enqueues them as a backend does, through :func:`workers.sending.submitter` (what the
  ops app's job API and the S3-event ingest call; `hlsvault submit` does the same once per
  command), so neither the CLI's interpreter start nor its per-command setup (stores, clients)
  is counted against the fleet. It counts its own status reads, so that a benchmark can leave
  them out of the Redis commands it counts.
- ``python bench/fleet_bench.py direct ...`` is the baseline without a fleet: the same actors'
  bodies called one after another in one process (:class:`InlineBroker` keeps what each
  sends; nothing goes through a queue), against the same Redis and S3.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dramatiq import Message
from dramatiq.brokers.stub import StubBroker

# The fleet harness of the tests is reused as is; tests/ is a folder, not a package.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from fleet import Fleet, MotoServer, RedisServer, fleet_environment, procfile_commands

#: Test-harness settings for its kill tests; the benchmarks run with the product's defaults.
TEST_ONLY_ENV = ("HLSVAULT_HEARTBEAT_TIMEOUT_MS", "HLSVAULT_MAINTENANCE_CHANCE")
JOB_PREFIX = "hlsvault:job:"
TERMINAL = ("succeeded", "failed", "cancelled")
_SOURCE_TAG = re.compile(r"sources/([0-9a-f]{32})/")
SEQUENTIAL = "sequential"
CONCURRENT = "concurrent"
#: One job at a time, its stages called in one process without a queue (the baseline).
DIRECT = "direct"
#: How often the submitter looks whether a job ended (sequential) or all did (concurrent). The
#: orchestration benchmark's jobs take a fraction of a second, so it looks often; a caller
#: whose jobs take minutes passes ``poll_s`` so the harness does not take CPU from the fleet.
SEQUENTIAL_POLL_S = 0.005
CONCURRENT_POLL_S = 0.05
#: A batch that takes this long has hung.
BATCH_TIMEOUT_S = 1800

#: Logs each ffmpeg/ffprobe process: tool, start, end (epoch s), source tag (from the presigned
#: source URL, ``.../sources/<tag>/...``), user and system CPU seconds, and the pid of the
#: worker process that ran it (the wrapper's parent). EPOCHREALTIME and
#: the `time` keyword are bash's own; the tool keeps the wrapper's stdout and stderr (fds 4, 3).
WRAPPER = """#!/bin/bash
exec 3>&2 4>&1
TIMEFORMAT='%3U %3S'
start=$EPOCHREALTIME
cpu=$( {{ time {real} "$@" 1>&4 2>&3 ; }} 2>&1 )
rc=$?
end=$EPOCHREALTIME
tag=-
[[ "$*" =~ sources/([0-9a-f]{{32}})/ ]] && tag=${{BASH_REMATCH[1]}}
echo "{tool} $start $end $tag $cpu $PPID" >> {log}
exit $rc
"""


def procfile_threads() -> dict[str, int]:
    """Worker threads per dramatiq process type of the Procfile (its ``--threads N``)."""
    threads = {}
    for kind, command in procfile_commands().items():
        found = re.search(r"--threads (\d+)", command)
        if found:
            threads[kind] = int(found.group(1))
    return threads


def install_wrappers(directory: Path, log: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for tool in ("ffmpeg", "ffprobe"):
        real = shutil.which(tool)
        if real is None:
            sys.exit(f"fleet_bench: {tool} is not on PATH")
        path = directory / tool
        path.write_text(WRAPPER.format(real=real, tool=tool, log=log))
        path.chmod(0o755)


def lavfi_clip(path: Path, *, seconds: int, size: str, gop: int) -> Path:
    """A testsrc2 + sine H.264/AAC clip, generated once and cached under ``path``."""
    if path.is_file() and path.stat().st_size > 0:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.mp4")
    subprocess.run(
        ["ffmpeg", "-nostdin", "-hide_banner", "-loglevel", "error", "-y",
         "-f", "lavfi", "-i", f"testsrc2=size={size}:rate=30:duration={seconds}",
         "-f", "lavfi", "-i", f"sine=frequency=440:sample_rate=48000:duration={seconds}",
         "-c:v", "libx264", "-preset", "veryfast", "-pix_fmt", "yuv420p", "-g", str(gop),
         "-c:a", "aac", "-b:a", "128k", "-shortest", str(tmp)],
        check=True, timeout=900,
    )
    os.replace(tmp, path)
    return path


@dataclass(frozen=True)
class ToolRun:
    tool: str
    start: float
    end: float
    cpu: float
    tag: str  # the job's source tag; see `source_tag`
    parent: int  # the pid of the worker process that ran it


def source_tag(source: str) -> str:
    """The tag that names a job's source, ``.../sources/<tag>/...``, as the wrapper logs it."""
    found = _SOURCE_TAG.search(source)
    return found.group(1) if found else "-"


class BenchFleet:
    """redis-server, moto server and Procfile processes under ``run_dir``."""

    def __init__(self, run_dir: Path, *, extra_env: dict[str, str] | None = None) -> None:
        shutil.rmtree(run_dir, ignore_errors=True)
        run_dir.mkdir(parents=True)
        self.run_dir = run_dir
        self.tool_log = run_dir / "ffmpeg-times.log"
        self.tool_log.touch()
        install_wrappers(run_dir / "wrappers", self.tool_log)
        self.redis = RedisServer(run_dir / "redis")
        self.moto = MotoServer(run_dir / "moto.log")
        self.extra_env = extra_env or {}
        self._fleet: Fleet | None = None
        self.batches = 0
        self.status_reads = 0

    @property
    def fleet(self) -> Fleet:
        if self._fleet is None:
            raise RuntimeError("the fleet is not started")
        return self._fleet

    def start(self, kinds: tuple[str, ...] = ("upload", "segment", "encrypt")) -> None:
        self.redis.start()
        self.moto.start()
        env = fleet_environment(self.run_dir, self.redis, self.moto)
        for name in TEST_ONLY_ENV:
            env.pop(name, None)
        env["PATH"] = f"{self.run_dir / 'wrappers'}:{env['PATH']}"
        env.update(self.extra_env)
        self._fleet = Fleet(env, self.run_dir / "logs")
        for kind in kinds:
            self._fleet.start(kind)

    def stop(self) -> None:
        if self._fleet is not None:
            self._fleet.stop()
        self.moto.stop()
        self.redis.stop()

    def moto_requests(self) -> int:
        """S3 and CloudFront requests served so far (werkzeug's access log, one per line)."""
        text = (self.run_dir / "moto.log").read_text(errors="replace")
        return len(re.findall(r'\] "(?:\x1b\[[0-9;]*m)*(?:GET|PUT|POST|HEAD|DELETE) ', text))

    def tool_runs(self) -> list[ToolRun]:
        runs = []
        for line in self.tool_log.read_text().splitlines():
            tool, start, end, tag, user, system, parent = line.split()
            runs.append(ToolRun(tool, float(start), float(end), float(user) + float(system), tag,
                                int(parent)))
        return runs

    def stage_sources(self, clip: Path, count: int) -> list[str]:
        """``count`` copies of ``clip`` in the work bucket, each under a tag of its own."""
        s3 = self.moto.client("s3")
        bucket = self.fleet.env["TEST_BUCKET_WORK"]
        sources = []
        for _ in range(count):
            key = f"bench-sources/{uuid.uuid4().hex}/{clip.name}"
            s3.upload_file(str(clip), bucket, key)
            sources.append(f"s3://{bucket}/{key}")
        return sources

    def submit(self, mode: str, sources: list[str], ladder: str, *,
               poll_s: float | None = None) -> list[tuple[str, float]]:
        """Submit a job per source and wait for all of them to end (``mode`` SEQUENTIAL or
        CONCURRENT), looking every ``poll_s`` (default: the mode's), or run each in this
        process's child without the fleet (DIRECT); returns (job id, enqueued at) of each.
        ``status_reads`` is then the submitter's Redis reads."""
        self.batches += 1
        listed = self.run_dir / f"sources-{self.batches}.json"
        out = self.run_dir / f"submitted-{self.batches}.json"
        listed.write_text(json.dumps(sources))
        command = (["direct"] if mode == DIRECT else ["submit", mode])
        if poll_s is not None and mode != DIRECT:
            command += ["--poll", str(poll_s)]
        done = subprocess.run(
            [sys.executable, __file__, *command, "--sources", str(listed), "--out", str(out),
             "--ladder", ladder, "--prefix", f"b{self.batches}j"],
            env=self.fleet.env, capture_output=True, text=True, timeout=BATCH_TIMEOUT_S,
            check=False,
        )
        if done.returncode != 0:
            sys.exit(f"fleet_bench: the submitter failed ({done.returncode}):\n"
                     f"{done.stderr[-3000:]}\n{self.fleet.log_text()[-3000:]}")
        result = json.loads(out.read_text())
        self.status_reads = int(result["status_reads"])
        return [(job_id, at) for job_id, at in result["jobs"]]

    def record(self, job_id: str) -> dict[str, str]:
        """The job's record; exits with its error unless it succeeded."""
        found = self.redis.client().hgetall(JOB_PREFIX + job_id)
        fields = {str(k): str(v) for k, v in found.items()}  # as pipeline.jobs.redis reads it
        if fields.get("status") != "succeeded":
            sys.exit(f"fleet_bench: job {job_id} ended {fields.get('status')}: "
                     f"{fields.get('error')}\n{self.fleet.log_text()[-3000:]}")
        return fields


def submitter(mode: str, sources: list[str], ladder: str, prefix: str,
              poll_s: float | None = None) -> dict[str, Any]:
    """Runs in the fleet's environment: enqueues a job per source as a backend would and waits
    for them to end; returns the jobs (id, enqueued at) and how often it read a status."""
    import redis

    from pipeline.jobs import new_job_spec
    from pipeline.settings import load_settings
    from workers.sending import submitter as fleet_submitter

    submit = fleet_submitter(load_settings())
    client = redis.Redis.from_url(os.environ["REDIS_URL"], decode_responses=True)
    submitted: list[tuple[str, float]] = []
    status_reads = 0

    def ended(job_id: str) -> bool:
        nonlocal status_reads
        status_reads += 1
        return client.hget(JOB_PREFIX + job_id, "status") in TERMINAL

    for index, source in enumerate(sources):
        spec = new_job_spec(source, asset=f"{prefix}{index}", ladder=ladder)
        submit(spec)
        submitted.append((spec.job_id, time.time()))
        if mode == SEQUENTIAL:
            while not ended(spec.job_id):
                time.sleep(poll_s or SEQUENTIAL_POLL_S)
    while not all(ended(job_id) for job_id, _ in submitted):
        time.sleep(poll_s or CONCURRENT_POLL_S)
    return {"jobs": submitted, "status_reads": status_reads}


class InlineBroker(StubBroker):
    """A broker that delivers nothing: it keeps what is sent, for :func:`direct` to run."""

    def __init__(self) -> None:
        super().__init__()
        self.sent: deque[Message[Any]] = deque()

    def enqueue(self, message: Message[Any], *, delay: int | None = None) -> Message[Any]:
        self.sent.append(message)
        return message


def direct(sources: list[str], ladder: str, prefix: str) -> dict[str, Any]:
    """The baseline: each job's stages called one after another in this process (the actors'
    own bodies: run_stage and the flow, job records in Redis, stores on S3), no queue between
    them and no worker process; jobs one at a time."""
    from pipeline.jobs import new_job_spec
    from pipeline.logs import configure_logging
    from pipeline.settings import load_settings
    from workers.runtime import build_runtime

    configure_logging()
    broker = InlineBroker()
    runtime = build_runtime(load_settings(), broker=broker)
    submitted: list[tuple[str, float]] = []
    for index, source in enumerate(sources):
        spec = new_job_spec(source, asset=f"{prefix}{index}", ladder=ladder)
        runtime.enqueue(spec)
        submitted.append((spec.job_id, time.time()))
        while broker.sent:
            message = broker.sent.popleft()
            broker.get_actor(message.actor_name).fn(*message.args, **message.kwargs)
    return {"jobs": submitted, "status_reads": 0}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="submit benchmark jobs to a running fleet")
    commands = parser.add_subparsers(dest="command", required=True)
    submit = commands.add_parser("submit", help="enqueue jobs on the fleet, wait for them")
    submit.add_argument("mode", choices=(SEQUENTIAL, CONCURRENT))
    submit.add_argument("--poll", type=float, default=None, help="seconds between status reads")
    run = commands.add_parser("direct", help="run jobs' stages in this process, no fleet")
    for command in (submit, run):
        command.add_argument("--sources", required=True, help="a JSON list of s3:// sources")
        command.add_argument("--out", required=True, help="where to write the jobs (JSON)")
        command.add_argument("--ladder", required=True)
        command.add_argument("--prefix", required=True)
    args = parser.parse_args(argv)
    sources = json.loads(Path(args.sources).read_text())
    if args.command == "direct":
        result = direct(sources, args.ladder, args.prefix)
    else:
        result = submitter(args.mode, sources, args.ladder, args.prefix, args.poll)
    Path(args.out).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
