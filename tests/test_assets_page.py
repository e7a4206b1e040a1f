"""The ops app's Assets page: every asset with its versions, and Re-key / Revoke behind a
confirmation step and a CSRF token. In Chromium: Revoke after confirmation makes the asset's
keys answer 410."""

from __future__ import annotations

import base64
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser
from starlette.testclient import TestClient

from dashboard.app import create_app
from keyserver.state import STATE_TTL_S
from keyserver.stats import KeyRequestStats
from pipeline import keystats
from pipeline.settings import load_settings

from fleet import RedisServer, stop_process
from keyserver_support import ASSET, OTHER, VIEWER_IP, AppClient, Library, shared_library
from support import HLSVAULT, free_port, run_coroutine, wait_for_http

PASSWORD = "assets-page-password-0123456789"


@pytest.fixture
def library(tmp_path_factory: pytest.TempPathFactory, copy_clip: Path, tmp_path: Path) -> Library:
    """A private copy of the key server tests' library: these tests revoke and re-key."""
    return shared_library(tmp_path_factory, copy_clip).copy(tmp_path)


def ops_client(library: Library, submitted: list[object]) -> TestClient:
    loaded = load_settings({**library.env, "HLSVAULT_OPS_PASSWORD": PASSWORD})
    app = create_app(loaded, submit=submitted.append)
    basic = base64.b64encode(f"ops:{PASSWORD}".encode()).decode()
    return TestClient(app, base_url="http://ops.test", headers={"Authorization": f"Basic {basic}"})


def csrf_of(html: str) -> str:
    found = re.search(r'name=csrf value="([0-9a-f]+)"', html)
    assert found, html
    return found.group(1)


class TestAssetsList:
    def test_lists_every_asset_with_its_current_version(self, library: Library) -> None:
        with ops_client(library, []) as client:
            response = client.get("/assets")
        assert response.status_code == 200
        row = re.search(r'<tr id="asset-film">(.*?)</tr>', response.text)
        assert row and library.version in row.group(1) and library.rendition in row.group(1)
        assert f'<tr id="asset-{OTHER}">' in response.text
        assert "cdn-signing" in response.text

    def test_an_asset_shows_its_retired_versions_with_their_shred_time(
        self, library: Library
    ) -> None:
        with ops_client(library, []) as client:
            response = client.get(f"/assets/{ASSET}")
        assert response.status_code == 200
        versions = re.findall(r"<tr class=version><td>([^<]+)</td>", response.text)
        assert versions == [library.version, library.old_version]
        assert "keys served until" in response.text or "keys withdrawn" in response.text

    def test_an_unknown_asset_is_404_and_a_malformed_one_400(self, library: Library) -> None:
        with ops_client(library, []) as client:
            assert client.get("/assets/nothing-here").status_code == 404
            assert client.get("/assets/bad%20id").status_code == 400


class TestAssetActions:
    def test_revoke_needs_the_confirmation_pages_token_and_confirm(
        self, library: Library
    ) -> None:
        with ops_client(library, []) as client:
            page = client.get(f"/assets/{ASSET}/revoke")
            token = csrf_of(page.text)
            no_token = client.post(f"/assets/{ASSET}/revoke", data={"confirm": ASSET})
            other_token = client.post(f"/assets/{OTHER}/revoke",
                                      data={"csrf": token, "confirm": OTHER})
            unconfirmed = client.post(f"/assets/{ASSET}/revoke", data={"csrf": token})
            cross = client.post(f"/assets/{ASSET}/revoke", data={"csrf": token, "confirm": ASSET},
                                headers={"Origin": "https://evil.example"})
            assert [no_token.status_code, other_token.status_code, unconfirmed.status_code,
                    cross.status_code] == [403, 403, 400, 403]
            # still published: none of them did anything
            assert "published" in client.get(f"/assets/{ASSET}").text
            done = client.post(f"/assets/{ASSET}/revoke", data={"csrf": token, "confirm": ASSET},
                               follow_redirects=False)
        assert done.status_code == 303 and done.headers["location"] == f"/assets/{ASSET}"

    def test_rekey_submits_a_rekey_job(self, library: Library) -> None:
        submitted: list[object] = []
        with ops_client(library, submitted) as client:
            token = csrf_of(client.get(f"/assets/{ASSET}/rekey").text)
            done = client.post(f"/assets/{ASSET}/rekey", data={"csrf": token, "confirm": ASSET},
                               follow_redirects=False)
        assert done.status_code == 303
        (spec,) = submitted
        assert spec.kind == "rekey" and spec.previous_version == library.version  # type: ignore[attr-defined]
        assert done.headers["location"] == f"/jobs/{spec.job_id}"  # type: ignore[attr-defined]


class TestRequestCounts:
    def test_key_requests_are_counted_per_asset_by_outcome(
        self, redis_server: RedisServer
    ) -> None:
        stats = KeyRequestStats(redis_server.url)

        async def count() -> None:
            for outcome in ("served", "served", "gone"):
                await stats.count(outcome, asset="film")
            await stats.count("served", asset="not an id")

        run_coroutine(count())
        client = redis_server.client()
        assert keystats.last_hour(client, ["film", "film-b"]) == {
            "film": {"served": 2, "gone": 1}, "film-b": {}}
        assert not client.keys("hlsvault:stats:asset:not an id*")


@pytest.fixture
def ops_server(library: Library, tmp_path: Path) -> Iterator[str]:
    port = free_port()
    env = {**library.env, "HLSVAULT_OPS_PASSWORD": PASSWORD, "OPS_PORT": str(port)}
    log = (tmp_path / "ops.log").open("wb")
    process = subprocess.Popen([HLSVAULT[0], "-m", "dashboard"], env=env, stdout=log,
                               stderr=subprocess.STDOUT, start_new_session=True,
                               cwd=library.data_dir.parent)
    try:
        wait_for_http(f"http://127.0.0.1:{port}/healthz")
        yield f"http://127.0.0.1:{port}"
    finally:
        stop_process(process)
        log.close()


def test_revoke_in_chromium_after_confirmation_answers_410(
    browser: Browser, library: Library, ops_server: str
) -> None:
    context = browser.new_context(http_credentials={"username": "ops", "password": PASSWORD})
    page = context.new_page()
    try:
        # Given the Assets page lists the published asset with its versions
        page.goto(f"{ops_server}/assets")
        assert library.version in page.inner_text(f"#asset-{ASSET}")
        page.click(f"#asset-{ASSET} a")
        assert page.inner_text("#asset-status") == "published"
        assert library.old_version in page.inner_text("#versions")
        # When the operator asks to revoke it, then confirms
        page.click("#revoke")
        assert "cannot be undone" in page.inner_text("main")
        with AppClient(library.app(), client_ip=VIEWER_IP) as keys:
            before = keys.get(f"{library.key_path(0)}?token={library.token()}")
            page.click("#confirm")
            page.wait_for_url(f"{ops_server}/assets/{ASSET}")
            # Then the page says so, and its keys answer 410 (within the state cache's TTL: an
            # embedded key server hears of no announcement)
            assert page.inner_text("#asset-status") == "revoked"
            deadline = time.monotonic() + STATE_TTL_S + 3
            after = keys.get(f"{library.key_path(0)}?token={library.token()}")
            while after.status_code == 200 and time.monotonic() < deadline:
                time.sleep(0.2)
                after = keys.get(f"{library.key_path(0)}?token={library.token()}")
        assert (before.status_code, after.status_code) == (200, 410)
    finally:
        page.screenshot(path=str(library.data_dir.parent / "assets-page.png"))
        context.close()
