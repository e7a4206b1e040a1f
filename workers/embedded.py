"""Embedded mode: the same actors on dramatiq's in-memory broker, with an in-process worker."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from queue import Queue
from typing import Any

import dramatiq

from pipeline.errors import ConfigurationError, TransientError
from pipeline.jobs import JobRecord, JobSpec

from .middleware import MessageScope
from .runtime import Runtime

#: Worker threads: renditions segment in parallel; ffmpeg spreads each over the cores itself.
WORKER_THREADS = 4
#: How long an idle worker or consumer thread waits for a message before looking again (for
#: shutdown, and for due retries). A message wakes its consumer at once whatever this is, so it
#: only sets the idle cost: the worker has ~12 threads, and at 10 ms their wake-ups cost ~4 %
#: of a core for the whole job (2.7 CPU-s of a 67 s transcode); at 500 ms, 0.1 %. It does not
#: delay the exit either: a drained worker is let go without waiting for its threads (below).
WORKER_IDLE_MS = 500
#: Longest wait for a progress update when no stage ends: the record is read back at least
#: this often (ffmpeg's progress lands in it mid-stage), and at once whenever a message ends.
PROGRESS_INTERVAL_S = 0.25
#: After the job has ended, how long the last message may take to be acknowledged (its actor
#: returns, the middleware runs) before the worker is stopped the slow way, joining threads.
DRAIN_TIMEOUT_S = 2.0


class _Doorbell(MessageScope):
    """Rings when any message ends, so :func:`run_embedded` reads the job record then
    instead of polling it."""

    def __init__(self) -> None:
        self.rung = threading.Event()
        #: Threads of a worker let go by the last run, which end at their next idle wake-up.
        self.released: list[threading.Thread] = []

    def end(self) -> None:
        self.rung.set()


def _doorbell(broker: dramatiq.Broker) -> _Doorbell:
    """The broker's doorbell, added on first use (a runtime may run several jobs)."""
    for middleware in broker.middleware:
        if isinstance(middleware, _Doorbell):
            return middleware
    bell = _Doorbell()
    broker.add_middleware(bell)
    return bell


def _drained(broker: dramatiq.Broker, timeout_s: float) -> bool:
    """Whether every message on the in-memory broker has been acknowledged, waiting up to
    ``timeout_s`` for the ones in flight."""
    deadline = time.monotonic() + timeout_s
    queues: list[Queue[Any]] = list(getattr(broker, "queues", {}).values())
    for queue in queues:
        with queue.all_tasks_done:
            while queue.unfinished_tasks:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                queue.all_tasks_done.wait(remaining)
    return True


def _let_go(worker: dramatiq.Worker, bell: _Doorbell) -> None:
    """Stop a drained worker without joining its threads: each ends at its next idle wake-up
    (daemon threads, holding no message), so the command exits without waiting for them. A
    next run on the same broker waits for them first (:func:`_join_released`): until they end,
    a let-go consumer could still take its message."""
    for thread in worker.workers:
        thread.stop()
    for consumer in worker.consumers.values():
        consumer.stop()
    bell.released = [*worker.workers, *worker.consumers.values()]


def _join_released(bell: _Doorbell) -> None:
    deadline = time.monotonic() + 2 * WORKER_IDLE_MS / 1000 + 1
    for thread in bell.released:
        thread.join(max(0.0, deadline - time.monotonic()))
    bell.released = [t for t in bell.released if t.is_alive()]
    if bell.released:
        raise TransientError("the embedded worker of the previous job has not stopped yet")


def run_embedded(
    rt: Runtime, spec: JobSpec, *, on_update: Callable[[JobRecord], None] | None = None
) -> JobRecord:
    """Run one job to its end in this process and return its final record."""
    if not rt.settings.embedded:
        raise ConfigurationError("run_embedded needs embedded mode (REDIS_URL unset)")
    svc = rt.services
    bell = _doorbell(rt.broker)
    _join_released(bell)
    worker = dramatiq.Worker(
        rt.broker, worker_threads=WORKER_THREADS, worker_timeout=WORKER_IDLE_MS
    )
    worker.start()
    try:
        rt.enqueue(spec)
        while True:
            bell.rung.clear()
            record = svc.jobs.get(spec.job_id)
            if on_update is not None:
                on_update(record)
            if record.done:
                return record
            bell.rung.wait(PROGRESS_INTERVAL_S)
    finally:
        if _drained(rt.broker, DRAIN_TIMEOUT_S):
            _let_go(worker, bell)
        else:
            worker.stop(timeout=10_000)
