"""How a process that is not a worker sends a job to the fleet: the ops app (Retry and the
webhook), the ingest poller, and ``hlsvault ingest parked --replay``. The one place they wire it.
"""

from __future__ import annotations

from collections.abc import Callable

from pipeline.jobs import JobSpec
from pipeline.settings import Settings

Submit = Callable[[JobSpec], None]


def submitter(settings: Settings) -> Submit:
    """``submit(spec)``: record the job and enqueue its first stage on the fleet ``settings``
    name. The broker is imported on the first job sent, not when the sender is built.

    (Until ``workers.runtime`` takes its settings from the caller, it loads them itself from
    the same environment: ``settings`` is what that call will pass.)"""

    def submit(spec: JobSpec) -> None:
        import workers.actors  # noqa: F401 - declares the actors on the broker before sending
        from workers import flow, runtime

        flow.start(runtime.services(), spec)

    return submit
