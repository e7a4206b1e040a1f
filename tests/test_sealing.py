"""Pipelined encryption (sealing): a copy remux's segments encrypted as ffmpeg closes them are
byte for byte what the two stages (remux, then encrypt) produce under the same keys, decode as
the source, and are never encrypted twice, whichever stage is delivered again."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

from pipeline import layout, packaging
from pipeline.crypto import iv_for_sequence
from pipeline.jobs import JobSpec, new_job_spec
from pipeline.playlists import key_index
from pipeline.services import Services, build_services
from pipeline.settings import load_settings

from support import decrypt_bytes

#: A remux is one chunk.
CHUNK = "c000"
#: The copy clip has a keyframe every second: 2 s segments make three of them, and a new key
#: every 2 segments makes two keys, so a wrong key or IV per segment would show.
SEGMENT_SECONDS = 2.0
ROTATION = 2


@pytest.fixture
def services(tmp_path: Path) -> Services:
    return build_services(load_settings({"HLSVAULT_DATA_DIR": str(tmp_path / "data")}))


def probed_job(services: Services, clip: Path) -> JobSpec:
    """A copy-ladder job of asset ``film``, recorded and probed."""
    spec = new_job_spec(str(clip), asset="film", ladder="copy",
                        segment_seconds=SEGMENT_SECONDS, key_rotation_segments=ROTATION)
    services.jobs.create(spec)
    packaging.probe_source(services, spec)
    return spec


def twin_job(services: Services, spec: JobSpec) -> JobSpec:
    """Another job of the same asset *and version*: it gets the same keys from the vault."""
    twin = new_job_spec(spec.source, asset=spec.asset, ladder="copy",
                        segment_seconds=SEGMENT_SECONDS, key_rotation_segments=ROTATION)
    twin = JobSpec.from_dict({**twin.to_dict(), "version": spec.version})
    services.jobs.create(twin)
    packaging.probe_source(services, twin)
    return twin


def produced_record(services: Services, spec: JobSpec) -> dict[str, object]:
    record: dict[str, object] = json.loads(
        services.work.get_bytes(layout.produced_key(spec.job_id, CHUNK))
    )
    return record


def encrypted_output(services: Services, spec: JobSpec) -> dict[str, bytes]:
    """Every encrypted segment the encrypt stage left, by name, and its recorded sizes."""
    record = produced_record(services, spec)
    [(rendition, produced)] = record["produced"].items()  # type: ignore[attr-defined]
    files = {
        seg["name"]: services.work.get_bytes(
            layout.encrypted_key(spec.job_id, rendition, seg["name"])
        )
        for seg in produced["segments"]
    }
    sizes = json.loads(services.work.get_bytes(layout.sizes_key(spec.job_id, CHUNK)))
    files["sizes.json"] = json.dumps(sizes).encode()
    return files


def decrypted(services: Services, spec: JobSpec) -> list[bytes]:
    record = produced_record(services, spec)
    [(rendition, produced)] = record["produced"].items()  # type: ignore[attr-defined]
    plain = []
    for seg in produced["segments"]:
        index = key_index(seg["sequence"], spec.key_rotation_segments)
        key = services.keys.get(spec.asset, spec.version, index)
        data = services.work.get_bytes(layout.encrypted_key(spec.job_id, rendition, seg["name"]))
        plain.append(decrypt_bytes(data, key, iv_for_sequence(seg["sequence"])))
    return plain


class TestSealedEqualsTwoStages:
    def test_sealed_output_is_byte_identical_to_todays_for_the_same_keys(
        self, services: Services, copy_clip: Path
    ) -> None:
        """Given two jobs of one asset version (so the same keys), when one seals during the
        remux and the other remuxes and then encrypts, then every encrypted segment, the sizes
        and the segment description are the same bytes."""
        sealed = probed_job(services, copy_clip)
        packaging.segment(services, sealed, CHUNK)
        packaging.encrypt(services, sealed, CHUNK)

        staged = twin_job(services, sealed)
        packaging.segment(services, staged, CHUNK, seal=False)
        packaging.encrypt(services, staged, CHUNK)

        assert "sealed" in produced_record(services, sealed)
        assert "sealed" not in produced_record(services, staged)
        assert produced_record(services, sealed)["produced"] == (
            produced_record(services, staged)["produced"]
        )
        sealed_files = encrypted_output(services, sealed)
        assert len(sealed_files) == 4  # three segments and the sizes
        assert sealed_files == encrypted_output(services, staged)
        assert len({services.keys.get("film", sealed.version, i) for i in (0, 1)}) == 2

    def test_sealed_segments_decrypt_to_a_stream_that_decodes(
        self, services: Services, copy_clip: Path, tmp_path: Path
    ) -> None:
        """What a player does: decrypt each segment with its key and IV, join them, decode.
        ffmpeg decodes every frame of the 6 s source (180 video frames at 30 fps)."""
        spec = probed_job(services, copy_clip)
        packaging.segment(services, spec, CHUNK)
        packaging.encrypt(services, spec, CHUNK)

        joined = tmp_path / "joined.ts"
        joined.write_bytes(b"".join(decrypted(services, spec)))
        done = subprocess.run(
            ["ffprobe", "-v", "error", "-count_frames", "-select_streams", "v:0",
             "-show_entries", "stream=nb_read_frames", "-of", "csv=p=0", str(joined)],
            capture_output=True, text=True, timeout=60, check=True,
        )
        # MPEG-TS lists the stream under its program too: the same count twice.
        assert {int(n) for n in done.stdout.split()} == {180}


class TestNeverEncryptedTwice:
    def test_redelivered_encrypt_stage_links_again_and_encrypts_nothing(
        self, services: Services, copy_clip: Path
    ) -> None:
        """Given a sealed chunk whose encrypt stage ran and then was killed half way through a
        second delivery (one placed segment gone), when encrypt is delivered again, then the
        output is the same bytes as after the first run: sealed segments are placed, not
        encrypted a second time."""
        spec = probed_job(services, copy_clip)
        packaging.segment(services, spec, CHUNK)
        packaging.encrypt(services, spec, CHUNK)
        first = encrypted_output(services, spec)
        plain = decrypted(services, spec)
        [rendition] = produced_record(services, spec)["produced"]  # type: ignore[misc]
        services.work.delete_prefix(layout.encrypted_key(spec.job_id, rendition, "seg_00001.ts"))

        packaging.encrypt(services, spec, CHUNK)
        packaging.encrypt(services, spec, CHUNK)

        assert encrypted_output(services, spec) == first
        assert decrypted(services, spec) == plain

    def test_redelivered_segment_stage_seals_a_new_attempt_once(
        self, services: Services, copy_clip: Path
    ) -> None:
        """Given a chunk sealed and encrypted, when its segment stage is delivered again (its
        worker died after the switch), then the new attempt is sealed once, and encrypt's
        output is the same bytes as before."""
        spec = probed_job(services, copy_clip)
        packaging.segment(services, spec, CHUNK)
        packaging.encrypt(services, spec, CHUNK)
        before = encrypted_output(services, spec)
        first_attempt = produced_record(services, spec)["attempt"]

        packaging.segment(services, spec, CHUNK)
        packaging.encrypt(services, spec, CHUNK)

        assert produced_record(services, spec)["attempt"] != first_attempt
        assert encrypted_output(services, spec) == before

    def test_a_sealed_segment_is_not_plaintext(self, services: Services, copy_clip: Path) -> None:
        """The sealed files in the attempt are ciphertext (no MPEG-TS sync byte pattern), and
        the plain sizes recorded for the playlist are those before sealing."""
        spec = probed_job(services, copy_clip)
        packaging.segment(services, spec, CHUNK)
        record = produced_record(services, spec)
        [(rendition, produced)] = record["produced"].items()  # type: ignore[attr-defined]
        prefix = layout.chunk_rendition_prefix(spec.job_id, CHUNK, str(record["attempt"]),
                                               rendition)
        for seg, sealed_size in zip(produced["segments"], record["sealed"][rendition],  # type: ignore[index]
                                    strict=True):
            data = services.work.get_bytes(f"{prefix}/{seg['name']}")
            assert len(data) == sealed_size == seg["size"] + 16 - seg["size"] % 16
            assert data[0:1] != b"\x47" or data[188:189] != b"\x47"


class TestSealedFilesMustStaySealed:
    """Sealing trusts ffmpeg to show a segment under its name only once closed; if anything
    appended to a sealed file (a plaintext tail), or a half-written one was left, the stage
    refuses its output rather than publish it."""

    @staticmethod
    def _seal_two(tmp_path: Path, *, after: str) -> None:
        from pipeline.errors import TransientError
        from pipeline.sealing import SegmentSealer

        sealer = SegmentSealer(lambda sequence: bytes(16), poll_s=0.01)
        with pytest.raises(TransientError, match=after), sealer.sealing(tmp_path, 0):
            (tmp_path / "seg_00000.ts").write_bytes(b"\x47" * 1000)
            (tmp_path / "seg_00001.ts").write_bytes(b"\x47" * 500)
            if after == "changed":
                # the watcher seals seg_00000 within its poll; then a plaintext tail lands
                for _ in range(200):
                    if "seg_00000.ts" in sealer.sealed:
                        break
                    time.sleep(0.01)
                with (tmp_path / "seg_00000.ts").open("ab") as tail:
                    tail.write(b"\x47" * 188)
            else:
                (tmp_path / "seg_00002.ts.tmp").write_bytes(b"\x47" * 188)

    def test_a_plaintext_tail_after_sealing_fails_the_stage(self, tmp_path: Path) -> None:
        self._seal_two(tmp_path, after="changed")

    def test_a_half_written_segment_left_behind_fails_the_stage(self, tmp_path: Path) -> None:
        self._seal_two(tmp_path, after="unfinished")
