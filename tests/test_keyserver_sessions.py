"""Session binding, in-process, as docs/players.md states it: a token minted with a sid serves
only requests that present that sid (?sid= or the X-Hlsvault-Sid header), and the refusal says
how to send it; a token minted without one is bound to no session, whatever sid a request
carries; tokenized playlists pass ?sid= on into every URI they write."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest

from keyserver_support import (
    VIEWER_IP,
    AppClient,
    Library,
    assert_json_error,
    key_uris,
    shared_library,
    uris,
)

SID = "viewer-42"


@pytest.fixture(scope="module")
def library(tmp_path_factory: pytest.TempPathFactory, copy_clip: Path) -> Library:
    return shared_library(tmp_path_factory, copy_clip)


@pytest.fixture
def client(library: Library) -> Iterator[AppClient]:
    with AppClient(library.app(), client_ip=VIEWER_IP) as app:
        yield app


def paths(library: Library) -> list[str]:
    return [library.master_path(), library.variant_path(), library.key_path(0)]


class TestSessionBoundToken:
    def test_without_its_sid_it_is_refused_with_how_to_send_it(
        self, client: AppClient, library: Library
    ) -> None:
        """A sid-bound token presented alone (query or Bearer) is 403 on every endpoint, and the
        message names both ways of sending the sid."""
        token = library.token(sid=SID)
        refused = [client.get(p, params={"token": token}) for p in paths(library)]
        refused += [client.get(p, headers={"Authorization": f"Bearer {token}"})
                    for p in paths(library)]
        for response in refused:
            message = assert_json_error(response, 403)
            assert "?sid=" in message and "X-Hlsvault-Sid" in message, message

    def test_with_another_sid_it_is_refused(self, client: AppClient, library: Library) -> None:
        """Another sid, in the query or the header, is 403 too, naming the same two ways."""
        token = library.token(sid=SID)
        by_query = client.get(library.key_path(), params={"token": token, "sid": "viewer-43"})
        by_header = client.get(library.key_path(), params={"token": token},
                               headers={"X-Hlsvault-Sid": "viewer-43"})
        for response in (by_query, by_header):
            assert "X-Hlsvault-Sid" in assert_json_error(response, 403)

    def test_with_its_sid_as_query_or_header_it_is_served(
        self, client: AppClient, library: Library
    ) -> None:
        """With its sid as ?sid= or as X-Hlsvault-Sid (e.g. beside a Bearer header, as README's
        `hlsvault token --sid` suggests), every endpoint answers 200, the key its bytes."""
        token = library.token(sid=SID)
        by_query = [client.get(p, params={"token": token, "sid": SID}) for p in paths(library)]
        by_header = [client.get(p, headers={"Authorization": f"Bearer {token}",
                                            "X-Hlsvault-Sid": SID}) for p in paths(library)]
        assert [r.status_code for r in by_query + by_header] == [200] * 6
        assert by_query[2].content == by_header[2].content == library.key(0)


class TestUnboundToken:
    def test_a_token_without_sid_ignores_the_sid_a_request_carries(
        self, client: AppClient, library: Library
    ) -> None:
        """A token minted without sid is served with no sid, with any ?sid= and with any
        X-Hlsvault-Sid header: it is bound to no session."""
        token = library.token()
        variants = [{}, {"params": {"sid": "anything"}}, {"headers": {"X-Hlsvault-Sid": "x"}}]
        served = []
        for extra in variants:
            params = {"token": token, **extra.get("params", {})}
            served += [client.get(p, params=params, headers=extra.get("headers"))
                       for p in paths(library)]
        assert [r.status_code for r in served] == [200] * 9
        assert {r.content for r in served[2::3]} == {library.key(0)}


class TestTokenizedPlaylists:
    def test_sid_is_passed_on_into_every_uri_and_the_chain_plays(
        self, client: AppClient, library: Library
    ) -> None:
        """master.m3u8?token=…&sid=… writes token and sid into its variant URIs, the variant
        into its key URIs, and following them gets both keys."""
        token = library.token(sid=SID)
        master = client.get(library.master_path(), params={"token": token, "sid": SID})
        (variant_uri,) = uris(master.text)
        variant = client.get(variant_uri)
        keys = [client.get(uri) for uri in key_uris(variant.text)]

        for uri in [variant_uri, *key_uris(variant.text)]:
            query = parse_qs(urlsplit(uri).query)
            assert (query["token"], query["sid"]) == ([token], [SID]), uri
        assert [(r.status_code, r.content) for r in keys] == [
            (200, library.key(0)), (200, library.key(1))]
