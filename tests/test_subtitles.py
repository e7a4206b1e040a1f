"""Subtitles (pipeline/subtitles.py): WebVTT and SubRip read as hostile input, the plan of a
job's subtitle renditions, and the segmented WebVTT cut from them; the master playlist naming
the subtitles group. End to end (packaged, served, played) in test_subtitles_e2e.py."""

from __future__ import annotations

import os
import subprocess
import time
from dataclasses import replace
from pathlib import Path

import m3u8
import pytest

from pipeline import layout
from pipeline.errors import BadSpec, CorruptRecord, InvalidSource, StageTimeout
from pipeline.ingest import parse_job_request
from pipeline.jobs import JobSpec, new_job_spec
from pipeline.media import MediaInfo, SubtitleStream, VideoStream, probe
from pipeline.plan import hls_language
from pipeline.playlists import AssetVersion, RenditionEntry, describe_rendition, render_master
from pipeline.segment import Segment, SegmentedRendition
from pipeline.subtitles import (
    MAX_CUE_CHARS,
    MAX_SEGMENT_BYTES,
    MAX_SUBTITLE_BYTES,
    Cue,
    check_language,
    check_segmented_size,
    check_sidecar_names,
    check_sidecar_source,
    clip_cues,
    extract_text_tracks,
    parse_subtitles,
    plan_subtitles,
    read_sidecar,
    timestamp,
    webvtt_segments,
)

from hlscheck import attributes, check_playlist

VTT = """WEBVTT - a talk

NOTE written by hand

STYLE
::cue { color: yellow }

intro
00:00:00.500 --> 00:00:02.000 align:start position:10% region:r1
Hello <i>there</i>

00:01.900 --> 00:03.250
Second line
of two
"""

SRT = """1
00:00:00,500 --> 00:00:02,000
{\\an8}Hallo <i>da</i> & <du>

2
00:00:01,900 --> 00:00:03,250 X1:10 X2:20
Zweite Zeile

3
00:00:04,000 --> 00:00:04,000
shown for no time
"""


class TestParsing:
    def test_webvtt_keeps_cue_times_text_and_known_settings(self) -> None:
        """Identifiers, NOTE and STYLE blocks go; times, text and cue settings stay (a
        region's setting goes with its REGION block)."""
        cues = parse_subtitles(VTT.encode(), "talk.vtt")
        assert cues == [
            Cue(0.5, 2.0, "Hello <i>there</i>", "align:start position:10%"),
            Cue(1.9, 3.25, "Second line\nof two"),
        ]

    @pytest.mark.parametrize(("settings", "kept"), [
        ("line:--> align:<script>", ""),
        ("vertical:rl line:-2,end position:12.5%,line-left size:100% align:right",
         "vertical:rl line:-2,end position:12.5%,line-left size:100% align:right"),
        ("line:40% vertical:up size:101% position:5 align:middle region:r1 color:red",
         "line:40%"),
        ("xline:5 line:5:6 align:", ""),
    ])
    def test_only_webvtt_settings_with_their_values_stay(self, settings: str, kept: str) -> None:
        data = f"WEBVTT\n\n00:00:01.000 --> 00:00:02.000 {settings}\nok\n".encode()
        (cue,) = parse_subtitles(data, "talk.vtt")
        assert cue.settings == kept

    def test_webvtt_cue_text_keeps_its_own_tags_and_escapes_others(self) -> None:
        text = ("<v Roger Bingham>We are <c.yellow.bg>in</c> <b>New</b> <00:00:01.500>York"
                "</v> &amp; &nbsp;\n<script>alert(1)</script> <img src=x> a < b && c > d")
        data = f"WEBVTT\n\n00:00:01.000 --> 00:00:02.000\n{text}\n".encode()
        (cue,) = parse_subtitles(data, "talk.vtt")
        assert cue.text == (
            "<v Roger Bingham>We are <c.yellow.bg>in</c> <b>New</b> <00:00:01.500>York</v> "
            "&amp; &nbsp;\n&lt;script&gt;alert(1)&lt;/script&gt; &lt;img src=x&gt; a &lt; b "
            "&amp;&amp; c &gt; d")

    def test_subrip_becomes_webvtt_cue_text(self) -> None:
        """Commas, indices and coordinates read; ASS overrides dropped; & and stray < escaped
        while <i> stays; a cue shown for no time is dropped; a UTF-8 BOM and CRLF are fine."""
        data = ("\ufeff" + SRT.replace("\n", "\r\n")).encode()
        cues = parse_subtitles(data, "talk.srt")
        assert cues == [
            Cue(0.5, 2.0, "Hallo <i>da</i> &amp; &lt;du&gt;"),
            Cue(1.9, 3.25, "Zweite Zeile"),
        ]


