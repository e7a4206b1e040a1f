"""Subtitles end to end: a source with two audio languages and a mov_text English track, plus a
German sidecar, packaged by the real CLI and served by the key server. Checks what a viewer
gets: the master's groups, each audio language decoded by ffmpeg, WebVTT cue times fetched
through the key server and decrypted, hls.js listing and switching tracks in Chromium, the
token rules on subtitle playlists, re-keying and revocation, the fleet; and hostile sidecars
failing the job with their reason, nothing published."""

from __future__ import annotations

import itertools
import json
import re
import subprocess
import time
import urllib.request
from pathlib import Path

import m3u8
import pytest
from test_lifecycle import status_of
from test_media_shapes import (
    DURATION_TOLERANCE_S,
    TRACKS,
    decoded_audio,
    master_media,
    package,
    source_duration,
)

from pipeline import layout
from pipeline.errors import InvalidSource
from pipeline.subtitles import MAX_SUBTITLE_BYTES

from browser import Player, PlayerPageServer
from cdn_support import CdnLibrary
from fleet import Fleet, MotoServer, RedisServer
from hlscheck import assert_valid_hls, fetch
from support import MEDIA_CACHE, Hlsvault, decrypt_bytes, generate_media

#: The source's cues: (start, end, text). Segments are 2 s long, so one of each crosses a
#: segment boundary.
ENGLISH = [(0.5, 1.5, "Hello"), (2.2, 3.0, "Across the boundary"), (4.1, 5.6, "Last words")]
GERMAN = [(1.0, 2.6, "Über die Grenze"), (3.3, 4.0, "Mitte"), (5.2, 5.9, "Ende")]
#: What the brief allows between a cue as played and as authored.
CUE_TOLERANCE_S = 0.1
_MAP = re.compile(r"X-TIMESTAMP-MAP=MPEGTS:(\d+),LOCAL:00:00:00\.000")
_TIMING = re.compile(r"(\d+):(\d\d):(\d\d)\.(\d{3}) --> (\d+):(\d\d):(\d\d)\.(\d{3})")


def srt(cues: list[tuple[float, float, str]]) -> str:
    def at(seconds: float) -> str:
        millis = round(seconds * 1000)
        return f"00:00:{millis // 1000:02d},{millis % 1000:03d}"

    return "\n".join(f"{n}\n{at(a)} --> {at(b)}\n{text}\n"
                     for n, (a, b, text) in enumerate(cues, start=1))


def vtt(cues: list[tuple[float, float, str]]) -> str:
    def at(seconds: float) -> str:
        millis = round(seconds * 1000)
        return f"00:00:{millis // 1000:02d}.{millis % 1000:03d}"

    return "WEBVTT\n\n" + "\n".join(f"{at(a)} --> {at(b)}\n{text}\n" for a, b, text in cues)


@pytest.fixture(scope="session")
def talk_clip() -> Path:
    """6 s of 640x360 H.264, English (440 Hz, default) and German (660 Hz) AAC, and an English
    mov_text track (which an MP4 cannot mark default) made by ffmpeg from a SubRip file
    written here."""
    MEDIA_CACHE.mkdir(parents=True, exist_ok=True)
    english = MEDIA_CACHE / "talk.en.srt"
    english.write_text(srt(ENGLISH))
    return generate_media("talk.mp4", [
        "-f", "lavfi", "-i", "testsrc2=size=640x360:rate=30",
        "-f", "lavfi", "-i", "sine=frequency=440:sample_rate=48000",
        "-f", "lavfi", "-i", "sine=frequency=660:sample_rate=48000",
        "-i", str(english),
        "-t", "6", "-map", "0:v", "-map", "1:a", "-map", "2:a", "-map", "3:s",
        "-c:v", "libx264", "-preset", "veryfast", "-g", "30", "-pix_fmt", "yuv420p",
        "-c:a", "aac", "-b:a", "96k", "-c:s", "mov_text",
        "-metadata:s:a:0", "language=eng", "-metadata:s:a:1", "language=deu",
        "-metadata:s:a:1", "title=Deutsch", "-disposition:a:0", "default",
        "-disposition:a:1", "0", "-metadata:s:s:0", "language=eng",
        "-disposition:s:0", "default",
    ])


#: Cues of the late video: the second lies before the first segment's end only when segments
#: are counted from the video's first frame (0.8 s), not from the source's start.
LATE = [(1.0, 1.5, "First"), (2.2, 2.6, "Before the first boundary"), (4.9, 5.3, "Third")]


