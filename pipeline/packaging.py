"""The stages of packaging, as plain functions over :class:`~pipeline.services.Services`.

Each stage reads what the previous one left in the work store under ``jobs/<job_id>/`` (the
layout is :mod:`pipeline.layout`'s) and a stage delivered twice leaves the same result.

A transcode is cut into time chunks (:func:`pipeline.plan.plan_chunks`); the segment and
encrypt stages work on one chunk of every rendition, the playlist stage joins the chunks. A
segment attempt writes into a directory of its own and then names it in its chunk's
``produced`` output (beside the job record, :func:`pipeline.layout.produced_output`) with one
atomic claim, so a redelivered chunk that overlaps a still-running encrypt of the same chunk
can never hand it a half-written segment: encrypt reads only the attempt that output names,
and that attempt is complete. A chunk's segments carry their media sequence numbers in their
names. The audio stage's pieces are named per chunk, by the chunk's ``audio`` output, and
its audio group by the job's ``audio.group`` output. Each of these outputs is claimed
(:func:`_claim`): of deliveries running at once, the first to name its attempt wins
(:meth:`~pipeline.jobs.JobStore.claim_output`) and the others discard theirs, so what a later
stage may have read is never switched, and a delivery finding the output at its start makes
nothing again. A claim after the job ended is refused (the job's end dropped its outputs with
its work), and the delivery discards its attempt and stops (:class:`~pipeline.errors.JobEnded`).

The segment stage seals its segments while ffmpeg writes them (:mod:`pipeline.sealing`), a
remux's and a transcode's, whatever the container and wherever the audio: its ``produced``
output then says so, and encrypt only links them into place.
"""

from __future__ import annotations

import contextvars
import os
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeGuard, TypeVar

import structlog

from . import aes, headstart, layout
from .audio import (
    WHOLE_PATTERN,
    ChunkAudio,
    ChunkCutter,
    ChunkReleases,
    ReleasedAudio,
    audio_args,
    check_audio_covers,
)
from .crypto import SegmentFile, encrypt_files, encrypt_files_in_place, iv_for_sequence
from .errors import (
    BadSpec,
    ConfigurationError,
    InvalidSource,
    JobEnded,
    PermanentError,
    UnsupportedMedia,
)
from .jobs import JobRecord, JobSpec
from .media import MediaInfo, probe
from .plan import (
    AudioRendition,
    Chunk,
    Rendition,
    plan_audio,
    plan_chunks,
    plan_renditions,
    separate_audio,
)
from .playlists import (
    AssetVersion,
    RenditionEntry,
    describe_rendition,
    key_index,
)
from .records import an_object, each_known, from_known, required, unreadable
from .sealing import ENCODE_POLL_S, POLL_S, REMUX_BATCH, SegmentSealer
from .segment import (
    DEFAULT_AUDIO_KBPS,
    PROGRESS_INTERVAL_S,
    AudioPiece,
    Segment,
    SegmentedRendition,
    run_ffmpeg,
    segment_audio_renditions,
    segment_chunk,
)
from .services import Services
from .sources import ffmpeg_target, source_demuxer
from .subtitles import (
    SubtitleTrack,
    measured_timestamp_map,
    prepare_subtitles,
    subtitle_rendition,
)
from .workuploads import AttemptUploads

log = structlog.get_logger(__name__)

#: Threads that encrypt a chunk's segments, each several at once (pipeline.crypto.encrypt_files).
#: The cipher releases the GIL, so each thread keeps a core busy; capped because chunks are
#: encrypted side by side too.
ENCRYPT_THREADS = min(os.cpu_count() or 1, 4)

#: Sealed segments (a chunk's, or the audio group's) placed at once on a remote work store:
#: server-side copies, round trips to S3 and not work for this host.
PLACE_CONCURRENCY = 16
#: The key of a ``produced`` output that marks a chunk sealed (and holds its ciphertext sizes).
SEALED = "sealed"

#: No ffmpeg of a stage runs longer: below the segment actor's 12 h time limit, which cannot
#: interrupt a thread waiting on a process.
MAX_FFMPEG_S = 11 * 3600.0

Progress = Callable[[float], None]


def no_progress(_: float) -> None:
    pass


def rate_limited(on_progress: Progress) -> Progress:
    """``on_progress`` called at most every PROGRESS_INTERVAL_S, and always for 1.0: each call
    is a job-record write, and a stage of many small segments would otherwise make hundreds."""
    last = 0.0

    def report(fraction: float) -> None:
        nonlocal last
        now = time.monotonic()
        if fraction >= 1.0 or now - last >= PROGRESS_INTERVAL_S:
            last = now
            on_progress(fraction)

    return report


def segment_timeout(duration: float, copy: bool, renditions: int = 1) -> float:
    """ffmpeg's own time limit: a remux reads at disk speed, a transcode of each rendition may
    be slower than real time on a small machine (a chunk encodes them all, on one core when
    workers are pinned). Always shorter than the segment actor's time limit."""
    return min(MAX_FFMPEG_S, 120 + duration * (1.0 if copy else 6.0 * renditions))


@dataclass(frozen=True)
class JobPlan:
    """What the probe decided: the renditions, the time chunks, and whether the job's audio
    has a stage of its own: a transcode of several chunks with muxed audio (encoded once, the
    chunks released as it goes: pieces by bitrate), or separate audio renditions (an audio
    group, cut whole beside the chunks)."""

    renditions: tuple[Rendition, ...]
    chunks: tuple[Chunk, ...]
    audio_bitrates: tuple[int, ...]
    audio_renditions: tuple[AudioRendition, ...] = ()

    @property
    def audio_first(self) -> bool:
        # A job of one chunk cuts its audio renditions in the chunk's own ffmpeg (one read of
        # the source); a chunked one cuts them whole, once, in a stage of its own.
        return bool(self.audio_bitrates) or (bool(self.audio_renditions) and len(self.chunks) > 1)


