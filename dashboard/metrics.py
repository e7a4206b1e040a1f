"""What the ops app reads about the fleet, and the Prometheus text it makes of it.

Queues are dramatiq's Redis structures under the ``hlsvault`` namespace (see
``dramatiq/brokers/redis/dispatch.lua``)::

    hlsvault:<queue>            list of waiting message ids (consumers LPOP from the left)
    hlsvault:<queue>.msgs       hash id -> message JSON, until acked (waiting and in flight)
    hlsvault:<queue>.DQ.msgs    delayed messages (retries with backoff), same shape
    hlsvault:<queue>.XQ         zset of dead-lettered ids, by when they died
    hlsvault:__heartbeats__     zset broker id -> last heartbeat (ms), one per broker instance

Job counts come from the job store's status index (:meth:`pipeline.jobs.JobStore.counts`),
exact at any number of records; stage durations from the records of the newest running and
recently finished jobs; parked ingest messages from :class:`pipeline.parked.ParkingLot`. All are
read fresh on every scrape: no state lives in the ops process, so any number of them may run.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import redis

from pipeline import layout
from pipeline.jobs import STATUSES, JobRecord
from pipeline.parked import ParkedStats
from workers.flow import chunk_stage
from workers.queues import Queue

NAMESPACE = layout.BROKER_NAMESPACE
QUEUES = tuple(queue.value for queue in Queue)
#: Stage durations are taken from stages that finished within this window.
DURATION_WINDOW_S = 3600
#: Upper bounds of the stage-duration histogram: probes take a second, transcodes minutes.
DURATION_BUCKETS_S = (1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)
#: The throughput chart: jobs finished per bucket over the last hour.
THROUGHPUT_BUCKET_S = 300
THROUGHPUT_BUCKETS = 12
KEY_REQUESTS_HASH = layout.KEY_REQUESTS_HASH


@dataclass(frozen=True)
class QueueStats:
    """One dramatiq queue as Redis holds it."""

    name: str
    queued: int
    in_flight: int
    delayed: int
    dead: int
    #: Seconds since the oldest waiting message was first enqueued; None when none waits.
    oldest_age_s: float | None


@dataclass(frozen=True)
class Heartbeat:
    """A broker (a worker process, or a process that only enqueues) and its last heartbeat."""

    broker_id: str
    age_s: float


def queue_stats(client: redis.Redis, *, now: float | None = None) -> list[QueueStats]:
    """Depth, in-flight, delayed and dead-letter counts of every queue, with the age of the
    oldest waiting message (from its ``message_timestamp``)."""
    now = time.time() if now is None else now
    pipe = client.pipeline(transaction=False)
    for name in QUEUES:
        key = f"{NAMESPACE}:{name}"
        pipe.llen(key)
        pipe.hlen(f"{key}.msgs")
        pipe.hlen(f"{key}.DQ.msgs")
        pipe.zcard(f"{key}.XQ")
        pipe.lindex(key, 0)
    replies = pipe.execute()
    stats = []
    for i, name in enumerate(QUEUES):
        queued, stored, delayed, dead, oldest_id = replies[i * 5 : i * 5 + 5]
        oldest_age = None
        if oldest_id is not None:
            raw = client.hget(f"{NAMESPACE}:{name}.msgs", oldest_id)
            oldest_age = _message_age(raw, now)
        stats.append(
            QueueStats(
                name=name,
                queued=int(queued),
                in_flight=max(0, int(stored) - int(queued)),
                delayed=int(delayed),
                dead=int(dead),
                oldest_age_s=oldest_age,
            )
        )
    return stats


def _message_age(raw: object, now: float) -> float | None:
    if raw is None:
        return None
    try:
        stamp = json.loads(raw if isinstance(raw, str | bytes) else str(raw))["message_timestamp"]
        return max(0.0, now - float(stamp) / 1000)
    except (ValueError, KeyError, TypeError):
        return None


def heartbeats(
    client: redis.Redis, *, timeout_ms: int, now: float | None = None
) -> list[Heartbeat]:
    """Brokers whose last heartbeat is younger than ``timeout_ms``: dramatiq requeues the
    messages of the others, so these are the processes the fleet counts as alive."""
    now = time.time() if now is None else now
    now_ms = now * 1000
    beats = client.zrangebyscore(
        f"{NAMESPACE}:__heartbeats__", now_ms - timeout_ms, "+inf", withscores=True
    )
    return [
        Heartbeat(str(pair[0]), max(0.0, (now_ms - float(pair[1])) / 1000))
        for pair in beats
    ]


def key_request_counts(client: redis.Redis) -> dict[str, int]:
    """Key requests by outcome, if the key server counts them in :data:`KEY_REQUESTS_HASH`."""
    return {str(k): int(v) for k, v in client.hgetall(KEY_REQUESTS_HASH).items()}


def log_lines_dropped(client: redis.Redis) -> int:
    """Audit and access lines the key servers dropped because their log sink fell behind."""
    value = client.get(layout.LOG_LINES_DROPPED_KEY)
    return int(value) if value is not None else 0


def job_progress(record: JobRecord) -> float:
    """The job's progress, 0..1: the mean over every stage it will run (done stages count
    whole, stages not yet queued count 0). Once the probe has planned the chunks, the count of
    stages is known, so the figure never jumps back when the chunks' stages are queued."""
    if record.status == "succeeded":
        return 1.0
    parts = {s.name: 1.0 if s.status in ("done", "skipped") else min(1.0, s.progress)
             for s in record.stages}
    chunks = record.json_field("chunk_names")
    if not chunks:
        return sum(parts.values()) / len(parts) if parts else 0.0
    planned = ["probe", "playlist", "upload", "invalidate"]
    planned += [chunk_stage(stage, chunk) for stage in ("segment", "encrypt") for chunk in chunks]
    if record.json_field("audio_bitrates") or (
        record.json_field("audio_renditions") and len(chunks) > 1
    ):
        # Muxed audio encoded once, or an audio group cut beside the chunks.
        planned.append("audio")
    spec = record.runnable_spec
    if spec is not None and spec.download is not None:
        planned.append("download")
    return sum(parts.get(name, 0.0) for name in planned) / len(planned)


