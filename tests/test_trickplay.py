"""Trick play: the I-frame rendition and the thumbnail track.

Unit tests render the playlists and the WebVTT track from descriptions and hold the playlist
checker's new rules to playlists that break them. End to end, assets packaged with
``--trick-play`` by the real CLI are fetched through the key server as a player would: every
I-frame segment named by the served I-frame playlist decrypts with the key and IV the playlist
gives and decodes to exactly one picture (the source's frame at that segment's start), the
thumbnail track's cues cover the video and each tile shows the source's frame at its time; both
are refused without a token, re-encrypted by a re-key and withdrawn by a revocation, in
embedded mode and on the fleet."""

from __future__ import annotations

import itertools
import json
import math
import re
import subprocess
import time
import urllib.request
from dataclasses import dataclass, replace
from pathlib import Path
from urllib.parse import parse_qs, urljoin, urlsplit, urlunsplit

import m3u8
import pytest
from test_lifecycle import status_of

from pipeline import layout
from pipeline.errors import BadSpec
from pipeline.ingest import parse_job_request
from pipeline.playlists import (
    AssetVersion,
    describe_rendition,
    render_master,
    render_variant,
    static_playlists,
)
from pipeline.segment import Segment, SegmentedRendition
from pipeline.thumbnails import Thumbnails, plan_thumbnails, render_vtt

from browser import Player, PlayerPageServer
from cdn_support import policy_of, rsa_key_pair
from fleet import Fleet, MotoServer
from hlscheck import assert_valid_hls, check_playlist, fetch
from support import Hlsvault, decrypt_bytes, frame_hashes, framemd5

#: copy_clip: 6 s at 30 fps with a keyframe every second, cut into 2 s segments.
SEGMENT_SECONDS = 2
FPS = 30
SEGMENTS = 3
#: A tile against the source's frame at its time, in mean absolute difference of 8-bit grey
#: levels: JPEG and scaling cost about 1 (measured: 1.08-1.13); against the clip's frame at
#: another cue's time, 4.1 to 6.7.
SAME_PICTURE = 2.5
#: ...and it is this many times nearer its own time's frame than any other's.
NEARER = 2.5


# -- unit: descriptions, playlists, the track --------------------------------------------------


def rendition(name: str, media: str, init: str | None, sizes: list[int]) -> SegmentedRendition:
    suffix = "m4s" if init else "ts"
    return SegmentedRendition(
        rendition=name,
        segments=tuple(Segment(i, f"seg_{i:05d}.{suffix}", 6.0, size)
                       for i, size in enumerate(sizes)),
        width=640, height=360, frame_rate="30", video_profile="Main", video_level=30,
        audio_codec="aac" if media == "video" and not init else None,
        audio_profile="LC" if media == "video" and not init else None, init=init, media=media,
        video_tag="avc1.4d401e" if media == "iframes" else None,
    )


def version_with_iframes(init: str | None) -> AssetVersion:
    video = describe_rendition(rendition("360p", "video", init, [600_000] * 3), [600_016] * 3, 0)
    iframes = describe_rendition(
        rendition(layout.IFRAME_RENDITION, "iframes", init, [9_000, 12_000, 6_000]),
        [9_008, 12_000 + 16, 6_016], 0,
    )
    thumbnails = plan_thumbnails(640, 360, [6.0, 6.0, 6.0])
    return AssetVersion("a", "v1", "job", 0.0, 0, (video, iframes),
                        container="fmp4" if init else "ts", thumbnails=thumbnails)


class TestIFramePlaylists:
    @pytest.mark.parametrize("init", [None, "init.mp4"], ids=["ts", "fmp4"])
    def test_master_names_the_iframe_stream_with_measured_attributes(
        self, init: str | None
    ) -> None:
        """EXT-X-I-FRAME-STREAM-INF carries BANDWIDTH (the peak I-frame bit rate over its
        EXTINF), RESOLUTION, the video CODECS only, and its URI as an attribute."""
        described = version_with_iframes(init)
        text = render_master(described, variant_uri=lambda r: f"{r.name}.m3u8")
        assert check_playlist(text) == []
        parsed = m3u8.loads(text)
        assert len(parsed.playlists) == 1  # the I-frame rendition is no variant
        (iframe,) = parsed.iframe_playlists
        assert iframe.uri == "iframes.m3u8"
        info = iframe.iframe_stream_info
        assert info.bandwidth == math.ceil(12_016 * 8 / 6.0)
        assert info.resolution == (640, 360)
        assert info.codecs == "avc1.4d401e"

    @pytest.mark.parametrize(("init", "version"), [(None, 4), ("init.mp4", 7)],
                             ids=["ts", "fmp4"])
    def test_iframe_media_playlist_is_marked_iframes_only(
        self, init: str | None, version: int
    ) -> None:
        """EXT-X-I-FRAMES-ONLY, at least version 4, one EXTINF per I-frame with its media
        segment's duration, the same key tags as the media playlists."""
        described = version_with_iframes(init)
        iframes = described.rendition(layout.IFRAME_RENDITION)
        assert iframes is not None
        text = render_variant(described, iframes, segment_uri=lambda s: s.name,
                              key_uri=lambda i: f"https://k/{i}", init_uri=lambda n: n)
        assert check_playlist(text) == []
        assert f"#EXT-X-VERSION:{version}" in text.splitlines()
        parsed = m3u8.loads(text)
        assert parsed.is_i_frames_only
        assert [s.duration for s in parsed.segments] == [6.0, 6.0, 6.0]

    def test_cookie_modes_static_playlists_name_the_iframe_stream_too(self) -> None:
        """The CDN's static master names the static I-frame playlist beside the variants; every
        static playlist keeps the rules."""
        described = replace(version_with_iframes(None), key_server="https://keys.test")
        files = static_playlists(described)
        for text in files.values():
            assert check_playlist(text) == [], text
        master = m3u8.loads(files[layout.static_master_key("a")])
        assert [p.uri for p in master.iframe_playlists] == ["v1/iframes.m3u8"]
        assert "#EXT-X-I-FRAMES-ONLY" in files[layout.static_variant_key("a", "v1", "iframes")]

    def test_description_round_trips_with_its_thumbnails(self) -> None:
        described = version_with_iframes("init.mp4")
        again = AssetVersion.from_dict(json.loads(json.dumps(described.to_dict())))
        assert again == described
        assert again.iframes == (described.renditions[1],)


