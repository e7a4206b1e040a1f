"""The audit trail, in-process: one structured event per key request, whatever its outcome,
and no token, signature or key in any log event."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
import structlog

from keyserver_support import (
    ASSET,
    OTHER,
    VIEWER_IP,
    AppClient,
    Library,
    shared_library,
    tamper,
    wait_for_fresh_window,
)

#: Any JWS at all (header and payload are base64 JSON objects, so they start with "eyJ").
_JWS = re.compile(r"eyJ[A-Za-z0-9_-]*\.eyJ[A-Za-z0-9_-]*\.[A-Za-z0-9_-]*")


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory, copy_clip: Path) -> Library:
    return shared_library(tmp_path_factory, copy_clip)


class TestAuditLog:
    def test_every_key_request_is_one_audit_event_without_token_or_key(
        self, pristine: Library, tmp_path: Path
    ) -> None:
        """Each key request (served, 401, 403, unknown, gone, rate limited) yields exactly one
        "key request" event with asset, key_id, the token's sid, client_ip and outcome; no
        captured event holds a token, a signature, or a key in bytes or hex."""
        library = pristine.copy(tmp_path)  # a version of it is retired
        library.retire_until(library.old_version, time.time() - 1)
        app = library.app(HLSVAULT_RATE_LIMIT_TOKEN="2", HLSVAULT_RATE_LIMIT_IP="0")
        bound = library.token(sid="sess-a", ip=VIEWER_IP)
        plain = library.token()
        other = library.token(OTHER)
        tampered = tamper(plain)
        old = library.old_version
        # (path, token, sid, expected outcome, expected sid in the event)
        requests = [
            (library.key_path(0), bound, "sess-a", "served", "sess-a"),
            (library.key_path(1), bound, "sess-a", "served", "sess-a"),
            (library.key_path(0), bound, "sess-a", "rate limited", "sess-a"),
            (library.key_path(0), tampered, None, "denied 401", None),
            (library.key_path(0), other, None, "denied 403", None),
            (library.key_path(0), None, None, "denied 401", None),
            (library.key_path(7), plain, None, "unknown key", None),
            (library.key_path(0, version=old), plain, None, "gone", None),
        ]
        wait_for_fresh_window()
        with structlog.testing.capture_logs() as events, \
                AppClient(app, client_ip=VIEWER_IP) as client:
            for path, token, sid, _, _ in requests:
                params = {"token": token} if token else {}
                if sid:
                    params["sid"] = sid
                client.get(path, params=params)
            # Playlists with the token in the query and in a header are logged too.
            client.get(f"/v1/assets/{ASSET}/master.m3u8", params={"token": plain})
            client.get(f"/v1/assets/{ASSET}/{library.rendition}.m3u8",
                       headers={"Authorization": f"Bearer {plain}"})

        audits = [e for e in events if e.get("event") == "key request"]
        assert [
            (e["asset"], e["key_id"], e["sid"], e["client_ip"], e["outcome"]) for e in audits
        ] == [
            (ASSET, path.split("/", 4)[4], event_sid, VIEWER_IP, outcome)
            for path, _, _, outcome, event_sid in requests
        ]
        secrets = [bound, plain, other, tampered]
        secrets += [t.rsplit(".", 1)[1] for t in secrets]
        for event in events:
            text = repr(event)
            assert not [s for s in secrets if s in text], event
            assert not _JWS.search(text), event
            for key in library.keys.values():
                assert key.hex() not in text.lower() and repr(key) not in text, event
        assert len(events) > len(audits)  # the access log's lines were captured as well
