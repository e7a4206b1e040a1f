"""The key server end to end: clips packaged with the real CLI, `hlsvault serve` over real HTTP.

Playlists and keys go only to holders of a token for the asset; segments on the origin are
ciphertext that the catalog's keys and RFC 8216 IVs turn back into MPEG-TS; neither the origin
nor the server's log ever holds a key or a token.
"""

from __future__ import annotations

import http.client
import json
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from pipeline.keys import KeyVault
from pipeline.settings import decode_master_key
from pipeline.storage import LocalStore

from keyserver_support import ASSET, OTHER, Library, shared_library, tamper
from support import Hlsvault, free_port, serving

TS_PACKET = 188
TS_SYNC = 0x47
#: Every refused request, for every endpoint: (token kind) -> status.
REFUSALS = {"none": 401, "tampered": 401, "expired": 401, "other-asset": 403}


@dataclass
class Packaged:
    """The session's packaged library, and one `hlsvault serve` in front of it for the module."""

    hv: Hlsvault
    library: Library
    asset: str
    version: str
    rendition: str
    url: str  # what `hlsvault url` printed
    token: str  # the token in that URL
    secret: str
    catalog: dict[str, Any]
    log: Path
    http: httpx.Client

    @property
    def master_path(self) -> str:
        return f"/v1/assets/{self.asset}/master.m3u8"

    @property
    def variant_path(self) -> str:
        return f"/v1/assets/{self.asset}/{self.rendition}.m3u8"

    def key_path(self, index: int) -> str:
        return f"/v1/keys/{self.asset}/{self.version}/{index}"

    def mint(self, asset: str, *, exp: float) -> str:
        """A token signed with this environment's secret, for any asset and expiry."""
        now = int(time.time())
        return jwt.encode({"sub": asset, "iat": min(now, int(exp) - 60), "exp": int(exp)},
                          self.secret, algorithm="HS256")

    def get(self, path: str, token: str | None = None, **kwargs: Any) -> httpx.Response:
        params = {"token": token} if token is not None else None
        return self.http.get(path, params=params, **kwargs)

    def segments(self) -> list[dict[str, Any]]:
        (rendition,) = self.catalog["renditions"]
        segments: list[dict[str, Any]] = rendition["segments"]
        return segments

    def content_keys(self) -> dict[int, bytes]:
        """Every key of the version, read from the vault's key files with the master key."""
        master = decode_master_key((self.hv.data_dir / "secrets" / "master_key").read_text())
        store = LocalStore(self.hv.vault)
        vault = KeyVault(store, master)
        found = {}
        for name in store.list(f"keys/{self.asset}/{self.version}"):
            index = int(Path(name).stem)
            found[index] = vault.get(self.asset, self.version, index)
        return found


@pytest.fixture(scope="module")
def packaged(tmp_path_factory: pytest.TempPathFactory, copy_clip: Path) -> Iterator[Packaged]:
    """The session's library (``film`` is copy_clip packaged with the CLI), served by
    `hlsvault serve` for the whole module: every test here only reads."""
    library = shared_library(tmp_path_factory, copy_clip)
    port = free_port()
    hv = Hlsvault(env={**library.env, "HLSVAULT_PUBLIC_URL": f"http://127.0.0.1:{port}"},
                  data_dir=library.data_dir, port=port)
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    catalog_file = hv.vault / "catalog" / ASSET / "versions" / f"{library.version}.json"
    with serving(hv.env, port, log), httpx.Client(base_url=hv.public_url, timeout=10) as client:
        url = hv.url(ASSET)
        (token,) = parse_qs(urlsplit(url).query)["token"]
        yield Packaged(
            hv=hv,
            library=library,
            asset=ASSET,
            version=library.version,
            rendition=library.rendition,
            url=url,
            token=token,
            secret=library.settings.token_secret or "",
            catalog=json.loads(catalog_file.read_text()),
            log=log,
            http=client,
        )


