"""Segmenting: one time chunk of the source cut, for every rendition at once, into plain MPEG-TS
or fMP4 segments by one ffmpeg that decodes the source once; and the separate audio renditions
(an audio group) cut whole by one ffmpeg of their own."""

from __future__ import annotations

import os
import selectors
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import ffmpeg

from . import layout
from .errors import StageTimeout, TransientError, UnsupportedMedia
from .media import AudioStream, MediaInfo, audio_stream, ffmpeg_reason, probe, run_ffprobe
from .plan import MAX_RATE_FACTOR, AudioRendition, Chunk, Rendition
from .records import each_known, from_known, required
from .sources import ffmpeg_command, ffmpeg_input, shown_name, source_demuxer, work_input

if TYPE_CHECKING:
    from .headstart import HeadStart
    from .sealing import SegmentSealer

#: Progress callbacks are rate limited: the job record is not a firehose.
PROGRESS_INTERVAL_S = 0.5
#: The longest run_ffmpeg waits for ffmpeg's output before it looks at its deadline and its
#: ``check`` again (ffmpeg reports every 0.5 s while it works, and not at all while it waits).
WAIT_STEP_S = 1.0
#: x264 preset: "veryfast" keeps a 1080p ladder near real time on two cores at a small size cost.
X264_PRESET = "veryfast"
#: x265 is several times slower than x264 at the same preset name; "ultrafast" keeps an HEVC
#: ladder within a few times real time on small machines (still ~30 % below x264's rate).
X265_PRESET = "ultrafast"
#: Audio bitrate of a rendition whose plan names none (planned before audio rates were kept).
DEFAULT_AUDIO_KBPS = 96
PLAIN_PLAYLIST = "plain.m3u8"

ProgressCallback = Callable[[float], None]


@dataclass(frozen=True)
class Segment:
    sequence: int  # media sequence number: also the IV when EXT-X-KEY carries none
    name: str
    duration: float
    size: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class SegmentedRendition:
    """What the segment stage produced for one rendition: measured from the output of a
    transcode, taken from the source's probe for a remux (which leaves the streams as they
    are)."""

    rendition: str
    segments: tuple[Segment, ...]
    width: int
    height: int
    frame_rate: str
    video_profile: str | None
    video_level: int | None
    audio_codec: str | None
    audio_profile: str | None
    #: fMP4's init segment (layout.INIT_SEGMENT), None for MPEG-TS
    init: str | None = None
    #: "video" (audio muxed in or none), or "audio" (a rendition of the audio group)
    media: str = "video"
    #: The RFC 6381 video codec string measured from the init segment (HEVC), when the
    #: profile and level alone do not make it
    video_tag: str | None = None
    channels: int | None = None

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["segments"] = [segment.to_dict() for segment in self.segments]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SegmentedRendition:
        return from_known(cls, data, segments=each_known(Segment, required(cls, data, "segments")))


#: Every chunk's muxers (hls, and the MPEG-TS muxer inside it) keep the timestamps they are
#: given. By default each shifts a stream whose first timestamp is negative (x264's B-frame
#: delay, AAC priming) to start at 0, which only chunk 0 has: its timeline would then run 67 ms
#: ahead of every other chunk's and jump back at the first join. MPEG-TS adds 1.4 s to every
#: timestamp anyway, so none is negative in the segments.
KEEP_TIMESTAMPS = "disabled"
CHUNK_TS_OPTIONS = f"avoid_negative_ts={KEEP_TIMESTAMPS}"
#: The MP4 muxer inside hls starts every output's fragment times (tfdt) at 0; with
#: ``frag_discont`` it keeps the packets' own, so that chunk 3's fragments say where they are
#: in the whole stream (the muxer adds its own flags after these).
CHUNK_FMP4_OPTIONS = "movflags=+frag_discont"


@dataclass(frozen=True)
class AudioPiece:
    """A chunk's share of the job's audio (see :mod:`pipeline.audio`), as ffmpeg reads it."""

    path: Path
    offset: float  # where its first frame starts, in seconds after the chunk's start


