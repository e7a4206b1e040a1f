"""The ops app on a running fleet: Basic auth, Prometheus metrics, and the dashboard in Chromium.

The ops process is started from the Procfile (`ops`), like the workers and the key server.
Screenshots of every page the browser visits are left under test-artifacts/dashboard/.
"""

from __future__ import annotations

import base64
import re
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from email.message import Message
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Page
from starlette.testclient import TestClient

from dashboard.app import create_app
from pipeline.errors import ConfigurationError
from pipeline.jobs import JobSpec, new_job_spec
from pipeline.services import Services, build_services
from pipeline.settings import load_settings

from fleet import Fleet
from support import ROOT, free_port, wait_for_port
from test_fleet import submit, wait_for_job

PASSWORD = "correct horse battery staple"
ARTIFACTS = ROOT / "test-artifacts" / "dashboard"
#: The pages poll every 1.5 s; a change not shown after this many seconds is not shown at all.
LIVE_TIMEOUT_MS = 30_000
#: The preview must play past this position (seconds) to count as playing.
PLAYED_S = 1.0


def get(url: str, *, password: str | None = PASSWORD) -> tuple[int, Message, str]:
    """GET ``url`` as ``ops`` (or without credentials): status, headers, body."""
    request = urllib.request.Request(url)
    if password is not None:
        request.add_header(
            "Authorization", "Basic " + base64.b64encode(f"ops:{password}".encode()).decode()
        )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.headers, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.headers, error.read().decode()


def series(text: str, name: str, **labels: str) -> float | None:
    """The value of one sample of the Prometheus text ``text``, or None if absent."""
    for line in text.splitlines():
        match = re.match(r"^([a-z_]+)(?:\{(.*)\})? (\S+)$", line)
        if not match or match.group(1) != name:
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', match.group(2) or ""))
        if all(found.get(k) == v for k, v in labels.items()):
            return float(match.group(3))
    return None


@pytest.fixture
def ops(fleet: Fleet) -> Iterator[str]:
    """The whole fleet plus the ops process; the ops app's base URL."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    fleet.env.update(
        OPS_PORT=str(port),
        HLSVAULT_OPS_PASSWORD=PASSWORD,
        # The preview player on the ops page fetches playlists and keys from the key server.
        HLSVAULT_CORS_ORIGINS=base,
    )
    fleet.start_all()
    fleet.start("ops")
    wait_for_port(port)
    yield base


def screenshot(page: Page, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


@dataclass
class LocalOps:
    """The ops app in-process on embedded-mode stores (no Redis), with a recording submitter."""

    client: TestClient
    services: Services
    submitted: list[JobSpec]


def basic(password: str) -> str:
    return "Basic " + base64.b64encode(f"ops:{password}".encode()).decode()


@pytest.fixture
def local_ops(tmp_path: Path) -> LocalOps:
    settings = load_settings(
        {"HLSVAULT_DATA_DIR": str(tmp_path), "HLSVAULT_OPS_PASSWORD": PASSWORD}
    )
    services = build_services(settings)
    submitted: list[JobSpec] = []

    def submit(spec: JobSpec) -> None:
        services.jobs.create(spec)
        submitted.append(spec)

    app = create_app(settings, services=services, submit=submit)
    client = TestClient(app, base_url="http://ops.test", headers={"Authorization": basic(PASSWORD)})
    return LocalOps(client, services, submitted)


def csrf_token(client: TestClient, job_id: str, action: str) -> str:
    """The CSRF token of the ``action`` form on the job's page ("" if there is no such form)."""
    match = re.search(
        rf'action="/jobs/\w+/{action}"><input type=hidden name=csrf value="(\w+)"',
        client.get(f"/jobs/{job_id}").text,
    )
    return match.group(1) if match else ""


