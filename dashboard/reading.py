"""What the ops app reads: job records redacted before anyone sees them.

Every view (the HTML pages, the JSON API, the metrics) gets its job records from
:class:`OpsReader`, which hands out only redacted copies (:func:`pipeline.logs.redacted_record`,
what ``hlsvault status`` shows too): a presigned source URL or a token in an error message
never reaches a page, whichever page it is.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import redis

from pipeline.errors import NotFound
from pipeline.jobs import TERMINAL, JobRecord, UnknownJob
from pipeline.logs import redacted_record
from pipeline.parked import ParkedStats, ParkingLot
from pipeline.services import Services

from . import metrics

#: The jobs list shows this many of the newest jobs (of the status asked for).
MAX_LISTED_JOBS = 200
#: Stage durations are read from at most this many of the newest jobs of each status.
MAX_DURATION_JOBS = 250


@dataclass(frozen=True)
class Fleet:
    """Queues and live workers; None for each in embedded mode (no Redis)."""

    queues: list[metrics.QueueStats] | None
    workers: list[metrics.Heartbeat] | None


class OpsReader:
    """Reads job records (through the status index), the fleet and the parked messages.
    ``now`` is the job store's clock, so figures and records agree on the time."""

    def __init__(
        self, services: Services, *, redis_client: redis.Redis | None, heartbeat_timeout_ms: int
    ) -> None:
        self.jobs = services.jobs
        self.redis = redis_client
        self.heartbeat_timeout_ms = heartbeat_timeout_ms
        self.now: Callable[[], float] = services.jobs.clock

    def record(self, job_id: str) -> JobRecord:
        try:
            return redacted_record(self.jobs.get(job_id))
        except UnknownJob:
            raise NotFound(f"no job {job_id[:64]}; the jobs list shows those that exist") from None

    def recent(self, status: str | None) -> list[JobRecord]:
        return [redacted_record(r) for r in self.jobs.recent(MAX_LISTED_JOBS, status)]

    def counts(self) -> dict[str, int]:
        return self.jobs.counts()

    def throughput(self) -> list[tuple[float, int, int]]:
        """(bucket start, succeeded, failed) per bucket of the last hour, oldest first."""
        chart = []
        for start, end in metrics.throughput_buckets(self.now()):
            finished = self.jobs.finished_between(start, end)
            chart.append((start, finished["succeeded"], finished["failed"]))
        return chart

    def duration_sample(self) -> list[JobRecord]:
        """The jobs whose stages may have finished within the duration window: the newest
        running ones, and the newest finished ones that finished within it."""
        since = self.now() - metrics.DURATION_WINDOW_S
        sample = self.jobs.recent(MAX_DURATION_JOBS, "running")
        for status in TERMINAL:
            sample += [
                r for r in self.jobs.recent(MAX_DURATION_JOBS, status)
                if r.finished_at is not None and r.finished_at >= since
            ]
        return [redacted_record(r) for r in sample]

    def fleet(self) -> Fleet:
        if self.redis is None:
            return Fleet(None, None)
        return Fleet(
            metrics.queue_stats(self.redis, now=time.time()),
            metrics.heartbeats(self.redis, timeout_ms=self.heartbeat_timeout_ms),
        )

    def key_requests(self) -> dict[str, int] | None:
        return None if self.redis is None else metrics.key_request_counts(self.redis)

    def log_lines_dropped(self) -> int | None:
        return None if self.redis is None else metrics.log_lines_dropped(self.redis)

    def parked(self) -> ParkedStats | None:
        return None if self.redis is None else ParkingLot(self.redis).stats()