#: The probe stage's whole time limit (workers.actors makes its actors' limit from it), and
#: what the stage keeps back from it after reading the source's text tracks: recording the
#: plan, and a stopped ffmpeg's exit.
PROBE_STAGE_S = 10 * 60.0
PROBE_MARGIN_S = 60.0


def probe_source(svc: Services, spec: JobSpec) -> JobPlan:
    """Probe the source and plan its renditions and chunks; all are kept in the job record."""
    deadline = time.monotonic() + PROBE_STAGE_S - PROBE_MARGIN_S
    target, shown = ffmpeg_target(spec.source)
    info = probe(target, shown=shown)
    renditions = plan_renditions(info, spec.ladder, spec.segment_seconds, spec.codec)
    copy = any(r.copy for r in renditions)
    chunks = plan_chunks(
        info.duration, spec.segment_seconds, svc.settings.chunk_seconds, copy=copy
    )
    if spec.audio_only and not info.audio_tracks:
        raise UnsupportedMedia("--audio-only: the source has no audio track to offer alone")
    separate = separate_audio(info, spec.container, spec.audio_only)
    if separate and spec.download is not None:
        raise BadSpec(
            f"--download: this source's {len(info.audio_tracks)} audio tracks become "
            "renditions of their own, and downloads are made from muxed audio only; package "
            "it without --download"
        )
    audio = tuple(plan_audio(info, spec.ladder)) if separate else ()
    bitrates: tuple[int, ...] = ()
    if len(chunks) > 1 and info.audio is not None and not separate:
        bitrates = tuple(sorted({r.audio_kbps or DEFAULT_AUDIO_KBPS for r in renditions}))
        # Refused now, not when the audio stage reaches the chunk past its end.
        check_audio_covers(info.audio, chunks)
    # Text tracks and sidecars are read and checked now: a bad one fails the job before any
    # transcoding.
    subtitles, warnings = prepare_subtitles(svc, spec.job_id, info, target, shown,
                                            spec.subtitles, spec.segment_seconds,
                                            spec.subtitle_names, deadline=deadline)
    planned: dict[str, Any] = {
        "media": info.to_dict(),
        "renditions": [r.to_dict() for r in renditions],
        "chunks": [c.to_dict() for c in chunks],
        "audio_bitrates": list(bitrates),
        "audio_renditions": [a.to_dict() for a in audio],
        "subtitles": [t.to_dict() for t in subtitles],
    }
    if warnings:
        planned["warnings"] = warnings
    svc.jobs.set_json_fields(spec.job_id, planned)  # the whole plan in one write
    return JobPlan(tuple(renditions), tuple(chunks), bitrates, audio)


def _job_renditions(record: JobRecord) -> list[Rendition]:
    return list(each_known(Rendition, record.json_field("renditions") or []))


def job_audio_renditions(record: JobRecord) -> list[AudioRendition]:
    """The separate audio renditions the probe planned (none: audio muxed, or no audio)."""
    return list(each_known(AudioRendition, record.json_field("audio_renditions") or []))


def job_chunks(record: JobRecord) -> list[Chunk]:
    """The chunks the probe planned (one covering the whole source for older records)."""
    planned = record.json_field("chunks")
    if planned is None:
        return [Chunk(0, 0.0, None, 0, None)]
    return list(each_known(Chunk, planned))


def _audio_bitrates(record: JobRecord) -> list[int]:
    """The bitrates the probe planned the job's audio at, encoded once for every chunk (none:
    each chunk encodes its own audio, or there is none)."""
    planned = record.json_field("audio_bitrates") or []
    if not _whole_numbers(planned):
        raise unreadable(JobPlan, "'audio_bitrates' is not a list of whole numbers")
    return list(planned)


def _chunk(record: JobRecord, name: str) -> Chunk:
    index = layout.chunk_index(name)
    chunks = job_chunks(record)
    if index >= len(chunks):
        raise InvalidSource(f"the job has no chunk {name}; it was planned with {len(chunks)}")
    return chunks[index]


def _media(record: JobRecord) -> MediaInfo:
    data = record.json_field("media")
    if data is None:
        raise InvalidSource("the job has no probe result; it must be probed before segmenting")
    return MediaInfo.from_dict(data)


@contextmanager
def _work_dir(svc: Services, prefix: str) -> Iterator[tuple[Path, bool]]:
    """A local directory for ``prefix`` in the work store: the store's own when it is local,
    else a temporary one, whose files the stage uploads, removed however the stage ends (a
    segment host would otherwise keep a film's worth of plain segments per rendition)."""
    local = svc.work.local_dir(prefix)
    if local is not None:
        yield local, True
        return
    with tempfile.TemporaryDirectory(prefix="hlsvault-") as scratch:
        yield Path(scratch), False


@dataclass(frozen=True)
class ChunkAttempt:
    """A chunk's ``produced`` output: the segment attempt that won (the first to claim it),
    what it produced by rendition, and, when it was sealed, each rendition's ciphertext sizes
    (encrypt then only places its segments)."""

    attempt: str
    produced: dict[str, SegmentedRendition]
    sealed: dict[str, list[int]] | None = None

    def to_dict(self) -> dict[str, Any]:
        record: dict[str, Any] = {
            "attempt": self.attempt,
            "produced": {name: r.to_dict() for name, r in self.produced.items()},
        }
        if self.sealed is not None:
            record[SEALED] = self.sealed
        return record

    @classmethod
    def from_dict(cls, data: Any) -> ChunkAttempt:
        produced = _renditions_of(cls, required(cls, data, "produced"))
        sealed = data.get(SEALED)
        return from_known(cls, data, produced=produced,
                          sealed=None if sealed is None else _sizes_of(cls, sealed, produced))


