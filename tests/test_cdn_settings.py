"""CloudFront signing settings: both or neither, an RSA 2048 key, an absolute CDN URL; a process
given anything else refuses to start and says what to set. Keys never appear in a repr."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from pipeline.errors import ConfigurationError
from pipeline.settings import load_settings

from cdn_support import KEY_PAIR_ID, rsa_key_pair
from keyserver_support import isolated_env
from support import CLI_TIMEOUT_S, HLSVAULT


@pytest.fixture(scope="module")
def rsa_pem() -> str:
    return rsa_key_pair().private_pem


def env_with(tmp_path: Path, **values: str) -> dict[str, str]:
    return {"HLSVAULT_DATA_DIR": str(tmp_path), **values}


class TestRefusals:
    def test_a_key_pair_id_without_a_key_names_the_key(self, tmp_path: Path) -> None:
        with pytest.raises(ConfigurationError, match="HLSVAULT_CLOUDFRONT_PRIVATE_KEY is not"):
            load_settings(env_with(tmp_path, HLSVAULT_CLOUDFRONT_KEY_PAIR_ID=KEY_PAIR_ID))

    def test_a_key_without_a_key_pair_id_names_the_id(self, tmp_path: Path, rsa_pem: str) -> None:
        with pytest.raises(ConfigurationError, match="HLSVAULT_CLOUDFRONT_KEY_PAIR_ID is not"):
            load_settings(env_with(tmp_path, HLSVAULT_CLOUDFRONT_PRIVATE_KEY=rsa_pem))

    def test_a_non_rsa_key_is_refused(self, tmp_path: Path) -> None:
        pem = ec.generate_private_key(ec.SECP256R1()).private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ).decode()
        with pytest.raises(ConfigurationError, match="only RSA 2048"):
            load_settings(env_with(tmp_path, HLSVAULT_CLOUDFRONT_KEY_PAIR_ID=KEY_PAIR_ID,
                                   HLSVAULT_CLOUDFRONT_PRIVATE_KEY=pem))

    def test_an_rsa_key_of_another_size_is_refused(self, tmp_path: Path) -> None:
        with pytest.raises(ConfigurationError, match="RSA 1024 key"):
            load_settings(env_with(tmp_path, HLSVAULT_CLOUDFRONT_KEY_PAIR_ID=KEY_PAIR_ID,
                                   HLSVAULT_CLOUDFRONT_PRIVATE_KEY=rsa_key_pair(1024).private_pem))

    def test_garbage_is_not_a_key(self, tmp_path: Path) -> None:
        garbage = "-----BEGIN PRIVATE KEY-----\nnot a key\n-----END PRIVATE KEY-----"
        with pytest.raises(ConfigurationError, match="not an unencrypted PEM private key"):
            load_settings(env_with(tmp_path, HLSVAULT_CLOUDFRONT_KEY_PAIR_ID=KEY_PAIR_ID,
                                   HLSVAULT_CLOUDFRONT_PRIVATE_KEY=garbage))

    def test_a_relative_cdn_url_is_refused(self, tmp_path: Path, rsa_pem: str) -> None:
        with pytest.raises(ConfigurationError, match=r"HLSVAULT_CDN_URL .* not an absolute URL"):
            load_settings(env_with(tmp_path, HLSVAULT_CLOUDFRONT_KEY_PAIR_ID=KEY_PAIR_ID,
                                   HLSVAULT_CLOUDFRONT_PRIVATE_KEY=rsa_pem,
                                   HLSVAULT_CDN_URL="cdn.example.com/media"))

    def test_the_key_server_refuses_to_start(self, tmp_path: Path) -> None:
        """`hlsvault serve` with half the settings exits 78 with the mend on stderr."""
        env = {**isolated_env(tmp_path / "data"), "HLSVAULT_CLOUDFRONT_KEY_PAIR_ID": KEY_PAIR_ID}
        done = subprocess.run([*HLSVAULT, "serve", "--port", "1"], env=env, capture_output=True,
                              text=True, timeout=CLI_TIMEOUT_S, check=False)
        assert done.returncode == 78
        assert "set it to the RSA private key" in done.stderr


class TestAccepted:
    def test_both_settings_a_path_and_the_defaults(self, tmp_path: Path, rsa_pem: str) -> None:
        key_file = tmp_path / "cf.pem"
        key_file.write_text(rsa_pem)
        settings = load_settings(env_with(tmp_path, HLSVAULT_CLOUDFRONT_KEY_PAIR_ID=KEY_PAIR_ID,
                                          HLSVAULT_CLOUDFRONT_PRIVATE_KEY=str(key_file)))
        assert settings.cdn_signing
        assert settings.cdn_signature_ttl_s == 6 * 3600
        assert settings.offline_max_ttl_s == 30 * 24 * 3600
        assert settings.cdn_cookie_domain is None
        assert "PRIVATE KEY" not in repr(settings)

    def test_neither_setting_signs_nothing(self, tmp_path: Path) -> None:
        assert not load_settings(env_with(tmp_path)).cdn_signing
