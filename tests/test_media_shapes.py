"""Media shapes end to end: fMP4/CMAF segments, HEVC, audio as a rendition group of its own
(every source track a language a player can pick) and the audio-only variant, packaged with the
real CLI and played through the key server by ffmpeg and by hls.js in Chromium. Every playlist
is checked by tests/hlscheck.py and parsed by the m3u8 package."""

from __future__ import annotations

import itertools
import json
import subprocess
import time
from pathlib import Path
from urllib.parse import urljoin

import m3u8
import pytest

from browser import Player, PlayerPageServer
from fleet import Fleet, MotoServer
from hlscheck import assert_valid_hls, attributes, fetch
from support import Hlsvault, decrypt_bytes, frame_hashes, framemd5

#: The clips are 6 s long; decoded audio may run a frame of AAC priming or padding longer.
DURATION_TOLERANCE_S = 0.1
#: two_audio_clip's tracks, as its fixture makes them: (LANGUAGE, NAME, tone in Hz).
TRACKS = (("en", "English", 440), ("de", "Deutsch", 660))
PLAYED_S = 5.0
RATE = 2.0
PLAY_TIMEOUT_S = 30.0


def package(hv: Hlsvault, source: Path, asset: str, *options: str) -> dict[str, object]:
    done = hv.package(str(source), "--asset", asset, "--segment-seconds", "2", *options, "--json")
    assert done.returncode == 0, done.stderr
    summary: dict[str, object] = json.loads(done.stdout)
    assert summary["status"] == "succeeded", summary
    return summary


def decoded_audio(target: str, stream: str) -> tuple[float, float]:
    """Seconds of audio one stream of ``target`` decodes to, and its tone in Hz (counted from
    the zero crossings of the decoded wave, mono at 48 kHz)."""
    done = subprocess.run(
        ["ffmpeg", "-nostdin", "-v", "error", "-i", target, "-map", stream, "-ac", "1",
         "-ar", "48000", "-f", "s16le", "-"],
        capture_output=True, timeout=120, check=False,
    )
    assert done.returncode == 0, done.stderr.decode(errors="replace")[-2000:]
    samples = memoryview(done.stdout).cast("h")
    seconds = len(samples) / 48000
    crossings = sum(1 for a, b in itertools.pairwise(samples) if a < 0 <= b)
    return seconds, crossings / seconds


def source_duration(path: Path, stream: str = "a:0") -> float:
    return decoded_audio(str(path), f"0:{stream}")[0]


def assert_each_language_decodes(url: str, source: Path) -> None:
    """Each of TRACKS, picked by its language from ``url``, decodes to the source track's
    duration and tone."""
    for position, (language, _, tone) in enumerate(TRACKS):
        seconds, measured = decoded_audio(url, f"0:a:m:language:{language}")
        expected = source_duration(source, f"a:{position}")
        assert seconds == pytest.approx(expected, abs=DURATION_TOLERANCE_S), language
        assert measured == pytest.approx(tone, rel=0.02), language


def master_media(url: str) -> list[dict[str, str]]:
    return [attributes(line) for line in fetch(url).splitlines()
            if line.startswith("#EXT-X-MEDIA:")]


