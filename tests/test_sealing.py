"""Pipelined encryption (sealing): a copy remux's segments encrypted as ffmpeg closes them are
byte for byte what the two stages (remux, then encrypt) produce under the same keys, decode as
the source, and are never encrypted twice, whichever stage is delivered again. Every shape of
the copy ladder is sealed: MPEG-TS or fMP4 (its init segment left clear), audio muxed in or as
renditions of its own."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from pipeline import layout, packaging
from pipeline.crypto import iv_for_sequence
from pipeline.jobs import JobSpec, new_job_spec
from pipeline.media import probe
from pipeline.plan import plan_audio, plan_renditions
from pipeline.playlists import key_index
from pipeline.sealing import can_seal
from pipeline.services import Services, build_services
from pipeline.settings import load_settings

from support import decrypt_bytes

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


@pytest.fixture
def services(tmp_path: Path) -> Services:
    return build_services(load_settings({"HLSVAULT_DATA_DIR": str(tmp_path / "data")}))


def probed_job(services: Services, clip: Path, container: str) -> JobSpec:
    """A copy-ladder job of asset ``film``, recorded and probed."""
    spec = new_job_spec(str(clip), asset="film", ladder="copy", container=container,
                        segment_seconds=SEGMENT_SECONDS, key_rotation_segments=ROTATION)
    services.jobs.create(spec)
    packaging.probe_source(services, spec)
    return spec


def twin_job(services: Services, spec: JobSpec) -> JobSpec:
    """Another job of the same asset *and version*: it gets the same keys from the vault."""
    twin = new_job_spec(spec.source, asset=spec.asset, ladder="copy", container=spec.container,
                        segment_seconds=SEGMENT_SECONDS, key_rotation_segments=ROTATION)
    twin = JobSpec.from_dict({**twin.to_dict(), "version": spec.version})
    services.jobs.create(twin)
    packaging.probe_source(services, twin)
    return twin


def produced_record(services: Services, spec: JobSpec) -> dict[str, Any]:
    name = layout.produced_output(CHUNK)
    record: dict[str, Any] = services.jobs.outputs(spec.job_id, [name])[name]
    return record


def produced_renditions(services: Services, spec: JobSpec) -> dict[str, dict[str, Any]]:
    produced: dict[str, dict[str, Any]] = produced_record(services, spec)["produced"]
    return produced


def encrypted_output(services: Services, spec: JobSpec) -> dict[str, bytes]:
    """Every file the encrypt stage left (media segments, init segments), by rendition and
    name, and the recorded sizes."""
    files = {}
    for rendition, produced in produced_renditions(services, spec).items():
        names = [seg["name"] for seg in produced["segments"]]
        if produced["init"] is not None:
            names.append(str(produced["init"]))
        for name in names:
            files[f"{rendition}/{name}"] = services.work.get_bytes(
                layout.encrypted_key(spec.job_id, rendition, name)
            )
    sizes = services.jobs.outputs(spec.job_id)[layout.sizes_output(CHUNK)]
    files["sizes.json"] = json.dumps(sizes).encode()
    return files


def decrypted(services: Services, spec: JobSpec) -> dict[str, list[bytes]]:
    """Each rendition's media segments, decrypted as a player does (init segments as they are,
    first), by rendition."""
    plain: dict[str, list[bytes]] = {}
    for rendition, produced in produced_renditions(services, spec).items():
        parts = plain.setdefault(rendition, [])
        if produced["init"] is not None:
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
    def test_redelivered_segment_stage_seals_a_new_attempt_once(
        self, services: Services, copy_clip: Path, container: str
    ) -> None:
        """Given a chunk sealed and encrypted, when its segment stage is delivered again (its
        worker died after the switch), then the new attempt is sealed once, and encrypt's
        output is the same bytes as before."""
        spec = probed_job(services, copy_clip, container)
        packaging.segment(services, spec, CHUNK)
        packaging.encrypt(services, spec, CHUNK)
        before = encrypted_output(services, spec)
        first_attempt = produced_record(services, spec)["attempt"]

        packaging.segment(services, spec, CHUNK)
        packaging.encrypt(services, spec, CHUNK)

        assert produced_record(services, spec)["attempt"] != first_attempt
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
        # The control: a plain attempt's segments do look plain.
        packaging.segment(services, spec, CHUNK, seal=False)
        record = produced_record(services, spec)
        prefix = layout.chunk_rendition_prefix(spec.job_id, CHUNK, str(record["attempt"]),
                                               "360p")
        first = layout.segment_pattern(container) % 0
        assert looks_plain(services.work.get_bytes(f"{prefix}/{first}"), container)


class TestWhatIsSealed:
    def test_every_copy_shape_and_no_transcode(self, copy_clip: Path) -> None:
        """The copy ladder is sealed with its audio muxed or as copied renditions; a transcode
        ladder, or an encoded audio rendition, keeps the two stages."""
        info = probe(str(copy_clip))
        copy = plan_renditions(info, "copy", SEGMENT_SECONDS)
        ladder = plan_renditions(info, "default", SEGMENT_SECONDS)
        assert can_seal(copy, [])
        assert can_seal(copy, plan_audio(info, "copy"))
        assert not can_seal(copy, plan_audio(info, "default"))
        assert not can_seal(ladder, [])


class TestSealedFilesMustStaySealed:
    """Sealing trusts ffmpeg to show a segment under its name only once closed; if anything
    appended to a sealed file (a plaintext tail), or a half-written one was left, the stage
    refuses its output rather than publish it."""

    @staticmethod
    def _seal_two(tmp_path: Path, *, after: str) -> None:
        from pipeline.errors import TransientError
        from pipeline.sealing import SegmentSealer

        rendition = tmp_path / "360p"
        rendition.mkdir()

        def close(name: str, data: bytes) -> None:
            # As ffmpeg does with temp_file: written aside, renamed into place when complete.
            (rendition / f"{name}.tmp").write_bytes(data)
            (rendition / f"{name}.tmp").rename(rendition / name)

        sealer = SegmentSealer(lambda sequence: bytes(16), poll_s=0.01)
        with pytest.raises(TransientError, match=after), \
                sealer.sealing(tmp_path, ["360p"], 0):
            close("seg_00000.ts", b"\x47" * 1000)
            close("seg_00001.ts", b"\x47" * 500)
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