def chunk_args(
    source: str,
    renditions: Sequence[Rendition],
    chunk: Chunk,
    out_dir: Path,
    segment_seconds: float,
    *,
    has_audio: bool,
    demuxer: str,
    audio: Mapping[int, AudioPiece] | None = None,
    container: str = layout.DEFAULT_CONTAINER,
    audio_renditions: Sequence[AudioRendition] = (),
    temp_files: bool = False,
) -> list[str]:
    """The one ffmpeg command that writes ``chunk`` of every rendition as plain segments into
    ``out_dir/<rendition>/``, reading ``source`` with ``demuxer`` (the probe's) under the source
    allow-lists.

    The source is decoded once: its video goes through ``fps`` and then a ``split`` into one
    scaler and encoder per rendition. Audio is either copied from the chunk's pieces of the
    job's one audio encode (``audio``, by bitrate: a chunked job) or encoded here from the
    decoded source audio (a job of one chunk). A remux copies both streams. Without
    ``has_audio`` (no audio, or audio in renditions of its own) the renditions are video only;
    ``audio_renditions`` (a job of one chunk: the whole source) are written by the same ffmpeg,
    so the source is read once. With ``temp_files`` a segment appears under its name only once
    ffmpeg has closed it (sealing).
    """
    if audio_renditions and (chunk.start > 0 or chunk.duration is not None):
        raise ValueError("audio renditions are cut whole: only a chunk of the whole source")
    name, input_options = ffmpeg_input(source, demuxer=demuxer)
    seek: dict[str, str] = {}
    if chunk.start > 0:
        seek["ss"] = f"{chunk.start:.6f}"
    if chunk.duration is not None:
        seek["t"] = f"{chunk.duration:.6f}"
    stream = ffmpeg.input(name, **seek, **input_options)
    copy = any(r.copy for r in renditions)
    if copy and len(renditions) != 1:
        raise ValueError("a remux makes exactly one rendition")
    video = stream["v:0"]
    if copy:
        branches = [video]
    else:
        frame_rate = renditions[0].frame_rate
        if any(r.frame_rate != frame_rate for r in renditions):
            raise ValueError("the renditions of one ladder share one frame rate")
        video = video.filter("fps", fps=frame_rate)
        if len(renditions) > 1:
            split = video.filter_multi_output("split", len(renditions))
            branches = [split[index] for index in range(len(renditions))]
        else:
            branches = [video]
    pieces = {
        kbps: audio_input(piece.path, piece.offset) for kbps, piece in (audio or {}).items()
    }
    outputs = []
    for rendition, branch in zip(renditions, branches, strict=True):
        rendition_dir = out_dir / rendition.name
        streams: list[Any] = [branch]
        options = hls_options(rendition_dir, segment_seconds, container, chunk.first_segment,
                              temp_files=temp_files)
        if copy:
            options["c"] = "copy"
            if has_audio:
                streams.append(stream["a:0"])
        else:
            streams[0] = branch.filter("scale", rendition.width, rendition.height)
            if rendition.codec == "hevc":
                options.update(_x265_options(rendition, segment_seconds))
            else:
                options.update(_x264_options(rendition, segment_seconds))
            # Where a single pass would have put this chunk's timestamps: continuous joins.
            options["output_ts_offset"] = f"{chunk.start:.6f}"
            options["avoid_negative_ts"] = KEEP_TIMESTAMPS
            options["hls_segment_options"] = (
                CHUNK_FMP4_OPTIONS if container == "fmp4" else CHUNK_TS_OPTIONS
            )
            kbps = rendition.audio_kbps or DEFAULT_AUDIO_KBPS
            if not has_audio:
                pass
            elif audio is not None:
                streams.append(pieces[kbps]["a:0"])
                options["c:a"] = "copy"
            elif has_audio:
                streams.append(stream["a:0"])
                options.update({"c:a": "aac", "b:a": f"{kbps}k", "ac": 2})
        outputs.append(ffmpeg.output(*streams, str(rendition_dir / PLAIN_PLAYLIST), **options))
    outputs += audio_rendition_outputs(stream, audio_renditions, out_dir, segment_seconds,
                                       container, temp_files=temp_files)
    return ffmpeg_command(outputs)


