"""The ops app over a real redis-server and on a running fleet: exact figures at 5,000 jobs,
parked-message metrics, the process without a password, Basic auth, Prometheus metrics, and the
dashboard in Chromium. The ops process is started from the Procfile (`ops`), like the workers and
the key server. Screenshots of every page the browser visits are left under
test-artifacts/dashboard/.
"""

from __future__ import annotations

import base64
import os
import re
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Page
from redis import Redis
from starlette.testclient import TestClient

from dashboard.app import create_app
from dashboard.auth import DISABLED
from dashboard.metrics import THROUGHPUT_BUCKET_S
from pipeline.jobs import JobStore, new_job_spec
from pipeline.jobs.redis import RedisRecordBackend
from pipeline.parked import PARKED_CAP, ParkingLot
from pipeline.redisconn import connect
from pipeline.services import build_services
from pipeline.settings import load_settings

from fleet import Fleet, RedisServer, stop_process
from ops_support import PASSWORD, basic, get, series
from support import ROOT, VENV_BIN, evidence_path, free_port, wait_for_http, wait_for_port
from test_fleet import submit, wait_for_job

#: The pages poll every 1.5 s; a change not shown after this many seconds is not shown at all.
LIVE_TIMEOUT_MS = 30_000
#: The preview must play past this position (seconds) to count as playing.
PLAYED_S = 1.0


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


def screenshot(page: Page, request: pytest.FixtureRequest, name: str) -> None:
    page.screenshot(path=str(evidence_path("dashboard", request.node.nodeid, ".png", label=name)),
                    full_page=True)


@dataclass
class RedisOps:
    """The ops app in-process over a real redis-server, its job store on a clock the test sets."""

    client: TestClient
    jobs: JobStore
    redis: Redis
    #: The store's clock (and so the app's): ``now[0]``.
    now: list[float]


