"""An older worker given what a newer hlsvault (or a damaged record) wrote, over a real
redis-server (README, Upgrading a fleet): a job spec naming an option it does not know is
retried, then failed saying to upgrade the workers, its work discarded; a damaged spec fails
its job at once saying to resubmit; `hlsvault status` and the ops app show such a job; a
re-key of a version described in a newer format fails saying to upgrade, publishing nothing.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import dramatiq
import pytest
from dramatiq.brokers.stub import StubBroker
from structlog.testing import capture_logs

from dashboard.auth import CsrfTokens
from pipeline import layout
from pipeline.jobs import JobRecord, JobSpec, new_job_spec
from pipeline.jobs.redis import RedisRecordBackend
from pipeline.lifecycle import new_rekey_spec
from pipeline.playlists import DESCRIPTION_FORMAT
from pipeline.services import build_services
from pipeline.settings import load_settings
from workers import flow
from workers.embedded import run_embedded
from workers.queues import Queue
from workers.runtime import Runtime, build_runtime

from fleet import RedisServer
from keyserver_support import Library, shared_library
from ops_support import PASSWORD, local_ops_for
from support import HLSVAULT, ROOT

#: Retries of a transient failure in these tests (the fleet's is 5, with seconds of backoff).
RETRIES = 1
#: How long a worker may take to run a message and its retries here.
JOIN_TIMEOUT_MS = 30_000
#: An option no version of hlsvault has, and one a hostile submitter might send.
NEWER_OPTION = "watermark"
HOSTILE_OPTION = "x" * 5_000


def fleet_env(tmp_path: Path, redis_server: RedisServer) -> dict[str, str]:
    """A fleet's settings: job records in the test's redis-server, stores in a directory."""
    return {
        "HLSVAULT_DATA_DIR": str(tmp_path / "data"),
        "REDIS_URL": redis_server.url,
        "HLSVAULT_CDN_URL": "https://cdn.example",
        "HLSVAULT_TOKEN_SECRET": "t" * 48,
        "HLSVAULT_MASTER_KEY": base64.b64encode(bytes(range(32))).decode(),
        "HLSVAULT_OPS_PASSWORD": PASSWORD,
    }


@pytest.fixture
def older(
    tmp_path: Path, redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> Runtime:
    """A worker's runtime (records in redis, messages on an in-memory broker) whose stages
    are retried once, at once."""
    monkeypatch.setattr("workers.actors.MAX_RETRIES", RETRIES)
    monkeypatch.setattr("workers.actors.MIN_BACKOFF_MS", 10)
    monkeypatch.setattr("workers.actors.MAX_BACKOFF_MS", 20)
    return build_runtime(load_settings(fleet_env(tmp_path, redis_server)), broker=StubBroker())


def recorded_with_spec(rt: Runtime, spec_text: str) -> JobSpec:
    """A queued job whose stored spec is ``spec_text``, with work files and an output left
    as its stages would leave them."""
    spec = new_job_spec("/videos/film.mp4", asset="film")
    rt.services.jobs.create(spec, queued=("probe",))
    rt.services.jobs.backend.write(spec.job_id, {"spec": spec_text})
    rt.services.work.put_bytes(f"{layout.job_prefix(spec.job_id)}/scratch.ts", b"plain")
    rt.services.jobs.set_output(spec.job_id, "left", {"by": "an earlier stage"})
    return spec


def newer_spec_text(**options: Any) -> str:
    """A spec as a newer submitter writes it: this version's fields and ``options``."""
    return json.dumps({**new_job_spec("/videos/film.mp4", asset="film").to_dict(), **options})


def deliver(rt: Runtime, job_id: str) -> None:
    """Send the job's probe message, and run a worker until it and its retries are done
    (:class:`workers.middleware.JobOutcome` included)."""
    worker = dramatiq.Worker(rt.broker, worker_threads=1, worker_timeout=50)
    worker.start()
    try:
        rt.send(flow.PROBE, job_id)
        rt.broker.join(Queue.PROBE, timeout=JOIN_TIMEOUT_MS, fail_fast=False)
    finally:
        worker.stop(timeout=10_000)


