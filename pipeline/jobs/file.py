"""Job records as JSON files, one per job (embedded mode), and their status index in SQLite.

A record is updated under an exclusive ``flock`` and replaced by rename. The status index is one
row per job, ``(job_id, status, created_at, at)``, where ``at`` is the finish time of a
finished job and the creation time of any other; indexed by ``(status, at)`` and by
``created_at``, so a count, a time range or the newest few of a status read only those rows,
whatever the number of records. SQLite is in the standard library, safe between processes, and
gives the atomic update and the ordered range that Redis's sorted sets give the Redis backend.
A status is indexed under the record's lock, in the same step as it is written.
"""

from __future__ import annotations

import fcntl
import json
import os
import sqlite3
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import closing, contextmanager
from pathlib import Path

from . import TERMINAL, UnknownJob, unstarted

#: How long a writer waits for another process's transaction: they take microseconds, so
#: this long means a process is stuck, and the caller gets an error instead of a hang.
LOCK_TIMEOUT_S = 10.0
#: SQLite's write-ahead log: readers and the one writer do not block each other, and a commit
#: syncs less (see FileStatusIndex._transaction).
JOURNAL_MODE = "wal"
#: Bumped when the schema changes; 0 is a new file, which is filled from the records on disk.
_SCHEMA_VERSION = 1
_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    job_id TEXT PRIMARY KEY,
    status TEXT NOT NULL,
    created_at REAL NOT NULL,
    at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS jobs_by_status ON jobs (status, at);
CREATE INDEX IF NOT EXISTS jobs_by_creation ON jobs (created_at);
"""


def _queue_unstarted(record: dict[str, str], statuses: Sequence[str]) -> list[str]:
    """Set each of the ``statuses`` fields of ``record`` that reads :func:`unstarted` to
    queued; returns those it set."""
    marked = [name for name in statuses if unstarted(record.get(name))]
    record.update({name: "queued" for name in marked})
    return marked


def _row(job_id: str, fields: dict[str, str]) -> tuple[str, str, float, float]:
    status = fields.get("status", "queued")
    created = float(fields.get("created_at") or 0.0)
    at = float(fields.get("finished_at") or created) if status in TERMINAL else created
    return job_id, status, created, at


class FileStatusIndex:
    """The status index at ``path``; a new one is filled from ``existing()``, the
    ``(job_id, fields)`` of every record already on disk."""

    def __init__(
        self, path: Path, *, existing: Callable[[], Iterable[tuple[str, dict[str, str]]]]
    ) -> None:
        self.path = path
        with self._transaction() as db:
            (version,) = db.execute("PRAGMA user_version").fetchone()
            if version < _SCHEMA_VERSION:
                db.executescript("BEGIN IMMEDIATE;" + _SCHEMA)
                rows = [_row(job_id, fields) for job_id, fields in existing()]
                db.executemany("INSERT OR REPLACE INTO jobs VALUES (?, ?, ?, ?)", rows)
                db.execute(f"PRAGMA user_version = {_SCHEMA_VERSION}")

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        # A connection per call: cheap for a local file, and never shared between threads.
        with closing(sqlite3.connect(self.path, timeout=LOCK_TIMEOUT_S)) as db:
            # The write-ahead log, synced only when it is checkpointed (here as the connection
            # closes) instead of the rollback journal's syncs at every commit: 1.4 ms a commit
            # instead of 4.4 (up to 24 under load, measured; a packaging job commits three on
            # its way). journal_mode is kept in the file; synchronous is per connection.
            db.execute(f"PRAGMA journal_mode={JOURNAL_MODE}")
            db.execute("PRAGMA synchronous=NORMAL")
            with db:
                yield db

    def place(self, job_id: str, fields: dict[str, str]) -> None:
        """Record the job's status as ``fields`` now have it."""
        with self._transaction() as db:
            db.execute("INSERT OR REPLACE INTO jobs VALUES (?, ?, ?, ?)", _row(job_id, fields))

    def newest(self, limit: int, status: str | None) -> list[str]:
        with self._transaction() as db:
            if status is None:
                rows = db.execute(
                    "SELECT job_id FROM jobs ORDER BY created_at DESC LIMIT ?", (limit,)
                )
            else:
                rows = db.execute(
                    "SELECT job_id FROM jobs WHERE status = ? ORDER BY at DESC LIMIT ?",
                    (status, limit),
                )
            return [str(job_id) for (job_id,) in rows]

    def counts(self) -> dict[str, int]:
        with self._transaction() as db:
            rows = db.execute("SELECT status, COUNT(*) FROM jobs GROUP BY status")
            return {str(status): int(count) for status, count in rows}

    def finished_counts(self, start: float, end: float) -> dict[str, int]:
        with self._transaction() as db:
            rows = db.execute(
                "SELECT status, COUNT(*) FROM jobs WHERE status IN (?, ?, ?) "
                "AND at >= ? AND at < ? GROUP BY status",
                (*TERMINAL, start, end),
            )
            return {str(status): int(count) for status, count in rows}


