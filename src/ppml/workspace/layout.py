"""Where each file of a workspace lives, relative to its root, and which of them are private.

The names are written into `config.toml`, so that tools outside ppml (Spark configuration,
Redis, scripts) can find the files; they are validated to stay inside the workspace.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path, PurePosixPath

from ppml.errors import ConfigurationError

__all__ = ["CONFIG_FILE", "PUBLIC_FILES", "PUBLIC_FILE_MODE", "FileNames", "Layout", "is_workspace"]

CONFIG_FILE = "config.toml"
PUBLIC_FILE_MODE = 0o644


@dataclass(frozen=True, slots=True)
class FileNames:
    """Paths of a workspace's files, relative to the workspace root (POSIX separators)."""

    master_key: str = "master-key.sealed"
    secrets: str = "secrets.sealed.json"
    kms_db: str = "kms.sqlite"
    enclave_signing_key: str = "enclave-signing-key.pem"
    ca_cert: str = "tls/ca.pem"
    ca_key: str = "tls/ca-key.pem"
    server_cert: str = "tls/server.pem"
    server_key: str = "tls/server-key.pem"
    client_cert: str = "tls/client.pem"
    client_key: str = "tls/client-key.pem"
    keystore: str = "tls/keystore.p12"
    truststore: str = "tls/truststore.p12"
    # Made on first use (so workspaces from before they existed gain them), encrypted with a
    # sealed secret: the attestation service's token key and the simulated TEE's platform key.
    token_signing_key: str = "attestation-token-key.pem"  # noqa: S105 -- a file name
    sim_platform_key: str = "sim-platform-key.pem"

    def __post_init__(self) -> None:
        for f in fields(self):
            _check_relative(f.name, getattr(self, f.name))

    def as_dict(self) -> dict[str, str]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, data: object) -> FileNames:
        if not isinstance(data, dict):
            raise ConfigurationError("config.toml: [files] must be a table")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigurationError(f"config.toml: unknown entries in [files]: {unknown}")
        for key, value in data.items():
            if not isinstance(value, str):
                raise ConfigurationError(f"config.toml: files.{key} must be a string")
        return cls(**data)


# Files that hold nothing secret and may be read by other users (certificates, the truststore,
# the configuration). Everything else is private: 0600.
PUBLIC_FILES = frozenset({"ca_cert", "server_cert", "client_cert", "truststore"})


def _check_relative(field: str, value: str) -> None:
    p = PurePosixPath(value)
    if (
        not value
        or p.is_absolute()
        or "\\" in value
        or any(part in ("..", ".", "") for part in value.split("/"))
        or p.name == CONFIG_FILE
    ):
        raise ConfigurationError(
            f"config.toml: files.{field} = {value!r} must be a relative path inside the workspace"
        )


@dataclass(frozen=True, slots=True)
class Layout:
    """The absolute paths of one workspace's files."""

    root: Path
    files: FileNames = FileNames()

    def path(self, field: str) -> Path:
        """The absolute path of the file named by `field` (a `FileNames` field name)."""
        return self.root.joinpath(*PurePosixPath(getattr(self.files, field)).parts)

    def mode(self, field: str) -> int:
        """The permission bits the file named by `field` is written with."""
        return PUBLIC_FILE_MODE if field in PUBLIC_FILES else 0o600

    @property
    def config(self) -> Path:
        return self.root / CONFIG_FILE


def is_workspace(path: Path) -> bool:
    """Whether `path` is a ppml workspace: a directory holding a config.toml."""
    return path.is_dir() and (path / CONFIG_FILE).is_file()
