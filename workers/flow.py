"""The flow: which stage runs after which, and the bookkeeping every stage shares.

    probe ─► [audio] ─► segment ×C ─► encrypt ×C ─► playlist (fan-in) ─► [download] ─►
    [trickplay] ─► upload ─► invalidate ─► done

A transcode is cut into C time chunks; each segment message transcodes one chunk for every
rendition (one decode), and each chunk is encrypted as soon as it is segmented, so the
playlist waits only for the last chunk. A chunked job with audio first encodes its audio once
(``audio``: seamless joins, see :mod:`pipeline.audio`), and the audio stage sends each chunk's
segment message as soon as the encoder has passed that chunk's end, so the chunks do not wait
for the whole source's audio; separate audio renditions (an audio group) are cut beside the
chunks and join the playlist's fan-in. A remux, or a short source, is one chunk and has no
audio stage.
A job that asked for a download gets a faststart MP4 of one rendition after the playlist, and
one that asked for trick play its I-frame rendition and thumbnails (:mod:`pipeline.trickplay`)
after that.

Actors call :func:`run_stage` around their domain function and then the ``after_*`` function
that enqueues what comes next. Messages carry ids only: ``(job_id)`` or ``(job_id, chunk)``.
A job fails through :func:`fail` only, whether a stage found a permanent error, a message was
delivered too often, or dramatiq ran out of retries (:class:`workers.middleware.JobOutcome`).
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable, Mapping, Sequence
from contextvars import ContextVar
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, TypeVar

import structlog

from pipeline.errors import HlsvaultError, PoisonJob, TransientError
from pipeline.jobs import JobSpec
from pipeline.logs import redact_text
from pipeline.packaging import JobPlan
from pipeline.publish import discard_work, replaced_grace
from pipeline.thumbnails import discard_unpublished_sheets

if TYPE_CHECKING:
    from .runtime import Runtime

log = structlog.get_logger(__name__)

T = TypeVar("T")

PROBE = "media.probe"
AUDIO = "media.audio"
SEGMENT = "media.segment"
ENCRYPT = "media.encrypt"
PLAYLIST = "media.playlist"
DOWNLOAD = "media.download"
TRICKPLAY = "media.trickplay"
UPLOAD = "media.upload"
INVALIDATE = "media.invalidate"
REKEY = "media.rekey"
SHRED = "media.shred"
#: Actors whose first argument is a job id; the others (SHRED) work on an asset.
JOB_ACTORS = frozenset(
    {PROBE, AUDIO, SEGMENT, ENCRYPT, PLAYLIST, DOWNLOAD, TRICKPLAY, UPLOAD, INVALIDATE, REKEY}
)


def chunk_stage(stage: str, chunk: str) -> str:
    """The job-record name of a per-chunk stage: ``segment:c003``."""
    return f"{stage}:{chunk}"


def stage_of(actor_name: str, args: Sequence[Any]) -> str:
    """The job-record stage a message works on: ``segment:c003`` for per-chunk stages."""
    stage = actor_name.removeprefix("media.")
    if actor_name in (SEGMENT, ENCRYPT) and len(args) > 1:
        return chunk_stage(stage, str(args[1]))
    return stage


#: No delivery times: a stage called without a worker (the embedded runner, tests).
NO_DELIVERY: Mapping[str, float] = MappingProxyType({})
#: When the message this worker thread handles was enqueued, fetched by its consumer and
#: picked up by the thread (epoch seconds; see :func:`note_delivery`).
_delivery: ContextVar[Mapping[str, float]] = ContextVar("hlsvault_delivery", default=NO_DELIVERY)


def note_delivery(message: Any) -> None:
    """Keep, for :func:`run_stage` to write next to the stage's start, when ``message`` was
    enqueued (dramatiq's ``message_timestamp``, ms), fetched (``fetched_at``, stamped by
    :class:`workers.broker.WakingConsumer`) and picked up by this thread (now): where a hop
    between two stages spends its time."""
    times = {"enqueued_at": int(message.message_timestamp) / 1000, "picked_at": time.time()}
    fetched = getattr(message, "fetched_at", None)
    if isinstance(fetched, float):
        times["fetched_at"] = fetched
    _delivery.set(MappingProxyType(times))


def delivery() -> Mapping[str, float]:
    """The delivery times :func:`note_delivery` kept for this thread's message, if any."""
    return _delivery.get()


def forget_delivery() -> None:
    _delivery.set(NO_DELIVERY)


