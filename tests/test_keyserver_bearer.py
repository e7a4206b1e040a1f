"""Tokens in an Authorization: Bearer header, in-process: playlists and keys are served as for
?token=, and a tokenized master asked with the header alone still writes the token into the
URIs it returns (only cookie mode keeps it out of URLs)."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest

from keyserver_support import (
    ASSET,
    VIEWER_IP,
    AppClient,
    Library,
    assert_json_error,
    key_uris,
    shared_library,
    tamper,
    uris,
)


@pytest.fixture(scope="module")
def library(tmp_path_factory: pytest.TempPathFactory, copy_clip: Path) -> Library:
    return shared_library(tmp_path_factory, copy_clip)


class TestBearer:
    def test_bearer_header_gets_playlists_and_keys(self, library: Library) -> None:
        """Authorization: Bearer (any case of the scheme) gets the master, the variant and both
        keys; a tampered, an empty or another scheme's credential gets a 401 JSON error."""
        token = library.token()
        paths = [library.master_path(), library.variant_path(),
                 library.key_path(0), library.key_path(1)]
        with AppClient(library.app(), client_ip=VIEWER_IP) as client:
            good = [client.get(p, headers={"Authorization": f"Bearer {token}"}) for p in paths]
            lower = client.get(paths[2], headers={"Authorization": f"bearer {token}"})
            refused = [
                client.get(p, headers={"Authorization": credential})
                for p in paths
                for credential in (f"Bearer {tamper(token)}", "Bearer ", f"Basic {token}")
            ]

        assert [r.status_code for r in good] == [200] * 4
        assert good[0].text.startswith("#EXTM3U")
        assert "#EXT-X-KEY:METHOD=AES-128" in good[1].text
        assert [good[2].content, good[3].content] == [library.key(0), library.key(1)]
        assert (lower.status_code, lower.content) == (200, library.key(0))
        for response in refused:
            assert_json_error(response, 401)

    def test_a_tokenized_master_asked_with_the_header_writes_the_token_into_its_uris(
        self, library: Library
    ) -> None:
        """Without auth=cookie, the header's token lands in the variant URIs and, through them,
        in the key URIs: the header alone does not keep the token out of URLs."""
        token = library.token()
        bearer = {"Authorization": f"Bearer {token}"}
        with AppClient(library.app(), client_ip=VIEWER_IP) as client:
            master = client.get(library.master_path(), headers=bearer)
            (variant_uri,) = uris(master.text)
            variant = client.get(urlsplit(variant_uri).path, headers=bearer)

        assert parse_qs(urlsplit(variant_uri).query)["token"] == [token]
        assert [parse_qs(urlsplit(uri).query)["token"] for uri in key_uris(variant.text)] == [
            [token], [token]]
        assert urlsplit(variant_uri).path == f"/v1/assets/{ASSET}/{library.rendition}.m3u8"
