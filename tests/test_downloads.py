"""Private MP4 downloads: `package --download` writes a faststart MP4, and the key server answers
a token holder with a 302 to a short-lived signed URL of it — CloudFront canned policy (through
the stand-in), S3 presigned GET, or the embedded server's own signature."""

from __future__ import annotations

import json
import re
import time
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import parse_qs, quote, urlsplit

import httpx
import pytest

from keyserver import create_app
from pipeline import layout
from pipeline.settings import load_settings
from pipeline.storage.s3 import S3Store
from pipeline.tokens import mint_token

from cdn_support import ASSET, GONE, OTHER, CdnLibrary
from keyserver_support import AppClient, assert_json_error, isolated_env, package, tamper
from support import frame_hashes, framemd5

LOOPBACK = "127.0.0.1"
RANGE = (1000, 4999)


def fetch(url: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, _lower(response.headers), response.read()
    except urllib.error.HTTPError as refused:
        return refused.code, _lower(refused.headers), refused.read()


def _lower(headers: object) -> dict[str, str]:
    return {str(k).lower(): str(v) for k, v in headers.items()}  # type: ignore[attr-defined]


def redirect(library: CdnLibrary, env: dict[str, str], token: str,
             asset: str = ASSET) -> httpx.Response:
    # This process has no AWS settings of its own: the origin's client is the moto server's.
    origin = S3Store(library.bucket, "", client=boto3_client(library))
    app = create_app(load_settings(env), origin=origin)
    with AppClient(app, client_ip=LOOPBACK, base_url=library.public_url) as client:
        return client.get(layout.download_url("", asset, f"?token={token}"))


def boto3_client(library: CdnLibrary) -> object:
    """An S3 client of the moto server configured as pipeline.aws.make_client configures one."""
    import boto3
    from botocore.config import Config

    return boto3.session.Session().client(
        "s3", endpoint_url=library.moto.endpoint, region_name="us-east-1",
        aws_access_key_id="testing", aws_secret_access_key="testing",
        config=Config(signature_version="s3v4"),
    )


def mp4_starts_with_its_index(data: bytes) -> bool:
    """faststart: the ``moov`` box comes before ``mdat``."""
    return 0 <= data.find(b"moov") < data.find(b"mdat")


def assert_served_download(url: str, copy_clip: Path, tmp_path: Path) -> None:
    status, headers, body = fetch(url)
    assert status == 200, (status, body[:200])
    assert headers["content-disposition"].startswith("attachment"), headers
    assert mp4_starts_with_its_index(body)
    saved = tmp_path / "saved.mp4"
    saved.write_bytes(body)
    assert frame_hashes(framemd5(str(saved))) == frame_hashes(framemd5(str(copy_clip)))
    first, last = RANGE
    status, headers, part = fetch(url, {"Range": f"bytes={first}-{last}"})
    assert status == 206, status
    assert part == body[first:last + 1]
    assert headers["content-range"] == f"bytes {first}-{last}/{len(body)}"


def secret(library: CdnLibrary) -> str:
    return library.env["HLSVAULT_TOKEN_SECRET"]


class TestCloudFrontDownloads:
    def test_the_redirect_is_a_canned_policy_url_of_the_mp4(
        self, cdn_library: CdnLibrary, copy_clip: Path, tmp_path: Path
    ) -> None:
        # Given a token holder, when they ask for the download
        token = mint_token(secret(cdn_library), ASSET, 600)
        response = redirect(cdn_library, cdn_library.env, token)

        # Then a 302 names the MP4 on the CDN, signed with a canned policy
        assert response.status_code == 302, response.text
        assert response.headers["cache-control"] == "no-store"
        location = response.headers["location"]
        key = layout.download_key(ASSET, cdn_library.version())
        assert location.split("?")[0] == f"{cdn_library.cdn.url}/{key}"
        assert set(parse_qs(urlsplit(location).query)) == {"Expires", "Signature", "Key-Pair-Id"}
        expires = int(parse_qs(urlsplit(location).query)["Expires"][0])
        assert time.time() < expires <= time.time() + 600 + 1
        # and it decodes to the rendition's frames, with Range requests for resuming
        assert_served_download(location, copy_clip, tmp_path)

    def test_the_mp4_is_not_readable_without_a_signature(self, cdn_library: CdnLibrary) -> None:
        token = mint_token(secret(cdn_library), ASSET, 600)
        response = redirect(cdn_library, cdn_library.env, token)
        location = response.headers["location"]
        assert fetch(location)[0] == 200  # the control
        assert fetch(location.split("?")[0])[0] == 403
        other = layout.download_key(OTHER, cdn_library.version(OTHER))
        signed_elsewhere = f"{cdn_library.cdn.url}/{other}?{urlsplit(location).query}"
        assert fetch(signed_elsewhere)[0] == 403
        # nor from the origin itself: the bucket has no public policy
        origin = f"{cdn_library.moto.endpoint}/{cdn_library.bucket}/{urlsplit(location).path[1:]}"
        assert fetch(origin)[0] == 403

    @pytest.mark.parametrize("spoil", ["missing", "tampered", "expired", "other asset"])
    def test_bad_tokens_get_no_redirect(self, cdn_library: CdnLibrary, spoil: str) -> None:
        good = mint_token(secret(cdn_library), ASSET, 600)
        token = {
            "missing": "",
            "tampered": tamper(good),
            "expired": mint_token(secret(cdn_library), ASSET, 60, now=time.time() - 3600),
            "other asset": mint_token(secret(cdn_library), OTHER, 600),
        }[spoil]
        response = redirect(cdn_library, cdn_library.env, token)
        assert "location" not in response.headers
        assert_json_error(response, 403 if spoil == "other asset" else 401)

    def test_revoke_answers_410_and_deletes_the_mp4(self, cdn_library: CdnLibrary) -> None:
        # Given an asset with a download
        token = mint_token(secret(cdn_library), GONE, 600)
        location = redirect(cdn_library, cdn_library.env, token, GONE).headers["location"]
        assert fetch(location)[0] == 200
        # When it is revoked
        done = _cli(cdn_library.env, "revoke", GONE, "--json")
        # Then the key server answers 410, and the MP4 is gone from the origin
        assert json.loads(done)["downloads_deleted"] == 1
        assert_json_error(redirect(cdn_library, cdn_library.env, token, GONE), 410)
        s3 = cdn_library.moto.client("s3")
        listed = s3.list_objects_v2(Bucket=cdn_library.bucket, Prefix=layout.downloads_prefix(GONE))
        assert listed.get("KeyCount", 0) == 0
        assert fetch(location)[0] == 404


class TestS3PresignedDownloads:
    def test_without_cloudfront_the_redirect_is_an_s3_presigned_get(
        self, cdn_library: CdnLibrary, copy_clip: Path, tmp_path: Path
    ) -> None:
        env = cdn_library.unsigned_env()
        response = redirect(cdn_library, env, mint_token(secret(cdn_library), ASSET, 600))
        assert response.status_code == 302, response.text
        location = response.headers["location"]
        assert location.startswith(f"{cdn_library.moto.endpoint}/{cdn_library.bucket}/")
        assert "X-Amz-Signature" in parse_qs(urlsplit(location).query)
        assert_served_download(location, copy_clip, tmp_path)


@pytest.fixture(scope="module")
def embedded(tmp_path_factory: pytest.TempPathFactory, copy_clip: Path) -> dict[str, str]:
    data_dir = tmp_path_factory.mktemp("embedded-downloads") / "data"
    data_dir.parent.mkdir(parents=True, exist_ok=True)
    env = isolated_env(data_dir)
    summary = package(env, copy_clip, ASSET)  # keyserver_support's options: no --download
    assert "download" not in summary
    done = _cli(env, "package", str(copy_clip), "--asset", "dl", "--ladder", "copy",
                "--download", "--json")
    assert json.loads(done)["download"]["rendition"] == "360p"
    return env


class TestEmbeddedDownloads:
    def _client(self, env: dict[str, str]) -> AppClient:
        return AppClient(create_app(load_settings(env)), client_ip=LOOPBACK,
                         base_url=load_settings(env).public_url)

    def _token(self, env: dict[str, str], asset: str = "dl") -> str:
        return mint_token(load_settings(env).token_secret, asset, 600)

    def test_the_embedded_server_serves_its_own_signed_link(
        self, embedded: dict[str, str], copy_clip: Path, tmp_path: Path
    ) -> None:
        with self._client(embedded) as client:
            response = client.get(layout.download_url("", "dl", f"?token={self._token(embedded)}"))
            assert response.status_code == 302, response.text
            location = response.headers["location"]
            assert urlsplit(location).path.startswith("/cdn/downloads/dl/")
            full = client.get(location)
            assert full.status_code == 200
            assert full.headers["content-disposition"].startswith("attachment")
            saved = tmp_path / "dl.mp4"
            saved.write_bytes(full.content)
            assert frame_hashes(framemd5(str(saved))) == frame_hashes(framemd5(str(copy_clip)))
            first, last = RANGE
            part = client.get(location, headers={"Range": f"bytes={first}-{last}"})
            assert part.status_code == 206
            assert part.content == full.content[first:last + 1]

    def test_unsigned_tampered_and_static_paths_are_refused(
        self, embedded: dict[str, str]
    ) -> None:
        with self._client(embedded) as client:
            location = client.get(
                layout.download_url("", "dl", f"?token={self._token(embedded)}")
            ).headers["location"]
            path = urlsplit(location).path
            assert client.get(location).status_code == 200  # the control
            assert_json_error(client.get(path), 403)
            assert_json_error(client.get(location.replace("signature=", "signature=0")), 403)
            past = location.replace("expires=", "expires=1")
            assert_json_error(client.get(past), 403)
            # the static /cdn/ mount never serves downloads/, whatever the spelling
            for spelled in (path.replace("/cdn/", "/cdn//"), path.replace("/cdn/", "/cdn/./")):
                assert client.get(spelled).status_code in (403, 404), spelled

    @pytest.mark.parametrize(
        "expires", ["abc", "\u0661\u0662\u0663", "9" * 400, "-5", ""],
        ids=["letters", "arabic-digits", "400-digits", "negative", "empty"],
    )
    def test_a_garbage_expiry_on_the_signed_link_is_403(
        self, embedded: dict[str, str], expires: str
    ) -> None:
        """The embedded server's own signed link with an expiry that is no time at all is
        refused like a wrong signature (403, JSON), never a 500."""
        with self._client(embedded) as client:
            location = client.get(
                layout.download_url("", "dl", f"?token={self._token(embedded)}")
            ).headers["location"]
            spoiled = re.sub(r"expires=\d+", f"expires={quote(expires)}", location)
            assert spoiled != location
            assert_json_error(client.get(spoiled), 403)

    def test_a_version_without_a_download_is_404(self, embedded: dict[str, str]) -> None:
        with self._client(embedded) as client:
            token = self._token(embedded, ASSET)
            message = assert_json_error(
                client.get(layout.download_url("", ASSET, f"?token={token}")), 404
            )
        assert "--download" in message


def _cli(env: dict[str, str], *args: str) -> str:
    import subprocess

    from support import CLI_TIMEOUT_S, HLSVAULT

    done = subprocess.run([*HLSVAULT, *args], env=env, capture_output=True, text=True,
                          timeout=CLI_TIMEOUT_S, check=False,
                          cwd=Path(env["HLSVAULT_DATA_DIR"]).parent)
    assert done.returncode == 0, done.stderr
    return done.stdout


class TestAskingForADownload:
    """The same field from every entry point: the CLI, the job request (webhook) and the spec."""

    def test_the_cli_option_defaults_to_the_top_rendition(self) -> None:
        from hlsvault.cli import build_parser

        parse = build_parser().parse_args
        assert parse(["package", "x.mp4", "--download"]).download == layout.DOWNLOAD_TOP
        assert parse(["package", "x.mp4", "--download=720p"]).download == "720p"
        assert parse(["package", "x.mp4"]).download is None

    @pytest.mark.parametrize("value, expected", [
        (True, layout.DOWNLOAD_TOP), ("480p", "480p"), (False, None), (None, None),
    ])
    def test_the_job_request_field(self, value: object, expected: str | None) -> None:
        from pipeline.ingest import parse_job_request

        document: dict[str, object] = {"source": "s3://bucket/film.mp4"}
        if value is not None:
            document["download"] = value
        assert parse_job_request(document).download == expected

    @pytest.mark.parametrize("value", [1, "", "../x", {"r": 1}])
    def test_a_bad_field_is_a_clear_400(self, value: object) -> None:
        from pipeline.errors import BadSpec
        from pipeline.ingest import parse_job_request

        with pytest.raises(BadSpec, match='field "download"'):
            parse_job_request({"source": "s3://bucket/film.mp4", "download": value})

    def test_an_unknown_rendition_fails_the_job_saying_which_exist(self) -> None:
        from pipeline.downloads import chosen_rendition
        from pipeline.errors import BadSpec
        from pipeline.playlists import AssetVersion, PublishedSegment, RenditionEntry

        rendition = RenditionEntry("360p", 640, 360, "30/1", "avc1.64001e", 1, 1,
                                   (PublishedSegment(0, "seg_00000.ts", 1.0, 16, 0),))
        described = AssetVersion("a", "v1", "j", 0.0, 0, (rendition,))
        assert chosen_rendition(described, layout.DOWNLOAD_TOP) is rendition
        with pytest.raises(BadSpec, match="it has 360p"):
            chosen_rendition(described, "1080p")
