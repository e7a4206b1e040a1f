"""Running a job from the command line: in this process (embedded) or on the fleet, waiting for
it with progress bars, and reporting its outcome. Every command that runs a job uses these.

A :class:`Context` is one command's view of the deployment: the settings loaded once by the
CLI, and the stores and the runtime opened on first use, once.
"""

from __future__ import annotations

import json
import sys
import time
from functools import cached_property
from typing import TYPE_CHECKING, Any

from pipeline import layout
from pipeline.jobs import JobRecord, JobSpec
from pipeline.settings import Settings

if TYPE_CHECKING:
    from pipeline.services import Services
    from workers import Runtime

#: How often a waiting CLI reads the job record back.
WAIT_POLL_S = 0.25
#: A waiting CLI gives up after this long; the job itself carries on.
DEFAULT_WAIT_TIMEOUT_S = 6 * 3600.0
EXIT_FAILED = 1


class Context:
    """Settings, and what is opened from them at most once per command."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        #: The job spec `package` made ahead of the rest of its start (hlsvault.cli), if any.
        self.spec: JobSpec | None = None

    @cached_property
    def services(self) -> Services:
        from pipeline.services import build_services

        return build_services(self.settings)

    @cached_property
    def runtime(self) -> Runtime:
        from workers import install

        return install(self.settings, services=self.services)


def fail(message: str, code: int = EXIT_FAILED) -> int:
    """Say why on stderr, in one line, and return the exit status."""
    print(f"hlsvault: {message}", file=sys.stderr)
    return code


def run_job(ctx: Context, spec: JobSpec, *, show: bool, timeout: float) -> JobRecord:
    """Run a job to its end: in this process (embedded), or on the fleet, waiting for it."""
    if ctx.settings.embedded:
        from workers.embedded import run_embedded

        from .progress import StageProgress

        with StageProgress(enabled=show) as bars:
            return run_embedded(ctx.runtime, spec, on_update=bars.update)
    ctx.runtime.enqueue(spec)
    return wait(ctx, spec.job_id, show=show, timeout=timeout)


def wait(ctx: Context, job_id: str, *, show: bool, timeout: float) -> JobRecord:
    """Read the job record until the job ends; TimeoutError after ``timeout`` seconds."""
    from .progress import StageProgress

    jobs = ctx.services.jobs
    deadline = time.monotonic() + timeout
    with StageProgress(enabled=show) as bars:
        while True:
            record = jobs.get(job_id)
            bars.update(record)
            if record.done:
                return record
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"job {job_id} still {record.status} after {timeout:.0f} s; it carries on: "
                    f"follow it with `hlsvault status {job_id} --wait`"
                )
            time.sleep(WAIT_POLL_S)


def _shown_error(record: JobRecord) -> str | None:
    """The job's error as `status` and the ops app show it (redacted)."""
    from pipeline.logs import redact_text

    return None if record.error is None else redact_text(record.error)


def summary(ctx: Context, record: JobRecord) -> dict[str, Any]:
    """What `--json` prints about a finished job."""
    result: dict[str, Any] = {
        "job_id": record.job_id,
        "asset": record.asset,
        "version": record.version,
        "status": record.status,
    }
    if record.status != "succeeded":
        result.update(renditions=[], error=_shown_error(record), failed_stage=record.failed_stage)
        return result
    described = ctx.services.catalog.get_version(record.asset, record.version)
    result["renditions"] = [
        {
            "name": r.name,
            "width": r.width,
            "height": r.height,
            "bandwidth": r.bandwidth,
            "average_bandwidth": r.average_bandwidth,
            "codecs": r.codecs,
            "segments": len(r.segments),
        }
        for r in described.renditions
    ]
    result["keys"] = described.key_count
    result["master_url"] = layout.master_url(ctx.settings.public_url, record.asset)
    if described.download is not None:
        result["download"] = {
            "rendition": described.download.rendition,
            "size": described.download.size,
            "url": layout.download_url(ctx.settings.public_url, record.asset),
        }
    warnings = record.json_field("warnings")
    if warnings:
        result["warnings"] = warnings
    return result


def report(ctx: Context, record: JobRecord, *, as_json: bool, done_line: str | None = None) -> int:
    """Print a finished job's outcome (JSON, or a line for people) and return the exit status."""
    if as_json:
        print(json.dumps(summary(ctx, record), indent=2))
    if record.status != "succeeded":
        return fail(f"job {record.job_id} {record.status} at {record.failed_stage}: "
                    f"{_shown_error(record)}")
    for warning in record.json_field("warnings") or []:
        print(f"hlsvault: warning: {warning}", file=sys.stderr)
    if not as_json:
        if done_line is None:
            described = ctx.services.catalog.get_version(record.asset, record.version)
            names = ", ".join(r.name for r in described.renditions)
            done_line = (f"published {record.asset} version {record.version}: {names}\n"
                         f"play it: hlsvault url {record.asset}")
        print(done_line)
    return 0