def raw_get(hv: Hlsvault, target: str) -> int:
    """GET a request target sent byte for byte (no client-side normalisation of '..')."""
    connection = http.client.HTTPConnection("127.0.0.1", hv.port, timeout=10)
    try:
        connection.request("GET", target)
        response = connection.getresponse()
        response.read()
        return response.status
    finally:
        connection.close()


def aes_128_cbc_decrypt(data: bytes, key: bytes, iv: bytes) -> bytes:
    """An independent decryptor: what a player does with METHOD=AES-128."""
    decryptor = Cipher(algorithms.AES(key), modes.CBC(iv)).decryptor()
    plain = decryptor.update(data) + decryptor.finalize()
    pad = plain[-1]
    assert 1 <= pad <= 16 and plain[-pad:] == bytes([pad]) * pad, "bad PKCS#7 padding"
    return plain[:-pad]


def is_mpegts(data: bytes) -> bool:
    return (
        len(data) > 0
        and len(data) % TS_PACKET == 0
        and all(data[i] == TS_SYNC for i in range(0, len(data), TS_PACKET))
    )


class TestAuthorisedViewer:
    def test_valid_token_gets_playlists_and_keys_that_are_never_cached(
        self, packaged: Packaged
    ) -> None:
        """With the token from `hlsvault url`, master, variant and key answer 200 with
        Cache-Control: no-store, and the key is the vault's 16 bytes."""
        keys = packaged.content_keys()
        responses = {
            "master": packaged.http.get(packaged.url),
            "variant": packaged.get(packaged.variant_path, packaged.token),
            **{f"key {i}": packaged.get(packaged.key_path(i), packaged.token) for i in keys},
        }

        assert {name: r.status_code for name, r in responses.items()} == dict.fromkeys(
            responses, 200
        )
        assert {name: r.headers.get("cache-control") for name, r in responses.items()} == (
            dict.fromkeys(responses, "no-store")
        )
        assert sorted(keys) == [0, 1]
        for index, key in keys.items():
            assert len(key) == 16
            assert responses[f"key {index}"].content == key

    def test_playlist_uris_lead_to_the_segments_and_keys(self, packaged: Packaged) -> None:
        """Following the master and variant playlists as a player would reaches every key (with
        the viewer's token) and every segment on the origin, byte for byte."""
        # Given: the master playlist from the tokenized URL
        master = packaged.http.get(packaged.url).text
        (variant_uri,) = [line for line in master.splitlines() if line and line[0] != "#"]

        # When: the player follows the variant playlist's key and segment URIs
        variant = packaged.http.get(variant_uri)
        key_uris = re.findall(r'#EXT-X-KEY:METHOD=AES-128,URI="([^"]+)"', variant.text)
        segment_uris = [line for line in variant.text.splitlines() if line and line[0] != "#"]
        fetched_keys = [packaged.http.get(uri) for uri in key_uris]
        fetched_segments = [packaged.http.get(uri) for uri in segment_uris]

        # Then: two keys carrying the token, three public segments equal to the origin's
        assert variant.status_code == 200
        assert [parse_qs(urlsplit(uri).query)["token"] for uri in key_uris] == [
            [packaged.token]
        ] * 2
        keys = packaged.content_keys()
        assert [r.content for r in fetched_keys] == [keys[0], keys[1]]
        origin_dir = packaged.hv.origin / "assets" / ASSET / packaged.version / packaged.rendition
        assert [r.status_code for r in fetched_segments] == [200] * 3
        assert [r.content for r in fetched_segments] == [
            (origin_dir / segment["name"]).read_bytes() for segment in packaged.segments()
        ]

    def test_bearer_header_is_accepted_in_place_of_the_query(self, packaged: Packaged) -> None:
        """Authorization: Bearer carries the token as well as ?token= does; a tampered one not."""
        good = {"Authorization": f"Bearer {packaged.token}"}
        bad = {"Authorization": f"Bearer {tamper(packaged.token)}"}
        paths = [packaged.master_path, packaged.variant_path, packaged.key_path(0)]

        assert [packaged.get(path, headers=good).status_code for path in paths] == [200] * 3
        assert [packaged.get(path, headers=bad).status_code for path in paths] == [401] * 3
        key = packaged.get(packaged.key_path(0), headers=good).content
        assert key == packaged.content_keys()[0]