def worker_name() -> str:
    """Which process ran a stage, as the job record keeps it: ``host:pid``."""
    return f"{socket.gethostname()}:{os.getpid()}"


def start(rt: Runtime, spec: JobSpec) -> None:
    """Record a new job and enqueue its first stage."""
    rt.services.jobs.create(spec)
    first, actor = ("rekey", REKEY) if spec.kind == "rekey" else ("probe", PROBE)
    rt.services.jobs.stage_queued(spec.job_id, first)
    rt.send(actor, spec.job_id)


def run_stage(rt: Runtime, job_id: str, stage: str, work: Callable[[JobSpec], T]) -> T | None:
    """Run one stage's domain function with the job record kept up to date.

    Returns None when the stage must not continue: the job already ended (failed, cancelled),
    was found poison, or failed here for a reason retrying cannot mend (any error of the tree
    but a transient one). Transient errors propagate, so dramatiq retries the message with
    backoff; anything outside the tree (a bug) too, and fails the job once retries run out.
    """
    svc = rt.services
    record = svc.jobs.get(job_id)
    if record.done:
        log.info("job already ended; stage skipped", stage=stage, status=record.status)
        if record.status == "cancelled":
            discard_work(svc, job_id)
        return None
    # Which process took it, too: chunks of one job run on many workers at once.
    attempts = svc.jobs.stage_started(
        job_id, stage, worker=worker_name(), delivery=delivery()
    )
    if attempts > svc.settings.max_deliveries:
        reason = str(
            PoisonJob(
                f"{stage} was delivered {attempts} times without finishing (its worker keeps "
                "dying); inspect the source, then resubmit"
            )
        )
        fail(rt, job_id, stage, reason)
        return None
    started = time.monotonic()
    try:
        result = work(record.spec)
    except TransientError:
        raise  # dramatiq retries the message with backoff, a bounded number of times
    except HlsvaultError as error:
        # Everything else in the tree (permanent, not found, refused, misconfigured) fails the
        # same way the next time: the job fails now, with the reason.
        fail(rt, job_id, stage, redact_text(str(error)))
        return None
    svc.jobs.stage_finished(job_id, stage)
    log.info("stage done", stage=stage, attempt=attempts,
             seconds=round(time.monotonic() - started, 3))
    return result


def fail(rt: Runtime, job_id: str, stage: str, reason: str) -> None:
    """The one way a job fails: the record says where and why, and its scratch is discarded
    (nothing else will ever read it; a retry is a new job)."""
    log.warning("job failed", stage=stage, reason=reason)
    rt.services.jobs.fail(job_id, stage, reason)
    spec = rt.services.jobs.get(job_id).spec
    # Sheets are clear pictures uploaded before the publish: not left under a version that
    # will never be named (the publish refused after a revocation, an upload gave up).
    try:
        discard_unpublished_sheets(rt.services, spec.asset, spec.version)
    except HlsvaultError as error:
        log.warning("the failed job's thumbnail sheets could not be deleted; a revocation "
                    "of the asset deletes them", reason=redact_text(str(error)))
    discard_work(rt.services, job_id)


def progress(rt: Runtime, job_id: str, stage: str) -> Callable[[float], None]:
    def report(fraction: float) -> None:
        # The end is written with the stage's finish (stage_finished), in the same round trip.
        if fraction < 1.0:
            rt.services.jobs.stage_progress(job_id, stage, fraction)

    return report


def after_probe(rt: Runtime, job_id: str, plan: JobPlan) -> None:
    jobs = rt.services.jobs
    names = [chunk.name for chunk in plan.chunks]
    jobs.set_json(job_id, "chunk_names", names)
    # An audio group (separate renditions, cut whole) is cut beside the chunks, which do not
    # need it, and joins their fan-in: the playlist waits for it as for the last chunk.
    group = plan.audio_first and not plan.audio_bitrates
    jobs.set_pending(job_id, "encrypt", len(names) + (1 if group else 0))
    if plan.audio_first:
        jobs.stage_queued(job_id, "audio")
        rt.send(AUDIO, job_id)
    if not plan.audio_bitrates:
        # Muxed audio encoded once releases its chunks itself (:func:`audio_released`).
        send_chunks(rt, job_id, names)


def audio_released(rt: Runtime, job_id: str, chunk: str, again: bool) -> None:
    """The audio stage released ``chunk``'s audio: its segment message goes now. A chunk an
    earlier delivery released is sent again only if its segment stage has not finished (that
    delivery may have died between the release and the send; a duplicate segment message is
    safe, a lost one would stall the job)."""
    if again:
        state = rt.services.jobs.get(job_id).stage(chunk_stage("segment", chunk))
        if state is not None and state.status == "done":
            return
    send_chunks(rt, job_id, [chunk])