def hls_options(
    rendition_dir: Path, segment_seconds: float, container: str, first: int, *,
    temp_files: bool = False,
) -> dict[str, Any]:
    """The hls muxer's options for one rendition: VOD, segments named by sequence number from
    ``first`` (layout.segment_pattern), fMP4 with its init segment beside them; with
    ``temp_files``, each segment renamed into place once ffmpeg has closed it (sealing)."""
    options: dict[str, Any] = {
        "format": "hls",
        "hls_time": f"{segment_seconds:g}",
        "hls_playlist_type": "vod",
        "hls_list_size": 0,
        "hls_segment_filename": str(rendition_dir / layout.segment_pattern(container)),
        "start_number": first,
        "map_metadata": -1,
    }
    if container == "fmp4":
        options["hls_segment_type"] = "fmp4"
        options["hls_fmp4_init_filename"] = layout.INIT_SEGMENT
    else:
        options["hls_segment_type"] = "mpegts"
    if temp_files:
        options["hls_flags"] = "temp_file"
    return options


def _x265_options(rendition: Rendition, segment_seconds: float) -> dict[str, Any]:
    if rendition.video_kbps is None or rendition.gop_frames is None:
        raise ValueError(f"rendition {rendition.name} is a transcode without rate or GOP")
    gop = rendition.gop_frames
    return {
        "c:v": "libx265",
        "preset": X265_PRESET,
        "profile:v": "main",
        "pix_fmt": "yuv420p",
        # hvc1 (parameter sets in the init segment only) is what Apple's players require.
        "tag:v": "hvc1",
        "b:v": f"{rendition.video_kbps}k",
        "maxrate": f"{int(rendition.video_kbps * MAX_RATE_FACTOR)}k",
        "bufsize": f"{rendition.video_kbps * 2}k",
        # Closed GOPs with an IDR at every forced keyframe: each segment decodes on its own.
        "x265-params": f"keyint={gop}:min-keyint={gop}:scenecut=0:open-gop=0:forced-idr=1"
                       ":log-level=error",
        "force_key_frames": f"expr:gte(t,n_forced*{segment_seconds:g})",
    }


def _x264_options(rendition: Rendition, segment_seconds: float) -> dict[str, Any]:
    if rendition.video_kbps is None or rendition.gop_frames is None:
        raise ValueError(f"rendition {rendition.name} is a transcode without rate or GOP")
    return {
        "c:v": "libx264",
        "preset": X264_PRESET,
        "profile:v": "high" if rendition.height >= 720 else "main",
        "pix_fmt": "yuv420p",
        "b:v": f"{rendition.video_kbps}k",
        "maxrate": f"{int(rendition.video_kbps * MAX_RATE_FACTOR)}k",
        "bufsize": f"{rendition.video_kbps * 2}k",
        "g": rendition.gop_frames,
        "keyint_min": rendition.gop_frames,
        "sc_threshold": 0,
        # The encoder's clock starts at 0 in every chunk, and chunks are whole segments: the
        # forced keyframes fall on the same instants as in one pass over the whole source.
        "force_key_frames": f"expr:gte(t,n_forced*{segment_seconds:g})",
    }


def audio_input(path: Path, offset: float) -> Any:
    """A chunk's audio piece (raw AAC frames) as an ffmpeg input, placed ``offset`` seconds
    after the chunk's start, opened under the work-file allow-lists."""
    name, options = work_input(str(path), demuxer="aac")
    return ffmpeg.input(name, itsoffset=f"{offset:.6f}", **options)


def audio_renditions_args(
    source: str,
    renditions: Sequence[AudioRendition],
    out_dir: Path,
    segment_seconds: float,
    *,
    demuxer: str,
    container: str,
) -> list[str]:
    """One ffmpeg that reads the source once and writes every audio rendition (one per audio
    track, copied or encoded to AAC) as plain segments into ``out_dir/<rendition>/``."""
    name, input_options = ffmpeg_input(source, demuxer=demuxer)
    stream = ffmpeg.input(name, **input_options)
    outputs = audio_rendition_outputs(stream, renditions, out_dir, segment_seconds, container)
    return ffmpeg_command(outputs)


