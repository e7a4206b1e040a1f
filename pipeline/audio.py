"""Audio for a chunked transcode: encoded once per job, then cut per chunk on AAC frame edges.

Why not let each chunk's ffmpeg encode its own audio, as it encodes its own video? Video joins
cleanly because every chunk starts on a forced keyframe. AAC has no such point: every encoder
starts with 1024 samples of priming and its frames overlap their neighbours (MDCT), and a
chunk boundary at 10.0 s falls inside a 1024-sample frame (468.75 frames at 48 kHz). Measured
on a 60 s sine in 10 s chunks, chunk-by-chunk audio overlapped by up to 26.7 ms at joins and
the decoded wave was off by 0.4 to 2.0 times its amplitude there: an audible click. Encoded
once and cut here, the stream the player decodes is the one encoder's, frame for frame; the
same measurement gave no gap over 0.001 ms and a wave within 0.7 % of the sine at every join.

The cost is one audio pass over the source (a decode and an AAC encode per distinct bitrate, a
small share of one chunk's video encode) and a few hundred KB per chunk in the work store. The
pass does not hold the chunks back until it is done: :class:`ChunkCutter` cuts the encodes as
ffmpeg writes them, and the audio stage releases each chunk to the segment workers as soon as
the encoder has passed its end (for a 2-hour film, the first chunk starts after a second of
audio encoding instead of after some five minutes of it). The pass resamples onto the source's own
timeline (``aresample=async=1:first_pts=0``: a late start or a hole is filled with silence, an
overlap trimmed), so that sample ``n`` of the encoded stream is source time ``n / rate``
exactly, the same origin the chunks' video seeks from.

A chunk takes the frames that start in its time range (chunk 0 also takes the priming frame,
which starts before 0) and is told where its first frame starts relative to its own start;
its ffmpeg copies them next to its video, shifted by that offset.
"""

from __future__ import annotations

import contextvars
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO

import ffmpeg
import structlog

from . import layout
from .errors import TransientError, UnsupportedMedia
from .logs import redact_text
from .media import AudioStream
from .plan import Chunk
from .records import each_known, from_known, required
from .sources import ffmpeg_command, ffmpeg_input

log = structlog.get_logger(__name__)

#: ffmpeg's native AAC encoder delays its output by one frame (its ``initial_padding``); ADTS
#: cannot say so, so the first frame of the encoded stream holds these samples of priming.
AAC_PRIMING_SAMPLES = 1024
AAC_FRAME_SAMPLES = 1024
#: ADTS sampling_frequency_index (ISO/IEC 14496-3, Table 1.18).
ADTS_SAMPLE_RATES = (96000, 88200, 64000, 48000, 44100, 32000, 24000, 22050, 16000, 12000,
                     11025, 8000, 7350)
#: How the whole-job encodes are named in the audio stage's scratch directory.
WHOLE_PATTERN = "whole-{kbps}k.aac"
#: How often the releasing thread cuts what the encoder wrote since its last look: a chunk
#: then waits at most this long after the encoder has passed its end.
RELEASE_POLL_S = 0.5
#: How long the audio stage waits, once its ffmpeg has exited, for the releases still to make
#: (each a few puts of a chunk's pieces, two job-record writes and a message, each under its
#: own timeout): they keep pace with the encode but on a slow store, and a stage that stalls
#: here is retried, keeping what it released.
RELEASE_WAIT_S = 600.0
#: How long a stage that failed waits for the release under way to return before it removes
#: the files that release may be reading (a release half done names nothing: the pieces are
#: put before the chunk's output is written).
RELEASE_STOP_S = 60.0


@dataclass(frozen=True)
class ChunkAudio:
    """One chunk's share of the job's audio at one bitrate."""

    chunk: str
    kbps: int
    name: str  # file name in the audio attempt directory
    offset: float  # where its first frame starts, in seconds from the chunk's start
    frames: int


@dataclass(frozen=True)
class ReleasedAudio:
    """One chunk's pieces as the audio stage released them, at every bitrate: what the
    chunk's segment stage reads (the audio stage's attempt directory holds the files)."""

    attempt: str
    sample_rate: int
    pieces: tuple[ChunkAudio, ...]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ReleasedAudio:
        return from_known(cls, data, pieces=each_known(ChunkAudio, required(cls, data, "pieces")))


