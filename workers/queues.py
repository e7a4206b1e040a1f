"""Queue names, grouped by what their actors spend: CPU, or waiting on storage."""

from __future__ import annotations

from enum import StrEnum


class Queue(StrEnum):
    #: ffprobe and planning: light, mostly waiting on the source.
    PROBE = "probe"
    #: ffmpeg remux or transcode: CPU-bound, scale with cores.
    SEGMENT = "segment"
    #: AES over every segment: CPU-bound but fast, one message per chunk.
    ENCRYPT = "encrypt"
    #: playlists, uploads, invalidation: I/O-bound, many threads per process.
    PUBLISH = "publish"
