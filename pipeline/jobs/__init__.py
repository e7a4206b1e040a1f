"""Job records: the spec of a packaging job and everything that happened to it.

A record is a flat hash of string fields (a Redis hash in distributed mode,
:mod:`.redis`; a locked JSON file in embedded mode, :mod:`.file`),
so that every update is a single-field write or an atomic increment and stages running on
different machines never overwrite each other's fields.

Fields: ``spec`` (JSON), ``status``, ``error``, ``failed_stage``, ``created_at``,
``finished_at``, ``media`` and ``renditions`` (JSON), ``result`` (JSON), and per stage
``<stage>.status|started_at|finished_at|progress|attempts|error|detail``, where a stage is
``probe``, ``segment:<rendition>``, ``encrypt:<rendition>``, ``playlist``, ``download``, ``upload``,
``invalidate``; ``pending.encrypt`` is the fan-in counter.

Beside each record, its *outputs*: small JSON a stage leaves for a later one (which attempt
of a chunk won, its ciphertext sizes: :mod:`pipeline.layout` names them), read by name, so a
stage reads the one it needs and the record stays small however many chunks a job has. They
are dropped when the job ends, with its work files.

Each backend also keeps an index of jobs by status, updated in the same atomic step as the
status itself: queued and running jobs by creation time, finished ones by finish time. The ops
app's counts, throughput and lists read the index, never every record.
"""

from __future__ import annotations

import copy
import json
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from .. import layout
from ..errors import BadSpec, CorruptRecord, HlsvaultError, JobEnded, NewerJobOption, NotFound
from ..plan import LADDERS, check_segment_seconds
from ..records import an_object, from_known, known_fields, parsed_json, texts

STAGES = (
    "probe", "rekey", "audio", "segment", "encrypt", "playlist", "download", "trickplay",
    "upload", "invalidate",
)
TERMINAL = ("succeeded", "failed", "cancelled")
#: Every status a job has, in the order it passes through them.
STATUSES = ("queued", "running", *TERMINAL)
#: A rotation period longer than any video would simply be "off"; shorter than 1 is invalid.
MAX_KEY_ROTATION_SEGMENTS = 100_000
#: A spec's options this version does not know are named in the error, at most this many and
#: each cut to this length: the names are whatever a submitter wrote.
NAMED_UNKNOWN_OPTIONS = 5
MAX_OPTION_NAME = 40
#: How much of a spec this version cannot run a list or page shows of each text field.
MAX_SHOWN_CHARS = 300


@dataclass(frozen=True)
class JobSpec:
    """What to package, and how. Immutable once the job is created."""

    job_id: str
    asset: str
    source: str
    version: str
    ladder: str = layout.DEFAULT_LADDER
    segment_seconds: float = layout.DEFAULT_SEGMENT_SECONDS
    key_rotation_segments: int = layout.DEFAULT_KEY_ROTATION_SEGMENTS
    created_at: float = field(default_factory=time.time)
    #: "package" (probe → segment → encrypt → playlist …) or "rekey" (re-encrypt → upload …)
    kind: str = "package"
    #: rekey only: the version whose segments are re-encrypted, and how long its keys live on
    previous_version: str | None = None
    grace_s: float = 0.0
    #: Also write an MP4 download of this rendition (layout.DOWNLOAD_TOP: the top one); None:
    #: no download.
    download: str | None = None
    #: Segment container (layout.CONTAINERS) and the default ladder's video codec.
    container: str = layout.DEFAULT_CONTAINER
    codec: str = layout.DEFAULT_VIDEO_CODEC
    #: Also offer an audio-only variant (the audio group's rendition, no video).
    audio_only: bool = False
    #: Sidecar subtitle files: ``(language, source)``, a local path or ``s3://`` object each
    #: (pipeline.subtitles.check_sidecars); the source's own text tracks come along anyway.
    subtitles: tuple[tuple[str, str], ...] = ()
    #: The file name the user gave each sidecar, in order, where the CLI stored it under
    #: another (pipeline.subtitles.check_sidecar_names); empty: each source names itself.
    subtitle_names: tuple[str, ...] = ()
    #: Also make an I-frame rendition and thumbnail sprites (pipeline.trickplay).
    trick_play: bool = layout.DEFAULT_TRICK_PLAY

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any) -> JobSpec:
        """The spec a submitter wrote, as this version runs it. An option it does not know
        is :class:`~pipeline.errors.NewerJobOption` (retried: a newer worker may take it),
        never ignored; what no version writes (not an object, a field missing or of the wrong
        kind) is :class:`~pipeline.errors.CorruptRecord`."""
        # Imported here: pipeline.subtitles pulls in most of the packaging modules, which a
        # command making a job spec does not need before it starts (see pipeline.headstart).
        from ..subtitles import check_sidecar_names

        unknown = sorted(set(an_object(cls, data)) - known_fields(cls))
        if unknown:
            raise newer_options(unknown)
        sidecars = texts(cls, data, "subtitles", pairs=True)
        names = check_sidecar_names(texts(cls, data, "subtitle_names"), sidecars)
        return from_known(cls, data, subtitles=sidecars, subtitle_names=names)