BROKEN = {
    "an I-frame stream without URI": """#EXTM3U
#EXT-X-VERSION:4
#EXT-X-STREAM-INF:BANDWIDTH=1,CODECS="avc1.64001f"
v.m3u8
#EXT-X-I-FRAME-STREAM-INF:BANDWIDTH=1,RESOLUTION=640x360,CODECS="avc1.64001f"
""",
    "an I-frame stream followed by a URI line": """#EXTM3U
#EXT-X-VERSION:4
#EXT-X-STREAM-INF:BANDWIDTH=1,CODECS="avc1.64001f"
v.m3u8
#EXT-X-I-FRAME-STREAM-INF:BANDWIDTH=1,RESOLUTION=640x360,CODECS="avc1.64001f",URI="i.m3u8"
i.m3u8
""",
    "an I-frame stream without BANDWIDTH": """#EXTM3U
#EXT-X-VERSION:4
#EXT-X-STREAM-INF:BANDWIDTH=1,CODECS="avc1.64001f"
v.m3u8
#EXT-X-I-FRAME-STREAM-INF:RESOLUTION=640x360,CODECS="avc1.64001f",URI="i.m3u8"
""",
    "EXT-X-I-FRAMES-ONLY below version 4": """#EXTM3U
#EXT-X-VERSION:3
#EXT-X-TARGETDURATION:6
#EXT-X-I-FRAMES-ONLY
#EXTINF:6.0,
i0.ts
""",
}
MENDED = {
    "an I-frame stream without URI": BROKEN["an I-frame stream without URI"].replace(
        'CODECS="avc1.64001f"\n', 'CODECS="avc1.64001f",URI="i.m3u8"\n'),
    "EXT-X-I-FRAMES-ONLY below version 4": BROKEN["EXT-X-I-FRAMES-ONLY below version 4"]
    .replace("VERSION:3", "VERSION:4"),
}


class TestCheckerRules:
    @pytest.mark.parametrize("rule", sorted(BROKEN))
    def test_a_playlist_breaking_the_rule_is_refused(self, rule: str) -> None:
        assert check_playlist(BROKEN[rule]) != [], rule

    @pytest.mark.parametrize("rule", sorted(MENDED))
    def test_the_playlist_mended_passes(self, rule: str) -> None:
        """Positive control: the rule's playlist with that one fault mended keeps every rule."""
        assert check_playlist(MENDED[rule]) == [], rule


class TestThumbnailTrack:
    def test_tiles_fill_sheets_left_to_right_top_to_bottom(self) -> None:
        """250 segments of a 16:9 picture: 160x90 tiles, 10x10 per sheet, three sheets."""
        plan = plan_thumbnails(1920, 1080, [6.0] * 250)
        assert (plan.tile_width, plan.tile_height, plan.columns, plan.rows) == (160, 90, 10, 10)
        assert plan.sheets == ("sheet_000.jpg", "sheet_001.jpg", "sheet_002.jpg")
        assert plan.tile(0) == ("sheet_000.jpg", 0, 0)
        assert plan.tile(123) == ("sheet_001.jpg", 3 * 160, 2 * 90)
        assert plan.sheet_size == (1600, 900)

    def test_a_short_video_gets_a_sheet_no_larger_than_its_tiles(self) -> None:
        plan = plan_thumbnails(640, 360, [2.0, 2.0, 1.5])
        assert (plan.columns, plan.rows, plan.sheet_size) == (3, 1, (480, 90))
        assert plan.cues == ((0.0, 2.0), (2.0, 4.0), (4.0, 5.5))

    def test_vtt_cues_name_each_tile_of_its_sheet(self) -> None:
        plan = Thumbnails(160, 90, 2, 1, ("sheet_000.jpg", "sheet_001.jpg"),
                          ((0.0, 6.0), (6.0, 12.0), (3600.0, 3606.5)))
        text = render_vtt(plan, sheet_uri=lambda name: f"https://cdn/{name}?Signature=s")
        assert text.splitlines() == [
            "WEBVTT", "",
            "00:00:00.000 --> 00:00:06.000", "https://cdn/sheet_000.jpg?Signature=s#xywh=0,0,160,90",
            "",
            "00:00:06.000 --> 00:00:12.000",
            "https://cdn/sheet_000.jpg?Signature=s#xywh=160,0,160,90", "",
            "01:00:00.000 --> 01:00:06.500", "https://cdn/sheet_001.jpg?Signature=s#xywh=0,0,160,90",
        ]


