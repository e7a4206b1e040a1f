"""The playlist checker (tests/hlscheck.py) against the playlists hlsvault renders, and each of
its rules against a playlist that breaks it (so the checker can tell the two apart)."""

from __future__ import annotations

import m3u8
import pytest

from pipeline.plan import AudioRendition
from pipeline.playlists import AssetVersion, describe_rendition, render_master, render_variant
from pipeline.segment import Segment, SegmentedRendition

from hlscheck import check_playlist


def video(init: str | None) -> SegmentedRendition:
    suffix = "m4s" if init else "ts"
    return SegmentedRendition(
        rendition="720p",
        segments=tuple(Segment(i, f"seg_{i:05d}.{suffix}", 6.0, 500_000) for i in range(3)),
        width=1280, height=720, frame_rate="30", video_profile="High", video_level=31,
        audio_codec=None, audio_profile=None, init=init,
    )


def audio(position: int, language: str, *, default: bool) -> tuple[SegmentedRendition,
                                                                    AudioRendition]:
    name = f"audio{position}-{language}"
    produced = SegmentedRendition(
        rendition=name,
        segments=tuple(Segment(i, f"seg_{i:05d}.m4s", 6.0, 96_000) for i in range(3)),
        width=0, height=0, frame_rate="0/0", video_profile=None, video_level=None,
        audio_codec="aac", audio_profile="LC", init="init.mp4", media="audio", channels=2,
    )
    plan = AudioRendition(name, position, False, 128, language, language.upper(), default, 2)
    return produced, plan


def fmp4_version(*, audio_only: bool = False) -> AssetVersion:
    entries = [describe_rendition(video("init.mp4"), [500_016] * 3, 0, group="audio")]
    for produced, plan in (audio(0, "en", default=True), audio(1, "de", default=False)):
        entries.append(describe_rendition(produced, [96_016] * 3, 0, audio=plan, group="audio"))
    return AssetVersion("a", "v1", "job", 0.0, 0, tuple(entries), container="fmp4",
                        audio_only=audio_only)


def master_of(described: AssetVersion) -> str:
    return render_master(described, variant_uri=lambda r: f"{r.name}.m3u8")


def variant_of(described: AssetVersion, name: str) -> str:
    rendition = described.rendition(name)
    assert rendition is not None
    return render_variant(described, rendition, segment_uri=lambda s: s.name,
                          key_uri=lambda i: f"https://k/{i}", init_uri=lambda n: n)


class TestRenderedPlaylistsKeepTheRules:
    def test_fmp4_master_with_an_audio_group_and_audio_only_variant(self) -> None:
        """Both languages in one AUDIO group, one DEFAULT, referenced by the video variant and
        the audio-only one; BANDWIDTH includes the audio; VERSION 7."""
        text = master_of(fmp4_version(audio_only=True))
        assert check_playlist(text) == []
        parsed = m3u8.loads(text)
        assert [(m.language, m.default) for m in parsed.media] == [("en", "YES"), ("de", "NO")]
        video_variant, audio_variant = parsed.playlists
        assert video_variant.stream_info.audio == "audio"
        assert video_variant.stream_info.codecs == "avc1.64001f,mp4a.40.2"
        assert audio_variant.stream_info.codecs == "mp4a.40.2"
        assert video_variant.stream_info.bandwidth == (
            500_016 * 8 // 6 + audio_variant.stream_info.bandwidth
        )
        assert "#EXT-X-VERSION:7" in text

    def test_fmp4_media_playlist_declares_its_clear_init_segment_first(self) -> None:
        described = fmp4_version()
        for name in ("720p", "audio0-en"):
            text = variant_of(described, name)
            assert check_playlist(text) == []
            lines = text.splitlines()
            assert lines.index('#EXT-X-MAP:URI="init.mp4"') < next(
                i for i, line in enumerate(lines) if line.startswith("#EXT-X-KEY"))