@pytest.fixture(scope="session")
def late_video_clip() -> Path:
    """5 s of H.264 starting 0.8 s into a Matroska file whose AAC starts at 0 (``-itsoffset``
    on the video input)."""
    return generate_media("late.mkv", [
        "-itsoffset", "0.8", "-t", "5", "-f", "lavfi", "-i", "testsrc2=size=320x180:rate=30",
        "-t", "6", "-f", "lavfi", "-i", "sine=frequency=440:sample_rate=48000",
        "-map", "0:v", "-map", "1:a", "-c:v", "libx264", "-preset", "veryfast", "-g", "30",
        "-bf", "0", "-pix_fmt", "yuv420p", "-c:a", "aac",
    ])


@pytest.fixture
def german(tmp_path: Path) -> Path:
    path = tmp_path / "talk.de.vtt"
    path.write_text(vtt(GERMAN))
    return path


def get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=10) as response:
        body: bytes = response.read()
        return body


def cues_by_segment(
    playlist_url: str,
) -> tuple[list[list[tuple[float, float, str]]], int, list[float]]:
    """Every segment's cues of a subtitle playlist as a player gets them: each segment fetched
    from the CDN, decrypted with the key the playlist names (IV = its media sequence number)
    and parsed; cue times in seconds of presentation time (X-TIMESTAMP-MAP applied, at 90 kHz
    as a player does). Also the map's MPEGTS and the segment durations."""
    playlist = m3u8.loads(fetch(playlist_url), uri=playlist_url)
    key = get(playlist.keys[-1].absolute_uri)
    segments = []
    maps = set()
    for sequence, segment in enumerate(playlist.segments):
        encrypted = get(segment.absolute_uri)
        assert not encrypted.startswith(b"WEBVTT"), "a subtitle segment left clear on the CDN"
        text = decrypt_bytes(encrypted, key, sequence.to_bytes(16, "big")).decode()
        assert text.startswith("WEBVTT\n"), text[:40]
        mapped = _MAP.search(text)
        assert mapped is not None, text[:120]
        mpegts = int(mapped.group(1))
        maps.add(mpegts)
        cues = []
        for block in text.split("\n\n")[1:]:
            lines = block.strip().splitlines()
            timing = _TIMING.match(lines[0]) if lines else None
            if timing is None:
                continue
            h1, m1, s1, f1, h2, m2, s2, f2 = (int(g) for g in timing.groups())
            start = mpegts + round(((h1 * 60 + m1) * 60 + s1 + f1 / 1000) * 90000)
            end = mpegts + round(((h2 * 60 + m2) * 60 + s2 + f2 / 1000) * 90000)
            cues.append((start / 90000, end / 90000, "\n".join(lines[1:])))
        segments.append(cues)
    (mpegts,) = maps  # one map for the whole rendition
    return segments, mpegts, [s.duration for s in playlist.segments]


def played_cues(playlist_url: str) -> tuple[list[tuple[float, float, str]], int, list[float]]:
    """Every cue of a subtitle playlist as :func:`cues_by_segment` reads them, the same cue in
    two segments once. Also the map's MPEGTS and the segment durations."""
    segments, mpegts, durations = cues_by_segment(playlist_url)
    found = dict.fromkeys(cue for cues in segments for cue in cues)
    return list(found), mpegts, durations


def source_video_start(source: Path) -> float:
    """Seconds: where the source's first video frame lies after its start, read by ffprobe
    from the source (the reference the map is checked against)."""
    done = subprocess.run(
        ["ffprobe", "-v", "error", "-select_streams", "v:0", "-show_entries",
         "stream=start_time:format=start_time", "-of", "json", str(source)],
        capture_output=True, timeout=60, check=True,
    )
    read = json.loads(done.stdout)
    return float(read["streams"][0]["start_time"]) - float(read["format"]["start_time"])


def first_video_pts(variant_url: str) -> float:
    """Seconds: where the first frame of the video variant's first segment is presented, as
    ffprobe reads it from the decrypted segment (with the init segment for fMP4)."""
    variant = m3u8.loads(fetch(variant_url), uri=variant_url)
    plain = decrypt_bytes(get(variant.segments[0].absolute_uri), get(variant.keys[-1].absolute_uri),
                          (0).to_bytes(16, "big"))
    if variant.segment_map:
        plain = get(variant.segment_map[0].absolute_uri) + plain
    done = subprocess.run(
        ["ffprobe", "-v", "error", "-select_streams", "v:0", "-show_entries",
         "stream=start_time", "-of", "json", "-"],
        input=plain, capture_output=True, timeout=60, check=True,
    )
    return float(json.loads(done.stdout)["streams"][0]["start_time"])


