"""Settings: loaded once from the environment, loud and helpful when wrong."""

from __future__ import annotations

import base64
import os
import stat
import subprocess
from pathlib import Path

import pytest

from pipeline.errors import ConfigurationError
from pipeline.settings import decode_master_key, load_settings

from support import HLSVAULT, free_port

KEY = os.urandom(32)


class TestEmbeddedSecrets:
    def test_missing_secrets_are_generated_once_with_mode_0600(self, tmp_path: Path) -> None:
        """Embedded mode creates its secrets on first use and reads the same ones afterwards."""
        env = {"HLSVAULT_DATA_DIR": str(tmp_path)}
        first = load_settings(env)
        second = load_settings(env)
        assert first.token_secret == second.token_secret
        assert first.master_key == second.master_key and len(first.master_key) == 32
        for name in ("token_secret", "master_key"):
            mode = stat.S_IMODE((tmp_path / "secrets" / name).stat().st_mode)
            assert mode == 0o600

    def test_cdn_defaults_to_the_key_servers_local_origin(self, tmp_path: Path) -> None:
        """Without a CDN, segments are served by `hlsvault serve` under /cdn."""
        settings = load_settings(
            {"HLSVAULT_DATA_DIR": str(tmp_path), "HLSVAULT_PUBLIC_URL": "http://h:9/"}
        )
        assert settings.public_url == "http://h:9"
        assert settings.cdn_url == "http://h:9/cdn"
        assert settings.embedded

    def test_secrets_do_not_appear_in_repr(self, tmp_path: Path) -> None:
        """Logging a Settings object cannot leak the secrets."""
        settings = load_settings({"HLSVAULT_DATA_DIR": str(tmp_path)})
        assert settings.token_secret not in repr(settings)
        assert "master_key" not in repr(settings)


class TestDistributedRefusesWithoutSecrets:
    @pytest.mark.parametrize(
        "present, missing",
        [
            ({}, "HLSVAULT_TOKEN_SECRET and HLSVAULT_MASTER_KEY"),
            ({"HLSVAULT_TOKEN_SECRET": "x" * 40}, "HLSVAULT_MASTER_KEY"),
            ({"HLSVAULT_MASTER_KEY": base64.b64encode(KEY).decode()}, "HLSVAULT_TOKEN_SECRET"),
        ],
    )
    def test_the_message_names_what_is_missing(
        self, tmp_path: Path, present: dict[str, str], missing: str
    ) -> None:
        """With REDIS_URL set, a process refuses to start and names each missing secret."""
        env = {
            "REDIS_URL": "redis://127.0.0.1:1/0", "HLSVAULT_CDN_URL": "https://cdn.example",
            "HLSVAULT_DATA_DIR": str(tmp_path), **present,
        }
        with pytest.raises(ConfigurationError) as caught:
            load_settings(env)
        assert str(caught.value).startswith(f"{missing} not set")
        assert not (tmp_path / "secrets").exists()

    def test_short_token_secret_is_refused(self, tmp_path: Path) -> None:
        """A guessable HMAC secret is refused with the minimum length and how to make one."""
        with pytest.raises(ConfigurationError, match="at least 32"):
            load_settings({"HLSVAULT_DATA_DIR": str(tmp_path), "HLSVAULT_TOKEN_SECRET": "short"})


class TestMasterKey:
    def test_standard_and_url_safe_base64_both_decode(self) -> None:
        """Either base64 alphabet, padded or not, gives the same 32 bytes."""
        key = bytes(range(200, 232))  # contains bytes that differ between alphabets
        standard = base64.b64encode(key).decode()
        url_safe = base64.urlsafe_b64encode(key).decode().rstrip("=")
        assert standard != url_safe
        assert decode_master_key(standard) == decode_master_key(url_safe) == key

    @pytest.mark.parametrize("text", ["", "not base64!", base64.b64encode(b"short").decode()])
    def test_anything_but_32_bytes_is_refused_with_the_mend(self, text: str) -> None:
        """A malformed master key fails with the command that generates a good one."""
        with pytest.raises(ConfigurationError, match=r"os\.urandom"):
            decode_master_key(text)


