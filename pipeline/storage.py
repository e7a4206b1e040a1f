"""Object stores: the work, origin and vault stores behind one small interface.

A store is named by a URL: a local directory path (the embedded default) or
``s3://bucket/prefix``. Keys are ``/``-separated relative paths; every write is atomic, so a
reader never sees half an object, and a stage that runs twice leaves the same bytes behind.
"""

from __future__ import annotations

import errno
import os
import shutil
import uuid
from pathlib import Path
from typing import Protocol

from .errors import BadSpec

#: link(2) failures that mean "cannot hard-link here" rather than a real error: the two
#: directories are on different filesystems, the filesystem has no hard links (or forbids
#: them), or the inode has too many links already. `LocalStore.copy_from` copies instead.
_NO_HARD_LINK = (errno.EXDEV, errno.EPERM, errno.EMLINK)


class ObjectNotFound(KeyError):
    """The key does not exist in the store."""


class Store(Protocol):
    """What every stage needs from a store."""

    url: str

    def put_file(
        self,
        key: str,
        path: Path,
        *,
        content_type: str | None = None,
        cache_control: str | None = None,
    ) -> None:
        """Store the file at ``path`` under ``key``, replacing any previous object."""

    def put_bytes(
        self,
        key: str,
        data: bytes,
        *,
        content_type: str | None = None,
        cache_control: str | None = None,
    ) -> None:
        """Store ``data`` under ``key``, replacing any previous object."""

    def put_bytes_if_absent(self, key: str, data: bytes) -> bool:
        """Store ``data`` only if ``key`` does not exist; True when this call wrote it."""

    def get_bytes(self, key: str) -> bytes:
        """The object's bytes; :class:`ObjectNotFound` when absent."""

    def get_file(self, key: str, path: Path) -> None:
        """Copy the object to ``path``; :class:`ObjectNotFound` when absent."""

    def exists(self, key: str) -> bool:
        """Whether ``key`` exists."""

    def list(self, prefix: str) -> list[str]:
        """Every key under ``prefix``, sorted."""

    def delete_prefix(self, prefix: str) -> int:
        """Delete every key under ``prefix``; returns how many were deleted."""

    def local_path(self, key: str) -> Path | None:
        """A filesystem path for ``key`` when the store is local, so stages can skip copies."""

    def copy_from(
        self, source: Store, source_key: str, key: str, *, content_type: str | None = None,
        cache_control: str | None = None,
    ) -> bool:
        """Copy an object of ``source`` here without passing through this process when the
        two stores allow it (a hard link on one filesystem, or S3 to S3); False when they do
        not."""


def check_key(key: str) -> str:
    """Refuse keys that could escape the store's root."""
    parts = key.split("/")
    if not key or key.startswith("/") or any(part in ("", ".", "..") for part in parts):
        raise BadSpec(f"invalid storage key {key!r}: keys are relative paths without '..'")
    return key


class LocalStore:
    """A store in a local directory. Writes go to a temporary name and are renamed into place."""

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        self.url = str(self.root)

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    def _tmp_for(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        return path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")

    def put_file(
        self,
        key: str,
        path: Path,
        *,
        content_type: str | None = None,
        cache_control: str | None = None,
    ) -> None:
        dest = self._path(key)
        tmp = self._tmp_for(dest)
        shutil.copyfile(path, tmp)
        os.replace(tmp, dest)

    def put_bytes(
        self,
        key: str,
        data: bytes,
        *,
        content_type: str | None = None,
        cache_control: str | None = None,
    ) -> None:
        dest = self._path(key)
        tmp = self._tmp_for(dest)
        tmp.write_bytes(data)
        os.replace(tmp, dest)

    def put_bytes_if_absent(self, key: str, data: bytes) -> bool:
        dest = self._path(key)
        tmp = self._tmp_for(dest)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        try:
            # link(2) fails when the name exists: of two racing writers exactly one wins.
            os.link(tmp, dest)
            return True
        except FileExistsError:
            return False
        finally:
            tmp.unlink()

    def get_bytes(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise ObjectNotFound(key) from None

    def get_file(self, key: str, path: Path) -> None:
        try:
            shutil.copyfile(self._path(key), path)
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise ObjectNotFound(key) from None

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list(self, prefix: str) -> list[str]:
        base = self.root / prefix.strip("/") if prefix.strip("/") else self.root
        if not base.is_dir():
            return []
        keys = [
            path.relative_to(self.root).as_posix()
            for path in base.rglob("*")
            if path.is_file() and not path.name.endswith(".tmp")
        ]
        return sorted(keys)

    def delete_prefix(self, prefix: str) -> int:
        check_key(prefix.strip("/"))
        base = self.root / prefix.strip("/")
        if base.is_file():
            base.unlink()
            return 1
        if not base.is_dir():
            return 0
        count = sum(1 for path in base.rglob("*") if path.is_file())
        shutil.rmtree(base)
        return count

    def local_path(self, key: str) -> Path | None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def copy_from(
        self, source: Store, source_key: str, key: str, *, content_type: str | None = None,
        cache_control: str | None = None,
    ) -> bool:
        path = source.local_path(source_key)
        if path is None:
            return False
        dest = self._path(key)
        tmp = self._tmp_for(dest)
        try:
            # A hard link shares the source's inode instead of writing the bytes again. That is
            # safe because no stage modifies a file in place: every write goes to a temporary
            # name and is renamed over the key, which gives the key a new inode and leaves the
            # one shared here untouched (the published segment keeps its bytes even when the
            # job's work files are deleted or rewritten by a retried stage).
            os.link(path, tmp)
        except OSError as error:
            if error.errno not in _NO_HARD_LINK:
                raise
            shutil.copyfile(path, tmp)  # another filesystem, or one without hard links
        os.replace(tmp, dest)
        return True


def open_store(url: str) -> Store:
    """Open the store named by ``url``: a local directory, or ``s3://bucket/prefix``."""
    if url.startswith("s3://"):
        from .s3 import S3Store  # boto3 costs ~0.3 s to import; embedded mode never needs it

        return S3Store.from_url(url)
    return LocalStore(Path(url))