def assert_cues_match(played: list[tuple[float, float, str]], offset: float,
                      authored: list[tuple[float, float, str]]) -> None:
    shown = sorted((a - offset, b - offset, text) for a, b, text in played)
    assert [text for _, _, text in shown] == [text for _, _, text in authored], shown
    for (start, end, text), (want_start, want_end, _) in zip(shown, authored, strict=True):
        assert start == pytest.approx(want_start, abs=CUE_TOLERANCE_S), text
        assert end == pytest.approx(want_end, abs=CUE_TOLERANCE_S), text


class TestPackagedSubtitles:
    @pytest.mark.parametrize(("container", "ladder"),
                             [("ts", "copy"), ("fmp4", "copy"), ("ts", "default")])
    def test_master_groups_audio_languages_and_cue_times(
        self, keyserver: Hlsvault, talk_clip: Path, german: Path, container: str, ladder: str
    ) -> None:
        """Both groups with the right languages (the embedded track and the sidecar), every
        variant naming them; ffmpeg decodes each audio language to the source's duration; the
        cues fetched through the key server, decrypted and mapped by X-TIMESTAMP-MAP onto the
        video's timeline, are the source's within 100 ms."""
        # Given the talk packaged with its German sidecar
        package(keyserver, talk_clip, "talk", "--ladder", ladder, "--container", container,
                "--subtitles", f"de={german}")
        url = keyserver.url("talk")

        # Then every playlist keeps the rules, and the master names both groups
        playlists = assert_valid_hls(url)
        media = master_media(url)
        assert [(m["TYPE"], m["GROUP-ID"], m["LANGUAGE"], m["NAME"], m["DEFAULT"])
                for m in media] == [
            ("AUDIO", "audio", "en", "English", "YES"), ("AUDIO", "audio", "de", "Deutsch", "NO"),
            ("SUBTITLES", "subs", "en", "English", "NO"),  # an MP4 does not say default
            ("SUBTITLES", "subs", "de", "Deutsch", "NO"),
        ]
        assert all(m["FORCED"] == "NO" and m["AUTOSELECT"] == "YES"
                   for m in media if m["TYPE"] == "SUBTITLES")
        master = m3u8.loads(playlists[url], uri=url)
        (variant,) = master.playlists
        assert (variant.stream_info.audio, variant.stream_info.subtitles) == ("audio", "subs")

        # And ffmpeg selects each audio language and decodes it to the source's duration
        for position, (language, _, tone) in enumerate(TRACKS):
            seconds, measured = decoded_audio(url, f"0:a:m:language:{language}")
            expected = source_duration(talk_clip, f"a:{position}")
            assert seconds == pytest.approx(expected, abs=DURATION_TOLERANCE_S), language
            assert measured == pytest.approx(tone, rel=0.02), language

        # And each subtitle rendition's cues, as played, are the source's
        video_segments = m3u8.loads(playlists[variant.absolute_uri]).segments
        start = first_video_pts(variant.absolute_uri)
        subtitles = [m for m in master.media if m.type == "SUBTITLES"]
        for rendition, authored in zip(subtitles, (ENGLISH, GERMAN), strict=True):
            cues, mpegts, durations = played_cues(rendition.absolute_uri)
            assert durations == [s.duration for s in video_segments]
            assert_cues_match(cues, start, authored)
        # The map puts the source's start where its first frame was presented, less where
        # that frame lay in the source, for every container
        expected = round((start - source_video_start(talk_clip)) * 90000)
        assert mpegts == pytest.approx(expected, abs=2)

    @pytest.mark.parametrize(("container", "ladder"), [("ts", "default"), ("fmp4", "copy")])
    def test_a_late_video_keeps_each_cue_with_its_frames(
        self, keyserver: Hlsvault, late_video_clip: Path, tmp_path: Path, container: str,
        ladder: str,
    ) -> None:
        """The video starts 0.8 s into the source: the map is where the source's start lies
        on the video's timeline, and each cue is in exactly the segments whose time it is
        shown in (a cue at 2.2 s of the source is in the first segment, which ends at 2.8 s)."""
        sidecar = tmp_path / "late.en.srt"
        sidecar.write_text(srt(LATE))
        package(keyserver, late_video_clip, "late", "--ladder", ladder, "--container",
                container, "--subtitles", f"en={sidecar}")
        url = keyserver.url("late")
        master = m3u8.loads(fetch(url), uri=url)
        start = first_video_pts(master.playlists[0].absolute_uri)
        late = source_video_start(late_video_clip)
        assert late >= 0.5
        (track,) = [m for m in master.media if m.type == "SUBTITLES"]
        segments, mpegts, durations = cues_by_segment(track.absolute_uri)
        assert mpegts == pytest.approx(round((start - late) * 90000), abs=2)
        bounds = [*itertools.accumulate(durations[:-1], initial=start), float("inf")]
        for first, last, text in LATE:
            shown = (first + start - late, last + start - late)
            expected = [i for i in range(len(durations))
                        if shown[1] > bounds[i] and shown[0] < bounds[i + 1]]
            found = [i for i, cues in enumerate(segments) if text in [c[2] for c in cues]]
            assert found == expected, (text, bounds)
        assert_cues_match(played_cues(track.absolute_uri)[0], start - late, LATE)

    def test_subtitle_playlists_follow_the_token_rules_rekey_and_revoke(
        self, keyserver: Hlsvault, talk_clip: Path, german: Path
    ) -> None:
        """A subtitle playlist is refused without a token (401) and with another asset's
        (403); after a re-key its segments decrypt under the new version's key to the same
        cues; after a revocation it is gone (410)."""
        package(keyserver, talk_clip, "private", "--ladder", "copy",
                "--subtitles", f"de={german}")
        url = keyserver.url("private")
        (german_media,) = [m for m in master_media(url) if m.get("LANGUAGE") == "de"
                           and m["TYPE"] == "SUBTITLES"]
        tokenized = german_media["URI"]
        bare = tokenized.split("?", 1)[0]
        other = keyserver.run("token", "someone-else").stdout.strip()
        assert status_of(bare) == 401
        assert status_of(f"{bare}?token={other}") == 403
        assert status_of(tokenized) == 200
        before, _, _ = played_cues(tokenized)

        done = keyserver.run("rekey", "private", "--grace", "0", "--json")
        assert done.returncode == 0, done.stderr
        version = json.loads(done.stdout)["version"]
        deadline = time.monotonic() + 10
        while f"/{version}/" not in fetch(tokenized):
            assert time.monotonic() < deadline, "the key server never served the new version"
            time.sleep(0.2)
        assert f"/v1/keys/private/{version}/" in fetch(tokenized)
        assert played_cues(tokenized)[0] == before

        done = keyserver.run("revoke", "private", "--json")
        assert done.returncode == 0, done.stderr
        assert status_of(tokenized) == 410


