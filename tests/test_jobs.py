"""Job records: the bookkeeping every stage relies on, and the status index the ops app reads,
on both backends."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from pipeline.errors import BadSpec, CorruptRecord, JobEnded
from pipeline.jobs import Arrival, JobStore, UnknownJob, new_job_spec, pending_field
from pipeline.jobs.file import FileRecordBackend
from pipeline.jobs.redis import RECORD_TTL_S, RedisRecordBackend

from fleet import RedisServer

#: A fixed moment for the index tests (a clock the store is given, not the wall clock's).
T0 = 1_700_000_000.0


class Clock:
    """The store's clock, set by the test."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock(T0)


@pytest.fixture(params=["file", "redis"])
def jobs(request: pytest.FixtureRequest, tmp_path: Path, clock: Clock) -> JobStore:
    if request.param == "file":
        return JobStore(FileRecordBackend(tmp_path / "jobs"), clock=clock)
    server: RedisServer = request.getfixturevalue("redis_server")
    return JobStore(RedisRecordBackend.from_url(server.url), clock=clock)


def created(jobs: JobStore, asset: str, at: float) -> str:
    spec = replace(new_job_spec(f"/videos/{asset}.mp4", asset=asset), created_at=at)
    jobs.create(spec)
    return spec.job_id


def test_a_cancelled_job_stays_cancelled(jobs: JobStore) -> None:
    """Once an operator cancels a job, a stage starting or finishing late cannot revive it."""
    spec = new_job_spec("/videos/film.mp4", asset="film")
    jobs.create(spec)
    jobs.stage_started(spec.job_id, "probe")

    assert jobs.cancel(spec.job_id)
    jobs.stage_started(spec.job_id, "segment:360p")
    assert not jobs.succeed(spec.job_id, {"asset": "film"})
    jobs.fail(spec.job_id, "segment:360p", "too late")

    record = jobs.get(spec.job_id)
    assert record.status == "cancelled"
    assert record.error == "cancelled by an operator"
    assert not jobs.cancel(spec.job_id)


def test_fan_in_counts_each_rendition_once(jobs: JobStore) -> None:
    """Redelivered renditions are counted once; the last arrival, and any redelivery after
    it, sees zero pending (so the playlist stage is enqueued even after a crash)."""
    spec = new_job_spec("/videos/film.mp4", asset="film")
    jobs.create(spec)
    jobs.set_json_fields(spec.job_id, {pending_field("encrypt"): 3})

    assert jobs.arrive(spec.job_id, "encrypt", "1080p") == Arrival(pending=2, counted=True)
    assert jobs.arrive(spec.job_id, "encrypt", "1080p") == Arrival(pending=2, counted=False)
    assert jobs.arrive(spec.job_id, "encrypt", "720p") == Arrival(pending=1, counted=True)
    last = jobs.arrive(spec.job_id, "encrypt", "360p")
    again = jobs.arrive(spec.job_id, "encrypt", "360p")
    assert (last, again) == (Arrival(pending=0, counted=True), Arrival(pending=0, counted=False))


def test_deliveries_are_counted_per_stage(jobs: JobStore) -> None:
    """Every delivery of a stage, including ones whose worker died, adds one attempt."""
    spec = new_job_spec("/videos/film.mp4", asset="film")
    jobs.create(spec)
    assert [jobs.stage_started(spec.job_id, "upload") for _ in range(3)] == [1, 2, 3]
    assert jobs.get(spec.job_id).stage("upload").attempts == 3  # type: ignore[union-attr]



def test_a_stage_keeps_when_its_message_was_delivered(jobs: JobStore) -> None:
    """The delivery times a worker notes are kept next to the stage's start, as written."""
    spec = new_job_spec("/videos/film.mp4", asset="film")
    jobs.create(spec)
    times = {"enqueued_at": 100.25, "fetched_at": 100.5, "picked_at": 100.75}
    assert jobs.stage_started(spec.job_id, "playlist", delivery=times) == 1
    fields = jobs.get(spec.job_id).fields
    assert {name: float(fields[f"playlist.{name}"]) for name in times} == times
    assert jobs.get(spec.job_id).stage("playlist").status == "running"  # type: ignore[union-attr]


def test_queuing_a_stage_writes_its_json_fields_with_it(jobs: JobStore) -> None:
    spec = new_job_spec("/videos/film.mp4", asset="film")
    jobs.create(spec)
    jobs.stage_queued(spec.job_id, "invalidate", json_fields={"published": {"version": "v1"}})
    record = jobs.get(spec.job_id)
    assert record.json_field("published") == {"version": "v1"}
    assert record.stage("invalidate").status == "queued"  # type: ignore[union-attr]

