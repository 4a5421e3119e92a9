"""JWT verification keys: what ``[auth] keys`` and ``auth.jwks_file`` name, loaded and checked.

Every key pins one algorithm. A key that is too weak for it (an HMAC secret under
:data:`MIN_HMAC_SECRET` bytes, RSA under :data:`MIN_RSA_BITS` bits), of the wrong type, or private
is refused when loaded, with a ``ValueError`` naming the file (or JWKS entry) and the problem. A
PEM, SSH or JSON key is never accepted as an HMAC secret.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

ALGORITHMS = ("HS256", "RS256", "ES256", "EdDSA")
"""The accepted JWS algorithms; anything else (``none`` included) is refused."""
MIN_HMAC_SECRET = 32
"""Fewest bytes an HS256 secret may have."""
MIN_RSA_BITS = 2048
"""Smallest RSA modulus accepted, in bits."""
_KTY = {"HS256": "oct", "RS256": "RSA", "ES256": "EC", "EdDSA": "OKP"}


@dataclass(frozen=True, slots=True)
class KeySpec:
    """One verification key: ``alg`` (one of :data:`ALGORITHMS`), ``file`` and optional ``kid``.

    For HS256 the file holds the shared secret (raw bytes, at least 32; one trailing newline is
    dropped). Otherwise it holds a PEM public key or X.509 certificate of the matching type
    (RSA >= 2048 bits, EC P-256, Ed25519). In TOML: ``{alg = "RS256", file = "...", kid = "k1"}``.
    """

    alg: str
    file: str
    kid: str | None = None

    @classmethod
    def parse(cls, value: object) -> KeySpec:
        """Build from a TOML value: a table ``{alg, file, kid?}`` or the text ``"ALG:FILE"``."""
        if isinstance(value, KeySpec):
            return value
        if isinstance(value, str) and ":" in value:
            alg, _, file = value.partition(":")
            return cls(alg, file)
        if isinstance(value, Mapping) and set(value) <= {"alg", "file", "kid"} and {"alg", "file"} <= set(value):
            alg, file, kid = value["alg"], value["file"], value.get("kid")
            if isinstance(alg, str) and isinstance(file, str) and (kid is None or isinstance(kid, str)):
                return cls(alg, file, kid)
        raise ValueError(f'auth key must be {{alg = "...", file = "...", kid = "..."}} or "ALG:FILE", got {value!r}')

    @classmethod
    def from_config(cls, value: object) -> KeySpec:
        """A ``[auth] keys`` entry (see :meth:`parse`)."""
        return cls.parse(value)

    def __post_init__(self) -> None:
        if self.alg not in ALGORITHMS:
            raise ValueError(f"auth key {self.file!r}: alg must be one of {', '.join(ALGORITHMS)}, got {self.alg!r}")
        if not self.file:
            raise ValueError("auth key: file must not be empty")


@dataclass(frozen=True, slots=True)
class VerificationKey:
    """A loaded key: the algorithm it is pinned to, its ``kid``, the key itself and where it came from."""

    alg: str
    kid: str | None
    key: Any  # bytes for HS256, a cryptography public key otherwise
    source: str


def _read(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read {what} {path!r}: {exc.strerror or exc}") from None


def _check_key(alg: str, key: object, source: str) -> None:
    """``ValueError`` unless ``key`` is a public key (or secret) strong enough for ``alg``."""
    if alg == "HS256":
        ok = isinstance(key, bytes) and len(key) >= MIN_HMAC_SECRET
        need = f"a secret of at least {MIN_HMAC_SECRET} bytes"
    elif alg == "RS256":
        ok = isinstance(key, rsa.RSAPublicKey) and key.key_size >= MIN_RSA_BITS
        need = f"an RSA public key of at least {MIN_RSA_BITS} bits"
    elif alg == "ES256":
        ok = isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP256R1)
        need = "an EC P-256 public key"
    else:
        ok = isinstance(key, ed25519.Ed25519PublicKey)
        need = "an Ed25519 public key"
    if not ok:
        raise ValueError(f"auth key {source}: {alg} needs {need}")


def load_key(spec: KeySpec) -> VerificationKey:
    """Read and check the key file of ``spec``; ``ValueError`` naming the file and the problem."""
    data = _read(spec.file, "auth key file")
    source = repr(spec.file)
    if spec.alg == "HS256":
        if data.lstrip().startswith((b"-----BEGIN", b"ssh-", b"{")):
            raise ValueError(f"auth key {source}: an HS256 secret must not be a PEM, SSH or JSON key")
        key: Any = data[:-2] if data.endswith(b"\r\n") else data.removesuffix(b"\n")
    elif b"PRIVATE KEY-----" in data:
        raise ValueError(f"auth key {source}: holds a private key; give the public key (or certificate)")
    else:
        try:
            if b"-----BEGIN CERTIFICATE-----" in data:
                key = x509.load_pem_x509_certificate(data).public_key()
            else:
                key = serialization.load_pem_public_key(data)
        except ValueError as exc:
            raise ValueError(f"auth key {source}: not a PEM public key or certificate ({exc})") from None
    _check_key(spec.alg, key, source)
    return VerificationKey(spec.alg, spec.kid, key, source)


def load_jwks(path: str) -> list[VerificationKey]:
    """Read and check every key of the JWKS file ``path``; ``ValueError`` naming the key and the problem."""
    try:
        document = json.loads(_read(path, "JWKS file"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"JWKS file {path!r} is not JSON: {exc}") from None
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise ValueError(f'JWKS file {path!r} must be an object with a "keys" list')  # noqa: TRY004
    keys: list[VerificationKey] = []
    for i, jwk in enumerate(document["keys"]):
        source = f"{path!r} keys[{i}]"
        if not isinstance(jwk, dict):
            raise ValueError(f"JWKS {source}: not an object")  # noqa: TRY004
        alg, kid = jwk.get("alg"), jwk.get("kid")
        if alg not in ALGORITHMS:
            raise ValueError(f"JWKS {source}: alg must be one of {', '.join(ALGORITHMS)} (required), got {alg!r}")
        if jwk.get("kty") != _KTY[alg]:
            raise ValueError(f"JWKS {source}: {alg} needs kty {_KTY[alg]!r}, got {jwk.get('kty')!r}")
        if jwk.get("use", "sig") != "sig":
            raise ValueError(f"JWKS {source}: use must be 'sig', got {jwk.get('use')!r}")
        if kid is not None and not isinstance(kid, str):
            raise ValueError(f"JWKS {source}: kid must be a string")
        if alg != "HS256" and "d" in jwk:
            raise ValueError(f"JWKS {source}: holds a private key; publish only public keys")
        try:
            key = jwt.PyJWK(jwk, algorithm=alg).key
        except (jwt.PyJWTError, ValueError, TypeError, KeyError) as exc:
            raise ValueError(f"JWKS {source}: unusable key ({exc})") from None
        _check_key(alg, key, source)
        keys.append(VerificationKey(alg, kid, key, source))
    return keys
