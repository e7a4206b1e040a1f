"""Head start: the remux of ``hlsvault package --ladder copy`` started before the job's probe.

An embedded copy packaging spends ~0.2 s starting (imports, its in-process worker, the probe)
before the segment stage would start ffmpeg, against ~0.3 s for the remux itself. The CLI
starts that same ffmpeg as soon as it has made the job spec instead (:func:`start`), and the
segment stage adopts it (:func:`taken`, :meth:`HeadStart.adopt`) when the command the stage
would run itself, from the probe's plan, is the one already running. Otherwise the head start
is stopped and its files removed, and the stage runs as it always did.

A source is untrusted until the probe has passed it (:mod:`pipeline.sources`), so a head start
is made only where opening the source cannot follow anything the source names:

- a local regular file whose first bytes are the signature of an allow-listed container
  (:func:`sniff_demuxer`); anything else (an HLS playlist, a concat list, text, a FIFO) gets
  none, and is left to the probe to refuse as before;
- opened exactly as the segment stage opens a probed source: ``file:`` the only protocol, the
  demuxer allow-list, and the sniffed demuxer forced with ``-f``, so that ffmpeg detects no
  format and opens no other input, whatever the file holds;
- writing plain segments into a segment attempt of the job's own in the private work store,
  which no record names until the segment stage has adopted it and sealed every segment:
  nothing is published, or read by another stage, before the probe's checks and the stage's.

The rendition's name (its height) is known only once the probe has read the source, so the
head start writes into :data:`HEAD_DIR` and the adopting stage names the rendition's directory
by a symbolic link to it. A job that ends without adopting its head start (the probe refused
the source, or planned another command) has it stopped and removed by :func:`discard`, which
the CLI calls when the job ends, and at exit.
"""

from __future__ import annotations

import atexit
import contextlib
import shutil
import subprocess
import tempfile
import threading
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import IO, TYPE_CHECKING

from . import layout
from .plan import Rendition, plan_chunks
from .segment import chunk_args
from .storage import url_scheme

if TYPE_CHECKING:
    from .jobs import JobSpec
    from .storage import Store

#: The directory a head start writes its one rendition into, named by the stage once planned.
HEAD_DIR = "head"
#: Bytes read to recognise a container: MPEG-TS needs three packets' sync bytes.
SNIFF_BYTES = 3 * 188
#: A remux is one chunk, the whole source, whatever its length: the plan's own.
WHOLE = plan_chunks(0.0, 1.0, 0.0, copy=True)[0]
#: The remux as a head start plans it: every field but the name is the probe's business and
#: plays no part in a copy's ffmpeg command.
_HEAD_RENDITION = Rendition(name=HEAD_DIR, width=0, height=0, copy=True, video_kbps=None,
                            audio_kbps=None, frame_rate="0/0", gop_frames=None)


def sniff_demuxer(path: Path) -> str | None:
    """The allow-listed demuxer a local file's first bytes name, or None: not a regular file,
    or no signature known here (an HLS playlist or a concat list is text: None)."""
    try:
        if not path.is_file():  # a FIFO would block the open; a directory has no bytes
            return None
        with path.open("rb") as handle:
            head = handle.read(SNIFF_BYTES)
    except OSError:
        return None
    if head[4:8] == b"ftyp":
        return "mov"
    if head[:4] == b"\x1a\x45\xdf\xa3":  # EBML: Matroska and WebM
        return "matroska"
    if len(head) == SNIFF_BYTES and all(head[at] == 0x47 for at in range(0, SNIFF_BYTES, 188)):
        return "mpegts"
    return None