class TestOneRoundTripPerHop:
    """A hop's bookkeeping: the stage's start reads the record in the step that counts it, and
    its end is written with the next stage's queued mark (or in the fan-in's arrival)."""

    def test_a_stage_start_counts_it_and_reads_the_record_as_written(
        self, jobs: JobStore
    ) -> None:
        spec = new_job_spec("/videos/film.mp4", asset="film")
        jobs.create(spec, queued=("probe",))
        jobs.set_json_fields(spec.job_id, {"media": {"duration": 2.0}, "chunks": []})

        attempts, record = jobs.begin_stage(spec.job_id, "probe", worker="host:1")

        assert attempts == 1
        assert record.spec == spec and record.status == "running"
        assert record.json_field("media") == {"duration": 2.0}
        assert record.stage("probe").status == "running"  # type: ignore[union-attr]
        assert record.json_field("probe.worker") == "host:1"
        assert jobs.get(spec.job_id).fields == record.fields

    def test_a_stage_redelivered_after_its_job_ended_writes_nothing(
        self, jobs: JobStore
    ) -> None:
        """A late delivery of a cancelled job's stage reads the record and leaves it as it was:
        no attempt counted, no stage marked running."""
        spec = new_job_spec("/videos/film.mp4", asset="film")
        jobs.create(spec, queued=("probe",))
        jobs.begin_stage(spec.job_id, "probe")
        jobs.cancel(spec.job_id)
        before = jobs.get(spec.job_id).fields

        attempts, record = jobs.begin_stage(spec.job_id, "probe")

        assert attempts == 0 and record.status == "cancelled"
        assert jobs.get(spec.job_id).fields == before

    def test_a_stage_of_an_unknown_job_is_refused_and_creates_no_record(
        self, jobs: JobStore
    ) -> None:
        with pytest.raises(UnknownJob):
            jobs.begin_stage("0" * 32, "probe")
        with pytest.raises(UnknownJob):
            jobs.get("0" * 32)

    def test_a_stage_ends_with_the_next_ones_queued_in_one_write(self, jobs: JobStore) -> None:
        spec = new_job_spec("/videos/film.mp4", asset="film")
        jobs.create(spec, queued=("probe",))
        jobs.begin_stage(spec.job_id, "probe")

        jobs.stage_finished(spec.job_id, "probe", queued=("segment:c000", "segment:c001"),
                            json_fields={"chunk_names": ["c000", "c001"]})

        record = jobs.get(spec.job_id)
        assert [(s.name, s.status) for s in record.stages] == [
            ("probe", "done"), ("segment:c000", "queued"), ("segment:c001", "queued")]
        assert record.json_field("chunk_names") == ["c000", "c001"]

    def test_the_fan_in_queues_what_follows_only_once_none_is_pending(
        self, jobs: JobStore
    ) -> None:
        """Each arrival marks its own stage done; the playlist is marked queued, and named
        to send, once none is pending: by the last arrival, by a redelivery after it while
        the playlist is still queued, and by none once it has started (it stays running)."""
        spec = new_job_spec("/videos/film.mp4", asset="film")
        jobs.create(spec)
        jobs.set_json_fields(spec.job_id, {pending_field("encrypt"): 2})

        def arrive(chunk: str) -> Arrival:
            return jobs.arrive(spec.job_id, "encrypt", chunk, finished=f"encrypt:{chunk}",
                               then_queued=("playlist",))

        left = arrive("c000")
        first = jobs.get(spec.job_id)
        again = arrive("c000")
        last = arrive("c001")
        queued = jobs.get(spec.job_id).stage("playlist")
        resent = arrive("c001")
        jobs.begin_stage(spec.job_id, "playlist")
        redelivered = arrive("c001")

        assert [(a.pending, a.counted, a.queued) for a in (left, again, last, resent,
                                                           redelivered)] == [
            (1, True, ()), (1, False, ()), (0, True, ("playlist",)), (0, False, ("playlist",)),
            (0, False, ())]
        assert first.stage("encrypt:c000").status == "done"  # type: ignore[union-attr]
        assert first.stage("playlist") is None
        assert queued is not None and queued.status == "queued"
        record = jobs.get(spec.job_id)
        assert record.stage("encrypt:c001").status == "done"  # type: ignore[union-attr]
        assert record.stage("playlist").status == "running"  # type: ignore[union-attr]

    def test_a_hand_on_marks_and_names_only_the_stages_that_have_not_started(
        self, jobs: JobStore
    ) -> None:
        """A stage's end marks queued, and returns, the stages after it that are absent or
        queued; one that started stays as it is and is not returned, however late the hand-on
        comes (a first delivery finishing after a second one's next stage started)."""
        spec = new_job_spec("/videos/film.mp4", asset="film")
        jobs.create(spec, queued=("probe",))
        jobs.begin_stage(spec.job_id, "probe")
        stages = ("segment:c000", "segment:c001", "segment:c002")

        assert jobs.stage_finished(spec.job_id, "probe", queued=stages) == stages
        jobs.begin_stage(spec.job_id, "segment:c000")
        jobs.stage_finished(spec.job_id, "segment:c001")
        assert jobs.stage_finished(spec.job_id, "probe", queued=stages) == ("segment:c002",)
        assert jobs.stage_queued(spec.job_id, *stages) == ("segment:c002",)

        record = jobs.get(spec.job_id)
        assert [(s.name, s.status) for s in record.stages] == [
            ("probe", "done"), ("segment:c000", "running"), ("segment:c001", "done"),
            ("segment:c002", "queued")]

    def test_a_hand_on_writes_its_json_fields_once(self, jobs: JobStore) -> None:
        """The fields a hand-on writes (the fan-in's count) are kept as the record has them
        when the same hand-on is written again: a late one does not reset what the stages
        after counted."""
        spec = new_job_spec("/videos/film.mp4", asset="film")
        jobs.create(spec, queued=("probe",))
        fields = {pending_field("encrypt"): 2, "chunk_names": ["c000", "c001"]}
        jobs.stage_finished(spec.job_id, "probe", json_fields=fields)
        jobs.arrive(spec.job_id, "encrypt", "c000")

        jobs.stage_finished(spec.job_id, "probe", json_fields=fields)

        record = jobs.get(spec.job_id)
        assert record.json_field(pending_field("encrypt")) == 1
        assert record.json_field("chunk_names") == ["c000", "c001"]

    def test_the_last_stage_ends_with_the_job(self, jobs: JobStore) -> None:
        spec = new_job_spec("/videos/film.mp4", asset="film")
        jobs.create(spec)
        jobs.begin_stage(spec.job_id, "invalidate")

        assert jobs.succeed(spec.job_id, {"asset": "film"},
                            fields=jobs.finished_fields("invalidate", status="skipped",
                                                        detail="no CDN"))

        record = jobs.get(spec.job_id)
        assert record.status == "succeeded"
        assert record.stage("invalidate").status == "skipped"  # type: ignore[union-attr]
        assert record.stage("invalidate").detail == "no CDN"  # type: ignore[union-attr]