class TestHostileSidecars:
    @pytest.mark.parametrize(("content", "reason"), [
        ("binary", "is not UTF-8 text"),
        ("huge", "MB, more than"),
        ("letter", "neither a SubRip cue timing"),
        # 8 MB, under the file limit, of long cues each shown for 99 hours: copied into every
        # segment they are shown in, they would make gigabytes of segments.
        ("spanning", "MB of WebVTT segments"),
    ])
    def test_a_bad_sidecar_fails_the_job_and_publishes_nothing(
        self, hlsvault: Hlsvault, talk_clip: Path, tmp_path: Path, content: str, reason: str
    ) -> None:
        sidecar = tmp_path / "talk.de.srt"
        if content == "binary":
            sidecar.write_bytes(bytes(range(256)) * 64)
        elif content == "huge":
            with sidecar.open("wb") as handle:
                handle.truncate(200 * 1024 * 1024)
        elif content == "letter":
            sidecar.write_text("Dear viewer,\nplease enjoy the film.\n")
        else:
            cue = "00:00:00.000 --> 99:00:00.000\n" + "x" * 1990 + "\n\n"
            sidecar.write_text("WEBVTT\n\n" + cue * 4148)
            assert 8_000_000 < sidecar.stat().st_size < MAX_SUBTITLE_BYTES
        done = hlsvault.package(str(talk_clip), "--asset", "bad", "--subtitles",
                                f"de={sidecar}", "--json")
        assert done.returncode == 1, done.stderr
        summary = json.loads(done.stdout)
        assert summary["status"] == "failed" and summary["failed_stage"] == "probe"
        assert reason in summary["error"] and "talk.de.srt" in summary["error"]
        assert not (hlsvault.origin / "assets" / "bad").exists()

    def test_a_bad_language_tag_is_a_usage_error(
        self, hlsvault: Hlsvault, talk_clip: Path, german: Path
    ) -> None:
        done = hlsvault.package(str(talk_clip), "--asset", "bad", "--subtitles",
                                f"deutsch!={german}")
        assert done.returncode == 2 and "RFC 5646" in done.stderr, done.stderr
        assert not (hlsvault.origin / "assets" / "bad").exists()


