"""One thin actor per stage: load the record, call the domain function, say what runs next.

Actors are declared on a runtime's broker by :func:`declare` (called by
:func:`workers.runtime.build_runtime`), never as a side effect of an import.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import dramatiq

from pipeline import cdn, downloads, lifecycle, packaging, publish, trickplay
from pipeline.jobs import JobSpec

from . import flow
from .queues import Queue

if TYPE_CHECKING:
    from .runtime import Runtime

#: Transient failures are retried this often, with exponential backoff between the bounds.
MAX_RETRIES = 5
MIN_BACKOFF_MS = 500
MAX_BACKOFF_MS = 30_000
#: Time limits sit above each stage's own blocking-call timeouts (ffmpeg, S3), which fire
#: first: dramatiq's time limit cannot interrupt a thread stuck in a system call.
SHORT_LIMIT_MS = round(packaging.PROBE_STAGE_S * 1000)  # the probe budgets its work within
SEGMENT_LIMIT_MS = 12 * 3600_000
PUBLISH_LIMIT_MS = 60 * 60_000


def _handing_on(work: Callable[[JobSpec], object]) -> Callable[[JobSpec], JobSpec]:
    """A stage's work that returns the spec it ran on, so the next stage is sent from it
    without reading the job record again."""

    def run(spec: JobSpec) -> JobSpec:
        work(spec)
        return spec

    return run


def declare(rt: Runtime) -> None:
    """Declare every stage's actor on ``rt.broker``, each bound to ``rt``."""

    def stage_actor(name: str, queue: Queue, time_limit_ms: int) -> Callable[..., object]:
        """dramatiq.actor with the options every stage shares: bounded retries with backoff."""
        return dramatiq.actor(
            actor_name=name,
            queue_name=queue,
            broker=rt.broker,
            time_limit=time_limit_ms,
            max_retries=MAX_RETRIES,
            min_backoff=MIN_BACKOFF_MS,
            max_backoff=MAX_BACKOFF_MS,
        )

    svc = rt.services

    @stage_actor(flow.PROBE, Queue.PROBE, SHORT_LIMIT_MS)
    def probe(job_id: str) -> None:
        plan = flow.run_stage(
            rt, job_id, "probe", lambda spec: packaging.probe_source(svc, spec)
        )
        if plan is not None:
            flow.after_probe(rt, job_id, plan)

    @stage_actor(flow.AUDIO, Queue.SEGMENT, SEGMENT_LIMIT_MS)
    def audio(job_id: str) -> None:
        report = flow.progress(rt, job_id, "audio")
        done = flow.run_stage(
            rt, job_id, "audio",
            lambda spec: packaging.encode_audio(
                svc, spec, report,
                lambda chunk, again: flow.audio_released(rt, job_id, chunk, again),
            ),
        )
        if done is not None:
            flow.after_audio(rt, job_id)

    @stage_actor(flow.SEGMENT, Queue.SEGMENT, SEGMENT_LIMIT_MS)
    def segment(job_id: str, chunk: str) -> None:
        stage = flow.chunk_stage("segment", chunk)
        report = flow.progress(rt, job_id, stage)
        done = flow.run_stage(
            rt, job_id, stage, lambda spec: packaging.segment(svc, spec, chunk, report)
        )
        if done is not None:
            flow.after_segment(rt, job_id, chunk)

    @stage_actor(flow.ENCRYPT, Queue.ENCRYPT, PUBLISH_LIMIT_MS)
    def encrypt(job_id: str, chunk: str) -> None:
        stage = flow.chunk_stage("encrypt", chunk)
        report = flow.progress(rt, job_id, stage)
        done = flow.run_stage(
            rt, job_id, stage, lambda spec: packaging.encrypt(svc, spec, chunk, report)
        )
        if done is not None:
            flow.after_encrypt(rt, job_id, chunk)

    @stage_actor(flow.PLAYLIST, Queue.PUBLISH, SHORT_LIMIT_MS)
    def playlist(job_id: str) -> None:
        build = _handing_on(lambda spec: packaging.build_playlists(svc, spec))
        ran = flow.run_stage(rt, job_id, "playlist", build)
        if ran is not None:
            flow.after_playlist(rt, ran)

    @stage_actor(flow.DOWNLOAD, Queue.SEGMENT, PUBLISH_LIMIT_MS)
    def download(job_id: str) -> None:
        """Remux the download rendition into a faststart MP4 (ffmpeg: the segment queue)."""
        ran = flow.run_stage(
            rt, job_id, "download", _handing_on(lambda spec: downloads.make_download(svc, spec))
        )
        if ran is not None:
            flow.after_download(rt, ran)

    @stage_actor(flow.TRICKPLAY, Queue.SEGMENT, PUBLISH_LIMIT_MS)
    def trick_play(job_id: str) -> None:
        """The I-frame rendition and thumbnail sprites (ffmpeg: the segment queue)."""
        done = flow.run_stage(
            rt, job_id, "trickplay", lambda spec: trickplay.make_trick_play(svc, spec).version
        )
        if done is not None:
            flow.after_trickplay(rt, job_id)

    @stage_actor(flow.UPLOAD, Queue.PUBLISH, PUBLISH_LIMIT_MS)
    def upload(job_id: str) -> None:
        report = flow.progress(rt, job_id, "upload")
        published = flow.run_stage(
            rt, job_id, "upload", lambda spec: publish.upload(svc, spec, report)
        )
        if published is not None:
            flow.after_upload(rt, job_id, published)

    @stage_actor(flow.INVALIDATE, Queue.PUBLISH, SHORT_LIMIT_MS)
    def invalidate(job_id: str) -> None:
        outcome = flow.run_stage(rt, job_id, "invalidate", lambda spec: cdn.invalidate(svc, spec))
        if outcome is not None:
            flow.after_invalidate(rt, job_id, outcome)

    @stage_actor(flow.REKEY, Queue.ENCRYPT, PUBLISH_LIMIT_MS)
    def rekey(job_id: str) -> None:
        ran = flow.run_stage(
            rt, job_id, "rekey", _handing_on(lambda spec: lifecycle.rekey(svc, spec))
        )
        if ran is not None:
            flow.after_rekey(rt, ran)

    @stage_actor(flow.SHRED, Queue.PUBLISH, SHORT_LIMIT_MS)
    def shred(asset: str) -> None:
        """Delete the keys of the asset's retired versions whose grace period is over."""
        lifecycle.shred_due(svc, asset)
