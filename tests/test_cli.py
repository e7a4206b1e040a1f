"""The command line as a new user meets it: exit statuses that say whose fault a failure is, and
the first-run traps (a data directory that is not the one packaged into, a token lifetime the
deployment refuses, key rotation that cannot happen) each answered with one line."""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
from pathlib import Path

import jwt
import pytest

from pipeline.layout import asset_from_name

from support import HLSVAULT, ROOT, VENV_BIN, Hlsvault, lavfi_clip


class TestAssetIdFromFileName:
    def test_accents_and_punctuation_give_one_valid_id(self) -> None:
        """The name every entry point derives for `Café (final).mp4` is valid and readable."""
        assert asset_from_name("uploads/2024/Café (final).mp4") == "Cafe-final"
        assert asset_from_name("/videos/My Film.v2.mov") == "My-Film-v2"

    def test_a_name_with_nothing_usable_gives_none(self) -> None:
        """No id is invented for a name of only punctuation; the caller asks for --asset."""
        assert asset_from_name("((( ))).mp4") is None

    def test_packaging_a_file_named_with_accents_publishes_under_the_derived_id(
        self, hlsvault: Hlsvault, copy_clip: Path, tmp_path: Path
    ) -> None:
        """`hlsvault package 'Café (final).mp4'` with no --asset publishes `Cafe-final`."""
        source = tmp_path / "Café (final).mp4"
        source.write_bytes(copy_clip.read_bytes())

        done = hlsvault.package(str(source), "--ladder", "copy", "--json")

        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["asset"] == "Cafe-final"


class TestSourceArgument:
    @pytest.mark.parametrize(("source", "says"), [
        ("ftp://user:secret@host/talk.mp4", "source ftp://… is neither a local path"),
        ("HTTP://host/talk.mp4", "write the scheme in lower case: http://…"),
        ("S3://bucket/talk.mp4", "S3 URLs are lower case, s3://bucket/key"),
        ("file:///videos/talk.mp4", "give the path itself"),
    ])
    def test_a_url_of_a_scheme_hlsvault_does_not_read_is_refused_before_any_job(
        self, hlsvault: Hlsvault, source: str, says: str
    ) -> None:
        """A usage error in one line, showing the scheme alone, and no job queued."""
        done = hlsvault.package(source, "--asset", "talk", "--ladder", "copy")

        assert done.returncode == 2, done.stderr
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and says in lines[0], done.stderr
        assert "secret" not in done.stderr
        assert not (hlsvault.data_dir / "jobs").exists() or not any(
            p.is_file() for p in (hlsvault.data_dir / "jobs").rglob("*"))

    def test_a_sidecar_url_is_refused_before_any_job(
        self, hlsvault: Hlsvault, copy_clip: Path
    ) -> None:
        done = hlsvault.package(str(copy_clip), "--ladder", "copy",
                                "--subtitles", "de=FTP://user:secret@host/talk.vtt")

        assert done.returncode == 2, done.stderr
        assert "FTP://…" in done.stderr and "URLs are not fetched" in done.stderr
        assert "secret" not in done.stderr
        assert not (hlsvault.data_dir / "jobs").exists() or not any(
            p.is_file() for p in (hlsvault.data_dir / "jobs").rglob("*"))

    def test_a_path_with_two_slashes_further_on_is_a_local_file(
        self, hlsvault: Hlsvault, copy_clip: Path, tmp_path: Path
    ) -> None:
        """`media/a://b.mp4` is the file b.mp4 in the directory media/a: of where hlsvault was
        started, and the job names it by its absolute path (a worker runs elsewhere)."""
        (tmp_path / "media" / "a:").mkdir(parents=True)
        shutil.copyfile(copy_clip, tmp_path / "media" / "a:" / "b.mp4")

        done = hlsvault.package("media/a://b.mp4", "--asset", "b", "--ladder", "copy", "--json")

        assert done.returncode == 0, done.stderr
        status = hlsvault.run("status", json.loads(done.stdout)["job_id"], "--json")
        assert json.loads(status.stdout)["source"] == str(
            tmp_path / "media" / "a:" / "b.mp4")


class TestStatusShowsNoCredential:
    def test_a_presigned_source_with_userinfo_is_shown_redacted(
        self, hlsvault: Hlsvault
    ) -> None:
        """A job whose source URL holds a password and a presigned signature fails (nothing
        listens there); `hlsvault status`, as JSON and as text, names the source without
        either, and its host and path stay readable."""
        source = ("http://alice:s3cr3tpw@127.0.0.1:9/film.mp4"
                  "?X-Amz-Credential=AKIAEXAMPLE&X-Amz-Signature=deadbeefsig")
        done = hlsvault.package(source, "--asset", "film", "--ladder", "copy", "--json")
        assert done.returncode == 1, done.stderr
        job_id = json.loads(done.stdout)["job_id"]

        as_json = hlsvault.run("status", job_id, "--json")
        as_text = hlsvault.run("status", job_id)

        shown = json.loads(as_json.stdout)["source"]
        assert shown.startswith("http://") and "127.0.0.1:9/film.mp4" in shown
        for output in (as_json.stdout, as_text.stdout, as_json.stderr, as_text.stderr):
            for secret in ("s3cr3tpw", "AKIAEXAMPLE", "deadbeefsig"):
                assert secret not in output


class TestDataDirectory:
    def test_token_in_a_directory_never_packaged_into_refuses_and_creates_nothing(
        self, hlsvault: Hlsvault
    ) -> None:
        """A token minted with a freshly generated secret would be refused by the running key
        server: the CLI refuses instead, names the directory and says what to set."""
        done = hlsvault.run("token", "film")

        assert done.returncode == 78, done.stderr
        assert str(hlsvault.data_dir) in done.stderr and "HLSVAULT_DATA_DIR" in done.stderr
        assert len(done.stderr.strip().splitlines()) == 1
        assert not (hlsvault.data_dir / "secrets").exists()


