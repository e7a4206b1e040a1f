"""The audit and access lines' background writer: no line lost under a burst, no request held
up by a slow sink, and the lines it had to drop counted, logged and exported by the ops app's
``/metrics``."""

from __future__ import annotations

import base64
import io
import json
import random
import threading
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

import pytest
import structlog
from starlette.testclient import TestClient

from dashboard.app import create_app as create_ops_app
from keyserver import create_app
from keyserver.auditlog import JsonLinesSink, Line, LineWriter, json_fields
from keyserver.testing import get
from pipeline.settings import load_settings
from pipeline.tokens import mint_token

from fleet import RedisServer
from keyserver_support import VIEWER_IP, AppClient, Library, shared_library
from ops_support import PASSWORD, basic, series
from support import run_coroutine

#: How long a test's stuck sink waits at most for the test to release it.
SINK_STUCK_S = 30.0


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory, copy_clip: Path) -> Library:
    return shared_library(tmp_path_factory, copy_clip)


class RecordingSink:
    """Keeps every line it is given; stuck until released when ``stuck`` is set."""

    def __init__(self, *, stuck: bool = False) -> None:
        self.lines: list[Line] = []
        self.release = threading.Event()
        self.entered = threading.Event()
        if not stuck:
            self.release.set()

    def __call__(self, lines: Sequence[Line]) -> None:
        self.entered.set()
        self.release.wait(SINK_STUCK_S)
        self.lines.extend(lines)


class TestLineWriter:
    def test_a_burst_loses_no_line_and_keeps_their_order(self) -> None:
        """50 000 lines written as fast as one thread can: the sink receives each exactly
        once, in order, and none is dropped."""
        sink = RecordingSink()
        writer = LineWriter(sink=sink)
        for n in range(50_000):
            writer.write("hlsvault.audit", "key request", {"n": n})
        writer.close()

        assert [fields["n"] for _, _, fields, _ in sink.lines] == list(range(50_000))
        assert (writer.accepted, writer.written, writer.dropped) == (50_000, 50_000, 0)

    def test_a_full_queue_drops_and_counts_and_says_so(self) -> None:
        """With the sink stuck and room for 10 lines, the lines beyond are dropped and
        counted; once the sink moves, every accepted line is written and the drop is logged."""
        sink = RecordingSink(stuck=True)
        writer = LineWriter(sink=sink, max_queued=10)
        writer.write("hlsvault.audit", "key request", {"n": -1})
        assert sink.entered.wait(SINK_STUCK_S)  # the writer holds that line in the stuck sink
        for n in range(100):
            writer.write("hlsvault.audit", "key request", {"n": n})
        with structlog.testing.capture_logs() as events:
            sink.release.set()
            writer.close()

        assert writer.dropped == 90
        assert [(e["event"], e["dropped_total"]) for e in events if e["log_level"] == "warning"
                ] == [("log lines dropped: the log sink fell behind and the queue was full", 90)]
        assert writer.accepted == writer.written == len(sink.lines) == 11
        assert [fields["n"] for _, _, fields, _ in sink.lines] == [-1, *range(10)]


    def test_a_close_that_times_out_never_writes_twice_or_out_of_order(self) -> None:
        """The sink is stuck past close's timeout, so close leaves its thread behind; a later
        line starts a new thread. Once the sink is free every line is written once, in order,
        by one thread at a time, and no writer thread is left running."""
        sink = RecordingSink(stuck=True)
        writer = LineWriter(sink=sink)
        writer.write("hlsvault.audit", "key request", {"n": 0})
        assert sink.entered.wait(SINK_STUCK_S)
        for n in range(1, 200):
            writer.write("hlsvault.audit", "key request", {"n": n})
        writer.close(timeout_s=0.05)
        for n in range(200, 400):
            writer.write("hlsvault.audit", "key request", {"n": n})
        in_sink = threading.Semaphore(1)
        overlapped: list[bool] = []
        stuck_call = sink.__call__

        def guarded(lines: Sequence[Line]) -> None:
            overlapped.append(not in_sink.acquire(blocking=False))
            try:
                stuck_call(lines)
            finally:
                in_sink.release()

        writer.sink = guarded
        sink.release.set()
        writer.close()
        for thread in threading.enumerate():
            if thread.name == "hlsvault-log-writer":
                thread.join(SINK_STUCK_S)

        assert [fields["n"] for _, _, fields, _ in sink.lines] == list(range(400))
        assert writer.accepted == writer.written == 400
        assert not any(overlapped)
        assert not [t for t in threading.enumerate() if t.name == "hlsvault-log-writer"]


