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
    name. The runtime (broker, actors) is installed on the first job sent, not when the sender
    is built."""

    def submit(spec: JobSpec) -> None:
        from .runtime import install

        install(settings).enqueue(spec)

    return submit