class TestHostileFiles:
    @pytest.mark.parametrize(("data", "reason"), [
        (os.urandom(4096), "not UTF-8 text"),
        (b"WEBVTT\n\n00:00:01.000 --> 00:00:02.000\nok\x00\n", "control characters"),
        (b"hello world\nthis is a letter\n", "neither a SubRip cue timing"),
        (b"WEBVTT\n\n00:00:01 --> 00:00:02\nno milliseconds\n", "not a WebVTT cue timing"),
        (b"WEBVTT\n\n00:00:01.000 --> 00:00:02.000\na --> b\n", "holds '-->'"),
        (b"WEBVTT\n\nNOTE nothing else\n", "holds no cue"),
        (b"", "holds no cue"),
        ("1\n00:00:01,000 --> 00:00:02,000\n{}\n".format("x" * (MAX_CUE_CHARS + 1)).encode(),
         "more than"),
        (b"WEBVTT" + b" " * MAX_SUBTITLE_BYTES, "a subtitle file may be"),
    ], ids=["binary", "control", "prose", "bad-timing", "arrow", "no-cue", "empty", "long-cue",
            "huge"])
    def test_refused_with_the_reason(self, data: bytes, reason: str) -> None:
        with pytest.raises(InvalidSource, match=reason) as refused:
            parse_subtitles(data, "talk.de.srt")
        assert "talk.de.srt" in str(refused.value)

    def test_a_huge_file_is_refused_before_it_is_read(self, tmp_path: Path) -> None:
        """A sparse file larger than the bound: refused by its size, not by reading it."""
        huge = tmp_path / "huge.vtt"
        with huge.open("wb") as handle:
            handle.truncate(MAX_SUBTITLE_BYTES * 100)
        with pytest.raises(InvalidSource, match="MB, more than"):
            read_sidecar(str(huge), "huge.vtt")

    @pytest.mark.parametrize("path", ["/dev/zero", "/tmp"])
    def test_only_regular_files_are_read(self, path: str) -> None:
        with pytest.raises(InvalidSource, match="not a regular file"):
            read_sidecar(path, path)

    def test_a_missing_file_says_so(self, tmp_path: Path) -> None:
        with pytest.raises(InvalidSource, match="not found"):
            read_sidecar(str(tmp_path / "nope.vtt"), "nope.vtt")

    def test_a_regular_file_is_read(self, tmp_path: Path) -> None:
        """Positive control for the refusals above."""
        good = tmp_path / "talk.vtt"
        good.write_text(VTT)
        assert parse_subtitles(read_sidecar(str(good), "talk.vtt"), "talk.vtt")


