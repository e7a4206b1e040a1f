"""Playlists: measured attributes and RFC 8216 text."""

from __future__ import annotations

import m3u8

from pipeline.playlists import (
    AssetVersion,
    audio_codec_tag,
    describe_rendition,
    render_master,
    render_variant,
    video_codec_tag,
)
from pipeline.segment import Segment, SegmentedRendition


def produced(durations: list[float]) -> SegmentedRendition:
    return SegmentedRendition(
        rendition="720p",
        segments=tuple(Segment(i, f"seg_{i:05d}.ts", d, 1000) for i, d in enumerate(durations)),
        width=1280, height=720, frame_rate="30000/1001", video_profile="Main", video_level=31,
        audio_codec="aac", audio_profile="LC",
    )


def version_of(durations: list[float], sizes: list[int], rotation: int = 0) -> AssetVersion:
    entry = describe_rendition(produced(durations), sizes, rotation)
    return AssetVersion("a", "v1", "job", 0.0, rotation, (entry,))


class TestCodecTags:
    def test_h264_profiles_and_levels(self) -> None:
        """RFC 6381 avc1 strings carry profile, constraint flags and level in hex."""
        assert video_codec_tag("High", 40) == "avc1.640028"
        assert video_codec_tag("Main", 31) == "avc1.4d401f"
        assert video_codec_tag("Constrained Baseline", 30) == "avc1.42e01e"

    def test_aac_object_types(self) -> None:
        """AAC-LC is mp4a.40.2 and HE-AAC mp4a.40.5; no audio gives no tag."""
        assert audio_codec_tag("aac", "LC") == "mp4a.40.2"
        assert audio_codec_tag("aac", "HE-AAC") == "mp4a.40.5"
        assert audio_codec_tag(None, None) is None


class TestMeasuredAttributes:
    def test_average_and_peak_bandwidth_come_from_segment_sizes(self) -> None:
        """AVERAGE-BANDWIDTH is total bits over total time; BANDWIDTH the busiest segment."""
        described = version_of([4.0, 4.0, 2.0], [400_000, 800_000, 100_000])
        entry = described.renditions[0]
        assert entry.average_bandwidth == 1_300_000 * 8 // 10
        assert entry.bandwidth == 800_000 * 8 // 4

    def test_target_duration_is_the_longest_rounded_segment(self) -> None:
        """EXT-X-TARGETDURATION covers every EXTINF rounded to the nearest integer."""
        described = version_of([6.006, 6.49, 3.0], [1, 1, 1])
        assert described.renditions[0].target_duration == 6
        described = version_of([6.5, 2.0], [1, 1])
        assert described.renditions[0].target_duration == 7


class TestRendering:
    def test_variant_switches_key_where_the_index_changes(self) -> None:
        """With rotation every 2 segments, an EXT-X-KEY precedes segments 0, 2 and 4."""
        described = version_of([2.0] * 5, [16] * 5, rotation=2)
        text = render_variant(
            described, described.renditions[0],
            segment_uri=lambda s: f"https://cdn/{s.name}", key_uri=lambda i: f"https://k/{i}",
        )
        parsed = m3u8.loads(text)
        assert [s.key.uri for s in parsed.segments] == [
            "https://k/0", "https://k/0", "https://k/1", "https://k/1", "https://k/2",
        ]
        assert all(s.key.method == "AES-128" and s.key.iv is None for s in parsed.segments)
        assert parsed.is_endlist and parsed.playlist_type == "vod"
        assert parsed.version == 3 and parsed.is_independent_segments

    def test_master_lists_every_attribute(self) -> None:
        """The master carries BANDWIDTH, AVERAGE-BANDWIDTH, RESOLUTION, FRAME-RATE, CODECS."""
        described = version_of([6.0, 6.0], [750_000, 750_000])
        parsed = m3u8.loads(render_master(described, variant_uri=lambda r: f"{r.name}.m3u8"))
        [variant] = parsed.playlists
        info = variant.stream_info
        assert info.bandwidth == 1_000_000 and info.average_bandwidth == 1_000_000
        assert info.resolution == (1280, 720)
        assert abs(info.frame_rate - 29.97) < 0.001
        assert info.codecs == "avc1.4d401f,mp4a.40.2"
        assert variant.uri == "720p.m3u8"
