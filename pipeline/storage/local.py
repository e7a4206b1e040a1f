"""The local store: a directory. Writes go to a temporary name and are renamed into place, so
every object is replaced whole and a replaced object gets a new inode."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from . import ObjectNotFound, Store, check_key

#: link(2) failures that mean "cannot hard-link here" rather than a real error: the two
#: directories are on different filesystems, the filesystem has no hard links (or forbids
#: them), or the inode has too many links already. `LocalStore.copy_from` copies instead.
_NO_HARD_LINK = (errno.EXDEV, errno.EPERM, errno.EMLINK)


class LocalStore:
    """A store in a local directory. Writes go to a temporary name and are renamed into place."""

    is_local = True

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
        content_disposition: str | None = None,
    ) -> None:
        # Headers are the server's business here: the embedded /cdn/ sets them from the path.
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

    def put_bytes_if(self, key: str, data: bytes, *, match: str | None) -> bool:
        dest = self._path(key)
        tmp = self._tmp_for(dest)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        try:
            if match is None:
                try:
                    # link(2) fails when the name exists: of two racing writers one wins.
                    os.link(tmp, dest)
                    return True
                except FileExistsError:
                    return False
            with self._locked(dest):
                # Compare and swap under a lock every conditional writer of the key takes;
                # readers need none, since the swap itself is one rename.
                if _tag(dest) != match:
                    return False
                os.replace(tmp, dest)
                return True
        finally:
            tmp.unlink(missing_ok=True)

    @contextmanager
    def _locked(self, path: Path) -> Iterator[None]:
        with open(path.with_name(f".{path.name}.lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    def get_tagged(self, key: str) -> tuple[bytes, str]:
        path = self._path(key)
        try:
            with path.open("rb") as handle:
                # Tag and bytes from the same open file: a rename in between cannot mix them.
                stat = os.fstat(handle.fileno())
                return handle.read(), _stat_tag(stat)
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise ObjectNotFound(key) from None

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
            if path.is_file() and not path.name.endswith((".tmp", ".lock"))
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
        # Another deleter of the same prefix may be at work (an embedded re-key's shred and
        # the worker's delayed shred of one version): what it takes first is not an error.
        try:
            count = sum(1 for path in base.rglob("*") if path.is_file())
        except FileNotFoundError:
            count = 0
        shutil.rmtree(base, ignore_errors=True)
        if base.exists():
            with contextlib.suppress(FileNotFoundError):
                shutil.rmtree(base)  # what is left, with its error if it truly cannot go
        return count

    def local_path(self, key: str) -> Path | None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def local_dir(self, prefix: str) -> Path | None:
        path = self._path(prefix.strip("/"))
        path.mkdir(parents=True, exist_ok=True)
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
            # safe because no stage modifies a stored object in place: every write goes to a
            # temporary name and is renamed over the key, which gives the key a new inode and
            # leaves the one shared here untouched (the published segment keeps its bytes even
            # when the job's work files are deleted or rewritten by a retried stage). Sealing
            # encrypts segments in place, but only in an attempt no record names yet.
            os.link(path, tmp)
        except OSError as error:
            if error.errno not in _NO_HARD_LINK:
                raise
            shutil.copyfile(path, tmp)  # another filesystem, or one without hard links
        os.replace(tmp, dest)
        # rename(2) does nothing when both names are links to one file (the key holds this
        # very file already: a placement made again), so the temporary name is removed here.
        tmp.unlink(missing_ok=True)
        return True


def _stat_tag(stat: os.stat_result) -> str:
    # Every write renames a new file into place: a new inode and mtime for each version.
    return f"{stat.st_ino:x}-{stat.st_mtime_ns:x}-{stat.st_size:x}"


def _tag(path: Path) -> str | None:
    try:
        return _stat_tag(path.stat())
    except FileNotFoundError:
        return None
