"""Segment encryption: AES-128-CBC with PKCS#7 padding, as RFC 8216 §5.2 asks for METHOD=AES-128.

Encryption goes through :mod:`pipeline.aes`, in pieces of :data:`CHUNK` bytes held in buffers
allocated once per thread and reused by every segment the thread encrypts: a segment costs one
read and one write per piece, and no memory the process has not touched before.

:func:`encrypt_files` encrypts many segments at once: each thread keeps up to
:data:`~pipeline.aes.LANES` files open, one per lane, reads a piece of each, encrypts them all in
one call (the lane library runs their CBC chains side by side on the thread's core) and writes
them out; a lane whose file is done takes the next one. :func:`encrypt_file` and
:func:`encrypt_in_place` are the same loop over one file. Decryption (re-keying, downloads)
streams through ``cryptography``.
"""

from __future__ import annotations

import os
import threading
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from . import aes
from .aes import BLOCK, check_key_iv
from .errors import PermanentError, TransientError

#: Piece size, per lane: large enough that the per-piece calls (a read, a write, a share of one
#: cipher call) vanish next to the bytes, small enough that a thread's LANES pieces, read,
#: encrypted and written, are still in the core's caches between the three. Measured with 8
#: lanes on real segments (docs/benchmarks.md, issue 10): 128 KiB was as fast as or faster than
#: 32, 64, 256 KiB and 1 MiB for new files on one thread. A multiple of 16.
CHUNK = 1 << 17

#: Decryption's piece size: ``cryptography`` decrypts CBC blocks in parallel, and a larger piece
#: only saves calls.
DECRYPT_CHUNK = 1 << 20

_buffers = threading.local()


class SegmentFile(NamedTuple):
    """One file to encrypt: ``src`` into ``dst`` (or ``src`` itself, in place), under ``key``
    and ``iv``."""

    src: Path
    dst: Path
    key: bytes
    iv: bytes


#: Told of each file once its ciphertext is in place: its index in the list, and its length.
#: Called one at a time, from the encrypting threads.
OnEncrypted = Callable[[int, int], None]


def iv_for_sequence(media_sequence: int) -> bytes:
    """The IV a player derives when EXT-X-KEY has no IV attribute: the media sequence number
    as a 128-bit big-endian integer (RFC 8216 §5.2)."""
    return media_sequence.to_bytes(BLOCK, "big")


def _piece_buffers(count: int) -> list[memoryview]:
    """This thread's first ``count`` piece buffers, each CHUNK bytes plus room for the padding
    block, made on first use and kept."""
    bufs: list[memoryview] | None = getattr(_buffers, "pieces", None)
    if bufs is None:
        bufs = _buffers.pieces = []
    while len(bufs) < count:
        bufs.append(memoryview(bytearray(CHUNK + BLOCK)))
    return bufs[:count]


def _read_exactly(fd: int, view: memoryview, offset: int) -> None:
    """Fill ``view`` from ``fd`` at ``offset``."""
    done = 0
    while done < len(view):
        read = os.preadv(fd, [view[done:]], offset + done)
        if not read:
            raise TransientError("a segment shrank while it was being encrypted")
        done += read


def _write_all_fd(fd: int, view: memoryview, offset: int) -> None:
    # Writes may be short; loop until the kernel has taken every byte.
    done = 0
    while done < len(view):
        done += os.pwrite(fd, view[done:], offset + done)


class _OpenFile:
    """A file being encrypted in a lane: where its next piece is, and where it goes."""

    def __init__(self, index: int, job: SegmentFile, *, in_place: bool) -> None:
        self.index = index
        self.dst = job.dst
        self.tmp: Path | None = None
        self.fd_in = os.open(job.src, os.O_RDWR if in_place else os.O_RDONLY)
        self.fd_out = self.fd_in
        try:
            self.size = os.fstat(self.fd_in).st_size
            if not in_place:
                self.tmp = _tmp_for(job.dst)
                self.fd_out = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except BaseException:
            os.close(self.fd_in)
            raise
        self.offset = 0

    def done(self) -> None:
        """Close the file; a new one takes its final name."""
        self._close()
        if self.tmp is not None:
            os.replace(self.tmp, self.dst)

    def abandon(self) -> None:
        self._close()
        if self.tmp is not None:
            self.tmp.unlink(missing_ok=True)

    def _close(self) -> None:
        if self.fd_out != self.fd_in:
            os.close(self.fd_out)
        os.close(self.fd_in)