class TestJobRequests:
    def test_trick_play_is_a_boolean_field_off_by_default(self) -> None:
        source = {"source": "s3://uploads/talk.mp4"}
        assert parse_job_request(source).trick_play is False
        assert parse_job_request({**source, "trick_play": True}).trick_play is True
        with pytest.raises(BadSpec, match="trick_play"):
            parse_job_request({**source, "trick_play": "yes"})


# -- end to end -------------------------------------------------------------------------------


def package(hv: Hlsvault, source: Path, asset: str, *options: str) -> dict[str, object]:
    done = hv.package(str(source), "--asset", asset, "--segment-seconds",
                      str(SEGMENT_SECONDS), *options, "--json")
    assert done.returncode == 0, done.stderr
    summary: dict[str, object] = json.loads(done.stdout)
    assert summary["status"] == "succeeded", summary
    return summary


def get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=10) as response:
        body: bytes = response.read()
        return body


def without_query(url: str) -> str:
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, parts.path, "", ""))


@dataclass
class IFrame:
    sequence: int
    start: float
    duration: float
    encrypted: bytes
    key: bytes
    init: bytes | None

    def plain(self, key: bytes | None = None) -> bytes:
        body = decrypt_bytes(self.encrypted, key or self.key, self.sequence.to_bytes(16, "big"))
        return (self.init or b"") + body


def iframes_of(master_url: str) -> tuple[m3u8.M3U8, m3u8.M3U8, list[IFrame]]:
    """The master, the I-frame playlist it names, and every I-frame segment as a player
    fetches it (the key from the key URI, IV = media sequence number: no IV attribute)."""
    master = m3u8.loads(fetch(master_url), uri=master_url)
    (stream,) = master.iframe_playlists
    url = stream.absolute_uri
    playlist = m3u8.loads(fetch(url), uri=url)
    assert playlist.is_i_frames_only
    init = None
    if playlist.segment_map:
        init = get(urljoin(url, playlist.segment_map[0].uri))
    frames, start, keys = [], 0.0, {}
    for position, segment in enumerate(playlist.segments):
        assert segment.key.method == "AES-128" and segment.key.iv is None
        key_url = segment.key.absolute_uri
        keys.setdefault(key_url, get(key_url))
        frames.append(IFrame(playlist.media_sequence + position, start, segment.duration,
                             get(segment.absolute_uri), keys[key_url], init))
        start += segment.duration
    return master, playlist, frames


def pictures(data: bytes, tmp: Path, fmp4: bool, *, check: bool = True
             ) -> list[dict[str, object]]:
    """Every picture ffprobe decodes from ``data``, with its type (none, unchecked, when
    ffprobe cannot read it at all)."""
    path = tmp / ("iframe.mp4" if fmp4 else "iframe.ts")
    path.write_bytes(data)
    done = subprocess.run(
        ["ffprobe", "-v", "error", "-select_streams", "v:0", "-show_frames", "-show_entries",
         "frame=pict_type,key_frame,width,height", "-of", "json", str(path)],
        capture_output=True, timeout=60, check=False,
    )
    if not check and done.returncode != 0:
        return []
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    found: list[dict[str, object]] = json.loads(done.stdout).get("frames", [])
    return found


def first_pts(data: bytes, tmp: Path, fmp4: bool) -> float:
    """The presentation time, in seconds, of the first video packet ffprobe reads from
    ``data`` (a segment's keyframe)."""
    path = tmp / ("pts.mp4" if fmp4 else "pts.ts")
    path.write_bytes(data)
    done = subprocess.run(
        ["ffprobe", "-v", "error", "-select_streams", "v:0", "-show_entries", "packet=pts_time",
         "-read_intervals", "%+#1", "-of", "json", str(path)],
        capture_output=True, text=True, timeout=60, check=True,
    )
    return float(json.loads(done.stdout)["packets"][0]["pts_time"])


def grey(args: list[str]) -> bytes:
    """A picture as 8-bit grey pixels, from an ffmpeg command's input arguments and filter."""
    done = subprocess.run(
        ["ffmpeg", "-nostdin", "-v", "error", *args, "-frames:v", "1", "-f", "rawvideo",
         "-pix_fmt", "gray", "-"],
        capture_output=True, timeout=60, check=False,
    )
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    return done.stdout


def mean_difference(a: bytes, b: bytes) -> float:
    assert len(a) == len(b) > 0
    return sum(abs(x - y) for x, y in zip(a, b, strict=True)) / len(a)


def vtt_cues(text: str) -> list[tuple[float, float, str]]:
    assert text.startswith("WEBVTT\n")

    def seconds(stamp: str) -> float:
        hours, minutes, rest = stamp.split(":")
        return int(hours) * 3600 + int(minutes) * 60 + float(rest)

    cues = []
    for block in text.split("\n\n")[1:]:
        lines = block.strip().splitlines()
        if not lines:
            continue
        start, end = lines[0].split(" --> ")
        cues.append((seconds(start), seconds(end), lines[1]))
    return cues


