"""Redaction: no token, signature, credential or key bytes survive into a log line, whichever
way they arrive (a query string, a bare JWT, a Bearer header, a field named like a secret)."""

from __future__ import annotations

import io
import json
import logging

import pytest
import structlog

from pipeline.logs import REDACTED, configure_logging, redact_text

JWT = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJmaWxtIiwiZXhwIjo5OTk5OTk5OTk5fQ.c2lnbmF0dXJlLWJ5dGVz"


class TestRedactText:
    @pytest.mark.parametrize(
        ("text", "secret"),
        [
            (f"GET /v1/keys/film/v1/0?token={JWT}&sid=abc", JWT),
            ("https://b.s3.amazonaws.com/k.mp4?X-Amz-Signature=deadbeef&X-Amz-Credential=AKIA1/x",
             "deadbeef"),
            ("https://b.s3.amazonaws.com/k.mp4?X-Amz-Signature=deadbeef&X-Amz-Credential=AKIA1/x",
             "AKIA1"),
            (f"Authorization: Bearer {JWT}", JWT),
            (f"ffmpeg could not open {JWT}", JWT),
            ("https://d.example.net/a/seg.ts?Policy=x&Signature=s3cr3t&Key-Pair-Id=K1", "s3cr3t"),
            ("could not open https://alice:s3cr3t@media.example/film.mp4", "s3cr3t"),
            ("fetching https://ghp_t0k3n@media.example/film.mp4 failed", "ghp_t0k3n"),
            ("could not open https://alice:p@ssw0rd@media.example/film.mp4", "ssw0rd"),
        ],
        ids=["query-token", "s3-signature", "s3-credential", "bearer", "bare-jwt", "cf-signature",
             "url-password", "url-user-token", "url-password-with-at"],
    )
    def test_the_secret_is_gone_and_the_rest_kept(self, text: str, secret: str) -> None:
        redacted = redact_text(text)
        assert secret not in redacted
        assert REDACTED in redacted

    def test_text_without_secrets_is_unchanged(self) -> None:
        text = "segment 720p/seg_00003.ts uploaded in 0.2 s (sid=abc)"
        assert redact_text(text) == text

    @pytest.mark.parametrize("text", [
        "mail ops@example.com about s3://bucket/film.mp4",
        "https://media.example/films/a@2x.png",
    ])
    def test_an_at_sign_outside_a_urls_userinfo_is_kept(self, text: str) -> None:
        assert redact_text(text) == text

    def test_a_long_hostile_line_is_answered(self) -> None:
        """1 MB of word boundaries before an '@' (ffmpeg's stderr has one on most lines): the
        search stays linear (the quadratic first pattern took 17 s on 80 KB, so about 45 min
        here, far past the suite's 600 s timeout), the text comes back as it was, and a
        credential after it is still found."""
        text = "a." * 500_000 + "@"
        assert redact_text(text) == text
        assert "s3cr3t" not in redact_text(text + " https://u:s3cr3t@h/x")

    def test_the_host_and_path_after_userinfo_are_kept(self) -> None:
        assert redact_text("https://alice:s3cr3t@media.example/film.mp4") == (
            f"https://{REDACTED}@media.example/film.mp4")


class TestLogLines:
    def test_secret_fields_and_values_are_redacted_in_the_json_line(self) -> None:
        """What a log shipper receives: one JSON line with every secret replaced."""
        stream = io.StringIO()
        configure_logging(json=True, level=logging.INFO)
        handler = logging.getLogger().handlers[0]
        assert isinstance(handler, logging.StreamHandler)
        handler.setStream(stream)
        try:
            structlog.get_logger("test").info(
                "key request", token=JWT, url=f"/m3u8?token={JWT}", key_bytes=b"\x00" * 16,
                master_key="c2VjcmV0", asset="film",
            )
        finally:
            structlog.reset_defaults()
        line = json.loads(stream.getvalue().strip().splitlines()[-1])
        assert JWT not in stream.getvalue() and "c2VjcmV0" not in stream.getvalue()
        assert line["token"] == REDACTED and line["master_key"] == REDACTED
        assert line["key_bytes"] == REDACTED and line["asset"] == "film"