def audio_rendition_outputs(
    stream: Any, renditions: Sequence[AudioRendition], out_dir: Path, segment_seconds: float,
    container: str, *, temp_files: bool = False,
) -> list[Any]:
    """The hls outputs of the audio renditions, from the input ``stream`` (the whole source);
    ``temp_files`` as for :func:`chunk_args`."""
    outputs = []
    for rendition in renditions:
        rendition_dir = out_dir / rendition.name
        options = hls_options(rendition_dir, segment_seconds, container, 0, temp_files=temp_files)
        track = stream[f"a:{rendition.track}"]
        if rendition.copy:
            options["c:a"] = "copy"
        else:
            # Onto the source's own timeline, as the video's: a late start or a hole is
            # filled with silence, so the rendition lines up with every video rendition.
            track = track.filter("aresample", **{"async": 1, "first_pts": 0})
            options.update({"c:a": "aac", "b:a": f"{rendition.kbps or DEFAULT_AUDIO_KBPS}k",
                            "ac": rendition.channels or 2})
        outputs.append(ffmpeg.output(track, str(rendition_dir / PLAIN_PLAYLIST), **options))
    return outputs


#: An ffmpeg started already (:mod:`pipeline.headstart`): the process and its stderr file.
Started = tuple[subprocess.Popen[bytes], IO[bytes]]


def run_ffmpeg(
    args: list[str], *, duration: float, timeout: float, on_progress: ProgressCallback | None,
    check: Callable[[], None] | None = None, started: Started | None = None,
) -> None:
    """Run ffmpeg, reporting progress from its ``-progress`` output, killing it at ``timeout``;
    or, given ``started``, follow that ffmpeg (started with ``args``) the same way.
    ``check`` is called whenever ffmpeg reports and at least every WAIT_STEP_S while it runs:
    an error it raises (work beside ffmpeg failed) kills ffmpeg and is raised here."""
    stderr_file: IO[bytes]
    if started is None:
        # Closed by the with below, however the run ends.
        stderr_file = tempfile.TemporaryFile()  # noqa: SIM115
        process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=stderr_file)
    else:
        process, stderr_file = started
    with stderr_file as stderr:
        stdout = process.stdout
        if stdout is None:  # Popen with stdout=PIPE always sets it; narrows the type
            raise RuntimeError("ffmpeg's stdout pipe was not opened")
        deadline = time.monotonic() + timeout
        last_report = 0.0
        selector = selectors.DefaultSelector()
        selector.register(stdout, selectors.EVENT_READ)
        buffer = b""
        try:
            while True:
                if check is not None:
                    check()
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise StageTimeout(f"ffmpeg ran longer than {timeout:.0f} s and was stopped")
                if not selector.select(timeout=min(remaining, WAIT_STEP_S)):
                    continue
                chunk = os.read(stdout.fileno(), 65536)
                if not chunk:
                    break
                buffer += chunk
                *lines, buffer = buffer.split(b"\n")
                for line in lines:
                    key, _, value = line.decode(errors="replace").partition("=")
                    if key == "out_time_us" and on_progress and duration > 0:
                        now = time.monotonic()
                        if now - last_report >= PROGRESS_INTERVAL_S and value.strip().isdigit():
                            last_report = now
                            on_progress(min(1.0, int(value) / 1e6 / duration))
            returncode = process.wait(timeout=max(1.0, deadline - time.monotonic()))
        except (StageTimeout, subprocess.TimeoutExpired):
            process.kill()
            process.wait()
            raise StageTimeout(f"ffmpeg ran longer than {timeout:.0f} s and was stopped") from None
        finally:
            selector.close()
            stdout.close()
            if process.poll() is None:
                process.kill()
                process.wait()
        if returncode < 0:
            raise TransientError(f"ffmpeg was killed by signal {-returncode}")
        if returncode != 0:
            stderr.seek(0)
            errors = stderr.read()
            reason = ffmpeg_reason(errors) if errors.strip() else f"exit status {returncode}"
            raise UnsupportedMedia(f"ffmpeg could not segment the source: {reason}")
    if on_progress:
        on_progress(1.0)