def _encrypt_share(
    jobs: Sequence[SegmentFile], take: Callable[[], int | None],
    *, width: int, in_place: bool, on_encrypted: OnEncrypted, backend: aes.Backend,
) -> None:
    """Encrypt the files ``take`` hands out, one per lane of ``width``, until it hands out no
    more; ``on_encrypted`` is told of each one done."""
    lanes = backend.lanes(width)
    bufs = _piece_buffers(lanes.width)
    files: list[_OpenFile | None] = [None] * lanes.width
    try:
        while True:
            for lane in range(lanes.width):
                if files[lane] is None:
                    index = take()
                    if index is None:
                        break
                    job = jobs[index]
                    files[lane] = _OpenFile(index, job, in_place=in_place)
                    lanes.start(lane, job.key, job.iv)
            pieces, opened = [], []
            for lane, file in enumerate(files):
                if file is not None:
                    length = min(CHUNK, file.size - file.offset)
                    _read_exactly(file.fd_in, bufs[lane][:length], file.offset)
                    pieces.append(aes.Piece(lane, bufs[lane], length,
                                            file.offset + length >= file.size))
                    opened.append(file)
            if not pieces:
                return
            for piece, file, length in zip(pieces, opened, lanes.encrypt(pieces), strict=True):
                _write_all_fd(file.fd_out, bufs[piece.lane][:length], file.offset)
                file.offset += length
                if piece.last:
                    files[piece.lane] = None
                    file.done()
                    on_encrypted(file.index, file.offset)
    finally:
        lanes.close()
        for file in files:
            if file is not None:
                file.abandon()