class TestHlsJs:
    @pytest.mark.parametrize("container", ["fmp4", "ts"])
    def test_hls_js_lists_both_groups_switches_audio_and_shows_cues(
        self, hlsvault: Hlsvault, page_server: PlayerPageServer, player: Player,
        talk_clip: Path, german: Path, request: pytest.FixtureRequest, container: str,
    ) -> None:
        """hls.js in Chromium lists two audio and two subtitle tracks with their languages,
        switches to German audio without a fatal error, and the German cues it decrypts and
        shows sit at the sidecar's times within 100 ms."""
        hlsvault.env["HLSVAULT_CORS_ORIGINS"] = page_server.origin
        package(hlsvault, talk_clip, "browser", "--ladder", "copy", "--container", container,
                "--subtitles", f"de={german}")
        served: Hlsvault = request.getfixturevalue("keyserver")
        player.open(page_server.player_url(served.url("browser"), rate=2.0))

        state = player.wait_until_played(1.0, timeout_s=30)
        assert state.fatal is None, player.describe()
        assert player.page.evaluate("() => hls.audioTracks.map(t => [t.lang, t.name])") == [
            ["en", "English"], ["de", "Deutsch"]], player.describe()
        assert player.page.evaluate("() => hls.subtitleTracks.map(t => [t.lang, t.name])") == [
            ["en", "English"], ["de", "Deutsch"]], player.describe()

        switched = player.page.evaluate("""() => new Promise(resolve => {
            hls.once(Hls.Events.AUDIO_TRACK_SWITCHED, (event, data) => resolve(data.id));
            hls.audioTrack = 1;
        })""")
        assert switched == 1
        player.page.evaluate("() => { hls.subtitleDisplay = true; hls.subtitleTrack = 1; "
                             "document.getElementById('video').currentTime = 0; }")
        state = player.wait_until_played(5.95, timeout_s=30)
        assert state.fatal is None, player.describe()
        cues = player.page.evaluate("""() => Array.from(document.getElementById('video')
            .textTracks).filter(t => t.language === 'de').flatMap(t => Array.from(t.cues || [])
            .map(c => [c.startTime, c.endTime, c.text]))""")
        assert_cues_match([tuple(c) for c in cues], 0.0, GERMAN)
        assert player.fetched("/subs1-de/seg_"), player.describe()
        assert player.fetched("/audio1-de/seg_"), player.describe()