class TestOutputs:
    def test_outputs_are_read_by_name_kept_apart_from_the_record_and_dropped(
        self, jobs: JobStore
    ) -> None:
        """A stage's output is read back as written, by name or all at once; it is not in the
        record (which every stage and the ops app read whole), and dropping ends it."""
        spec = new_job_spec("/videos/film.mp4", asset="film")
        jobs.create(spec)
        jobs.set_output(spec.job_id, "produced.c000", {"attempt": "a1", "produced": {}})
        jobs.set_output(spec.job_id, "sizes.c000", {"360p": [1024, 2048]})
        jobs.set_output(spec.job_id, "produced.c000", {"attempt": "a2", "produced": {}})

        assert jobs.outputs(spec.job_id, ["produced.c000", "produced.c001"]) == {
            "produced.c000": {"attempt": "a2", "produced": {}}}
        assert jobs.outputs(spec.job_id) == {
            "produced.c000": {"attempt": "a2", "produced": {}},
            "sizes.c000": {"360p": [1024, 2048]},
        }
        fields = jobs.get(spec.job_id).fields
        assert not any(name.startswith(("produced.", "sizes.")) for name in fields)

        jobs.drop_outputs(spec.job_id)
        assert jobs.outputs(spec.job_id) == {}
        assert jobs.get(spec.job_id).spec == spec

    def test_of_deliveries_claiming_an_output_at_once_the_first_wins_and_all_are_told(
        self, jobs: JobStore
    ) -> None:
        """Eight deliveries claim one output at once, each naming its own attempt: every one
        is told the same attempt, one of theirs, which is the output kept; a later claim is
        told it too and changes nothing (an output a later stage may have read never
        switches), and other outputs are left alone."""
        spec = new_job_spec("/videos/film.mp4", asset="film")
        jobs.create(spec)
        jobs.set_output(spec.job_id, "sizes.c000", {"360p": [1024]})
        start = threading.Barrier(8)

        def claim(attempt: int) -> Any:
            start.wait(timeout=30)
            return jobs.claim_output(spec.job_id, "audio.group", {"attempt": f"a{attempt}"})

        with ThreadPoolExecutor(max_workers=8) as pool:
            told = list(pool.map(claim, range(8)))

        [won] = {item["attempt"] for item in told}
        assert won in {f"a{attempt}" for attempt in range(8)}
        assert jobs.claim_output(spec.job_id, "audio.group", {"attempt": "late"}) == \
            {"attempt": won}
        assert jobs.outputs(spec.job_id) == {"audio.group": {"attempt": won},
                                             "sizes.c000": {"360p": [1024]}}

    @pytest.mark.parametrize("end", ["failed", "cancelled", "succeeded"])
    def test_a_claim_after_the_job_ended_claims_nothing(self, jobs: JobStore, end: str) -> None:
        """Given a job that ended (a chunk failed for good, an operator cancelled it, or it
        succeeded) and whose outputs were dropped with its work, when a late delivery claims
        an output, then it is told the job ended and no output is kept: nothing re-creates
        the dropped outputs, so no attempt is named that nothing would ever discard."""
        spec = new_job_spec("/videos/film.mp4", asset="film")
        jobs.create(spec)
        jobs.claim_output(spec.job_id, "produced.c000", {"attempt": "a1"})
        if end == "failed":
            jobs.fail(spec.job_id, "segment:c001", "the chunk is not media")
        elif end == "cancelled":
            jobs.cancel(spec.job_id)
        else:
            jobs.succeed(spec.job_id, {})
        jobs.drop_outputs(spec.job_id)

        with pytest.raises(JobEnded):
            jobs.claim_output(spec.job_id, "produced.c003", {"attempt": "late"})

        assert jobs.outputs(spec.job_id) == {}
        assert jobs.get(spec.job_id).status == end

    @pytest.mark.parametrize("name", ["produced.c000", "sizes.c000"])
    def test_an_output_that_is_not_json_is_a_damaged_record(
        self, jobs: JobStore, name: str
    ) -> None:
        """An output stored as text that is not JSON (damaged, written by hand) is read,
        and claimed, as a damaged record saying to resubmit the job, never a decoder's error
        (which a worker retries as a bug); nested past the decoder's depth too."""
        spec = new_job_spec("/videos/film.mp4", asset="film")
        jobs.create(spec)
        for damaged in ("{not json", "[" * 100_000):
            jobs.backend.write_outputs(spec.job_id, {name: damaged})
            for read in (lambda: jobs.outputs(spec.job_id, [name]),
                         lambda: jobs.outputs(spec.job_id),
                         lambda: jobs.claim_output(spec.job_id, name, {"attempt": "a1"})):
                with pytest.raises(CorruptRecord, match=f"output '{name}' is not JSON.*"
                                                        "resubmit the job"):
                    read()

    def test_a_record_field_that_is_not_json_is_a_damaged_record(self, jobs: JobStore) -> None:
        """A record's JSON field (the plan a stage reads) that is not JSON is a damaged
        record saying to resubmit the job, as a spec that is not JSON is."""
        spec = new_job_spec("/videos/film.mp4", asset="film")
        jobs.create(spec)
        jobs.backend.write(spec.job_id, {"chunk_names": "{not json"})

        with pytest.raises(CorruptRecord, match=r"field 'chunk_names' is not JSON.*resubmit"):
            jobs.get(spec.job_id).json_field("chunk_names")

        jobs.backend.write(spec.job_id, {"spec": "{not json"})
        with pytest.raises(CorruptRecord, match=r"not JSON.*resubmit the job"):
            _ = jobs.get(spec.job_id).spec