def parse_plain_playlist(
    out_dir: Path, first_sequence: int = 0, plain_sizes: Mapping[str, int] | None = None
) -> list[Segment]:
    """Read back the segment names and exact durations ffmpeg wrote into its playlist; the
    first is media sequence number ``first_sequence``. Sizes are the files' own, or taken from
    ``plain_sizes`` (segments sealed since ffmpeg wrote them)."""
    segments: list[Segment] = []
    duration: float | None = None
    for line in (out_dir / PLAIN_PLAYLIST).read_text().splitlines():
        if line.startswith("#EXT-X-MAP:") and layout.INIT_SEGMENT not in line:
            raise UnsupportedMedia(f"ffmpeg named an unexpected init segment: {line[:80]}")
        if line.startswith("#EXTINF:"):
            duration = float(line[len("#EXTINF:") :].split(",", 1)[0])
        elif line and not line.startswith("#") and duration is not None:
            name = line.strip().rsplit("/", 1)[-1]
            sequence = first_sequence + len(segments)
            if plain_sizes is not None and name in plain_sizes:
                size = plain_sizes[name]
            else:
                size = (out_dir / name).stat().st_size
            segments.append(Segment(sequence, name, duration, size))
            duration = None
    if not segments:
        raise UnsupportedMedia("ffmpeg produced no segments: the source has no decodable frames")
    return segments


def segment_chunk(
    source: str,
    renditions: Sequence[Rendition],
    chunk: Chunk,
    out_dir: Path,
    *,
    info: MediaInfo,
    segment_seconds: float,
    timeout: float,
    audio: Mapping[int, AudioPiece] | None = None,
    on_progress: ProgressCallback | None = None,
    container: str = layout.DEFAULT_CONTAINER,
    muxed_audio: bool = True,
    audio_renditions: Sequence[AudioRendition] = (),
    seal: SegmentSealer | None = None,
    check: Callable[[], None] | None = None,
    head: HeadStart | None = None,
) -> dict[str, SegmentedRendition]:
    """Cut ``chunk`` of every rendition of ``source`` (whose probe is ``info``) into
    ``out_dir/<rendition>/`` with one ffmpeg, and describe what was produced, by rendition.
    Without ``muxed_audio`` the renditions are video only (the audio is a group of its own,
    whose ``audio_renditions`` this ffmpeg writes too when given). With ``seal``
    (:mod:`pipeline.sealing`), each segment of every rendition is encrypted as soon as ffmpeg
    closes it, but for an encoded rendition's first: that one is measured plain (its CODECS)
    once ffmpeg has exited, and sealed after. ``check``: see :func:`run_ffmpeg` (a segment's
    put into the work store that failed stops ffmpeg). ``head``: the same ffmpeg started ahead
    into ``out_dir`` (:mod:`pipeline.headstart`), followed instead of starting one if it runs
    the very command this chunk needs, else stopped."""
    demuxer = source_demuxer(info.format_name, shown_name(source))
    has_audio = muxed_audio and info.audio is not None

    def args_for(planned: Sequence[Rendition]) -> list[str]:
        return chunk_args(
            source, planned, chunk, out_dir, segment_seconds,
            has_audio=has_audio, demuxer=demuxer, audio=audio if has_audio else None,
            container=container, audio_renditions=audio_renditions,
            temp_files=seal is not None,
        )

    args = args_for(renditions)
    started = head.adopt(args_for, renditions) if head is not None else None
    if started is None:
        for name in [r.name for r in renditions] + [a.name for a in audio_renditions]:
            _clean(out_dir / name)
    length = chunk.duration if chunk.duration is not None else info.duration - chunk.start
    if seal is None:
        run_ffmpeg(args, duration=length, timeout=timeout, on_progress=on_progress, check=check,
                   started=started)
    else:
        names = [r.name for r in renditions] + [a.name for a in audio_renditions]
        # What _describe and _describe_audio measure from the output: every encoded rendition.
        measured = [r.name for r in renditions if not r.copy] + \
            [a.name for a in audio_renditions if not a.copy]
        with seal.sealing(out_dir, names, chunk.first_segment, hold=measured):
            run_ffmpeg(args, duration=length, timeout=timeout, on_progress=on_progress,
                       check=check, started=started)

    def plain_sizes(name: str) -> Mapping[str, int] | None:
        return seal.plain_sizes(name) if seal is not None else None

    produced = {
        rendition.name: _describe(rendition, out_dir / rendition.name, chunk, info,
                                  container=container, has_audio=has_audio,
                                  plain_sizes=plain_sizes(rendition.name))
        for rendition in renditions
    }
    for audio_rendition in audio_renditions:
        produced[audio_rendition.name] = _describe_audio(
            audio_rendition, out_dir, info, container, plain_sizes(audio_rendition.name)
        )
    if seal is not None:
        seal.seal_held()  # measured: now they are sealed like the rest
    return produced