class TestSpecChecks:
    @pytest.mark.parametrize("tag", ["en", "de", "pt-BR", "zh-Hant", "eng", "sr-Latn-RS"])
    def test_language_tags_accepted(self, tag: str) -> None:
        assert check_language(tag) == tag

    @pytest.mark.parametrize("tag", ["", "e", "x1", "english!", "../x", "en_US", "12", "en-",
                                     "x" * 40])
    def test_language_tags_refused(self, tag: str) -> None:
        with pytest.raises(BadSpec, match="RFC 5646"):
            check_language(tag)

    @pytest.mark.parametrize("tag", ["x", "x1", "en", "pt-BR", "abcd", "zh-Hant-TW", "e-n"])
    def test_one_rule_for_sidecars_and_source_tracks(self, tag: str) -> None:
        """A tag a sidecar may have is the tag a source track keeps, and no other."""
        try:
            accepted = check_language(tag) == tag
        except BadSpec:
            accepted = False
        assert accepted == (hls_language(tag) == tag)

    @pytest.mark.parametrize("source", ["http://169.254.169.254/latest", "file:///etc/passwd",
                                        "relative/talk.vtt", "s3://bucket-only", "", "/a\x00b"])
    def test_sidecar_locations_refused(self, source: str) -> None:
        with pytest.raises((BadSpec, InvalidSource)):
            check_sidecar_source(source)

    @pytest.mark.parametrize("s3_only", [False, True], ids=["cli", "request"])
    def test_a_refused_sidecar_url_is_named_by_its_scheme_alone(self, s3_only: bool) -> None:
        """A sidecar URL may carry a credential: the refusal, which a request's sender gets as
        its 400 body and which lands in logs, shows the scheme and nothing after it."""
        with pytest.raises(BadSpec, match="s3://bucket/key") as refused:
            check_sidecar_source("https://user:secret@host/talk.vtt", s3_only=s3_only)
        assert "https://…" in str(refused.value)
        assert "secret" not in str(refused.value) and "user" not in str(refused.value)

    def test_a_requests_refused_sidecar_shows_no_credential(self) -> None:
        with pytest.raises(BadSpec) as refused:
            parse_job_request({"source": "s3://in/talk.mp4", "subtitles": [
                {"language": "de", "source": "https://user:secret@host/talk.vtt"}]})
        assert "https://…" in str(refused.value) and "secret" not in str(refused.value)

    @pytest.mark.parametrize(("source", "says"), [
        ("S3://bucket/talk.vtt", "S3 URLs are lower case, s3://bucket/key"),
        ("file:///subs/talk.vtt", "give the path itself"),
        ("HTTP://host/talk.vtt", "URLs are not fetched"),
        ("media/a://b.vtt", "must be an absolute path"),
    ])
    def test_a_sidecar_url_of_another_scheme_says_what_to_give(self, source: str,
                                                                says: str) -> None:
        with pytest.raises(BadSpec, match=says):
            check_sidecar_source(source)

    def test_a_job_spec_keeps_its_sidecars_through_json(self) -> None:
        spec = new_job_spec("/src/talk.mp4", subtitles=[("de", "/src/talk.de.srt")])
        assert spec.subtitles == (("de", "/src/talk.de.srt"),)
        import json

        assert JobSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
        with pytest.raises(BadSpec, match="RFC 5646"):
            new_job_spec("/src/talk.mp4", subtitles=[("deutsch!", "/src/talk.de.srt")])

    def test_a_job_spec_keeps_the_names_the_user_gave_its_sidecars(self) -> None:
        """The file names the CLI keeps for uploaded sidecars survive the spec's JSON, and a
        spec naming them with a path, control characters or the wrong count is refused."""
        import json

        sidecars = [("de", "s3://work/sources/j/subtitles/0.srt")]
        spec = replace(new_job_spec("/src/talk.mp4", subtitles=sidecars),
                       subtitle_names=check_sidecar_names(["talk.de.srt"], sidecars))
        document = json.loads(json.dumps(spec.to_dict()))
        assert JobSpec.from_dict(document).subtitle_names == ("talk.de.srt",)
        for bad in (["../talk.de.srt"], ["a\\b.srt"], ["talk\n.srt"], ["\u202etrs.vtt"],
                    [".."], ["x" * 256], ["a.srt", "b.srt"]):
            with pytest.raises(BadSpec, match="subtitle file"):
                JobSpec.from_dict({**document, "subtitle_names": bad})
        # A name that is not text is no user's: a damaged spec (tests/test_records.py).
        with pytest.raises(CorruptRecord, match="'subtitle_names' is not a list of text"):
            JobSpec.from_dict({**document, "subtitle_names": [7]})

    def test_a_job_request_names_sidecars_in_s3(self) -> None:
        request = parse_job_request({"source": "s3://in/talk.mp4", "subtitles": [
            {"language": "de", "source": "s3://in/talk.de.vtt"}]})
        assert request.subtitles == (("de", "s3://in/talk.de.vtt"),)
        for bad, reason in (
            ([{"language": "de", "source": "/etc/passwd"}], "as an S3 object like its source"),
            ([{"language": "de!", "source": "s3://in/x.vtt"}], "RFC 5646"),
            ([{"language": "de", "source": "s3://in/x.vtt", "extra": 1}], "must be a list"),
            ({"de": "s3://in/x.vtt"}, "must be a list"), (["s3://in/x.vtt"], "must be a list"),
            ([{"language": "de", "source": "s3://in/x.vtt"}] * 17, "a job takes at most 16"),
        ):
            with pytest.raises(BadSpec, match=reason):
                parse_job_request({"source": "s3://in/talk.mp4", "subtitles": bad})