#: What a worker that does not know a spec's options says to do.
UPGRADE_THE_WORKERS = ("upgrade the workers before whatever submits jobs (README, Upgrading a "
                       "fleet), then resubmit it")


def newer_options(
    names: Sequence[str], *, reader: str = "this worker", mend: str = UPGRADE_THE_WORKERS
) -> NewerJobOption:
    """Why ``reader`` refuses a spec naming the options ``names``, which it does not know,
    and ``mend``, what to do about it."""
    shown = ", ".join(repr(name[:MAX_OPTION_NAME]) for name in names[:NAMED_UNKNOWN_OPTIONS])
    if len(names) > NAMED_UNKNOWN_OPTIONS:
        shown += f" and {len(names) - NAMED_UNKNOWN_OPTIONS} more"
    return NewerJobOption(
        f"the job asks for options {reader} does not know ({shown}): a newer hlsvault "
        f"submitted it; {mend}",
        options=tuple(names),
    )


def new_job_spec(
    source: str,
    *,
    asset: str | None = None,
    ladder: str = layout.DEFAULT_LADDER,
    segment_seconds: float = layout.DEFAULT_SEGMENT_SECONDS,
    key_rotation_segments: int = layout.DEFAULT_KEY_ROTATION_SEGMENTS,
    download: str | None = None,
    container: str = layout.DEFAULT_CONTAINER,
    codec: str = layout.DEFAULT_VIDEO_CODEC,
    audio_only: bool = False,
    subtitles: Sequence[tuple[str, str]] = (),
    trick_play: bool = layout.DEFAULT_TRICK_PLAY,
) -> JobSpec:
    """Validate options and give the job an id and the version it will publish."""
    job_id = uuid.uuid4().hex
    if asset is None:
        asset = layout.asset_from_name(source.split("?", 1)[0])
        if asset is None:
            raise BadSpec(
                f"no asset id can be derived from the source's name {source[:80]!r}; "
                "pass --asset ID"
            )
    layout.check_asset_id(asset)
    if ladder not in LADDERS:
        raise BadSpec(f"unknown ladder {ladder!r}; choose one of {', '.join(LADDERS)}")
    check_segment_seconds(segment_seconds)
    if not 0 <= key_rotation_segments <= MAX_KEY_ROTATION_SEGMENTS:
        raise BadSpec(
            f"key rotation (--key-rotation-segments, \"key_rotation_segments\") "
            f"{key_rotation_segments} is out of range; use 0 (off) to {MAX_KEY_ROTATION_SEGMENTS}"
        )
    if download is not None and not layout.RENDITION_PATTERN.fullmatch(download):
        raise BadSpec(
            f"--download {download[:40]!r} is not a rendition name; name one like 720p, or "
            f"give none for the top rendition"
        )
    check_shape(ladder=ladder, container=container, codec=codec, audio_only=audio_only,
                download=download)
    sidecars: tuple[tuple[str, str], ...] = ()
    if subtitles:
        from ..subtitles import check_sidecars  # see JobSpec.from_dict

        sidecars = check_sidecars(subtitles)
    now = time.time()
    version = layout.new_version(job_id, now=now)
    return JobSpec(
        job_id=job_id,
        asset=asset,
        source=source,
        version=version,
        ladder=ladder,
        segment_seconds=segment_seconds,
        key_rotation_segments=key_rotation_segments,
        created_at=now,
        download=download,
        container=container,
        codec=codec,
        audio_only=audio_only,
        subtitles=sidecars,
        trick_play=trick_play,
    )


