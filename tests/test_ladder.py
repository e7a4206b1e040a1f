"""The default ladder: every rendition is what its master playlist entry says it is."""

from __future__ import annotations

import json
import subprocess
import urllib.request
from pathlib import Path

import m3u8

from support import Hlsvault


def fetch(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as response:
        body: bytes = response.read()
        return body.decode()


def ffprobe_streams(url: str) -> dict[str, dict[str, object]]:
    done = subprocess.run(
        ["ffprobe", "-v", "error", "-show_streams", "-of", "json", url],
        capture_output=True, timeout=60, check=True,
    )
    streams = json.loads(done.stdout)["streams"]
    return {s["codec_type"]: s for s in streams}




class TestDefaultLadder:
    def test_renditions_match_their_master_playlist_entries(
        self, keyserver: Hlsvault, hd_clip: Path
    ) -> None:
        """Resolution, codecs and measured bitrate of each rendition agree with its
        EXT-X-STREAM-INF, and every playlist parses as HLS."""
        # Given a 720p source packaged with the default ladder, two-second segments
        done = keyserver.package(
            str(hd_clip), "--asset", "ladder", "--ladder", "default", "--segment-seconds", "2",
            "--json",
        )
        assert done.returncode == 0, done.stderr

        # When the master playlist is fetched and parsed
        url = keyserver.url("ladder")
        master = m3u8.loads(fetch(url), uri=url)
        assert master.is_variant

        # Then it lists 720p, 480p and 360p (no upscale to 1080p), highest first
        heights = [p.stream_info.resolution[1] for p in master.playlists]
        assert heights == [720, 480, 360]

        for entry in master.playlists:
            info = entry.stream_info
            variant_url = entry.absolute_uri
            variant = m3u8.loads(fetch(variant_url), uri=variant_url)
            assert variant.is_endlist and variant.playlist_type == "vod"
            assert variant.target_duration >= max(round(s.duration) for s in variant.segments)

            # resolution and codecs, as ffprobe decodes the rendition through the key server
            streams = ffprobe_streams(variant_url)
            video, audio = streams["video"], streams["audio"]
            assert (video["width"], video["height"]) == info.resolution
            profile = {"High": "6400", "Main": "4d40"}[str(video["profile"])]
            assert info.codecs == f"avc1.{profile}{int(str(video['level'])):02x},mp4a.40.2"
            assert audio["codec_name"] == "aac"

            # bitrate: what a player downloads, over the playlist's own durations
            sizes = []
            for segment in variant.segments:
                request = urllib.request.Request(segment.absolute_uri, method="HEAD")
                with urllib.request.urlopen(request, timeout=10) as response:
                    sizes.append(int(response.headers["Content-Length"]))
            seconds = sum(s.duration for s in variant.segments)
            measured = sum(sizes) * 8 / seconds
            assert abs(measured - info.average_bandwidth) <= 0.01 * info.average_bandwidth
            peak = max(
                size * 8 / max(s.duration, 1.0)
                for size, s in zip(sizes, variant.segments, strict=True)
            )
            assert info.bandwidth >= int(peak)
            assert info.bandwidth >= info.average_bandwidth
            # and the encoder kept to the ladder's rate: under its VBV ceiling plus audio
            target_kbps = {720: 2800, 480: 1400, 360: 800}[info.resolution[1]]
            assert measured <= (target_kbps * 1.5 + 128) * 1000 * 1.1

    def test_keyframes_align_with_segment_boundaries(
        self, hlsvault: Hlsvault, hd_clip: Path
    ) -> None:
        """Every segment of every rendition starts on a keyframe at the same instant, so a
        player can switch renditions at any boundary."""
        done = hlsvault.package(
            str(hd_clip), "--asset", "gop", "--ladder", "default", "--segment-seconds", "1",
            "--json",
        )
        assert done.returncode == 0, done.stderr
        catalog = next((hlsvault.vault / "catalog" / "gop" / "versions").glob("*.json"))
        described = json.loads(catalog.read_text())
        durations = {
            r["name"]: [round(s["duration"], 3) for s in r["segments"]]
            for r in described["renditions"]
        }
        assert len(durations) == 3
        first = next(iter(durations.values()))
        assert first == [1.0, 1.0, 1.0, 1.0]
        assert all(d == first for d in durations.values())