class TestFmp4:
    def test_ffmpeg_plays_every_frame_of_the_fmp4_copy_ladder(
        self, keyserver: Hlsvault, copy_clip: Path
    ) -> None:
        """An fMP4 remux played over HTTP decodes to exactly the source's frames, and every
        playlist keeps RFC 8216 (VERSION 7, EXT-X-MAP before the first EXT-X-KEY)."""
        # Given the copy clip packaged as CMAF
        summary = package(keyserver, copy_clip, "cmaf", "--ladder", "copy",
                          "--container", "fmp4")
        names = [r["name"] for r in summary["renditions"]]  # type: ignore[index]
        assert names == ["360p", "audio0"]

        # When ffmpeg, as an HLS client, plays the tokenized URL
        url = keyserver.url("cmaf")
        playlists = assert_valid_hls(url)

        # Then every frame is the source's, and the media playlists are fMP4's
        source = framemd5(str(copy_clip))
        played = framemd5(url)
        assert len(played) == len(source) == 180
        assert frame_hashes(played) == frame_hashes(source)
        for text in list(playlists.values())[1:]:
            lines = text.splitlines()
            assert "#EXT-X-VERSION:7" in lines
            map_at = next(i for i, line in enumerate(lines) if line.startswith("#EXT-X-MAP"))
            key_at = next(i for i, line in enumerate(lines) if line.startswith("#EXT-X-KEY"))
            assert map_at < key_at
            assert all(line.endswith(".m4s") for line in lines if line.startswith("http")
                       and "/seg_" in line)

    def test_init_and_media_segments_parse_after_decryption_only(
        self, keyserver: Hlsvault, copy_clip: Path, tmp_path: Path
    ) -> None:
        """The init segment is clear and parses alone; a .m4s fetched from the CDN parses
        (with its init segment) only once decrypted with the key the playlist names."""
        package(keyserver, copy_clip, "parts", "--ladder", "copy", "--container", "fmp4")
        master = m3u8.loads(fetch(keyserver.url("parts")), uri=keyserver.url("parts"))
        variant_url = master.playlists[0].absolute_uri
        variant = m3u8.loads(fetch(variant_url), uri=variant_url)
        init = _get(urljoin(variant_url, variant.segment_map[0].uri))
        key = _get(variant.keys[-1].absolute_uri)
        segment = variant.segments[1]
        encrypted = _get(segment.absolute_uri)

        init_file = tmp_path / "init.mp4"
        init_file.write_bytes(init)
        assert _probe(init_file)["streams"][0]["codec_name"] == "h264"

        plain = decrypt_bytes(encrypted, key, (1).to_bytes(16, "big"))
        joined = tmp_path / "joined.mp4"
        joined.write_bytes(init + plain)
        probed = _probe(joined, "-count_frames")
        assert probed["streams"][0]["nb_read_frames"] == "60"  # 2 s at 30 fps
        # The control: the same bytes still encrypted are no media.
        joined.write_bytes(init + encrypted)
        assert _probe(joined, "-count_frames", check=False).get("streams", [{}])[0].get(
            "nb_read_frames", "0") == "0"

    def test_hevc_ladder_codecs_match_what_ffprobe_reads(
        self, keyserver: Hlsvault, copy_clip: Path
    ) -> None:
        """--codec hevc: the variant's CODECS is hvc1 with the profile and level ffprobe
        reads from the stream the key server serves; the video plays every frame."""
        package(keyserver, copy_clip, "hevc", "--container", "fmp4", "--codec", "hevc")
        url = keyserver.url("hevc")
        assert_valid_hls(url)
        master = m3u8.loads(fetch(url), uri=url)
        entry = master.playlists[0]
        video_tag, audio_tag = entry.stream_info.codecs.split(",")
        stream = _probe(entry.absolute_uri)["streams"]
        video = next(s for s in stream if s["codec_type"] == "video")
        assert (video["codec_name"], video["codec_tag_string"]) == ("hevc", "hvc1")
        kind, profile, _flags, tier_level, *_ = video_tag.split(".")
        assert kind == "hvc1"
        assert {"1": "Main", "2": "Main 10"}[profile] == video["profile"]
        assert tier_level == f"L{video['level']}"
        assert audio_tag == "mp4a.40.2"
        assert len(framemd5(url)) == 180

    def test_rekey_re_encrypts_fmp4_and_audio_segments(
        self, keyserver: Hlsvault, two_audio_clip: Path
    ) -> None:
        """After a re-key the new version's video and both audio tracks play, every segment
        under the new key."""
        package(keyserver, two_audio_clip, "rekeyed", "--ladder", "copy", "--container", "fmp4")
        before = keyserver.url("rekeyed")
        old_audio = {m["LANGUAGE"]: decoded_audio(before, f"0:a:m:language:{m['LANGUAGE']}")
                     for m in master_media(before)}
        done = keyserver.run("rekey", "rekeyed", "--grace", "0", "--json")
        assert done.returncode == 0, done.stderr
        version = json.loads(done.stdout)["version"]
        after = keyserver.url("rekeyed")
        # The key server may answer from the state it cached for up to STATE_CACHE_TTL_S.
        deadline = time.monotonic() + 10
        while version not in fetch(master_media(after)[0]["URI"]):
            assert time.monotonic() < deadline, "the key server never served the new version"
            time.sleep(0.2)
        playlists = assert_valid_hls(after)
        assert all(f"/v1/keys/rekeyed/{version}/" in text
                   for text in list(playlists.values())[1:])
        assert frame_hashes(framemd5(after)) == frame_hashes(framemd5(str(two_audio_clip)))
        for language, (seconds, tone) in old_audio.items():
            again = decoded_audio(after, f"0:a:m:language:{language}")
            assert again[0] == pytest.approx(seconds, abs=0.001)
            assert again[1] == pytest.approx(tone, rel=0.01)