@dataclass
class HeadStart:
    """A remux started ahead of its segment stage, in segment attempt ``attempt``."""

    job_id: str
    chunk: str
    attempt: str
    out_dir: Path
    args: list[str]
    process: subprocess.Popen[bytes]
    stderr: IO[bytes]
    adopted: bool = False
    stopped: bool = False

    def adopt(
        self, args_for: Callable[[Sequence[Rendition]], list[str]],
        renditions: Sequence[Rendition],
    ) -> tuple[subprocess.Popen[bytes], IO[bytes]] | None:
        """The running ffmpeg and its stderr, when it is the command the stage would run:
        ``args_for(renditions)``, its one rendition written into :data:`HEAD_DIR`. The
        rendition's directory is then made a link to that one. Otherwise the head start is
        stopped and removed, and None returned."""
        if len(renditions) == 1 and args_for([replace(renditions[0], name=HEAD_DIR)]) == self.args:
            (self.out_dir / renditions[0].name).symlink_to(HEAD_DIR, target_is_directory=True)
            self.adopted = True  # the stage's run_ffmpeg owns the process from here
            return self.process, self.stderr
        self.stop(whole=False)  # the stage runs its own ffmpeg in this attempt
        return None

    def stop(self, *, whole: bool = True) -> None:
        """Stop ffmpeg and remove what it wrote; ``whole``: the attempt too, and the job's
        directories made for it if they are empty. Once; never an adopted head start."""
        if self.adopted or self.stopped:
            return
        self.stopped = True
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        if self.process.stdout is not None:
            self.process.stdout.close()
        self.stderr.close()
        shutil.rmtree(self.out_dir / HEAD_DIR, ignore_errors=True)
        if not whole:
            return
        shutil.rmtree(self.out_dir, ignore_errors=True)
        # The job's work directories the attempt was made in, now empty (the job's own
        # directory included, as a job that never had a head start leaves none).
        depth = len(layout.chunk_attempt_prefix(self.job_id, self.chunk, self.attempt).split("/"))
        for parent in list(self.out_dir.parents)[: depth - len(layout.job_prefix(self.job_id)
                                                                .split("/"))]:
            with contextlib.suppress(OSError):
                parent.rmdir()


#: Head starts not yet adopted, by job id: one per process at most (one `package` command).
_started: dict[str, HeadStart] = {}
_lock = threading.Lock()


def start(spec: JobSpec, work: Store) -> HeadStart | None:
    """Start ``spec``'s remux now, if it is a copy into MPEG-TS of a local file whose
    container the first bytes name, and the work store is local; None otherwise. (fMP4 cuts
    the audio as renditions of its own, and an audio-only variant too: commands a head start
    does not guess.) The source is assumed to have audio, as nearly every upload has: a source
    without is planned another command, and the stage stops this one."""
    if spec.ladder != "copy" or spec.container != "ts" or spec.audio_only:
        return None
    if url_scheme(spec.source) is not None:
        return None
    demuxer = sniff_demuxer(Path(spec.source))
    if demuxer is None:
        return None
    attempt = uuid.uuid4().hex[:12]
    out_dir = work.local_dir(layout.chunk_attempt_prefix(spec.job_id, WHOLE.name, attempt))
    if out_dir is None:
        return None
    args = chunk_args(spec.source, [_HEAD_RENDITION], WHOLE, out_dir, spec.segment_seconds,
                      has_audio=True, demuxer=demuxer, container=spec.container,
                      temp_files=True)
    (out_dir / HEAD_DIR).mkdir()
    # Kept open with the process: closed by the stage's run_ffmpeg, or by stop().
    stderr = tempfile.TemporaryFile()  # noqa: SIM115
    try:
        process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=stderr,
                                   stdin=subprocess.DEVNULL)
    except OSError:  # no ffmpeg to run: the probe, which needs ffprobe, says what is missing
        stderr.close()
        shutil.rmtree(out_dir, ignore_errors=True)
        return None
    head = HeadStart(spec.job_id, WHOLE.name, attempt, out_dir, args, process, stderr)
    with _lock:
        stale = list(_started.values())
        _started.clear()
        _started[spec.job_id] = head
    for other in stale:
        other.stop()
    return head


@contextmanager
def taken(job_id: str, chunk: str) -> Iterator[HeadStart | None]:
    """The head start of ``job_id``'s ``chunk`` (None if there is none), for its segment stage
    to adopt; stopped on the way out unless adopted. Each is taken once: a redelivered stage
    runs its own ffmpeg."""
    with _lock:
        head = _started.get(job_id)
        if head is not None and head.chunk == chunk:
            del _started[job_id]
        else:
            head = None
    try:
        yield head
    finally:
        if head is not None and not head.adopted:
            head.stop()


@atexit.register
def discard() -> None:
    """Stop and remove every head start no segment stage took (the job ended before)."""
    with _lock:
        heads = list(_started.values())
        _started.clear()
    for head in heads:
        head.stop()