class TestFleet:
    def test_subtitles_on_the_fleet(
        self, fleet: Fleet, moto_server: MotoServer, talk_clip: Path, german: Path
    ) -> None:
        """On Redis and S3 stores (the sidecar sent through work storage): the WebVTT segments
        reach the origin encrypted as text/vtt, and play with the source's cue times."""
        from test_fleet import bucket_objects, submit, wait_for_job

        fleet.start_all()
        job_id = submit(fleet, talk_clip, "fleetsubs", "--ladder", "copy",
                        "--segment-seconds", "2", "--subtitles", f"de={german}")
        record = wait_for_job(fleet, job_id)
        assert record["status"] == "succeeded", record
        origin = fleet.env["TEST_BUCKET_ORIGIN"]
        objects = bucket_objects(moto_server, origin, "assets/fleetsubs/")
        vtt_keys = sorted(k for k in objects if k.endswith(".vtt"))
        assert {k.split("/")[3] for k in vtt_keys} == {"subs0-en", "subs1-de"}
        assert all(not objects[k].startswith(b"WEBVTT") for k in vtt_keys)
        s3 = moto_server.client("s3")
        assert s3.head_object(Bucket=origin, Key=vtt_keys[0])["ContentType"] == "text/vtt"

        url = fleet.cli("url", "fleetsubs").stdout.strip()
        assert_valid_hls(url)
        master = m3u8.loads(fetch(url), uri=url)
        start = first_video_pts(master.playlists[0].absolute_uri)
        subtitles = [m for m in master.media if m.type == "SUBTITLES"]
        for rendition, authored in zip(subtitles, (ENGLISH, GERMAN), strict=True):
            assert_cues_match(played_cues(rendition.absolute_uri)[0], start, authored)


    def test_a_bad_uploaded_sidecar_is_named_as_the_user_gave_it(
        self, fleet: Fleet, talk_clip: Path, tmp_path: Path
    ) -> None:
        """A local sidecar the CLI sent through work storage (stored as ``0.srt``) that is
        not a subtitle file fails the job with an error naming ``talk.de.srt``."""
        from test_fleet import submit, wait_for_job

        fleet.start_all()
        sidecar = tmp_path / "talk.de.srt"
        sidecar.write_text("Dear viewer,\nplease enjoy the film.\n")
        job_id = submit(fleet, talk_clip, "fleetbad", "--subtitles", f"de={sidecar}")
        record = wait_for_job(fleet, job_id)
        assert (record["status"], record["failed_stage"]) == ("failed", "probe"), record
        assert "talk.de.srt (de)" in record["error"], record["error"]
        assert "neither a SubRip cue timing" in record["error"]
        assert "0.srt" not in record["error"]

    @pytest.mark.slow
    def test_rekey_re_encrypts_subtitle_segments_and_revoke_refuses_them(
        self, fleet: Fleet, talk_clip: Path, german: Path
    ) -> None:
        """On the fleet, after a re-key every subtitle segment decrypts under the new version's
        key only (never the old one) to the same cues; after a revocation the subtitle
        playlist is refused (410)."""
        from test_fleet import submit, wait_for_job

        # Given the talk packaged on the fleet with its German sidecar
        fleet.start_all()
        job_id = submit(fleet, talk_clip, "fleetrekey", "--ladder", "copy",
                        "--segment-seconds", "2", "--subtitles", f"de={german}")
        assert wait_for_job(fleet, job_id)["status"] == "succeeded"
        url = fleet.cli("url", "fleetrekey").stdout.strip()
        master = m3u8.loads(fetch(url), uri=url)
        subtitles = [m.absolute_uri for m in master.media if m.type == "SUBTITLES"]
        assert len(subtitles) == 2
        before = {uri: played_cues(uri)[0] for uri in subtitles}
        old_keys = {uri: get(m3u8.loads(fetch(uri), uri=uri).keys[-1].absolute_uri)
                    for uri in subtitles}

        # When it is re-keyed
        done = fleet.cli("rekey", "fleetrekey", "--grace", "0", "--json")
        assert done.returncode == 0, done.stderr + fleet.log_text()[-3000:]
        version = json.loads(done.stdout)["version"]
        deadline = time.monotonic() + 10
        while not all(f"/{version}/" in fetch(uri) for uri in subtitles):
            assert time.monotonic() < deadline, "the key server never served the new version"
            time.sleep(0.2)

        # Then each subtitle segment is the new version's, decrypts under its key to the same
        # cues, and is noise under the old key
        for uri in subtitles:
            playlist = m3u8.loads(fetch(uri), uri=uri)
            assert all(f"/fleetrekey/{version}/" in s.absolute_uri for s in playlist.segments)
            assert f"/v1/keys/fleetrekey/{version}/" in playlist.keys[-1].absolute_uri
            assert played_cues(uri)[0] == before[uri]
            for sequence, segment in enumerate(playlist.segments):
                encrypted = get(segment.absolute_uri)
                iv = sequence.to_bytes(16, "big")
                try:
                    plain = decrypt_bytes(encrypted, old_keys[uri], iv)
                except ValueError:
                    continue  # the padding gives the wrong key away
                assert not plain.startswith(b"WEBVTT"), "a segment still under the old key"

        # When it is revoked, then the subtitle playlists are refused
        done = fleet.cli("revoke", "fleetrekey", "--json")
        assert done.returncode == 0, done.stderr
        deadline = time.monotonic() + 10
        while status_of(subtitles[0]) != 410:
            assert time.monotonic() < deadline, "the key server kept serving a revoked asset"
            time.sleep(0.2)
        assert [status_of(uri) for uri in subtitles] == [410, 410]