def check_shape(
    *, ladder: str, container: str, codec: str, audio_only: bool, download: str | None
) -> None:
    """Refuse container, codec and audio options that do not go together, naming both the
    CLI option and the job request field."""
    if container not in layout.CONTAINERS:
        raise BadSpec(f'unknown container (--container, "container") {container[:20]!r}; '
                      f"choose one of {', '.join(layout.CONTAINERS)}")
    if codec not in layout.VIDEO_CODECS:
        raise BadSpec(f'unknown codec (--codec, "codec") {codec[:20]!r}; choose one of '
                      f"{', '.join(layout.VIDEO_CODECS)}")
    if codec == "hevc" and container != "fmp4":
        raise BadSpec('--codec hevc ("codec": "hevc") needs --container fmp4: players take '
                      "HEVC in fMP4 (tagged hvc1), not in MPEG-TS")
    if codec == "hevc" and ladder != "default":
        raise BadSpec('--codec hevc ("codec": "hevc") applies to --ladder default; the copy '
                      "ladder keeps the source's codec")
    if download is not None and (container != "ts" or audio_only):
        raise BadSpec('--download ("download") makes its MP4 from MPEG-TS segments with muxed '
                      "audio; package with --container ts and without --audio-only to get one")


def pending_field(counter: str) -> str:
    """The record's count of the members still to arrive at the fan-in ``counter``."""
    return f"pending.{counter}"


def arrival_field(counter: str, member: str) -> str:
    """The record's mark of ``member`` having arrived at the fan-in ``counter``."""
    return f"arrived.{counter}.{member}"


def status_field(stage: str) -> str:
    """The record's field of ``stage``'s status."""
    return f"{stage}.status"


def unstarted(status: str | None) -> bool:
    """Whether a stage whose status field reads ``status`` (None: no field) has not started:
    nothing queued it yet, or it is queued and no delivery has picked it up. Only such a stage
    is marked queued (:meth:`JobStore.stage_finished`, :meth:`JobStore.arrive`) and sent: one
    that started got its message, and the broker redelivers that one itself. The Redis
    backend's scripts state the same rule in Lua."""
    return status is None or status == "queued"


@dataclass(frozen=True)
class Arrival:
    """What one arrival at a fan-in (:meth:`JobStore.arrive`) found."""

    #: How many members are still to arrive.
    pending: int
    #: Whether this arrival counted its member: False when an earlier delivery of the same
    #: member had arrived (a redelivery), which counts nothing.
    counted: bool
    #: The stages after the fan-in that this arrival, finding none pending, marked queued
    #: (those :func:`unstarted`): its caller sends their messages. The last arrival marks them;
    #: a redelivery after it finds them still queued (that arrival may have died before its
    #: send) or started (then none).
    queued: tuple[str, ...] = ()


@dataclass(frozen=True)
class StageState:
    name: str
    status: str
    started_at: float | None
    finished_at: float | None
    progress: float
    attempts: int
    error: str | None
    detail: str | None