def media_with(*tracks: SubtitleStream) -> MediaInfo:
    video = VideoStream("h264", "High", 31, 640, 360, "30", "yuv420p", 0, None)
    return MediaInfo("mov,mp4", 6.0, None, None, video, None, subtitle_tracks=tracks)


class TestPlan:
    def test_text_tracks_then_sidecars_with_names_defaults_and_forced(self) -> None:
        """The source's text tracks in order, picture tracks skipped with a warning, then the
        sidecars; its default track the only DEFAULT, its forced one FORCED; NAME from the
        title or the language, unique."""
        info = media_with(
            SubtitleStream(0, "mov_text", "eng", None, default=False),
            SubtitleStream(1, "hdmv_pgs_subtitle", "fra"),
            SubtitleStream(2, "subrip", "eng", "Signs", default=True, forced=True),
        )
        planned, warnings = plan_subtitles(info, [("de", "/x/de.vtt"), ("en", "/x/en.srt")])
        assert [(t.name, t.language, t.title, t.default, t.forced, t.track, t.sidecar)
                for t in planned] == [
            ("subs0-en", "en", "English", False, False, 0, None),
            ("subs1-en", "en", "Signs", True, True, 2, None),
            ("subs2-de", "de", "Deutsch", False, False, None, "/x/de.vtt"),
            ("subs3-en", "en", "English (4)", False, False, None, "/x/en.srt"),
        ]
        assert len(warnings) == 1 and "hdmv_pgs_subtitle" in warnings[0]


