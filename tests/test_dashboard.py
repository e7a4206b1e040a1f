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
from email.message import Message
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Page, sync_playwright

from browser import launch_chromium
from fleet import ROOT, Fleet, free_port, wait_for_port
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


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        launched = launch_chromium(playwright)
        yield launched
        launched.close()


def screenshot(page: Page, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


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
        assert (series(after, "hlsvault_stage_duration_seconds_count", stage="segment") or 0) >= 4
        assert (series(after, "hlsvault_stage_duration_seconds_bucket",
                       stage="probe", le="+Inf") or 0) >= 2
