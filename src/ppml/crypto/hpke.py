"""Sealing data keys to a workload's ephemeral X25519 key with HPKE (RFC 9180, base mode).

The suite is fixed: DHKEM(X25519, HKDF-SHA256), HKDF-SHA256, AES-256-GCM. A sealed value is the
encapsulated key followed by the AEAD ciphertext. `info` binds the context a value was sealed
for; `release_info` is the one derivation both the key broker and the workload use for data keys.
"""

from __future__ import annotations

import hashlib
from typing import Literal

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hpke as _hpke
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from ppml.crypto.envelope import WrappedKey
from ppml.errors import IntegrityError, UsageError

__all__ = [
    "PUBLIC_KEY_BYTES",
    "RELEASE_PURPOSES",
    "ReleasePurpose",
    "generate_keypair",
    "open_sealed",
    "release_info",
    "seal_to",
]

PUBLIC_KEY_BYTES = 32
_ENC_BYTES = 32
_TAG_BYTES = 16
_SUITE = _hpke.Suite(_hpke.KEM.X25519, _hpke.KDF.HKDF_SHA256, _hpke.AEAD.AES_256_GCM)
_RELEASE_LABEL = b"ppml/release/v1\x00"

ReleasePurpose = Literal["datakey", "unwrap"]
RELEASE_PURPOSES: tuple[ReleasePurpose, ...] = ("datakey", "unwrap")


def generate_keypair() -> tuple[X25519PrivateKey, bytes]:
    """A fresh X25519 key pair: the private key (keep it in memory) and the raw public key."""
    private_key = X25519PrivateKey.generate()
    return private_key, private_key.public_key().public_bytes_raw()


def seal_to(public_key: bytes, plaintext: bytes, *, info: bytes) -> bytes:
    """Encrypt `plaintext` to the raw X25519 `public_key`, bound to `info`.

    `UsageError` if the public key is not a usable X25519 key (wrong length, or a low-order
    point whose shared secret would be all zeros).
    """
    if not isinstance(public_key, bytes) or len(public_key) != PUBLIC_KEY_BYTES:
        raise UsageError(f"an X25519 public key is {PUBLIC_KEY_BYTES} bytes")
    _check_info(info)
    try:
        return _SUITE.encrypt(plaintext, X25519PublicKey.from_public_bytes(public_key), info=info)
    except ValueError:
        raise UsageError("unusable X25519 public key") from None


def open_sealed(private_key: X25519PrivateKey, sealed: bytes, *, info: bytes) -> bytes:
    """Inverse of `seal_to`. Any failure (wrong key, wrong info, altered or truncated data) is
    an opaque `IntegrityError`."""
    if not isinstance(private_key, X25519PrivateKey):
        raise UsageError("open_sealed needs an X25519 private key")
    _check_info(info)
    if not isinstance(sealed, bytes) or len(sealed) < _ENC_BYTES + _TAG_BYTES:
        raise IntegrityError()
    try:
        return _SUITE.decrypt(sealed, private_key, info=info)
    except (InvalidTag, ValueError):
        raise IntegrityError() from None


def release_info(wrapped: WrappedKey, purpose: ReleasePurpose) -> bytes:
    """The HPKE info a data key is released under: the key name, version, purpose and a digest
    of the wrapped form it travels with, so a sealed key cannot be passed off as another's."""
    if purpose not in RELEASE_PURPOSES:
        raise UsageError(f"invalid release purpose {purpose!r}")
    return b"".join(
        (
            _RELEASE_LABEL,
            wrapped.key_name.encode(),  # key names never contain NUL
            b"\x00",
            wrapped.version.to_bytes(4, "big"),
            purpose.encode(),
            b"\x00",
            hashlib.sha256(wrapped.blob).digest(),
        )
    )


def _check_info(info: bytes) -> None:
    if not isinstance(info, bytes) or not info:
        raise UsageError("HPKE info must be non-empty bytes")