def audio_ends_early(chunk: Chunk) -> UnsupportedMedia:
    """Why the job fails when its audio ends before ``chunk`` starts: the one reason given
    whether the probe finds it (:func:`check_audio_covers`) or the cutter does."""
    return UnsupportedMedia(
        f"the source's audio ends before {chunk.start:g} s, where chunk {chunk.name} starts; "
        "re-export it with audio as long as the video"
    )


def check_audio_covers(audio: AudioStream, chunks: Sequence[Chunk]) -> None:
    """Refuse at probe time a source whose audio (the stream the chunks mux, as the probe
    measured it) ends before a chunk starts: :class:`ChunkCutter` would find that chunk
    without a frame only when the encoder reached it, with the chunks before it already
    transcoding. Only a certain refusal is made here: the stream must end more than one AAC
    frame before the last chunk starts, so that a container's rounding of its length never
    refuses what the cutter accepts (a stream ending closer is left to the cutter, and so
    is one whose container does not say how long it is)."""
    if audio.end is None or audio.sample_rate <= 0:
        return
    after = [chunk for chunk in chunks if chunk.start >= audio.end]
    if after and after[-1].start - audio.end > AAC_FRAME_SAMPLES / audio.sample_rate:
        raise audio_ends_early(after[0])


def audio_args(source: str, bitrates: Sequence[int], out_dir: Path, *, demuxer: str) -> list[str]:
    """One ffmpeg that decodes the source's audio once and encodes it at every bitrate of
    ``bitrates`` into raw AAC (ADTS) files in ``out_dir``."""
    name, input_options = ffmpeg_input(source, demuxer=demuxer)
    audio = ffmpeg.input(name, **input_options)["a:0"].filter(
        "aresample", **{"async": 1, "first_pts": 0}
    )
    branches = audio.filter_multi_output("asplit", len(bitrates)) if len(bitrates) > 1 else None
    outputs = [
        ffmpeg.output(
            branches[index] if branches is not None else audio,
            str(out_dir / WHOLE_PATTERN.format(kbps=kbps)),
            format="adts", acodec="aac", audio_bitrate=f"{kbps}k", ac=2, map_metadata=-1,
        )
        for index, kbps in enumerate(bitrates)
    ]
    return ffmpeg_command(outputs)


class AdtsReader:
    """The frames of an ADTS stream read as it grows: each :meth:`frames` call yields the
    whole frames (each with its header, and its sample rate) written since the last; a frame
    still being written is kept for the next call, and is an error once the writer is done.
    It reads ``READ_BYTES`` at a time and yields as it goes, so a film's audio is never held in
    memory, only one read and the frame torn across it."""

    #: Bytes read at a time: a few seconds of audio.
    READ_BYTES = 1 << 20

    def __init__(self, path: Path) -> None:
        self._path = path
        self._stream: BinaryIO | None = None
        self._pending = b""
        self._position = 0  # of the first byte of ``_pending`` in the stream

    def close(self) -> None:
        if self._stream is not None:
            self._stream.close()

    def frames(self, *, final: bool = False) -> Iterator[tuple[int, bytes]]:
        if self._stream is None:
            if not self._path.exists():
                if final:
                    raise UnsupportedMedia("ffmpeg wrote no audio for the job")
                return
            self._stream = self._path.open("rb")
        while True:
            data = self._stream.read(self.READ_BYTES)
            self._pending += data
            at = 0
            while len(self._pending) - at >= 7:
                header = self._pending[at : at + 7]
                where = self._position + at
                if header[0] != 0xFF or header[1] & 0xF6 != 0xF0:
                    raise UnsupportedMedia(f"the encoded audio is not ADTS at byte {where}")
                length = ((header[3] & 0x03) << 11) | (header[4] << 3) | (header[5] >> 5)
                rate_index = (header[2] >> 2) & 0x0F
                if length < 7 or rate_index >= len(ADTS_SAMPLE_RATES) or header[6] & 0x03:
                    # ffmpeg's encoder writes one raw data block (1024 samples) per frame, at
                    # a rate ADTS can name: anything else would shift every chunk after it.
                    raise UnsupportedMedia(
                        f"the encoded audio has a frame ADTS cannot describe at byte {where}"
                    )
                if len(self._pending) - at < length:
                    break
                yield ADTS_SAMPLE_RATES[rate_index], self._pending[at : at + length]
                at += length
            self._pending = self._pending[at:]
            self._position += at
            if len(data) < self.READ_BYTES:
                break
        if final and self._pending:
            raise UnsupportedMedia(f"the encoded audio has a torn frame at byte {self._position}")


