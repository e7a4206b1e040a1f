"""Pipelined encryption (sealing): a chunk's segments encrypted as ffmpeg closes them are byte
for byte what the two stages (segment, then encrypt) produce under the same keys, decode as the
source, and are never encrypted twice, whichever stage is delivered again. Every shape is
sealed: a copy remux or a transcode (chunked or one chunk), MPEG-TS or fMP4 (its init segment
left clear), audio muxed in or as renditions of its own; an encoded rendition's first segment is
held back plain until ffprobe has measured it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from pipeline import aes, layout, packaging, sealing, workuploads
from pipeline import segment as segment_module
from pipeline.crypto import SegmentFile, iv_for_sequence
from pipeline.errors import TransientError
from pipeline.jobs import JobSpec, new_job_spec
from pipeline.playlists import describe_rendition, key_index
from pipeline.sealing import SegmentSealer
from pipeline.segment import Segment
from pipeline.services import Services, build_services
from pipeline.settings import load_settings
from pipeline.workuploads import AttemptUploads

from support import decrypt_bytes, ffmpeg_children

#: A remux is one chunk.
CHUNK = "c000"
#: The copy clips have a keyframe every second: 2 s segments make three of them, and a new key
#: every 2 segments makes two keys, so a wrong key or IV per segment would show.
SEGMENT_SECONDS = 2.0
ROTATION = 2
#: The shapes of the copy ladder: (clip fixture, container, renditions produced).
SHAPES = [
    pytest.param("copy_clip", "ts", ["360p"], id="ts-muxed-audio"),
    pytest.param("copy_clip", "fmp4", ["360p", "audio0"], id="fmp4-audio-group"),
    pytest.param("two_audio_clip", "ts", ["360p", "audio0-en", "audio1-de"],
                 id="ts-two-languages"),
    pytest.param("two_audio_clip", "fmp4", ["360p", "audio0-en", "audio1-de"],
                 id="fmp4-two-languages"),
]
CONTAINERS = ["ts", "fmp4"]


#: A transcode of the 6 s copy clip in 2 s chunks of 1 s segments (three chunks, two joins),
#: with a new key every 3 segments: chunk c001 (segments 2 and 3) straddles a rotation.
TRANSCODE_CHUNK_SECONDS = 2
TRANSCODE_SEGMENT_SECONDS = 1.0
TRANSCODE_ROTATION = 3


def services_in(root: Path, chunk_seconds: int | None = None) -> Services:
    env = {"HLSVAULT_DATA_DIR": str(root / "data")}
    if chunk_seconds is not None:
        env["HLSVAULT_CHUNK_SECONDS"] = str(chunk_seconds)
    return build_services(load_settings(env))


@pytest.fixture
def services(tmp_path: Path) -> Services:
    return services_in(tmp_path)


def probed_job(services: Services, clip: Path, container: str, *, ladder: str = "copy",
               segment_seconds: float = SEGMENT_SECONDS, rotation: int = ROTATION) -> JobSpec:
    """A job of asset ``film`` (the copy ladder unless told), recorded and probed."""
    spec = new_job_spec(str(clip), asset="film", ladder=ladder, container=container,
                        segment_seconds=segment_seconds, key_rotation_segments=rotation)
    services.jobs.create(spec)
    packaging.probe_source(services, spec)
    return spec


def twin_job(services: Services, spec: JobSpec) -> JobSpec:
    """Another job of the same asset *and version*: it gets the same keys from the vault."""
    twin = new_job_spec(spec.source, asset=spec.asset, ladder=spec.ladder,
                        container=spec.container, segment_seconds=spec.segment_seconds,
                        key_rotation_segments=spec.key_rotation_segments)
    twin = JobSpec.from_dict({**twin.to_dict(), "version": spec.version})
    services.jobs.create(twin)
    packaging.probe_source(services, twin)
    return twin


def chunks_of(services: Services, spec: JobSpec) -> list[str]:
    return [chunk.name for chunk in packaging.job_chunks(services.jobs.get(spec.job_id))]


def segment_and_encrypt(services: Services, spec: JobSpec, *, seal: bool = True) -> None:
    """The stages after the probe, as the flow runs them: the job's audio (when planned), then
    each chunk segmented and encrypted."""
    job = services.jobs.get(spec.job_id)
    if job.json_field("audio_bitrates") or (
        packaging.job_audio_renditions(job) and len(chunks_of(services, spec)) > 1
    ):
        packaging.encode_audio(services, spec)
    for chunk in chunks_of(services, spec):
        packaging.segment(services, spec, chunk, seal=seal)
        packaging.encrypt(services, spec, chunk)


def produced_record(services: Services, spec: JobSpec, chunk: str = CHUNK) -> dict[str, Any]:
    name = layout.produced_output(chunk)
    record: dict[str, Any] = services.jobs.outputs(spec.job_id, [name])[name]
    return record


def produced_renditions(
    services: Services, spec: JobSpec, chunk: str = CHUNK
) -> dict[str, dict[str, Any]]:
    produced: dict[str, dict[str, Any]] = produced_record(services, spec, chunk)["produced"]
    return produced


def encrypted_output(services: Services, spec: JobSpec, chunk: str = CHUNK) -> dict[str, bytes]:
    """Every file the encrypt stage left for ``chunk`` (media segments, init segments), by
    rendition and name, and the recorded sizes."""
    files = {}
    for rendition, produced in produced_renditions(services, spec, chunk).items():
        names = [seg["name"] for seg in produced["segments"]]
        if produced["init"] is not None and chunk == CHUNK:
            names.append(str(produced["init"]))
        for name in names:
            files[f"{rendition}/{name}"] = services.work.get_bytes(
                layout.encrypted_key(spec.job_id, rendition, name)
            )
    sizes = services.jobs.outputs(spec.job_id)[layout.sizes_output(chunk)]
    files["sizes.json"] = json.dumps(sizes).encode()
    return files


def decrypted(services: Services, spec: JobSpec, chunk: str = CHUNK) -> dict[str, list[bytes]]:
    """Each rendition's media segments of ``chunk``, decrypted as a player does (init segments
    as they are, first), by rendition."""
    plain: dict[str, list[bytes]] = {}
    for rendition, produced in produced_renditions(services, spec, chunk).items():
        parts = plain.setdefault(rendition, [])
        if produced["init"] is not None and chunk == CHUNK:
            parts.append(services.work.get_bytes(
                layout.encrypted_key(spec.job_id, rendition, str(produced["init"]))
            ))
        for seg in produced["segments"]:
            index = key_index(seg["sequence"], spec.key_rotation_segments)
            key = services.keys.get(spec.asset, spec.version, index)
            data = services.work.get_bytes(
                layout.encrypted_key(spec.job_id, rendition, seg["name"])
            )
            parts.append(decrypt_bytes(data, key, iv_for_sequence(seg["sequence"])))
    return plain


def described(services: Services, spec: JobSpec) -> list[Any]:
    """Every rendition as the playlist stage describes it (CODECS, resolution, bandwidth,
    segments and their sizes), its chunks joined."""
    job = services.jobs.get(spec.job_id)
    return [describe_rendition(produced, sizes, spec.key_rotation_segments)
            for produced, sizes in packaging.joined_renditions(services, spec, job)]


def ffprobe_streams(path: Path) -> list[dict[str, object]]:
    done = subprocess.run(
        ["ffprobe", "-v", "error", "-count_frames", "-count_packets", "-show_entries",
         "stream=codec_type,nb_read_frames,nb_read_packets", "-of", "json", str(path)],
        capture_output=True, text=True, timeout=60, check=True,
    )
    streams: list[dict[str, object]] = json.loads(done.stdout)["streams"]
    return streams


def looks_plain(data: bytes, container: str) -> bool:
    """Whether a media segment's first bytes are its container's: MPEG-TS sync bytes every 188
    bytes, or an fMP4 fragment's first box (styp, sidx or moof)."""
    if container == "fmp4":
        return data[4:8] in (b"styp", b"sidx", b"moof")
    return data[0:1] == b"\x47" and data[188:189] == b"\x47"


