"""WebVTT's one shared rule: how a time is written (subtitle segments, the thumbnail track)."""

from __future__ import annotations


def timestamp(seconds: float) -> str:
    """A WebVTT timestamp, hours always written: ``01:02:03.456``."""
    millis = max(0, round(seconds * 1000))
    hours, rest = divmod(millis, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    return f"{hours:02d}:{minutes:02d}:{rest // 1000:02d}.{rest % 1000:03d}"
