"""Bad input: a clear one-line reason, a failed job record, and nothing published."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from support import Hlsvault, generate_media, lavfi_clip


def empty_file(tmp: Path, _: Path) -> Path:
    path = tmp / "empty.mp4"
    path.write_bytes(b"")
    return path


def text_file(tmp: Path, _: Path) -> Path:
    path = tmp / "notes.mp4"
    path.write_text("this is a shopping list, not a video\n" * 50)
    return path


def truncated_mp4(tmp: Path, clip: Path) -> Path:
    # ffmpeg writes the moov atom last: cut in half, the file has media data but no index.
    data = clip.read_bytes()
    path = tmp / "truncated.mp4"
    path.write_bytes(data[: len(data) // 2])
    return path


def audio_only(tmp: Path, _: Path) -> Path:
    return lavfi_clip("audio-only.m4a", seconds=2, audio=True, extra=["-vn"])


def still_image(tmp: Path, _: Path) -> Path:
    # A poster frame uploaded under the video's name: ffmpeg reads it as one PNG picture.
    png = generate_media(
        "poster.png", ["-f", "lavfi", "-i", "testsrc2=size=64x64", "-frames:v", "1"]
    )
    path = tmp / "poster.mp4"
    path.write_bytes(png.read_bytes())
    return path


def missing_path(tmp: Path, _: Path) -> Path:
    return tmp / "does-not-exist.mp4"


def directory(tmp: Path, _: Path) -> Path:
    path = tmp / "a-directory.mp4"
    path.mkdir()
    return path


CASES: list[tuple[Callable[[Path, Path], Path], str]] = [
    (empty_file, "is empty (0 bytes)"),
    (text_file, "not a media file"),
    (truncated_mp4, "truncated"),
    (audio_only, "has no video stream"),
    (still_image, "is an image"),
    (missing_path, "source not found"),
    (directory, "is a directory"),
]


@pytest.mark.parametrize(("make", "reason"), CASES, ids=[case[0].__name__ for case in CASES])
def test_bad_source_fails_cleanly(
    hlsvault: Hlsvault, copy_clip: Path, tmp_path: Path,
    make: Callable[[Path, Path], Path], reason: str,
) -> None:
    """The CLI exits 1 (the job failed) with one line naming the problem, the job record says
    failed with the same reason, and neither the origin nor the catalog holds anything."""
    source = make(tmp_path, copy_clip)

    done = hlsvault.package(str(source), "--asset", "bad", "--ladder", "copy", "--json")

    assert done.returncode == 1
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("hlsvault: job ")
    assert reason in lines[0]
    assert "Traceback" not in done.stderr
    summary = json.loads(done.stdout)
    assert summary["status"] == "failed" and reason in summary["error"]

    record = hlsvault.run("status", summary["job_id"], "--json")
    assert record.returncode == 1
    job = json.loads(record.stdout)
    assert job["status"] == "failed"
    assert job["failed_stage"] == "probe"
    assert reason in job["error"]

    published = [p for p in hlsvault.origin.rglob("*") if p.is_file()]
    assert published == []
    assert not (hlsvault.vault / "catalog" / "bad").exists()
    assert not (hlsvault.vault / "keys" / "bad").exists()


def test_copy_ladder_refuses_a_source_it_cannot_remux(hlsvault: Hlsvault) -> None:
    """An MPEG-4 Part 2 source under --ladder copy says why and suggests the default ladder."""
    source = lavfi_clip("mpeg4.mp4", seconds=2, vcodec="mpeg4", audio=False)

    done = hlsvault.package(str(source), "--asset", "mpeg4", "--ladder", "copy")

    assert done.returncode == 1
    assert "not H.264" in done.stderr and "--ladder default" in done.stderr
    assert [p for p in hlsvault.origin.rglob("*") if p.is_file()] == []


def test_invalid_asset_id_is_refused_before_any_work(hlsvault: Hlsvault, copy_clip: Path) -> None:
    """An asset id that could escape a URL path is refused with the rule it broke."""
    done = hlsvault.package(str(copy_clip), "--asset", "../escape")

    assert done.returncode == 2
    assert "invalid asset id" in done.stderr
    assert not hlsvault.origin.exists() or not any(hlsvault.origin.rglob("*.ts"))