class TestAudioGroups:
    @pytest.mark.parametrize("container", ["fmp4", "ts"])
    def test_each_language_is_a_rendition_ffmpeg_selects_and_decodes(
        self, keyserver: Hlsvault, two_audio_clip: Path, container: str
    ) -> None:
        """Two audio tracks become one AUDIO group with both languages (the source's default
        the DEFAULT), the video variant references it and its BANDWIDTH includes audio; ffmpeg
        picks each language and decodes it to the source's duration and tone."""
        package(keyserver, two_audio_clip, "langs", "--ladder", "copy", "--container", container)
        url = keyserver.url("langs")
        assert_valid_hls(url)
        media = master_media(url)
        assert [(m["TYPE"], m["GROUP-ID"], m["LANGUAGE"], m["NAME"], m["DEFAULT"])
                for m in media] == [("AUDIO", "audio", "en", "English", "YES"),
                                    ("AUDIO", "audio", "de", "Deutsch", "NO")]
        master = m3u8.loads(fetch(url), uri=url)
        (variant,) = master.playlists
        assert variant.stream_info.audio == "audio"
        audio_peak = max(
            m3u8.loads(fetch(m.absolute_uri), uri=m.absolute_uri).segments[0].duration
            for m in master.media
        )
        assert audio_peak > 0
        video_only = m3u8.loads(fetch(variant.absolute_uri), uri=variant.absolute_uri)
        assert variant.stream_info.bandwidth > 0 and video_only.segments

        assert_each_language_decodes(url, two_audio_clip)
        assert frame_hashes(framemd5(url)) == frame_hashes(framemd5(str(two_audio_clip)))

    @pytest.mark.slow
    def test_a_chunked_transcode_cuts_its_languages_beside_the_chunks(
        self, keyserver: Hlsvault, two_audio_clip: Path
    ) -> None:
        """Two languages of a transcode cut in 2 s chunks: the audio group has a stage of its
        own that runs beside the chunks (the playlist waits for both), and each language
        decodes to the source's duration and tone, the video to every frame."""
        keyserver.env["HLSVAULT_CHUNK_SECONDS"] = "2"
        summary = package(keyserver, two_audio_clip, "chunklangs", "--ladder", "default",
                          "--container", "fmp4")
        record = json.loads(keyserver.run("status", str(summary["job_id"]), "--json").stdout)
        stages = {s["name"]: s["status"] for s in record["stages"]}
        assert stages["audio"] == "done"
        assert {f"segment:c00{n}" for n in range(3)} <= set(stages)
        url = keyserver.url("chunklangs")
        assert_valid_hls(url)
        assert_each_language_decodes(url, two_audio_clip)
        assert len(framemd5(url)) == len(framemd5(str(two_audio_clip)))

    def test_audio_only_variant_plays_the_source_duration_without_video(
        self, keyserver: Hlsvault, two_audio_clip: Path
    ) -> None:
        """--audio-only adds a variant whose CODECS name audio only, referencing the group;
        ffmpeg plays it to the source's duration, and it holds no video."""
        package(keyserver, two_audio_clip, "radio", "--container", "fmp4", "--audio-only")
        url = keyserver.url("radio")
        assert_valid_hls(url)
        master = m3u8.loads(fetch(url), uri=url)
        audio_only = [p for p in master.playlists if p.stream_info.resolution is None]
        assert len(audio_only) == 1
        info = audio_only[0].stream_info
        assert info.codecs == "mp4a.40.2" and info.audio == "audio"
        video_variants = [p for p in master.playlists if p.stream_info.resolution is not None]
        assert all(p.stream_info.bandwidth > info.bandwidth for p in video_variants)

        target = audio_only[0].absolute_uri
        kinds = [s["codec_type"] for s in _probe(target)["streams"]]
        assert kinds == ["audio"]
        seconds, tone = decoded_audio(target, "0:a:0")
        assert seconds == pytest.approx(source_duration(two_audio_clip),
                                        abs=DURATION_TOLERANCE_S)
        assert tone == pytest.approx(440, rel=0.02)  # the default track: English

    def test_a_download_of_separate_audio_is_refused_up_front(
        self, hlsvault: Hlsvault, two_audio_clip: Path
    ) -> None:
        """Downloads are made from muxed MPEG-TS: asking for one with fMP4 is a usage error,
        and a source whose several tracks become renditions fails with the reason."""
        done = hlsvault.package(str(two_audio_clip), "--container", "fmp4", "--download")
        assert done.returncode == 2 and "--container ts" in done.stderr
        done = hlsvault.package(str(two_audio_clip), "--ladder", "copy", "--download")
        assert done.returncode == 1 and "without --download" in done.stderr