#: One playlist per rule, each breaking only that rule.
BROKEN = {
    "no DEFAULT in an audio group": """#EXTM3U
#EXT-X-VERSION:7
#EXT-X-MEDIA:TYPE=AUDIO,GROUP-ID="a",NAME="en",URI="a.m3u8"
#EXT-X-STREAM-INF:BANDWIDTH=1,CODECS="mp4a.40.2",AUDIO="a"
v.m3u8
""",
    "two DEFAULTs in one group": """#EXTM3U
#EXT-X-VERSION:7
#EXT-X-MEDIA:TYPE=AUDIO,GROUP-ID="a",NAME="en",DEFAULT=YES,URI="a.m3u8"
#EXT-X-MEDIA:TYPE=AUDIO,GROUP-ID="a",NAME="de",DEFAULT=YES,URI="b.m3u8"
#EXT-X-STREAM-INF:BANDWIDTH=1,CODECS="mp4a.40.2",AUDIO="a"
v.m3u8
""",
    "an AUDIO= naming no group": """#EXTM3U
#EXT-X-VERSION:7
#EXT-X-MEDIA:TYPE=AUDIO,GROUP-ID="a",NAME="en",DEFAULT=YES,URI="a.m3u8"
#EXT-X-STREAM-INF:BANDWIDTH=1,CODECS="mp4a.40.2",AUDIO="b"
v.m3u8
""",
    "a group reference of the wrong TYPE": """#EXTM3U
#EXT-X-VERSION:7
#EXT-X-MEDIA:TYPE=SUBTITLES,GROUP-ID="a",NAME="en",URI="a.m3u8"
#EXT-X-STREAM-INF:BANDWIDTH=1,CODECS="mp4a.40.2",AUDIO="a"
v.m3u8
""",
    "a repeated NAME": """#EXTM3U
#EXT-X-VERSION:7
#EXT-X-MEDIA:TYPE=AUDIO,GROUP-ID="a",NAME="en",DEFAULT=YES,URI="a.m3u8"
#EXT-X-MEDIA:TYPE=AUDIO,GROUP-ID="a",NAME="en",URI="b.m3u8"
#EXT-X-STREAM-INF:BANDWIDTH=1,CODECS="mp4a.40.2",AUDIO="a"
v.m3u8
""",
    "DEFAULT without AUTOSELECT": """#EXTM3U
#EXT-X-VERSION:7
#EXT-X-MEDIA:TYPE=AUDIO,GROUP-ID="a",NAME="en",DEFAULT=YES,AUTOSELECT=NO,URI="a.m3u8"
#EXT-X-STREAM-INF:BANDWIDTH=1,CODECS="mp4a.40.2",AUDIO="a"
v.m3u8
""",
    "subtitles without URI": """#EXTM3U
#EXT-X-VERSION:7
#EXT-X-MEDIA:TYPE=SUBTITLES,GROUP-ID="s",NAME="en"
#EXT-X-STREAM-INF:BANDWIDTH=1,CODECS="mp4a.40.2",SUBTITLES="s"
v.m3u8
""",
    "a video variant not naming the subtitles group": """#EXTM3U
#EXT-X-VERSION:3
#EXT-X-MEDIA:TYPE=SUBTITLES,GROUP-ID="s",NAME="en",LANGUAGE="en",URI="s.m3u8"
#EXT-X-STREAM-INF:BANDWIDTH=1,RESOLUTION=640x360,CODECS="avc1.64001f"
v.m3u8
""",
    "FORCED=maybe": """#EXTM3U
#EXT-X-VERSION:3
#EXT-X-MEDIA:TYPE=SUBTITLES,GROUP-ID="s",NAME="en",FORCED=maybe,URI="s.m3u8"
#EXT-X-STREAM-INF:BANDWIDTH=1,CODECS="avc1.64001f",SUBTITLES="s"
v.m3u8
""",
    "a LANGUAGE that is no language tag": """#EXTM3U
#EXT-X-VERSION:3
#EXT-X-MEDIA:TYPE=SUBTITLES,GROUP-ID="s",NAME="en",LANGUAGE="en_US!",URI="s.m3u8"
#EXT-X-STREAM-INF:BANDWIDTH=1,CODECS="avc1.64001f",SUBTITLES="s"
v.m3u8
""",
    "two DEFAULT subtitles": """#EXTM3U
#EXT-X-VERSION:3
#EXT-X-MEDIA:TYPE=SUBTITLES,GROUP-ID="s",NAME="en",DEFAULT=YES,URI="s.m3u8"
#EXT-X-MEDIA:TYPE=SUBTITLES,GROUP-ID="s",NAME="de",DEFAULT=YES,URI="t.m3u8"
#EXT-X-STREAM-INF:BANDWIDTH=1,CODECS="avc1.64001f",SUBTITLES="s"
v.m3u8
""",
    "a variant without BANDWIDTH": """#EXTM3U
#EXT-X-VERSION:3
#EXT-X-STREAM-INF:CODECS="avc1.64001f"
v.m3u8
""",
    "a variant without a URI": """#EXTM3U
#EXT-X-VERSION:3
#EXT-X-STREAM-INF:BANDWIDTH=1,CODECS="avc1.64001f"
""",
    "no EXT-X-VERSION": """#EXTM3U
#EXT-X-STREAM-INF:BANDWIDTH=1,CODECS="avc1.64001f"
v.m3u8
""",
    "EXTINF above the target duration": """#EXTM3U
#EXT-X-VERSION:3
#EXT-X-TARGETDURATION:6
#EXTINF:6.5,
s0.ts
""",
    "no target duration": """#EXTM3U
#EXT-X-VERSION:3
#EXTINF:6.0,
s0.ts
""",
    "EXT-X-MAP below version 6": """#EXTM3U
#EXT-X-VERSION:3
#EXT-X-TARGETDURATION:6
#EXT-X-MAP:URI="init.mp4"
#EXTINF:6.0,
s0.m4s
""",
    "decimal EXTINF at version 2": """#EXTM3U
#EXT-X-VERSION:2
#EXT-X-TARGETDURATION:6
#EXTINF:6.0,
s0.ts
""",
    "an init segment under AES-128 without IV": """#EXTM3U
#EXT-X-VERSION:7
#EXT-X-TARGETDURATION:6
#EXT-X-KEY:METHOD=AES-128,URI="k"
#EXT-X-MAP:URI="init.mp4"
#EXTINF:6.0,
s0.m4s
""",
    "a key without URI": """#EXTM3U
#EXT-X-VERSION:3
#EXT-X-TARGETDURATION:6
#EXT-X-KEY:METHOD=AES-128
#EXTINF:6.0,
s0.ts
""",
    "a VOD playlist without ENDLIST": """#EXTM3U
#EXT-X-VERSION:3
#EXT-X-TARGETDURATION:6
#EXT-X-PLAYLIST-TYPE:VOD
#EXTINF:6.0,
s0.ts
""",
}


class TestEachRuleIsEnforced:
    @pytest.mark.parametrize("rule", sorted(BROKEN))
    def test_a_playlist_breaking_the_rule_is_refused(self, rule: str) -> None:
        assert check_playlist(BROKEN[rule]) != [], rule

    def test_the_same_playlists_mended_pass(self) -> None:
        """Positive control: the first broken master with its DEFAULT put back passes."""
        mended = BROKEN["no DEFAULT in an audio group"].replace('NAME="en"',
                                                                'NAME="en",DEFAULT=YES')
        assert check_playlist(mended) == []
        mended = BROKEN["EXT-X-MAP below version 6"].replace("VERSION:3", "VERSION:7")
        assert check_playlist(mended) == []