def _clean(rendition_dir: Path) -> None:
    """An empty directory for a rendition: a previous, interrupted attempt may have left
    segments behind."""
    rendition_dir.mkdir(parents=True, exist_ok=True)
    for stale in rendition_dir.glob("seg_*"):
        stale.unlink()
    (rendition_dir / layout.INIT_SEGMENT).unlink(missing_ok=True)


def segment_audio_renditions(
    source: str,
    renditions: Sequence[AudioRendition],
    out_dir: Path,
    *,
    info: MediaInfo,
    segment_seconds: float,
    container: str,
    timeout: float,
    on_progress: ProgressCallback | None = None,
) -> dict[str, SegmentedRendition]:
    """Cut every audio rendition of ``source`` whole into ``out_dir/<rendition>/`` with one
    ffmpeg, and describe each (codec measured from its output when encoded)."""
    for rendition in renditions:
        _clean(out_dir / rendition.name)
    demuxer = source_demuxer(info.format_name, shown_name(source))
    args = audio_renditions_args(source, renditions, out_dir, segment_seconds,
                                 demuxer=demuxer, container=container)
    run_ffmpeg(args, duration=info.duration, timeout=timeout, on_progress=on_progress)
    return {r.name: _describe_audio(r, out_dir, info, container) for r in renditions}


def _describe_audio(
    rendition: AudioRendition, out_dir: Path, info: MediaInfo, container: str,
    plain_sizes: Mapping[str, int] | None = None,
) -> SegmentedRendition:
    """What was produced for an audio rendition: the source track's codec for a copy,
    measured from the output's first segment (plain: a sealing stage holds it back) for an
    encode. ``plain_sizes`` as for :func:`parse_plain_playlist`."""
    rendition_dir = out_dir / rendition.name
    segments = parse_plain_playlist(rendition_dir, 0, plain_sizes)
    track = info.audio_tracks[rendition.track]
    codec, profile, channels = track.codec, track.profile, track.channels
    if not rendition.copy:
        measured = _probe_audio(rendition_dir, segments[0], container)
        codec, profile, channels = measured.codec, measured.profile, measured.channels
    return SegmentedRendition(
        rendition=rendition.name, segments=tuple(segments), width=0, height=0,
        frame_rate="0/0", video_profile=None, video_level=None, audio_codec=codec,
        audio_profile=profile, init=_init_of(rendition_dir, container), media="audio",
        channels=channels,
    )


def _init_of(rendition_dir: Path, container: str) -> str | None:
    if container != "fmp4":
        return None
    if not (rendition_dir / layout.INIT_SEGMENT).is_file():
        raise UnsupportedMedia("ffmpeg wrote fMP4 segments without their init segment")
    return layout.INIT_SEGMENT


def _probe_audio(rendition_dir: Path, first: Segment, container: str) -> AudioStream:
    """The audio stream an audio rendition's output holds, as ffprobe reads it."""
    with _first_segment(rendition_dir, first, container) as path:
        raw = run_ffprobe(str(path), shown=f"segment {first.name}")
    audios = [s for s in raw.get("streams", []) if s.get("codec_type") == "audio"]
    if not audios:
        raise UnsupportedMedia(f"audio segment {first.name} holds no audio")
    return audio_stream(0, audios[0])


