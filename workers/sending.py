"""How a process that is not a worker sends a job to the fleet: the ops app (Retry and the
webhook), the ingest poller, and ``hlsvault ingest parked --replay``. The one place they wire it.
"""

from __future__ import annotations

from collections.abc import Callable

from pipeline.errors import ConfigurationError
from pipeline.jobs import JobSpec
from pipeline.services import Services
from pipeline.settings import Settings

Submit = Callable[[JobSpec], None]


def submitter(settings: Settings, *, services: Services | None = None) -> Submit:
    """``submit(spec)``: record the job and enqueue its first stage on the fleet ``settings``
    name, over the process's ``services`` when given (one set of stores per process). The
    runtime (broker, actors) is installed on the first job sent, not when the sender is built.

    Without ``REDIS_URL`` there is no fleet to run the job (an embedded ops app has no worker):
    sending refuses, saying so, rather than queue a job nobody will ever run."""

    def submit(spec: JobSpec) -> None:
        if settings.embedded:
            raise ConfigurationError(
                "this process has no workers to run the job: set REDIS_URL to send it to the "
                "fleet, or run it again with `hlsvault package`"
            )
        from .runtime import install

        install(settings, services=services).enqueue(spec)

    return submit
