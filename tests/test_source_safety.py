"""Source safety: nothing a source's content names is ever opened (issue 8, finding 1).

A playlist or list given as a source makes a plain ffmpeg open what it names: for a source read
over HTTP (an S3 object through its presigned URL) every URL, such as the instance metadata
service's; for a local one, other files. A loopback "metadata" server records every request it
gets. Each hostile source is first shown to reach what it names under plain ffprobe (so the
harness can tell following from refusing), then packaged through the real CLI, which must fail
at the probe with one line, publish nothing and leave the metadata server without a request.
The segment stage and S3 sources are held to the same rules.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
import uuid
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import boto3
import pytest
from botocore.config import Config

from pipeline.errors import InvalidSource, TransientError, UnsupportedMedia
from pipeline.media import probe
from pipeline.plan import plan_chunks, plan_renditions
from pipeline.segment import segment_chunk
from pipeline.sources import s3_source_url

from faultproxy import FaultProxy, Rule
from fleet import MotoServer
from support import Hlsvault, lavfi_clip

#: A test server's socket gives up on a silent client after this long.
SOCKET_TIMEOUT_S = 10
#: Plain ffprobe on a hostile source: it fails fast once the metadata server answers 404.
FFPROBE_TIMEOUT_S = 60
#: What the instance metadata service hands a role's credentials out at.
CREDENTIALS = "/latest/meta-data/iam/security-credentials/worker"
#: The credential part of a presigned URL's query string.
SIGNATURE = "X-Amz-Signature=0123456789abcdef"
MPEGURL = "application/vnd.apple.mpegurl"
MP4 = "video/mp4"


class RecordingServer:
    """An HTTP server on 127.0.0.1, in a thread, that serves what it is given (with byte
    ranges, as S3 does), answers 404 to everything else, and records every request path."""

    def __init__(self) -> None:
        self._files: dict[str, tuple[bytes, str]] = {}
        self._requests: list[str] = []
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        # A short poll: shutdown() waits up to one poll interval (0.5 s by default) per server.
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )

    @property
    def port(self) -> int:
        port: int = self._server.server_address[1]
        return port

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}/{path}"

    def serve(self, path: str, body: bytes, content_type: str) -> str:
        """Serve ``body`` at ``/path`` (replacing what was there); returns its URL."""
        with self._lock:
            self._files[f"/{path}"] = (body, content_type)
        return self.url(path)

    def received(self) -> list[str]:
        """The path of every request so far, in order."""
        with self._lock:
            return list(self._requests)

    def lookup(self, raw_path: str) -> tuple[bytes, str] | None:
        path = urlsplit(raw_path).path
        with self._lock:
            self._requests.append(path)
            return self._files.get(path)

    def __enter__(self) -> RecordingServer:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=SOCKET_TIMEOUT_S)


def _handler_for(owner: RecordingServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        timeout = SOCKET_TIMEOUT_S

        def do_GET(self) -> None:
            found = owner.lookup(self.path)
            if found is None:
                self.send_response(404)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            body, content_type = found
            first, last, status = 0, len(body) - 1, 200
            wanted = self.headers.get("Range", "")
            if wanted.startswith("bytes="):
                start, _, end = wanted.removeprefix("bytes=").partition("-")
                first, status = int(start or 0), 206
                last = min(int(end), last) if end else last
                if first > last:
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(body)}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("Content-Length", str(last - first + 1))
            if status == 206:
                self.send_header("Content-Range", f"bytes {first}-{last}/{len(body)}")
            self.end_headers()
            self.wfile.write(body[first : last + 1])

        def log_message(self, format: str, *args: object) -> None:
            pass  # the recorded paths are the log

    return Handler


@pytest.fixture
def metadata() -> Iterator[RecordingServer]:
    """Stands in for the instance metadata service: a worker must never ask it anything."""
    with RecordingServer() as server:
        yield server


@pytest.fixture
def uploads() -> Iterator[RecordingServer]:
    """Where http(s) sources come from, as an S3 object through its presigned URL."""
    with RecordingServer() as server:
        yield server


def served_playlist_text(metadata: RecordingServer) -> bytes:
    """A VOD playlist whose key is the worker's IAM credentials, as the metadata service
    hands them out (a key URI, unlike a segment's, may have any extension)."""
    return (
        "#EXTM3U\n#EXT-X-VERSION:3\n#EXT-X-TARGETDURATION:6\n"
        f'#EXT-X-KEY:METHOD=AES-128,URI="{metadata.url(CREDENTIALS.lstrip("/"))}"\n'
        f"#EXTINF:6.0,\n{metadata.url('latest/meta-data/segment0.ts')}\n#EXT-X-ENDLIST\n"
    ).encode()


def local_playlist_text(segment: Path) -> bytes:
    """A VOD playlist whose one segment is a file outside the source. (A local playlist
    cannot name http URLs: ffmpeg holds what a file names to file, crypto and data.)"""
    return f"#EXTM3U\n#EXT-X-TARGETDURATION:2\n#EXTINF:2.0,\n{segment}\n#EXT-X-ENDLIST\n".encode()


def other_file() -> Path:
    """A genuine MPEG-TS clip, with the streams of the copy clip: what a local playlist or
    list names besides itself."""
    return lavfi_clip("named.ts", seconds=2)


def local_playlist(tmp: Path, uploads: RecordingServer, metadata: RecordingServer) -> str:
    path = tmp / "evil.m3u8"
    path.write_bytes(local_playlist_text(other_file()))
    return str(path)


def playlist_named_mp4(tmp: Path, uploads: RecordingServer, metadata: RecordingServer) -> str:
    path = tmp / "evil.mp4"
    path.write_bytes(local_playlist_text(other_file()))
    return str(path)


def local_concat_list(tmp: Path, uploads: RecordingServer, metadata: RecordingServer) -> str:
    shutil.copyfile(other_file(), tmp / "named.ts")
    path = tmp / "list.txt"
    path.write_bytes(b"ffconcat version 1.0\nfile 'named.ts'\n")
    return str(path)


def served_playlist(tmp: Path, uploads: RecordingServer, metadata: RecordingServer) -> str:
    return uploads.serve("evil.m3u8", served_playlist_text(metadata), MPEGURL)


def served_playlist_named_mp4(
    tmp: Path, uploads: RecordingServer, metadata: RecordingServer
) -> str:
    # An object uploaded as evil.mp4 with a video Content-Type: only its bytes are a playlist.
    return uploads.serve("evil.mp4", served_playlist_text(metadata), MP4)


def served_concat_list(tmp: Path, uploads: RecordingServer, metadata: RecordingServer) -> str:
    # concat's safe mode refuses URLs in the list, but not a relative name, which resolves
    # against the list's own URL and is opened as a playlist in its turn.
    uploads.serve("inner.m3u8", served_playlist_text(metadata), MPEGURL)
    return uploads.serve("list.mp4", b"ffconcat version 1.0\nfile 'inner.m3u8'\n", MP4)


HostileSource = Callable[[Path, RecordingServer, RecordingServer], str]
LOCAL_CASES: list[tuple[HostileSource, str]] = [
    (local_playlist, "is an HLS playlist"),
    (playlist_named_mp4, "is an HLS playlist"),
    (local_concat_list, "is a concat list"),
]
SERVED_CASES: list[tuple[HostileSource, str]] = [
    (served_playlist, "is an HLS playlist"),
    (served_playlist_named_mp4, "is an HLS playlist"),
    (served_concat_list, "is a concat list"),
]


def ids(cases: list[tuple[HostileSource, str]]) -> list[str]:
    return [case[0].__name__ for case in cases]


def plain_ffprobe(source: str) -> subprocess.CompletedProcess[bytes]:
    """ffprobe as hlsvault ran it before the allow-lists."""
    return subprocess.run(
        ["ffprobe", "-v", "error", "-show_format", "-show_streams", "-of", "json", source],
        capture_output=True, timeout=FFPROBE_TIMEOUT_S, check=False,
    )


class TestHostileSources:
    @pytest.mark.parametrize(("make", "reason"), SERVED_CASES, ids=ids(SERVED_CASES))
    def test_plain_ffprobe_fetches_what_a_served_source_names(
        self, tmp_path: Path, uploads: RecordingServer, metadata: RecordingServer,
        make: HostileSource, reason: str,
    ) -> None:
        """Positive control: without allow-lists, ffprobe asks the metadata server for the
        credentials a served source names."""
        plain_ffprobe(make(tmp_path, uploads, metadata))

        assert CREDENTIALS in metadata.received()

    @pytest.mark.parametrize(("make", "reason"), LOCAL_CASES, ids=ids(LOCAL_CASES))
    def test_plain_ffprobe_opens_what_a_local_source_names(
        self, tmp_path: Path, uploads: RecordingServer, metadata: RecordingServer,
        make: HostileSource, reason: str,
    ) -> None:
        """Positive control: without allow-lists, ffprobe reads the video of another file a
        local source names (the source itself holds only text)."""
        done = plain_ffprobe(make(tmp_path, uploads, metadata))

        assert done.returncode == 0, done.stderr
        streams = json.loads(done.stdout)["streams"]
        assert [s["codec_type"] for s in streams] == ["video", "audio"]

    @pytest.mark.parametrize(
        ("make", "reason"), LOCAL_CASES + SERVED_CASES, ids=ids(LOCAL_CASES + SERVED_CASES)
    )
    def test_packaging_refuses_it_without_a_request(
        self, hlsvault: Hlsvault, tmp_path: Path, uploads: RecordingServer,
        metadata: RecordingServer, make: HostileSource, reason: str,
    ) -> None:
        """The job fails at the probe with one line saying what the source is and what to
        upload instead; nothing is published and the metadata server is never asked."""
        source = make(tmp_path, uploads, metadata)

        done = hlsvault.package(source, "--asset", "evil", "--ladder", "copy", "--json")

        assert done.returncode == 1
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        assert len(lines) == 1, done.stderr
        assert lines[0].startswith("hlsvault: job ") and reason in lines[0]
        assert "upload the video itself" in lines[0]
        summary = json.loads(done.stdout)
        assert summary["status"] == "failed" and summary["failed_stage"] == "probe"
        assert [p for p in hlsvault.origin.rglob("*") if p.is_file()] == []
        assert not (hlsvault.vault / "catalog" / "evil").exists()
        assert metadata.received() == []
        # A served source was read (so the refusal is about its content), and nothing else.
        served = {urlsplit(source).path} if source.startswith("http://") else set()
        assert set(uploads.received()) == served


class TestHowASourceIsNamed:
    def test_a_served_sources_credentials_are_never_shown(
        self, uploads: RecordingServer, metadata: RecordingServer
    ) -> None:
        """A refusal names a URL by its host and path: its user name and password, and a
        presigned URL's signature, are never shown."""
        url = uploads.serve("talk.m3u8", served_playlist_text(metadata), MPEGURL)
        source = url.replace("http://", "http://user:secret@", 1) + f"?{SIGNATURE}"

        with pytest.raises(InvalidSource, match="is an HLS playlist") as refused:
            probe(source)

        assert f"source {url} is" in str(refused.value)
        assert "secret" not in str(refused.value) and SIGNATURE not in str(refused.value)
        assert set(uploads.received()) == {"/talk.m3u8"} and metadata.received() == []


class TestSegmentStage:
    @pytest.mark.parametrize("served", [False, True], ids=["local", "served"])
    def test_a_source_swapped_for_a_playlist_after_the_probe_is_not_followed(
        self, tmp_path: Path, copy_clip: Path, uploads: RecordingServer,
        metadata: RecordingServer, served: bool,
    ) -> None:
        """The segment stage reads the source with the demuxer the probe found: a source
        replaced by a playlist between the stages fails to segment and opens nothing else."""
        # Given a genuine MP4, probed and planned
        local = tmp_path / "swapped.mp4"
        shutil.copyfile(copy_clip, local)
        if served:  # with the query string of a presigned URL, which is never shown
            source = uploads.serve("swapped.mp4", local.read_bytes(), MP4) + f"?{SIGNATURE}"
        else:
            source = str(local)
        info = probe(source)
        renditions = plan_renditions(info, "copy", 6.0)
        [chunk] = plan_chunks(info.duration, 6.0, 60, copy=True)

        # When it is replaced by a playlist before the segment stage runs
        if served:
            uploads.serve("swapped.mp4", served_playlist_text(metadata), MP4)
        else:
            local.write_bytes(local_playlist_text(other_file()))

        # Then ffmpeg, held to MP4, cannot read it, and asks the metadata server nothing
        with pytest.raises(UnsupportedMedia, match="could not segment") as refused:
            segment_chunk(
                source, renditions, chunk, tmp_path / "out", info=info, segment_seconds=6.0,
                timeout=60,
            )
        assert SIGNATURE not in str(refused.value)
        assert metadata.received() == []
        assert not any((tmp_path / "out").rglob("seg_*.ts"))


class TestGenuineSources:
    def test_an_mp4_served_over_http_packages(
        self, hlsvault: Hlsvault, copy_clip: Path, uploads: RecordingServer
    ) -> None:
        """The allow-lists leave http sources working: an MP4 read over HTTP (with the range
        requests its trailing index needs) is packaged and published."""
        source = uploads.serve("clip.mp4", copy_clip.read_bytes(), MP4)

        done = hlsvault.package(source, "--asset", "served", "--ladder", "copy", "--json")

        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["status"] == "succeeded"
        assert any(hlsvault.origin.glob("assets/served/*/360p/seg_*.ts"))
        assert set(uploads.received()) == {"/clip.mp4"}

    def test_a_matroska_file_packages(self, hlsvault: Hlsvault) -> None:
        """Containers other than MP4 are on the allow-list too: an MKV is packaged."""
        source = lavfi_clip("copy.mkv", seconds=2)

        done = hlsvault.package(str(source), "--asset", "mkv", "--ladder", "copy", "--json")

        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["status"] == "succeeded"


def s3_client(endpoint: str) -> Any:
    """An S3 client for moto (or the fault proxy in front of it) that does not retry, so a
    refusal or a 503 is the answer the code under test sees."""
    return boto3.session.Session().client(
        "s3", endpoint_url=endpoint, region_name="us-east-1",
        aws_access_key_id="testing", aws_secret_access_key="testing",
        config=Config(retries={"total_max_attempts": 1}, connect_timeout=5, read_timeout=10),
    )


@pytest.fixture
def bucket(moto_server: MotoServer) -> str:
    """A source bucket of the test's own in the session's moto server."""
    name = f"sources-{uuid.uuid4().hex[:12]}"
    s3_client(moto_server.endpoint).create_bucket(Bucket=name)
    return name


class TestS3Sources:
    def test_a_playlist_uploaded_to_s3_is_refused_without_a_request(
        self, moto_server: MotoServer, bucket: str, metadata: RecordingServer
    ) -> None:
        """An object uploaded as a video whose bytes are a playlist is refused by the probe
        of its presigned URL, which fetches nothing it names and is not shown."""
        client = s3_client(moto_server.endpoint)
        client.put_object(
            Bucket=bucket, Key="evil.mp4", Body=served_playlist_text(metadata), ContentType=MP4
        )
        source = f"s3://{bucket}/evil.mp4"
        url = s3_source_url(source, client=client)

        with pytest.raises(InvalidSource, match="is an HLS playlist") as refused:
            probe(url, shown=source)

        assert str(refused.value).startswith(f"source {source} is")
        assert metadata.received() == []
        # Positive control: the same presigned URL, under plain ffprobe, reaches the server.
        plain_ffprobe(url)
        assert CREDENTIALS in metadata.received()

    def test_a_missing_object_is_an_invalid_source(
        self, moto_server: MotoServer, bucket: str
    ) -> None:
        """No such key: the job fails with what to check, rather than being retried."""
        with pytest.raises(InvalidSource, match="not found; check the bucket and key"):
            s3_source_url(f"s3://{bucket}/nope.mp4", client=s3_client(moto_server.endpoint))

    def test_a_refused_object_says_which_permission_is_missing(
        self, fault_proxy: FaultProxy, bucket: str
    ) -> None:
        """403 on the source: an invalid source naming s3:GetObject, not a retry."""
        fault_proxy.add(Rule("HEAD", f"^/{bucket}/", status=403))

        with pytest.raises(InvalidSource, match="grant s3:GetObject"):
            s3_source_url(f"s3://{bucket}/clip.mp4", client=s3_client(fault_proxy.endpoint))

    def test_an_unavailable_s3_is_transient(self, fault_proxy: FaultProxy, bucket: str) -> None:
        """503 from S3: a transient error, so the stage is retried with backoff."""
        fault_proxy.add(Rule("HEAD", f"^/{bucket}/", status=503))

        with pytest.raises(TransientError, match=f"s3://{bucket}/clip.mp4"):
            s3_source_url(f"s3://{bucket}/clip.mp4", client=s3_client(fault_proxy.endpoint))