def test_outputs_a_claim_creates_expire_with_the_record(redis_server: RedisServer) -> None:
    """On Redis, the outputs hash a claim creates, and one a write creates, expire as a record
    does: a job whose end never came (its workers all gone) leaves none for good."""
    backend = RedisRecordBackend.from_url(redis_server.url)
    jobs = JobStore(backend)
    for make in ("claim", "write"):
        spec = new_job_spec("/videos/film.mp4", asset="film")
        jobs.create(spec)
        if make == "claim":
            jobs.claim_output(spec.job_id, "audio.group", {"attempt": "a1"})
        else:
            jobs.set_output(spec.job_id, "sizes.c000", {"360p": [1024]})
        key = f"hlsvault:joboutputs:{spec.job_id}"
        assert 0 < backend.client.ttl(key) <= RECORD_TTL_S


class TestStatusIndex:
    def test_each_status_change_moves_the_job_in_the_index(
        self, jobs: JobStore, clock: Clock
    ) -> None:
        """Counts and lists follow every status written, and a late write to an ended job
        (a stage failing after a cancel) moves nothing."""
        # Given four jobs: one left queued, one running, one succeeded, one cancelled
        queued, running, done, cancelled = (
            created(jobs, name, T0 + i) for i, name in enumerate("abcd")
        )
        for job_id in (running, done, cancelled):
            jobs.stage_started(job_id, "probe")
        clock.now = T0 + 100
        jobs.succeed(done, {})
        clock.now = T0 + 200
        jobs.cancel(cancelled)
        clock.now = T0 + 300
        jobs.fail(cancelled, "probe", "too late")

        # Then each is counted once, under the status its record has
        assert jobs.counts() == {"queued": 1, "running": 1, "succeeded": 1, "failed": 0,
                                 "cancelled": 1}
        assert [r.spec.job_id for r in jobs.recent(10)] == [cancelled, done, running, queued]
        assert [r.spec.job_id for r in jobs.recent(10, "running")] == [running]
        assert [r.spec.job_id for r in jobs.recent(10, "cancelled")] == [cancelled]
        assert jobs.recent(10, "failed") == []
        # and finish times are counted in [start, end)
        assert jobs.finished_between(T0 + 100, T0 + 200) == {
            "succeeded": 1, "failed": 0, "cancelled": 0}
        assert jobs.finished_between(T0, T0 + 100)["succeeded"] == 0
        assert jobs.finished_between(T0, T0 + 1000) == {
            "succeeded": 1, "failed": 0, "cancelled": 1}

    def test_lists_are_newest_first_and_bounded(self, jobs: JobStore, clock: Clock) -> None:
        """A list returns at most ``limit`` records: the newest by finish time for a finished
        status, whatever order the jobs were created in."""
        ids = [created(jobs, f"a{i}", T0 + i) for i in range(5)]
        for i, job_id in enumerate(reversed(ids)):  # the oldest job finishes last
            clock.now = T0 + 100 + i
            jobs.fail(job_id, "probe", "no such file")
        assert [r.spec.job_id for r in jobs.recent(3, "failed")] == ids[:3]
        assert [r.spec.job_id for r in jobs.recent(2)] == [ids[4], ids[3]]

    def test_an_unknown_status_is_refused_with_the_choices(self, jobs: JobStore) -> None:
        with pytest.raises(BadSpec, match="choose one of queued, running, succeeded"):
            jobs.recent(10, "done")