@dataclass(frozen=True)
class JobRecord:
    """A read-only view of a job record.

    What lists and pages show of a job (its asset, version, source and creation time; its id
    is the key it is stored under) is read from any spec, even one this version cannot run (a
    newer submitter's option, a damaged record), so that such a job is still listed;
    :attr:`spec`, what a stage runs with, only from one it can (:meth:`JobSpec.from_dict`)."""

    job_id: str
    asset: str
    version: str
    source: str
    created_at: float
    status: str
    error: str | None
    failed_stage: str | None
    finished_at: float | None
    stages: tuple[StageState, ...]
    fields: dict[str, str]
    #: The spec as this version runs it, or why it cannot (see :attr:`spec`).
    read_spec: JobSpec | HlsvaultError

    @property
    def spec(self) -> JobSpec:
        """The job's spec; raises what keeps this version from running it:
        :class:`~pipeline.errors.NewerJobOption` (transient: a newer worker may take the job)
        or :class:`~pipeline.errors.CorruptRecord`."""
        if isinstance(self.read_spec, HlsvaultError):
            # A new error each time: one record may be read in several threads, and each
            # raise would otherwise chain its traceback and context onto the same instance.
            # A copy keeps what the error carries (a NewerJobOption's options).
            raise copy.copy(self.read_spec)
        return self.read_spec

    @property
    def runnable_spec(self) -> JobSpec | None:
        """The job's spec when this version can run it; None when it cannot
        (:attr:`spec_problem` says why): what a page or figure shows of it only if there is
        one."""
        return self.read_spec if isinstance(self.read_spec, JobSpec) else None

    @property
    def spec_problem(self) -> str | None:
        """Why this version cannot run the job's spec; None when it can."""
        return str(self.read_spec) if isinstance(self.read_spec, HlsvaultError) else None

    @property
    def done(self) -> bool:
        return self.status in TERMINAL

    def json_field(self, name: str) -> Any:
        """The record's field ``name`` (JSON), or None when it has none."""
        raw = self.fields.get(name)
        return None if raw is None else parsed_json(JobRecord, raw, f"its field {name[:64]!r}")

    def stage(self, name: str) -> StageState | None:
        return next((s for s in self.stages if s.name == name), None)

    def arrived(self, counter: str, member: str) -> bool:
        """Whether ``member`` had arrived at the fan-in ``counter`` (:meth:`JobStore.arrive`)
        when this record was read."""
        return arrival_field(counter, member) in self.fields

    @classmethod
    def from_fields(cls, fields: dict[str, str], *, job_id: str) -> JobRecord:
        """The record of the job ``job_id`` (the key it is stored under: a spec this version
        cannot read may not say) from its stored ``fields``."""
        names: list[str] = []
        for key in fields:
            stage, _, attribute = key.rpartition(".")
            if attribute == "status" and stage and stage not in names:
                names.append(stage)
        names.sort(
            key=lambda n: (STAGES.index(n.split(":")[0]) if n.split(":")[0] in STAGES else 99, n)
        )

        def num(key: str) -> float | None:
            return float(fields[key]) if key in fields else None

        stages = tuple(
            StageState(
                name=name,
                status=fields[status_field(name)],
                started_at=num(f"{name}.started_at"),
                finished_at=num(f"{name}.finished_at"),
                progress=num(f"{name}.progress") or 0.0,
                attempts=int(fields.get(f"{name}.attempts", "0")),
                error=fields.get(f"{name}.error"),
                detail=fields.get(f"{name}.detail"),
            )
            for name in names
        )
        read_spec, data = _read_spec(fields["spec"])
        if isinstance(read_spec, JobSpec):
            spec = read_spec
            shown = (spec.asset, spec.version, spec.source, spec.created_at)
        else:
            # Imported here: only a spec this version cannot run needs it (structlog with it).
            from ..logs import redact_text

            about = data if isinstance(data, dict) else {}

            def text(name: str) -> str:
                # Redacted before it is cut: a cut can take the '@' that marks a URL's
                # userinfo, and then no redaction after it finds the password before it.
                value = about.get(name)
                return redact_text(value)[:MAX_SHOWN_CHARS] if isinstance(value, str) else ""

            shown = (text("asset"), text("version"), text("source"), num("created_at") or 0.0)
        return cls(
            job_id,
            *shown,
            read_spec=read_spec,
            status=fields.get("status", "queued"),
            error=fields.get("error"),
            failed_stage=fields.get("failed_stage"),
            finished_at=num("finished_at"),
            stages=stages,
            fields=fields,
        )

    def to_dict(self) -> dict[str, Any]:
        """The record as a user sees it: the JSON of `hlsvault status --json`."""
        return {
            "job_id": self.job_id,
            "asset": self.asset,
            "version": self.version,
            "source": self.source,
            "status": self.status,
            "error": self.error,
            "failed_stage": self.failed_stage,
            "created_at": self.created_at,
            "finished_at": self.finished_at,
            "spec_error": self.spec_problem,
            "stages": [asdict(stage) for stage in self.stages],
        }


