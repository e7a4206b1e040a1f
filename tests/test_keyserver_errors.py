"""Errors, in-process: every refusal and failure the docs list is a JSON body {"error": …} with
Cache-Control: no-store, Starlette's own (no route, no /cdn/ file, a wrong method) included,
and none of them carries a key."""

from __future__ import annotations

from pathlib import Path

import pytest
import structlog

from keyserver import create_app
from pipeline.catalog import Catalog
from pipeline.errors import TransientError
from pipeline.storage import LocalStore

from keyserver_support import (
    ASSET,
    VIEWER_IP,
    AppClient,
    Library,
    assert_json_error,
    shared_library,
)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory, copy_clip: Path) -> Library:
    return shared_library(tmp_path_factory, copy_clip)


class UnreadableVault(LocalStore):
    """A vault whose every read fails with ``error``: what an S3 outage looks like."""

    def __init__(self, root: Path, error: Exception) -> None:
        super().__init__(root)
        self.error = error

    def get_bytes(self, key: str) -> bytes:
        raise self.error


class TestRoutingErrors:
    @pytest.mark.parametrize("path", [
        "/v1/keys/{asset}/{version}/",  # a key path missing its index
        "/v1/keys/{asset}/{version}",
        "/v1/keys/{asset}/{version}/0/1",
        "/v1/assets/{asset}/",
        "/nothing/here",
        "/cdn/assets/{asset}/{version}/no-such-file.ts",
        "/cdn/",
    ])
    def test_unknown_paths_and_missing_cdn_files_are_json_404s(
        self, pristine: Library, path: str
    ) -> None:
        """Paths no route serves, and files the embedded /cdn/ does not hold, answer 404 with a
        JSON error and no-store, token or not."""
        target = path.format(asset=ASSET, version=pristine.version)
        with AppClient(pristine.app(), client_ip=VIEWER_IP) as client:
            response = client.get(target, params={"token": pristine.token()})
        assert assert_json_error(response, 404) == "not found"

    @pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH"])
    def test_other_methods_than_get_are_json_405s(self, pristine: Library, method: str) -> None:
        """A key, a playlist, /healthz or a /cdn/ file asked with another method than GET is
        405 with a JSON error, no-store and an Allow header naming GET."""
        segment = next((pristine.origin / "assets" / ASSET / pristine.version
                        / pristine.rendition).glob("*.ts"))
        paths = [pristine.key_path(), pristine.master_path(), pristine.variant_path(), "/healthz",
                 "/cdn/" + segment.relative_to(pristine.origin).as_posix()]
        with AppClient(pristine.app(), client_ip=VIEWER_IP) as client:
            responses = [client.request(method, p, params={"token": pristine.token()})
                         for p in paths]
        for response in responses:
            assert_json_error(response, 405)
            assert "GET" in response.headers["allow"]
            assert pristine.key() not in response.content


class TestDocumentedStatuses:
    def test_every_refusal_in_the_status_table_is_a_json_error(
        self, pristine: Library, tmp_path: Path
    ) -> None:
        """400, 401, 403, 404, 429 and 410 from the key endpoint, each a JSON error with
        no-store and without the key."""
        library = pristine.copy(tmp_path)
        app = library.app()
        token = library.token()
        with AppClient(app, client_ip=VIEWER_IP) as client:
            answers = {
                400: client.get(f"/v1/keys/{ASSET}/{library.version}/01", params={"token": token}),
                401: client.get(library.key_path()),
                403: client.get(library.key_path(), params={"token": library.token("film-b")}),
                404: client.get(f"/v1/keys/nosuch/{library.version}/0",
                                params={"token": library.token("nosuch")}),
            }
        with AppClient(library.app(HLSVAULT_RATE_LIMIT_TOKEN="1"), client_ip=VIEWER_IP) as client:
            client.get(library.key_path(), params={"token": token})
            answers[429] = client.get(library.key_path(), params={"token": token})
        Catalog(library.vault).revoke(ASSET)
        with AppClient(library.app(), client_ip=VIEWER_IP) as client:
            answers[410] = client.get(library.key_path(), params={"token": token})

        for status, response in answers.items():
            assert_json_error(response, status)
            assert library.key() not in response.content
        assert answers[429].headers["retry-after"].isdigit()

    def test_a_key_that_fails_to_unwrap_is_a_500_logged_on_the_server(
        self, pristine: Library, tmp_path: Path
    ) -> None:
        """A wrapped key altered in the vault answers 500 "key unavailable" (JSON, no-store),
        and the server logs one error line naming the key but not its bytes."""
        library = pristine.copy(tmp_path)
        wrapped = library.data_dir / "vault" / "keys" / ASSET / library.version / "000000.key"
        blob = bytearray(wrapped.read_bytes())
        blob[-1] ^= 1
        wrapped.write_bytes(bytes(blob))
        with structlog.testing.capture_logs() as events, \
                AppClient(library.app(), client_ip=VIEWER_IP) as client:
            response = client.get(library.key_path(), params={"token": library.token()})

        assert assert_json_error(response, 500) == "key unavailable"
        errors = [e for e in events if e["log_level"] == "error"]
        assert [(e["event"], e["key_id"]) for e in errors] == [
            ("wrapped key does not authenticate", f"{library.version}/0")]
        assert library.key().hex() not in repr(errors)

    def test_a_vault_that_cannot_be_read_is_a_503(self, pristine: Library) -> None:
        """A transient vault failure (an S3 timeout) answers 503 with the error's reason, as a
        JSON error; a failure nobody planned for is a 500 whose body names no cause."""
        settings = pristine.settings
        outage = create_app(settings, vault=UnreadableVault(
            Path(settings.vault), TransientError("vault read timed out; retry")))
        broken = create_app(settings, vault=UnreadableVault(
            Path(settings.vault), RuntimeError("/secret/path/to/vault exploded")))
        token = pristine.token()
        with AppClient(outage, client_ip=VIEWER_IP) as client:
            unavailable = client.get(pristine.master_path(), params={"token": token})
        with AppClient(broken, client_ip=VIEWER_IP, raise_app_exceptions=False) as client:
            failed = client.get(pristine.master_path(), params={"token": token})

        assert assert_json_error(unavailable, 503) == "vault read timed out; retry"
        assert assert_json_error(failed, 500) == "internal error"
