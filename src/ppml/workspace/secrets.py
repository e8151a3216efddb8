"""Workspace secrets (passwords for the JVM stores, the Spark auth secret, ...), stored only
sealed with AES-256-GCM under a key derived from the master key, each bound to its name."""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from ppml import names
from ppml._internal.fs import write_private
from ppml.crypto.envelope import seal, unseal
from ppml.errors import ConfigurationError, IntegrityError, SecretNotFound, UsageError

__all__ = [
    "MASTER_KEY_BYTES",
    "PROFILE_SECRET",
    "SECRETS_INFO",
    "TLS_KEY_SECRET",
    "SecretStore",
    "validate_secret_name",
]

MASTER_KEY_BYTES = 32
PROFILE_SECRET = "workspace-profile"  # noqa: S105 -- a secret's name, not its value
TLS_KEY_SECRET = "tls-key-password"  # noqa: S105 -- a secret's name, not its value
SECRETS_INFO = b"ppml/workspace/secrets/v1"
_FORMAT = "ppml-workspace-secrets/1"
_AAD_PREFIX = b"ppml/workspace/secret/v1\x00"
_MAX_VALUE = 64 * 1024


def validate_secret_name(name: str) -> str:
    """Secret names: 1-64 lower-case letters, digits, '.', '_', '-', starting alphanumeric."""
    return names.SECRET.check(name)


def _aad(name: str) -> bytes:
    return _AAD_PREFIX + name.encode()


class SecretStore:
    """The sealed secrets file of one workspace. Every change rewrites the file atomically."""

    __slots__ = ("_key", "path")

    def __init__(self, path: Path, master_key: bytes) -> None:
        self.path = path
        self._key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=SECRETS_INFO).derive(
            master_key
        )

    def __repr__(self) -> str:
        return f"SecretStore(path={str(self.path)!r})"

    def names(self) -> list[str]:
        """The names of the stored secrets, sorted."""
        return sorted(self._load())

    def get(self, name: str) -> str:
        """The value of secret `name`; `SecretNotFound` (listing the known names) if absent."""
        sealed = self._load()
        if name not in sealed:
            known = ", ".join(sorted(sealed)) or "(none)"
            raise SecretNotFound(f"no workspace secret named {name!r}; known secrets: {known}")
        try:
            return unseal(self._key, sealed[name], _aad(name)).decode("utf-8")
        except (IntegrityError, UnicodeDecodeError):
            raise IntegrityError(path=self.path) from None

    def set_many(self, values: Mapping[str, str], *, create: bool = False) -> None:
        """Add or replace secrets. `create=True` starts a new file instead of reading one."""
        sealed = {} if create else self._load()
        for name, value in values.items():
            validate_secret_name(name)
            if not isinstance(value, str) or not value or len(value) > _MAX_VALUE:
                raise UsageError(f"secret {name!r}: the value must be non-empty text (<= 64 KiB)")
            sealed[name] = seal(self._key, value.encode("utf-8"), _aad(name))
        doc = {
            "format": _FORMAT,
            "secrets": {n: base64.b64encode(b).decode() for n, b in sorted(sealed.items())},
        }
        write_private(self.path, (json.dumps(doc, indent=2) + "\n").encode())

    def check(self) -> None:
        """Parse the file (without decrypting): `ConfigurationError` if it is damaged."""
        self._load()

    def _load(self) -> dict[str, bytes]:
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            raise ConfigurationError(
                "the workspace's sealed secrets file is missing", path=self.path
            ) from None
        try:
            doc: Any = json.loads(raw)
            if not isinstance(doc, dict) or doc.get("format") != _FORMAT:
                raise ValueError("unknown format")
            entries = doc["secrets"]
            if not isinstance(entries, dict):
                raise ValueError("secrets must be an object")
            return {
                validate_secret_name(n): base64.b64decode(v, validate=True)
                for n, v in entries.items()
            }
        except (ValueError, KeyError, TypeError, UsageError):
            raise ConfigurationError(
                "the workspace's sealed secrets file is damaged or of an unknown format",
                path=self.path,
            ) from None
