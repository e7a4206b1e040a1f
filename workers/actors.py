"""One thin actor per stage: load the record, call the domain function, say what runs next."""

from __future__ import annotations

import dramatiq
from dramatiq.actor import ActorDecorator

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


def stage_actor(name: str, queue: Queue, time_limit_ms: int) -> ActorDecorator:
    """dramatiq.actor with the options every stage shares: bounded retries with backoff."""
    return dramatiq.actor(
        actor_name=name,
        queue_name=queue,
        time_limit=time_limit_ms,
        max_retries=MAX_RETRIES,
        min_backoff=MIN_BACKOFF_MS,
        max_backoff=MAX_BACKOFF_MS,
    )


@stage_actor(flow.PROBE, Queue.PROBE, SHORT_LIMIT_MS)
def probe(job_id: str) -> None:
    svc = services()
    renditions = flow.run_stage(
        svc, job_id, "probe", lambda spec: packaging.probe_source(svc, spec)
    )
    if renditions is not None:
        flow.after_probe(svc, job_id, renditions)


@stage_actor(flow.SEGMENT, Queue.SEGMENT, SEGMENT_LIMIT_MS)
def segment(job_id: str, rendition: str) -> None:
    svc = services()
    stage = f"segment:{rendition}"
    report = flow.progress(svc, job_id, stage)
    done = flow.run_stage(
        svc, job_id, stage, lambda spec: packaging.segment(svc, spec, rendition, report)
    )
    if done is not None:
        flow.after_segment(svc, job_id, rendition)


@stage_actor(flow.ENCRYPT, Queue.ENCRYPT, PUBLISH_LIMIT_MS)
def encrypt(job_id: str, rendition: str) -> None:
    svc = services()
    stage = f"encrypt:{rendition}"
    report = flow.progress(svc, job_id, stage)
    done = flow.run_stage(
        svc, job_id, stage, lambda spec: packaging.encrypt(svc, spec, rendition, report)
    )
    if done is not None:
        flow.after_encrypt(svc, job_id, rendition)


@stage_actor(flow.PLAYLIST, Queue.PUBLISH, SHORT_LIMIT_MS)
def playlist(job_id: str) -> None:
    svc = services()
    done = flow.run_stage(
        svc, job_id, "playlist", lambda spec: packaging.build_playlists(svc, spec)
    )
    if done is not None:
        flow.after_playlist(svc, job_id)


@stage_actor(flow.UPLOAD, Queue.PUBLISH, PUBLISH_LIMIT_MS)
def upload(job_id: str) -> None:
    svc = services()
    report = flow.progress(svc, job_id, "upload")
    published = flow.run_stage(
        svc, job_id, "upload", lambda spec: packaging.upload(svc, spec, report)
    )
    if published is not None:
        svc.jobs.set_json(job_id, "published", published)
        flow.after_upload(svc, job_id)


@stage_actor(flow.INVALIDATE, Queue.PUBLISH, SHORT_LIMIT_MS)
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


@stage_actor(flow.REKEY, Queue.ENCRYPT, PUBLISH_LIMIT_MS)
def rekey(job_id: str) -> None:
    svc = services()
    done = flow.run_stage(svc, job_id, "rekey", lambda spec: lifecycle.rekey(svc, spec))
    if done is not None:
        flow.after_rekey(svc, job_id)


@stage_actor(flow.SHRED, Queue.PUBLISH, SHORT_LIMIT_MS)
def shred(asset: str) -> None:
    """Delete the keys of the asset's retired versions whose grace period is over."""
    lifecycle.shred_due(services(), asset)