@dataclass(frozen=True)
class AudioGroupAttempt:
    """The job's ``audio.group`` output: the audio group's attempt that won (the first to
    claim it), its renditions and their ciphertext sizes."""

    attempt: str
    produced: dict[str, SegmentedRendition]
    sizes: dict[str, list[int]]

    def to_dict(self) -> dict[str, Any]:
        return {"attempt": self.attempt,
                "produced": {name: r.to_dict() for name, r in self.produced.items()},
                "sizes": self.sizes}

    @classmethod
    def from_dict(cls, data: Any) -> AudioGroupAttempt:
        produced = _renditions_of(cls, required(cls, data, "produced"))
        return from_known(cls, data, produced=produced,
                          sizes=_sizes_of(cls, required(cls, data, "sizes"), produced))


@dataclass(frozen=True)
class ChunkSizes:
    """A chunk's ``sizes`` output, its encryption's: each rendition's ciphertext sizes."""

    sizes: dict[str, list[int]]

    @classmethod
    def from_dict(cls, data: Any, produced: Mapping[str, SegmentedRendition]) -> ChunkSizes:
        return cls(_sizes_of(cls, data, produced))


def _renditions_of(cls: type, data: Any) -> dict[str, SegmentedRendition]:
    """What an attempt produced (``data``, in a ``cls`` record), by rendition."""
    return {name: SegmentedRendition.from_dict(item)
            for name, item in an_object(cls, data).items()}


def _sizes_of(
    cls: type, data: Any, produced: Mapping[str, SegmentedRendition]
) -> dict[str, list[int]]:
    """Ciphertext sizes (``data``, in a ``cls`` record): for each rendition of ``produced``,
    one whole number per media segment."""
    sizes = an_object(cls, data)
    for name, rendition in produced.items():
        lengths = sizes.get(name)
        if not _whole_numbers(lengths) or len(lengths) != len(rendition.segments):
            raise unreadable(cls, f"no size for each segment of {name[:64]!r}")
    return {name: list(sizes[name]) for name in produced}


def _whole_numbers(values: Any) -> TypeGuard[list[int]]:
    # bool is an int to isinstance, never to JSON
    return isinstance(values, list) and all(type(value) is int for value in values)


#: An attempt's record, as a job output names the one that won.
Attempt = TypeVar("Attempt", ChunkAttempt, AudioGroupAttempt, ReleasedAudio)


def _standing(svc: Services, spec: JobSpec, output: str, cls: type[Attempt]) -> Attempt | None:
    """The attempt the job's ``output`` names, if it names one yet."""
    found = svc.jobs.outputs(spec.job_id, [output])
    return cls.from_dict(found[output]) if output in found else None


def _claim(
    svc: Services, spec: JobSpec, output: str, mine: Attempt, discard: Sequence[str]
) -> Attempt:
    """Name this delivery's attempt, ``mine``, in the job's ``output`` unless a delivery
    running at once named its own there first, and return the attempt that stands: the
    first claim wins (:meth:`~pipeline.jobs.JobStore.claim_output`), so what a later stage
    may have read is never switched. When another's stands, or the job has ended
    (:class:`~pipeline.errors.JobEnded`, raised: nothing is claimed), this attempt's files
    (the work-store keys and directories ``discard``) are deleted: nothing will ever read
    them."""
    try:
        stands = svc.jobs.claim_output(spec.job_id, output, mine.to_dict())
    except JobEnded:
        _discard(svc, discard)
        raise
    won = type(mine).from_dict(stands)
    if won.attempt != mine.attempt:
        log.info("another delivery named its attempt first; this one's is discarded",
                 output=output, attempt=mine.attempt, won=won.attempt)
        _discard(svc, discard)
    return won


def _discard(svc: Services, keys: Sequence[str]) -> None:
    """Delete an attempt's files that nothing will read: each of ``keys``, a directory's
    (ending in "/") with whatever is under it, or a file's. A file's key deletes it only on a
    local store: S3's ``delete_prefix`` lists under the key and a "/", so a remote attempt's
    separate files (muxed audio's pieces) wait for the job's end, which deletes its work."""
    for key in keys:
        svc.work.delete_prefix(key)


def _check_not_ended(svc: Services, spec: JobSpec, what: str, discard: Sequence[str]) -> None:
    """Stop a stage (:class:`~pipeline.errors.JobEnded`) whose job was cancelled, failed
    elsewhere or finished while it worked (``what``): the job's end discarded its work files
    and nothing is stored or placed again; this delivery's files (``discard``, as
    :func:`_discard` takes them) are deleted first."""
    if svc.jobs.get(spec.job_id).done:
        _discard(svc, discard)
        raise JobEnded(f"the job ended while {what}")


#: Told the name of each chunk whose audio the audio stage has released, and whether an earlier
#: delivery of the stage had released it already.
Release = Callable[[str, bool], None]


