"""Embedded mode: the same actors on dramatiq's in-memory broker, with an in-process worker."""

from __future__ import annotations

import time
from collections.abc import Callable

import dramatiq

from pipeline.errors import ConfigurationError
from pipeline.jobs import JobRecord, JobSpec

from .runtime import Runtime

#: Worker threads: renditions segment in parallel; ffmpeg spreads each over the cores itself.
WORKER_THREADS = 4
#: How long an idle worker or consumer thread waits for a message before checking for
#: shutdown. `Worker.stop` waits this long for the worker threads, then again for the
#: consumers: at 100 ms that was 0.2 s of every `hlsvault package`. Waking this often costs
#: about 4 % of one core while idle, and this worker lives only as long as one command.
WORKER_IDLE_MS = 10
#: How often the job record is read back for progress, and to see that the job has ended: the
#: CLI exits up to this long after the last stage. A read costs ~0.1 ms, so 100 a second is cheap.
POLL_INTERVAL_S = 0.01



def run_embedded(
    rt: Runtime, spec: JobSpec, *, on_update: Callable[[JobRecord], None] | None = None
) -> JobRecord:
    """Run one job to its end in this process and return its final record."""
    if not rt.settings.embedded:
        raise ConfigurationError("run_embedded needs embedded mode (REDIS_URL unset)")
    svc = rt.services
    worker = dramatiq.Worker(
        rt.broker, worker_threads=WORKER_THREADS, worker_timeout=WORKER_IDLE_MS
    )
    worker.start()
    try:
        rt.enqueue(spec)
        while True:
            record = svc.jobs.get(spec.job_id)
            if on_update is not None:
                on_update(record)
            if record.done:
                return record
            time.sleep(POLL_INTERVAL_S)
    finally:
        worker.stop(timeout=10_000)