class TestSlowSink:
    def test_requests_are_answered_while_the_sink_is_stuck(
        self, pristine: Library, redis_server: RedisServer
    ) -> None:
        """Given a key server whose log sink is stuck, key requests are still answered with
        their key; the audit lines past the queue's room are dropped, counted, and the ops
        app's /metrics exports the count once the key server reports it."""
        sink = RecordingSink(stuck=True)
        writer = LineWriter(sink=sink, max_queued=5)
        settings = pristine.settings
        env = {**pristine.env, "REDIS_URL": redis_server.url,
               "HLSVAULT_TOKEN_SECRET": str(settings.token_secret),
               "HLSVAULT_MASTER_KEY": base64.b64encode(settings.master_key).decode(),
               "HLSVAULT_CDN_URL": "https://cdn.auditlog.test",
               "HLSVAULT_RATE_LIMIT_TOKEN": "0", "HLSVAULT_RATE_LIMIT_IP": "0"}
        app = create_app(load_settings(env), vault=pristine.vault, lines=writer)
        token = pristine.token()

        with AppClient(app, client_ip=VIEWER_IP) as client:
            first = client.get(pristine.key_path(), params={"token": token})
            assert sink.entered.wait(SINK_STUCK_S)
            answers = [client.get(pristine.key_path(), params={"token": token})
                       for _ in range(30)]
            assert {(a.status_code, a.content) for a in [first, *answers]} == {
                (200, pristine.key())}
            sink.release.set()
        # The app's shutdown wrote what was queued and reported the drops.

        assert writer.dropped == 31 - writer.accepted > 0
        audits = [line for line in sink.lines if line[1] == "key request"]
        assert len(audits) == writer.accepted
        ops = TestClient(
            create_ops_app(load_settings({**env, "HLSVAULT_OPS_PASSWORD": PASSWORD}),
                           redis=redis_server.client()),
            base_url="http://ops.test", headers={"Authorization": basic(PASSWORD)},
        )
        text = ops.get("/metrics").text
        assert series(text, "hlsvault_keyserver_log_lines_dropped_total") == writer.dropped

    def test_the_fast_path_queues_its_lines_without_the_lifespan(
        self, pristine: Library
    ) -> None:
        """Called with no lifespan (as some servers and tests do), the app starts its writer
        on the first line: every request's audit line reaches the sink."""
        sink = RecordingSink()
        writer = LineWriter(sink=sink)
        app = create_app(pristine.settings, vault=pristine.vault, lines=writer)
        token = pristine.token()

        async def requests() -> list[int]:
            return [(await get(app, pristine.key_path(n % 2), query=f"token={token}")).status
                    for n in range(20)]

        assert run_coroutine(requests()) == [200] * 20
        writer.close()
        assert [fields["outcome"] for _, event, fields, _ in sink.lines
                if event == "key request"] == ["served"] * 20


    def test_without_a_lifespan_the_servers_writer_writes_in_the_request(
        self, pristine: Library
    ) -> None:
        """The key server's own writer (``autostart=False``) with no lifespan to run its
        thread: a request's audit line is in the sink when the request returns, and no thread
        is left to write lines after the caller (a test) is done."""
        sink = RecordingSink()
        writer = LineWriter(sink=sink, autostart=False)
        app = create_app(pristine.settings, vault=pristine.vault, lines=writer)
        token = pristine.token()
        for n in range(3):
            answer = run_coroutine(get(app, pristine.key_path(0), query=f"token={token}"))
            assert answer.status == 200
            assert [event for _, event, _, _ in sink.lines].count("key request") == n + 1
        assert writer._thread is None


