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
that enqueues what comes next. A hop's bookkeeping is two round trips to the job record: the
``after_*`` function marks the stage done and the next one queued in one write (or, at the
fan-in, in the arrival itself), and the next stage's start counts its delivery and reads the
record in one script. Messages carry ids only: ``(job_id)`` or ``(job_id, chunk)``.
A stage's hand-on marks the stages after it queued only while they have not started, in the
job record's own atomic write, and sends the messages of those it marked, and no others
(:func:`pipeline.jobs.unstarted`: the one rule, for every hand-on, the fan-in and the audio's
releases). So a redelivered stage (its worker died before the ack, maybe after handing on)
re-sends a stage after it only while it is queued, and two deliveries of one stage running
at once (a stage still queued may get a second message), a first delivery among them, never
mark queued or send again a stage the other's hand-on started. A redelivered stage whose
successor has started (:func:`handed_on`) makes nothing again, since that successor may be
reading what it made, and a member that had arrived at the fan-in does not make its output
again either.
A job fails through :func:`fail` only, whether a stage found a permanent error, a message was
delivered too often, or dramatiq ran out of retries (:class:`workers.middleware.JobOutcome`).
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Callable, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import structlog

from pipeline.errors import HlsvaultError, JobEnded, PoisonJob, TransientError
from pipeline.jobs import JobRecord, JobSpec, pending_field, unstarted
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
#: The job-record mark of a plan whose audio stage runs beside its chunks (older plans ran it
#: before them).
AUDIO_BESIDE = "audio_beside"
SEGMENT = "media.segment"
ENCRYPT = "media.encrypt"
PLAYLIST = "media.playlist"
DOWNLOAD = "media.download"
TRICKPLAY = "media.trickplay"
UPLOAD = "media.upload"
INVALIDATE = "media.invalidate"
REKEY = "media.rekey"
SHRED = "media.shred"
#: The fan-in the playlist waits on (its counter, ``pending.encrypt``), and the audio group's
#: name among its members (the chunks are the others).
FAN_IN = "encrypt"
AUDIO_MEMBER = "audio"
#: Actors whose first argument is a job id; the others (SHRED) work on an asset.
JOB_ACTORS = frozenset(
    {PROBE, AUDIO, SEGMENT, ENCRYPT, PLAYLIST, DOWNLOAD, TRICKPLAY, UPLOAD, INVALIDATE, REKEY}
)


#: What a stage's actor name adds to its job-record name.
_ACTOR_PREFIX = "media."


def chunk_stage(stage: str, chunk: str) -> str:
    """The job-record name of a per-chunk stage: ``segment:c003``."""
    return f"{stage}:{chunk}"


def stage_of(actor_name: str, args: Sequence[Any]) -> str:
    """The job-record stage a message works on: ``segment:c003`` for per-chunk stages."""
    stage = actor_name.removeprefix(_ACTOR_PREFIX)
    if actor_name in (SEGMENT, ENCRYPT) and len(args) > 1:
        return chunk_stage(stage, str(args[1]))
    return stage


def send_stage(rt: Runtime, job_id: str, stage: str) -> None:
    """Send the message that runs the job-record stage ``stage`` (:func:`stage_of`'s
    inverse): ``segment:c003`` is ``media.segment(job_id, "c003")``."""
    name, _, chunk = stage.partition(":")
    rt.send(_ACTOR_PREFIX + name, job_id, *((chunk,) if chunk else ()))


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
    """Record a new job, its first stage queued, and enqueue that stage."""
    first, actor = ("rekey", REKEY) if spec.kind == "rekey" else ("probe", PROBE)
    rt.services.jobs.create(spec, queued=(first,))
    rt.send(actor, spec.job_id)


@dataclass(frozen=True)
class Ran(Generic[T]):
    """A stage that ran: its name, the job record as its start read it, and what its domain
    function returned. The stage is not marked done yet: the ``after_*`` function that says
    what runs next does so, in the write that queues it."""

    stage: str
    record: JobRecord
    result: T

    @property
    def job_id(self) -> str:
        return self.record.spec.job_id

    @property
    def spec(self) -> JobSpec:
        return self.record.spec