def assert_work_discarded(rt: Runtime, job_id: str) -> None:
    assert rt.services.work.list(layout.job_prefix(job_id)) == []
    assert rt.services.jobs.outputs(job_id) == {}


class TestASpecWithAnOptionThisWorkerDoesNotKnow:
    def test_is_retried_then_fails_saying_to_upgrade_the_workers(self, older: Runtime) -> None:
        """Given a job whose spec a newer submitter wrote with options this worker does not
        know, when its stage's retries run out, then the job is failed at that stage with a
        reason that names the options (the hostile one cut short) and says to upgrade the
        workers, and its work files and outputs are discarded."""
        spec = recorded_with_spec(
            older, newer_spec_text(**{NEWER_OPTION: "acme", HOSTILE_OPTION: True}))

        deliver(older, spec.job_id)

        record = older.services.jobs.get(spec.job_id)
        assert (record.status, record.failed_stage) == ("failed", "probe")
        error = record.error or ""
        assert f"'{NEWER_OPTION}'" in error and "upgrade the workers" in error, error
        assert HOSTILE_OPTION not in error and len(error) < 600
        # Retried: a newer worker could have taken it meanwhile.
        probe = record.stage("probe")
        assert probe is not None and probe.attempts == RETRIES + 1
        assert_work_discarded(older, spec.job_id)

    @pytest.mark.parametrize("spec_text", [
        "[1, 2]",
        "{not json",
        json.dumps({"job_id": "j1", "source": "/videos/film.mp4", "version": "v1"}),
        newer_spec_text(subtitle_names=5),
    ], ids=["a-list", "not-json", "no-asset", "subtitle-names-a-number"])
    def test_a_damaged_spec_fails_its_job_at_once_saying_to_resubmit(
        self, older: Runtime, spec_text: str
    ) -> None:
        """A spec no version writes fails its job at the first delivery, not after retries,
        saying to resubmit, and its work is discarded all the same."""
        spec = recorded_with_spec(older, spec_text)

        deliver(older, spec.job_id)

        record = older.services.jobs.get(spec.job_id)
        assert (record.status, record.failed_stage) == ("failed", "probe")
        assert "resubmit the job" in (record.error or ""), record.error
        probe = record.stage("probe")
        assert probe is not None and probe.attempts == 1
        assert_work_discarded(older, spec.job_id)


