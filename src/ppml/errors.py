"""The exception tree of ppml: every failure a caller can act on is a `PPMLError`.

The families say what the caller can do about it, and the CLI maps each family to one exit code::

    PPMLError                      exit 1   (never raised itself)
    ├── UsageError                 exit 2   the request was wrong: fix the command or its input
    │   ├── InputNotFound                   a named file or directory does not exist
    │   ├── NotEncrypted                    a file to decrypt is not a ppml encrypted file
    │   ├── KeyExists                       a named key of that name exists already
    │   └── OutputExists                    refusing to overwrite without --force
    ├── IntegrityError             exit 3   data was altered, truncated or mixed up: do not trust it
    ├── KeyAccessError             exit 4   a key cannot be had: wrong passphrase, unknown key ...
    │   ├── WrongPassphrase
    │   ├── KeyNotFound
    │   ├── KeyVersionNotFound
    │   ├── SecretNotFound                  no workspace secret of that name
    │   ├── AttestationFailed               evidence or token did not verify (opaque to clients)
    │   │   └── EvidenceError               TEE evidence or collateral malformed or not verified
    │   └── AccessDenied                    the key's release policy does not allow this workload
    └── ConfigurationError         exit 5   the workspace or environment is missing or broken
        ├── WorkspaceNotFound
        └── WorkspaceExists

`IntegrityError` is deliberately opaque: its message is always "integrity check failed" (plus
the file it concerns), never which check failed. Messages never contain key material.
"""

from __future__ import annotations

from pathlib import Path

__all__ = [
    "AccessDenied",
    "AttestationFailed",
    "ConfigurationError",
    "EvidenceError",
    "InputNotFound",
    "IntegrityError",
    "KeyAccessError",
    "KeyExists",
    "KeyNotFound",
    "KeyVersionNotFound",
    "NotEncrypted",
    "OutputExists",
    "PPMLError",
    "SecretNotFound",
    "UsageError",
    "WorkspaceExists",
    "WorkspaceNotFound",
    "WrongPassphrase",
]


class PPMLError(Exception):
    """Root of every error ppml raises on purpose."""

    exit_code: int = 1
    family: str = "error"

    def __init__(self, message: str, *, path: str | Path | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.path = str(path) if path is not None else None

    def diagnostics(self) -> str:
        """A one-line human text: the file (when there is one), the family, and the message."""
        where = f"{self.path}: " if self.path else ""
        return f"{where}{self.family}: {self.message}"

    def __str__(self) -> str:
        return self.diagnostics() if self.path else self.message


class UsageError(PPMLError):
    """The request itself was wrong (bad argument, missing file, wrong kind of file)."""

    exit_code = 2
    family = "usage error"


class InputNotFound(UsageError):
    """A named input does not exist."""


class NotEncrypted(UsageError):
    """A file given for decryption does not start with a ppml header."""


class KeyExists(UsageError):
    """A named key cannot be created: one of that name exists already."""


class OutputExists(UsageError):
    """An output exists and the caller did not ask to replace it."""


class IntegrityError(PPMLError):
    """Authenticated decryption failed. Opaque on purpose: it never says which check failed."""

    exit_code = 3
    family = "integrity error"

    def __init__(self, message: str = "integrity check failed", *, path: str | Path | None = None):
        super().__init__(message, path=path)


class KeyAccessError(PPMLError):
    """A key could not be obtained or used."""

    exit_code = 4
    family = "key access error"


class WrongPassphrase(KeyAccessError):
    """The passphrase does not open the workspace's master key."""


class KeyNotFound(KeyAccessError):
    """No named key of that name exists."""


class KeyVersionNotFound(KeyAccessError):
    """The named key exists but not in the version asked for."""


class ConfigurationError(PPMLError):
    """The workspace or environment is missing, incomplete or inconsistent."""

    exit_code = 5
    family = "configuration error"


class WorkspaceNotFound(ConfigurationError):
    """No workspace at the given (or default) location."""


class WorkspaceExists(ConfigurationError):
    """A workspace is already there and --force was not given."""


class SecretNotFound(KeyAccessError):
    """No workspace secret of that name exists."""


class AttestationFailed(KeyAccessError):
    """Evidence, a challenge or a token did not verify. Clients see a fixed message; the reason
    goes to the server's log only."""


class EvidenceError(AttestationFailed):
    """TEE evidence or its collateral (a quote, a report, a certificate chain, TCB info) is
    malformed or does not verify. Parsers and verifiers of hardware evidence raise only this;
    its message names the step and the field that failed, never a secret."""


class AccessDenied(KeyAccessError):
    """The workload is attested, but the key's release policy does not allow it."""