class TestJobRequests:
    def test_a_sidecar_is_an_object_of_an_allowed_bucket(
        self, tmp_path: Path, redis_server: RedisServer, moto_server: MotoServer
    ) -> None:
        """A job request's sidecar in a bucket jobs may not read is refused with the reason
        and makes no job; the same request naming an allowed bucket's object makes one whose
        spec carries the sidecar."""
        from test_ingest import make_rig

        rig = make_rig(tmp_path, redis_server, moto_server)
        ingest = rig.poller.ingest
        source = f"s3://{rig.bucket}/incoming/clip.mp4"
        foreign = {"source": source, "subtitles": [
            {"language": "de", "source": "s3://someone-elses-bucket/talk.de.vtt"}]}
        with pytest.raises(InvalidSource, match="not an allowed source bucket"):
            ingest.accept_body(json.dumps(foreign))
        assert rig.job_ids() == []

        allowed = {"source": source, "subtitles": [
            {"language": "de", "source": f"s3://{rig.bucket}/incoming/talk.de.vtt"}]}
        with pytest.raises(InvalidSource, match=r"subtitle file s3://.* does not exist"):
            ingest.accept_body(json.dumps(allowed))
        assert rig.job_ids() == []
        s3 = moto_server.client("s3")
        s3.put_object(Bucket=rig.bucket, Key="incoming/talk.de.vtt", Body=vtt(GERMAN).encode())
        (accepted,) = ingest.accept_body(json.dumps(allowed))
        assert rig.jobs.get(accepted.job_id).spec.subtitles == (
            ("de", f"s3://{rig.bucket}/incoming/talk.de.vtt"),)

    def test_a_changed_sidecar_or_trick_play_is_another_job(
        self, tmp_path: Path, redis_server: RedisServer, moto_server: MotoServer
    ) -> None:
        """The same request sent again is the same job; with the sidecar's content changed,
        or trick play asked for, or without the sidecar, it is a new job each time."""
        from test_ingest import make_rig

        rig = make_rig(tmp_path, redis_server, moto_server)
        s3 = moto_server.client("s3")
        s3.put_object(Bucket=rig.bucket, Key="incoming/talk.de.vtt", Body=vtt(GERMAN).encode())
        sidecar = {"language": "de", "source": f"s3://{rig.bucket}/incoming/talk.de.vtt"}
        request = {"source": f"s3://{rig.bucket}/incoming/clip.mp4", "subtitles": [sidecar]}

        def accepted(document: dict[str, object]) -> tuple[str, bool]:
            (job,) = rig.poller.ingest.accept_body(json.dumps(document))
            return job.job_id, job.duplicate

        first, duplicate = accepted(request)
        assert not duplicate and accepted(request) == (first, True)
        s3.put_object(Bucket=rig.bucket, Key="incoming/talk.de.vtt",
                      Body=vtt(GERMAN[:1]).encode())
        changed, duplicate = accepted(request)
        assert not duplicate and changed != first
        with_trick_play, duplicate = accepted({**request, "trick_play": True})
        assert not duplicate and with_trick_play not in (first, changed)
        bare, duplicate = accepted({"source": request["source"]})
        assert not duplicate and bare not in (first, changed, with_trick_play)
        assert accepted({"source": request["source"]}) == (bare, True)


class TestSignedCdn:
    def test_subtitle_segments_carry_the_renditions_cdn_signature(
        self, cdn_library: CdnLibrary, talk_clip: Path, german: Path
    ) -> None:
        """With CloudFront signing on, a subtitle playlist's segment URIs carry one signature
        of their rendition: the CloudFront stand-in serves them signed and refuses them
        unsigned."""
        from keyserver import create_app
        from pipeline.settings import load_settings
        from pipeline.tokens import mint_token

        from cdn_support import package as package_to_s3
        from cdn_support import policy_of, signing_query
        from keyserver_support import AppClient, uris

        package_to_s3(cdn_library.env, talk_clip, "cdnsubs", "--ladder", "copy",
                      "--segment-seconds", "2", "--subtitles", f"de={german}")
        token = mint_token(cdn_library.env["HLSVAULT_TOKEN_SECRET"], "cdnsubs", 600)
        with AppClient(create_app(load_settings(cdn_library.env)), client_ip="127.0.0.1",
                       base_url=cdn_library.public_url) as client:
            answer = client.get(layout.variant_url("", "cdnsubs", "subs1-de", f"?token={token}"))
        assert answer.status_code == 200, answer.text
        urls = uris(answer.text)
        assert len(urls) == 3 and len({signing_query(url) for url in urls}) == 1
        (statement,) = policy_of(urls[0])["Statement"]
        assert statement["Resource"].endswith("/subs1-de/*")
        for url in urls:
            assert status_of(url) == 200
        assert status_of(urls[0].split("?", 1)[0]) == 403