def _encrypt_all(
    jobs: Sequence[SegmentFile], *, in_place: bool, threads: int,
    on_encrypted: OnEncrypted | None, backend: aes.Backend | None,
) -> list[int]:
    chosen = backend or aes.default_backend()
    for job in jobs:
        check_key_iv(job.key, job.iv)
    written = [0] * len(jobs)
    lock = threading.Lock()
    failed = threading.Event()
    # A thread per LANES files at most: fewer files per thread would leave lanes idle.
    workers = max(1, min(threads, -(-len(jobs) // aes.LANES)))

    def told(index: int, length: int) -> None:
        written[index] = length
        if on_encrypted is not None:
            with lock:
                on_encrypted(index, length)

    def share(first: int) -> None:
        # Every workers-th file from the first: the threads get as many files each, so the
        # last files of the batch, when lanes go idle, are shared by the cores too.
        share_of = range(first, len(jobs), workers)
        mine = iter(share_of)

        def take() -> int | None:
            # Once a thread has failed the others finish their open files and take no more.
            return None if failed.is_set() else next(mine, None)

        try:
            # No more lanes (and piece buffers) than files: one file, as the sealer's, is one.
            _encrypt_share(jobs, take, width=max(1, min(aes.LANES, len(share_of))),
                           in_place=in_place, on_encrypted=told, backend=chosen)
        except BaseException:
            failed.set()
            raise

    if workers == 1:
        share(0)
    else:
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="encrypt") as pool:
            for future in [pool.submit(share, first) for first in range(workers)]:
                future.result()
    return written


def encrypt_files(
    jobs: Sequence[SegmentFile], *, threads: int = 1, on_encrypted: OnEncrypted | None = None,
    backend: aes.Backend | None = None,
) -> list[int]:
    """Encrypt each job's ``src`` into its ``dst`` (each written atomically), up to
    :data:`~pipeline.aes.LANES` files at once on each of up to ``threads`` threads; returns
    each job's ciphertext length. The files must be distinct; on an error, no ``dst`` of a file
    not yet finished is written. ``backend``: :func:`pipeline.aes.default_backend` unless
    given."""
    return _encrypt_all(jobs, in_place=False, threads=threads, on_encrypted=on_encrypted,
                        backend=backend)


def encrypt_files_in_place(
    jobs: Sequence[SegmentFile], *, threads: int = 1, on_encrypted: OnEncrypted | None = None,
    backend: aes.Backend | None = None,
) -> list[int]:
    """:func:`encrypt_in_place` on each job's ``src`` (its ``dst`` is not used), up to
    :data:`~pipeline.aes.LANES` files at once on each of up to ``threads`` threads."""
    return _encrypt_all(jobs, in_place=True, threads=threads, on_encrypted=on_encrypted,
                        backend=backend)


def encrypt_file(src: Path, dst: Path, key: bytes, iv: bytes) -> int:
    """Encrypt ``src`` into ``dst`` (written atomically); returns the ciphertext length."""
    return encrypt_files([SegmentFile(src, dst, key, iv)])[0]


def encrypt_in_place(path: Path, key: bytes, iv: bytes) -> int:
    """Replace the plaintext in ``path`` with its ciphertext, in the same file; returns the
    ciphertext length (the file grows by the 1-16 padding bytes).

    Each piece is read into this thread's buffer, encrypted there and written back where it
    was: the file keeps its page-cache pages, so no new page is written (which, on a VM that
    hands freed memory back to its host, is what makes writing new files slow). Mapping the
    file instead was measured too: faster on tmpfs (1.1 against 0.95 GB/s), slower on ext4
    (0.88 against 1.1 GB/s, a page_mkwrite per page), where work stores live.

    Not atomic: a file interrupted half way is neither plaintext nor ciphertext, and encrypting
    a file twice makes it unplayable. The caller must own the file and record that it is done
    (the segment stage's sealing names sealed segments in its ``produced`` output only after
    every one of them is sealed)."""
    return encrypt_files_in_place([SegmentFile(path, path, key, iv)])[0]


def _tmp_for(dst: Path) -> Path:
    # Unique per call, not per process: two threads may write the same name at once.
    return dst.with_name(f".{dst.name}.{uuid.uuid4().hex}.tmp")


def _write_all(fout: object, view: memoryview) -> int:
    # Unbuffered writes may be short; loop until the kernel has taken every byte.
    done = 0
    while done < len(view):
        done += fout.write(view[done:])  # type: ignore[attr-defined]
    return done


def decrypt_file(src: Path, dst: Path, key: bytes, iv: bytes) -> int:
    """Decrypt ``src`` into ``dst`` (atomically), streaming; returns the plaintext length."""
    check_key_iv(key, iv)
    size = src.stat().st_size
    if size == 0 or size % BLOCK:
        raise PermanentError(
            f"{src.name}: ciphertext length {size} is not a positive multiple of 16 (a "
            "corrupted segment); package the asset again from its source"
        )
    decryptor = Cipher(algorithms.AES(key), modes.CBC(iv)).decryptor()
    inbuf = bytearray(DECRYPT_CHUNK)
    outbuf = bytearray(DECRYPT_CHUNK + BLOCK - 1)
    inview, outview = memoryview(inbuf), memoryview(outbuf)
    tmp = _tmp_for(dst)
    # The last block holds the padding: everything before it is streamed straight out.
    body = size - BLOCK
    remaining = body
    written = 0
    with src.open("rb", buffering=0) as fin, tmp.open("wb", buffering=0) as fout:
        while remaining:
            read = fin.readinto(inview[: min(DECRYPT_CHUNK, remaining)])
            if not read:
                tmp.unlink()
                raise TransientError(f"{src.name} shrank while being decrypted")
            remaining -= read
            produced = decryptor.update_into(inview[:read], outbuf)
            written += _write_all(fout, outview[:produced])
        last = fin.read(BLOCK)
        plain = decryptor.update(last) + decryptor.finalize()
        pad = plain[-1]
        if not 1 <= pad <= BLOCK or plain[-pad:] != bytes([pad]) * pad:
            tmp.unlink()
            raise PermanentError(
                f"{src.name}: bad PKCS#7 padding: wrong key or IV, or a corrupted segment; "
                "package the asset again from its source"
            )
        written += _write_all(fout, memoryview(plain[:-pad]))
    os.replace(tmp, dst)
    return written