def _output(name: str, raw: str) -> Any:
    """The job's output ``name`` from its stored text ``raw``."""
    return parsed_json(JobRecord, raw, f"its output {name[:64]!r}")


def _read_spec(raw: str) -> tuple[JobSpec | HlsvaultError, Any]:
    """The stored spec ``raw`` as this version runs it, or why it cannot; and its JSON."""
    try:
        data = parsed_json(JobSpec, raw, "its text")
    except CorruptRecord as error:
        return error, None
    try:
        return JobSpec.from_dict(data), data
    except HlsvaultError as error:
        return error, data


class UnknownJob(NotFound):
    """No record exists for the job id."""

    def __init__(self, job_id: str) -> None:
        super().__init__(f"no job {job_id[:64]}; check the id (`hlsvault status` takes the "
                         "id that `hlsvault submit` printed)")
        self.job_id = job_id


class RecordBackend(Protocol):
    """A hash per job: the operations a job store needs, each atomic on its own."""

    def create(self, job_id: str, fields: dict[str, str]) -> None: ...
    def read(self, job_id: str) -> dict[str, str]: ...
    def write(self, job_id: str, fields: dict[str, str]) -> None: ...
    def increment(self, job_id: str, name: str, amount: int) -> int: ...
    def start_stage(
        self, job_id: str, counter: str, fields: dict[str, str]
    ) -> tuple[int, dict[str, str]]: ...
    def write_and_queue(
        self, job_id: str, fields: dict[str, str], once: dict[str, str], statuses: Sequence[str]
    ) -> list[str]: ...
    def arrive(
        self, job_id: str, counter: str, marker: str, fields: dict[str, str],
        then: Sequence[str],
    ) -> tuple[int, bool, list[str]]: ...
    def write_unless_ended(self, job_id: str, fields: dict[str, str]) -> bool: ...
    def read_many(self, job_ids: Sequence[str]) -> list[dict[str, str] | None]: ...
    def write_outputs(self, job_id: str, fields: dict[str, str]) -> None: ...
    def claim_output(self, job_id: str, name: str, value: str) -> str | None: ...
    def read_outputs(self, job_id: str, names: Sequence[str] | None) -> dict[str, str]: ...
    def drop_outputs(self, job_id: str) -> None: ...
    def newest(self, limit: int, status: str | None) -> list[str]: ...
    def status_counts(self, now: float) -> dict[str, int]: ...
    def finished_counts(self, start: float, end: float) -> dict[str, int]: ...


def check_status(status: str) -> str:
    if status not in STATUSES:
        raise BadSpec(f"unknown job status {status[:40]!r}; choose one of {', '.join(STATUSES)}")
    return status