class TestRefusals:
    def test_missing_tampered_expired_and_foreign_tokens_are_refused_everywhere(
        self, packaged: Packaged
    ) -> None:
        """Master, variant and key answer 401 without a token, with a tampered or an expired
        one, and 403 with a valid token of another asset; no refusal carries the key."""
        # Given: the four kinds of token a viewer must not get through with
        tokens = {
            "none": None,
            "tampered": tamper(packaged.token),
            "expired": packaged.mint(ASSET, exp=time.time() - 120),
            "other-asset": packaged.mint("other", exp=time.time() + 600),
        }
        paths = {
            "master": packaged.master_path,
            "variant": packaged.variant_path,
            "key": packaged.key_path(0),
        }
        key = packaged.content_keys()[0]

        # When: each endpoint is asked with each token
        responses = {
            (endpoint, kind): packaged.get(path, token)
            for endpoint, path in paths.items()
            for kind, token in tokens.items()
        }

        # Then: 401/401/401/403 on every endpoint, and never the key bytes
        assert {pair: r.status_code for pair, r in responses.items()} == {
            (endpoint, kind): status for endpoint in paths for kind, status in REFUSALS.items()
        }
        assert [pair for pair, r in responses.items() if key in r.content] == []

    def test_unknown_asset_with_its_own_valid_token_is_not_found(self, packaged: Packaged) -> None:
        """A correctly signed token for an asset that was never published gets 404, not 200/500."""
        token = packaged.mint("nosuch", exp=time.time() + 600)
        paths = [
            "/v1/assets/nosuch/master.m3u8",
            f"/v1/assets/nosuch/{packaged.rendition}.m3u8",
            f"/v1/keys/nosuch/{packaged.version}/0",
        ]
        assert [packaged.get(path, token).status_code for path in paths] == [404] * 3

    def test_malformed_paths_are_client_errors_never_served(self, packaged: Packaged) -> None:
        """Traversal, oversized ids, out-of-range or non-decimal indexes, and escapes from the
        /cdn/ origin are answered 400 or 404: never 200, never a 500."""
        asset, version = packaged.asset, packaged.version
        query = f"?token={packaged.token}"
        targets = [
            "/v1/assets/%2e%2e/master.m3u8",
            "/v1/assets/%2e%2e%2f%2e%2e%2fvault/master.m3u8",
            f"/v1/assets/{asset}/%2e%2e.m3u8",
            f"/v1/assets/{asset}/%2e%2e%2f%2e%2e%2fsecrets%2ftoken_secret.m3u8",
            f"/v1/keys/{asset}/%2e%2e/0",
            f"/v1/keys/%2e%2e/{version}/0",
            f"/v1/keys/{asset}/{version}/%2e%2e",
            f"/v1/keys/{asset}/{version}/../../../secrets/master_key",
            f"/v1/keys/{asset}/{version}/..%2f..%2f..%2fsecrets%2fmaster_key",
            f"/v1/assets/{'a' * 300}/master.m3u8",
            f"/v1/assets/{'a' * 300}/{packaged.rendition}.m3u8",
            f"/v1/assets/{asset}/{'r' * 300}.m3u8",
            f"/v1/keys/{'a' * 300}/{version}/0",
            f"/v1/keys/{asset}/{'v' * 300}/0",
            f"/v1/keys/{asset}/{version}/99999999",
            f"/v1/keys/{asset}/{version}/1000001",
            f"/v1/keys/{asset}/{version}/abc",
            f"/v1/keys/{asset}/{version}/-1",
            f"/v1/keys/{asset}/{version}/0x1",
            f"/v1/keys/{asset}/{version}/1e3",
            f"/v1/keys/{asset}/{version}/%EF%BC%91",  # a fullwidth digit one, which int() accepts
            f"/v1/keys/{asset}/{version}/%200",
        ]
        cdn_targets = [
            "/cdn/../secrets/master_key",
            "/cdn/%2e%2e/secrets/master_key",
            "/cdn/..%2fsecrets%2fmaster_key",
            f"/cdn/%2e%2e/vault/keys/{asset}/{version}/000000.key",
            f"/cdn/%2e%2e/vault/catalog/{asset}/current.json",
        ]
        statuses = {target: raw_get(packaged.hv, target + query) for target in targets}
        statuses |= {target: raw_get(packaged.hv, target) for target in cdn_targets}

        assert {t: s for t, s in statuses.items() if s not in (400, 404)} == {}
        # A well-formed request of the same style is served: the refusals above are not a
        # server that refuses everything.
        segment = packaged.segments()[0]["name"]
        real = f"/cdn/assets/{asset}/{version}/{packaged.rendition}/{segment}"
        assert raw_get(packaged.hv, real) == 200
        assert raw_get(packaged.hv, packaged.key_path(0) + query) == 200
        # The malformed values themselves are recognised as such, before any lookup.
        assert statuses[f"/v1/keys/{asset}/{version}/99999999"] == 400
        assert statuses[f"/v1/assets/{'a' * 300}/master.m3u8"] == 400

    def test_index_with_a_trailing_newline_is_not_served(self, packaged: Packaged) -> None:
        """'/0%0A' is not a key index: it must not be answered with key 0."""
        status = raw_get(packaged.hv, f"{packaged.key_path(0)}%0A?token={packaged.token}")
        assert status in (400, 404)