def run_stage(
    rt: Runtime, job_id: str, stage: str, work: Callable[[JobRecord], T]
) -> Ran[T] | None:
    """Run one stage's domain function (given the job record as the stage's start read it)
    with the job record kept up to date; the caller's ``after_*`` marks it done.

    Returns None when the stage must not continue: the job already ended (failed, cancelled),
    was found poison, or failed here for a reason retrying cannot mend (any error of the tree
    but a transient one), its spec unreadable included. Transient errors propagate, so
    dramatiq retries the message with backoff (a spec naming an option this worker does not
    know among them: a newer worker may take it); anything outside the tree (a bug) too, and
    fails the job once retries run out.
    """
    svc = rt.services
    # Which process took it, too: chunks of one job run on many workers at once.
    attempts, record = svc.jobs.begin_stage(
        job_id, stage, worker=worker_name(), delivery=delivery()
    )
    if record.done:
        _job_ended(rt, job_id, stage, record.status, "job already ended; stage skipped")
        return None
    try:
        # Before the delivery count too: a spec a newer worker can run is not poison.
        spec = record.spec
    except TransientError:
        raise
    except HlsvaultError as error:
        fail(rt, job_id, stage, redact_text(str(error)), record=record)
        return None
    if handed_on(record, stage):
        # An earlier delivery finished and handed on, and the stage after it started: that
        # stage may be reading what this one made, so nothing is made again; only this
        # stage's end is written again (its start above marked it running), sending nothing.
        # Before the delivery count: a stage that finished is not poison.
        log.info("stage handed on already; redelivery does nothing", stage=stage)
        hand_on(rt, Ran(stage, record, None), *handed_to(spec, stage))
        return None
    if attempts > svc.settings.max_deliveries:
        reason = str(
            PoisonJob(
                f"{stage} was delivered {attempts} times without finishing (its worker keeps "
                "dying); inspect the source, then resubmit"
            )
        )
        fail(rt, job_id, stage, reason, record=record)
        return None
    started = time.monotonic()
    try:
        result = work(record)
    except TransientError:
        raise  # dramatiq retries the message with backoff, a bounded number of times
    except JobEnded:
        # The job ended while the stage ran (the stage has discarded what it made): as at
        # the start, no failure of the stage, whatever the job's end.
        _job_ended(rt, job_id, stage, svc.jobs.get(job_id).status,
                   "job ended while the stage ran; stage stopped")
        return None
    except HlsvaultError as error:
        # Everything else in the tree (permanent, not found, refused, misconfigured) fails the
        # same way the next time: the job fails now, with the reason.
        fail(rt, job_id, stage, redact_text(str(error)), record=record)
        return None
    log.info("stage done", stage=stage, attempt=attempts,
             seconds=round(time.monotonic() - started, 3))
    return Ran(stage, record, result)


def _job_ended(rt: Runtime, job_id: str, stage: str, status: str, event: str) -> None:
    """A delivery of ``stage`` found its job ended (``status``), at its start or while it
    ran: the one rule for both. The record is left as the job's end wrote it, no stage field
    touched (a succeeded job's stage is never marked failed by a late delivery). A cancelled
    job's work is discarded here, since a cancellation is only a write to the record; a
    failed or succeeded job's end discarded its own."""
    log.info(event, stage=stage, status=status)
    if status == "cancelled":
        discard_work(rt.services, job_id)


def waiting(record: JobRecord, stage: str) -> bool:
    """Whether ``stage`` had not started when ``record`` was read (:func:`unstarted`): it got
    no message yet, or one no delivery has picked up."""
    state = record.stage(stage)
    return unstarted(None if state is None else state.status)


def publishing(spec: JobSpec) -> tuple[str, ...]:
    """The stages after the playlist (or a re-key), in order: the download and trick play
    when the job asked for them, then the upload and the CDN invalidation."""
    return (*(("download",) if spec.download is not None else ()),
            *(("trickplay",) if spec.trick_play else ()), "upload", "invalidate")


def handed_to(spec: JobSpec, stage: str) -> tuple[str, ...]:
    """The one stage ``stage`` hands on to, if it hands on to one: a chunk's segment stage
    to its encryption, the playlist (or a re-key) and each stage after it to the next of
    :func:`publishing`. Nothing for the others: the probe and the audio fan out, an encryption
    arrives at the fan-in (:func:`arrived` decides its redelivery), the invalidation ends
    the job."""
    name, _, chunk = stage.partition(":")
    if name == "segment" and chunk:
        return (chunk_stage("encrypt", chunk),)
    after = publishing(spec)
    if stage in ("playlist", "rekey"):
        return after[:1]
    if stage in after:
        return after[after.index(stage) + 1 :][:1]
    return ()