#: Cues crossing the joins of a 6 s source transcoded in 2 s chunks (joins at 2 s and 4 s).
JOINS_ENGLISH = [(0.5, 1.2, "Before"), (1.6, 2.5, "Over the first join"),
                 (3.7, 4.4, "Over the second join"), (5.0, 5.8, "After")]
JOINS_GERMAN = [(1.9, 2.2, "Knapp"), (3.0, 4.8, "Lang über die zweite Fuge")]


@pytest.fixture(scope="session")
def joins_clip() -> Path:
    """6 s of 640x360 H.264 and AAC with an English mov_text track whose cues cross 2 s and
    4 s, made by ffmpeg from a SubRip file written here."""
    MEDIA_CACHE.mkdir(parents=True, exist_ok=True)
    english = MEDIA_CACHE / "joins.en.srt"
    english.write_text(srt(JOINS_ENGLISH))
    return generate_media("joins.mp4", [
        "-f", "lavfi", "-i", "testsrc2=size=640x360:rate=30",
        "-f", "lavfi", "-i", "sine=frequency=440:sample_rate=48000", "-i", str(english),
        "-t", "6", "-map", "0:v", "-map", "1:a", "-map", "2:s",
        "-c:v", "libx264", "-preset", "veryfast", "-g", "30", "-pix_fmt", "yuv420p",
        "-c:a", "aac", "-b:a", "96k", "-c:s", "mov_text", "-metadata:s:s:0", "language=eng",
    ])


class TestChunkedTranscode:
    @pytest.mark.slow
    @pytest.mark.parametrize("container", ["ts", "fmp4"])
    def test_subtitles_of_a_transcode_in_three_chunks_are_continuous(
        self, keyserver: Hlsvault, joins_clip: Path, tmp_path: Path, container: str
    ) -> None:
        """A transcode cut into three 2 s chunks: each subtitle playlist has the video's
        sequence numbers and durations, one segment name each, and the cues crossing the
        chunk joins, fetched through the key server, decrypted and mapped, are the source's
        within 100 ms."""
        # Given the source transcoded in 2 s chunks, with a German sidecar
        german = tmp_path / "joins.de.vtt"
        german.write_text(vtt(JOINS_GERMAN))
        keyserver.env["HLSVAULT_CHUNK_SECONDS"] = "2"
        package(keyserver, joins_clip, "joins", "--ladder", "default", "--container", container,
                "--subtitles", f"de={german}")
        [path] = (keyserver.data_dir / "jobs").glob("*.json")
        record = json.loads(path.read_text())
        assert [f"segment:c{n:03d}" for n in range(3)] == sorted(
            stage.removesuffix(".status") for stage in record
            if stage.startswith("segment:") and stage.endswith(".status"))

        # Then every subtitle playlist is one continuous run aligned with every video variant
        url = keyserver.url("joins")
        playlists = assert_valid_hls(url)
        master = m3u8.loads(playlists[url], uri=url)
        subtitles = [m for m in master.media if m.type == "SUBTITLES"]
        assert [(m.language, m.name) for m in subtitles] == [("en", "English"),
                                                             ("de", "Deutsch")]
        for variant in master.playlists:
            video = m3u8.loads(playlists[variant.absolute_uri])
            for rendition in subtitles:
                text = playlists[rendition.absolute_uri]
                playlist = m3u8.loads(text)
                assert "DISCONTINUITY" not in text
                assert playlist.media_sequence == video.media_sequence
                assert ([s.duration for s in playlist.segments]
                        == [s.duration for s in video.segments])
                names = [s.uri.split("?")[0].rsplit("/", 1)[-1] for s in playlist.segments]
                assert names == [layout.subtitle_segment_name(n) for n in range(len(names))]
        # (one segment per chunk: the cues above cross segment and chunk joins alike)
        assert [s.duration for s in video.segments] == pytest.approx([2.0, 2.0, 2.0], abs=0.04)

        # And the cues crossing the joins play at the source's times
        start = first_video_pts(master.playlists[0].absolute_uri)
        for rendition, authored in zip(subtitles, (JOINS_ENGLISH, JOINS_GERMAN), strict=True):
            cues, mpegts, _ = played_cues(rendition.absolute_uri)
            assert_cues_match(cues, start, authored)
        assert mpegts == round(start * 90000)
