"""CORS, in-process: the origins in HLSVAULT_CORS_ORIGINS, and only those, are answered with
their origin and credentials allowed, refusals and errors included; '*' is refused at start."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from pipeline.errors import ConfigurationError
from pipeline.settings import load_settings

from keyserver_support import (
    ASSET,
    VIEWER_IP,
    AppClient,
    Library,
    assert_json_error,
    shared_library,
)

APP_ORIGIN = "https://app.example"
CORS_ORIGINS = f"{APP_ORIGIN},http://127.0.0.1:9999"


@pytest.fixture(scope="module")
def library(tmp_path_factory: pytest.TempPathFactory, copy_clip: Path) -> Library:
    return shared_library(tmp_path_factory, copy_clip)


@pytest.fixture
def client(library: Library) -> Iterator[AppClient]:
    with AppClient(library.app(HLSVAULT_CORS_ORIGINS=CORS_ORIGINS), client_ip=VIEWER_IP) as app:
        yield app


class TestCors:
    def test_listed_origins_get_their_origin_and_credentials_back(
        self, client: AppClient, library: Library
    ) -> None:
        """A GET from either listed origin (served, refused, or not found) carries exactly that
        origin in Access-Control-Allow-Origin, never '*', with credentials allowed and Vary:
        Origin."""
        token = library.token()
        kinds = {"served": {"token": token}, "refused": None}
        responses = {
            (origin, kind): client.get(library.key_path(), headers={"Origin": origin},
                                       params=params)
            for origin in (APP_ORIGIN, "http://127.0.0.1:9999")
            for kind, params in kinds.items()
        }
        responses[(APP_ORIGIN, "not found")] = client.get(f"/v1/keys/{ASSET}/",
                                                          headers={"Origin": APP_ORIGIN})
        statuses = {"served": 200, "refused": 401, "not found": 404}
        assert {pair: r.status_code for pair, r in responses.items()} == {
            pair: statuses[pair[1]] for pair in responses
        }
        for (origin, _), response in responses.items():
            assert response.headers["access-control-allow-origin"] == origin
            assert response.headers["access-control-allow-credentials"] == "true"
            assert "origin" in response.headers["vary"].lower()
        assert_json_error(responses[(APP_ORIGIN, "not found")], 404)

    def test_preflight_for_a_key_with_an_authorization_header_is_allowed(
        self, client: AppClient, library: Library
    ) -> None:
        """An OPTIONS preflight from a listed origin for GET with Authorization and
        X-Hlsvault-Sid is answered 2xx, allowing that origin, GET, both headers and
        credentials."""
        response = client.request("OPTIONS", library.key_path(), headers={
            "Origin": APP_ORIGIN,
            "Access-Control-Request-Method": "GET",
            "Access-Control-Request-Headers": "authorization, x-hlsvault-sid",
        })
        assert response.status_code in (200, 204), response.text
        assert response.headers["access-control-allow-origin"] == APP_ORIGIN
        assert response.headers["access-control-allow-credentials"] == "true"
        assert "GET" in response.headers["access-control-allow-methods"]
        allowed = response.headers["access-control-allow-headers"].lower()
        assert "authorization" in allowed and "x-hlsvault-sid" in allowed

    def test_unlisted_origins_are_not_allowed(self, client: AppClient, library: Library) -> None:
        """A GET or a preflight from an origin not in HLSVAULT_CORS_ORIGINS gets no
        Access-Control-Allow-Origin, so the browser keeps the answer from the page."""
        evil = "https://evil.example"
        get = client.get(library.key_path(), params={"token": library.token()},
                         headers={"Origin": evil})
        preflight = client.request("OPTIONS", library.key_path(), headers={
            "Origin": evil, "Access-Control-Request-Method": "GET",
            "Access-Control-Request-Headers": "authorization",
        })
        lookalike = client.get(library.key_path(), headers={"Origin": APP_ORIGIN + ".evil"})
        for response in (get, preflight, lookalike):
            assert "access-control-allow-origin" not in response.headers
        assert preflight.status_code >= 400

    def test_embedded_cdn_answers_cors_for_listed_origins(
        self, client: AppClient, library: Library
    ) -> None:
        """Segments under /cdn/ in embedded mode carry Access-Control-Allow-Origin for a
        listed origin and none for an unlisted one, and always Vary: Origin."""
        segment_dir = library.origin / "assets" / ASSET / library.version / library.rendition
        segment = next(segment_dir.glob("*.ts"))
        path = "/cdn/" + segment.relative_to(library.origin).as_posix()
        listed = client.get(path, headers={"Origin": APP_ORIGIN})
        unlisted = client.get(path, headers={"Origin": "https://evil.example"})
        no_origin = client.get(path)

        assert (listed.status_code, listed.content) == (200, segment.read_bytes())
        assert listed.headers["access-control-allow-origin"] == APP_ORIGIN
        assert unlisted.status_code == 200
        assert "access-control-allow-origin" not in unlisted.headers
        # Segments are publicly cacheable for a year: a shared cache must key them by Origin,
        # or one origin's answer (with or without the header) is replayed to the others.
        for response in (listed, unlisted, no_origin):
            assert "public" in response.headers["cache-control"]
            assert "origin" in response.headers.get("vary", "").lower()

    def test_without_cors_settings_no_origin_is_allowed(self, library: Library) -> None:
        """With HLSVAULT_CORS_ORIGINS unset, even the app's own origin gets no CORS headers."""
        with AppClient(library.app(), client_ip=VIEWER_IP) as client:
            response = client.get(library.key_path(), params={"token": library.token()},
                                  headers={"Origin": APP_ORIGIN})
        assert response.status_code == 200
        assert "access-control-allow-origin" not in response.headers

    @pytest.mark.parametrize("origins", ["*", f"{APP_ORIGIN},*", " * "])
    def test_wildcard_origin_is_a_configuration_error(
        self, library: Library, origins: str
    ) -> None:
        """HLSVAULT_CORS_ORIGINS containing '*' fails at load time, naming the setting."""
        with pytest.raises(ConfigurationError, match="HLSVAULT_CORS_ORIGINS"):
            load_settings({**library.env, "HLSVAULT_CORS_ORIGINS": origins})