class TestHlsJs:
    def test_hls_js_plays_fmp4_and_switches_between_audio_tracks(
        self, hlsvault: Hlsvault, page_server: PlayerPageServer, player: Player,
        two_audio_clip: Path, request: pytest.FixtureRequest,
    ) -> None:
        """hls.js in Chromium lists both audio tracks with their languages, plays the fMP4
        asset past 5 s, and switches to German without a fatal error."""
        hlsvault.env["HLSVAULT_CORS_ORIGINS"] = page_server.origin
        package(hlsvault, two_audio_clip, "browser", "--ladder", "copy", "--container", "fmp4")
        served: Hlsvault = request.getfixturevalue("keyserver")
        player.open(page_server.player_url(served.url("browser"), rate=RATE))

        state = player.wait_until_played(2.0, timeout_s=PLAY_TIMEOUT_S)
        assert state.fatal is None, player.describe()
        tracks = player.page.evaluate(
            "() => hls.audioTracks.map(t => [t.lang, t.name, t.default])")
        assert tracks == [["en", "English", True], ["de", "Deutsch", False]], player.describe()

        switched = player.page.evaluate("""() => new Promise(resolve => {
            hls.once(Hls.Events.AUDIO_TRACK_SWITCHED, (event, data) => resolve(data.id));
            hls.audioTrack = 1;
        })""")
        assert switched == 1
        state = player.wait_until_played(PLAYED_S, timeout_s=PLAY_TIMEOUT_S)
        assert state.fatal is None, player.describe()
        assert state.current_time > PLAYED_S, player.describe()
        assert (state.video_width, state.video_height) == (640, 360), player.describe()
        assert state.failed_loads == [], player.describe()
        assert player.fetched("/audio1-de/seg_"), player.describe()
        assert player.fetched("/init.mp4"), player.describe()


def _get(url: str) -> bytes:
    import urllib.request

    with urllib.request.urlopen(url, timeout=10) as response:
        body: bytes = response.read()
        return body


def _probe(target: Path | str, *extra: str, check: bool = True) -> dict[str, object]:
    done = subprocess.run(
        ["ffprobe", "-v", "error", *extra, "-show_streams", "-of", "json", str(target)],
        capture_output=True, timeout=60, check=False,
    )
    if check:
        assert done.returncode == 0, done.stderr.decode(errors="replace")
    result: dict[str, object] = json.loads(done.stdout or b"{}")
    return result


class TestFleet:
    def test_fmp4_with_two_languages_on_the_fleet_then_rekeyed(
        self, fleet: Fleet, moto_server: MotoServer, two_audio_clip: Path
    ) -> None:
        """On Redis and S3 stores: the fMP4 asset's init segments, .m4s and audio renditions
        reach the origin with their content types, play frame for frame and in both
        languages, and play again after a re-key."""
        from test_fleet import bucket_objects, submit, wait_for_job

        fleet.start_all()
        job_id = submit(fleet, two_audio_clip, "fleetcmaf", "--ladder", "copy",
                        "--container", "fmp4", "--segment-seconds", "2")
        record = wait_for_job(fleet, job_id)
        assert record["status"] == "succeeded", record
        origin = fleet.env["TEST_BUCKET_ORIGIN"]
        objects = bucket_objects(moto_server, origin, "assets/fleetcmaf/")
        names = {key.split("/", 3)[3] for key in objects if key.count("/") == 4}
        assert {"360p/init.mp4", "audio0-en/init.mp4", "audio1-de/init.mp4",
                "360p/seg_00000.m4s", "audio1-de/seg_00000.m4s"} <= names
        s3 = moto_server.client("s3")
        init_key = next(k for k in objects if k.endswith("360p/init.mp4"))
        assert s3.head_object(Bucket=origin, Key=init_key)["ContentType"] == "video/mp4"
        m4s_key = next(k for k in objects if k.endswith(".m4s"))
        assert s3.head_object(Bucket=origin, Key=m4s_key)["ContentType"] == "video/iso.segment"

        source = frame_hashes(framemd5(str(two_audio_clip)))
        for attempt in ("packaged", "rekeyed"):
            url = fleet.cli("url", "fleetcmaf").stdout.strip()
            assert_valid_hls(url)
            assert frame_hashes(framemd5(url)) == source, attempt
            for language, _, tone in TRACKS:
                seconds, measured = decoded_audio(url, f"0:a:m:language:{language}")
                assert seconds == pytest.approx(6.0, abs=0.1), (attempt, language)
                assert measured == pytest.approx(tone, rel=0.02), (attempt, language)
            if attempt == "packaged":
                done = fleet.cli("rekey", "fleetcmaf", "--grace", "0", "--json")
                assert done.returncode == 0, done.stderr + fleet.log_text()[-3000:]
                time.sleep(2.5)  # past the key server's state cache, whatever the bus did