class FileRecordBackend:
    """Job records as JSON files in ``directory``, and their :class:`FileStatusIndex`."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.directory.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self.index = FileStatusIndex(directory / "index.sqlite3", existing=self._existing)

    def _existing(self) -> Iterator[tuple[str, dict[str, str]]]:
        """Every record already on disk: what a new index is filled from."""
        for path in self.directory.glob("*.json"):
            try:
                fields = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            if "spec" in fields:
                yield path.stem, fields

    def _path(self, job_id: str) -> Path:
        if not job_id.isalnum():
            raise UnknownJob(job_id)
        return self.directory / f"{job_id}.json"

    def _outputs_path(self, job_id: str) -> Path:
        # A directory of their own: the records' glob (a new index's fill) never sees them.
        return self.directory / "outputs" / self._path(job_id).name

    @contextmanager
    def _locked(self, job_id: str, path: Path | None = None) -> Iterator[dict[str, str]]:
        """The record (or ``path``, a file of the job's) under the job's lock, written back
        by rename if changed."""
        path = path if path is not None else self._path(job_id)
        # The lock lives on its own file: the record itself is replaced by rename, and a lock
        # held on a replaced inode would protect nothing.
        with self._lock, open(self.directory / f".{job_id}.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                fields: dict[str, str] = json.loads(path.read_text())
            except FileNotFoundError:
                fields = {}
            before = dict(fields)
            yield fields
            if fields != before:
                tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
                tmp.write_text(json.dumps(fields, sort_keys=True))
                os.replace(tmp, path)

    def create(self, job_id: str, fields: dict[str, str]) -> None:
        with self._locked(job_id) as record:
            record.update(fields)
            self.index.place(job_id, record)

    def read(self, job_id: str) -> dict[str, str]:
        try:
            text = self._path(job_id).read_text()
        except FileNotFoundError:
            raise UnknownJob(job_id) from None
        fields: dict[str, str] = json.loads(text) if text else {}
        return fields

    def write(self, job_id: str, fields: dict[str, str]) -> None:
        with self._locked(job_id) as record:
            record.update(fields)

    def increment(self, job_id: str, name: str, amount: int) -> int:
        with self._locked(job_id) as record:
            value = int(record.get(name, "0")) + amount
            record[name] = str(value)
            return value

    def start_stage(
        self, job_id: str, counter: str, fields: dict[str, str]
    ) -> tuple[int, dict[str, str]]:
        with self._locked(job_id) as record:
            # A job an operator cancelled (or that failed elsewhere) stays ended, untouched.
            if "spec" not in record or record.get("status") in TERMINAL:
                return 0, dict(record)
            attempts = int(record.get(counter, "0")) + 1
            record[counter] = str(attempts)
            record.update(fields)
            if record.get("status") != "running":
                record["status"] = "running"
                self.index.place(job_id, record)
            return attempts, dict(record)

    def write_unless_ended(self, job_id: str, fields: dict[str, str]) -> bool:
        with self._locked(job_id) as record:
            if "spec" not in record or record.get("status") in TERMINAL:
                return False
            before = record.get("status")
            record.update(fields)
            # Indexed under the record's lock, before the record is replaced: a status write
            # and its index entry are one step for every other writer.
            if record.get("status") != before:
                self.index.place(job_id, record)
            return True

    def write_and_queue(
        self, job_id: str, fields: dict[str, str], once: dict[str, str], statuses: Sequence[str]
    ) -> list[str]:
        with self._locked(job_id) as record:
            record.update(fields)
            for name, value in once.items():
                record.setdefault(name, value)
            return _queue_unstarted(record, statuses)

    def arrive(
        self, job_id: str, counter: str, marker: str, fields: dict[str, str],
        then: Sequence[str],
    ) -> tuple[int, bool, list[str]]:
        with self._locked(job_id) as record:
            record.update(fields)
            counted = marker not in record
            left = int(record.get(counter, "0"))
            if counted:
                record[marker] = "1"
                left -= 1
                record[counter] = str(left)
            return left, counted, _queue_unstarted(record, then) if left == 0 else []

    def read_many(self, job_ids: Sequence[str]) -> list[dict[str, str] | None]:
        found: list[dict[str, str] | None] = []
        for job_id in job_ids:
            try:
                found.append(self.read(job_id))
            except UnknownJob:
                found.append(None)
        return found

    def write_outputs(self, job_id: str, fields: dict[str, str]) -> None:
        path = self._outputs_path(job_id)
        path.parent.mkdir(exist_ok=True)
        with self._locked(job_id, path) as outputs:
            outputs.update(fields)

    def claim_output(self, job_id: str, name: str, value: str) -> str | None:
        path = self._outputs_path(job_id)
        path.parent.mkdir(exist_ok=True)
        with self._locked(job_id, path) as outputs:
            # The record is replaced (its status written) under this same lock: read here, it
            # is the status the claim sees, as Redis's script sees it.
            try:
                status = self.read(job_id).get("status")
            except UnknownJob:
                status = None
            if status is None or status in TERMINAL:
                return None
            return outputs.setdefault(name, value)

    def read_outputs(self, job_id: str, names: Sequence[str] | None) -> dict[str, str]:
        try:
            found: dict[str, str] = json.loads(self._outputs_path(job_id).read_text())
        except FileNotFoundError:
            return {}
        return found if names is None else {n: found[n] for n in names if n in found}

    def drop_outputs(self, job_id: str) -> None:
        with self._lock, open(self.directory / f".{job_id}.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            self._outputs_path(job_id).unlink(missing_ok=True)

    def newest(self, limit: int, status: str | None) -> list[str]:
        return self.index.newest(limit, status)

    def status_counts(self, now: float) -> dict[str, int]:
        return self.index.counts()  # records on disk never expire

    def finished_counts(self, start: float, end: float) -> dict[str, int]:
        return self.index.finished_counts(start, end)