def test_a_new_file_index_is_filled_from_the_records_on_disk(tmp_path: Path) -> None:
    """A data dir written before the index existed is indexed when the store opens it."""
    clock = Clock(T0)
    old = JobStore(FileRecordBackend(tmp_path / "jobs"), clock=clock)
    first, second = created(old, "a", T0), created(old, "b", T0 + 1)
    old.succeed(first, {})
    (tmp_path / "jobs" / "index.sqlite3").unlink()

    reopened = JobStore(FileRecordBackend(tmp_path / "jobs"), clock=clock)

    assert reopened.counts()["succeeded"] == 1 and reopened.counts()["queued"] == 1
    assert [r.spec.job_id for r in reopened.recent(10)] == [second, first]


def test_redis_records_from_before_the_status_sets_are_indexed_once_read(
    redis_server: RedisServer,
) -> None:
    """A fleet upgraded with records in Redis counts them too: the first read places every
    record that no status write has placed yet, each in the set of its status."""
    # Given records as the previous version wrote them: a hash and the creation index only
    clock = Clock(T0)
    jobs = JobStore(RedisRecordBackend.from_url(redis_server.url), clock=clock)
    old = [created(jobs, name, T0 + i) for i, name in enumerate("abc")]
    jobs.succeed(old[0], {})
    client = redis_server.client()
    client.delete(*client.keys("hlsvault:jobs:status:*"))
    # and one job that moves on after the upgrade, before anything is read
    jobs.stage_started(old[1], "probe")

    counts = JobStore(RedisRecordBackend.from_url(redis_server.url), clock=clock).counts()

    assert counts == {"queued": 1, "running": 1, "succeeded": 1, "failed": 0, "cancelled": 0}
    assert [r.spec.job_id for r in jobs.recent(5, "succeeded")] == [old[0]]