class TestOrigin:
    def test_origin_holds_only_segments_and_no_key_bytes(self, packaged: Packaged) -> None:
        """The CDN origin holds exactly the catalog's .ts segments and cookie mode's token-free
        static playlists (no key file, no catalog), and no file hlsvault wrote contains a key,
        raw or in hex."""
        library = packaged.library
        origin_files = sorted(
            p.relative_to(packaged.hv.origin).as_posix()
            for p in packaged.hv.origin.rglob("*") if p.is_file()
        )
        expected = [f"assets/{asset}/master.m3u8" for asset in (ASSET, OTHER)]
        for asset, version in [(ASSET, library.old_version), (ASSET, library.version),
                               (OTHER, library.other_version)]:
            described = json.loads(
                (packaged.hv.vault / "catalog" / asset / "versions" / f"{version}.json")
                .read_text())
            for rendition in described["renditions"]:
                name = rendition["name"]
                expected.append(f"assets/{asset}/{version}/{name}.m3u8")
                expected += [f"assets/{asset}/{version}/{name}/{segment['name']}"
                             for segment in rendition["segments"]]
        assert origin_files == sorted(expected)
        for name in origin_files:
            if name.endswith(".m3u8"):
                text = (packaged.hv.origin / name).read_text()
                assert "token" not in text and "eyJ" not in text

        assert len(packaged.content_keys()) == 2
        written = [p for p in packaged.hv.data_dir.rglob("*") if p.is_file()]
        leaks = [
            (path.relative_to(packaged.hv.data_dir).as_posix(), key_id)
            for path in written
            for key_id, key in library.keys.items()
            if key in (content := path.read_bytes())
            or key.hex().encode() in content.lower()
        ]
        assert leaks == []

    def test_each_segment_decrypts_with_its_key_and_sequence_iv_to_mpegts(
        self, packaged: Packaged
    ) -> None:
        """Every origin segment is not MPEG-TS as stored, and is MPEG-TS (0x47 every 188 bytes)
        once decrypted with the key the catalog names and IV = its media sequence number."""
        keys = packaged.content_keys()
        origin_dir = packaged.hv.origin / "assets" / ASSET / packaged.version / packaged.rendition
        segments = packaged.segments()
        assert [(s["sequence"], s["key"]) for s in segments] == [(0, 0), (1, 0), (2, 1)]

        for segment in segments:
            ciphertext = (origin_dir / segment["name"]).read_bytes()
            iv = segment["sequence"].to_bytes(16, "big")
            plain = aes_128_cbc_decrypt(ciphertext, keys[segment["key"]], iv)

            assert len(ciphertext) == segment["size"]
            assert not is_mpegts(ciphertext), segment["name"]
            assert is_mpegts(plain), segment["name"]