class TestTokenKeys:
    def _env(self, tmp_path: Path, **extra: str) -> dict[str, str]:
        return {"HLSVAULT_DATA_DIR": str(tmp_path), **extra}

    def test_a_malformed_public_key_is_refused_naming_the_variable(self, tmp_path: Path) -> None:
        with pytest.raises(ConfigurationError, match="HLSVAULT_TOKEN_PUBLIC_KEY is not a public"):
            load_settings(self._env(
                tmp_path, HLSVAULT_TOKEN_ALGORITHM="EdDSA",
                HLSVAULT_TOKEN_PUBLIC_KEY="-----BEGIN PUBLIC KEY-----\nnot a key\n",
            ))

    def test_a_key_of_the_wrong_type_is_refused(self, tmp_path: Path) -> None:
        """An RSA key with EdDSA would make every request fail: refused at start instead."""
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import rsa

        public = rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key()
        pem = public.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ).decode()
        with pytest.raises(ConfigurationError, match="needs an Ed25519 key"):
            load_settings(self._env(
                tmp_path, HLSVAULT_TOKEN_ALGORITHM="EdDSA", HLSVAULT_TOKEN_PUBLIC_KEY=pem,
            ))


class TestStoreUrls:
    """Every process checks the store URLs at start, whether or not it opens the store: a key
    server that signs no downloads never opens the origin, and would otherwise run on a URL no
    worker can write."""

    @pytest.mark.parametrize("name", ["HLSVAULT_WORK", "HLSVAULT_ORIGIN", "HLSVAULT_VAULT"])
    @pytest.mark.parametrize(("url", "says"), [
        ("S3://bucket/prefix", "(S3://…) is neither a local directory nor s3://bucket/prefix"),
        ("https://bucket.s3.amazonaws.com", "(https://…) is neither a local directory nor"),
        ("s3://", "(s3://…) names no bucket; give s3://bucket"),
    ])
    def test_one_that_names_no_store_is_refused_naming_the_setting(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, url: str, says: str
    ) -> None:
        monkeypatch.chdir(tmp_path)
        with pytest.raises(ConfigurationError) as refused:
            load_settings({"HLSVAULT_DATA_DIR": str(tmp_path / "data"), name: url})
        assert str(refused.value).startswith(f"{name} {says}")
        assert list(tmp_path.iterdir()) == []

    def test_a_local_directory_and_an_s3_prefix_are_taken(self, tmp_path: Path) -> None:
        settings = load_settings({"HLSVAULT_DATA_DIR": str(tmp_path),
                                  "HLSVAULT_ORIGIN": "s3://bucket/media",
                                  "HLSVAULT_VAULT": str(tmp_path / "vault")})
        assert settings.origin == "s3://bucket/media"
        assert settings.vault == str(tmp_path / "vault")
        assert settings.work == str(tmp_path / "work")

    def test_a_key_server_that_never_opens_the_origin_refuses_to_start(
        self, tmp_path: Path
    ) -> None:
        """A fleet's key server without a CDN signer opens an S3 origin only to presign
        downloads: given ``S3://…`` it used to start and report no download method."""
        env = {
            "PATH": os.environ["PATH"], "HLSVAULT_DATA_DIR": str(tmp_path),
            "REDIS_URL": "redis://127.0.0.1:1/0", "HLSVAULT_CDN_URL": "https://cdn.example",
            "HLSVAULT_TOKEN_SECRET": "x" * 40,
            "HLSVAULT_MASTER_KEY": base64.b64encode(KEY).decode(),
            "HLSVAULT_ORIGIN": "S3://bucket/media",
        }
        done = subprocess.run([*HLSVAULT, "serve", "--port", str(free_port())], env=env,
                              capture_output=True, text=True, timeout=60, check=False)

        assert done.returncode == 78, done.stderr[-2000:]
        assert "HLSVAULT_ORIGIN (S3://…) is neither a local directory" in done.stderr
        assert "Traceback" not in done.stderr