def after_audio(rt: Runtime, job_id: str) -> None:
    """Muxed audio released every chunk as it went (:func:`audio_released`); an audio group
    arrives at the chunks' fan-in."""
    if not rt.services.jobs.get(job_id).json_field("audio_bitrates"):
        _arrive(rt, job_id, "audio")


def send_chunks(rt: Runtime, job_id: str, names: list[str]) -> None:
    """Fan out: one segment message per chunk, any segment worker may take any of them."""
    rt.services.jobs.stage_queued(job_id, *(chunk_stage("segment", n) for n in names))
    for name in names:
        rt.send(SEGMENT, job_id, name)


def after_segment(rt: Runtime, job_id: str, chunk: str) -> None:
    # Encrypted at once: only the last chunk's encryption is left when the last chunk is cut.
    rt.services.jobs.stage_queued(job_id, chunk_stage("encrypt", chunk))
    rt.send(ENCRYPT, job_id, chunk)


def after_encrypt(rt: Runtime, job_id: str, chunk: str) -> None:
    _arrive(rt, job_id, chunk)


def _arrive(rt: Runtime, job_id: str, member: str) -> None:
    # Fan-in on the record's atomic counter: the last chunk (or audio group) to finish
    # enqueues the playlist. (A dramatiq group callback would never fire if one child failed
    # for good.)
    if rt.services.jobs.arrive(job_id, "encrypt", member) == 0:
        rt.services.jobs.stage_queued(job_id, "playlist")
        rt.send(PLAYLIST, job_id)


def after_rekey(rt: Runtime, spec: JobSpec) -> None:
    # The rekey stage leaves what segment, encrypt and playlist would have: publish it.
    after_playlist(rt, spec)


def after_playlist(rt: Runtime, spec: JobSpec) -> None:
    # A download is made from what encrypt left and the playlist stage described, before the
    # upload publishes the version (so a published version's download is always there). The
    # spec is the one the stage ran with (run_stage read it): no second read of the record.
    if spec.download is not None:
        rt.services.jobs.stage_queued(spec.job_id, "download")
        rt.send(DOWNLOAD, spec.job_id)
        return
    after_download(rt, spec)


def after_download(rt: Runtime, spec: JobSpec) -> None:
    # Trick play after the download: the download is made from a description without it.
    if spec.trick_play:
        rt.services.jobs.stage_queued(spec.job_id, "trickplay")
        rt.send(TRICKPLAY, spec.job_id)
        return
    after_trickplay(rt, spec.job_id)


def after_trickplay(rt: Runtime, job_id: str) -> None:
    rt.services.jobs.stage_queued(job_id, "upload")
    rt.send(UPLOAD, job_id)


def after_upload(rt: Runtime, job_id: str, published: dict[str, Any]) -> None:
    rt.services.jobs.stage_queued(job_id, "invalidate", json_fields={"published": published})
    rt.send(INVALIDATE, job_id)


def after_invalidate(rt: Runtime, job_id: str, outcome: dict[str, Any]) -> None:
    svc = rt.services
    if outcome["status"] in ("skipped", "failed"):
        svc.jobs.stage_finished(
            job_id, "invalidate", status=outcome["status"], detail=outcome["reason"]
        )
    record = svc.jobs.get(job_id)
    if outcome["status"] == "failed":
        warning = f"published, but the CDN invalidation failed: {outcome['reason']}"
        svc.jobs.set_json(job_id, "warnings", [*(record.json_field("warnings") or []), warning])
    spec = record.spec
    result = dict(record.json_field("published") or {})
    result["invalidation"] = outcome
    replaced = record.json_field("replaced")
    if replaced:
        # The publish retired the version this job replaced (its keys are served for a grace
        # period, then refused); this deletes them once it is over. A lost message only delays
        # the deletion until the next shred of the asset (every re-key and every embedded
        # package sweeps what is due): the key server refuses them regardless.
        grace = replaced_grace(spec)
        result["retired"] = {"version": replaced, "grace_s": grace}
        rt.send(SHRED, spec.asset, delay_ms=int(grace * 1000) + 1000)
    svc.jobs.succeed(job_id, result)
    discard_work(svc, job_id)
    log.info("job published", asset=result.get("asset"), version=result.get("version"))
