"""The ops app on a running fleet: Basic auth, Prometheus metrics, and the dashboard in Chromium.

The ops process is started from the Procfile (`ops`), like the workers and the key server.
Screenshots of every page the browser visits are left under test-artifacts/dashboard/.
"""

from __future__ import annotations

import base64
import os
import re
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, replace
from email.message import Message
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from playwright.sync_api import Browser, Page
from redis import Redis
from starlette.testclient import TestClient

from dashboard.app import create_app
from dashboard.assets import HLS_JS
from dashboard.auth import DISABLED, CsrfTokens
from dashboard.metrics import THROUGHPUT_BUCKET_S
from pipeline.jobs import JobSpec, JobStore, new_job_spec
from pipeline.jobs.redis import RedisRecordBackend
from pipeline.parked import PARKED_CAP, ParkingLot
from pipeline.redisconn import connect
from pipeline.services import Services, build_services
from pipeline.settings import Settings, load_settings

from fleet import Fleet, RedisServer, stop_process
from support import ROOT, VENV_BIN, free_port, wait_for_http, wait_for_port
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


def local_ops_for(settings: Settings) -> LocalOps:
    services = build_services(settings)
    submitted: list[JobSpec] = []

    def submit(spec: JobSpec) -> None:
        services.jobs.create(spec)
        submitted.append(spec)

    app = create_app(settings, services=services, submit=submit)
    client = TestClient(app, base_url="http://ops.test", headers={"Authorization": basic(PASSWORD)})
    return LocalOps(client, services, submitted)


@pytest.fixture
def local_ops(tmp_path: Path) -> LocalOps:
    return local_ops_for(load_settings(
        {"HLSVAULT_DATA_DIR": str(tmp_path), "HLSVAULT_OPS_PASSWORD": PASSWORD}
    ))


def csrf_token(client: TestClient, job_id: str, action: str) -> str:
    """The CSRF token of the ``action`` form on the job's page ("" if there is no such form)."""
    match = re.search(
        rf'action="/jobs/\w+/{action}"><input type=hidden name=csrf value="(\w+)"',
        client.get(f"/jobs/{job_id}").text,
    )
    return match.group(1) if match else ""


def succeeded_job(services: Services, asset: str = "film") -> JobSpec:
    spec = new_job_spec(f"/videos/{asset}.mp4", asset=asset)
    services.jobs.create(spec)
    services.jobs.succeed(spec.job_id, {})
    return spec


def ed25519_pems() -> tuple[str, str]:
    """A fresh Ed25519 key pair as (public PEM, private PEM)."""
    key = Ed25519PrivateKey.generate()
    public = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption())
    return public.decode(), private.decode()