class TestIFramesEndToEnd:
    @pytest.mark.parametrize("container", ["ts", "fmp4"])
    def test_every_iframe_decrypts_and_decodes_to_the_frame_its_segment_starts_with(
        self, keyserver: Hlsvault, copy_clip: Path, container: str, tmp_path: Path
    ) -> None:
        """Through the key server: the I-frame playlist keeps RFC 8216 and parses; it has one
        I-frame per media segment; each decrypts with its key and IV = media sequence number
        and decodes to exactly one picture, an I-frame, bit for bit the source's frame at the
        start of its segment; the master's BANDWIDTH, RESOLUTION and CODECS are what was
        served."""
        # Given the copy clip packaged with trick play
        summary = package(keyserver, copy_clip, "trick", "--ladder", "copy",
                          "--container", container, "--trick-play")
        names = [r["name"] for r in summary["renditions"]]  # type: ignore[index]
        assert layout.IFRAME_RENDITION in names

        # When a player fetches the master, the I-frame playlist and every I-frame
        url = keyserver.url("trick")
        playlists = assert_valid_hls(url)
        assert any("#EXT-X-I-FRAMES-ONLY" in text for text in playlists.values())
        master, _, frames = iframes_of(url)

        # Then there is one per media segment, each one picture of the source
        video_url = master.playlists[0].absolute_uri
        video = m3u8.loads(fetch(video_url), uri=video_url)
        assert len(frames) == len(video.segments) == SEGMENTS
        # ...shown at its media segment's first presentation time (each read with its
        # rendition's init segment, fMP4)
        video_init = None
        if video.segment_map:
            video_init = get(urljoin(video_url, video.segment_map[0].uri))
        for frame, segment in zip(frames, video.segments, strict=True):
            media = decrypt_bytes(get(segment.absolute_uri), get(segment.key.absolute_uri),
                                  frame.sequence.to_bytes(16, "big"))
            shown = first_pts(frame.plain(), tmp_path, container == "fmp4")
            expected = first_pts((video_init or b"") + media, tmp_path, container == "fmp4")
            # fMP4: each file's edit list applied, as ffprobe reads it; the variant's init
            # segment shifts by 10 ticks of 1/15360 s more than the I-frames' (measured:
            # 0.066016 against 0.066667), well under a frame.
            assert shown == pytest.approx(expected, abs=0.001 if container == "fmp4" else 0), \
                frame
        source = frame_hashes(framemd5(str(copy_clip)))
        for frame in frames:
            plain = frame.plain()
            decoded = pictures(plain, tmp_path, container == "fmp4")
            assert [(p["pict_type"], p["key_frame"]) for p in decoded] == [("I", 1)], frame
            (tmp_path / "one").write_bytes(plain)
            assert frame_hashes(framemd5(str(tmp_path / "one"))) == \
                [source[round(frame.start * FPS)]]
        info = master.iframe_playlists[0].iframe_stream_info
        peak = max(len(f.encrypted) * 8 / f.duration for f in frames)
        assert info.bandwidth == math.ceil(peak)
        assert info.resolution == (640, 360)
        assert info.codecs == master.playlists[0].stream_info.codecs.split(",")[0]

    def test_with_subtitles_the_master_names_both_and_keeps_the_rules(
        self, keyserver: Hlsvault, copy_clip: Path, tmp_path: Path
    ) -> None:
        """Trick play beside a subtitle track: the master has the SUBTITLES group and the
        I-frame stream, every playlist keeps the rules, and there is still one I-frame per
        video segment."""
        sidecar = tmp_path / "talk.en.vtt"
        sidecar.write_text("WEBVTT\n\n00:00:01.000 --> 00:00:02.500\nHello\n")
        package(keyserver, copy_clip, "both", "--ladder", "copy", "--trick-play",
                "--subtitles", f"en={sidecar}")
        url = keyserver.url("both")
        assert_valid_hls(url)
        master, _, frames = iframes_of(url)
        assert [m.type for m in master.media] == ["SUBTITLES"]
        assert len(frames) == SEGMENTS
        assert all(f.plain() for f in frames)

    def test_default_ladder_iframes_come_from_its_smallest_rendition(
        self, keyserver: Hlsvault, hd_clip: Path, tmp_path: Path
    ) -> None:
        """A transcoded ladder cut in two chunks: the I-frame stream is the 360p rendition's,
        one per segment, each one I-frame picture of 640x360."""
        keyserver.env["HLSVAULT_CHUNK_SECONDS"] = str(SEGMENT_SECONDS)
        summary = package(keyserver, hd_clip, "ladder", "--trick-play")
        record = json.loads(keyserver.run("status", str(summary["job_id"]), "--json").stdout)
        assert {s["name"] for s in record["stages"]} >= {"segment:c000", "segment:c001",
                                                           "trickplay"}
        url = keyserver.url("ladder")
        assert_valid_hls(url)
        master, _, frames = iframes_of(url)
        assert master.iframe_playlists[0].iframe_stream_info.resolution == (640, 360)
        smallest = m3u8.loads(fetch(master.playlists[-1].absolute_uri))
        assert len(frames) == len(smallest.segments) == 2
        for frame in frames:
            decoded = pictures(frame.plain(), tmp_path, False)
            assert [(p["pict_type"], p["width"], p["height"]) for p in decoded] == \
                [("I", 640, 360)]