def test_serve_log_holds_no_token_and_no_key(packaged: Packaged) -> None:
    """After playlists and keys were fetched with the token in the query and in a Bearer
    header, the key server's log names the requests but holds neither the token nor a key."""
    # Given: a viewer's full session, plus a refused request, with the token both ways
    before = packaged.log.read_text().count('"key request"')
    packaged.http.get(packaged.url)
    packaged.get(packaged.variant_path, packaged.token)
    for index in packaged.content_keys():
        packaged.get(packaged.key_path(index), packaged.token)
    packaged.get(packaged.key_path(0), headers={"Authorization": f"Bearer {packaged.token}"})
    packaged.get(packaged.key_path(0), tamper(packaged.token))

    # When: the server has written its lines for those four key requests
    deadline = time.monotonic() + 5
    while (packaged.log.read_text().count('"key request"') < before + 4
           and time.monotonic() < deadline):
        time.sleep(0.05)
    log = packaged.log.read_text()

    # Then: the requests are there, the secrets are not
    assert log.count('"key request"') >= before + 4, log[-2000:]
    assert packaged.master_path in log
    assert packaged.token not in log
    assert packaged.token.rsplit(".", 1)[1] not in log  # not even the signature alone
    for key in packaged.library.keys.values():
        assert key.hex() not in log.lower()


class TestSessionsFromTheCli:
    def test_url_with_sid_plays_and_the_token_alone_does_not(self, packaged: Packaged) -> None:
        """`hlsvault url ASSET --sid S` prints a master URL whose playlists carry the sid on to
        the key, which is served; the same token without the sid is 403, and the refusal says
        to send ?sid= or X-Hlsvault-Sid."""
        url = packaged.hv.url(ASSET, "--sid", "viewer-42")
        query = parse_qs(urlsplit(url).query)
        master = packaged.http.get(url)
        (variant_uri,) = [line for line in master.text.splitlines() if line and line[0] != "#"]
        variant = packaged.http.get(variant_uri)
        key_uris = re.findall(r'URI="([^"]+)"', variant.text)
        key = packaged.http.get(key_uris[0])
        alone = packaged.get(packaged.key_path(0), query["token"][0])

        assert query["sid"] == ["viewer-42"]
        assert all(parse_qs(urlsplit(uri).query)["sid"] == ["viewer-42"] for uri in key_uris)
        assert (key.status_code, key.content) == (200, packaged.content_keys()[0])
        assert alone.status_code == 403
        assert "?sid=" in alone.json()["error"] and "X-Hlsvault-Sid" in alone.json()["error"]

    def test_token_with_sid_works_as_a_bearer_beside_the_sid_header(
        self, packaged: Packaged
    ) -> None:
        """`hlsvault token ASSET --sid S` prints a token that, as a Bearer header, gets the key
        together with X-Hlsvault-Sid: S, and 403 without it."""
        done = packaged.hv.run("token", ASSET, "--sid", "viewer-42")
        assert done.returncode == 0, done.stderr
        bearer = {"Authorization": f"Bearer {done.stdout.strip()}"}
        with_sid = packaged.http.get(packaged.key_path(0),
                                     headers={**bearer, "X-Hlsvault-Sid": "viewer-42"})
        without = packaged.http.get(packaged.key_path(0), headers=bearer)
        assert (with_sid.status_code, with_sid.content) == (200, packaged.content_keys()[0])
        assert without.status_code == 403