class TestSealedEqualsTwoStages:
    @pytest.mark.parametrize(("clip", "container", "renditions"), SHAPES)
    def test_sealed_output_is_byte_identical_to_todays_for_the_same_keys(
        self, services: Services, request: pytest.FixtureRequest, clip: str, container: str,
        renditions: list[str],
    ) -> None:
        """Given two jobs of one asset version (so the same keys, rotated every 2 segments),
        when one seals during the remux and the other remuxes and then encrypts, then every
        encrypted segment of every rendition, every init segment, the sizes and the segment
        description are the same bytes."""
        sealed = probed_job(services, request.getfixturevalue(clip), container)
        packaging.segment(services, sealed, CHUNK)
        packaging.encrypt(services, sealed, CHUNK)

        staged = twin_job(services, sealed)
        packaging.segment(services, staged, CHUNK, seal=False)
        packaging.encrypt(services, staged, CHUNK)

        assert "sealed" in produced_record(services, sealed)
        assert "sealed" not in produced_record(services, staged)
        assert list(produced_record(services, sealed)["sealed"]) == renditions
        assert produced_renditions(services, sealed) == produced_renditions(services, staged)
        sealed_files = encrypted_output(services, sealed)
        assert sealed_files == encrypted_output(services, staged)
        inits = [name for name in sealed_files if name.endswith(layout.INIT_SEGMENT)]
        assert len(inits) == (len(renditions) if container == "fmp4" else 0)
        assert all(sealed_files[name][4:8] == b"ftyp" for name in inits)  # clear
        video = [name for name in sealed_files if name.startswith("360p/seg_")]
        assert len(video) == 3
        assert len({services.keys.get("film", sealed.version, i) for i in (0, 1)}) == 2

    @pytest.mark.parametrize("container", CONTAINERS)
    def test_sealed_segments_decrypt_to_a_stream_that_decodes(
        self, services: Services, copy_clip: Path, tmp_path: Path, container: str
    ) -> None:
        """What a player does: decrypt each segment with its key and IV, join them (after the
        init segment), decode. ffmpeg decodes every frame of the 6 s source (180 video frames
        at 30 fps); an fMP4 audio rendition holds every AAC frame of the source (packets: the
        source's edit list hides its priming frame from the decoder, the rendition's has none)
        and decodes them."""
        spec = probed_job(services, copy_clip, container)
        packaging.segment(services, spec, CHUNK)
        packaging.encrypt(services, spec, CHUNK)

        plain = decrypted(services, spec)
        joined = tmp_path / f"joined.{container}"
        joined.write_bytes(b"".join(plain["360p"]))
        video = [s for s in ffprobe_streams(joined) if s["codec_type"] == "video"]
        assert {int(str(s["nb_read_frames"])) for s in video} == {180}
        if container == "fmp4":
            audio = tmp_path / "audio.mp4"
            audio.write_bytes(b"".join(plain["audio0"]))
            [stream] = ffprobe_streams(audio)
            source = [s for s in ffprobe_streams(copy_clip) if s["codec_type"] == "audio"]
            assert stream["codec_type"] == "audio"
            assert int(str(stream["nb_read_packets"])) > 250
            assert stream["nb_read_packets"] == source[0]["nb_read_packets"]
            assert int(str(stream["nb_read_frames"])) >= int(str(source[0]["nb_read_frames"]))


