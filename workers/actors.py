"""One thin actor per stage: load the record, call the domain function, say what runs next.

Actors are declared on a runtime's broker by :func:`declare` (called by
:func:`workers.runtime.build_runtime`), never as a side effect of an import.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import dramatiq

from pipeline import cdn, downloads, lifecycle, packaging, publish, trickplay

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
        ran = flow.run_stage(
            rt, job_id, "probe", lambda job: packaging.probe_source(svc, job.spec)
        )
        if ran is not None:
            flow.after_probe(rt, ran)

    @stage_actor(flow.AUDIO, Queue.SEGMENT, SEGMENT_LIMIT_MS)
    def audio(job_id: str) -> None:
        report = flow.progress(rt, job_id, "audio")
        ran = flow.run_stage(
            rt, job_id, "audio",
            lambda job: 0 if flow.arrived(job, flow.AUDIO_MEMBER) else packaging.encode_audio(
                svc, job.spec, report,
                # Released by an earlier delivery or not, the segment stage's mark decides.
                lambda chunk, _again: flow.audio_released(rt, job_id, chunk),
                job=job,
            ),
        )
        if ran is not None:
            flow.after_audio(rt, ran)

    @stage_actor(flow.SEGMENT, Queue.SEGMENT, SEGMENT_LIMIT_MS)
    def segment(job_id: str, chunk: str) -> None:
        stage = flow.chunk_stage("segment", chunk)
        report = flow.progress(rt, job_id, stage)
        ran = flow.run_stage(
            rt, job_id, stage,
            lambda job: packaging.segment(svc, job.spec, chunk, report, job=job),
        )
        if ran is not None:
            flow.after_segment(rt, ran, chunk)

    @stage_actor(flow.ENCRYPT, Queue.ENCRYPT, PUBLISH_LIMIT_MS)
    def encrypt(job_id: str, chunk: str) -> None:
        stage = flow.chunk_stage("encrypt", chunk)
        report = flow.progress(rt, job_id, stage)
        ran = flow.run_stage(
            rt, job_id, stage,
            lambda job: 0 if flow.arrived(job, chunk) else packaging.encrypt(
                svc, job.spec, chunk, report),
        )
        if ran is not None:
            flow.after_encrypt(rt, ran, chunk)

    @stage_actor(flow.PLAYLIST, Queue.PUBLISH, SHORT_LIMIT_MS)
    def playlist(job_id: str) -> None:
        ran = flow.run_stage(
            rt, job_id, "playlist", lambda job: packaging.build_playlists(svc, job.spec, job=job)
        )
        if ran is not None:
            flow.after_playlist(rt, ran)

    @stage_actor(flow.DOWNLOAD, Queue.SEGMENT, PUBLISH_LIMIT_MS)
    def download(job_id: str) -> None:
        """Remux the download rendition into a faststart MP4 (ffmpeg: the segment queue)."""
        ran = flow.run_stage(
            rt, job_id, "download", lambda job: downloads.make_download(svc, job.spec)
        )
        if ran is not None:
            flow.after_download(rt, ran)

    @stage_actor(flow.TRICKPLAY, Queue.SEGMENT, PUBLISH_LIMIT_MS)
    def trick_play(job_id: str) -> None:
        """The I-frame rendition and thumbnail sprites (ffmpeg: the segment queue)."""
        ran = flow.run_stage(
            rt, job_id, "trickplay",
            lambda job: trickplay.make_trick_play(svc, job.spec).version,
        )
        if ran is not None:
            flow.after_trickplay(rt, ran)

    @stage_actor(flow.UPLOAD, Queue.PUBLISH, PUBLISH_LIMIT_MS)
    def upload(job_id: str) -> None:
        report = flow.progress(rt, job_id, "upload")
        ran = flow.run_stage(
            rt, job_id, "upload", lambda job: publish.upload(svc, job.spec, report)
        )
        if ran is not None:
            flow.after_upload(rt, ran)

    @stage_actor(flow.INVALIDATE, Queue.PUBLISH, SHORT_LIMIT_MS)
    def invalidate(job_id: str) -> None:
        ran = flow.run_stage(rt, job_id, "invalidate", lambda job: cdn.invalidate(svc, job.spec))
        if ran is not None:
            flow.after_invalidate(rt, ran)

    @stage_actor(flow.REKEY, Queue.ENCRYPT, PUBLISH_LIMIT_MS)
    def rekey(job_id: str) -> None:
        ran = flow.run_stage(rt, job_id, "rekey", lambda job: lifecycle.rekey(svc, job.spec))
        if ran is not None:
            flow.after_rekey(rt, ran)

    @stage_actor(flow.SHRED, Queue.PUBLISH, SHORT_LIMIT_MS)
    def shred(asset: str) -> None:
        """Delete the keys of the asset's retired versions whose grace period is over."""
        lifecycle.shred_due(svc, asset)