def encode_audio(
    svc: Services, spec: JobSpec, on_progress: Progress = no_progress,
    on_release: Release = lambda chunk, again: None, *, job: JobRecord | None = None,
) -> int:
    """Encode the source's audio once for the whole job, at every bitrate the ladder uses, and
    cut it into each chunk's share (see :mod:`pipeline.audio`), releasing each chunk (its
    pieces in the work store, then its job output, then ``on_release``) as soon as
    the encoder has passed its end, on a thread beside ffmpeg
    (:class:`~pipeline.audio.ChunkReleases`: ``on_release`` is called from that thread);
    returns the pieces written. With separate audio renditions, cut and encrypt those
    instead (:func:`audio_group`).

    A redelivery encodes again but leaves the chunks an earlier delivery released as they
    are: their segment stages may be reading those pieces. The encoder is deterministic (the
    same frames, byte for byte, from the same source: tests/test_chunks.py checks it), so
    chunks released by two deliveries still join frame for frame. ``job``: the job record as
    the stage's start read it (else it is read here)."""
    job = job if job is not None else svc.jobs.get(spec.job_id)
    if job_audio_renditions(job):
        return audio_group(svc, spec, job, on_progress)
    info = _media(job)
    chunks = job_chunks(job)
    bitrates = _audio_bitrates(job)
    outputs = svc.jobs.outputs(spec.job_id, [layout.audio_output(c.name) for c in chunks])
    released_before = {c.name for c in chunks if layout.audio_output(c.name) in outputs}
    if len(released_before) == len(chunks):
        # Every chunk has its audio: a delivery after the last release only reports them.
        for chunk in chunks:
            on_release(chunk.name, True)
        return 0
    target, shown = ffmpeg_target(spec.source)
    attempt = uuid.uuid4().hex[:12]
    prefix = layout.audio_attempt_prefix(spec.job_id, attempt)
    written = 0
    with _work_dir(svc, prefix) as (out_dir, is_local), \
            tempfile.TemporaryDirectory(prefix="hlsvault-") as scratch:
        args = audio_args(target, bitrates, Path(scratch),
                          demuxer=source_demuxer(info.format_name, shown))
        wholes = {kbps: Path(scratch) / WHOLE_PATTERN.format(kbps=kbps) for kbps in bitrates}
        cutter = ChunkCutter(wholes, chunks, out_dir)

        def release(chunk: Chunk, pieces: list[ChunkAudio]) -> None:
            nonlocal written
            # A chunk failed for good, or an operator cancelled the job: its work files are
            # gone, and nothing more is released (ffmpeg is stopped on the way out, and this
            # attempt discarded).
            _check_not_ended(svc, spec, "its audio was being encoded", [])
            pieces_here = [] if not is_local else [
                layout.plain_segment_key(prefix, piece.name) for piece in pieces]
            if chunk.name in released_before:
                # An earlier delivery's pieces stand: this attempt's are never read.
                _discard(svc, pieces_here)
                on_release(chunk.name, True)
                return
            if not is_local:
                for piece in pieces:
                    svc.work.put_file(layout.plain_segment_key(prefix, piece.name),
                                      out_dir / piece.name)
            # The claim, as for segments: the chunk reads this attempt's pieces only, unless
            # a delivery running at once released it first (its segment stage may be reading
            # those): then this attempt's pieces of it are discarded.
            mine = ReleasedAudio(attempt, cutter.sample_rate, tuple(pieces))
            won = _claim(svc, spec, layout.audio_output(chunk.name), mine,
                         [layout.plain_segment_key(prefix, piece.name) for piece in pieces])
            if won.attempt != attempt:
                on_release(chunk.name, True)
                return
            written += len(pieces)
            on_release(chunk.name, False)

        try:
            # Released on a thread of their own: ffmpeg's timeout is the encode's alone, and
            # a release that fails stops it at once.
            with ChunkReleases(cutter, release) as releases:
                run_ffmpeg(args, duration=info.duration, timeout=audio_timeout(info.duration),
                           on_progress=on_progress, check=releases.check)
                releases.finish()
        except JobEnded:
            # ffmpeg has stopped: none of this attempt's pieces will be read.
            _discard(svc, [prefix + "/"])
            raise
        finally:
            cutter.close()
    return written


def audio_group(
    svc: Services, spec: JobSpec, job: JobRecord, on_progress: Progress = no_progress
) -> int:
    """Cut every separate audio rendition whole (one ffmpeg reading the source once), encrypt
    its media segments, and place them where encrypt puts its output; returns the segments
    placed. Audio is a small share of a job's bytes and time, so it is neither chunked nor
    encrypted by a stage of its own.

    Each delivery cuts into an attempt of its own (:func:`_cut_audio_group`) and names it in
    the job's ``audio.group`` output, which the first to finish claims: only the attempt
    that output names is ever placed, by every delivery (a hard link or a copy of the same
    files: the placing is idempotent), so two deliveries running at once never place two
    cuts, and a redelivery after one that claimed and died places that one's. A delivery
    that finds the output at its start cuts nothing."""
    won = _standing(svc, spec, layout.audio_group_output(), AudioGroupAttempt)
    if won is None:
        won = _cut_audio_group(svc, spec, job, lambda fraction: on_progress(fraction * 0.9))
    # Checked before a file is placed, and again after: the job's end discards its work once,
    # and what a delivery placed after that (another delivery finished the job meanwhile)
    # would be left for good.
    _check_not_ended(svc, spec, "its audio was being cut", [])
    files = [(n, file_name) for n, rendition in won.produced.items()
             for file_name in _files_of(rendition)]
    _place_encrypted(svc, spec, layout.audio_attempt_prefix(spec.job_id, won.attempt), files,
                     rate_limited(lambda fraction: on_progress(0.9 + fraction * 0.1)))
    _check_not_ended(svc, spec, "its audio group was being placed",
                     [layout.encrypted_prefix(spec.job_id, name) + "/" for name in won.produced])
    return sum(len(rendition.segments) for rendition in won.produced.values())


def _cut_audio_group(
    svc: Services, spec: JobSpec, job: JobRecord, on_progress: Progress
) -> AudioGroupAttempt:
    """One delivery's cut of the audio group, in an attempt of its own: its media segments
    encrypted in place once ffmpeg has exited, as sealing does (:mod:`pipeline.sealing`),
    with the same keys and IVs, so the bytes are those the encrypt stage would write. On a
    remote work store the attempt is cut into scratch and only its ciphertext (and fMP4's
    clear init segments) is put, never a plain segment. Then the attempt claims the job's
    ``audio.group`` output; returns the output that stands, this attempt's or the one that
    claimed it first (this attempt is then discarded)."""
    info = _media(job)
    planned = job_audio_renditions(job)
    target, _ = ffmpeg_target(spec.source)
    key_for = key_source(svc, spec)
    key_for(0)  # the vault answers before ffmpeg starts, or the stage fails
    attempt = uuid.uuid4().hex[:12]
    prefix = layout.audio_attempt_prefix(spec.job_id, attempt)
    with _work_dir(svc, prefix) as (out_dir, is_local):
        produced = segment_audio_renditions(
            target, planned, out_dir, info=info, segment_seconds=spec.segment_seconds,
            container=spec.container, timeout=audio_timeout(info.duration),
            on_progress=lambda fraction: on_progress(fraction * 0.9),
        )
        _check_not_ended(svc, spec, "its audio was being cut", [prefix + "/"])
        work = [(name, seg) for name, rendition in produced.items() for seg in rendition.segments]
        lengths = encrypt_files_in_place(
            [SegmentFile(out_dir / name / seg.name, out_dir / name / seg.name,
                         key_for(seg.sequence), iv_for_sequence(seg.sequence))
             for name, seg in work],
            threads=ENCRYPT_THREADS,
        )
        if not is_local:
            # Stored before it is named: a delivery told of this attempt places it from there.
            def work_key(rendition: str, file_name: str) -> str:
                return layout.plain_segment_key(f"{prefix}/{rendition}", file_name)

            with AttemptUploads(svc.work, work_key) as uploads:
                uploads.finish((name, out_dir / name / file_name)
                               for name, rendition in produced.items()
                               for file_name in _files_of(rendition))
    on_progress(1.0)
    mine = AudioGroupAttempt(attempt, produced, _sizes_by_rendition(produced, work, lengths))
    return _claim(svc, spec, layout.audio_group_output(), mine, [prefix + "/"])


