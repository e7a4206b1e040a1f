"""Hand-built JWS for the token attacks: any header, any payload, any key, including what
PyJWT refuses to build; and the keys of the attack module (the servers' and an attacker's)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import string
import time
from dataclasses import dataclass
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from keyserver_support import ASSET

B64URL = string.ascii_letters + string.digits + "-_"
#: As a claim override: delete the claim.
MISSING = object()

def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def segment(value: Any) -> str:
    return b64(json.dumps(value, separators=(",", ":")).encode())


def claims(**overrides: Any) -> dict[str, Any]:
    """Valid claims for ASSET (ten minutes), with overrides; a value of MISSING deletes."""
    now = int(time.time())
    body: dict[str, Any] = {"sub": ASSET, "iat": now, "exp": now + 600}
    for name, value in overrides.items():
        if value is MISSING:
            body.pop(name, None)
        else:
            body[name] = value
    return body


def hmac_token(
    payload: Any, secret: bytes, *, alg: str = "HS256", header: dict[str, Any] | None = None
) -> str:
    """A JWS signed by hand with HMAC (any payload, any header: PyJWT refuses to build some)."""
    digest = {"HS256": hashlib.sha256, "HS384": hashlib.sha384, "HS512": hashlib.sha512}
    head = header if header is not None else {"alg": alg, "typ": "JWT"}
    signing_input = f"{segment(head)}.{segment(payload)}"
    mac = hmac.new(secret, signing_input.encode(), digest.get(alg, hashlib.sha256)).digest()
    return f"{signing_input}.{b64(mac)}"


def unsigned_token(payload: Any, alg: str = "none", *, dot: bool = True) -> str:
    return f"{segment({'alg': alg, 'typ': 'JWT'})}.{segment(payload)}" + ("." if dot else "")


@dataclass(frozen=True)
class Keys:
    """The keys of the module: the servers' and an attacker's."""

    secret: str
    ed_private: ed25519.Ed25519PrivateKey
    rsa_private: rsa.RSAPrivateKey
    ed_other: ed25519.Ed25519PrivateKey
    rsa_other: rsa.RSAPrivateKey
    ec_other: ec.EllipticCurvePrivateKey

    def sign(self, server: str, payload: dict[str, Any]) -> str:
        """A genuine token for ``server``: signed with the key that server trusts."""
        key: Any = {"HS256": self.secret, "EdDSA": self.ed_private, "RS256": self.rsa_private}
        return jwt.encode(payload, key[server], algorithm=server)


def public_pem(private: Any) -> bytes:
    return bytes(
        private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )


def public_key_forms(private: Any) -> list[bytes]:
    """Every encoding of a public key an algorithm-confusion attacker might HMAC with."""
    public = private.public_key()
    pem = public_pem(private)
    forms = [
        pem,
        pem.strip(),
        pem.replace(b"\n", b""),
        public.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        ),
        public.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH),
    ]
    if isinstance(public, ed25519.Ed25519PublicKey):
        raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        forms.append(raw)
    else:
        forms.append(
            public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.PKCS1)
        )
    return forms

