"""The head start (:mod:`pipeline.headstart`): a copy packaging's ffmpeg started before the
probe is taken over by the segment stage only when it runs the command the stage would run,
gives the same segments, and is never made for a source whose first bytes name no
allow-listed container; one the probe refuses is stopped, and nothing of it is left."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from pipeline import headstart, layout, packaging
from pipeline.crypto import iv_for_sequence
from pipeline.jobs import JobSpec, new_job_spec
from pipeline.services import Services, build_services
from pipeline.settings import load_settings

from support import Hlsvault, decrypt_bytes, lavfi_clip

CHUNK = "c000"
#: The start of an MP4 (an ``ftyp`` box) followed by no MP4 at all: the sniff starts a remux,
#: and the probe refuses the file.
FAKE_MP4 = b"\x00\x00\x00\x18ftypisom\x00\x00\x02\x00isomiso2" + b"not a movie, " * 400


@pytest.fixture
def services(tmp_path: Path) -> Services:
    return build_services(load_settings({"HLSVAULT_DATA_DIR": str(tmp_path / "data")}))


def _job(services: Services, source: Path, asset: str) -> JobSpec:
    spec = new_job_spec(str(source), asset=asset, ladder="copy")
    services.jobs.create(spec)
    return spec


def _package_stages(services: Services, spec: JobSpec) -> list[bytes]:
    """Probe, segment (sealed) and encrypt the job; its segments' plaintext, in order."""
    [rendition] = packaging.probe_source(services, spec).renditions
    packaging.segment(services, spec, CHUNK)
    packaging.encrypt(services, spec, CHUNK)
    produced = services.jobs.outputs(spec.job_id)[layout.produced_output(CHUNK)]
    key = services.keys.get(spec.asset, spec.version, 0)
    return [
        decrypt_bytes(
            services.work.get_bytes(layout.encrypted_key(spec.job_id, rendition.name,
                                                         seg["name"])),
            key, iv_for_sequence(seg["sequence"]),
        )
        for seg in produced["produced"][rendition.name]["segments"]
    ]


class TestSniff:
    def test_containers_are_named_and_text_is_not(self, copy_clip: Path, tmp_path: Path) -> None:
        """An MP4 is read as mov; an HLS playlist, a concat list, a directory and a FIFO
        (which would block an open) get no demuxer, so no head start."""
        playlist = tmp_path / "film.mp4"
        playlist.write_text("#EXTM3U\n#EXTINF:6,\nhttp://169.254.169.254/latest\n")
        concat = tmp_path / "list.mp4"
        concat.write_text("ffconcat version 1.0\nfile /etc/passwd\n")
        fifo = tmp_path / "pipe.mp4"
        os.mkfifo(fifo)

        assert headstart.sniff_demuxer(copy_clip) == "mov"
        assert [headstart.sniff_demuxer(p) for p in (playlist, concat, tmp_path, fifo)] == \
            [None] * 4


class TestAdopted:
    def test_the_segment_stage_takes_it_over_and_cuts_the_same_segments(
        self, services: Services, copy_clip: Path
    ) -> None:
        """Given a head start for a copy job, when the stages run, then the segment stage's
        attempt is the head start's (its ffmpeg was followed, not started again) and every
        segment decrypts to exactly the bytes of a job packaged without a head start."""
        spec = _job(services, copy_clip, "ahead")
        head = headstart.start(spec, services.work)
        assert head is not None and "-f" in head.args and "mov" in head.args

        ahead = _package_stages(services, spec)

        assert head.adopted and not head.stopped
        produced = services.jobs.outputs(spec.job_id)[layout.produced_output(CHUNK)]
        assert produced["attempt"] == head.attempt
        assert ahead == _package_stages(services, _job(services, copy_clip, "plain"))

    def test_another_command_is_stopped_and_the_stage_runs_its_own(
        self, services: Services
    ) -> None:
        """Given a head start for a source without audio (the head start maps audio), when
        the segment stage plans its command, then the head start is stopped and its files
        removed, and the stage cuts the source with its own ffmpeg (into a directory of its
        own, not the head start's)."""
        silent = lavfi_clip("headstart-silent.mp4", seconds=3, audio=False)
        spec = _job(services, silent, "silent")
        head = headstart.start(spec, services.work)
        assert head is not None

        segments = _package_stages(services, spec)

        assert head.stopped and not head.adopted and head.process.poll() is not None
        assert not (head.out_dir / headstart.HEAD_DIR).exists()
        [rendition] = services.jobs.outputs(spec.job_id)[layout.produced_output(CHUNK)][
            "produced"]
        assert not (head.out_dir / rendition).is_symlink()
        assert segments and all(seg[:1] == b"\x47" for seg in segments)  # MPEG-TS sync