class TestNeverEncryptedTwice:
    @pytest.mark.parametrize("container", CONTAINERS)
    def test_redelivered_encrypt_stage_links_again_and_encrypts_nothing(
        self, services: Services, copy_clip: Path, container: str
    ) -> None:
        """Given a sealed chunk whose encrypt stage ran and then was killed half way through a
        second delivery (one placed segment gone), when encrypt is delivered again, then the
        output is the same bytes as after the first run: sealed segments are placed, not
        encrypted a second time."""
        spec = probed_job(services, copy_clip, container)
        packaging.segment(services, spec, CHUNK)
        packaging.encrypt(services, spec, CHUNK)
        first = encrypted_output(services, spec)
        plain = decrypted(services, spec)
        second = layout.segment_pattern(container) % 1
        services.work.delete_prefix(layout.encrypted_key(spec.job_id, "360p", second))

        packaging.encrypt(services, spec, CHUNK)
        packaging.encrypt(services, spec, CHUNK)

        assert encrypted_output(services, spec) == first
        assert decrypted(services, spec) == plain

    @pytest.mark.parametrize("container", CONTAINERS)
    def test_redelivered_segment_stage_keeps_the_sealed_attempt(
        self, services: Services, copy_clip: Path, container: str
    ) -> None:
        """Given a chunk sealed and encrypted, when its segment stage is delivered again (its
        worker died after the switch), then the chunk still names the attempt sealed first
        (nothing is cut or sealed again), and encrypt's output is the same bytes as
        before."""
        spec = probed_job(services, copy_clip, container)
        packaging.segment(services, spec, CHUNK)
        packaging.encrypt(services, spec, CHUNK)
        before = encrypted_output(services, spec)
        first_attempt = produced_record(services, spec)["attempt"]

        packaging.segment(services, spec, CHUNK)
        packaging.encrypt(services, spec, CHUNK)

        assert produced_record(services, spec)["attempt"] == first_attempt
        assert encrypted_output(services, spec) == before

    @pytest.mark.parametrize("container", CONTAINERS)
    def test_a_sealed_segment_is_not_plaintext(
        self, services: Services, copy_clip: Path, container: str
    ) -> None:
        """The sealed files in the attempt are ciphertext (no MPEG-TS sync bytes, no fMP4
        box), every rendition's, and the plain sizes recorded for the playlist are those
        before sealing; fMP4's init segment is left as ffmpeg wrote it."""
        spec = probed_job(services, copy_clip, container)
        packaging.segment(services, spec, CHUNK)
        record = produced_record(services, spec)
        sealed: dict[str, list[int]] = record["sealed"]
        for rendition, produced in produced_renditions(services, spec).items():
            prefix = layout.chunk_rendition_prefix(spec.job_id, CHUNK, str(record["attempt"]),
                                                   rendition)
            for seg, sealed_size in zip(produced["segments"], sealed[rendition], strict=True):
                data = services.work.get_bytes(f"{prefix}/{seg['name']}")
                assert len(data) == sealed_size == seg["size"] + 16 - seg["size"] % 16
                assert not looks_plain(data, container)
            if container == "fmp4":
                init = services.work.get_bytes(f"{prefix}/{layout.INIT_SEGMENT}")
                assert init[4:8] == b"ftyp"
        # The control: a plain attempt's segments (another job's) do look plain.
        plain_job = probed_job(services, copy_clip, container)
        packaging.segment(services, plain_job, CHUNK, seal=False)
        record = produced_record(services, plain_job)
        prefix = layout.chunk_rendition_prefix(plain_job.job_id, CHUNK, str(record["attempt"]),
                                               "360p")
        first = layout.segment_pattern(container) % 0
        assert looks_plain(services.work.get_bytes(f"{prefix}/{first}"), container)


