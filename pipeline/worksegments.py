"""A job's encrypted segments read back in the clear: what the stages after encrypt (a
download, trick play, the subtitles' timestamp map) decode, each through this one helper."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from . import layout
from .crypto import decrypt_file, iv_for_sequence
from .playlists import PublishedSegment, RenditionEntry

if TYPE_CHECKING:
    from .services import Services


def decrypt_work_segment(
    svc: Services, job_id: str, rendition: str, segment: PublishedSegment, key: bytes,
    into: Path, *, init: bytes | None = None,
) -> Path:
    """One of the job's encrypted segments (awaiting upload) decrypted into a file in
    ``into`` (which also holds the ciphertext when the work store is not local). With
    ``init`` (an fMP4 rendition's init segment, :func:`work_init`), the file starts with it:
    an fMP4 media segment parses only after its init segment."""
    work_key = layout.encrypted_key(job_id, rendition, segment.name)
    encrypted = svc.work.local_path(work_key)
    if encrypted is None:
        encrypted = into / f"enc-{segment.name}"
        svc.work.get_file(work_key, encrypted)
    plain = into / f"plain-{segment.name}"
    if init is None:
        decrypt_file(encrypted, plain, key, iv_for_sequence(segment.sequence))
        return plain
    body = into / f"body-{segment.name}"
    decrypt_file(encrypted, body, key, iv_for_sequence(segment.sequence))
    with plain.open("wb") as out:
        out.write(init)
        with body.open("rb") as part:
            shutil.copyfileobj(part, out)
    body.unlink()
    return plain


def work_init(svc: Services, job_id: str, rendition: RenditionEntry) -> bytes | None:
    """A rendition's init segment as the job left it beside its encrypted segments (clear);
    None for MPEG-TS."""
    if rendition.init is None:
        return None
    return svc.work.get_bytes(layout.encrypted_key(job_id, rendition.name, rendition.init))