class TestInProcess:
    def test_refuses_to_start_without_a_password(self, tmp_path: Path) -> None:
        settings = load_settings({"HLSVAULT_DATA_DIR": str(tmp_path)})
        with pytest.raises(ConfigurationError, match="HLSVAULT_OPS_PASSWORD"):
            create_app(settings)

    def test_basic_auth_is_checked_but_the_webhook_is_not_behind_it(
        self, local_ops: LocalOps
    ) -> None:
        anonymous = TestClient(local_ops.client.app, base_url="http://ops.test")
        assert anonymous.get("/").status_code == 401
        assert anonymous.get("/", headers={"Authorization": basic("wrong")}).status_code == 401
        assert anonymous.get("/", headers={"Authorization": "Basic !!!"}).status_code == 401
        assert anonymous.get("/healthz").status_code == 200
        webhook = anonymous.post("/v1/jobs", content=b"{}")
        assert "WWW-Authenticate" not in webhook.headers, webhook.text
        assert webhook.status_code != 404, "the webhook routes are mounted"

    def test_cancel_needs_the_pages_token_and_its_own_origin(self, local_ops: LocalOps) -> None:
        # Given a queued job and its page
        spec = new_job_spec("/videos/film.mp4", asset="film")
        local_ops.services.jobs.create(spec)
        client, url = local_ops.client, f"/jobs/{spec.job_id}/cancel"
        token = csrf_token(client, spec.job_id, "cancel")
        assert token

        # When the form is posted without the token, with a forged one, or from elsewhere
        refused = [
            client.post(url, data={}),
            client.post(url, data={"csrf": "0" * 64}),
            client.post(url, data={"csrf": token}, headers={"Origin": "https://evil.example"}),
        ]

        # Then nothing changed; with the token from its own origin, the job is cancelled
        assert [r.status_code for r in refused] == [403, 403, 403]
        assert local_ops.services.jobs.get(spec.job_id).status == "queued"
        done = client.post(url, data={"csrf": token}, headers={"Origin": "http://ops.test"},
                           follow_redirects=False)
        assert done.status_code == 303
        assert local_ops.services.jobs.get(spec.job_id).status == "cancelled"

    def test_retry_submits_the_same_spec_as_a_new_linked_job(self, local_ops: LocalOps) -> None:
        spec = new_job_spec("/videos/film.mp4", asset="film", ladder="default")
        local_ops.services.jobs.create(spec)
        local_ops.services.jobs.fail(spec.job_id, "probe", "no such file")
        client = local_ops.client
        token = csrf_token(client, spec.job_id, "retry")

        done = client.post(f"/jobs/{spec.job_id}/retry", data={"csrf": token},
                           follow_redirects=False)

        (new,) = local_ops.submitted
        assert done.status_code == 303 and done.headers["location"] == f"/jobs/{new.job_id}"
        assert (new.source, new.asset, new.ladder) == (spec.source, spec.asset, spec.ladder)
        assert new.job_id != spec.job_id and new.version != spec.version
        assert client.get(f"/api/jobs/{new.job_id}").json()["retry_of"] == spec.job_id
        assert client.get(f"/api/jobs/{spec.job_id}").json()["retried_as"] == new.job_id
        # and a job that has not failed offers no Retry, and is not retried when asked anyway
        assert csrf_token(client, new.job_id, "retry") == ""
        forged = client.post(f"/jobs/{new.job_id}/retry", data={"csrf": token})
        assert forged.status_code == 403 and len(local_ops.submitted) == 1

    def test_metrics_count_jobs_by_status_and_time_finished_stages(
        self, local_ops: LocalOps
    ) -> None:
        jobs = local_ops.services.jobs
        for name in ("a", "b"):
            spec = new_job_spec(f"/videos/{name}.mp4")
            jobs.create(spec)
            jobs.stage_started(spec.job_id, "probe")
            jobs.stage_finished(spec.job_id, "probe")
        jobs.succeed(spec.job_id, {})

        text = local_ops.client.get("/metrics").text

        assert series(text, "hlsvault_jobs", status="succeeded") == 1
        assert series(text, "hlsvault_jobs", status="running") == 1
        assert series(text, "hlsvault_jobs", status="failed") == 0
        assert series(text, "hlsvault_stage_duration_seconds_count", stage="probe") == 2
        assert series(text, "hlsvault_stage_duration_seconds_bucket", stage="probe", le="1") == 2
        # embedded mode has no queues to report, rather than zeros that would look healthy
        assert series(text, "hlsvault_queue_messages") is None


class TestAuth:
    def test_everything_but_healthz_needs_the_ops_password(self, ops: str) -> None:
        for path in ("/", "/metrics", "/api/jobs", "/jobs/x"):
            status, headers, _ = get(ops + path, password=None)
            assert status == 401 and str(headers["WWW-Authenticate"]).startswith("Basic"), path
            assert get(ops + path, password="wrong")[0] == 401, path
        assert get(ops + "/healthz", password=None)[0] == 200
        assert get(ops + "/", password=PASSWORD)[0] == 200


