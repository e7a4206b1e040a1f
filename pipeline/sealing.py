"""Sealing: a chunk's segments encrypted as ffmpeg closes them, instead of after.

Encrypting after ffmpeg (the encrypt stage) costs a pass over every byte and, in a fleet, every
plain segment's trip to the work bucket and back; done beside ffmpeg, the encryption hides
behind the remux or the encode but for its last segments, and no plain segment ever goes
to a remote work store (on a local one, ffmpeg's output is plain until sealed in place).
ffmpeg writes each segment under a temporary name and renames it when it is complete
(``-hls_flags temp_file``), so a segment that appears under its final name is closed and will
not be written again. A watcher thread encrypts them in place (:func:`encrypt_files_in_place`,
the GIL released while it runs; a remux's :data:`REMUX_BATCH` at a time in one lanes call, an
encode's each as it closes) with the key and IV of its media sequence number, the rule the
encrypt stage uses (:func:`~pipeline.playlists.key_index`, :func:`iv_for_sequence`): the bytes
are exactly those the encrypt stage would have written. When ffmpeg exits, the stage's own
thread joins the watcher on the segments still left, so the tail takes two cores.

Every shape the segment stage makes is sealed: a copy remux or a transcode (chunked or one
chunk), MPEG-TS (``.ts``) or fMP4 (``.m4s``, each encrypted whole; the init segment beside
them stays clear, as the encrypt stage leaves it), with the audio muxed in (copied from the
job's audio pieces, or encoded by the chunk's ffmpeg) or cut as renditions of its own by the
same ffmpeg. The watcher follows every rendition directory of the chunk, each in its own
media sequence.

An encoded rendition's CODECS (profile, level, audio object type, channels) is measured by
ffprobe from its first segment once ffmpeg has exited (:mod:`pipeline.segment`), so that one
segment must still be plain then. The watcher *holds back* the first segment of each rendition
named ``hold`` and seals every other as it closes; the stage seals the held ones
(:meth:`SegmentSealer.seal_held`) once they are measured, and the same checks cover them: each
sealed file exactly its PKCS#7-padded size, each segment of ffmpeg's playlist sealed under its
own sequence number (:meth:`SegmentSealer.sealed_sizes` refuses a held segment never sealed).

The segment stage then records the sealed sizes in its chunk's ``produced`` output, in the same
claim that names the attempt (one atomic step; the first delivery's claim wins). That record,
and nothing inferred from a file, is what tells the encrypt stage that a chunk is sealed: it
then links the segments (and init segments) into place instead of encrypting them again,
however often either stage is delivered (a segment delivery running beside another seals an
attempt of its own, discarded unless it claims the output first; a delivery finding the output
seals nothing; an attempt that died half way is never named).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

from . import aes, layout
from .crypto import SegmentFile, encrypt_files_in_place, iv_for_sequence
from .errors import TransientError
from .segment import Segment

#: How often the watcher looks for the next closed segment: a remux closes one every few tens
#: of milliseconds at most, and each look is one stat(2) per rendition.
POLL_S = 0.005
#: The same for a transcode, which closes a segment per rendition every few hundred
#: milliseconds at most: fewer looks, less of the GIL and a core taken from the encoders, and
#: the segments ffmpeg closes last are sealed by the stage's thread without waiting for a look.
ENCODE_POLL_S = 0.05
#: Closed segments a remux's watcher waits for before it seals them, in one call whose lanes
#: run their CBC chains side by side (:mod:`pipeline.aes`): a sealed remux of the 236 MB bench
#: clip took ~0.15 CPU-s less than one segment at a time, of ~0.95 (docs/benchmarks.md, branch
#: pkglean). Four rather than all eight lanes: as cheap, and ffmpeg's exit leaves at most
#: three segments plus one batch to seal on the clock.
REMUX_BATCH = 4
#: How long the watcher may take to finish after ffmpeg exits: it has at most the segments
#: ffmpeg closed last to encrypt, at hundreds of MB/s.
JOIN_TIMEOUT_S = 300.0

KeyFor = Callable[[int], bytes]


class _Closed(NamedTuple):
    """A segment ffmpeg has closed: its rendition, path, sequence number and plain size (one
    stat, when it is found: a closed segment is not written again)."""

    rendition: str
    path: Path
    sequence: int
    plain: int


#: Told of each segment once it is sealed: its rendition and path (e.g. to upload it).
OnSealed = Callable[[str, Path], None]


class SegmentSealer:
    """Encrypts the segments ffmpeg closes in a chunk's rendition directories, each rendition in
    its media sequence order, holding back the first segment of the renditions it is told to
    until :meth:`seal_held`.

    ``key_for(sequence)`` gives the content key of a sequence number; it is called from the
    watcher thread and, for the last segments, from the stage's own, one call at a time.
    ``on_sealed(rendition, path)``, when given, is called after each segment is sealed, from
    whichever thread sealed it. While ffmpeg runs, the watcher seals closed segments ``batch``
    at a time (up to :data:`~pipeline.aes.LANES` in one call); once it has exited, whatever is
    left, the stage's thread and the watcher sharing it.
    """

    def __init__(self, key_for: KeyFor, *, container: str = layout.DEFAULT_CONTAINER,
                 poll_s: float = POLL_S, batch: int = 1,
                 on_sealed: OnSealed | None = None) -> None:
        if not 1 <= batch <= aes.LANES:
            raise ValueError(f"batch {batch} is not between 1 and {aes.LANES} (the lanes)")
        self._key_for = key_for
        self._on_sealed = on_sealed
        self._batch = batch
        self._key_lock = threading.Lock()
        self._pattern = layout.segment_pattern(container)
        self._poll_s = poll_s
        self._claim_lock = threading.Lock()
        self._out_dir = Path()
        self._first = 0
        self._next: dict[str, int] = {}
        self._hold: frozenset[str] = frozenset()
        #: By rendition: the first segment held back plain.
        self._held: dict[str, _Closed] = {}
        #: By rendition, then segment name: the sequence number it was sealed under, its plain
        #: and sealed sizes.
        self.sealed: dict[str, dict[str, tuple[int, int, int]]] = {}

    @contextmanager
    def sealing(
        self, out_dir: Path, renditions: Sequence[str], first_sequence: int, *,
        hold: Collection[str] = (),
    ) -> Iterator[None]:
        """Seal the segments of ``out_dir/<rendition>/`` for each of ``renditions`` (each
        numbered from ``first_sequence``) as they appear while the body (ffmpeg) runs, and the
        last ones after it returns; an error of the watcher is raised when the body returns.
        The first segment of each rendition in ``hold`` is left plain, to be measured, until
        :meth:`seal_held`."""
        unknown = set(hold) - set(renditions)
        if unknown:
            raise ValueError(f"held renditions {sorted(unknown)} are not sealed here")
        self._out_dir = out_dir
        self._first = first_sequence
        self._next = dict.fromkeys(renditions, first_sequence)
        self._hold = frozenset(hold)
        self._held = {}
        self.sealed = {name: {} for name in renditions}
        finished = threading.Event()
        errors: list[BaseException] = []

        def watch() -> None:
            try:
                self._seal_until(finished)
            except BaseException as error:  # handed to the stage's thread below
                errors.append(error)

        watcher = threading.Thread(target=watch, name="segment-sealer", daemon=True)
        watcher.start()
        body_done = False
        try:
            yield
            body_done = True
        finally:
            finished.set()
            try:
                if body_done and not errors:
                    # ffmpeg has exited: this thread takes a share of the segments left.
                    self._seal_until(finished)
            finally:
                watcher.join(JOIN_TIMEOUT_S)
        if watcher.is_alive():
            raise TransientError(f"sealing did not finish within {JOIN_TIMEOUT_S:.0f} s")
        if errors:
            raise errors[0]
        for name in renditions:
            self._check_untouched(name)

    def seal_held(self) -> None:
        """Seal the first segments held back (after :meth:`sealing`, once they are measured),
        and check them as every other sealed segment."""
        held, self._held = self._held, {}
        for rendition, segment in held.items():
            self._seal_all([segment])
            self._check_untouched(rendition)

    def _seal_until(self, finished: threading.Event) -> None:
        """Seal the next closed segment of any rendition, and again, until ``finished`` is set
        and none is left."""
        while True:
            # Read before the look: once ffmpeg has exited, a look that finds nothing is final.
            done = finished.is_set()
            claimed = self._claim(least=1 if done else self._batch, share=done)
            if claimed:
                self._seal_all(claimed)
            elif done:
                return
            else:
                finished.wait(self._poll_s)

    def _claim(self, *, least: int, share: bool) -> list[_Closed]:
        """The next segments ffmpeg has closed and nobody seals yet, up to one per lane (half
        of those found, rounded up, with ``share``: two threads finish the tail), in each
        rendition's order; none while fewer than ``least`` are closed. Each is claimed by one
        thread only."""
        with self._claim_lock:
            found: list[_Closed] = []
            for rendition, sequence in self._next.items():
                while len(found) < aes.LANES:
                    path = self._out_dir / rendition / (self._pattern % sequence)
                    try:
                        segment = _Closed(rendition, path, sequence, path.stat().st_size)
                    except FileNotFoundError:
                        break
                    if sequence == self._first and rendition in self._hold:
                        # Measured plain, sealed after: passed over now, whatever is taken.
                        self._held[rendition] = segment
                        self._next[rendition] = sequence + 1
                    else:
                        found.append(segment)
                    sequence += 1
            if len(found) < least:
                return []
            if share:
                found = found[: -(-len(found) // 2)]
            for segment in found:  # each rendition's in order: its last wins
                self._next[segment.rendition] = segment.sequence + 1
            return found

    def _seal_all(self, claimed: Sequence[_Closed]) -> None:
        """Encrypt the claimed segments in place, side by side in the lanes of this thread."""
        with self._key_lock:
            keys = [self._key_for(segment.sequence) for segment in claimed]

        def sealed(index: int, length: int) -> None:
            segment = claimed[index]
            self.sealed[segment.rendition][segment.path.name] = (
                segment.sequence, segment.plain, length)
            if self._on_sealed is not None:
                self._on_sealed(segment.rendition, segment.path)

        encrypt_files_in_place(
            [SegmentFile(segment.path, segment.path, key, iv_for_sequence(segment.sequence))
             for segment, key in zip(claimed, keys, strict=True)],
            on_encrypted=sealed,
        )

    def _check_untouched(self, rendition: str) -> None:
        """A segment ffmpeg kept writing after it appeared would hold a plaintext tail: every
        sealed file must be exactly its PKCS#7-padded ciphertext, and no half-written segment
        (``*.tmp``) may be left beside them."""
        rendition_dir = self._out_dir / rendition
        for name, (_, plain, sealed) in self.sealed[rendition].items():
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

    def plain_sizes(self, rendition: str) -> Mapping[str, int]:
        """Each sealed segment's size before it was sealed: what the playlist parser would have
        measured on the plain file."""
        return {name: plain for name, (_, plain, _) in self.sealed.get(rendition, {}).items()}

    def sealed_sizes(self, rendition: str, segments: Sequence[Segment]) -> list[int]:
        """The ciphertext size of each of ``segments`` of ``rendition``, checking that every one
        was sealed under its own sequence number (ffmpeg's playlist and the watcher agree)."""
        sealed = self.sealed.get(rendition, {})
        sizes = []
        for seg in segments:
            found = sealed.get(seg.name)
            if found is None or found[0] != seg.sequence:
                raise TransientError(
                    f"segment {seg.name} (sequence {seg.sequence}) of {rendition} was not "
                    "sealed; the stage will be retried"
                )
            sizes.append(found[2])
        if len(sealed) != len(segments):
            raise TransientError(
                f"{len(sealed)} segments were sealed where ffmpeg listed {len(segments)}"
            )
        return sizes