def _files_of(rendition: SegmentedRendition) -> list[str]:
    """Every file of a rendition's output: its init segment (fMP4) and its media segments."""
    return ([rendition.init] if rendition.init else []) + [s.name for s in rendition.segments]


def audio_timeout(duration: float) -> float:
    """ffmpeg's limit for the audio pass: it reads the whole source but decodes only audio."""
    return min(MAX_FFMPEG_S, 120 + duration * 0.5)


def _chunk_audio(
    svc: Services, spec: JobSpec, job: JobRecord, chunk: Chunk, scratch: Path
) -> dict[int, AudioPiece] | None:
    """The chunk's pieces of the job's audio, by bitrate, fetched into ``scratch`` when the
    work store is not local; None when the chunk encodes its own audio (or has none)."""
    if not _audio_bitrates(job):
        return None
    released = _standing(svc, spec, layout.audio_output(chunk.name), ReleasedAudio)
    if released is None:
        # The audio stage sends a chunk only after it has released the chunk's audio: this
        # job's audio was cut by an older hlsvault, which kept it elsewhere.
        raise PermanentError(
            f"chunk {chunk.name} has no released audio (the job was planned by an older "
            "hlsvault); submit the job again"
        )
    prefix = layout.audio_attempt_prefix(spec.job_id, released.attempt)
    pieces: dict[int, AudioPiece] = {}
    for piece in released.pieces:
        path = svc.work.local_path(f"{prefix}/{piece.name}")
        if path is None:
            path = scratch / piece.name
            svc.work.get_file(f"{prefix}/{piece.name}", path)
        pieces[piece.kbps] = AudioPiece(path, piece.offset)
    return pieces


def key_source(svc: Services, spec: JobSpec) -> Callable[[int], bytes]:
    """The content key of a media sequence number, got or created in the vault once per key
    index (the rotation rule of :func:`~pipeline.playlists.key_index`)."""
    keys: dict[int, bytes] = {}

    def key_for(sequence: int) -> bytes:
        index = key_index(sequence, spec.key_rotation_segments)
        if index not in keys:
            keys[index] = svc.keys.get_or_create(spec.asset, spec.version, index)
        return keys[index]

    return key_for


def segment(
    svc: Services, spec: JobSpec, chunk_name: str, on_progress: Progress = no_progress,
    *, seal: bool = True, job: JobRecord | None = None,
) -> int:
    """Cut one chunk of every rendition into segments with one ffmpeg; returns how many
    segments were produced. They are sealed (encrypted as ffmpeg closes them,
    :mod:`pipeline.sealing`), every shape of chunk alike; without ``seal`` they are left plain
    for the encrypt stage (the path sealing is measured and tested against). ``job``: the job
    record as the stage's start read it (else it is read here)."""
    # What the probe planned: one read for the whole stage, or none when the start read it.
    job = job if job is not None else svc.jobs.get(spec.job_id)
    chunk = _chunk(job, chunk_name)
    # This process's CLI may have started the chunk's ffmpeg already (pipeline.headstart), in
    # an attempt of its own: the stage follows it, or stops it, however the stage ends.
    with headstart.taken(spec.job_id, chunk.name) as head:
        # A delivery that finds the chunk named (an earlier one claimed it, then died before
        # it handed on) cuts nothing: its encryption may be placing that attempt.
        won = _standing(svc, spec, layout.produced_output(chunk.name), ChunkAttempt)
        if won is None:
            won = _segment_attempt(svc, spec, job, chunk, on_progress, seal=seal, head=head)
    return sum(len(r.segments) for r in won.produced.values())