class JobStore:
    """Job records over a :class:`RecordBackend`. ``clock`` stamps every time it writes."""

    def __init__(self, backend: RecordBackend, *, clock: Callable[[], float] = time.time) -> None:
        self.backend = backend
        self.clock = clock

    def create(self, spec: JobSpec, *, queued: Sequence[str] = ()) -> None:
        """Record a new job, with its first ``queued`` stages marked queued."""
        fields = {
            "spec": json.dumps(spec.to_dict()),
            "status": "queued",
            "created_at": repr(spec.created_at),
        }
        fields.update({status_field(stage): "queued" for stage in queued})
        self.backend.create(spec.job_id, fields)

    def get(self, job_id: str) -> JobRecord:
        fields = self.backend.read(job_id)
        if "spec" not in fields:
            raise UnknownJob(job_id)
        return JobRecord.from_fields(fields, job_id=job_id)

    def set_json(self, job_id: str, name: str, value: Any) -> None:
        self.backend.write(job_id, {name: json.dumps(value)})

    def set_json_fields(self, job_id: str, values: Mapping[str, Any]) -> None:
        """:meth:`set_json` of each of ``values``, in one write."""
        self.backend.write(job_id, {name: json.dumps(value) for name, value in values.items()})

    def stage_started(
        self,
        job_id: str,
        stage: str,
        *,
        worker: str | None = None,
        delivery: Mapping[str, float] | None = None,
    ) -> int:
        """:meth:`begin_stage`'s delivery count alone."""
        attempts, _ = self.begin_stage(job_id, stage, worker=worker, delivery=delivery)
        return attempts

    def begin_stage(
        self,
        job_id: str,
        stage: str,
        *,
        worker: str | None = None,
        delivery: Mapping[str, float] | None = None,
    ) -> tuple[int, JobRecord]:
        """Mark a stage running (on ``worker``, when given) and count this delivery, and read
        the record as it is then, in one step; returns the delivery count and the record.
        ``delivery`` (``enqueued_at``, ``fetched_at``, ``picked_at``: when its message was)
        is kept as ``<stage>.<name>``. A job that has ended is only read: nothing is written,
        and the count is 0.

        Counted here rather than by dramatiq because a worker killed by SIGKILL never tells
        dramatiq it failed: only this count sees a message that kills its worker every time.
        """
        fields = {status_field(stage): "running", f"{stage}.started_at": repr(self.clock())}
        if worker is not None:
            fields[f"{stage}.worker"] = json.dumps(worker)
        for name, at in (delivery or {}).items():
            fields[f"{stage}.{name}"] = repr(at)
        attempts, found = self.backend.start_stage(job_id, f"{stage}.attempts", fields)
        if "spec" not in found:
            raise UnknownJob(job_id)
        return attempts, JobRecord.from_fields(found, job_id=job_id)

    def stage_queued(
        self, job_id: str, *stages: str, json_fields: Mapping[str, Any] | None = None
    ) -> tuple[str, ...]:
        """:meth:`stage_finished` without a stage to end: mark those of ``stages`` that have
        not started queued, with ``json_fields``, in one atomic step; returns those marked."""
        return self._queue(job_id, {}, stages, json_fields)

    def stage_progress(self, job_id: str, stage: str, fraction: float) -> None:
        self.backend.write(job_id, {f"{stage}.progress": f"{fraction:.3f}"})

    def finished_fields(
        self, stage: str, *, status: str = "done", detail: str | None = None
    ) -> dict[str, str]:
        """The fields that mark ``stage`` ended with ``status``, stamped now."""
        fields = {
            status_field(stage): status,
            f"{stage}.finished_at": repr(self.clock()),
            f"{stage}.progress": "1.000",
        }
        if detail:
            fields[f"{stage}.detail"] = detail
        return fields

    def stage_finished(
        self,
        job_id: str,
        stage: str,
        *,
        status: str = "done",
        detail: str | None = None,
        queued: Sequence[str] = (),
        json_fields: Mapping[str, Any] | None = None,
    ) -> tuple[str, ...]:
        """Mark ``stage`` ended, mark those of the stages after it, ``queued``, that have not
        started (:func:`unstarted`) queued, and write those of ``json_fields`` (JSON, as
        :meth:`set_json` would) the record does not have yet, in one atomic step: a hop's
        bookkeeping is one round trip. Returns the stages it marked queued: the caller sends
        their messages, and no other's.

        Conditional in the step itself because two deliveries of a stage may hand on at once,
        a first one among them (a stage still queued may get a second message): whichever
        comes last must not mark queued again a stage the other's message started, nor
        rewrite what the stages after may have read (the fan-in's count above all)."""
        fields = self.finished_fields(stage, status=status, detail=detail)
        return self._queue(job_id, fields, queued, json_fields)

    def _queue(
        self, job_id: str, fields: dict[str, str], stages: Sequence[str],
        json_fields: Mapping[str, Any] | None,
    ) -> tuple[str, ...]:
        once = {name: json.dumps(value) for name, value in (json_fields or {}).items()}
        marked = set(self.backend.write_and_queue(
            job_id, fields, once, [status_field(name) for name in stages]))
        return tuple(name for name in stages if status_field(name) in marked)

    def arrive(
        self,
        job_id: str,
        counter: str,
        member: str,
        *,
        finished: str | None = None,
        then_queued: Sequence[str] = (),
    ) -> Arrival:
        """Fan-in: count ``member`` as arrived once, however often it is redelivered; says
        how many are still pending and whether this call counted.

        In the same step, the ``finished`` stage (the member's own) is marked done, and, once
        none is pending, those of the ``then_queued`` stages that have not started
        (:func:`unstarted`) are marked queued and named in the result (its caller sends
        them): by the last arrival, and again by a redelivery after it while they are still
        queued (the last arrival may have died before its send), never once one started."""
        fields = {} if finished is None else self.finished_fields(finished)
        left, counted, marked = self.backend.arrive(
            job_id, pending_field(counter), arrival_field(counter, member), fields,
            [status_field(name) for name in then_queued],
        )
        queued = tuple(name for name in then_queued if status_field(name) in marked)
        return Arrival(pending=left, counted=counted, queued=queued)

    def fail(self, job_id: str, stage: str, reason: str) -> None:
        now = repr(self.clock())
        self.backend.write(
            job_id,
            {status_field(stage): "failed", f"{stage}.error": reason, f"{stage}.finished_at": now},
        )
        self.backend.write_unless_ended(
            job_id, {"status": "failed", "error": reason, "failed_stage": stage, "finished_at": now}
        )

    def succeed(
        self, job_id: str, result: dict[str, Any], *, fields: Mapping[str, str] | None = None
    ) -> bool:
        """Mark the job succeeded, with ``fields`` (its last stage's end) written in the same
        step, unless it already ended (an operator cancelled it)."""
        fields = {**(fields or {}), "status": "succeeded", "result": json.dumps(result)}
        fields["finished_at"] = repr(self.clock())
        return self.backend.write_unless_ended(job_id, fields)

    def cancel(self, job_id: str, reason: str = "cancelled by an operator") -> bool:
        """End a job that has not ended; its queued stages skip it. False when it had ended."""
        return self.backend.write_unless_ended(
            job_id, {"status": "cancelled", "error": reason, "finished_at": repr(self.clock())}
        )

    # -- outputs ---------------------------------------------------------------------------

    def set_output(self, job_id: str, name: str, value: Any) -> None:
        """Keep ``value`` (JSON) as the job's output ``name``, in one atomic write."""
        self.backend.write_outputs(job_id, {name: json.dumps(value)})

    def claim_output(self, job_id: str, name: str, value: Any) -> Any:
        """Keep ``value`` (JSON) as the job's output ``name`` unless it has one already, in one
        atomic step, and return the output that stands: ``value``, or the one written first.
        Of two deliveries naming their own attempt at once, the first wins and every later
        one is told which attempt did (its own is then discarded): an output a later stage
        may have read is never switched.

        Raises :class:`~pipeline.errors.JobEnded`, claiming nothing, when the job has ended
        (checked in the same step): its outputs were dropped with its work files, and a claim
        then would name an attempt nothing ever discards."""
        stands = self.backend.claim_output(job_id, name, json.dumps(value))
        if stands is None:
            raise JobEnded(f"the job ended before {name[:64]} was named; nothing is kept")
        return _output(name, stands)

    def outputs(self, job_id: str, names: Sequence[str] | None = None) -> dict[str, Any]:
        """The job's outputs ``names`` that exist (every output when None), by name."""
        found = self.backend.read_outputs(job_id, names)
        return {name: _output(name, value) for name, value in found.items()}

    def drop_outputs(self, job_id: str) -> None:
        self.backend.drop_outputs(job_id)

    # -- the index -------------------------------------------------------------------------

    def recent(self, limit: int, status: str | None = None) -> list[JobRecord]:
        """The newest ``limit`` records, newest first: of every job by creation time, or of
        one status (finished ones by finish time). Reads only those records."""
        if status is not None:
            check_status(status)
        ids = self.backend.newest(limit, status)
        records = []
        for job_id, stored in zip(ids, self.backend.read_many(ids), strict=True):
            # Expired since it was indexed, or moved on to another status in between.
            if stored is None or "spec" not in stored:
                continue
            record = JobRecord.from_fields(stored, job_id=job_id)
            if status is None or record.status == status:
                records.append(record)
        return records

    def counts(self) -> dict[str, int]:
        """How many records there are of each status (that have not expired by now)."""
        counted = self.backend.status_counts(self.clock())
        return {status: counted.get(status, 0) for status in STATUSES}

    def finished_between(self, start: float, end: float) -> dict[str, int]:
        """How many jobs reached each terminal status at a time in ``[start, end)``."""
        counted = self.backend.finished_counts(start, end)
        return {status: counted.get(status, 0) for status in TERMINAL}
