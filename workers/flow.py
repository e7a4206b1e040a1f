"""The flow: which stage runs after which, and the bookkeeping every stage shares.

    probe ─► segment ×R ─► encrypt ×R ─► playlist (fan-in) ─► upload ─► invalidate ─► done

Actors call :func:`run_stage` around their domain function and then the ``after_*`` function
that enqueues what comes next. Messages carry ids only: ``(job_id)`` or ``(job_id, rendition)``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import dramatiq
import structlog

from pipeline.errors import PermanentError, PoisonJob
from pipeline.jobs import JobSpec
from pipeline.logs import redact_text
from pipeline.packaging import discard_work, replaced_grace
from pipeline.plan import Rendition
from pipeline.services import Services

log = structlog.get_logger(__name__)

T = TypeVar("T")

PROBE = "media.probe"
SEGMENT = "media.segment"
ENCRYPT = "media.encrypt"
PLAYLIST = "media.playlist"
UPLOAD = "media.upload"
INVALIDATE = "media.invalidate"
REKEY = "media.rekey"
SHRED = "media.shred"
#: Actors whose first argument is a job id; the others (SHRED) work on an asset.
JOB_ACTORS = frozenset({PROBE, SEGMENT, ENCRYPT, PLAYLIST, UPLOAD, INVALIDATE, REKEY})


def stage_of(actor_name: str, args: Sequence[Any]) -> str:
    """The job-record stage a message works on: ``segment:720p`` for per-rendition stages."""
    stage = actor_name.removeprefix("media.")
    if actor_name in (SEGMENT, ENCRYPT) and len(args) > 1:
        return f"{stage}:{args[1]}"
    return stage


def _send(actor_name: str, *args: Any) -> None:
    dramatiq.get_broker().get_actor(actor_name).send(*args)


def start(svc: Services, spec: JobSpec) -> None:
    """Record a new job and enqueue its first stage."""
    svc.jobs.create(spec)
    if spec.kind == "rekey":
        svc.jobs.stage_queued(spec.job_id, "rekey")
        _send(REKEY, spec.job_id)
        return
    svc.jobs.stage_queued(spec.job_id, "probe")
    _send(PROBE, spec.job_id)


def run_stage(svc: Services, job_id: str, stage: str, work: Callable[[JobSpec], T]) -> T | None:
    """Run one stage's domain function with the job record kept up to date.

    Returns None when the stage must not continue: the job already ended (failed, cancelled),
    was found poison, or failed permanently here. Transient errors propagate, so dramatiq
    retries the message with backoff.
    """
    record = svc.jobs.get(job_id)
    if record.done:
        log.info("job already ended; stage skipped", stage=stage, status=record.status)
        if record.status == "cancelled":
            discard_work(svc, job_id)
        return None
    attempts = svc.jobs.stage_started(job_id, stage)
    if attempts > svc.settings.max_deliveries:
        reason = str(
            PoisonJob(
                f"{stage} was delivered {attempts} times without finishing (its worker keeps "
                "dying); inspect the source, then resubmit"
            )
        )
        _fail(svc, record.spec, stage, reason)
        return None
    started = time.monotonic()
    try:
        result = work(record.spec)
    except PermanentError as error:
        _fail(svc, record.spec, stage, redact_text(str(error)))
        return None
    svc.jobs.stage_finished(job_id, stage)
    log.info("stage done", stage=stage, attempt=attempts,
             seconds=round(time.monotonic() - started, 3))
    return result


def _fail(svc: Services, spec: JobSpec, stage: str, reason: str) -> None:
    log.warning("job failed", stage=stage, reason=reason)
    svc.jobs.fail(spec.job_id, stage, reason)
    discard_work(svc, spec.job_id)


def progress(svc: Services, job_id: str, stage: str) -> Callable[[float], None]:
    def report(fraction: float) -> None:
        svc.jobs.stage_progress(job_id, stage, fraction)

    return report


def after_probe(svc: Services, job_id: str, renditions: list[Rendition]) -> None:
    names = [r.name for r in renditions]
    svc.jobs.set_pending(job_id, "encrypt", len(names))
    svc.jobs.stage_queued(job_id, *(f"segment:{n}" for n in names))
    for name in names:
        _send(SEGMENT, job_id, name)


def after_segment(svc: Services, job_id: str, rendition: str) -> None:
    svc.jobs.stage_queued(job_id, f"encrypt:{rendition}")
    _send(ENCRYPT, job_id, rendition)


def after_encrypt(svc: Services, job_id: str, rendition: str) -> None:
    # Fan-in on the record's atomic counter: the last rendition to finish enqueues the
    # playlist. (A dramatiq group callback would never fire if one child failed for good.)
    if svc.jobs.arrive(job_id, "encrypt", rendition) == 0:
        svc.jobs.stage_queued(job_id, "playlist")
        _send(PLAYLIST, job_id)


def after_rekey(svc: Services, job_id: str) -> None:
    # The rekey stage leaves what segment, encrypt and playlist would have: publish it.
    after_playlist(svc, job_id)


def after_playlist(svc: Services, job_id: str) -> None:
    svc.jobs.stage_queued(job_id, "upload")
    _send(UPLOAD, job_id)


def after_upload(svc: Services, job_id: str) -> None:
    svc.jobs.stage_queued(job_id, "invalidate")
    _send(INVALIDATE, job_id)


def after_invalidate(svc: Services, job_id: str, result: dict[str, Any]) -> None:
    record = svc.jobs.get(job_id)
    spec = record.spec
    replaced = record.json_field("replaced")
    if replaced:
        # The publish retired the version this job replaced (its keys are served for a grace
        # period, then refused); this deletes them once it is over. A lost message only delays
        # the deletion until the next shred of the asset (every re-key and every embedded
        # package sweeps what is due): the key server refuses them regardless.
        grace = replaced_grace(spec)
        result["retired"] = {"version": replaced, "grace_s": grace}
        dramatiq.get_broker().get_actor(SHRED).send_with_options(
            args=(spec.asset,), delay=int(grace * 1000) + 1000
        )
    svc.jobs.succeed(job_id, result)
    discard_work(svc, job_id)
    log.info("job published", asset=result.get("asset"), version=result.get("version"))