class TestFailingAJob:
    def test_discards_its_work_whatever_reading_its_record_raises(
        self, older: Runtime, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A record whose reading raises outside the error tree (a bug) still has its job
        failed and its work files and outputs discarded; the bug is raised after that."""
        spec = recorded_with_spec(older, json.dumps(new_job_spec("/v/film.mp4").to_dict()))

        def broken(job_id: str) -> None:
            raise RuntimeError("a bug in reading the record")

        monkeypatch.setattr(older.services.jobs, "get", broken)
        with pytest.raises(RuntimeError, match="a bug"):
            flow.fail(older, spec.job_id, "probe", "probe failed after retries")

        monkeypatch.undo()
        assert older.services.jobs.get(spec.job_id).status == "failed"
        assert_work_discarded(older, spec.job_id)

    def test_whose_spec_cannot_be_read_reads_its_record_once_and_logs_what_it_left(
        self, older: Runtime, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A job failed at once for a damaged spec is not read again to fail it, and the log
        says its thumbnail sheets were left because its spec cannot be read, not that they
        could not be deleted (with the spec's problem as the reason)."""
        spec = recorded_with_spec(older, newer_spec_text(subtitle_names=5))
        reads: list[str] = []
        read = older.services.jobs.get

        def counted(job_id: str) -> JobRecord:
            reads.append(job_id)
            return read(job_id)

        monkeypatch.setattr(older.services.jobs, "get", counted)

        with capture_logs() as logs:
            deliver(older, spec.job_id)

        events = [entry["event"] for entry in logs]
        assert reads == []
        assert read(spec.job_id).status == "failed"
        assert not [event for event in events if "could not be deleted" in event], events
        assert [event for event in events if "spec cannot be read here" in event], events


class Unrunnable(NamedTuple):
    """A spec this version cannot run, and what is shown of it."""

    spec_text: str
    #: What the job's error and the reason beside it say to do.
    says: str
    #: The ops app's refusal to retry it: its status, and what it says to do.
    retry_status: int
    retry_says: str


UNRUNNABLE = {
    "newer-option": Unrunnable(newer_spec_text(**{NEWER_OPTION: "acme"}),
                               "upgrade the workers", 503, "upgrade this ops app"),
    "damaged": Unrunnable(newer_spec_text(subtitle_names=5), "resubmit the job", 422,
                          "resubmit the job"),
}


class TestSuchAJobIsShown:
    @pytest.fixture(params=UNRUNNABLE, ids=str)
    def unrunnable(self, request: pytest.FixtureRequest) -> Unrunnable:
        return UNRUNNABLE[request.param]

    @pytest.fixture
    def failed(self, older: Runtime, unrunnable: Unrunnable) -> JobSpec:
        spec = recorded_with_spec(older, unrunnable.spec_text)
        deliver(older, spec.job_id)
        return spec

    def test_by_hlsvault_status(
        self, failed: JobSpec, unrunnable: Unrunnable, tmp_path: Path,
        redis_server: RedisServer,
    ) -> None:
        """`hlsvault status` of such a job (a newer submitter's option, a damaged spec: this
        CLI cannot read it either) says the job failed and why, in text and in JSON, exit 1
        as for any failed job."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("HLSVAULT_", "REDIS"))}
        env.update(fleet_env(tmp_path, redis_server), PYTHONPATH=str(ROOT))

        shown = [subprocess.run([*HLSVAULT, "status", failed.job_id, *args], env=env,
                                capture_output=True, text=True, timeout=60, check=False)
                 for args in ((), ("--json",))]

        assert [done.returncode for done in shown] == [1, 1], shown[0].stderr
        assert f"job {failed.job_id}  asset film  failed" in shown[0].stdout
        says = unrunnable.says
        assert [line for line in shown[0].stdout.splitlines()
                if line.startswith("  spec: ") and says in line], shown[0].stdout
        job = json.loads(shown[1].stdout)
        assert (job["job_id"], job["asset"], job["status"]) == (failed.job_id, "film", "failed")
        assert says in job["error"] and says in job["spec_error"]

    def test_by_the_ops_app_whose_retry_refuses_it(
        self, failed: JobSpec, unrunnable: Unrunnable, tmp_path: Path,
        redis_server: RedisServer,
    ) -> None:
        """The ops app (as old as the worker) lists the job, shows its page with why its spec
        cannot be read, and answers its API and metrics; its retry is refused saying what to
        do (a retry without the option would package something else; a damaged spec says to
        resubmit), not a 500."""
        ops = local_ops_for(load_settings(fleet_env(tmp_path, redis_server)))
        job_id = failed.job_id

        pages = {path: ops.client.get(path) for path in (
            "/", "/?status=failed", f"/jobs/{job_id}", "/api/jobs", f"/api/jobs/{job_id}",
            "/metrics")}
        # The page offers no Retry; a form posted from a page loaded before carries a
        # genuine token.
        retried = ops.client.post(f"/jobs/{job_id}/retry",
                                  data={"csrf": CsrfTokens(PASSWORD).token("retry", job_id)},
                                  follow_redirects=False)

        assert {path: page.status_code for path, page in pages.items()} == dict.fromkeys(
            pages, 200)
        assert job_id[:12] in pages["/?status=failed"].text
        page = pages[f"/jobs/{job_id}"].text
        assert "id=spec-error" in page and unrunnable.says in page
        assert "id=retry" not in page  # a button that could only be refused
        assert pages[f"/api/jobs/{job_id}"].json()["status"] == "failed"
        assert retried.status_code == unrunnable.retry_status, retried.text
        assert unrunnable.retry_says in retried.text and "worker" not in retried.text
        assert ops.submitted == []


class TestACredentialInASpecThisVersionCannotRun:
    def test_is_shown_by_no_list_page_or_status(
        self, older: Runtime, tmp_path: Path, redis_server: RedisServer
    ) -> None:
        """A source whose password reaches past what a list shows of such a spec (its '@'
        beyond the cut) is redacted whole: no character of the password is in the ops app's
        jobs list, the job's page, the JSON API or `hlsvault status`, text or JSON."""
        password = "s3cr3tpw" * 36
        source = f"https://user:{password}@videos.example/film.mp4"
        spec = recorded_with_spec(older, newer_spec_text(source=source, **{NEWER_OPTION: 1}))
        ops = local_ops_for(load_settings(fleet_env(tmp_path, redis_server)))
        env = {k: v for k, v in os.environ.items() if not k.startswith(("HLSVAULT_", "REDIS"))}
        env.update(fleet_env(tmp_path, redis_server), PYTHONPATH=str(ROOT))

        pages = {path: ops.client.get(path) for path in (
            "/", f"/jobs/{spec.job_id}", "/api/jobs", f"/api/jobs/{spec.job_id}")}
        shown = [subprocess.run([*HLSVAULT, "status", spec.job_id, *args], env=env,
                                capture_output=True, text=True, timeout=60, check=False)
                 for args in ((), ("--json",))]

        texts = {**{path: page.text for path, page in pages.items()},
                 **{f"status {i}": done.stdout + done.stderr for i, done in enumerate(shown)}}
        assert {name: "s3cr3t" in text for name, text in texts.items()} == dict.fromkeys(
            texts, False)
        assert {path: page.status_code for path, page in pages.items()} == dict.fromkeys(
            pages, 200)
        assert [done.returncode for done in shown] == [0, 0], shown[0].stderr
        # The source itself is shown, its userinfo replaced.
        assert "https://[REDACTED]@" in texts["/"] and "https://[REDACTED]@" in texts["status 1"]


@pytest.fixture
def rekey_runtime(
    tmp_path_factory: pytest.TempPathFactory, copy_clip: Path, tmp_path: Path,
    redis_server: RedisServer,
) -> Iterator[tuple[Library, Runtime]]:
    """A packaged library, and an embedded runtime over it whose job records are in redis."""
    library: Library = shared_library(tmp_path_factory, copy_clip).copy(tmp_path)
    settings = library.settings
    services = build_services(
        settings, job_backend=RedisRecordBackend.from_url(redis_server.url))
    yield library, build_runtime(settings, services=services)


class TestADescriptionOfANewerFormat:
    def test_a_rekey_of_it_fails_saying_to_upgrade_and_publishes_nothing(
        self, rekey_runtime: tuple[Library, Runtime]
    ) -> None:
        """Given a re-key submitted for the current version, when that version's description
        turns out to need a newer reader (a newer packager wrote it), then this worker fails
        the job at the re-key saying to upgrade, and nothing of the new version exists: not
        current, not described, no segment on the origin, no key in the vault, no work."""
        library, rt = rekey_runtime
        svc = rt.services
        spec = new_rekey_spec(svc, "film", grace_s=0)
        described = Path(library.settings.vault) / layout.version_description_key(
            "film", library.version)
        data = json.loads(described.read_text())
        described.write_text(json.dumps({**data, "reader": DESCRIPTION_FORMAT + 1}))

        record = run_embedded(rt, spec)

        assert (record.status, record.failed_stage) == ("failed", "rekey")
        assert "upgrade" in (record.error or ""), record.error
        state = svc.catalog.state("film")
        assert state is not None and state.version == library.version
        assert [key for key in svc.vault.list("") if spec.version in key] == []
        assert [key for key in svc.origin.list("") if spec.version in key] == []
        assert svc.work.list(layout.job_prefix(spec.job_id)) == []