class TestInProcess:
    def test_without_a_password_only_healthz_and_the_webhook_are_served(
        self, tmp_path: Path
    ) -> None:
        """No password: the health check answers, and every page says what to set (503)."""
        settings = load_settings({"HLSVAULT_DATA_DIR": str(tmp_path)})
        client = TestClient(create_app(settings), base_url="http://ops.test")
        assert client.get("/healthz").text == "ok\n"
        for path in ("/", "/metrics", "/api/jobs", "/jobs/x"):
            refused = client.get(path, headers={"Authorization": basic("anything")})
            assert refused.status_code == 503, path
            assert "set HLSVAULT_OPS_PASSWORD" in refused.text, path
        webhook = client.post("/v1/jobs", content=b"{}")
        assert webhook.status_code == 503
        assert webhook.json()["error"] == (
            "the webhook is disabled: set HLSVAULT_WEBHOOK_SECRET on the ops process")

    def test_basic_auth_is_checked_but_the_webhook_is_not_behind_it(
        self, local_ops: LocalOps
    ) -> None:
        anonymous = TestClient(local_ops.client.app, base_url="http://ops.test")
        for header in ({}, {"Authorization": basic("wrong")}, {"Authorization": "Basic !!!"}):
            refused = anonymous.get("/", headers=header)
            assert refused.status_code == 401
            assert refused.headers["WWW-Authenticate"].startswith('Basic realm="hlsvault ops"')
            assert "log in as user 'ops' with HLSVAULT_OPS_PASSWORD" in refused.text
        assert anonymous.get("/healthz").text == "ok\n"
        # the webhook answers for itself: unconfigured here, and it says so
        webhook = anonymous.post("/v1/jobs", content=b"{}")
        assert "WWW-Authenticate" not in webhook.headers, webhook.text
        assert webhook.status_code == 503
        assert "set HLSVAULT_WEBHOOK_SECRET" in webhook.json()["error"]

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

        # Then each says why, and nothing changed
        assert [(r.status_code, r.text.split(";")[0]) for r in refused] == [
            (403, "bad or missing CSRF token"), (403, "bad or missing CSRF token"),
            (403, "cross-origin form post refused")]
        assert local_ops.services.jobs.get(spec.job_id).status == "queued"
        # and with the token from its own origin, the job is cancelled and its page says so
        done = client.post(url, data={"csrf": token}, headers={"Origin": "http://ops.test"})
        assert done.url.path == f"/jobs/{spec.job_id}"
        assert '<td id=job-status class=status-cancelled>cancelled</td>' in done.text

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
        assert new.version.endswith(new.job_id[:8])  # pipeline.layout's version rule
        assert client.get(f"/api/jobs/{new.job_id}").json()["retry_of"] == spec.job_id
        assert client.get(f"/api/jobs/{spec.job_id}").json()["retried_as"] == new.job_id
        assert f'retry of <a href="/jobs/{spec.job_id}">' in client.get(f"/jobs/{new.job_id}").text
        # and a job that has not failed offers no Retry, and is not retried when asked anyway
        assert csrf_token(client, new.job_id, "retry") == ""
        forged = client.post(f"/jobs/{new.job_id}/retry", data={"csrf": token})
        assert forged.status_code == 403 and len(local_ops.submitted) == 1
        # (a genuine token, as a page showing Retry before the job was retried once held)
        genuine = CsrfTokens(PASSWORD).token("retry", new.job_id)
        retried = client.post(f"/jobs/{new.job_id}/retry", data={"csrf": genuine})
        assert retried.status_code == 409
        assert "only failed or cancelled jobs are retried" in retried.text

    def test_an_unknown_job_or_status_says_so(self, local_ops: LocalOps) -> None:
        client = local_ops.client
        for path in ("/jobs/nosuchjob", "/api/jobs/nosuchjob"):
            missing = client.get(path)
            assert missing.status_code == 404, path
            assert missing.text.startswith("no job nosuchjob"), path
        for path in ("/?status=done", "/api/jobs?status=done"):
            unknown = client.get(path)
            assert unknown.status_code == 400, path
            assert "choose one of queued, running, succeeded, failed, cancelled" in unknown.text

    def test_metrics_count_jobs_by_status_and_time_finished_stages(
        self, local_ops: LocalOps
    ) -> None:
        jobs = local_ops.services.jobs
        for name in ("a", "b"):
            spec = new_job_spec(f"/videos/{name}.mp4", asset=name)
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
        # embedded mode has no queues or park to report, rather than zeros that look healthy
        assert series(text, "hlsvault_queue_messages") is None
        assert series(text, "hlsvault_ingest_parked") is None


class TestPreview:
    def test_a_succeeded_jobs_page_plays_it_with_hls_js_from_the_app(
        self, local_ops: LocalOps
    ) -> None:
        spec = succeeded_job(local_ops.services)
        html = local_ops.client.get(f"/jobs/{spec.job_id}").text
        assert re.search(r'<video id=preview [^>]*data-src="http://127\.0\.0\.1:8000/v1/assets/'
                         r'film/master\.m3u8\?token=ey[\w.-]+"', html), html
        assert '<script src="/static/hls.min.js"></script>' in html
        served = local_ops.client.get("/static/hls.min.js")
        assert served.status_code == 200
        assert served.headers["content-type"] == "text/javascript; charset=utf-8"
        assert served.content == HLS_JS.read_bytes()

    def test_with_only_a_public_key_the_page_says_why_there_is_no_preview(
        self, tmp_path: Path
    ) -> None:
        """Finding 3: EdDSA/RS256 with only the public key (the recommended setup) made the
        page mint a token and answer 500; now it shows the job and the reason."""
        public, _ = ed25519_pems()
        ops = local_ops_for(load_settings({
            "HLSVAULT_DATA_DIR": str(tmp_path), "HLSVAULT_OPS_PASSWORD": PASSWORD,
            "HLSVAULT_TOKEN_ALGORITHM": "EdDSA", "HLSVAULT_TOKEN_PUBLIC_KEY": public,
        }))
        spec = succeeded_job(ops.services)

        page = ops.client.get(f"/jobs/{spec.job_id}")

        assert page.status_code == 200
        assert "<video" not in page.text and "hls.min.js" not in page.text
        assert re.search(r"<p id=preview-unavailable class=note>No preview: this ops process "
                         r"cannot mint a viewer token \(minting EdDSA tokens needs "
                         r"HLSVAULT_TOKEN_PRIVATE_KEY", page.text), page.text

    def test_with_the_private_key_too_the_preview_plays(self, tmp_path: Path) -> None:
        public, private = ed25519_pems()
        ops = local_ops_for(load_settings({
            "HLSVAULT_DATA_DIR": str(tmp_path), "HLSVAULT_OPS_PASSWORD": PASSWORD,
            "HLSVAULT_TOKEN_ALGORITHM": "EdDSA", "HLSVAULT_TOKEN_PUBLIC_KEY": public,
            "HLSVAULT_TOKEN_PRIVATE_KEY": private,
        }))
        spec = succeeded_job(ops.services)
        assert "<video id=preview" in ops.client.get(f"/jobs/{spec.job_id}").text