class TestThumbnailsEndToEnd:
    def test_cues_cover_the_video_and_each_tile_shows_the_frame_at_its_time(
        self, keyserver: Hlsvault, copy_clip: Path
    ) -> None:
        """The key server's thumbnail track: cues from 0 to the end without a gap, every
        #xywh inside its sheet's decoded size, and each tile the source's frame at the cue's
        start (a tile against another time's frame is told apart: the control)."""
        package(keyserver, copy_clip, "thumbs", "--ladder", "copy", "--trick-play")
        track_url = keyserver.url("thumbs", "--thumbnails")
        cues = vtt_cues(fetch(track_url))

        assert len(cues) == SEGMENTS
        assert cues[0][0] == 0.0
        assert all(a[1] == b[0] for a, b in itertools.pairwise(cues))
        assert cues[-1][1] == pytest.approx(6.0, abs=0.05)
        tiles = []
        for start, _, text in cues:
            uri, fragment = text.split("#xywh=")
            x, y, w, h = (int(v) for v in fragment.split(","))
            sheet = get(uri)
            assert sheet[:3] == b"\xff\xd8\xff"  # a JPEG, not encrypted
            path = Path(keyserver.data_dir.parent / "sheet.jpg")
            path.write_bytes(sheet)
            probed = json.loads(subprocess.run(
                ["ffprobe", "-v", "error", "-show_streams", "-of", "json", str(path)],
                capture_output=True, timeout=30, check=True).stdout)["streams"][0]
            assert x >= 0 and y >= 0
            assert x + w <= probed["width"] and y + h <= probed["height"]
            tile = grey(["-i", str(path), "-vf", f"crop={w}:{h}:{x}:{y}"])
            at = grey(["-ss", f"{start:.3f}", "-i", str(copy_clip), "-vf", f"scale={w}:{h}"])
            tiles.append((tile, at))
        for index, (tile, at) in enumerate(tiles):
            own = mean_difference(tile, at)
            assert own < SAME_PICTURE, index
            # The control: against the frame of any other cue's time, the tile is told apart.
            others = [frame for other, (_, frame) in enumerate(tiles) if other != index]
            assert min(mean_difference(tile, frame) for frame in others) > NEARER * own, index

    def test_track_and_iframe_playlist_need_a_token(
        self, keyserver: Hlsvault, copy_clip: Path
    ) -> None:
        """401 without a token, 403 with another asset's, 200 with its own; an asset packaged
        without trick play has no track (404)."""
        package(keyserver, copy_clip, "private", "--ladder", "copy", "--trick-play")
        package(keyserver, copy_clip, "plain", "--ladder", "copy")
        track = keyserver.url("private", "--thumbnails")
        iframes = keyserver.url("private").replace("master.m3u8", "iframes.m3u8")
        for url in (track, iframes):
            assert status_of(url) == 200, url
            assert status_of(without_query(url)) == 401, url
            other = keyserver.url("plain").split("?", 1)[1]
            assert status_of(f"{without_query(url)}?{other}") == 403, url
        assert status_of(keyserver.url("plain", "--thumbnails")) == 404
        assert "I-FRAME" not in fetch(keyserver.url("plain"))


class TestLifecycle:
    def test_rekey_re_encrypts_the_iframes_and_revoke_withdraws_them(
        self, keyserver: Hlsvault, copy_clip: Path, tmp_path: Path
    ) -> None:
        """After a re-key every I-frame decodes under the new key and is no picture under the
        old one, and the thumbnail track names the new version's sheets; the old version's
        sheets go when its keys are shredded; after a revocation the I-frame playlist, the
        track and the keys are gone (410), and the sheets deleted."""
        old_version = package(keyserver, copy_clip, "keyed", "--ladder", "copy",
                              "--trick-play")["version"]
        _, _, before = iframes_of(keyserver.url("keyed"))
        old_key = before[0].key
        old_sheets = keyserver.origin / layout.thumbnails_prefix("keyed", str(old_version))
        assert [p.name for p in old_sheets.glob("*.jpg")] == ["sheet_000.jpg"]
        done = keyserver.run("rekey", "keyed", "--grace", "0", "--json")
        assert done.returncode == 0, done.stderr
        version = json.loads(done.stdout)["version"]
        deadline = time.monotonic() + 10
        while version not in fetch(keyserver.url("keyed").replace("master", "iframes")):
            assert time.monotonic() < deadline, "the key server never served the new version"
            time.sleep(0.2)

        _, playlist, after = iframes_of(keyserver.url("keyed"))
        assert all(f"/v1/keys/keyed/{version}/" in key.absolute_uri
                   for key in playlist.keys if key)
        assert after[0].key != old_key
        for frame in after:
            assert [p["pict_type"] for p in pictures(frame.plain(), tmp_path, False)] == ["I"]
            try:
                stale = frame.plain(old_key)
            except ValueError:
                continue  # the old key does not even unpad it
            assert pictures(stale, tmp_path, False, check=False) == []
        cues = vtt_cues(fetch(keyserver.url("keyed", "--thumbnails")))
        assert all(f"/{layout.thumbnails_prefix('keyed', version)}/" in text
                   for _, _, text in cues)
        assert all(status_of(text.split("#")[0]) == 200 for _, _, text in cues)
        # The retired version's sheets went with its keys: its grace (0) was over, and an
        # embedded re-key shreds what is due before it returns.
        new_sheets = keyserver.origin / layout.thumbnails_prefix("keyed", version)
        assert not list(old_sheets.glob("*.jpg"))
        assert [p.name for p in new_sheets.glob("*.jpg")] == ["sheet_000.jpg"]

        iframes_url = keyserver.url("keyed").replace("master.m3u8", "iframes.m3u8")
        track_url = keyserver.url("keyed", "--thumbnails")
        key_url = playlist.keys[-1].absolute_uri
        sheet_url = cues[0][2].split("#")[0]
        done = keyserver.run("revoke", "keyed", "--json")
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["thumbnails_deleted"] >= 1
        assert status_of(iframes_url) == 410
        assert status_of(track_url) == 410
        assert status_of(key_url) == 410
        # The sheets are clear pictures: a revocation deletes them, as it deletes downloads.
        assert status_of(sheet_url) == 404


