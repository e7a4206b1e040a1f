"""A segment attempt's files put into a remote work store while ffmpeg still writes the next.

On a fleet the work store is S3. A chunk's segments are sealed one by one as ffmpeg closes them
(:mod:`pipeline.sealing`), and a sealed segment is final, so it can be put as soon as it is
sealed: the round trips then overlap the encode, where putting every file after ffmpeg exits
adds them to the chunk's time. Should anything write a segment after it was put, the sealing
checks fail the stage, and an attempt that fails is never named in its ``produced`` output: nothing
reads what it put.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from pathlib import Path
from types import TracebackType

from .errors import TransientError
from .storage import Store

#: Puts at once: round trips to the store, not work for this host, and a chunk closes a
#: segment per rendition every few seconds at most.
UPLOAD_CONCURRENCY = 4
#: How long the stage waits after ffmpeg for the puts still queued or running: each put has
#: the store client's own timeouts and retries; this bounds them all together.
UPLOAD_WAIT_S = 600.0

#: The work-store key of a file of a rendition's directory: (rendition, file name) -> key.
KeyOf = Callable[[str, str], str]


class AttemptUploads:
    """Puts the files of an attempt's rendition directories into ``store`` on a pool of
    ``concurrency`` threads, each file once, as they are handed over (:meth:`put`, from any
    thread) and then the rest (:meth:`finish`). Used as a context manager: leaving it cancels
    the puts not started and waits for those running, so none reads a file after its
    directory is gone."""

    def __init__(self, store: Store, key_of: KeyOf, *,
                 concurrency: int = UPLOAD_CONCURRENCY) -> None:
        self._store = store
        self._key_of = key_of
        self._pool = ThreadPoolExecutor(max_workers=concurrency,
                                        thread_name_prefix="attempt-upload")
        self._lock = threading.Lock()
        # One entry per file of the attempt: bounded by the chunk's segments.
        self._puts: dict[tuple[str, str], Future[None]] = {}

    def __enter__(self) -> AttemptUploads:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    def put(self, rendition: str, path: Path) -> None:
        """Start putting ``path``, a finished file of ``rendition``'s directory, unless it is
        already on its way."""
        with self._lock:
            if (rendition, path.name) not in self._puts:
                key = self._key_of(rendition, path.name)
                self._puts[(rendition, path.name)] = self._pool.submit(
                    self._store.put_file, key, path
                )

    def finish(self, files: Iterable[tuple[str, Path]]) -> None:
        """Put those of ``files`` (rendition, path) not put yet, and wait for every put; the
        first put that failed raises its error (the store's: transient or not)."""
        for rendition, path in files:
            self.put(rendition, path)
        with self._lock:
            puts = list(self._puts.values())
        _, pending = wait(puts, timeout=UPLOAD_WAIT_S)
        if pending:
            raise TransientError(
                f"{len(pending)} segment uploads to the work store did not finish within "
                f"{UPLOAD_WAIT_S:.0f} s; the stage will be retried"
            )
        for done in puts:
            done.result()