def handed_on(record: JobRecord, stage: str) -> bool:
    """Whether an earlier delivery of ``stage`` had handed on and the stage it handed on to
    had started when ``record`` was read: the one rule by which a redelivery makes nothing
    again (:func:`run_stage`), checked once, when the delivery starts. A redelivery that
    finds that stage only queued makes its output again and re-sends it (the earlier delivery
    may have died before its send); should the next stage start meanwhile, it reads either
    the earlier output or the same output rewritten, each file replaced whole. What a
    chunk's segment stage and the audio stage make is the exception: the first delivery to
    name its attempt wins (:meth:`~pipeline.jobs.JobStore.claim_output`), so a redelivered
    segment stage, or audio group, that finds its output named cuts nothing and re-sends
    only what is still queued. Muxed audio encoded once hands on to no stage of its own: a
    redelivery encodes it again until every chunk's audio is released
    (:func:`~pipeline.packaging.encode_audio`), and discards its pieces of the chunks an
    earlier delivery released."""
    return any(not waiting(record, after) for after in handed_to(record.spec, stage))


def hand_on(
    rt: Runtime, ran: Ran[Any], *queued: str, json_fields: Mapping[str, Any] | None = None
) -> None:
    """Mark ``ran``'s stage done, those of the ``queued`` stages that have not started
    queued, and those of ``json_fields`` the record does not have yet, in one write
    (:meth:`~pipeline.jobs.JobStore.stage_finished`), then send the messages of the stages it
    marked (:func:`send_stage`): a hand-on that an earlier or a concurrent delivery of the
    same stage made already re-sends only what is still queued, and rewrites none of the
    fields (the stages after may have read them: the fan-in's count above all)."""
    marked = rt.services.jobs.stage_finished(ran.job_id, ran.stage, queued=queued,
                                             json_fields=json_fields)
    for stage in marked:
        send_stage(rt, ran.job_id, stage)


def fail(
    rt: Runtime, job_id: str, stage: str, reason: str, *, record: JobRecord | None = None
) -> None:
    """The one way a job fails: the record says where and why, and its scratch is discarded
    (nothing else will ever read it; a retry is a new job). ``record``: the job's, when the
    caller has read it already; a spec this worker cannot read (a newer submitter's option,
    a damaged record) fails the job all the same, only its thumbnail sheets are left."""
    log.warning("job failed", stage=stage, reason=reason)
    rt.services.jobs.fail(job_id, stage, reason)
    try:
        spec = (record or rt.services.jobs.get(job_id)).runnable_spec
        if spec is None:
            # It names no version this worker can trust to look under; a newer worker may
            # have made sheets under the one it names.
            log.info("the failed job's spec cannot be read here, so thumbnail sheets made "
                     "for it, if any, are left; a revocation of the asset deletes them")
        else:
            # Sheets are clear pictures uploaded before the publish: not left under a
            # version that will never be named (the publish refused after a revocation, an
            # upload gave up).
            discard_unpublished_sheets(rt.services, spec.asset, spec.version)
    except HlsvaultError as error:
        log.warning("the failed job's thumbnail sheets could not be deleted; a revocation "
                    "of the asset deletes them", reason=redact_text(str(error)))
    finally:
        # Whatever reading the record raised (a bug included): the scratch goes all the same.
        discard_work(rt.services, job_id)


def progress(rt: Runtime, job_id: str, stage: str) -> Callable[[float], None]:
    def report(fraction: float) -> None:
        # The end is written with the stage's finish (stage_finished), in the same round trip.
        if fraction < 1.0:
            rt.services.jobs.stage_progress(job_id, stage, fraction)

    return report


def after_probe(rt: Runtime, ran: Ran[JobPlan]) -> None:
    plan = ran.result
    names = [chunk.name for chunk in plan.chunks]
    fields: dict[str, Any] = {"chunk_names": names}
    # An audio group (separate renditions, cut whole) is cut beside the chunks, which do not
    # need it, and joins their fan-in: the playlist waits for it as for the last chunk.
    group = plan.audio_first and not plan.audio_bitrates
    # The fan-in counter, with the plan: set before any chunk can arrive (and never again:
    # a redelivered probe's hand-on leaves it as the chunks have counted it down).
    fields[pending_field(FAN_IN)] = len(names) + (1 if group else 0)
    if not plan.audio_first:
        send_chunks(rt, ran, names, json_fields=fields)
        return
    fields[AUDIO_BESIDE] = True
    # Muxed audio encoded once releases its chunks itself (:func:`audio_released`).
    chunks = [] if plan.audio_bitrates else names
    hand_on(rt, ran, "audio", *(chunk_stage("segment", n) for n in chunks), json_fields=fields)


def audio_released(rt: Runtime, job_id: str, chunk: str) -> None:
    """The audio stage released ``chunk``'s audio: its segment message goes now, unless its
    segment stage has started. A chunk an earlier delivery released is sent again while its
    segment stage is still queued (that delivery may have died between the release and the
    send; a lost message would stall the job, while a started one is redelivered by the
    broker itself)."""
    stage = chunk_stage("segment", chunk)
    for marked in rt.services.jobs.stage_queued(job_id, stage):
        send_stage(rt, job_id, marked)