class TestFleet:
    def test_trick_play_on_the_fleet_reaches_s3_and_plays(
        self, fleet: Fleet, moto_server: MotoServer, copy_clip: Path, tmp_path: Path
    ) -> None:
        """On Redis and S3 stores, a transcoded fMP4 asset: the I-frame segments, their init
        segment and the sheets reach the origin with their content types; every I-frame
        fetched through the key server decodes to one picture."""
        from test_fleet import bucket_objects, submit, wait_for_job

        fleet.start_all()
        job_id = submit(fleet, copy_clip, "fleettrick", "--container", "fmp4",
                        "--segment-seconds", str(SEGMENT_SECONDS), "--trick-play")
        record = wait_for_job(fleet, job_id)
        assert record["status"] == "succeeded", record
        origin = fleet.env["TEST_BUCKET_ORIGIN"]
        objects = bucket_objects(moto_server, origin, "assets/fleettrick/")
        names = {key.split("/", 3)[3] for key in objects if key.count("/") == 4}
        assert {"iframes/init.mp4", "iframes/seg_00000.m4s", "iframes/seg_00002.m4s"} <= names
        assert not any(key.endswith(".jpg") for key in objects)
        # The sheets are private, like downloads: beside them, never under assets/.
        (sheet,) = bucket_objects(moto_server, origin, "thumbnails/fleettrick/")
        assert sheet.endswith("/sheet_000.jpg")
        s3 = moto_server.client("s3")
        assert s3.head_object(Bucket=origin, Key=sheet)["ContentType"] == "image/jpeg"

        url = fleet.cli("url", "fleettrick").stdout.strip()
        assert_valid_hls(url)
        _, _, frames = iframes_of(url)
        assert len(frames) == SEGMENTS
        for frame in frames:
            assert [p["pict_type"] for p in pictures(frame.plain(), tmp_path, True)] == ["I"]
        track = fleet.cli("url", "fleettrick", "--thumbnails").stdout.strip()
        first = vtt_cues(fetch(track))[0][2]
        assert re.search(r"#xywh=0,0,160,90$", first)
        # No CloudFront key: an S3 presigned GET of the private key, good for an hour at most
        # (moto serves anonymous reads, so the refusal itself is S3's to show, not moto's).
        uri = first.split("#", 1)[0]
        assert urlsplit(uri).path.endswith(f"/{sheet}")
        assert int(parse_qs(urlsplit(uri).query)["X-Amz-Expires"][0]) <= 3600
        assert get(uri)[:3] == b"\xff\xd8\xff"


class TestSigning:
    def test_iframe_segments_and_sheets_are_signed_for_their_own_directories(
        self, hlsvault: Hlsvault, copy_clip: Path, request: pytest.FixtureRequest
    ) -> None:
        """With CloudFront signing on, each I-frame segment URI carries a policy for the
        I-frame rendition's directory, and each sheet URI is a canned-policy URL of that one
        sheet in the private thumbnails/ prefix, as a download's is."""
        keys = rsa_key_pair()
        hlsvault.env["HLSVAULT_CLOUDFRONT_KEY_PAIR_ID"] = "K2TRICKPLAY"
        hlsvault.env["HLSVAULT_CLOUDFRONT_PRIVATE_KEY"] = keys.private_pem
        summary = package(hlsvault, copy_clip, "signed", "--ladder", "copy", "--trick-play")
        served: Hlsvault = request.getfixturevalue("keyserver")
        cdn = f"{served.public_url}/cdn/assets/signed/{summary['version']}"

        _, playlist, _ = iframes_of(served.url("signed"))
        for segment in playlist.segments:
            (statement,) = policy_of(segment.absolute_uri)["Statement"]
            assert statement["Resource"] == f"{cdn}/{layout.IFRAME_RENDITION}/*"
        sheets = f"{served.public_url}/cdn/" + layout.thumbnails_prefix(
            "signed", str(summary["version"]))
        for _, _, text in vtt_cues(fetch(served.url("signed", "--thumbnails"))):
            uri = text.split("#", 1)[0]
            assert without_query(uri) == f"{sheets}/sheet_000.jpg"
            query = parse_qs(urlsplit(uri).query)
            assert set(query) == {"Expires", "Signature", "Key-Pair-Id"}
            assert int(query["Expires"][0]) <= time.time() + 3600


