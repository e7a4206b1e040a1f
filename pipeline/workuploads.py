"""A segment attempt's files put into a remote work store while ffmpeg still writes the next.

On a fleet the work store is S3. A chunk's segments are sealed one by one as ffmpeg closes them
(:mod:`pipeline.sealing`), and a sealed segment is final, so it can be put as soon as it is
sealed: the round trips then overlap the encode, where putting every file after ffmpeg exits
adds them to the chunk's time. Should anything write a segment after it was put, the sealing
checks fail the stage, and an attempt that fails is never named in its ``produced`` output: nothing
reads what it put. A put that fails fails the attempt: the stage's :meth:`AttemptUploads.check`
(called while ffmpeg runs) raises its error, which stops ffmpeg instead of letting it encode
the rest of a chunk that can no longer be named.
"""

from __future__ import annotations

import contextvars
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from pathlib import Path
from types import TracebackType

import structlog

from .errors import TransientError
from .storage import Store

log = structlog.get_logger(__name__)

#: Puts at once: round trips to the store, not work for this host, and a chunk closes a
#: segment per rendition every few seconds at most.
UPLOAD_CONCURRENCY = 4
#: How long the stage waits after ffmpeg for the puts still queued or running: each put has
#: the store client's own timeouts and retries; this bounds them all together.
UPLOAD_WAIT_S = 600.0
#: How long leaving the uploads (the stage is ending, usually on an error) waits for the puts
#: already running: the rest are cancelled, and one still running after this reads files of an
#: attempt nothing will name. The error the stage is raising is not held up longer than this.
SHUTDOWN_WAIT_S = 30.0

#: The work-store key of a file of a rendition's directory: (rendition, file name) -> key.
KeyOf = Callable[[str, str], str]


class AttemptUploads:
    """Puts the files of an attempt's rendition directories into ``store`` on a pool of
    ``concurrency`` threads, each file once, as they are handed over (:meth:`put`, from any
    thread) and then the rest (:meth:`finish`). Once a put has failed, nothing more is put and
    :meth:`check` raises its error. Used as a context manager: leaving it cancels the puts not
    started and waits up to SHUTDOWN_WAIT_S for those running, so that none reads a file after
    its directory is gone."""

    def __init__(self, store: Store, key_of: KeyOf, *,
                 concurrency: int = UPLOAD_CONCURRENCY) -> None:
        self._store = store
        self._key_of = key_of
        self._pool = ThreadPoolExecutor(max_workers=concurrency,
                                        thread_name_prefix="attempt-upload")
        self._lock = threading.Lock()
        # One entry per file of the attempt: bounded by the chunk's segments.
        self._puts: dict[tuple[str, str], Future[None]] = {}
        self._failure: BaseException | None = None

    def __enter__(self) -> AttemptUploads:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        with self._lock:
            running = list(self._puts.values())
        _, pending = wait(running, timeout=SHUTDOWN_WAIT_S)
        if not pending:
            return
        if kind is None:
            raise TransientError(
                f"{len(pending)} segment uploads to the work store were still running "
                f"{SHUTDOWN_WAIT_S:.0f} s after the stage ended; the stage will be retried"
            )
        # The stage's own error goes on: these are only said.
        log.warning("segment uploads to the work store were still running after the stage "
                    "left on an error; they read files of an attempt nothing will name",
                    running=len(pending), waited_s=SHUTDOWN_WAIT_S)

    def put(self, rendition: str, path: Path) -> None:
        """Start putting ``path``, a finished file of ``rendition``'s directory, unless it is
        already on its way or a put has failed."""
        with self._lock:
            if self._failure is not None or (rendition, path.name) in self._puts:
                return
            key = self._key_of(rendition, path.name)
            # In the caller's structlog context (job_id and the rest): a pool thread has
            # none of its own.
            put = self._pool.submit(contextvars.copy_context().run, self._store.put_file,
                                    key, path)
            self._puts[(rendition, path.name)] = put
        # Outside the lock: a put already settled calls back at once, in this thread.
        put.add_done_callback(self._settled)

    def check(self) -> None:
        """Raise the error of the first put that failed, if one has (the store's: transient
        or not)."""
        failure = self._failure
        if failure is not None:
            raise failure

    def finish(self, files: Iterable[tuple[str, Path]]) -> None:
        """Put those of ``files`` (rendition, path) not put yet, and wait for every put; the
        first put that failed raises its error, as soon as it has."""
        for rendition, path in files:
            self.put(rendition, path)
        self.check()
        with self._lock:
            puts = list(self._puts.values())
        done, pending = wait(puts, timeout=UPLOAD_WAIT_S, return_when=FIRST_EXCEPTION)
        for settled in done:
            self._settled(settled)  # its callback may not have run yet
        self.check()
        if pending:
            raise TransientError(
                f"{len(pending)} segment uploads to the work store did not finish within "
                f"{UPLOAD_WAIT_S:.0f} s; the stage will be retried"
            )

    def _settled(self, put: Future[None]) -> None:
        failure = None if put.cancelled() else put.exception()
        if failure is not None:
            with self._lock:
                if self._failure is None:
                    self._failure = failure