def _segment_attempt(
    svc: Services, spec: JobSpec, job: JobRecord, chunk: Chunk, on_progress: Progress, *,
    seal: bool, head: headstart.HeadStart | None,
) -> ChunkAttempt:
    """One delivery's cut of ``chunk``, in an attempt of its own, which then claims the
    chunk's ``produced`` output; returns the attempt that stands, this one's or the one that
    claimed it first (this one is then discarded)."""
    renditions = _job_renditions(job)
    info = _media(job)
    target, _ = ffmpeg_target(spec.source, probed=True)
    attempt = head.attempt if head is not None else uuid.uuid4().hex[:12]
    prefix = layout.chunk_attempt_prefix(spec.job_id, chunk.name, attempt)
    copy = any(r.copy for r in renditions)
    audio_group = job_audio_renditions(job)
    # A job of one chunk cuts its audio renditions in the chunk's own ffmpeg (one read).
    audio_here = audio_group if len(job_chunks(job)) == 1 else []
    length = chunk.duration if chunk.duration is not None else info.duration - chunk.start
    key_for: Callable[[int], bytes] | None = None
    if seal:
        key_for = key_source(svc, spec)
        key_for(chunk.first_segment)  # the vault answers before ffmpeg starts, or the stage fails
    sealer = None
    with _work_dir(svc, prefix) as (out_dir, is_local), \
            tempfile.TemporaryDirectory(prefix="hlsvault-") as scratch, \
            ExitStack() as stack:

        def work_key(rendition: str, file_name: str) -> str:
            rendition_prefix = layout.chunk_rendition_prefix(
                spec.job_id, chunk.name, attempt, rendition
            )
            return layout.plain_segment_key(rendition_prefix, file_name)

        uploads = None
        if not is_local:
            # A remote work store: each segment is put as soon as it is sealed, while ffmpeg
            # encodes the next, and the rest once ffmpeg has exited.
            uploads = stack.enter_context(AttemptUploads(svc.work, work_key))
        if key_for is not None:
            sealer = SegmentSealer(key_for, container=spec.container,
                                   poll_s=POLL_S if copy else ENCODE_POLL_S,
                                   # An encode closes a segment every few hundred ms: each
                                   # sealed (and put) as it closes, on cores the encoders fill.
                                   batch=REMUX_BATCH if copy else 1,
                                   on_sealed=uploads.put if uploads is not None else None)
        produced = segment_chunk(
            target,
            renditions,
            chunk,
            out_dir,
            info=info,
            segment_seconds=spec.segment_seconds,
            timeout=segment_timeout(length, copy, len(renditions)),
            audio=_chunk_audio(svc, spec, job, chunk, Path(scratch)),
            on_progress=on_progress,
            container=spec.container,
            muxed_audio=not audio_group,
            audio_renditions=audio_here,
            seal=sealer,
            # A put that failed stops ffmpeg: the attempt can no longer be named.
            check=uploads.check if uploads is not None else None,
            head=head,
        )
        if uploads is not None:
            uploads.finish((name, out_dir / name / file_name)
                           for name, rendition in produced.items()
                           for file_name in _files_of(rendition))
    # The claim: from here on, encrypt reads this attempt (whole) and no other, unless a
    # delivery running at once named its own first (its encryption may be reading that).
    mine = ChunkAttempt(
        attempt, dict(produced),
        # Sealed sizes, by rendition: encrypt links these segments and encrypts none of them.
        None if sealer is None
        else {n: sealer.sealed_sizes(n, r.segments) for n, r in produced.items()},
    )
    return _claim(svc, spec, layout.produced_output(chunk.name), mine, [prefix + "/"])


def encrypt(svc: Services, spec: JobSpec, chunk: str, on_progress: Progress = no_progress) -> int:
    """Encrypt one chunk's segments of every rendition with the version's keys; returns bytes
    written."""
    won = _standing(svc, spec, layout.produced_output(chunk), ChunkAttempt)
    if won is None:
        raise InvalidSource(f"chunk {chunk} of the job has not been segmented; it must be "
                            "before it is encrypted")
    attempt_prefix = layout.chunk_attempt_prefix(spec.job_id, chunk, won.attempt)
    produced = won.produced
    report = rate_limited(on_progress)
    if won.sealed is not None:
        return _place_sealed(svc, spec, chunk, attempt_prefix, produced, won.sealed, report)
    sizes = encrypt_renditions(
        svc, spec, attempt_prefix, produced, first_chunk=layout.chunk_index(chunk) == 0,
        on_progress=on_progress,
    )
    svc.jobs.set_output(spec.job_id, layout.sizes_output(chunk), sizes)
    return sum(sum(s) for s in sizes.values())


