"""Planning: which renditions a source becomes, and why a copy is refused."""

from __future__ import annotations

from dataclasses import replace

import pytest

from pipeline.errors import BadSpec, UnsupportedMedia
from pipeline.media import AudioStream, MediaInfo, VideoStream
from pipeline.plan import plan_renditions

H264 = VideoStream(
    codec="h264", profile="High", level=40, width=1920, height=1080, frame_rate="30",
    pix_fmt="yuv420p", rotation=0, bit_rate=None,
)
AAC = AudioStream(codec="aac", profile="LC", channels=2, sample_rate=48000, bit_rate=None)
SOURCE = MediaInfo("mov,mp4", 60.0, None, None, H264, AAC)


class TestCopyLadder:
    def test_h264_aac_is_remuxed_at_its_own_size(self) -> None:
        """An HLS-compatible source becomes one copied rendition of its own size."""
        [rendition] = plan_renditions(SOURCE, "copy", 6)
        assert rendition.copy and (rendition.width, rendition.height) == (1920, 1080)

    def test_video_without_audio_is_remuxed(self) -> None:
        """A silent H.264 source needs no audio codec to be copied."""
        [rendition] = plan_renditions(replace(SOURCE, audio=None), "copy", 6)
        assert rendition.copy

    @pytest.mark.parametrize(
        "change, reason",
        [
            ({"video": replace(H264, codec="hevc")}, "its video is hevc, not H.264"),
            ({"video": replace(H264, profile="High 10")}, "High 10"),
            ({"video": replace(H264, pix_fmt="yuv422p")}, "yuv422p"),
            ({"video": replace(H264, rotation=90)}, "rotated 90 degrees"),
            ({"audio": replace(AAC, codec="opus")}, "its audio is opus, not AAC"),
        ],
    )
    def test_unremuxable_sources_say_why_and_suggest_default(
        self, change: dict[str, object], reason: str
    ) -> None:
        """A copy that could not play cleanly is refused with the cause and the mend."""
        with pytest.raises(UnsupportedMedia) as caught:
            plan_renditions(replace(SOURCE, **change), "copy", 6)  # type: ignore[arg-type]
        assert reason in str(caught.value)
        assert "--ladder default" in str(caught.value)


class TestDefaultLadder:
    def test_1080p_source_gets_four_rungs_largest_first(self) -> None:
        """A 1080p source is transcoded to 1080p, 720p, 480p and 360p."""
        renditions = plan_renditions(SOURCE, "default", 6)
        assert [(r.width, r.height) for r in renditions] == [
            (1920, 1080), (1280, 720), (854, 480), (640, 360),
        ]
        assert all(not r.copy and r.gop_frames == 180 for r in renditions)

    def test_never_upscales(self) -> None:
        """A 480p source gets no 720p or 1080p rendition."""
        small = replace(SOURCE, video=replace(H264, width=854, height=480))
        assert [r.height for r in plan_renditions(small, "default", 6)] == [480, 360]

    def test_tiny_source_keeps_its_own_size(self) -> None:
        """A source under the lowest rung becomes one rendition of its own size."""
        tiny = replace(SOURCE, video=replace(H264, width=320, height=240))
        [rendition] = plan_renditions(tiny, "default", 6)
        assert (rendition.width, rendition.height) == (320, 240)

    def test_rotated_source_is_planned_at_display_size(self) -> None:
        """A portrait phone video (landscape pixels, rotated 90) gets portrait renditions."""
        portrait = replace(SOURCE, video=replace(H264, rotation=90))
        top = plan_renditions(portrait, "default", 6)[0]
        assert (top.width, top.height) == (608, 1080)

    def test_gop_follows_segment_duration_and_frame_rate(self) -> None:
        """Keyframes fall on every segment boundary: GOP = fps x segment seconds."""
        ntsc = replace(SOURCE, video=replace(H264, frame_rate="30000/1001"))
        assert plan_renditions(ntsc, "default", 2)[0].gop_frames == 60

    def test_high_frame_rates_are_halved(self) -> None:
        """120 fps sources are delivered at 60 fps."""
        fast = replace(SOURCE, video=replace(H264, frame_rate="120"))
        assert plan_renditions(fast, "default", 6)[0].frame_rate == "60"


@pytest.mark.parametrize("seconds", [0.5, 31])
def test_segment_duration_out_of_range_is_a_bad_spec(seconds: float) -> None:
    """Segment durations outside 1-30 s are refused with the allowed range."""
    with pytest.raises(BadSpec, match="out of range"):
        plan_renditions(SOURCE, "default", seconds)


def test_unknown_ladder_lists_the_choices() -> None:
    """A misspelt ladder names the ladders that exist."""
    with pytest.raises(BadSpec, match="copy, default"):
        plan_renditions(SOURCE, "fancy", 6)