class TestDashboard:
    def test_metrics_and_dashboard_follow_jobs_through_the_fleet(
        self, ops: str, fleet: Fleet, browser: Browser, copy_clip: Path, long_hd_clip: Path
    ) -> None:
        # Given metrics before any job: queue series for every queue, no job succeeded yet
        status, headers, before = get(ops + "/metrics")
        assert status == 200 and str(headers["Content-Type"]).startswith("text/plain")
        for queue in ("probe", "segment", "encrypt", "publish"):
            assert series(before, "hlsvault_queue_messages", queue=queue, state="queued") == 0
            assert series(before, "hlsvault_queue_dead_letters", queue=queue) == 0
            assert series(before, "hlsvault_queue_oldest_message_age_seconds", queue=queue) == 0
        assert series(before, "hlsvault_jobs", status="succeeded") == 0
        assert (series(before, "hlsvault_workers_alive") or 0) >= 1

        # When a quick job, a long transcode, a missing source and a job to cancel are submitted
        quick = submit(fleet, copy_clip, "quick", "--ladder", "copy")
        long = submit(fleet, long_hd_clip, "long", "--ladder", "default")
        missing = fleet.cli(
            "submit", f"s3://{fleet.env['TEST_BUCKET_WORK']}/nope.mp4", "--asset", "nope"
        )
        assert missing.returncode == 0, missing.stderr
        failed = missing.stdout.strip()
        doomed = submit(fleet, long_hd_clip, "doomed", "--ladder", "default")

        context = browser.new_context(
            http_credentials={"username": "ops", "password": PASSWORD},
            viewport={"width": 1100, "height": 900},
        )
        page = context.new_page()
        console: list[str] = []
        page.on("console", lambda message: console.append(message.text))
        try:
            # Then the running job's progress moves on its page without a reload
            page.goto(f"{ops}/jobs/{long}")
            page.wait_for_function(
                """() => { const p = parseFloat(document.getElementById("job-progress")
                                             .textContent);
                           return p > 0 && p < 100; }""",
                timeout=LIVE_TIMEOUT_MS, polling=100,
            )
            first = page.inner_text("#job-progress")
            page.wait_for_function(
                "seen => document.getElementById('job-progress').textContent !== seen",
                arg=first, timeout=LIVE_TIMEOUT_MS, polling=100,
            )
            assert page.inner_text("#job-progress") != first
            screenshot(page, "running-job")

            # and a queued job is cancelled from its page, and ends so
            page.goto(f"{ops}/jobs/{doomed}")
            with page.expect_navigation():
                page.click("#cancel")
            assert page.url == f"{ops}/jobs/{doomed}"
            assert page.inner_text("#job-status") == "cancelled"
            screenshot(page, "cancelled-job")

            # and the finished job shows every stage done, and its preview plays
            assert wait_for_job(fleet, quick, timeout=60)["status"] == "succeeded"
            page.goto(f"{ops}/jobs/{quick}")
            statuses = page.locator("#stages tr td:nth-child(2)").all_inner_texts()
            assert len(statuses) == 6 and set(statuses) == {"done"}, statuses
            page.wait_for_function(
                "s => document.getElementById('preview').currentTime > s",
                arg=PLAYED_S, timeout=LIVE_TIMEOUT_MS, polling=100,
            )
            screenshot(page, "finished-job-preview")

            # and the failed job is retried as a new job with the same spec
            assert wait_for_job(fleet, failed, timeout=60)["status"] == "failed"
            page.goto(f"{ops}/jobs/{failed}")
            assert page.inner_text("#job-error").strip(), "a failed job shows its reason"
            screenshot(page, "failed-job")
            page.click("#retry")
            page.wait_for_url(re.compile(r".*/jobs/[0-9a-f]{32}$"))
            retried = page.url.rsplit("/", 1)[1]
            assert retried != failed
            assert "retry of" in page.inner_text("main")
            screenshot(page, "retried-job")

            # and the jobs list shows them all; filtered by status, only the failed ones
            page.goto(f"{ops}/?status=failed")
            page.wait_for_selector(f"a[href='/jobs/{failed}']")
            listed = page.locator("#jobs tr td:nth-child(2)").all_inner_texts()
            assert listed and set(listed) == {"failed"}, listed
            page.goto(f"{ops}/")
            for job in (quick, long, failed, doomed, retried):
                page.wait_for_selector(f"a[href='/jobs/{job}']", timeout=5000)
            assert page.locator("#throughput rect").count() == 24
            screenshot(page, "jobs-list")
        finally:
            screenshot(page, "last-page")
            context.close()

        # and the metrics moved: a job succeeded, jobs failed, stage durations were observed
        assert wait_for_job(fleet, long, timeout=60)["status"] == "succeeded"
        after = get(ops + "/metrics")[2]
        assert series(after, "hlsvault_jobs", status="succeeded") == 2
        assert (series(after, "hlsvault_jobs", status="failed") or 0) >= 1
        assert series(after, "hlsvault_jobs", status="cancelled") == 1
        # (one segment stage per chunk: each of the two jobs is one chunk)
        assert (series(after, "hlsvault_stage_duration_seconds_count", stage="segment") or 0) >= 2
        assert (series(after, "hlsvault_stage_duration_seconds_bucket",
                       stage="probe", le="+Inf") or 0) >= 2
