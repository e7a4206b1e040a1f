"""Object stores: the work, origin and vault stores behind one small protocol.

A store is named by a URL: a local directory path (the embedded default, :mod:`.local`) or
``s3://bucket/prefix`` (:mod:`.s3`). Keys are ``/``-separated relative paths; every write is
atomic, so a reader never sees half an object, and a stage that runs twice leaves the same bytes
behind. Conditional writes (:meth:`Store.put_bytes_if`) let racing writers of one object find
out that they raced instead of silently overwriting each other.

This module imports neither implementation at module level: boto3 costs ~0.3 s to import, and
embedded mode never needs it.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from ..errors import BadSpec, ConfigurationError, NotFound

if TYPE_CHECKING:
    from .local import LocalStore
    from .s3 import S3Store

__all__ = [
    "S3_SCHEME", "LocalStore", "ObjectNotFound", "S3Store", "Store", "check_key",
    "check_store_url", "is_s3_url", "open_store", "s3_parts", "shown_url", "url_scheme",
]


class ObjectNotFound(NotFound):
    """The key does not exist in the store."""


class Store(Protocol):
    """What every stage needs from a store."""

    url: str
    #: Whether keys are files on this machine (:meth:`local_path` and :meth:`local_dir` give
    #: paths): the test that asks the store nothing and creates no directory.
    is_local: bool

    def put_file(
        self, key: str, path: Path, *, content_type: str | None = None,
        cache_control: str | None = None, content_disposition: str | None = None,
    ) -> None:
        """Store the file at ``path`` under ``key``, replacing any previous object; the
        headers are kept for whoever serves it (S3 metadata)."""

    def put_bytes(
        self, key: str, data: bytes, *, content_type: str | None = None,
        cache_control: str | None = None,
    ) -> None:
        """Store ``data`` under ``key``, replacing any previous object."""

    def put_bytes_if(self, key: str, data: bytes, *, match: str | None) -> bool:
        """Store ``data`` only if the object is still the one whose tag is ``match`` (from
        :meth:`get_tagged`), or, with ``match`` None, only if there is no object. True when
        this call wrote it; False when another writer got there first."""

    def get_bytes(self, key: str) -> bytes:
        """The object's bytes; :class:`ObjectNotFound` when absent."""

    def get_tagged(self, key: str) -> tuple[bytes, str]:
        """The object's bytes and a tag that changes with every write of it (an ETag);
        :class:`ObjectNotFound` when absent."""

    def get_file(self, key: str, path: Path) -> None:
        """Copy the object to ``path``; :class:`ObjectNotFound` when absent."""

    def exists(self, key: str) -> bool:
        """Whether ``key`` exists."""

    def list(self, prefix: str) -> list[str]:
        """Every key under ``prefix``, sorted."""

    def delete_prefix(self, prefix: str) -> int:
        """Delete every key under ``prefix``; returns how many were deleted."""

    def local_path(self, key: str) -> Path | None:
        """A filesystem path for ``key`` when the store is local, so stages can skip copies
        (its directory created)."""

    def local_dir(self, prefix: str) -> Path | None:
        """The directory holding the keys under ``prefix`` when the store is local (created)."""

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


#: A URL's scheme and ``://``, at the very start of the text (RFC 3986's letters). Anything
#: else is a local path, even with ``://`` further on (``media/a://b.mp4``).
_URL_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://")
#: The longest scheme a message shows; a longer one is shown as "a URL".
_SHOWN_SCHEME_MAX = 16


def url_scheme(text: str) -> str | None:
    """The scheme ``text`` starts with, as written (``s3``, ``HTTP``, ``ftp``), or None when
    it is a local path: the one test of whether a store, source or sidecar is a URL."""
    match = _URL_SCHEME.match(text)
    return match[1] if match else None


def shown_url(text: str) -> str:
    """How a message names the URL ``text`` when refusing it: its scheme alone
    (``https://…``), or "a URL". The rest may hold a credential (``https://user:secret@…``)
    and is never shown."""
    scheme = url_scheme(text)
    if scheme is None or len(scheme) > _SHOWN_SCHEME_MAX:
        return "a URL"
    return f"{scheme}://…"


#: What every S3 URL starts with, in lower case as AWS's own tools write it: ``S3://b/k`` is
#: not one (it is refused as a URL of another scheme), in every place that asks.
S3_SCHEME = "s3://"


def is_s3_url(url: str) -> bool:
    """Whether ``url`` names S3 (a store, a source or a sidecar; opening it loads boto3)
    rather than a local path or another URL."""
    return url_scheme(url) == "s3"


def s3_parts(url: str) -> tuple[str, str]:
    """An S3 URL's bucket and what follows it (a key, or a store's prefix). Either may be
    empty (``s3://``, ``s3://bucket``): each caller refuses what it cannot use, in its
    own words."""
    if not is_s3_url(url):
        raise ValueError(f"not an S3 URL: it does not start with {S3_SCHEME}")
    bucket, _, rest = url.removeprefix(S3_SCHEME).partition("/")
    return bucket, rest


def check_store_url(url: str, *, setting: str = "the store URL") -> str:
    """``url`` if it names a store: a local directory, or ``s3://bucket/prefix`` with a
    bucket. A URL of any other scheme is refused (``S3://bucket`` would otherwise be a
    directory named ``S3:``), naming ``setting`` and only the URL's scheme: every process
    checks its settings with this at start, and :func:`open_store` again."""
    if is_s3_url(url):
        if not s3_parts(url)[0]:
            raise ConfigurationError(f"{setting} ({S3_SCHEME}…) names no bucket; give "
                                     "s3://bucket or s3://bucket/prefix")
        return url
    if url_scheme(url) is not None:
        raise ConfigurationError(f"{setting} ({shown_url(url)}) is neither a local directory nor "
                                 "s3://bucket/prefix (S3 URLs are written in lower case)")
    return url


def open_store(url: str) -> Store:
    """Open the store named by ``url``: a local directory, or ``s3://bucket/prefix``; any
    other URL is refused (:func:`check_store_url`)."""
    check_store_url(url)
    if is_s3_url(url):
        from .s3 import S3Store

        return S3Store.from_url(url)
    from .local import LocalStore

    return LocalStore(Path(url))


def __getattr__(name: str) -> Any:
    # The implementations, importable from here without loading both at import time.
    if name == "LocalStore":
        from .local import LocalStore

        return LocalStore
    if name == "S3Store":
        from .s3 import S3Store

        return S3Store
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