def encrypt_renditions(
    svc: Services,
    spec: JobSpec,
    attempt_prefix: str,
    produced: dict[str, SegmentedRendition],
    *,
    first_chunk: bool,
    on_progress: Progress = no_progress,
) -> dict[str, list[int]]:
    """Encrypt the segments of ``produced`` (an attempt's output under ``attempt_prefix``)
    into the job's encrypted prefix, each whole (fMP4's ``.m4s`` as MPEG-TS's ``.ts``), IV =
    media sequence number; returns the ciphertext sizes by rendition in segment order.

    fMP4's init segment goes along clear: it holds the codec setup and no sample, and a clear
    init segment declared before the first EXT-X-KEY is what every player reads (hls.js,
    AVPlayer, ExoPlayer, ffmpeg), where an encrypted one needs an explicit IV and is not
    read by all of them. Only the first chunk's is kept: every chunk's encoder writes the same
    setup, and the playlist names one init segment per rendition."""
    report = rate_limited(on_progress)
    work = [(name, seg) for name, rendition in produced.items() for seg in rendition.segments]
    # Every key the chunk needs, fetched or created before any thread starts, one at a time
    # (chunks encrypted at once on other machines race for a key: the vault keeps one).
    keys: dict[int, bytes] = {}
    for _, seg in work:
        index = key_index(seg.sequence, spec.key_rotation_segments)
        if index not in keys:
            keys[index] = svc.keys.get_or_create(spec.asset, spec.version, index)
    if first_chunk:
        for name, rendition in produced.items():
            if rendition.init is not None:
                _copy_init(svc, spec, f"{attempt_prefix}/{name}", name, rendition.init)

    with tempfile.TemporaryDirectory(prefix="hlsvault-") as scratch:
        # One answer for the whole stage, which decides whether any file is encrypted in
        # place: only a fetched copy in this stage's scratch ever is.
        remote = not svc.work.is_local

        def segment_file(item: tuple[str, Segment]) -> SegmentFile:
            name, seg = item
            index = key_index(seg.sequence, spec.key_rotation_segments)
            key, iv = keys[index], iv_for_sequence(seg.sequence)
            plain_key = layout.plain_segment_key(f"{attempt_prefix}/{name}", seg.name)
            encrypted_key = layout.encrypted_key(spec.job_id, name, seg.name)
            if remote:
                # Fetched into this stage's scratch (removed with it, however the stage ends)
                # and encrypted there in place: the copy is this delivery's own, so a
                # redelivery fetches the plain segment again, and no second new file's pages
                # are written.
                fetched = Path(scratch) / f"{name}-{seg.name}"
                svc.work.get_file(plain_key, fetched)
                return SegmentFile(fetched, fetched, key, iv)
            # A local work store's plain segment stays as it is (a redelivery reads it again):
            # the ciphertext is a new file in the store's encrypted prefix.
            plain, encrypted = svc.work.local_path(plain_key), svc.work.local_path(encrypted_key)
            if plain is None or encrypted is None:
                raise ConfigurationError("a work store with local directories gave no local path")
            return SegmentFile(plain, encrypted, key, iv)

        # A remote work store's segments pass through scratch a batch at a time: fetched
        # (round trips overlap), encrypted side by side in place, each put and deleted as soon
        # as it is encrypted, and the next batch fetched only then, so scratch never holds
        # more than a batch (a whole film's trick-play track would otherwise sit there). A
        # local store needs no scratch: the chunk is one batch, and no lane idles at a
        # batch's end.
        batch_size = ENCRYPT_THREADS * aes.LANES if remote else max(1, len(work))
        steps = len(work) * (2 if remote else 1)  # encrypted, then (remote) put
        done = 0
        progress_lock = threading.Lock()

        def advance() -> None:
            nonlocal done
            with progress_lock:
                done += 1
                report(done / steps)

        def put(item: tuple[tuple[str, Segment], SegmentFile]) -> None:
            # A remote work store's segment: encrypted in place in scratch (segment_file).
            (name, seg), job = item
            svc.work.put_file(layout.encrypted_key(spec.job_id, name, seg.name), job.dst)
            job.dst.unlink()
            advance()

        with ThreadPoolExecutor(max_workers=ENCRYPT_THREADS,
                                thread_name_prefix="encrypt-io") as pool:

            def submit(fn: Callable[[Any], Any], item: Any) -> Future[Any]:
                # In the caller's structlog context (job_id and the rest): a pool thread has
                # none of its own.
                return pool.submit(contextvars.copy_context().run, fn, item)

            def encrypt_batch(batch: Sequence[tuple[str, Segment]]) -> list[int]:
                jobs = [future.result() for future in [submit(segment_file, item)
                                                       for item in batch]]
                puts: list[Future[Any]] = []

                def encrypted(index: int, _: int) -> None:
                    advance()
                    if remote:
                        puts.append(submit(put, (batch[index], jobs[index])))

                encrypt = encrypt_files_in_place if remote else encrypt_files
                written = encrypt(jobs, threads=ENCRYPT_THREADS, on_encrypted=encrypted)
                for future in puts:  # the batch's files out of scratch before the next comes
                    future.result()
                return written

            lengths: list[int] = []
            for start in range(0, len(work), batch_size):
                lengths += encrypt_batch(work[start : start + batch_size])
    return _sizes_by_rendition(produced, work, lengths)


def _sizes_by_rendition(
    produced: Mapping[str, SegmentedRendition], work: Sequence[tuple[str, Segment]],
    lengths: Sequence[int],
) -> dict[str, list[int]]:
    """The ciphertext lengths of ``work`` (rendition, segment), by rendition in order."""
    sizes: dict[str, list[int]] = {name: [] for name in produced}
    for (name, _), length in zip(work, lengths, strict=True):
        sizes[name].append(length)
    return sizes


def _copy_init(
    svc: Services, spec: JobSpec, rendition_prefix: str, rendition: str, init: str
) -> None:
    """A rendition's init segment, clear, beside its encrypted segments."""
    plain_key = layout.plain_segment_key(rendition_prefix, init)
    target = layout.encrypted_key(spec.job_id, rendition, init)
    local = svc.work.local_path(plain_key)
    if local is not None:
        svc.work.put_file(target, local)
        return
    svc.work.put_bytes(target, svc.work.get_bytes(plain_key))


def _place_sealed(
    svc: Services, spec: JobSpec, chunk: str, attempt_prefix: str,
    produced: dict[str, SegmentedRendition], sizes: dict[str, list[int]], report: Progress,
) -> int:
    """Encrypt for a sealed chunk: its segments already hold their ciphertext, so each is put
    where encrypt puts its output by a hard link (a local work store) or a server-side copy
    (S3), and never encrypted again, however often this stage is delivered. fMP4's init
    segments, clear in the attempt as in :func:`encrypt_renditions`, go along the same way."""
    first_chunk = layout.chunk_index(chunk) == 0
    work = [
        (name, file_name) for name, rendition in produced.items()
        for file_name in (_files_of(rendition) if first_chunk
                          else [seg.name for seg in rendition.segments])
    ]
    _place_encrypted(svc, spec, attempt_prefix, work, report)
    svc.jobs.set_output(spec.job_id, layout.sizes_output(chunk), sizes)
    return sum(sum(s) for s in sizes.values())


def _place_encrypted(
    svc: Services, spec: JobSpec, attempt_prefix: str, files: Sequence[tuple[str, str]],
    report: Progress,
) -> None:
    """Put each ``(rendition, file name)`` of an attempt whose media segments already hold
    their ciphertext (init segments clear) where encrypt puts its output: by a hard link on a
    local work store, a server-side copy on S3 (else a fetch and a put)."""

    def place(item: tuple[str, str]) -> None:
        name, file_name = item
        target = layout.encrypted_key(spec.job_id, name, file_name)
        source = layout.plain_segment_key(f"{attempt_prefix}/{name}", file_name)
        if svc.work.copy_from(svc.work, source, target):
            return
        with tempfile.TemporaryDirectory(prefix="hlsvault-") as fetched:
            local = Path(fetched) / file_name
            svc.work.get_file(source, local)
            svc.work.put_file(target, local)

    if svc.work.is_local:
        for done, item in enumerate(files, start=1):  # links: no round trips to overlap
            place(item)
            report(done / len(files))
    else:
        with ThreadPoolExecutor(max_workers=PLACE_CONCURRENCY) as pool:
            # Each in the caller's structlog context (job_id and the rest): a pool thread has
            # none of its own.
            placing = [pool.submit(contextvars.copy_context().run, place, item)
                       for item in files]
            try:
                # In the order they end, so the first refusal is seen as soon as it comes,
                # whichever file it is.
                for done, future in enumerate(as_completed(placing), start=1):
                    future.result()
                    report(done / len(files))
            except BaseException:
                # The first failure fails the stage now: the puts not yet started are
                # dropped, not each tried (and retried) against a store that refuses them.
                pool.shutdown(wait=True, cancel_futures=True)
                raise


