"""Envelope encryption: keys wrapped by other keys, and the interface data code gets keys through.

A data key (DEK) is wrapped by a key-encryption key (KEK) -- one named key in one version -- with
AES-256-GCM. The wrapping's associated data binds the purpose, the key name and the version, so
a wrapped key cannot be replayed under another name or version. `WrappedKey` is what a file
stores; `DataKeyProvider` is what the data layer asks for keys (the embedded KMS implements it,
and so will the remote KMS client).
"""

from __future__ import annotations

import base64
import os
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from ppml import names
from ppml.errors import IntegrityError, UsageError

__all__ = [
    "DATA_KEY_BYTES",
    "DataKey",
    "DataKeyProvider",
    "WrappedKey",
    "dek_aad",
    "seal",
    "unseal",
    "validate_key_name",
]

DATA_KEY_BYTES = 32
_NONCE_BYTES = 12


def validate_key_name(name: str) -> str:
    """Key names: 1-128 characters of letters, digits, '.', '_', '-', starting alphanumeric."""
    return names.KEY.check(name)


def dek_aad(key_name: str, version: int) -> bytes:
    """The associated data a data key is wrapped under by `key_name` in `version`."""
    return b"ppml/dek/v1\x00" + key_name.encode() + b"\x00" + version.to_bytes(4, "big")


def seal(key: bytes, plaintext: bytes, aad: bytes, *, nonce: bytes | None = None) -> bytes:
    """AES-256-GCM with a random nonce: returns nonce || ciphertext || tag."""
    if nonce is None:
        nonce = os.urandom(_NONCE_BYTES)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, aad)


def unseal(key: bytes, blob: bytes, aad: bytes) -> bytes:
    """Inverse of `seal`. Any failure is an opaque `IntegrityError`."""
    if len(blob) < _NONCE_BYTES + 16:
        raise IntegrityError()
    try:
        return AESGCM(key).decrypt(blob[:_NONCE_BYTES], blob[_NONCE_BYTES:], aad)
    except InvalidTag:
        raise IntegrityError() from None


@dataclass(frozen=True, slots=True)
class WrappedKey:
    """A data key wrapped by the named key `key_name` in version `version`."""

    key_name: str
    version: int
    blob: bytes

    def __post_init__(self) -> None:
        validate_key_name(self.key_name)
        if not 1 <= self.version < 2**32:
            raise UsageError(f"invalid key version {self.version}")
        if not 0 < len(self.blob) <= 4096:
            raise UsageError("invalid wrapped key")

    def aad(self) -> bytes:
        """The associated data a KEK wraps this data key under."""
        return dek_aad(self.key_name, self.version)

    def to_text(self) -> str:
        """Compact text form (for Parquet key metadata): ``ppml1:NAME:VERSION:BASE64``."""
        b64 = base64.urlsafe_b64encode(self.blob).decode()
        return f"ppml1:{self.key_name}:{self.version}:{b64}"

    @classmethod
    def from_text(cls, text: str) -> WrappedKey:
        parts = text.split(":")
        if len(parts) != 4 or parts[0] != "ppml1" or not parts[2].isdigit():
            raise IntegrityError()
        try:
            blob = base64.urlsafe_b64decode(parts[3].encode())
            return cls(parts[1], int(parts[2]), blob)
        except (ValueError, UsageError):
            raise IntegrityError() from None


@dataclass(frozen=True, slots=True)
class DataKey:
    """A fresh data key: the plaintext (keep it only in memory) and its wrapped form."""

    plaintext: bytes
    wrapped: WrappedKey

    def __repr__(self) -> str:
        return (
            f"DataKey(wrapped={self.wrapped.key_name}@v{self.wrapped.version}, plaintext=<hidden>)"
        )


@runtime_checkable
class DataKeyProvider(Protocol):
    """Where the data layer gets data keys: the embedded KMS, or later a remote one.

    Every provider keeps the same promises. A key it cannot hand out is refused with a
    `PPMLError`, never answered with other bytes: an unknown key name or version, or a key not
    released to this process, with a `KeyAccessError`; a wrapped key that was altered, relabelled
    to another key, or made by another KMS, with an `IntegrityError` where the provider checks
    the wrapping itself, a `KeyAccessError` where it only hears a refusal. A refusal leaves the
    provider usable. Neither its repr nor a refusal shows key material.
    """

    def generate_data_key(self, key_name: str) -> DataKey:
        """A fresh random data key of `DATA_KEY_BYTES`, wrapped by the current version of
        `key_name`, which `unwrap` opens. A provider that holds only keys given to it (and so
        makes none) refuses with `KeyAccessError`."""
        ...

    def unwrap(self, wrapped: WrappedKey) -> bytes:
        """The plaintext data key inside `wrapped`."""
        ...
