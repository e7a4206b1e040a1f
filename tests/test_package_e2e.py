"""End to end: package with the real CLI, serve, and play through the key server with ffmpeg."""

from __future__ import annotations

import json
from pathlib import Path

from support import Hlsvault, frame_hashes, framemd5


class TestCopyLadderPlayback:
    def test_played_frames_equal_the_source_frame_for_frame(
        self, keyserver: Hlsvault, copy_clip: Path
    ) -> None:
        """A remuxed, encrypted asset played over HTTP through the key server decodes to
        exactly the source's frames."""
        # Given a clip packaged with the copy ladder
        done = keyserver.package(str(copy_clip), "--asset", "e2e", "--ladder", "copy", "--json")
        assert done.returncode == 0, done.stderr
        summary = json.loads(done.stdout)
        assert summary["status"] == "succeeded"
        assert summary["asset"] == "e2e"
        assert [r["name"] for r in summary["renditions"]] == ["360p"]

        # When ffmpeg, as an HLS client, plays the tokenized URL
        url = keyserver.url("e2e")
        played = framemd5(url)

        # Then every decoded frame equals the source's, in order
        source = framemd5(str(copy_clip))
        assert len(played) == len(source) == 180
        assert frame_hashes(played) == frame_hashes(source)

    def test_segments_on_the_origin_are_versioned_and_encrypted(
        self, hlsvault: Hlsvault, copy_clip: Path
    ) -> None:
        """The origin holds versioned segments, none of them readable MPEG-TS, and cookie
        mode's static playlists: the versioned variant and the asset's stable master."""
        done = hlsvault.package(str(copy_clip), "--asset", "origin", "--ladder", "copy", "--json")
        assert done.returncode == 0, done.stderr
        version = json.loads(done.stdout)["version"]
        published = sorted(p for p in hlsvault.origin.rglob("*") if p.is_file())
        playlists = [p.relative_to(hlsvault.origin).as_posix() for p in published
                     if p.suffix == ".m3u8"]
        assert playlists == ["assets/origin/master.m3u8", f"assets/origin/{version}/360p.m3u8"]
        files = [p for p in published if p.suffix != ".m3u8"]
        assert files, "nothing was published"
        for path in files:
            relative = path.relative_to(hlsvault.origin).as_posix()
            assert relative.startswith(f"assets/origin/{version}/360p/seg_"), relative
            data = path.read_bytes()
            assert len(data) % 16 == 0
            # A clear MPEG-TS packet starts with the 0x47 sync byte every 188 bytes.
            assert not all(data[i] == 0x47 for i in range(0, min(len(data), 188 * 8), 188))

    def test_work_storage_is_emptied_after_publishing(
        self, hlsvault: Hlsvault, copy_clip: Path
    ) -> None:
        """Scratch segments (plain ones included) do not outlive the job."""
        done = hlsvault.package(str(copy_clip), "--asset", "scratch", "--ladder", "copy")
        assert done.returncode == 0, done.stderr
        leftovers = [p for p in (hlsvault.data_dir / "work").rglob("*.ts")]
        assert leftovers == []


class TestKeyRotation:
    def test_ffmpeg_plays_across_key_rotation_boundaries(
        self, keyserver: Hlsvault, copy_clip: Path
    ) -> None:
        """With a new key every 2 one-second segments, playback still decodes every source
        frame, and the playlist switches keys exactly where the key index changes."""
        done = keyserver.package(
            str(copy_clip), "--asset", "rotated", "--ladder", "copy", "--segment-seconds", "1",
            "--key-rotation-segments", "2", "--json",
        )
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["keys"] == 3

        url = keyserver.url("rotated")
        import urllib.request

        with urllib.request.urlopen(url, timeout=10) as response:
            master = response.read().decode()
        variant_url = next(line for line in master.splitlines() if line and line[0] != "#")
        with urllib.request.urlopen(variant_url, timeout=10) as response:
            variant = response.read().decode().splitlines()
        # Each EXT-X-KEY is followed by exactly two segments (one per second of video).
        key_lines = [i for i, line in enumerate(variant) if line.startswith("#EXT-X-KEY")]
        assert len(key_lines) == 3
        uris = [variant[i].split('URI="', 1)[1].split("?", 1)[0] for i in key_lines]
        assert [uri.rsplit("/", 1)[1] for uri in uris] == ["0", "1", "2"]
        for start, end in zip(key_lines, [*key_lines[1:], len(variant)], strict=True):
            assert sum(1 for line in variant[start:end] if line.startswith("#EXTINF")) == 2

        assert frame_hashes(framemd5(url)) == frame_hashes(framemd5(str(copy_clip)))