class ChunkCutter:
    """Cuts the whole-job encodes of :func:`audio_args` into each chunk's pieces while ffmpeg
    still writes them, so that a chunk can be transcoded as soon as the encoder has passed its
    end instead of after the whole film's audio: the audio pass then delays the first chunk by
    the time it takes to encode one chunk's audio (tens of milliseconds of a minute), not the
    whole source's.

    A chunk takes the frames that start in its time range (chunk 0 also takes the priming
    frame, which starts before 0). It is complete at a bitrate once that bitrate's encode holds
    a frame of a later chunk, and released (by :meth:`poll`, in chunk order) once complete at
    every bitrate; the rest are released by the final poll, after ffmpeg has exited.
    """

    def __init__(
        self, wholes: Mapping[int, Path], chunks: Sequence[Chunk], out_dir: Path
    ) -> None:
        self._chunks = list(chunks)
        self._out_dir = out_dir
        self._readers = {kbps: AdtsReader(path) for kbps, path in wholes.items()}
        self._frame = dict.fromkeys(wholes, 0)  # frames read so far, by bitrate
        self._index = dict.fromkeys(wholes, 0)  # the chunk the next frame goes to
        self._counts = {kbps: [0] * len(chunks) for kbps in wholes}
        self._firsts: dict[int, list[float | None]] = {
            kbps: [None] * len(chunks) for kbps in wholes
        }
        self._outputs: dict[tuple[int, int], BinaryIO] = {}
        self.sample_rate = 0
        self._released = 0

    def close(self) -> None:
        for reader in self._readers.values():
            reader.close()
        for output in self._outputs.values():
            output.close()
        self._outputs.clear()

    def poll(self, *, final: bool = False) -> list[tuple[Chunk, list[ChunkAudio]]]:
        """Cut what the encoder wrote since the last poll; returns the chunks newly complete
        at every bitrate, with their pieces (closed files in ``out_dir``), in chunk order.
        ``final`` (ffmpeg has exited): every chunk left is released, or an error says why."""
        for kbps, reader in self._readers.items():
            for rate, frame in reader.frames(final=final):
                self._cut(kbps, rate, frame)
        complete = len(self._chunks) if final else min(self._index.values())
        released = []
        while self._released < complete:
            index = self._released
            released.append((self._chunks[index], self._pieces(index)))
            self._released += 1
        return released

    def _cut(self, kbps: int, rate: int, frame: bytes) -> None:
        self.sample_rate = self.sample_rate or rate
        # Exact in integers: where the frame starts, in samples from the source's start.
        start = self._frame[kbps] * AAC_FRAME_SAMPLES - AAC_PRIMING_SAMPLES
        self._frame[kbps] += 1
        index = self._index[kbps]
        while index + 1 < len(self._chunks) and start >= round(self._chunks[index + 1].start
                                                                  * rate):
            self._close(kbps, index)
            index += 1
        self._index[kbps] = index
        output = self._outputs.get((kbps, index))
        if output is None:
            output = self._outputs[kbps, index] = self._piece_path(index, kbps).open("wb")
        output.write(frame)
        self._counts[kbps][index] += 1
        if self._firsts[kbps][index] is None:
            self._firsts[kbps][index] = start / rate

    def _close(self, kbps: int, index: int) -> None:
        output = self._outputs.pop((kbps, index), None)
        if output is not None:
            output.close()

    def _piece_path(self, index: int, kbps: int) -> Path:
        return self._out_dir / layout.audio_piece_name(self._chunks[index].name, kbps)

    def _pieces(self, index: int) -> list[ChunkAudio]:
        chunk = self._chunks[index]
        pieces = []
        for kbps in self._readers:
            self._close(kbps, index)
            first = self._firsts[kbps][index]
            if first is None:
                if not self._frame[kbps]:
                    raise UnsupportedMedia("the source's audio track decodes to no sound")
                raise audio_ends_early(chunk)
            pieces.append(ChunkAudio(chunk.name, kbps, self._piece_path(index, kbps).name,
                                     first - chunk.start, self._counts[kbps][index]))
        return pieces


