"""Embedded mode: the same actors on dramatiq's in-memory broker, with an in-process worker."""

from __future__ import annotations

import time
from collections.abc import Callable

import dramatiq

from pipeline.jobs import JobRecord, JobSpec

from . import actors, flow, runtime

#: Worker threads: renditions segment in parallel; ffmpeg spreads each over the cores itself.
WORKER_THREADS = 4
#: How long an idle worker thread waits for a message before checking for shutdown.
WORKER_IDLE_MS = 100
#: How often the job record is read back for progress.
POLL_INTERVAL_S = 0.05

__all__ = ["actors", "run_embedded"]


def run_embedded(
    spec: JobSpec, *, on_update: Callable[[JobRecord], None] | None = None
) -> JobRecord:
    """Run one job to its end in this process and return its final record."""
    if not runtime.settings.embedded:
        raise RuntimeError("run_embedded needs embedded mode (REDIS_URL unset)")
    svc = runtime.services()
    worker = dramatiq.Worker(
        runtime.broker, worker_threads=WORKER_THREADS, worker_timeout=WORKER_IDLE_MS
    )
    worker.start()
    try:
        flow.start(svc, spec)
        while True:
            record = svc.jobs.get(spec.job_id)
            if on_update is not None:
                on_update(record)
            if record.done:
                return record
            time.sleep(POLL_INTERVAL_S)
    finally:
        worker.stop(timeout=10_000)