def arrived(record: JobRecord, member: str) -> bool:
    """Whether an earlier delivery of ``member``'s stage (a chunk's encryption, the audio
    group) had arrived at the chunks' fan-in when ``record`` was read: what it made is
    complete and named, and the playlist may be reading it, so a redelivery does not make it
    again (its actor skips the work) and its arrival counts nothing (:func:`_arrive`)."""
    return record.arrived(FAN_IN, member)


def after_audio(rt: Runtime, ran: Ran[Any]) -> None:
    """Muxed audio released every chunk as it went (:func:`audio_released`); an audio group
    arrives at the chunks' fan-in, once. (A job planned before audio groups ran beside the
    chunks has no ``audio_beside`` mark: its chunks are sent now, as they were then.)"""
    record = ran.record
    if record.json_field("audio_bitrates"):
        hand_on(rt, ran)
    elif record.json_field(AUDIO_BESIDE):
        _arrive(rt, ran, AUDIO_MEMBER)
    else:
        send_chunks(rt, ran, record.json_field("chunk_names"))


def send_chunks(
    rt: Runtime, ran: Ran[Any], names: list[str], json_fields: Mapping[str, Any] | None = None
) -> None:
    """Fan out: one segment message per chunk, any segment worker may take any of them."""
    hand_on(rt, ran, *(chunk_stage("segment", n) for n in names), json_fields=json_fields)


def after_segment(rt: Runtime, ran: Ran[Any], chunk: str) -> None:
    # Encrypted at once: only the last chunk's encryption is left when the last chunk is cut.
    # (The chunk's attempt is never switched once named: the first delivery's stands.)
    hand_on(rt, ran, *handed_to(ran.spec, ran.stage))


def after_encrypt(rt: Runtime, ran: Ran[Any], chunk: str) -> None:
    _arrive(rt, ran, chunk)


def _arrive(rt: Runtime, ran: Ran[Any], member: str) -> None:
    """Fan-in on the record's atomic counter: the last chunk (or audio group) to finish sends
    the playlist. (A dramatiq group callback would never fire if one child failed for good.)
    The stage's end and the playlist's queued mark are written in the arrival's own step.

    A redelivered member counts nothing; after the last arrival it sends the playlist again
    only while that is still queued (the last arrival may have died before its send), never
    once it has started: the arrival's step decides, and names what to send."""
    arrival = rt.services.jobs.arrive(ran.job_id, FAN_IN, member, finished=ran.stage,
                                      then_queued=("playlist",))
    for stage in arrival.queued:
        send_stage(rt, ran.job_id, stage)


def after_rekey(rt: Runtime, ran: Ran[Any]) -> None:
    # The rekey stage leaves what segment, encrypt and playlist would have: publish it.
    after_playlist(rt, ran)


def after_playlist(rt: Runtime, ran: Ran[Any]) -> None:
    # A download is made from what encrypt left and the playlist stage described, before the
    # upload publishes the version (so a published version's download is always there); trick
    # play after the download, which is made from a description without it (publishing). The
    # spec is the one the stage ran with (its start read it): no second read of the record.
    hand_on(rt, ran, *handed_to(ran.spec, ran.stage))


after_download = after_trickplay = after_playlist


def after_upload(rt: Runtime, ran: Ran[dict[str, Any]]) -> None:
    hand_on(rt, ran, *handed_to(ran.spec, ran.stage), json_fields={"published": ran.result})


def after_invalidate(rt: Runtime, ran: Ran[dict[str, Any]]) -> None:
    # The record as this stage's start read it holds all the job wrote before: what the upload
    # published and replaced, and every warning.
    svc = rt.services
    outcome = ran.result
    record = ran.record
    status, detail = "done", None
    if outcome["status"] in ("skipped", "failed"):
        status, detail = outcome["status"], outcome["reason"]
    ended = svc.jobs.finished_fields(ran.stage, status=status, detail=detail)
    if outcome["status"] == "failed":
        warning = f"published, but the CDN invalidation failed: {outcome['reason']}"
        ended["warnings"] = json.dumps([*(record.json_field("warnings") or []), warning])
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
    if not svc.jobs.succeed(ran.job_id, result, fields=ended):
        # Cancelled meanwhile: the job stays so, and the stage's own end is still written.
        svc.jobs.stage_finished(ran.job_id, ran.stage, status=status, detail=detail)
    discard_work(svc, ran.job_id)
    log.info("job published", asset=result.get("asset"), version=result.get("version"))