@pytest.fixture
def redis_ops(tmp_path: Path, redis_server: RedisServer) -> RedisOps:
    settings = load_settings({
        "REDIS_URL": redis_server.url, "HLSVAULT_DATA_DIR": str(tmp_path / "data"),
        "HLSVAULT_CDN_URL": "https://cdn.example",
        "HLSVAULT_TOKEN_SECRET": base64.urlsafe_b64encode(os.urandom(36)).decode(),
        "HLSVAULT_MASTER_KEY": base64.b64encode(os.urandom(32)).decode(),
        "HLSVAULT_OPS_PASSWORD": PASSWORD,
    })
    client = connect(redis_server.url)
    # Half way through a 5-minute bucket, so that the chart's buckets are known to the test.
    now = [(time.time() // THROUGHPUT_BUCKET_S) * THROUGHPUT_BUCKET_S + THROUGHPUT_BUCKET_S / 2]
    jobs = JobStore(RedisRecordBackend(client), clock=lambda: now[0])
    services = replace(build_services(settings), jobs=jobs)
    app = create_app(settings, services=services, redis=client, submit=jobs.create)
    test_client = TestClient(app, base_url="http://ops.test",
                             headers={"Authorization": basic(PASSWORD)})
    return RedisOps(test_client, jobs, client, now)


class TestAtScale:
    def test_counts_throughput_and_lists_are_exact_over_5000_jobs(
        self, redis_ops: RedisOps
    ) -> None:
        """The figures read the job store's status index, not the newest 1000 records: with
        5,000 jobs every count, every throughput bar and every list is what was written."""
        # Given 5,000 jobs written through the job store: 200 queued, 300 running, and 4,500
        # finished (7 in 10 succeeded, 2 failed, 1 cancelled) spread over the last two hours
        jobs, now = redis_ops.jobs, redis_ops.now[0]
        start = now - THROUGHPUT_BUCKET_S * 11.5  # the chart's first bucket
        ids, finished = [], {}  # job id -> (status, bucket relative to the chart, finish time)
        for i in range(5000):
            spec = replace(new_job_spec(f"/videos/v{i}.mp4", asset=f"v{i}"),
                           created_at=now - 20_000 + i)
            jobs.create(spec)
            ids.append(spec.job_id)
            if 200 <= i < 500:
                jobs.stage_started(spec.job_id, "probe")
            if i < 500:
                continue
            j = i - 500
            status = ("succeeded",) * 7 + ("failed",) * 2 + ("cancelled",)
            bucket = j % 24 - 12  # twelve buckets before the chart, twelve in it
            at = start + bucket * THROUGHPUT_BUCKET_S + (j // 24) * 1.5
            redis_ops.now[0] = at
            {"succeeded": lambda job: jobs.succeed(job, {}),
             "failed": lambda job: jobs.fail(job, "probe", "no such file"),
             "cancelled": jobs.cancel}[status[j % 10]](spec.job_id)
            finished[spec.job_id] = (status[j % 10], bucket, at)
        redis_ops.now[0] = now
        by_status = Counter(status for status, _, _ in finished.values())
        by_bucket = Counter((bucket, status) for status, bucket, _ in finished.values())

        # Then /metrics counts every status exactly
        metrics_text = redis_ops.client.get("/metrics").text
        expected = {"queued": 200, "running": 300, **by_status}
        for status, count in expected.items():
            assert series(metrics_text, "hlsvault_jobs", status=status) == count, status
        # and the jobs page shows each count, and the throughput of each 5 minutes
        html = redis_ops.client.get("/").text
        for status, count in expected.items():
            assert f"{status} (<span id=count-{status}>{count}</span>)" in html
        bars = re.findall(r"<title>\d\d:\d\d\+5 min: (\d+) succeeded, (\d+) failed</title>", html)
        assert [(int(ok), int(bad)) for ok, bad in bars] == [
            (by_bucket[(k, "succeeded")], by_bucket[(k, "failed")]) for k in range(12)]
        # and each list is the newest 200 of its kind, newest first
        newest_failed = sorted((at, job) for job, (s, _, at) in finished.items() if s == "failed")
        assert listed(redis_ops, "failed") == [job for _, job in reversed(newest_failed[-200:])]
        assert listed(redis_ops, "running") == ids[300:500][::-1]
        assert listed(redis_ops, None) == ids[-200:][::-1]


def listed(ops: RedisOps, status: str | None) -> list[str]:
    answer = ops.client.get("/api/jobs", params={"status": status} if status else {})
    assert answer.status_code == 200, answer.text
    return [job["job_id"] for job in answer.json()["jobs"]]


class TestParkedMetrics:
    def test_metrics_show_the_parked_count_and_what_overflowed(self, redis_ops: RedisOps) -> None:
        """The park holds PARKED_CAP messages; beyond that the oldest go, and are counted."""
        parking = ParkingLot(redis_ops.redis)
        for i in range(PARKED_CAP + 3):
            parking.park(f"garbage {i}", "message body is not JSON")
        text = redis_ops.client.get("/metrics").text
        assert series(text, "hlsvault_ingest_parked") == PARKED_CAP
        assert series(text, "hlsvault_ingest_parked_overflow_total") == 3
        assert parking.entries()[0].body == "garbage 3"


class TestProcess:
    def test_without_a_password_the_ops_process_says_what_to_set_and_stays_up(
        self, fleet: Fleet
    ) -> None:
        """`honcho start` stops every process when one exits: without a password the ops
        process prints one line saying what to set, and serves /healthz until stopped."""
        del fleet.env["HLSVAULT_OPS_PASSWORD"]
        port = int(fleet.env["OPS_PORT"])
        fleet.start("ops")
        wait_for_port(port)
        assert get(f"http://127.0.0.1:{port}/healthz", password=None)[:1] == (200,)
        status, _, body = get(f"http://127.0.0.1:{port}/", password=None)
        assert status == 503 and "set HLSVAULT_OPS_PASSWORD" in body
        said = [line for line in fleet.log_text().splitlines() if "HLSVAULT_OPS_PASSWORD" in line]
        assert said == [f"hlsvault ops: {DISABLED}"]
        process = fleet.processes["ops"][0]
        assert process.poll() is None
        fleet.kill("ops", signal.SIGTERM)
        # uvicorn shuts down, then re-raises the signal it caught: a clean stop either way
        assert process.returncode in (0, -signal.SIGTERM)
        assert "Traceback" not in fleet.log_text()

    def test_the_readme_fleet_recipe_stays_up_without_an_ops_password(
        self, fleet: Fleet, tmp_path: Path
    ) -> None:
        """README: `honcho start -c segment=4` with the fleet's settings and no dashboard
        password runs every process type; the key server and the ops health check answer."""
        del fleet.env["HLSVAULT_OPS_PASSWORD"]
        with (tmp_path / "honcho.log").open("wb") as log:
            honcho = subprocess.Popen(
                [str(VENV_BIN / "honcho"), "start", "-c", "segment=4"], cwd=ROOT, env=fleet.env,
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )
        try:
            wait_for_http(f"http://127.0.0.1:{fleet.env['PORT']}/healthz", timeout=60)
            wait_for_http(f"http://127.0.0.1:{fleet.env['OPS_PORT']}/healthz", timeout=60)
            output = (tmp_path / "honcho.log").read_text(errors="replace")
            assert honcho.poll() is None, output
            assert "stopped (rc=" not in output, output
            for name in ("web.1", "upload.1", "segment.1", "segment.4", "encrypt.1", "ingest.1",
                         "ops.1"):
                assert f"{name} started" in output, (name, output)
        finally:
            stop_process(honcho)


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
        self, ops: str, fleet: Fleet, browser: Browser, copy_clip: Path, long_hd_clip: Path,
        request: pytest.FixtureRequest,
    ) -> None:
        # Given metrics before any job: queue series for every queue, no job succeeded yet
        status, headers, before = get(ops + "/metrics")
        assert status == 200 and str(headers["Content-Type"]).startswith("text/plain")
        for queue in ("probe", "segment", "encrypt", "publish"):
            assert series(before, "hlsvault_queue_messages", queue=queue, state="queued") == 0
            assert series(before, "hlsvault_queue_dead_letters", queue=queue) == 0
            assert series(before, "hlsvault_queue_oldest_message_age_seconds", queue=queue) == 0
        assert series(before, "hlsvault_jobs", status="succeeded") == 0
        # (a worker counts once it has sent its first heartbeat, moments after it starts)
        deadline = time.monotonic() + 30
        while (series(before, "hlsvault_workers_alive") or 0) < 1 and time.monotonic() < deadline:
            time.sleep(0.2)
            before = get(ops + "/metrics")[2]
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
            screenshot(page, request, "running-job")

            # and a queued job is cancelled from its page, and ends so
            page.goto(f"{ops}/jobs/{doomed}")
            with page.expect_navigation():
                page.click("#cancel")
            assert page.url == f"{ops}/jobs/{doomed}"
            assert page.inner_text("#job-status") == "cancelled"
            screenshot(page, request, "cancelled-job")

            # and the finished job shows every stage done, and its preview plays
            assert wait_for_job(fleet, quick, timeout=60)["status"] == "succeeded"
            page.goto(f"{ops}/jobs/{quick}")
            statuses = page.locator("#stages tr td:nth-child(2)").all_inner_texts()
            assert len(statuses) == 6 and set(statuses) == {"done"}, statuses
            page.wait_for_function(
                "s => document.getElementById('preview').currentTime > s",
                arg=PLAYED_S, timeout=LIVE_TIMEOUT_MS, polling=100,
            )
            screenshot(page, request, "finished-job-preview")
            # (under the strict CSP: scripts, styles, playlists, keys and segments all allowed)
            assert not [m for m in console if "Content Security Policy" in m], console

            # and the failed job is retried as a new job with the same spec
            assert wait_for_job(fleet, failed, timeout=60)["status"] == "failed"
            page.goto(f"{ops}/jobs/{failed}")
            assert page.inner_text("#job-error").strip(), "a failed job shows its reason"
            screenshot(page, request, "failed-job")
            page.click("#retry")
            page.wait_for_url(re.compile(r".*/jobs/[0-9a-f]{32}$"))
            retried = page.url.rsplit("/", 1)[1]
            assert retried != failed
            assert "retry of" in page.inner_text("main")
            screenshot(page, request, "retried-job")

            # and the jobs list shows them all; filtered by status, only the failed ones
            page.goto(f"{ops}/?status=failed")
            page.wait_for_selector(f"a[href='/jobs/{failed}']")
            listed = page.locator("#jobs tr td:nth-child(2)").all_inner_texts()
            assert listed and set(listed) == {"failed"}, listed
            page.goto(f"{ops}/")
            for job in (quick, long, failed, doomed, retried):
                page.wait_for_selector(f"a[href='/jobs/{job}']", timeout=5000)
            assert page.locator("#throughput rect").count() == 24
            screenshot(page, request, "jobs-list")
            assert not [m for m in console if "Content Security Policy" in m], console
        finally:
            screenshot(page, request, "last-page")
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