def joined_renditions(
    svc: Services, spec: JobSpec, job: JobRecord
) -> list[tuple[SegmentedRendition, list[int]]]:
    """Every rendition's chunks joined in time order, with their ciphertext sizes: one
    continuous stream each, its media sequence unbroken (every IV depends on it)."""
    joined: dict[str, list[tuple[SegmentedRendition, list[int]]]] = {}
    chunks = job_chunks(job)
    outputs = svc.jobs.outputs(spec.job_id)  # every chunk's, in one read
    for chunk in chunks:
        produced_name = layout.produced_output(chunk.name)
        sizes_name = layout.sizes_output(chunk.name)
        if produced_name not in outputs or sizes_name not in outputs:
            raise InvalidSource(f"chunk {chunk.name} of the job has not been encrypted; every "
                                "chunk must be before the playlist is made")
        produced = ChunkAttempt.from_dict(outputs[produced_name]).produced
        sizes = ChunkSizes.from_dict(outputs[sizes_name], produced).sizes
        for name, rendition in produced.items():
            joined.setdefault(name, []).append((rendition, sizes[name]))
    result = []
    for parts in joined.values():
        segments = tuple(seg for rendition, _ in parts for seg in rendition.segments)
        if [seg.sequence for seg in segments] != list(range(len(segments))):
            raise UnsupportedMedia(
                f"the chunks of {parts[0][0].rendition} do not join into one media sequence; "
                "set HLSVAULT_CHUNK_SECONDS=0 to transcode the source in one piece"
            )
        first = parts[0][0]
        result.append(
            (replace(first, segments=segments), [size for _, sizes in parts for size in sizes])
        )
    if job_audio_renditions(job) and len(chunks) > 1:
        # Cut whole by the audio stage (a job of one chunk cut them with its video).
        group = layout.audio_group_output()
        if group not in outputs:
            raise InvalidSource("the job's audio group has not been cut; it must be before the "
                                "playlist is made")
        audio = AudioGroupAttempt.from_dict(outputs[group])
        result += [(rendition, audio.sizes[name]) for name, rendition in audio.produced.items()]
    return result


def subtitle_renditions(
    svc: Services, spec: JobSpec, job: JobRecord, entries: list[RenditionEntry]
) -> list[RenditionEntry]:
    """The subtitle renditions the probe planned, as segmented WebVTT aligned with the top
    video rendition's segments (see :mod:`pipeline.subtitles`), encrypted like every segment
    with the video's keys and IVs."""
    planned = each_known(SubtitleTrack, job.json_field("subtitles") or [])
    if not planned:
        return []
    video = max((e for e in entries if e.media == "video"), key=lambda e: e.bandwidth)
    info = _media(job)
    mpegts = measured_timestamp_map(svc, spec.job_id, spec.asset, spec.version, video, info)
    prefix = layout.subtitle_attempt_prefix(spec.job_id, uuid.uuid4().hex[:12])
    produced = {
        track.name: subtitle_rendition(svc, spec.job_id, prefix, track, video, mpegts,
                                        info.video_start)
        for track in planned
    }
    sizes = encrypt_renditions(svc, spec, prefix, produced, first_chunk=False)
    return [
        replace(describe_rendition(produced[track.name], sizes[track.name],
                                   spec.key_rotation_segments),
                group=layout.SUBTITLES_GROUP, language=track.language, title=track.title,
                default=track.default, forced=track.forced)
        for track in planned
    ]


def rotation_warning(spec: JobSpec, segments: int) -> str | None:
    """What to tell the user when key rotation was asked for but cannot happen."""
    rotation = spec.key_rotation_segments
    if rotation <= 0 or segments > rotation:
        return None
    return (
        f"--key-rotation-segments {rotation} asked for a new key every {rotation} segments, but "
        f"the source made only {segments} segment(s) (segments start at keyframes), so the "
        "version has one key; use --ladder default, or a source with more frequent keyframes"
    )


def build_playlists(
    svc: Services, spec: JobSpec, *, job: JobRecord | None = None
) -> AssetVersion:
    """Describe the version from every rendition's measured output and record it, privately,
    in the catalog. It is not visible to players until the upload stage flips it current.
    ``job``: the job record as the stage's start read it (else it is read here)."""
    job = job if job is not None else svc.jobs.get(spec.job_id)
    audio = {a.name: a for a in job_audio_renditions(job)}
    entries = [
        describe_rendition(produced, sizes, spec.key_rotation_segments,
                           audio=audio.get(produced.rendition),
                           group=layout.AUDIO_GROUP if audio else None)
        for produced, sizes in joined_renditions(svc, spec, job)
    ]
    entries += subtitle_renditions(svc, spec, job, entries)
    warning = rotation_warning(
        spec, min(len(e.segments) for e in entries if e.media == "video")
    )
    said = job.json_field("warnings") or []
    if warning is not None and warning not in said:  # a redelivered stage said it already
        svc.jobs.set_json(spec.job_id, "warnings", [*said, warning])
    described = AssetVersion(
        asset=spec.asset,
        version=spec.version,
        job_id=spec.job_id,
        created_at=time.time(),
        key_rotation_segments=spec.key_rotation_segments,
        # Video from the highest bandwidth down, then audio in the source's track order.
        renditions=tuple(sorted(
            entries, key=lambda e: (e.media != "video", -e.bandwidth if e.media == "video" else 0)
        )),
        key_server=svc.settings.public_url,
        container=spec.container,
        audio_only=spec.audio_only,
    )
    svc.catalog.put_version(described)
    return described