class TestJsonLines:
    def test_a_batch_is_json_lines_with_every_token_redacted(self) -> None:
        """The serving sink writes one JSON object per line (fields, event, level, logger, an
        ISO timestamp in UTC), with a token in any value redacted, as every log line is."""
        stream = io.StringIO()
        token = mint_token("a-secret-of-enough-length-for-hs256-0123", "film", 60)
        sink = JsonLinesSink(stream)
        sink([("hlsvault.keyserver", "request", {"path": f"/x?token={token}", "status": 200},
               0.0),
              ("hlsvault.audit", "key request", {"sid": token, "outcome": "served"}, 1.5)])

        first, second = (json.loads(line) for line in stream.getvalue().splitlines())
        assert first == {"path": "/x?token=[REDACTED]", "status": 200, "event": "request",
                         "level": "info", "logger": "hlsvault.keyserver",
                         "timestamp": "1970-01-01T00:00:00Z"}
        assert second["sid"] == "[REDACTED]"
        assert second["timestamp"] == "1970-01-01T00:00:01.500000Z"
        assert token not in stream.getvalue()

    def test_timestamps_are_those_datetime_writes(self) -> None:
        """The timestamp (formatted once a second) is ``datetime.isoformat``'s in UTC, to the
        microsecond, whole seconds and rounding up into the next second included."""
        sink = JsonLinesSink(io.StringIO())
        times = [1_765_000_000.0, 1_765_000_000.9999996, 1_765_000_001.0000004, 1_765_000_001.25]
        times += [random.uniform(0, 4e9) for _ in range(1000)]
        for when in times:
            expected = datetime.fromtimestamp(when, UTC).isoformat().replace("+00:00", "Z")
            assert sink.timestamp(when) == expected

    def test_lines_put_together_from_pieces_are_those_the_encoder_writes(self) -> None:
        """Every line the sink assembles from remembered pieces (field names, short values
        redacted and encoded, event and logger) is, character for character, the line its
        record encoded whole gives: audit and access lines, tokens anywhere, text that is not
        ASCII or needs escaping, long values, every plain kind of value, names that are
        secrets, and the lines only the encoder renders (record keys as field names, floats
        that are not finite, nested values)."""
        token = mint_token("a-secret-of-enough-length-for-hs256-0123", "film", 60)
        rng = random.Random(7)
        texts = ["film", "v1/0", "203.0.113.9", "served", "denied 401", "", "é\u2028\"\\\n",
                 f"/x?token={token}", token, f"Bearer {token}", "a=b", "x" * 64, "y" * 65,
                 f"{'z' * 70}?signature=abc", "\x00\x1f\x7f", "🎬"]
        values: list[object] = [*texts, None, True, False, 0, -3, 2**70, 0.0, 1.25, -0.1,
                                1e300, float("nan"), float("inf"), ["a", token], {"k": token},
                                b"\x00" * 16, ("t",)]
        names = ["asset", "key_id", "sid", "client_ip", "outcome", "path", "status", "ms",
                 "method", "token", "authorization", "key_bytes", "cookie_jar", "Secret", "é"]
        lines: list[Line] = [
            ("hlsvault.audit", "key request", {"asset": "film", "key_id": "v1/0", "sid": None,
                                               "client_ip": "203.0.113.9",
                                               "outcome": "served"}, 1_765_000_000.25),
            ("hlsvault.keyserver", "request", {"method": "GET", "path": "/v1/assets/f/m.m3u8",
                                               "status": 200, "ms": 0.12}, 1_765_000_000.0),
            ("hlsvault.audit", "key request", {}, 0.0),
            ("hlsvault.audit", "key request", {"event": "x", "asset": "film"}, 0.0),
            ("hlsvault.audit", "key request", {"timestamp": 1}, 0.0),
            ("logger\u00e9", "evént \"q\"", {"level": "debug"}, 0.0),
        ]
        for _ in range(3000):
            fields = {rng.choice(names): rng.choice(values) for _ in range(rng.randint(0, 7))}
            lines.append(("hlsvault.audit", rng.choice(["key request", "request"]), fields,
                          rng.uniform(0, 4e9)))
        sink = JsonLinesSink(io.StringIO())
        assembled = 0
        for line in lines:
            assert sink.render(line) == sink.render_record(line), line
            assembled += json_fields(line[2]) is not None
        # Positive control: both ways were taken, each many times.
        assert 1000 < assembled < len(lines) - 500