class TestHlsJs:
    def test_hls_js_plays_past_the_iframe_stream_and_a_page_loads_a_thumbnail(
        self, hlsvault: Hlsvault, page_server: PlayerPageServer, player: Player,
        copy_clip: Path, request: pytest.FixtureRequest,
    ) -> None:
        """hls.js plays a trick-play asset past 5 s (it has no use for the I-frame stream and
        fetches none of it); the page, from another origin, reads the thumbnail track (CORS)
        and loads a sheet as an image, of the size the track's tiles need."""
        hlsvault.env["HLSVAULT_CORS_ORIGINS"] = page_server.origin
        package(hlsvault, copy_clip, "scrub", "--ladder", "copy", "--trick-play")
        served: Hlsvault = request.getfixturevalue("keyserver")
        player.open(page_server.player_url(served.url("scrub"), rate=2.0))
        state = player.wait_until_played(5.0, timeout_s=30.0)
        assert state.fatal is None and state.current_time > 5.0, player.describe()
        assert player.fetched(f"/{layout.IFRAME_RENDITION}/") == [], player.describe()

        loaded = player.page.evaluate("""async (track) => {
            const text = await (await fetch(track)).text();
            const cue = text.split("\\n").find(line => line.includes("#xywh="));
            const [uri, xywh] = cue.split("#xywh=");
            const sheet = new Image();
            sheet.src = uri;
            await sheet.decode();
            return [text.slice(0, 6), sheet.naturalWidth, sheet.naturalHeight, xywh];
        }""", served.url("scrub", "--thumbnails"))
        assert loaded == ["WEBVTT", 3 * 160, 90, "0,0,160,90"], player.describe()


def sheet_urls(track_url: str) -> list[str]:
    return [text.split("#", 1)[0] for _, _, text in vtt_cues(fetch(track_url))]


class TestPrivateSheets:
    def test_sheets_are_served_only_through_short_lived_signed_urls(
        self, keyserver: Hlsvault, copy_clip: Path
    ) -> None:
        """Embedded mode, no CloudFront: the track names signed /cdn/thumbnails/ URLs that
        fetch the JPEG; the same path unsigned, tampered, past its expiry (a genuine
        signature), or spelled through the static /cdn/ mount is refused; the sheet is
        nowhere under the public assets/ prefix."""
        from keyserver.downloads import EmbeddedSignatures
        from pipeline.settings import load_settings

        version = str(package(keyserver, copy_clip, "hidden", "--ladder", "copy",
                              "--trick-play")["version"])
        (url,) = set(sheet_urls(keyserver.url("hidden", "--thumbnails")))
        key = layout.thumbnail_sheet_key("hidden", version, "sheet_000.jpg")
        assert urlsplit(url).path == f"/cdn/{key}"
        assert get(url)[:3] == b"\xff\xd8\xff"  # the control: signed, it is served
        assert (keyserver.origin / key).is_file()
        assert not list((keyserver.origin / "assets" / "hidden").rglob("*.jpg"))

        assert status_of(without_query(url)) == 403
        assert status_of(url.replace("signature=", "signature=0")) == 403
        expires = int(re.search(r"expires=(\d+)", url).group(1))  # type: ignore[union-attr]
        assert time.time() < expires <= time.time() + 3600
        signatures = EmbeddedSignatures(load_settings(keyserver.env).master_key)
        past = int(time.time()) - 1
        expired = f"{without_query(url)}?expires={past}&signature={signatures.sign(key, past)}"
        assert status_of(expired) == 403
        for spelled in (url.replace("/cdn/", "/cdn//"), url.replace("/cdn/", "/cdn/./")):
            assert status_of(without_query(spelled)) in (403, 404), spelled

    def test_without_a_way_to_sign_the_track_is_503(
        self, hlsvault: Hlsvault, copy_clip: Path
    ) -> None:
        """A fleet key server (not embedded) with a file origin and no CloudFront key cannot
        sign a sheet URL: the track is refused with 503 and says what to configure, rather
        than naming bare URLs."""
        from dataclasses import replace as replaced

        from keyserver import create_app
        from keyserver.ratelimit import MemoryRateLimiter
        from pipeline.settings import load_settings

        from keyserver_support import AppClient

        package(hlsvault, copy_clip, "nosign", "--ladder", "copy", "--trick-play")
        settings = load_settings(hlsvault.env)
        query = urlsplit(hlsvault.url("nosign", "--thumbnails")).query
        fleet = replaced(settings, redis_url="redis://127.0.0.1:9")
        with AppClient(create_app(fleet, limiter=MemoryRateLimiter()),
                       client_ip="127.0.0.1") as client:
            answer = client.get(f"{layout.thumbnails_url('', 'nosign')}?{query}")
        assert answer.status_code == 503, answer.text
        assert "HLSVAULT_CLOUDFRONT_KEY_PAIR_ID" in answer.text