def _ffmpeg_log(hlsvault: Hlsvault, tmp_path: Path) -> Path:
    """Put an ``ffmpeg`` first on the CLI's PATH that notes its arguments, then is ffmpeg."""
    real = shutil.which("ffmpeg")
    assert real is not None
    shims = tmp_path / "shims"
    shims.mkdir()
    log = tmp_path / "ffmpeg.log"
    shim = shims / "ffmpeg"
    shim.write_text(f'#!/bin/bash\necho "$*" >> "{log}"\nexec "{real}" "$@"\n')
    shim.chmod(0o755)
    hlsvault.env["PATH"] = f"{shims}{os.pathsep}{hlsvault.env.get('PATH', '')}"
    return log


def _leftovers(hlsvault: Hlsvault) -> list[str]:
    """Every file or link left in the work store and the origin."""
    return sorted(str(p.relative_to(hlsvault.data_dir))
                  for store in ("work", "origin") if (hlsvault.data_dir / store).exists()
                  for p in (hlsvault.data_dir / store).rglob("*") if not p.is_dir())


class TestThroughTheCli:
    def test_a_copy_package_runs_one_ffmpeg_started_ahead(
        self, hlsvault: Hlsvault, copy_clip: Path, tmp_path: Path
    ) -> None:
        """`hlsvault package --ladder copy` of an MP4 runs exactly one ffmpeg, the one it
        started ahead (into the head directory, the demuxer forced), and publishes."""
        log = _ffmpeg_log(hlsvault, tmp_path)

        done = hlsvault.package(str(copy_clip), "--ladder", "copy", "--json")

        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["status"] == "succeeded"
        [command] = log.read_text().splitlines()
        assert f"/{headstart.HEAD_DIR}/" in command and "-f mov" in command
        assert "-protocol_whitelist file" in command

    def test_a_source_the_probe_refuses_is_stopped_and_leaves_nothing(
        self, hlsvault: Hlsvault, tmp_path: Path
    ) -> None:
        """A file that starts like an MP4 gets a head start; the probe refuses it with the
        message it always gave, the job fails at the probe, and no segment, directory or
        published file of it is left."""
        log = _ffmpeg_log(hlsvault, tmp_path)
        fake = tmp_path / "fake.mp4"
        fake.write_bytes(FAKE_MP4)

        done = hlsvault.package(str(fake), "--ladder", "copy")

        assert done.returncode == 1
        assert "at probe" in done.stderr and "not a media file ffprobe can read" in done.stderr
        assert "-f mov" in log.read_text()  # it was started ahead, and then stopped
        assert _leftovers(hlsvault) == []

    @pytest.mark.parametrize("content", [
        b"",
        b"\x47\x00\x11",
        (b"G" + b"not a transport stream, " * 8)[:188] * 200,
        b"\x1a\x45\xdf\xa3" + b"\xff junk after the EBML magic " * 500,
        b"\x00\x00\x00\x18ftyp" + b"\x00" * 1_000_000,
    ], ids=["empty", "three-bytes", "text-with-ts-sync-bytes", "ebml-then-junk",
            "ftyp-then-a-megabyte-of-zeros"])
    def test_garbage_that_may_sniff_as_a_container_is_refused_and_leaves_nothing(
        self, hlsvault: Hlsvault, tmp_path: Path, content: bytes
    ) -> None:
        """Files too short to sniff, or whose first bytes imitate MPEG-TS, Matroska or MP4
        and hold junk after: the job is refused with a message (no traceback), whether or not
        a head start was made, and no segment or published file is left."""
        source = tmp_path / "upload.mp4"
        source.write_bytes(content)

        done = hlsvault.package(str(source), "--ladder", "copy")

        assert done.returncode in (1, 2), done.stderr
        assert done.stderr.startswith("hlsvault: ") and "Traceback" not in done.stderr
        assert _leftovers(hlsvault) == []

    def test_a_playlist_source_gets_no_head_start(
        self, hlsvault: Hlsvault, tmp_path: Path
    ) -> None:
        """An HLS playlist named like a video starts no ffmpeg at all: the probe refuses it,
        as before, and nothing is written."""
        log = _ffmpeg_log(hlsvault, tmp_path)
        playlist = tmp_path / "film.mp4"
        playlist.write_text("#EXTM3U\n#EXT-X-TARGETDURATION:6\n#EXTINF:6,\n"
                            "http://169.254.169.254/latest/meta-data/\n#EXT-X-ENDLIST\n")

        done = hlsvault.package(str(playlist), "--ladder", "copy")

        assert done.returncode == 1 and "is an HLS playlist" in done.stderr
        assert not log.exists()
        assert _leftovers(hlsvault) == []