class TestSegmentedWebvtt:
    def test_one_segment_per_video_segment_with_the_map_and_shared_cues(self) -> None:
        """A cue across a boundary is in both segments; the last segment takes every cue to
        the end; each segment opens with the map and keeps the source's cue times."""
        cues = [Cue(0.5, 1.0, "a"), Cue(1.5, 2.5, "b"), Cue(5.0, 9.0, "c")]
        made = webvtt_segments(cues, [2.0, 2.0, 2.0], 126000)
        assert not isinstance(made, list)  # made one at a time, not all held at once
        segments = [s.decode() for s in made]
        assert len(segments) == 3
        for text in segments:
            assert text.startswith("WEBVTT\nX-TIMESTAMP-MAP=MPEGTS:126000,LOCAL:00:00:00.000\n")
        assert "00:00:00.500 --> 00:00:01.000\na" in segments[0]
        assert "\nb\n" in segments[0] and "\nb\n" in segments[1]
        assert "\nc\n" not in segments[1] and "00:00:05.000 --> 00:00:09.000\nc" in segments[2]
        for text in segments:  # each parses back (the check WebVTT readers make)
            parse_subtitles(text.encode(), "segment", allow_empty=True)

    def test_segments_begin_where_the_video_begins(self) -> None:
        """The video starts 0.8 s into the source: its first 2 s segment shows cues up to
        2.8 s of the source's time, the second from there."""
        cues = [Cue(2.5, 2.7, "early"), Cue(2.9, 3.5, "late")]
        first, second = (s.decode() for s in webvtt_segments(cues, [2.0, 2.0], 0, 0.8))
        assert "early" in first and "late" not in first
        assert "early" not in second and "late" in second

    def test_cues_end_with_the_video(self) -> None:
        info = replace(media_with(), duration=10.0, video_start=0.5)
        cues = [Cue(1.0, 356400.0, "long"), Cue(9.0, 10.0, "end"), Cue(10.6, 11.0, "after")]
        assert [(c.start, c.end, c.text) for c in clip_cues(cues, info)] == [
            (1.0, 10.5, "long"), (9.0, 10.0, "end")]

    def test_the_segmented_size_is_bounded(self) -> None:
        """Long cues shown across every segment are refused at the probe; the same text in
        short cues, each in one segment, is not."""
        info = replace(media_with(), duration=3 * 3600.0)
        text = "x" * MAX_CUE_CHARS
        spread = [Cue(i * 2.0, i * 2.0 + 1.0, text) for i in range(4000)]
        check_segmented_size(spread, info, 6.0, "talk.vtt")
        many = [Cue(0.0, 20 * 3600.0, text) for _ in range(4)]  # 8 KB in 12,000 segments
        with pytest.raises(InvalidSource, match=r"talk.vtt would make 97.5 MB .*, 0.0 MB in"):
            check_segmented_size(many, replace(info, duration=20 * 3600.0), 6.0, "talk.vtt")
        crowded = [Cue(0.0, 1.0, text)] * (MAX_SEGMENT_BYTES // MAX_CUE_CHARS + 1)
        with pytest.raises(InvalidSource, match=r"1.1 MB of WebVTT segments, 1.1 MB in its"):
            check_segmented_size(crowded, info, 6.0, "talk.vtt")

    def test_the_map_wraps_at_33_bits_and_times_are_exact(self) -> None:
        (segment,) = webvtt_segments([Cue(3661.5, 3662.0, "x")], [10.0], (1 << 33) + 5)
        assert b"MPEGTS:5," in segment
        assert timestamp(3661.5) == "01:01:01.500"


def subtitle_entry(name: str, language: str, default: bool, forced: bool,
                   size: int = 304) -> RenditionEntry:
    produced = SegmentedRendition(
        rendition=name, segments=tuple(Segment(i, f"seg_{i:05d}.vtt", 6.0, 300)
                                       for i in range(3)),
        width=0, height=0, frame_rate="0/0", video_profile=None, video_level=None,
        audio_codec=None, audio_profile=None, media="subtitles",
    )
    return replace(describe_rendition(produced, [size] * 3, 0), group=layout.SUBTITLES_GROUP,
                   language=language, title=language.upper(), default=default, forced=forced)


class TestMaster:
    def test_subtitles_group_named_by_every_video_variant(self) -> None:
        """EXT-X-MEDIA TYPE=SUBTITLES with LANGUAGE, NAME, DEFAULT, AUTOSELECT, FORCED and a
        URI; each video variant says SUBTITLES="subs"; the checker and m3u8 agree."""
        video = SegmentedRendition(
            rendition="360p", segments=tuple(Segment(i, f"seg_{i:05d}.ts", 6.0, 100_000)
                                             for i in range(3)),
            width=640, height=360, frame_rate="30", video_profile="High", video_level=31,
            audio_codec="aac", audio_profile="LC",
        )
        entries = (describe_rendition(video, [100_016] * 3, 0),
                   subtitle_entry("subs0-en", "en", True, False),
                   subtitle_entry("subs1-de", "de", False, True, size=3040))
        described = AssetVersion("a", "v1", "job", 0.0, 0, entries)
        text = render_master(described, variant_uri=lambda r: f"{r.name}.m3u8")
        assert check_playlist(text) == []
        media = [attributes(line) for line in text.splitlines()
                 if line.startswith("#EXT-X-MEDIA:")]
        assert [(m["TYPE"], m["GROUP-ID"], m["LANGUAGE"], m["NAME"], m["DEFAULT"],
                 m["AUTOSELECT"], m["FORCED"], m["URI"]) for m in media] == [
            ("SUBTITLES", "subs", "en", "EN", "YES", "YES", "NO", "subs0-en.m3u8"),
            ("SUBTITLES", "subs", "de", "DE", "NO", "YES", "YES", "subs1-de.m3u8"),
        ]
        parsed = m3u8.loads(text)
        assert parsed.playlists[0].stream_info.subtitles == "subs"
        # BANDWIDTH counts the subtitle group's largest rendition (RFC 8216 4.3.4.2): the
        # German one's 3040 bytes each 6 s, 4054 bit/s
        video_only, german = entries[0], entries[2]
        assert german.bandwidth == german.average_bandwidth == 4054
        assert parsed.playlists[0].stream_info.bandwidth == video_only.bandwidth + 4054
        assert (parsed.playlists[0].stream_info.average_bandwidth
                == video_only.average_bandwidth + 4054)
        assert [m.forced for m in parsed.media] == ["NO", "YES"]


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


class TestTextTracksOfASource:
    def test_subrip_and_ass_in_matroska_become_cues(self, tmp_path: Path) -> None:
        """An MKV with a SubRip and an ASS track (written by ffmpeg from files written here):
        both are extracted by one ffmpeg and read back with the source's times and text."""
        srt = write(tmp_path / "en.srt", "1\n00:00:00,500 --> 00:00:01,500\nHello\n\n"
                    "2\n00:00:02,000 --> 00:00:02,750\n<i>World</i>\n")
        ass = write(tmp_path / "de.ass", ASS)
        source = tmp_path / "talk.mkv"
        subprocess.run(
            ["ffmpeg", "-v", "error", "-f", "lavfi", "-i", "testsrc2=size=160x90:rate=10",
             "-i", str(srt), "-i", str(ass), "-t", "3", "-map", "0:v", "-map", "1", "-map",
             "2", "-c:v", "libx264", "-preset", "ultrafast", "-c:s:0", "srt", "-c:s:1", "ass",
             "-metadata:s:s:0", "language=eng", "-metadata:s:s:1", "language=ger",
             "-disposition:s:0", "0", "-disposition:s:1", "default", str(source)],
            check=True, timeout=60,
        )
        info = probe(str(source))
        assert [(t.codec, t.language) for t in info.subtitle_tracks] == [
            ("subrip", "eng"), ("ass", "ger")]
        planned, _ = plan_subtitles(info, [])
        assert [t.default for t in planned] == [False, True]  # Matroska's FlagDefault
        extracted = extract_text_tracks(str(source), info, planned, tmp_path, shown="talk.mkv",
                                        deadline=time.monotonic() + 60)
        english = parse_subtitles(extracted["subs0-en"], "en")
        german = parse_subtitles(extracted["subs1-de"], "de")
        assert [(c.start, c.end, c.text) for c in english] == [
            (0.5, 1.5, "Hello"), (2.0, 2.75, "<i>World</i>")]
        assert [(c.start, c.end, c.text) for c in german] == [(1.0, 2.5, "Hallo Welt")]

    def test_reading_text_tracks_stops_at_the_stage_deadline(self, tmp_path: Path) -> None:
        """A source ffmpeg waits on (a FIFO no one writes) is stopped when the probe stage's
        time is up, with a reason naming the text tracks; no time left: not started."""
        fifo = tmp_path / "talk.mkv"
        os.mkfifo(fifo)
        info = replace(media_with(SubtitleStream(0, "subrip", "en", None)),
                       format_name="matroska,webm")
        planned, _ = plan_subtitles(info, [])
        started = time.monotonic()
        with pytest.raises(StageTimeout, match="reading the source's text tracks took longer"):
            extract_text_tracks(str(fifo), info, planned, tmp_path, shown="talk.mkv",
                                deadline=started + 1.5)
        assert 1.5 <= time.monotonic() - started < 10
        with pytest.raises(StageTimeout, match="left no time to read its text tracks"):
            extract_text_tracks(str(fifo), info, planned, tmp_path, shown="talk.mkv",
                                deadline=time.monotonic() - 1)

    def test_an_mp4_text_track_is_not_default(self, tmp_path: Path) -> None:
        """Two mov_text tracks muxed without ``-disposition``: ffprobe calls the first
        default (ffmpeg enables it), yet no rendition is DEFAULT=YES."""
        srt = write(tmp_path / "en.srt", "1\n00:00:00,500 --> 00:00:01,500\nHello\n")
        source = tmp_path / "talk.mp4"
        subprocess.run(
            ["ffmpeg", "-v", "error", "-f", "lavfi", "-i", "testsrc2=size=160x90:rate=10",
             "-i", str(srt), "-i", str(srt), "-t", "2", "-map", "0:v", "-map", "1", "-map", "2",
             "-c:v", "libx264", "-preset", "ultrafast", "-c:s", "mov_text", str(source)],
            check=True, timeout=60,
        )
        read = subprocess.run(
            ["ffprobe", "-v", "error", "-select_streams", "s", "-show_entries",
             "stream_disposition=default", "-of", "csv=p=0", str(source)],
            capture_output=True, text=True, check=True, timeout=60,
        )
        assert read.stdout.split() == ["1", "0"]
        planned, _ = plan_subtitles(probe(str(source)), [])
        assert [t.default for t in planned] == [False, False]


ASS = """[Script Info]
ScriptType: v4.00+
PlayResX: 384
PlayResY: 288

[V4+ Styles]
Format: Name, Fontname, Fontsize, PrimaryColour, SecondaryColour, OutlineColour, BackColour, \
Bold, Italic, Underline, StrikeOut, ScaleX, ScaleY, Spacing, Angle, BorderStyle, Outline, \
Shadow, Alignment, MarginL, MarginR, MarginV, Encoding
Style: Default,Arial,16,&Hffffff,&Hffffff,&H0,&H0,0,0,0,0,100,100,0,0,1,1,0,2,10,10,10,0

[Events]
Format: Layer, Start, End, Style, Name, MarginL, MarginR, MarginV, Effect, Text
Dialogue: 0,0:00:01.00,0:00:02.50,Default,,0,0,0,,Hallo Welt
"""