#: Releases one chunk: its pieces (closed files in the cutter's ``out_dir``) made available to
#: its segment stage (see :func:`pipeline.packaging.encode_audio`).
ReleaseChunk = Callable[[Chunk, list[ChunkAudio]], None]


class ChunkReleases:
    """Releases the chunks of a :class:`ChunkCutter` on a thread of its own while ffmpeg
    encodes, each as soon as the encoder has passed its end (looking every ``poll_s``), in
    chunk order. A release (puts into the work store, job-record writes, a message) may be
    slow; here it never holds up the thread that reads ffmpeg's output, so ffmpeg's timeout
    bounds the encode alone, and the releases left once ffmpeg has exited have a bound of
    their own (:meth:`finish`).

    Used as a context manager around ffmpeg: :meth:`check` (called while ffmpeg runs) raises
    the error a release met, so that ffmpeg is stopped at once; :meth:`finish`, after ffmpeg
    exited, releases the rest. Leaving it otherwise (ffmpeg failed) releases nothing more."""

    def __init__(self, cutter: ChunkCutter, release: ReleaseChunk, *,
                 poll_s: float = RELEASE_POLL_S) -> None:
        self._cutter = cutter
        self._release = release
        self._poll_s = poll_s
        self._changed = threading.Condition()
        self._encoded = False  # ffmpeg exited well: the next cut is the final one
        self._stopped = False  # the stage is leaving without it: nothing more is released
        self._error: BaseException | None = None
        # In a copy of the stage's context: what it logs carries the job's bindings.
        self._thread = threading.Thread(target=contextvars.copy_context().run, args=(self._run,),
                                        name="audio-release", daemon=True)

    def __enter__(self) -> ChunkReleases:
        self._thread.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        with self._changed:
            self._stopped = True
            self._changed.notify_all()
        # The cutter's files are closed and removed after this: not under a release that is
        # still reading them, unless it outlives the bound (it then fails, naming nothing).
        self._thread.join(RELEASE_STOP_S)
        if self._thread.is_alive():
            log.warning("a chunk's audio release was still running when the audio stage left; "
                        "its files are removed under it, and it names nothing",
                        waited_s=RELEASE_STOP_S)
        failed = self._error
        if failed is not None and failed is not error:
            # The stage leaves with another error (its ffmpeg failed first): this one is not
            # raised, so it is said here.
            log.warning("a chunk's audio release failed as the audio stage was failing",
                        reason=redact_text(str(failed)))

    def check(self) -> None:
        """Raise the error a release met, if any (the stage then stops its ffmpeg)."""
        if self._error is not None:
            raise self._error

    def finish(self) -> None:
        """ffmpeg has exited well: release every chunk left, or raise why they were not."""
        with self._changed:
            self._encoded = True
            self._changed.notify_all()
        self._thread.join(RELEASE_WAIT_S)
        if self._thread.is_alive():
            raise TransientError(
                f"the chunks' audio was encoded but not released within {RELEASE_WAIT_S:.0f} s "
                "(the work store or the job records are slow); the stage will be retried, "
                "keeping the chunks it released"
            )
        self.check()

    def _run(self) -> None:
        try:
            while True:
                with self._changed:
                    # Read before the cut: only a cut made after ffmpeg exited is final.
                    final, stopped = self._encoded, self._stopped
                if stopped:
                    return
                for chunk, pieces in self._cutter.poll(final=final):
                    with self._changed:
                        if self._stopped:
                            return
                    self._release(chunk, pieces)
                if final:
                    return
                with self._changed:
                    self._changed.wait_for(lambda: self._encoded or self._stopped,
                                           timeout=self._poll_s)
        except BaseException as error:  # raised in the stage's thread by check() or finish()
            self._error = error
