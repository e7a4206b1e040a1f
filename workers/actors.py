"""One thin actor per stage: load the record, call the domain function, say what runs next."""

from __future__ import annotations

import dramatiq

from pipeline import cdn, lifecycle, packaging

from . import flow
from .queues import Queue
from .runtime import services

#: Transient failures are retried this often, with exponential backoff between the bounds.
MAX_RETRIES = 5
MIN_BACKOFF_MS = 500
MAX_BACKOFF_MS = 30_000
#: Time limits sit above each stage's own blocking-call timeouts (ffmpeg, S3), which fire
#: first: dramatiq's time limit cannot interrupt a thread stuck in a system call.
SHORT_LIMIT_MS = 10 * 60_000
SEGMENT_LIMIT_MS = 12 * 3600_000
PUBLISH_LIMIT_MS = 60 * 60_000


@dramatiq.actor(
    actor_name=flow.PROBE,
    queue_name=Queue.PROBE,
    time_limit=SHORT_LIMIT_MS,
    max_retries=MAX_RETRIES,
    min_backoff=MIN_BACKOFF_MS,
    max_backoff=MAX_BACKOFF_MS,
)
def probe(job_id: str) -> None:
    svc = services()
    renditions = flow.run_stage(
        svc, job_id, "probe", lambda spec: packaging.probe_source(svc, spec)
    )
    if renditions is not None:
        flow.after_probe(svc, job_id, renditions)


@dramatiq.actor(
    actor_name=flow.SEGMENT,
    queue_name=Queue.SEGMENT,
    time_limit=SEGMENT_LIMIT_MS,
    max_retries=MAX_RETRIES,
    min_backoff=MIN_BACKOFF_MS,
    max_backoff=MAX_BACKOFF_MS,
)
def segment(job_id: str, rendition: str) -> None:
    svc = services()
    stage = f"segment:{rendition}"
    report = flow.progress(svc, job_id, stage)
    done = flow.run_stage(
        svc, job_id, stage, lambda spec: packaging.segment(svc, spec, rendition, report)
    )
    if done is not None:
        flow.after_segment(svc, job_id, rendition)


@dramatiq.actor(
    actor_name=flow.ENCRYPT,
    queue_name=Queue.ENCRYPT,
    time_limit=PUBLISH_LIMIT_MS,
    max_retries=MAX_RETRIES,
    min_backoff=MIN_BACKOFF_MS,
    max_backoff=MAX_BACKOFF_MS,
)
def encrypt(job_id: str, rendition: str) -> None:
    svc = services()
    stage = f"encrypt:{rendition}"
    report = flow.progress(svc, job_id, stage)
    done = flow.run_stage(
        svc, job_id, stage, lambda spec: packaging.encrypt(svc, spec, rendition, report)
    )
    if done is not None:
        flow.after_encrypt(svc, job_id, rendition)


@dramatiq.actor(
    actor_name=flow.PLAYLIST,
    queue_name=Queue.PUBLISH,
    time_limit=SHORT_LIMIT_MS,
    max_retries=MAX_RETRIES,
    min_backoff=MIN_BACKOFF_MS,
    max_backoff=MAX_BACKOFF_MS,
)
def playlist(job_id: str) -> None:
    svc = services()
    done = flow.run_stage(
        svc, job_id, "playlist", lambda spec: packaging.build_playlists(svc, spec)
    )
    if done is not None:
        flow.after_playlist(svc, job_id)


@dramatiq.actor(
    actor_name=flow.UPLOAD,
    queue_name=Queue.PUBLISH,
    time_limit=PUBLISH_LIMIT_MS,
    max_retries=MAX_RETRIES,
    min_backoff=MIN_BACKOFF_MS,
    max_backoff=MAX_BACKOFF_MS,
)
def upload(job_id: str) -> None:
    svc = services()
    report = flow.progress(svc, job_id, "upload")
    published = flow.run_stage(
        svc, job_id, "upload", lambda spec: packaging.upload(svc, spec, report)
    )
    if published is not None:
        svc.jobs.set_json(job_id, "published", published)
        flow.after_upload(svc, job_id)


@dramatiq.actor(
    actor_name=flow.INVALIDATE,
    queue_name=Queue.PUBLISH,
    time_limit=SHORT_LIMIT_MS,
    max_retries=MAX_RETRIES,
    min_backoff=MIN_BACKOFF_MS,
    max_backoff=MAX_BACKOFF_MS,
)
def invalidate(job_id: str) -> None:
    svc = services()
    outcome = flow.run_stage(svc, job_id, "invalidate", lambda spec: cdn.invalidate(svc, spec))
    if outcome is not None:
        if outcome["status"] == "skipped":
            svc.jobs.stage_finished(
                job_id, "invalidate", status="skipped", detail=outcome["reason"]
            )
        result = dict(svc.jobs.get(job_id).json_field("published") or {})
        result["invalidation"] = outcome
        flow.after_invalidate(svc, job_id, result)


@dramatiq.actor(
    actor_name=flow.REKEY,
    queue_name=Queue.ENCRYPT,
    time_limit=PUBLISH_LIMIT_MS,
    max_retries=MAX_RETRIES,
    min_backoff=MIN_BACKOFF_MS,
    max_backoff=MAX_BACKOFF_MS,
)
def rekey(job_id: str) -> None:
    svc = services()
    done = flow.run_stage(svc, job_id, "rekey", lambda spec: lifecycle.rekey(svc, spec))
    if done is not None:
        flow.after_rekey(svc, job_id)


@dramatiq.actor(
    actor_name=flow.SHRED,
    queue_name=Queue.PUBLISH,
    time_limit=SHORT_LIMIT_MS,
    max_retries=MAX_RETRIES,
    min_backoff=MIN_BACKOFF_MS,
    max_backoff=MAX_BACKOFF_MS,
)
def shred(asset: str) -> None:
    """Delete the keys of the asset's retired versions whose grace period is over."""
    lifecycle.shred_due(services(), asset)
