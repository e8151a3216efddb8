"""Sealing a secret (the workspace master key) under a passphrase with Argon2id.

The sealed form is a small JSON document: the KDF and its parameters, the salt, and the
AES-256-GCM ciphertext of the secret. The passphrase itself is never stored. Parameters are
stored with the sealed secret, so that they can be raised later without breaking old workspaces.
"""

from __future__ import annotations

import base64
import json
import os
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives.kdf.argon2 import Argon2id

from ppml.crypto.envelope import seal, unseal
from ppml.errors import ConfigurationError, IntegrityError, WrongPassphrase

__all__ = ["KdfParams", "seal_with_passphrase", "unseal_with_passphrase"]

_AAD = b"ppml/master-key/v1"


@dataclass(frozen=True, slots=True)
class KdfParams:
    """Argon2id cost. The default follows RFC 9106's second recommended option, memory-reduced:
    64 MiB, 3 passes, 4 lanes (about 0.1 s here)."""

    memory_kib: int = 65536
    iterations: int = 3
    lanes: int = 4

    def __post_init__(self) -> None:
        if self.memory_kib < 8 * self.lanes or self.iterations < 1 or not 1 <= self.lanes <= 64:
            raise ConfigurationError("invalid Argon2id parameters")

    @classmethod
    def for_testing(cls) -> KdfParams:
        """Cheap parameters for tests only: never for a real workspace."""
        return cls(memory_kib=1024, iterations=1, lanes=1)


def _derive(passphrase: bytes, salt: bytes, params: KdfParams) -> bytes:
    return Argon2id(
        salt=salt,
        length=32,
        iterations=params.iterations,
        lanes=params.lanes,
        memory_cost=params.memory_kib,
    ).derive(passphrase)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def seal_with_passphrase(
    secret: bytes, passphrase: bytes, params: KdfParams | None = None
) -> bytes:
    """Seal `secret` under `passphrase`; returns the JSON document as bytes."""
    if not passphrase:
        raise WrongPassphrase("the passphrase must not be empty")
    params = params or KdfParams()
    salt = os.urandom(16)
    kek = _derive(passphrase, salt, params)
    doc = {
        "format": "ppml-sealed-secret/1",
        "kdf": "argon2id",
        "memory_kib": params.memory_kib,
        "iterations": params.iterations,
        "lanes": params.lanes,
        "salt": _b64(salt),
        "sealed": _b64(seal(kek, secret, _AAD)),
    }
    return (json.dumps(doc, indent=2) + "\n").encode()


def unseal_with_passphrase(document: bytes, passphrase: bytes) -> bytes:
    """Open a document made by `seal_with_passphrase`. A wrong passphrase is `WrongPassphrase`."""
    try:
        doc: dict[str, Any] = json.loads(document)
        if doc.get("format") != "ppml-sealed-secret/1" or doc.get("kdf") != "argon2id":
            raise ValueError("unknown format")
        params = KdfParams(int(doc["memory_kib"]), int(doc["iterations"]), int(doc["lanes"]))
        salt = base64.b64decode(doc["salt"], validate=True)
        sealed = base64.b64decode(doc["sealed"], validate=True)
    except (ValueError, KeyError, TypeError) as exc:
        raise ConfigurationError(
            "the sealed master key is damaged or of an unknown format"
        ) from exc
    try:
        return unseal(_derive(passphrase, salt, params), sealed, _AAD)
    except IntegrityError:
        raise WrongPassphrase("wrong passphrase (or a damaged sealed master key)") from None
