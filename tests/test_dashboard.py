"""The ops app in-process over embedded-mode stores: pages, actions and CSRF, the preview, one
redaction for every view, and the security headers on every response."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from starlette.testclient import TestClient

from dashboard.app import create_app
from dashboard.assets import HLS_JS
from dashboard.auth import CsrfTokens
from dashboard.metrics import job_progress
from pipeline.jobs import JobRecord, new_job_spec
from pipeline.services import build_services
from pipeline.settings import load_settings

from ops_support import (
    PASSWORD,
    LocalOps,
    basic,
    csrf_token,
    ed25519_pems,
    local_ops_for,
    series,
    succeeded_job,
)
from support import free_port


@pytest.fixture
def local_ops(tmp_path: Path) -> LocalOps:
    return local_ops_for(load_settings(
        {"HLSVAULT_DATA_DIR": str(tmp_path), "HLSVAULT_OPS_PASSWORD": PASSWORD}
    ))


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


class TestWithoutAFleet:
    def test_retry_on_embedded_stores_says_it_needs_the_fleet(self, tmp_path: Path) -> None:
        """An ops app with no REDIS_URL has no worker: Retry answers 503 with what to do and
        records no job that nobody would ever run."""
        settings = load_settings(
            {"HLSVAULT_DATA_DIR": str(tmp_path), "HLSVAULT_OPS_PASSWORD": PASSWORD}
        )
        client = TestClient(create_app(settings), base_url="http://ops.test",
                            headers={"Authorization": basic(PASSWORD)})
        services = build_services(settings)
        spec = new_job_spec("/videos/film.mp4", asset="film")
        services.jobs.create(spec)
        services.jobs.fail(spec.job_id, "probe", "no such file")

        done = client.post(f"/jobs/{spec.job_id}/retry",
                           data={"csrf": csrf_token(client, spec.job_id, "retry")},
                           follow_redirects=False)

        assert done.status_code == 503
        assert "set REDIS_URL" in done.json()["error"]
        assert done.headers["x-frame-options"] == "DENY"
        assert [r.spec.job_id for r in services.jobs.recent(10)] == [spec.job_id]


    @pytest.mark.slow  # waits out the Redis client's bounded reconnects
    def test_a_redis_that_does_not_answer_is_a_503_with_the_mend(self, tmp_path: Path) -> None:
        """The fleet's figures need Redis: when it does not answer, /metrics and /api/fleet say
        so as JSON with a 503 (and the security headers), never a bare 500."""
        from redis import Redis

        settings = load_settings(
            {"HLSVAULT_DATA_DIR": str(tmp_path), "HLSVAULT_OPS_PASSWORD": PASSWORD}
        )
        dead = Redis(host="127.0.0.1", port=free_port(), socket_connect_timeout=0.5)
        client = TestClient(create_app(settings, redis=dead), base_url="http://ops.test",
                            headers={"Authorization": basic(PASSWORD)})

        for path in ("/metrics", "/api/fleet"):
            answer = client.get(path)
            assert answer.status_code == 503, path
            assert "check REDIS_URL" in answer.json()["error"]
            assert answer.headers["x-frame-options"] == "DENY"


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


def test_a_get_of_the_webhook_is_a_json_405(local_ops: LocalOps) -> None:
    """Every answer of the webhook route is JSON, the wrong method included."""
    answer = local_ops.client.get("/v1/jobs")
    assert answer.status_code == 405
    assert answer.json() == {"error": "Method Not Allowed"}
    assert answer.headers["allow"] == "POST" and answer.headers["cache-control"] == "no-store"


class TestJobProgress:
    """The dashboard's job progress counts every stage the job will run, so it only grows."""

    @staticmethod
    def record(stages: dict[str, tuple[str, float]], **fields: object) -> JobRecord:
        spec = new_job_spec("talk.mp4")
        raw = {"spec": json.dumps(spec.to_dict()), "status": "running"}
        raw.update({name: json.dumps(value) for name, value in fields.items()})
        for name, (status, progress) in stages.items():
            raw[f"{name}.status"] = status
            raw[f"{name}.progress"] = str(progress)
        return JobRecord.from_fields(raw, job_id=spec.job_id)

    def test_queuing_the_chunks_does_not_move_it_back(self) -> None:
        """Probed with four chunks planned: queuing the four segment stages leaves the figure
        as it was (the old mean of present stages fell from 1.0 to 0.2)."""
        planned = {"chunk_names": ["c000", "c001", "c002", "c003"], "audio_bitrates": []}
        probed = self.record({"probe": ("done", 1.0)}, **planned)
        queued = self.record(
            {"probe": ("done", 1.0), **{f"segment:c00{i}": ("queued", 0.0) for i in range(4)}},
            **planned,
        )
        assert job_progress(probed) == job_progress(queued) == 1 / 12

    def test_half_the_chunks_segmented_is_a_share_of_the_whole_job(self) -> None:
        planned = {"chunk_names": ["c000", "c001"], "audio_bitrates": [128]}
        record = self.record(
            {"probe": ("done", 1.0), "audio": ("done", 1.0), "segment:c000": ("done", 1.0),
             "segment:c001": ("running", 0.5), "encrypt:c000": ("running", 0.5)},
            **planned,
        )
        # probe, audio, segment ×2, encrypt ×2, playlist, upload, invalidate: 9 stages
        assert job_progress(record) == pytest.approx(4.0 / 9)

    def test_an_audio_group_beside_the_chunks_is_a_stage_still_to_run(self) -> None:
        """Separate audio renditions of a chunked job: every chunk encrypted while the audio
        group still runs is not the job nearly done (the playlist waits for both)."""
        planned = {"chunk_names": ["c000", "c001"], "audio_bitrates": [],
                   "audio_renditions": [{"name": "audio0-en"}]}
        record = self.record(
            {"probe": ("done", 1.0), "audio": ("running", 0.0),
             **{f"{stage}:c00{i}": ("done", 1.0) for stage in ("segment", "encrypt")
                for i in range(2)}},
            **planned,
        )
        # probe, audio, segment ×2, encrypt ×2, playlist, upload, invalidate: 9 stages
        assert job_progress(record) == pytest.approx(5.0 / 9)

    def test_before_the_probe_plans_chunks_it_is_the_mean_of_present_stages(self) -> None:
        assert job_progress(self.record({"probe": ("running", 0.5)})) == 0.5
