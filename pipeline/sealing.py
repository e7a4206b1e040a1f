"""Sealing: a remux's segments encrypted one by one as ffmpeg closes them, instead of after.

A copy remux is bound by the disk, encryption by one core; done one after the other they add
up, done side by side the encryption hides behind the remux but for its last segment. ffmpeg
writes each segment under a temporary name and renames it when it is complete
(``-hls_flags temp_file``), so a segment that appears under its final name is closed and will
not be written again. A watcher thread encrypts each one in place (:func:`encrypt_in_place`,
the GIL released while it runs) with the key and IV of its media sequence number, the rule the
encrypt stage uses (:func:`~pipeline.playlists.key_index`, :func:`iv_for_sequence`): the bytes
are exactly those the encrypt stage would have written.

The segment stage then records the sealed sizes in its chunk's ``produced.json``, in the same
atomic write that names the attempt. That record, and nothing inferred from a file, is what
tells the encrypt stage that a chunk is sealed: it then links the segments into place instead
of encrypting them again, however often either stage is delivered (a redelivered segment stage
seals a new attempt of its own; an attempt that died half way is never named).

Only a remux into MPEG-TS with the audio muxed in is sealed (:func:`can_seal`); other shapes
keep the two stages.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from . import layout
from .crypto import encrypt_in_place, iv_for_sequence
from .errors import TransientError
from .plan import Rendition
from .segment import Segment

#: How often the watcher looks for the next closed segment: a remux closes one every few tens
#: of milliseconds at most, and each look is one stat(2).
POLL_S = 0.005
#: How long the watcher may take to finish after ffmpeg exits: it has at most the segments
#: ffmpeg closed last to encrypt, at hundreds of MB/s.
JOIN_TIMEOUT_S = 300.0

KeyFor = Callable[[int], bytes]


def can_seal(renditions: Sequence[Rendition], container: str, muxed_audio: bool) -> bool:
    """Whether a segment stage can seal its output: one rendition remuxed into MPEG-TS with
    its audio muxed in (the copy ladder). A transcode's renditions are encrypted by the encrypt
    stage, which runs while the next chunk transcodes; fMP4 (an init segment beside the
    ``.m4s``) and audio in renditions of its own keep that two-stage path too."""
    return (len(renditions) == 1 and renditions[0].copy and container == "ts"
            and muxed_audio)


class SegmentSealer:
    """Encrypts the segments ffmpeg closes in one rendition directory, in media sequence order.

    ``key_for(sequence)`` gives the content key of a sequence number; it is called from the
    watcher thread, one segment at a time.
    """

    def __init__(self, key_for: KeyFor, *, pattern: str = layout.segment_pattern("ts"),
                 poll_s: float = POLL_S) -> None:
        self._key_for = key_for
        self._pattern = pattern
        self._poll_s = poll_s
        #: By segment name: the sequence number it was sealed under, plain and sealed sizes.
        self.sealed: dict[str, tuple[int, int, int]] = {}

    @contextmanager
    def sealing(self, rendition_dir: Path, first_sequence: int) -> Iterator[None]:
        """Seal segments as they appear while the body (ffmpeg) runs, and the last ones after
        it returns; an error of the watcher is raised when the body returns."""
        finished = threading.Event()
        errors: list[BaseException] = []

        def watch() -> None:
            sequence = first_sequence
            try:
                while True:
                    path = rendition_dir / (self._pattern % sequence)
                    if path.exists():
                        self._seal(path, sequence)
                        sequence += 1
                    elif finished.is_set():
                        # ffmpeg has exited, so every segment it made is under its final name;
                        # looked for once more, as this one may have appeared since the check.
                        if not path.exists():
                            return
                    else:
                        finished.wait(self._poll_s)
            except BaseException as error:  # handed to the stage's thread below
                errors.append(error)

        watcher = threading.Thread(target=watch, name="segment-sealer", daemon=True)
        watcher.start()
        try:
            yield
        finally:
            finished.set()
            watcher.join(JOIN_TIMEOUT_S)
        if watcher.is_alive():
            raise TransientError(f"sealing did not finish within {JOIN_TIMEOUT_S:.0f} s")
        if errors:
            raise errors[0]
        self._check_untouched(rendition_dir)

    def _check_untouched(self, rendition_dir: Path) -> None:
        """A segment ffmpeg kept writing after it appeared would hold a plaintext tail: every
        sealed file must be exactly its PKCS#7-padded ciphertext, and no half-written segment
        (``*.tmp``) may be left beside them."""
        for name, (_, plain, sealed) in self.sealed.items():
            if sealed != (plain // 16 + 1) * 16 or (rendition_dir / name).stat().st_size != sealed:
                raise TransientError(
                    f"segment {name} changed after it was sealed; the stage will be retried"
                )
        leftovers = sorted(p.name for p in rendition_dir.glob("*.tmp"))
        if leftovers:
            raise TransientError(
                f"ffmpeg left unfinished segments ({', '.join(leftovers[:3])}); the stage will "
                "be retried"
            )

    def _seal(self, path: Path, sequence: int) -> None:
        plain = path.stat().st_size
        sealed = encrypt_in_place(path, self._key_for(sequence), iv_for_sequence(sequence))
        self.sealed[path.name] = (sequence, plain, sealed)

    def plain_sizes(self) -> dict[str, int]:
        """Each sealed segment's size before it was sealed: what the playlist parser would have
        measured on the plain file."""
        return {name: plain for name, (_, plain, _) in self.sealed.items()}

    def sealed_sizes(self, segments: Sequence[Segment]) -> list[int]:
        """The ciphertext size of each of ``segments``, checking that every one was sealed
        under its own sequence number (ffmpeg's playlist and the watcher agree)."""
        sizes = []
        for seg in segments:
            found = self.sealed.get(seg.name)
            if found is None or found[0] != seg.sequence:
                raise TransientError(
                    f"segment {seg.name} (sequence {seg.sequence}) was not sealed while ffmpeg "
                    "wrote it; the stage will be retried"
                )
            sizes.append(found[2])
        if len(self.sealed) != len(segments):
            raise TransientError(
                f"{len(self.sealed)} segments were sealed where ffmpeg listed {len(segments)}"
            )
        return sizes
