"""Audio for a chunked transcode: encoded once per job, then cut per chunk on AAC frame edges.

Why not let each chunk's ffmpeg encode its own audio, as it encodes its own video? Video joins
cleanly because every chunk starts on a forced keyframe. AAC has no such point: every encoder
starts with 1024 samples of priming and its frames overlap their neighbours (MDCT), and a
chunk boundary at 10.0 s falls inside a 1024-sample frame (468.75 frames at 48 kHz). Measured
on a 60 s sine in 10 s chunks, chunk-by-chunk audio overlapped by up to 26.7 ms at joins and
the decoded wave was off by 0.4 to 2.0 times its amplitude there: an audible click. Encoded
once and cut here, the stream the player decodes is the one encoder's, frame for frame; the
same measurement gave no gap over 0.001 ms and a wave within 0.7 % of the sine at every join.

The cost is one audio pass over the source before the chunks start (a decode and an AAC
encode per distinct bitrate, a small share of one chunk's video encode) and a few hundred KB
per chunk in the work store. The pass resamples onto the source's own timeline
(``aresample=async=1:first_pts=0``: a late start or a hole is filled with silence, an overlap
trimmed), so that sample ``n`` of the encoded stream is source time ``n / rate`` exactly, the
same origin the chunks' video seeks from.

A chunk takes the frames that start in its time range (chunk 0 also takes the priming frame,
which starts before 0) and is told where its first frame starts relative to its own start;
its ffmpeg copies them next to its video, shifted by that offset.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, BinaryIO

import ffmpeg

from . import layout
from .errors import UnsupportedMedia
from .plan import Chunk
from .sources import ffmpeg_command, ffmpeg_input

#: ffmpeg's native AAC encoder delays its output by one frame (its ``initial_padding``); ADTS
#: cannot say so, so the first frame of the encoded stream holds these samples of priming.
AAC_PRIMING_SAMPLES = 1024
AAC_FRAME_SAMPLES = 1024
#: ADTS sampling_frequency_index (ISO/IEC 14496-3, Table 1.18).
ADTS_SAMPLE_RATES = (96000, 88200, 64000, 48000, 44100, 32000, 24000, 22050, 16000, 12000,
                     11025, 8000, 7350)
#: How the whole-job encodes are named in the audio stage's scratch directory.
WHOLE_PATTERN = "whole-{kbps}k.aac"


@dataclass(frozen=True)
class ChunkAudio:
    """One chunk's share of the job's audio at one bitrate."""

    chunk: str
    kbps: int
    name: str  # file name in the audio attempt directory
    offset: float  # where its first frame starts, in seconds from the chunk's start
    frames: int


@dataclass(frozen=True)
class JobAudio:
    """What the audio stage produced: every chunk's pieces, in one attempt directory."""

    attempt: str
    sample_rate: int
    pieces: tuple[ChunkAudio, ...]

    def piece(self, chunk: str, kbps: int) -> ChunkAudio:
        return next(p for p in self.pieces if p.chunk == chunk and p.kbps == kbps)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> JobAudio:
        return cls(
            attempt=data["attempt"],
            sample_rate=data["sample_rate"],
            pieces=tuple(ChunkAudio(**piece) for piece in data["pieces"]),
        )


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


def adts_frames(stream: BinaryIO) -> Iterator[tuple[int, bytes]]:
    """The frames of an ADTS stream, each with its header, and the stream's sample rate: read
    one at a time, so that a film's audio never sits in memory whole."""
    position = 0
    while header := stream.read(7):
        if len(header) < 7 or header[0] != 0xFF or header[1] & 0xF6 != 0xF0:
            raise UnsupportedMedia(f"the encoded audio is not ADTS at byte {position}")
        length = ((header[3] & 0x03) << 11) | (header[4] << 3) | (header[5] >> 5)
        body = stream.read(length - 7) if length >= 7 else b""
        if length < 7 or len(body) != length - 7:
            raise UnsupportedMedia(f"the encoded audio has a torn frame at byte {position}")
        yield ADTS_SAMPLE_RATES[(header[2] >> 2) & 0x0F], header + body
        position += length


def cut_per_chunk(
    whole: Path, kbps: int, chunks: Sequence[Chunk], out_dir: Path
) -> tuple[int, list[ChunkAudio]]:
    """Write each chunk's frames of ``whole`` into ``out_dir``: the frames that start in the
    chunk's range, the priming frame with chunk 0. Returns the sample rate and the pieces."""
    counts = [0] * len(chunks)
    firsts: list[float | None] = [None] * len(chunks)
    sample_rate = 0
    index = 0
    pieces = [out_dir / layout.audio_piece_name(chunk.name, kbps) for chunk in chunks]
    with contextlib.ExitStack() as stack:
        outputs = [stack.enter_context(path.open("wb")) for path in pieces]
        for number, (rate, frame) in enumerate(adts_frames(stack.enter_context(whole.open("rb")))):
            sample_rate = sample_rate or rate
            # Exact in integers: where the frame starts, in samples from the source's start.
            start = number * AAC_FRAME_SAMPLES - AAC_PRIMING_SAMPLES
            while index + 1 < len(chunks) and start >= round(chunks[index + 1].start * rate):
                index += 1
            outputs[index].write(frame)
            counts[index] += 1
            if firsts[index] is None:
                firsts[index] = start / rate
    produced = []
    for chunk, path, count, first in zip(chunks, pieces, counts, firsts, strict=True):
        if first is None:
            raise UnsupportedMedia(
                f"the source's audio ends before {chunk.start:g} s, where chunk {chunk.name} "
                "starts; re-export it with audio as long as the video"
            )
        produced.append(ChunkAudio(chunk.name, kbps, path.name, first - chunk.start, count))
    return sample_rate, produced
