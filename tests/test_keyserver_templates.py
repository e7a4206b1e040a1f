"""Playlists are rendered once per version and rendition, and each viewer still gets a copy
with only its own token, session and signature in it."""

from __future__ import annotations

from pathlib import Path

import pytest

from keyserver.templates import QUERY, SIGNATURE, PlaylistTemplates
from keyserver.testing import get
from pipeline.tokens import mint_token

from keyserver_support import ASSET, Library, key_uris, shared_library, uris
from support import run_coroutine


@pytest.fixture(scope="module")
def library(tmp_path_factory: pytest.TempPathFactory, copy_clip: Path) -> Library:
    return shared_library(tmp_path_factory, copy_clip)


def lines(query: str, signature: str) -> str:
    """A stand-in playlist that places its two values as a playlist does."""
    return (f'#EXT-X-KEY:METHOD=AES-128,URI="https://k.test/v1/keys/a/v/0{query}"\n'
            f"https://cdn.test/a/v/r/seg_00000.ts{signature}\n")


class TestPlaylistTemplates:
    @pytest.mark.parametrize(("query", "signature"), [
        ("", ""),
        ("?token=a.b.c", "?Policy=x&Signature=y&Key-Pair-Id=K"),
        ("?token=a%2Bb&sid=s%20t", ""),
        ("?auth=cookie", "?Policy=" + "p" * 5000),
    ])
    def test_a_template_gives_what_rendering_gives(self, query: str, signature: str) -> None:
        templates = PlaylistTemplates()
        templates.render("warm", lines, "?token=first", "?sig=first")
        assert templates.render("warm", lines, query, signature) == lines(query, signature)

    def test_each_playlist_is_rendered_once_and_the_cache_is_bounded(self) -> None:
        rendered: list[tuple[str, str]] = []

        def counted(query: str, signature: str) -> str:
            rendered.append((query, signature))
            return lines(query, signature)

        templates = PlaylistTemplates(max_templates=2)
        for key in ("a", "a", "b", "a", "c", "b", "a"):
            templates.render(key, counted, f"?token={key}")
        # a, b rendered; c evicts b (a was used last); b evicts a; a again.
        assert len(rendered) == 5
        assert rendered[0] == (QUERY, SIGNATURE)
        assert len(templates) == 2

    def test_the_stand_ins_differ_per_process_run_and_hold_a_nul(self) -> None:
        assert "\x00" in QUERY and "\x00" in SIGNATURE and QUERY != SIGNATURE


class TestViewersCopies:
    def test_two_viewers_each_get_only_their_own_token_and_session(
        self, library: Library
    ) -> None:
        """The same variant and master playlist, asked for by two viewers in turn (the
        second from the template the first filled): each viewer's key and variant URIs carry
        its own token (and session), never the other's."""
        app = library.app()
        first = library.token()
        second = mint_token(library.settings.token_secret, ASSET, 300, sid="viewer-2")

        async def fetch() -> dict[tuple[str, str], str]:
            bodies = {}
            for name, query in (("first", f"token={first}"),
                                ("second", f"token={second}&sid=viewer-2")):
                for route, path in (("variant", library.variant_path()),
                                    ("master", library.master_path())):
                    answer = await get(app, path, query=query)
                    assert answer.status == 200, answer.body
                    bodies[(name, route)] = answer.body.decode()
            return bodies

        bodies = run_coroutine(fetch())
        for name, token, other in (("first", first, second), ("second", second, first)):
            named = key_uris(bodies[(name, "variant")]) + uris(bodies[(name, "master")])
            assert named and all(f"token={token}" in uri for uri in named)
            assert not any(other in text for key, text in bodies.items() if key[0] == name)
            assert not any("\x00" in text for text in bodies.values())
        assert all(uri.endswith("&sid=viewer-2")
                   for uri in key_uris(bodies[("second", "variant")]))
