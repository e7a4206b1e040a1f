"""Segment encryption: AES-128-CBC with PKCS#7 padding, as RFC 8216 §5.2 asks for METHOD=AES-128.

Segments are streamed through OpenSSL (via ``cryptography``) with ``update_into`` into buffers
allocated once per call, so a segment of any size costs two fixed 1 MiB buffers and no copies.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from .errors import PermanentError, TransientError

BLOCK = 16
#: Read size: large enough that per-call overhead vanishes next to AES, small enough for L2.
CHUNK = 1 << 20


def iv_for_sequence(media_sequence: int) -> bytes:
    """The IV a player derives when EXT-X-KEY has no IV attribute: the media sequence number
    as a 128-bit big-endian integer (RFC 8216 §5.2)."""
    return media_sequence.to_bytes(BLOCK, "big")


def _check(key: bytes, iv: bytes) -> None:
    if len(key) != BLOCK or len(iv) != BLOCK:
        raise ValueError("AES-128 needs a 16-byte key and a 16-byte IV")


def encrypt_file(src: Path, dst: Path, key: bytes, iv: bytes) -> int:
    """Encrypt ``src`` into ``dst`` (written atomically); returns the ciphertext length."""
    _check(key, iv)
    encryptor = Cipher(algorithms.AES(key), modes.CBC(iv)).encryptor()
    inbuf = bytearray(CHUNK)
    outbuf = bytearray(CHUNK + BLOCK - 1)
    inview, outview = memoryview(inbuf), memoryview(outbuf)
    tmp = _tmp_for(dst)
    total = 0
    written = 0
    try:
        with src.open("rb", buffering=0) as fin, tmp.open("wb", buffering=0) as fout:
            while True:
                read = fin.readinto(inbuf)
                if not read:
                    break
                total += read
                produced = encryptor.update_into(inview[:read], outbuf)
                written += _write_all(fout, outview[:produced])
            pad = BLOCK - total % BLOCK
            tail = encryptor.update(bytes([pad]) * pad) + encryptor.finalize()
            written += _write_all(fout, memoryview(tail))
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, dst)
    return written


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
    _check(key, iv)
    size = src.stat().st_size
    if size == 0 or size % BLOCK:
        raise PermanentError(
            f"{src.name}: ciphertext length {size} is not a positive multiple of 16 (a "
            "corrupted segment); package the asset again from its source"
        )
    decryptor = Cipher(algorithms.AES(key), modes.CBC(iv)).decryptor()
    inbuf = bytearray(CHUNK)
    outbuf = bytearray(CHUNK + BLOCK - 1)
    inview, outview = memoryview(inbuf), memoryview(outbuf)
    tmp = _tmp_for(dst)
    # The last block holds the padding: everything before it is streamed straight out.
    body = size - BLOCK
    remaining = body
    written = 0
    with src.open("rb", buffering=0) as fin, tmp.open("wb", buffering=0) as fout:
        while remaining:
            read = fin.readinto(inview[: min(CHUNK, remaining)])
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