class TestTokenLifetime:
    def test_url_without_ttl_fits_a_short_max_ttl(
        self, hlsvault: Hlsvault, copy_clip: Path
    ) -> None:
        """With HLSVAULT_TOKEN_MAX_TTL=100, a plain `hlsvault url` mints a 100 s token instead
        of failing about a --ttl nobody gave."""
        packaged = hlsvault.package(str(copy_clip), "--asset", "short", "--ladder", "copy")
        assert packaged.returncode == 0, packaged.stderr
        hlsvault.env["HLSVAULT_TOKEN_MAX_TTL"] = "100"

        done = hlsvault.run("url", "short")

        assert done.returncode == 0, done.stderr
        token = done.stdout.strip().split("token=", 1)[1].split("&", 1)[0]
        claims = jwt.decode(token, options={"verify_signature": False})
        assert claims["exp"] - claims["iat"] == 100

    def test_an_explicit_ttl_over_the_max_is_a_usage_error(
        self, hlsvault: Hlsvault, copy_clip: Path
    ) -> None:
        packaged = hlsvault.package(str(copy_clip), "--asset", "short", "--ladder", "copy")
        assert packaged.returncode == 0, packaged.stderr
        hlsvault.env["HLSVAULT_TOKEN_MAX_TTL"] = "100"

        done = hlsvault.run("token", "short", "--ttl", "101")

        assert done.returncode == 2
        assert "--ttl must be between 1 and 100" in done.stderr


class TestKeyRotationWarning:
    def test_rotation_that_cannot_happen_is_said_on_stderr(self, hlsvault: Hlsvault) -> None:
        """A 3 s clip with a single keyframe remuxes into one segment: rotation every 2 segments
        cannot happen, and the user is told so (the job still succeeds with one key)."""
        clip = lavfi_clip("one-keyframe.mp4", seconds=3, gop=1000)

        done = hlsvault.package(
            str(clip), "--asset", "onekey", "--ladder", "copy", "--key-rotation-segments", "2",
            "--json",
        )

        assert done.returncode == 0, done.stderr
        assert "--key-rotation-segments 2" in done.stderr and "one key" in done.stderr
        summary = json.loads(done.stdout)
        assert summary["keys"] == 1 and summary["warnings"]


class TestWorkerStart:
    @pytest.mark.slow
    def test_a_misconfigured_worker_says_what_to_set_in_one_line(self, tmp_path: Path) -> None:
        """The Procfile's worker command with REDIS_URL but no CDN URL exits with the mend in
        one line of ours, not a traceback per worker process."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("HLSVAULT_", "REDIS_"))}
        env.update(REDIS_URL="redis://127.0.0.1:1/0", PYTHONPATH=str(ROOT),
                   HLSVAULT_DATA_DIR=str(tmp_path / "data"))

        done = subprocess.run(
            # dramatiq's main process waits --worker-fork-timeout (30 s) for a worker that died.
            [str(VENV_BIN / "dramatiq"), "workers.entry", "--processes", "1", "--threads", "1",
             "--worker-fork-timeout", "2000"],
            env=env, cwd=ROOT, capture_output=True, text=True, timeout=120, check=False,
        )

        assert done.returncode == 78  # EX_CONFIG, passed on by dramatiq's main process
        ours = [line for line in done.stderr.splitlines() if line.startswith("hlsvault worker:")]
        assert len(ours) == 1 and "HLSVAULT_CDN_URL is not set" in ours[0]
        assert "Traceback" not in done.stderr


class TestTransientFailures:
    @pytest.mark.slow
    def test_redis_down_is_exit_75_with_one_line(self, tmp_path: Path) -> None:
        """A fleet command whose Redis does not answer (after the client's bounded reconnects,
        ~20 s) says so in one line and exits 75 (try again later), not 2 (usage) or a
        traceback."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("HLSVAULT_", "REDIS_"))}
        env.update(
            REDIS_URL="redis://127.0.0.1:1/0", PYTHONPATH=str(ROOT),
            HLSVAULT_CDN_URL="https://cdn.example", HLSVAULT_TOKEN_SECRET="s" * 40,
            HLSVAULT_MASTER_KEY=base64.b64encode(b"k" * 32).decode(),
            HLSVAULT_DATA_DIR=str(tmp_path / "data"),
        )

        done = subprocess.run(
            [*HLSVAULT, "status", "0123456789abcdef"], env=env, capture_output=True, text=True,
            timeout=120, check=False,
        )

        assert done.returncode == 75, done.stderr
        assert done.stderr.strip().splitlines() == [
            "hlsvault: Redis did not answer (ConnectionError); check REDIS_URL and that Redis "
            "is up, then try again"
        ]


class TestServeOptions:
    """`hlsvault serve` refuses worker counts and servers it cannot run, saying what to do,
    before anything listens."""

    @pytest.mark.parametrize("args, code, says", [
        (["--workers", "0"], 78, "--workers must be at least 1"),
        (["--workers", "-3"], 78, "--workers must be at least 1"),
        (["--workers", "many"], 2, "invalid int value"),
        (["--server", "nginx"], 2, "invalid choice"),
        (["--server", "x" * 5000], 2, "invalid choice"),
    ])
    def test_bad_options_are_refused(
        self, hlsvault: Hlsvault, args: list[str], code: int, says: str
    ) -> None:
        done = hlsvault.run("serve", "--port", "1", *args, timeout=30)
        assert done.returncode == code, done.stderr
        assert says in done.stderr
        assert "Traceback" not in done.stderr