#: A presigned S3 URL: everything after the path is a credential.
PRESIGNED = ("https://uploads.s3.amazonaws.com/film.mp4?X-Amz-Algorithm=AWS4-HMAC-SHA256"
             "&X-Amz-Credential=AKIASECRETCREDENTIAL%2F20250101%2Fus-east-1%2Fs3%2Faws4_request"
             "&X-Amz-Security-Token=SECRETSESSIONTOKEN&X-Amz-Signature=5ecre75i6na7ure")
CREDENTIALS = ("AKIASECRETCREDENTIAL", "SECRETSESSIONTOKEN", "5ecre75i6na7ure")


class TestRedaction:
    def test_no_view_shows_a_presigned_sources_credentials(self, local_ops: LocalOps) -> None:
        """Finding 7: /api/jobs/<id> returned the presigned source as it was, while the HTML
        page and the list redacted it. Every view now shows the same redacted record."""
        jobs = local_ops.services.jobs
        spec = new_job_spec(PRESIGNED, asset="film")
        jobs.create(spec)
        jobs.fail(spec.job_id, "probe", f"ffprobe could not open {PRESIGNED}")

        for path in (f"/api/jobs/{spec.job_id}", f"/jobs/{spec.job_id}", "/api/jobs",
                     "/api/jobs?status=failed", "/", "/?status=failed"):
            body = local_ops.client.get(path).text
            assert "[REDACTED]" in body, path
            assert not [c for c in CREDENTIALS if c in body], path
        shown = local_ops.client.get(f"/api/jobs/{spec.job_id}").json()
        assert shown["source"].startswith("https://uploads.s3.amazonaws.com/film.mp4?")
        assert shown["error"].startswith("ffprobe could not open https://uploads.s3.")
        assert shown["stages"][0]["error"] == shown["error"]


class TestSecurityHeaders:
    def test_every_response_forbids_framing_and_sniffing(self, local_ops: LocalOps) -> None:
        """Finding 8: no page may be framed by another site (it has Retry and Cancel
        buttons), whichever part of the app answered: a page, an error, the auth refusal."""
        spec = succeeded_job(local_ops.services)
        anonymous = TestClient(local_ops.client.app, base_url="http://ops.test")
        answers = {
            "jobs list": local_ops.client.get("/"),
            "job page": local_ops.client.get(f"/jobs/{spec.job_id}"),
            "unknown job": local_ops.client.get("/jobs/nope"),
            "unknown path": local_ops.client.get("/nope"),
            "JSON": local_ops.client.get("/api/jobs"),
            "metrics": local_ops.client.get("/metrics"),
            "static": local_ops.client.get("/static/live.js"),
            "health": anonymous.get("/healthz"),
            "no credentials": anonymous.get("/"),
            "webhook": anonymous.post("/v1/jobs", content=b"{}"),
        }
        for name, response in answers.items():
            csp = response.headers.get("content-security-policy", "")
            assert response.headers.get("x-frame-options") == "DENY", name
            assert "frame-ancestors 'none'" in csp, name
            assert "script-src 'self';" in csp and "style-src 'self';" in csp, name
            assert "unsafe" not in csp, name
            assert response.headers.get("x-content-type-options") == "nosniff", name

    def test_pages_hold_no_inline_script_or_style(self, local_ops: LocalOps) -> None:
        """The strict policy refuses inline script and style, so the pages carry none."""
        spec = succeeded_job(local_ops.services)
        for path in ("/", f"/jobs/{spec.job_id}"):
            html = local_ops.client.get(path).text
            assert re.findall(r"<script(?![^>]*\ssrc=)[^>]*>", html) == [], path
            assert "<style" not in html and " style=" not in html, path
            for src in re.findall(r'<(?:script src|link rel=stylesheet href)="([^"]+)"', html):
                assert local_ops.client.get(src).status_code == 200, src


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
            # (under the strict CSP: scripts, styles, playlists, keys and segments all allowed)
            assert not [m for m in console if "Content Security Policy" in m], console

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
            assert not [m for m in console if "Content Security Policy" in m], console
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
