"""Audit and access lines written off the event loop, by a background thread.

A request only appends a tuple (logger, event, fields, time) to a bounded queue: no
formatting, no lock held by a writer, no system call. A thread wakes every
:data:`FLUSH_INTERVAL_S`, takes what is queued and hands it, in order, to the sink: by default
structlog (what tests capture), or, where the process writes JSON lines (`hlsvault serve`
with stderr not a terminal), :class:`JsonLinesSink`, which renders the same JSON lines with
the same redaction and writes a whole batch at once. When the sink falls so far
behind that the queue is full, a new line is dropped rather than make a request wait: it is
counted (:attr:`LineWriter.dropped`, exported by the ops app's ``/metrics`` as
``hlsvault_audit_lines_dropped_total``) and the writer logs how many were dropped as soon as
it catches up. Closing the writer (the app's shutdown) writes everything still queued.

The key server's writer (``autostart=False``) runs its thread only between the app's startup
and shutdown (lifespan); an app called without a lifespan (a test calling it directly) has its
lines written as they come, in the request, so none is written after the test is over.
"""

from __future__ import annotations

import functools
import json
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from json.encoder import encode_basestring_ascii
from typing import Any, TextIO

import structlog

from pipeline.logs import REDACTED, redact_processor, redact_text, secret_name

#: Lines queued at most: a few seconds of a busy key server's lines (~300 bytes each, ~20 MB),
#: enough to ride out a log sink that stalls briefly; beyond it lines are dropped and counted.
MAX_QUEUED = 65_536
#: How often the writer looks for lines: the most a line waits before it is written.
FLUSH_INTERVAL_S = 0.05
#: Lines handed to the sink at once. Between two batches the writer lets the event loop's
#: thread have the interpreter (a thread that keeps it would hold a request up for as long as
#: the interpreter's switch interval, 5 ms): a batch is a fraction of a millisecond of work.
BATCH = 64
#: Shutting down, the writer gets this long to write what is queued.
CLOSE_TIMEOUT_S = 5.0

#: One line: logger name, event, fields, when it was written (time.time()).
Line = tuple[str, str, dict[str, Any], float]
Sink = Callable[[Sequence[Line]], None]


def structlog_sink(lines: Sequence[Line]) -> None:
    """Each line through structlog at level info, as a direct call would have written it."""
    for logger, event, fields, _ in lines:
        structlog.get_logger(logger).info(event, **fields)


#: The keys a line's record adds after its fields: a field of one of these names would be
#: overwritten in its place, so such a line takes the general path.
_RECORD_KEYS = frozenset({"event", "level", "logger", "timestamp"})
#: Values this short recur line after line (an asset, a key id, an address, an outcome): their
#: redacted JSON text is remembered, in a bounded cache.
_CACHED_VALUE_CHARS = 64


@functools.lru_cache(maxsize=1024)  # field names come from the code: a few dozen
def _json_name(name: str) -> tuple[str, bool] | None:
    """``"name": `` as the JSON encoder writes it, and whether the field holds a secret; None
    for a name the general path must render."""
    if name.__class__ is not str or name in _RECORD_KEYS:
        return None
    return f"{encode_basestring_ascii(name)}: ", secret_name(name)


@functools.lru_cache(maxsize=4096)
def _json_short_text(value: str) -> str:
    return encode_basestring_ascii(redact_text(value))


@functools.lru_cache(maxsize=256)  # (event, logger) pairs come from the code
def _json_tail(event: str, logger: str) -> str:
    return (f"\"event\": {encode_basestring_ascii(event)}, \"level\": \"info\", "
            f"\"logger\": {encode_basestring_ascii(logger)}, \"timestamp\": ")


_JSON_REDACTED = encode_basestring_ascii(REDACTED)


def json_fields(fields: dict[str, Any]) -> list[str] | None:
    """``fields`` redacted as :func:`~pipeline.logs.redact_processor` redacts them, each
    ``"name": value`` as :class:`json.JSONEncoder` writes it; None when one is of a kind only
    the encoder itself renders (anything but text, None, bool, int and finite float) or has a
    record key's name."""
    parts = []
    for name, value in fields.items():
        named = _json_name(name)
        if named is None:
            return None
        key, secret = named
        kind = value.__class__
        if secret:
            text = _JSON_REDACTED
        elif kind is str:
            text = (_json_short_text(value) if len(value) <= _CACHED_VALUE_CHARS
                    else encode_basestring_ascii(redact_text(value)))
        elif value is None:
            text = "null"
        elif kind is int:
            text = int.__repr__(value)
        elif kind is bool:
            text = "true" if value else "false"
        elif kind is float and math.isfinite(value):
            text = float.__repr__(value)
        else:
            return None
        parts.append(key + text)
    return parts