def throughput_buckets(now: float) -> list[tuple[float, float]]:
    """The ``[start, end)`` of each 5-minute bucket of the last hour, oldest first; the last
    one holds ``now``."""
    start = (math.floor(now / THROUGHPUT_BUCKET_S) - THROUGHPUT_BUCKETS + 1) * THROUGHPUT_BUCKET_S
    return [
        (start + i * THROUGHPUT_BUCKET_S, start + (i + 1) * THROUGHPUT_BUCKET_S)
        for i in range(THROUGHPUT_BUCKETS)
    ]


def _labels(**labels: str) -> str:
    def escape(value: str) -> str:
        return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')

    inner = ",".join(f'{name}="{escape(value)}"' for name, value in labels.items())
    return "{" + inner + "}" if inner else ""


def _number(value: float) -> str:
    return repr(float(value)) if not float(value).is_integer() else str(int(value))


def render_metrics(
    *,
    counts: dict[str, int],
    stage_records: Sequence[JobRecord],
    queues: Sequence[QueueStats] | None,
    workers: Sequence[Heartbeat] | None,
    key_requests: dict[str, int] | None,
    parked: ParkedStats | None,
    log_lines_dropped: int | None = None,
    now: float | None = None,
) -> str:
    """The Prometheus text exposition (format 0.0.4) of the fleet's state."""
    now = time.time() if now is None else now
    lines: list[str] = []

    def family(name: str, kind: str, help_text: str) -> None:
        lines.append(f"# HELP {name} {help_text}")
        lines.append(f"# TYPE {name} {kind}")

    def sample(name: str, value: float, **labels: str) -> None:
        lines.append(f"{name}{_labels(**labels)} {_number(value)}")

    family("hlsvault_jobs", "gauge", "Job records by status.")
    for status in STATUSES:
        sample("hlsvault_jobs", counts.get(status, 0), status=status)
    family("hlsvault_jobs_scanned", "gauge",
           "Job records read for the stage-duration histogram (newest running and recently "
           "finished jobs).")
    sample("hlsvault_jobs_scanned", len(stage_records))

    family(
        "hlsvault_stage_duration_seconds",
        "histogram",
        f"Durations of stages that finished in the last {DURATION_WINDOW_S} s, by stage kind "
        "(a sliding window recomputed per scrape: read it as is, not with rate()).",
    )
    durations: dict[str, list[float]] = {}
    for record in stage_records:
        for stage in record.stages:
            if stage.status != "done" or stage.started_at is None or stage.finished_at is None:
                continue
            if stage.finished_at < now - DURATION_WINDOW_S:
                continue
            kind = stage.name.split(":", 1)[0]
            durations.setdefault(kind, []).append(max(0.0, stage.finished_at - stage.started_at))
    for kind in sorted(durations):
        values = durations[kind]
        for bound in DURATION_BUCKETS_S:
            count = sum(1 for v in values if v <= bound)
            sample("hlsvault_stage_duration_seconds_bucket", count, stage=kind, le=_number(bound))
        sample("hlsvault_stage_duration_seconds_bucket", len(values), stage=kind, le="+Inf")
        sample("hlsvault_stage_duration_seconds_sum", round(sum(values), 6), stage=kind)
        sample("hlsvault_stage_duration_seconds_count", len(values), stage=kind)

    if queues is not None:
        family("hlsvault_queue_messages", "gauge",
               "Messages per dramatiq queue: waiting, in flight (fetched, not acked), delayed.")
        for q in queues:
            sample("hlsvault_queue_messages", q.queued, queue=q.name, state="queued")
            sample("hlsvault_queue_messages", q.in_flight, queue=q.name, state="in_flight")
            sample("hlsvault_queue_messages", q.delayed, queue=q.name, state="delayed")
        family("hlsvault_queue_dead_letters", "gauge", "Dead-lettered messages per queue.")
        for q in queues:
            sample("hlsvault_queue_dead_letters", q.dead, queue=q.name)
        family("hlsvault_queue_oldest_message_age_seconds", "gauge",
               "Age of the oldest waiting message per queue (0 when none waits).")
        for q in queues:
            sample("hlsvault_queue_oldest_message_age_seconds",
                   round(q.oldest_age_s or 0.0, 3), queue=q.name)
    if workers is not None:
        family("hlsvault_workers_alive", "gauge",
               "Broker processes with a heartbeat younger than the heartbeat timeout.")
        sample("hlsvault_workers_alive", len(workers))
    if key_requests:
        family("hlsvault_key_requests_total", "counter", "Key server key requests by outcome.")
        for outcome in sorted(key_requests):
            sample("hlsvault_key_requests_total", key_requests[outcome], outcome=outcome)
    if log_lines_dropped is not None:
        family("hlsvault_keyserver_log_lines_dropped_total", "counter",
               "Audit and access lines the key servers dropped because their log sink fell "
               "behind (their queue was full).")
        sample("hlsvault_keyserver_log_lines_dropped_total", log_lines_dropped)
    if parked is not None:
        family("hlsvault_ingest_parked", "gauge",
               f"Ingest messages parked for a human (at most {parked.cap}); "
               "see `hlsvault ingest parked`.")
        sample("hlsvault_ingest_parked", parked.count)
        family("hlsvault_ingest_parked_overflow_total", "counter",
               "Parked ingest messages dropped, oldest first, because the park was full.")
        sample("hlsvault_ingest_parked_overflow_total", parked.overflow)
    return "\n".join(lines) + "\n"