#: The transcode shapes (the default ladder of the copy clip): (container, chunk seconds).
TRANSCODES = [
    # three chunks muxing the job's audio pieces (copied), keys rotated inside chunk c001
    pytest.param("ts", TRANSCODE_CHUNK_SECONDS, id="ts-chunked-rotation"),
    # one chunk whose ffmpeg encodes the muxed audio itself
    pytest.param("ts", 0, id="ts-one-chunk"),
    # three chunks of video; the audio rendition cut whole by the audio stage
    pytest.param("fmp4", TRANSCODE_CHUNK_SECONDS, id="fmp4-chunked"),
    # one chunk whose ffmpeg also encodes the audio rendition (held back and measured too)
    pytest.param("fmp4", 0, id="fmp4-one-chunk-audio-group"),
]


@pytest.fixture
def one_x264_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    """x264 on one thread. With frame threads its rate control depends on how the threads run
    (two plain transcodes of one chunk differed by ~1 % in segment size here), so two jobs make
    the same plaintext, and their encrypted bytes can be compared, only on one."""
    options = segment_module._x264_options
    monkeypatch.setattr(segment_module, "_x264_options",
                        lambda *args: {**options(*args), "threads": 1})


def transcode_job(tmp_path: Path, clip: Path, container: str, chunk_seconds: int
                  ) -> tuple[Services, JobSpec]:
    services = services_in(tmp_path, chunk_seconds)
    spec = probed_job(services, clip, container, ladder="default",
                      segment_seconds=TRANSCODE_SEGMENT_SECONDS, rotation=TRANSCODE_ROTATION)
    return services, spec


@pytest.mark.slow  # transcodes with x264: an end-to-end ffmpeg run
class TestSealedTranscodes:
    @pytest.mark.parametrize(("container", "chunk_seconds"), TRANSCODES)
    @pytest.mark.usefixtures("one_x264_thread")
    def test_sealed_transcode_is_byte_identical_to_the_two_stages(
        self, tmp_path: Path, copy_clip: Path, container: str, chunk_seconds: int
    ) -> None:
        """Given two transcodes of one asset version (the same keys, a new one every 3
        segments), when one seals its chunks and the other leaves them plain for the encrypt
        stage, then every chunk's encrypted segments, init segments and sizes are the same
        bytes, and every rendition is described alike: its CODECS, measured by ffprobe from its
        first segment, which sealing held back plain until then."""
        services, sealed = transcode_job(tmp_path, copy_clip, container, chunk_seconds)
        segment_and_encrypt(services, sealed)
        staged = twin_job(services, sealed)
        segment_and_encrypt(services, staged, seal=False)

        chunks = chunks_of(services, sealed)
        assert len(chunks) == (3 if chunk_seconds else 1)
        for chunk in chunks:
            assert "sealed" in produced_record(services, sealed, chunk)
            assert "sealed" not in produced_record(services, staged, chunk)
            assert produced_renditions(services, sealed, chunk) == \
                produced_renditions(services, staged, chunk)
            assert encrypted_output(services, sealed, chunk) == \
                encrypted_output(services, staged, chunk)
        entries = described(services, sealed)
        assert entries == described(services, staged)
        codecs = {entry.name: entry.codecs for entry in entries}
        video = codecs["360p"]
        assert video.startswith("avc1.")
        assert ("mp4a.40.2" in video) == (container == "ts")
        if container == "fmp4":
            assert codecs["audio0"] == "mp4a.40.2"
        assert len({key_index(seg.sequence, TRANSCODE_ROTATION)
                    for seg in entries[0].segments}) == 2

    @pytest.mark.parametrize(("container", "chunk_seconds"), TRANSCODES)
    def test_every_sealed_transcode_segment_is_ciphertext_and_decodes(
        self, tmp_path: Path, copy_clip: Path, container: str, chunk_seconds: int
    ) -> None:
        """Every media segment the transcode's attempts hold, the held-back first ones too, is
        ciphertext of the padded plain size; decrypted with its key and IV and joined across
        the chunks, the video decodes to every frame of the 6 s source (180 at 30 fps)."""
        services, spec = transcode_job(tmp_path, copy_clip, container, chunk_seconds)
        segment_and_encrypt(services, spec)

        video: list[bytes] = []
        for chunk in chunks_of(services, spec):
            record = produced_record(services, spec, chunk)
            for rendition, produced in record["produced"].items():
                prefix = layout.chunk_rendition_prefix(spec.job_id, chunk, record["attempt"],
                                                       rendition)
                sealed_sizes = record["sealed"][rendition]
                for seg, sealed_size in zip(produced["segments"], sealed_sizes, strict=True):
                    data = services.work.get_bytes(f"{prefix}/{seg['name']}")
                    assert len(data) == sealed_size == seg["size"] + 16 - seg["size"] % 16
                    assert not looks_plain(data, container), (chunk, rendition, seg["name"])
            video += decrypted(services, spec, chunk)["360p"]
        joined = tmp_path / f"joined.{container}"
        joined.write_bytes(b"".join(video))
        streams = ffprobe_streams(joined)
        assert [int(str(s["nb_read_frames"])) for s in streams if s["codec_type"] == "video"] \
            == [180]

    @pytest.mark.usefixtures("one_x264_thread")
    def test_a_redelivered_chunk_is_sealed_once_and_placed_as_before(
        self, tmp_path: Path, copy_clip: Path
    ) -> None:
        """Given a sealed, encrypted chunked transcode, when chunk c001's segment stage is
        delivered again, and then its encrypt stage twice, then c001 still names its first
        attempt and its encrypted segments are the same bytes as before: sealed once, linked
        by each encrypt, never encrypted a second time."""
        services, spec = transcode_job(tmp_path, copy_clip, "ts", TRANSCODE_CHUNK_SECONDS)
        segment_and_encrypt(services, spec)
        before = encrypted_output(services, spec, "c001")
        plain = decrypted(services, spec, "c001")
        first_attempt = produced_record(services, spec, "c001")["attempt"]

        packaging.segment(services, spec, "c001")
        packaging.encrypt(services, spec, "c001")
        packaging.encrypt(services, spec, "c001")

        assert produced_record(services, spec, "c001")["attempt"] == first_attempt
        assert encrypted_output(services, spec, "c001") == before
        assert decrypted(services, spec, "c001") == plain


