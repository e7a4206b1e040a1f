"""A probe started ahead (the CLI starts ffprobe while it imports) gives the probe stage the
same answer as a probe run then, and only for the source it was started for."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline import media
from pipeline.errors import InvalidSource

from support import lavfi_clip


def test_prefetched_probe_is_collected_and_equals_a_fresh_one(copy_clip: Path) -> None:
    """The prefetched ffprobe is used once (then gone), and says what a fresh ffprobe says."""
    media.prefetch_probe(str(copy_clip))
    assert len(media._prefetched) == 1

    prefetched = media.probe(str(copy_clip))

    assert media._prefetched == {}
    assert prefetched == media.probe(str(copy_clip))


def test_a_prefetch_for_another_source_is_not_used(copy_clip: Path) -> None:
    """A prefetch of one file never answers the probe of another."""
    other = lavfi_clip("prefetch-other.mp4", seconds=1, size="320x240")
    media.prefetch_probe(str(other))

    info = media.probe(str(copy_clip))

    assert (info.video.width, info.video.height) == (640, 360)
    media._discard_prefetched()
    assert media._prefetched == {}


def test_a_prefetched_refusal_is_the_same_refusal(tmp_path: Path) -> None:
    """A source ffprobe cannot read is refused with the same reason, prefetched or not."""
    junk = tmp_path / "junk.mp4"
    junk.write_text("not a video")
    with pytest.raises(InvalidSource) as fresh:
        media.probe(str(junk))
    media.prefetch_probe(str(junk))
    with pytest.raises(InvalidSource) as prefetched:
        media.probe(str(junk))
    assert str(prefetched.value) == str(fresh.value)