class TestRevokeInFlight:
    def test_revoke_while_a_trick_play_job_is_in_flight_leaves_no_sheet(
        self, keyserver: Hlsvault, copy_clip: Path
    ) -> None:
        """A job in flight when the asset is revoked (here a re-key, which carries the sheets):
        its upload after the revocation puts its sheets in the origin, the publish refuses,
        the job fails the one way jobs fail, and no sheet of any version is left."""
        from types import SimpleNamespace

        from pipeline.errors import HlsvaultError
        from pipeline.lifecycle import new_rekey_spec, rekey, revoke
        from pipeline.publish import upload
        from pipeline.services import build_services
        from pipeline.settings import load_settings
        from workers.flow import fail

        package(keyserver, copy_clip, "inflight", "--ladder", "copy", "--trick-play")
        # Wherever a layout puts them: every JPEG in the origin is a sheet of this asset.
        assert list(keyserver.origin.rglob("*.jpg"))
        svc = build_services(load_settings(keyserver.env))
        spec = new_rekey_spec(svc, "inflight", grace_s=0)
        svc.jobs.create(spec)
        rekey(svc, spec)

        assert revoke(svc, "inflight")["status"] == "revoked"
        with pytest.raises(HlsvaultError, match="revoked after this job started"):
            upload(svc, spec)
        assert list(keyserver.origin.rglob("*.jpg"))  # the upload did put them there
        fail(SimpleNamespace(services=svc), spec.job_id, "upload", "refused")  # type: ignore[arg-type]
        assert not list(keyserver.origin.rglob("*.jpg"))
        assert svc.jobs.get(spec.job_id).status == "failed"


class TestSpriteCheck:
    def test_a_picture_that_does_not_decode_fails_the_stage_though_the_sheets_match(
        self, tmp_path: Path
    ) -> None:
        """Three I-frames of which one is garbage: ffmpeg still fills the one planned sheet
        (with two tiles), so counting sheets passes; counting decoded pictures refuses, and
        says trick play's tile count was wrong. The control: three good I-frames pass."""
        from types import SimpleNamespace

        from pipeline.errors import PermanentError
        from pipeline.storage import LocalStore
        from pipeline.trickplay import _make_sprites

        def iframes(broken: bool) -> tuple[SegmentedRendition, Path]:
            folder = tmp_path / f"iframes-{broken}"
            folder.mkdir()
            for index in range(3):
                name = f"seg_{index:05d}.ts"
                subprocess.run(
                    ["ffmpeg", "-nostdin", "-v", "error", "-f", "lavfi", "-i",
                     f"testsrc2=size=320x180:rate=1,trim=start={index}", "-frames:v", "1",
                     "-c:v", "libx264", "-f", "mpegts", str(folder / name)],
                    check=True, timeout=60,
                )
                if broken and index == 1:
                    size = (folder / name).stat().st_size
                    (folder / name).write_bytes(b"\0" * size)
            produced = rendition("iframes", "iframes", None, [1, 1, 1])
            return replace(produced, width=320, height=180), folder

        svc = SimpleNamespace(work=LocalStore(tmp_path / "work"))
        spec = SimpleNamespace(job_id="job")
        good, folder = iframes(False)
        (tmp_path / "w1").mkdir()
        plan = _make_sprites(svc, spec, "ts", good, folder, tmp_path / "w1")  # type: ignore[arg-type]
        assert plan.sheets == ("sheet_000.jpg",)

        bad, folder = iframes(True)
        (tmp_path / "w2").mkdir()
        with pytest.raises(PermanentError, match="decoded 2 pictures of 3 I-frames"):
            _make_sprites(svc, spec, "ts", bad, folder, tmp_path / "w2")  # type: ignore[arg-type]


class TestCookieMode:
    def test_a_cookie_only_client_gets_the_thumbnail_track(
        self, hlsvault: Hlsvault, copy_clip: Path
    ) -> None:
        """Cookie mode: the master of an asset with thumbnails sets the token cookie on the
        track's path as well as the keys'; a client sending nothing but that cookie gets the
        track (200), and none at all gets 401. `hlsvault url --thumbnails --auth cookie` names
        that track in cookie mode instead of dropping --auth."""
        from keyserver import create_app
        from keyserver.server import playlist_cookie_path
        from pipeline.settings import load_settings

        from keyserver_support import AppClient, set_cookies

        package(hlsvault, copy_clip, "crumbs", "--ladder", "copy", "--trick-play")
        printed = hlsvault.run("url", "crumbs", "--thumbnails", "--auth", "cookie").stdout
        assert "auth=cookie" in printed
        settings = load_settings(hlsvault.env)
        token = parse_qs(urlsplit(hlsvault.url("crumbs")).query)["token"][0]
        track = layout.thumbnails_url("", "crumbs", "?auth=cookie")
        with AppClient(create_app(settings), client_ip="127.0.0.1",
                       base_url=settings.public_url) as client:
            master = client.get(layout.master_url("", "crumbs", f"?token={token}&auth=cookie"))
            assert master.status_code == 200, master.text
            cookies = set_cookies(master)
            path = playlist_cookie_path(settings.public_url, "crumbs")
            assert urlsplit(settings.public_url + track).path.startswith(path)
            assert path in cookies, sorted(cookies)
            cookie = cookies[path]
            assert client.get(track).status_code == 401  # the control: no cookie, no track
            answer = client.get(track, headers={"Cookie": f"{cookie.key}={cookie.value}"})
            assert answer.status_code == 200, answer.text
            assert answer.text.startswith("WEBVTT")