def close_segment(rendition: Path, name: str, data: bytes) -> None:
    """A segment closed as ffmpeg closes one with temp_file: written aside, renamed into place
    when complete."""
    rendition.mkdir(exist_ok=True)
    (rendition / f"{name}.tmp").write_bytes(data)
    (rendition / f"{name}.tmp").rename(rendition / name)


class TestHeldBack:
    """The watcher leaves the first segment of a rendition it is told to hold plain (ffprobe
    measures it after ffmpeg exits), seals every other as it closes, and the held one when the
    stage says; a held segment never sealed is refused, as a segment the watcher missed."""

    def test_the_first_segment_stays_plain_until_sealed_after_the_others(
        self, tmp_path: Path
    ) -> None:
        sealer = SegmentSealer(lambda sequence: bytes([sequence]) * 16, poll_s=0.01)
        first = b"\x47" * 1000
        with sealer.sealing(tmp_path, ["360p", "audio0"], 4, hold=["360p"]):
            close_segment(tmp_path / "360p", "seg_00004.ts", first)
            close_segment(tmp_path / "360p", "seg_00005.ts", b"\x47" * 500)
            close_segment(tmp_path / "audio0", "seg_00004.ts", b"\x47" * 300)

        segments = [Segment(4, "seg_00004.ts", 1.0, 1000), Segment(5, "seg_00005.ts", 1.0, 500)]
        # After ffmpeg: the held one is as ffmpeg wrote it, the others sealed.
        assert (tmp_path / "360p" / "seg_00004.ts").read_bytes() == first
        assert (tmp_path / "360p" / "seg_00005.ts").stat().st_size == 512
        assert (tmp_path / "audio0" / "seg_00004.ts").stat().st_size == 304
        with pytest.raises(TransientError, match=r"seg_00004\.ts .* was not sealed"):
            sealer.sealed_sizes("360p", segments)

        sealer.seal_held()

        assert sealer.sealed_sizes("360p", segments) == [1008, 512]
        sealed = (tmp_path / "360p" / "seg_00004.ts").read_bytes()
        assert decrypt_bytes(sealed, bytes([4]) * 16, iv_for_sequence(4)) == first
        assert sealer.plain_sizes("360p") == {"seg_00004.ts": 1000, "seg_00005.ts": 500}

    def test_a_rendition_whose_only_segment_is_held_is_sealed_after(
        self, tmp_path: Path
    ) -> None:
        # A chunk of one segment: nothing else closes for the watcher to take with it.
        sealer = SegmentSealer(lambda sequence: bytes([sequence]) * 16, poll_s=0.01)
        first = b"\x47" * 700
        with sealer.sealing(tmp_path, ["360p"], 3, hold=["360p"]):
            close_segment(tmp_path / "360p", "seg_00003.ts", first)
        sealer.seal_held()

        assert sealer.sealed_sizes("360p", [Segment(3, "seg_00003.ts", 1.0, 700)]) == [704]
        sealed = (tmp_path / "360p" / "seg_00003.ts").read_bytes()
        assert decrypt_bytes(sealed, bytes([3]) * 16, iv_for_sequence(3)) == first

    def test_only_renditions_of_the_chunk_are_held(self, tmp_path: Path) -> None:
        sealer = SegmentSealer(lambda sequence: bytes(16))
        with pytest.raises(ValueError, match="720p"), \
                sealer.sealing(tmp_path, ["360p"], 0, hold=["720p"]):
            pass


