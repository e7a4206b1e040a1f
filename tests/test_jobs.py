"""Job records: the bookkeeping every stage relies on, on both backends."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from pipeline.jobs import FileRecordBackend, JobStore, new_job_spec
from pipeline.jobs_redis import RedisRecordBackend

from fleet import RedisServer


@pytest.fixture(params=["file", "redis"])
def jobs(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[JobStore]:
    if request.param == "file":
        yield JobStore(FileRecordBackend(tmp_path / "jobs"))
        return
    server = RedisServer(tmp_path / "redis")
    server.start()
    try:
        yield JobStore(RedisRecordBackend.from_url(server.url))
    finally:
        server.stop()


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
    jobs.set_pending(spec.job_id, "encrypt", 3)

    assert jobs.arrive(spec.job_id, "encrypt", "1080p") == 2
    assert jobs.arrive(spec.job_id, "encrypt", "1080p") == 2
    assert jobs.arrive(spec.job_id, "encrypt", "720p") == 1
    assert jobs.arrive(spec.job_id, "encrypt", "360p") == 0
    assert jobs.arrive(spec.job_id, "encrypt", "360p") == 0


def test_deliveries_are_counted_per_stage(jobs: JobStore) -> None:
    """Every delivery of a stage, including ones whose worker died, adds one attempt."""
    spec = new_job_spec("/videos/film.mp4", asset="film")
    jobs.create(spec)
    assert [jobs.stage_started(spec.job_id, "upload") for _ in range(3)] == [1, 2, 3]
    assert jobs.get(spec.job_id).stage("upload").attempts == 3  # type: ignore[union-attr]