class JsonLinesSink:
    """The JSON lines :func:`pipeline.logs.configure_logging` writes (fields, event, level,
    logger, timestamp; every value redacted), a batch in one write to ``stream``.

    A line of plain values (text, None, numbers: every audit and access line) is put together
    from pieces remembered across lines (each field name, each short value redacted and
    encoded, the event and logger), the text :class:`json.JSONEncoder` writes for the record;
    any other line is redacted and encoded whole (``tests/test_keyserver_auditlog.py``
    compares both on random lines)."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self._second = -1.0
        self._second_text = ""
        # default=repr: a field JSON cannot encode is shown, not the cause of a lost batch.
        self._encode = json.JSONEncoder(default=repr).encode

    def timestamp(self, when: float) -> str:
        """``datetime.fromtimestamp(when, UTC).isoformat()`` with ``Z`` for ``+00:00``; the
        date and time of day formatted once a second, not once a line."""
        second, fraction = divmod(when, 1.0)
        micros = round(fraction * 1e6)
        if micros >= 1_000_000:
            second, micros = second + 1, micros - 1_000_000
        if second != self._second:
            self._second = second
            self._second_text = datetime.fromtimestamp(second, UTC).isoformat()[:19]
        return f"{self._second_text}.{micros:06d}Z" if micros else f"{self._second_text}Z"

    def render(self, line: Line) -> str:
        """One line's JSON text."""
        logger, event, fields, when = line
        if event.__class__ is str and logger.__class__ is str:
            parts = json_fields(fields)
            if parts is not None:
                parts.append(f'{_json_tail(event, logger)}"{self.timestamp(when)}"}}')
                return "{" + ", ".join(parts)
        return self.render_record(line)

    def render_record(self, line: Line) -> str:
        """One line's JSON text, by redacting its record and encoding it whole."""
        logger, event, fields, when = line
        record = redact_processor(None, "info", dict(fields))
        record["event"] = event
        record["level"] = "info"
        record["logger"] = logger
        record["timestamp"] = self.timestamp(when)
        text: str = self._encode(record)
        return text

    def __call__(self, lines: Sequence[Line]) -> None:
        rendered = [self.render(line) for line in lines]
        rendered.append("")
        self.stream.write("\n".join(rendered))
        self.stream.flush()


class LineWriter:
    """A bounded queue of log lines and the thread that writes them to ``sink``."""

    def __init__(
        self, *, sink: Sink = structlog_sink, max_queued: int = MAX_QUEUED,
        flush_interval_s: float = FLUSH_INTERVAL_S, autostart: bool = True,
    ) -> None:
        if max_queued < 1:
            raise ValueError("max_queued must be at least 1")
        self.sink = sink
        self.max_queued = max_queued
        self.flush_interval_s = flush_interval_s
        self.autostart = autostart
        self._queue: deque[Line] = deque()
        #: Lines accepted, lines the sink has taken, lines dropped because the queue was full.
        self.accepted = 0
        self.written = 0
        self.dropped = 0
        self._dropped_reported = 0
        #: The running thread and the event that stops it: each thread has its own, so a
        #: thread a timed-out close left behind (its sink stuck) stops once it gets free even
        #: when a later line has started another.
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._start_lock = threading.Lock()
        #: Held while a batch is taken from the queue and handed to the sink, so that two
        #: threads (the one left behind and its successor) never write at once or out of order.
        self._drain_lock = threading.Lock()

    def write(self, logger: str, event: str, fields: dict[str, Any]) -> None:
        """Queue one line; never blocks. Safe from any thread (deque appends are atomic)."""
        if len(self._queue) >= self.max_queued:
            self.dropped += 1
            return
        self.accepted += 1
        line = (logger, event, fields, time.time())
        if self._thread is None and not self.autostart:
            self._queue.append(line)
            self._drain(pause=False)  # no thread: written now, in order after what was queued
            return
        self._queue.append(line)
        if self._thread is None:
            self.start()

    def start(self) -> None:
        with self._start_lock:
            if self._thread is not None:
                return
            self._stop = threading.Event()
            self._thread = threading.Thread(
                target=self._run, args=(self._stop,), name="hlsvault-log-writer", daemon=True
            )
            self._thread.start()

    def close(self, timeout_s: float = CLOSE_TIMEOUT_S) -> None:
        """Write what is queued and stop the thread (a later line starts it again). A sink
        stuck for longer than ``timeout_s`` keeps its thread: it stops once the sink returns,
        after writing what is queued then, and a thread started meanwhile waits its turn."""
        with self._start_lock:
            thread, self._thread = self._thread, None
            stop = self._stop
        if thread is None:
            self._drain()
            return
        stop.set()
        thread.join(timeout_s)

    def _run(self, stop: threading.Event) -> None:
        while not stop.wait(self.flush_interval_s):
            self._drain()
        self._drain()

    def _drain(self, *, pause: bool = True) -> None:
        queue = self._queue
        while queue:
            with self._drain_lock:
                batch = [queue.popleft() for _ in range(min(BATCH, len(queue)))]
                try:
                    self.sink(batch)
                except Exception as error:  # a broken sink must not kill the writer
                    structlog.get_logger("hlsvault.keyserver").error(
                        "log lines not written", lines=len(batch), error=type(error).__name__
                    )
                self.written += len(batch)
            if pause:
                time.sleep(0)  # the event loop first, if it waits for the interpreter
        dropped = self.dropped
        if dropped != self._dropped_reported:
            self._dropped_reported = dropped
            structlog.get_logger("hlsvault.keyserver").warning(
                "log lines dropped: the log sink fell behind and the queue was full",
                dropped_total=dropped, max_queued=self.max_queued,
            )