class TestBatches:
    """A remux's watcher seals closed segments several at a time, in one lanes call; whatever
    the batches, each segment is its own plaintext encrypted under its own sequence's key and
    IV, a held one stays plain until sealed after, and the rest are sealed once ffmpeg exits."""

    def test_batches_wait_for_their_size_and_every_segment_is_sealed_under_its_own_key(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        calls: list[list[str]] = []  # each encryption call's files, as the watcher made them
        encrypt = sealing.encrypt_files_in_place

        def recorded(jobs: Sequence[SegmentFile], **kwargs: Any) -> list[int]:
            calls.append([f"{job.src.parent.name}/{job.src.name}" for job in jobs])
            return encrypt(jobs, **kwargs)

        monkeypatch.setattr(sealing, "encrypt_files_in_place", recorded)

        def key_for(sequence: int) -> bytes:
            return bytes([sequence]) * 16

        def plain(rendition: str, sequence: int) -> bytes:
            # Distinct per segment, and not a whole number of blocks: padding shows.
            return (f"{rendition}:{sequence}:".encode() * 400)[: 3000 + 7 * sequence]

        sealer = SegmentSealer(key_for, poll_s=0.005, batch=3)
        looks = 0
        claim = sealer._claim

        def counted(**kwargs: Any) -> Any:
            nonlocal looks
            looks += 1
            return claim(**kwargs)

        monkeypatch.setattr(sealer, "_claim", counted)
        renditions = ["1080p", "audio0"]
        first = 10
        with sealer.sealing(tmp_path, renditions, first, hold=["audio0"]):
            # Given two closed segments, fewer than a batch: the watcher leaves them plain,
            # however often it looks (two looks at least, counted, not timed).
            close_segment(tmp_path / "1080p", "seg_00010.ts", plain("1080p", 10))
            close_segment(tmp_path / "1080p", "seg_00011.ts", plain("1080p", 11))
            seen = looks
            for _ in range(1000):
                if looks >= seen + 2:
                    break
                time.sleep(0.01)
            assert looks >= seen + 2
            assert sealer.sealed["1080p"] == {}
            # When a third closes, the three are sealed together while "ffmpeg" still runs.
            close_segment(tmp_path / "1080p", "seg_00012.ts", plain("1080p", 12))
            for _ in range(500):
                if len(sealer.sealed["1080p"]) == 3:
                    break
                time.sleep(0.01)
            assert sorted(sealer.sealed["1080p"]) == [f"seg_000{n}.ts" for n in (10, 11, 12)]
            # in one call, the first: nothing was encrypted while fewer than a batch had closed.
            assert calls == [[f"1080p/seg_000{n}.ts" for n in (10, 11, 12)]]
            # Then more than a batch in two renditions, the first audio segment held back.
            for sequence in range(13, 23):
                close_segment(tmp_path / "1080p", f"seg_000{sequence}.ts", plain("1080p", sequence))
            for sequence in range(10, 15):
                close_segment(tmp_path / "audio0", f"seg_000{sequence}.ts",
                              plain("audio0", sequence))

        held = tmp_path / "audio0" / "seg_00010.ts"
        assert held.read_bytes() == plain("audio0", 10)
        assert all(len(call) <= aes.LANES for call in calls)
        assert not any("audio0/seg_00010.ts" in call for call in calls)
        sealer.seal_held()
        assert calls[-1] == ["audio0/seg_00010.ts"]
        for rendition, last in (("1080p", 22), ("audio0", 14)):
            segments = [Segment(n, f"seg_000{n}.ts", 1.0, len(plain(rendition, n)))
                        for n in range(first, last + 1)]
            sizes = sealer.sealed_sizes(rendition, segments)
            for seg, size in zip(segments, sizes, strict=True):
                sealed = (tmp_path / rendition / seg.name).read_bytes()
                assert len(sealed) == size == (seg.size // 16 + 1) * 16
                clear = decrypt_bytes(sealed, key_for(seg.sequence), iv_for_sequence(seg.sequence))
                assert clear == plain(rendition, seg.sequence)

    def test_a_batch_larger_than_the_lanes_is_refused(self) -> None:
        with pytest.raises(ValueError, match="lanes"):
            SegmentSealer(lambda sequence: bytes(16), batch=9)


class TestSealedFilesMustStaySealed:
    """Sealing trusts ffmpeg to show a segment under its name only once closed; if anything
    appended to a sealed file (a plaintext tail), or a half-written one was left, the stage
    refuses its output rather than publish it."""

    @staticmethod
    def _seal_two(tmp_path: Path, *, after: str) -> None:
        rendition = tmp_path / "360p"

        sealer = SegmentSealer(lambda sequence: bytes(16), poll_s=0.01)
        with pytest.raises(TransientError, match=after), \
                sealer.sealing(tmp_path, ["360p"], 0):
            close_segment(rendition, "seg_00000.ts", b"\x47" * 1000)
            close_segment(rendition, "seg_00001.ts", b"\x47" * 500)
            if after == "changed":
                # the watcher seals seg_00000 within its poll; then a plaintext tail lands
                for _ in range(200):
                    if "seg_00000.ts" in sealer.sealed["360p"]:
                        break
                    time.sleep(0.01)
                with (rendition / "seg_00000.ts").open("ab") as tail:
                    tail.write(b"\x47" * 188)
            else:
                (rendition / "seg_00002.ts.tmp").write_bytes(b"\x47" * 188)

    def test_a_plaintext_tail_after_sealing_fails_the_stage(self, tmp_path: Path) -> None:
        self._seal_two(tmp_path, after="changed")

    def test_a_half_written_segment_left_behind_fails_the_stage(self, tmp_path: Path) -> None:
        self._seal_two(tmp_path, after="unfinished")


class RemoteWork:
    """The work store as a fleet sees it: every file goes through put_file and get_file (no
    local paths, no links), each put recorded; backed by a local store so the bytes can be
    read back."""

    is_local = False

    def __init__(self, store: Any) -> None:
        self._store = store
        self.puts: list[str] = []
        self.url = store.url

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    def local_path(self, key: str) -> None:
        return None

    def local_dir(self, prefix: str) -> None:
        return None

    def copy_from(self, source: Any, source_key: str, key: str, **headers: Any) -> bool:
        return False

    def put_file(self, key: str, path: Path, **headers: Any) -> None:
        self.puts.append(key)
        self._store.put_file(key, path, **headers)


class TestSealedOnARemoteWorkStore:
    @pytest.mark.usefixtures("one_x264_thread")
    def test_segments_are_put_as_they_are_sealed_and_equal_the_two_stages(
        self, tmp_path: Path, copy_clip: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Given a remote work store, when a one-chunk transcode is sealed, then the watcher
        has put sealed segments before the stage's ffmpeg call returned (the stage, held
        inside that call until a put arrives, sees one), and what the work store ends up
        with is byte for byte the two stages' output."""
        local = services_in(tmp_path, 0)
        remote = RemoteWork(local.work)
        services = replace(local, work=remote)
        spec = probed_job(services, copy_clip, "ts", ladder="default",
                          segment_seconds=TRANSCODE_SEGMENT_SECONDS,
                          rotation=TRANSCODE_ROTATION)
        real_run = segment_module.run_ffmpeg
        during: list[str] = []

        def ffmpeg_then_wait_for_a_put(args: list[str], **options: Any) -> None:
            real_run(args, **options)
            deadline = time.monotonic() + 30
            while not remote.puts and time.monotonic() < deadline:
                time.sleep(0.01)
            during.extend(remote.puts)

        with monkeypatch.context() as patched:
            patched.setattr(segment_module, "run_ffmpeg", ffmpeg_then_wait_for_a_put)
            segment_and_encrypt(services, spec)

        assert any(key.endswith(".ts") for key in during), during
        staged = twin_job(local, spec)
        segment_and_encrypt(local, staged, seal=False)
        assert produced_renditions(local, spec) == produced_renditions(local, staged)
        assert encrypted_output(local, spec) == encrypted_output(local, staged)


class FreezesFfmpegAndFails(RemoteWork):
    """A remote work store whose first put made while the stage's ffmpeg runs fails, after
    freezing that ffmpeg (SIGSTOP): it cannot finish by itself, so the stage stops it or
    waits for it until its time limit."""

    def __init__(self, store: Any) -> None:
        super().__init__(store)
        self.frozen: int | None = None

    def put_file(self, key: str, path: Path, **headers: Any) -> None:
        if self.frozen is None:
            running = [pid for pid, state in ffmpeg_children().items() if state != "Z"]
            if running:
                self.frozen = running[0]
                os.kill(self.frozen, signal.SIGSTOP)
                raise TransientError("the work bucket answered 503")
        super().put_file(key, path, **headers)


class TestAFailedPutStopsTheChunk:
    def test_the_chunks_ffmpeg_is_stopped_and_the_stage_fails_with_the_puts_reason(
        self, tmp_path: Path, copy_clip: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Given a remote work store that fails a put while the chunk's ffmpeg runs (and
        freezes that ffmpeg, so it cannot end by itself), when the segment stage runs, then
        its ffmpeg is stopped then and there (the call that runs it raises the put's error),
        no ffmpeg is left, and the stage fails with that reason, its attempt never named.
        (Waiting for ffmpeg to exit instead would wait for the stage's time limit, made a
        minute here.)"""
        local = services_in(tmp_path, 0)
        remote = FreezesFfmpegAndFails(local.work)
        services = replace(local, work=remote)
        spec = probed_job(services, copy_clip, "ts", ladder="default",
                          segment_seconds=TRANSCODE_SEGMENT_SECONDS,
                          rotation=TRANSCODE_ROTATION)
        monkeypatch.setattr(packaging, "segment_timeout", lambda *args: 60.0)
        real_run = segment_module.run_ffmpeg
        ended: list[BaseException | None] = []

        def watched_run(args: list[str], **options: Any) -> None:
            try:
                real_run(args, **options)
            except BaseException as error:
                ended.append(error)
                raise
            ended.append(None)

        monkeypatch.setattr(segment_module, "run_ffmpeg", watched_run)
        with pytest.raises(TransientError, match="503"):
            packaging.segment(services, spec, CHUNK)

        assert remote.frozen is not None, "no segment was put while ffmpeg ran"
        assert len(ended) == 1 and isinstance(ended[0], TransientError)
        assert "503" in str(ended[0])
        assert not ffmpeg_children()
        assert services.jobs.outputs(spec.job_id) == {}


class FailingWork:
    """A store whose every put of a key ending in ``fails`` raises a transient error."""

    def __init__(self, fails: str) -> None:
        self.fails = fails
        self.put: list[str] = []

    def put_file(self, key: str, path: Path) -> None:
        if key.endswith(self.fails):
            raise TransientError("the work bucket answered 503")
        self.put.append(key)


class TestAttemptUploads:
    def test_each_file_is_put_once_and_a_failed_put_fails_the_stage(
        self, tmp_path: Path
    ) -> None:
        files = []
        for name in ("seg_00000.ts", "seg_00001.ts", "seg_00002.ts"):
            (tmp_path / name).write_bytes(b"x")
            files.append(("360p", tmp_path / name))
        store = FailingWork("seg_00002.ts")
        with AttemptUploads(store, lambda r, f: f"{r}/{f}") as uploads:
            uploads.put(*files[0])
            uploads.put(*files[0])
            with pytest.raises(TransientError, match="503"):
                uploads.finish(files)
        assert sorted(store.put) == ["360p/seg_00000.ts", "360p/seg_00001.ts"]

        store = FailingWork("nothing")
        with AttemptUploads(store, lambda r, f: f"{r}/{f}") as uploads:
            uploads.finish(files)
        assert sorted(store.put) == [f"360p/{name}" for name in
                                     ("seg_00000.ts", "seg_00001.ts", "seg_00002.ts")]

    def test_a_failed_put_is_raised_without_waiting_for_the_others(
        self, tmp_path: Path
    ) -> None:
        """A put that fails is raised by check() and finish() while another still runs (it
        is let go only afterwards), and nothing is put after it."""
        store = StuckWork(fails="seg_00001.ts", sticks="seg_00000.ts")
        files = [("360p", tmp_path / f"seg_0000{n}.ts") for n in range(3)]
        for _, path in files:
            path.write_bytes(b"x")
        with AttemptUploads(store, lambda r, f: f"{r}/{f}") as uploads:
            uploads.put(*files[0])
            assert store.stuck.wait(STUCK_BOUND_S)
            with pytest.raises(TransientError, match="503"):
                uploads.finish(files[:2])
            with pytest.raises(TransientError, match="503"):
                uploads.check()
            uploads.put(*files[2])
            assert not store.let_go.is_set()  # seg_00000.ts's put is still running
            store.let_go.set()
        assert store.put == ["360p/seg_00000.ts"]  # seg_00002.ts was never put
        assert not store.bound_passed

    def test_leaving_waits_for_running_puts_only_so_long(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A stage leaving on an error waits for a put still running at most
        SHUTDOWN_WAIT_S (made short here), then lets its error through, with a warning that
        the put was left running."""
        from structlog.testing import capture_logs

        monkeypatch.setattr(workuploads, "SHUTDOWN_WAIT_S", 0.2)
        store = StuckWork(fails="nothing", sticks="seg_00000.ts")
        path = tmp_path / "seg_00000.ts"
        path.write_bytes(b"x")

        class Died(Exception):
            pass

        try:
            with (
                capture_logs() as logs,
                pytest.raises(Died),
                AttemptUploads(store, lambda r, f: f"{r}/{f}") as uploads,
            ):
                uploads.put("360p", path)
                assert store.stuck.wait(STUCK_BOUND_S)
                raise Died
            assert not store.let_go.is_set()  # left while the put still ran
        finally:
            store.let_go.set()
        assert not store.bound_passed
        warnings = [e for e in logs if e["log_level"] == "warning"]
        assert [(e["running"], e["waited_s"]) for e in warnings] == [(1, 0.2)]


#: How long StuckWork's puts wait at most: a test that never lets them go fails, not hangs.
STUCK_BOUND_S = 60.0


class StuckWork:
    """A store whose put of a key ending in ``sticks`` runs until ``let_go`` is set (or
    STUCK_BOUND_S), and whose put of one ending in ``fails`` fails at once."""

    def __init__(self, *, fails: str, sticks: str) -> None:
        self.fails, self.sticks = fails, sticks
        self.stuck, self.let_go = threading.Event(), threading.Event()
        self.bound_passed = False
        self.put: list[str] = []

    def put_file(self, key: str, path: Path) -> None:
        if key.endswith(self.fails):
            raise TransientError("the work bucket answered 503")
        if key.endswith(self.sticks):
            self.stuck.set()
            if not self.let_go.wait(STUCK_BOUND_S):
                self.bound_passed = True
        self.put.append(key)