@contextmanager
def _first_segment(rendition_dir: Path, first: Segment, container: str) -> Iterator[Path]:
    """The first segment as a file ffprobe reads: itself (MPEG-TS), or the init segment
    followed by it (an fMP4 media segment does not parse alone; its init segment holds the
    codec setup, and alone it holds no frame)."""
    if container != "fmp4":
        yield rendition_dir / first.name
        return
    with tempfile.NamedTemporaryFile(prefix="hlsvault-probe-", suffix=".mp4") as joined:
        joined.write((rendition_dir / layout.INIT_SEGMENT).read_bytes())
        joined.write((rendition_dir / first.name).read_bytes())
        joined.flush()
        yield Path(joined.name)


def hevc_codec_tag(init: Path) -> str:
    """The RFC 6381 string of the HEVC stream an init segment describes, from its ``hvcC``
    record (ISO/IEC 14496-15, E.3): ``hvc1.1.6.L93.B0`` for Main, Main tier, level 3.1."""
    data = init.read_bytes()
    at = data.find(b"hvcC")
    record = data[at + 4 : at + 4 + 13] if at >= 0 else b""
    if len(record) < 13:
        raise UnsupportedMedia(f"the HEVC init segment {init.name} has no hvcC record")
    space = record[1] >> 6
    tier = "H" if record[1] & 0x20 else "L"
    profile = record[1] & 0x1F
    compatibility = int.from_bytes(record[2:6], "big")
    reversed_flags = int(f"{compatibility:032b}"[::-1], 2)
    constraints = record[6:12].rstrip(b"\x00")
    tag = f"hvc1.{'' if space == 0 else 'ABC'[space - 1]}{profile}.{reversed_flags:X}." \
          f"{tier}{record[12]}"
    if constraints:
        tag += "." + ".".join(f"{byte:X}" for byte in constraints)
    return tag


def _describe(
    rendition: Rendition, rendition_dir: Path, chunk: Chunk, info: MediaInfo, *,
    container: str, has_audio: bool, plain_sizes: Mapping[str, int] | None = None,
) -> SegmentedRendition:
    segments = parse_plain_playlist(rendition_dir, chunk.first_segment, plain_sizes)
    if chunk.segments is not None and len(segments) != chunk.segments:
        # The next chunk's segments are numbered after this one's planned count; a different
        # count would break the media sequence (and with it every IV) at the join.
        raise UnsupportedMedia(
            f"chunk {chunk.name} of {rendition.name} made {len(segments)} segments where "
            f"{chunk.segments} were planned: the source's video has gaps or a variable frame "
            "rate; set HLSVAULT_CHUNK_SECONDS=0 to transcode it in one piece"
        )
    if rendition.copy:
        # A remux moves the same H.264 and AAC bitstreams into MPEG-TS: size, profile, level
        # and audio profile are the source's, so its probe describes the output (and saves an
        # ffprobe process, ~0.08 s). Rotation, the one thing TS cannot carry, rules out a copy.
        video, audio = info.video, info.audio
    else:
        # A transcode's CODECS must be measured from what the encoder actually produced
        # (its first segment is still plain: sealing holds it back until then).
        with _first_segment(rendition_dir, segments[0], container) as first:
            produced = probe(str(first), shown=f"segment {segments[0].name}")
        video, audio = produced.video, produced.audio
    if not has_audio:
        audio = None
    init = _init_of(rendition_dir, container)
    video_tag = None
    if video.codec == "hevc":
        if init is None:
            raise UnsupportedMedia("HEVC is packaged in fMP4 only; use --container fmp4")
        video_tag = hevc_codec_tag(rendition_dir / init)
    return SegmentedRendition(
        rendition=rendition.name,
        segments=tuple(segments),
        width=video.width,
        height=video.height,
        frame_rate=rendition.frame_rate,
        video_profile=video.profile,
        video_level=video.level,
        audio_codec=audio.codec if audio else None,
        audio_profile=audio.profile if audio else None,
        init=init,
        video_tag=video_tag,
        channels=audio.channels if audio else None,
    )
