"""`config.toml`: the workspace's public settings (format version, profile, hosts, KDF cost,
default segment size, file names, attestation), parsed into a frozen, validated `WorkspaceConfig`.

The optional ``[attestation]`` table says which hardware evidence the attestation service
accepts and with what collateral::

    [attestation]
    tee_types = ["sgx", "tdx", "snp"]   # hardware TEE types accepted (default: all three)
    collateral = "/etc/ppml/collateral" # Intel PCS collateral; vcek.der + ask_ark.pem for SNP
    allow_outdated = false              # accept collateral past its nextUpdate

Without collateral, Intel quotes verify with TCB status Unknown (which the default release
policy minimum, UpToDate, refuses) and SEV-SNP is not accepted (no VCEK to verify with). The sim
TEE is governed by the profile (dev), not by this table.
"""

from __future__ import annotations

import datetime as dt
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import tomli_w

from ppml._internal.fs import write_private
from ppml.crypto.passphrase import KdfParams
from ppml.errors import ConfigurationError, UsageError
from ppml.workspace.hosts import normalize_hosts
from ppml.workspace.layout import PUBLIC_FILE_MODE, FileNames

__all__ = [
    "DEFAULT_SEGMENT_SIZE",
    "FORMAT_VERSION",
    "AttestationSettings",
    "Profile",
    "WorkspaceConfig",
]

FORMAT_VERSION = 1
DEFAULT_SEGMENT_SIZE = 1024 * 1024
_MAX_SEGMENT_SIZE = 1 << 30

Profile = Literal["dev", "production"]
HARDWARE_TEES = ("sgx", "tdx", "snp")


@dataclass(frozen=True, slots=True)
class AttestationSettings:
    """The ``[attestation]`` table: accepted hardware TEE types, collateral, outdated
    collateral."""

    tee_types: tuple[str, ...] = HARDWARE_TEES
    collateral: str | None = None
    allow_outdated: bool = False
    pccs_url: str | None = None  # fetch Intel collateral per quote (a PCCS or Intel PCS)
    kds_url: str | None = None  # fetch SEV-SNP VCEKs per report (AMD KDS)
    fetch_ca: str | None = None  # a CA bundle for those servers (default: the system's)

    def __post_init__(self) -> None:
        if not isinstance(self.tee_types, tuple) or not all(
            t in HARDWARE_TEES for t in self.tee_types
        ):
            raise ConfigurationError(
                "attestation.tee_types must list some of: " + ", ".join(HARDWARE_TEES)
            )
        if len(set(self.tee_types)) != len(self.tee_types):
            raise ConfigurationError("attestation.tee_types lists a TEE type twice")
        if self.collateral is not None and (
            not isinstance(self.collateral, str) or not self.collateral
        ):
            raise ConfigurationError("attestation.collateral must be a directory path")
        if not isinstance(self.allow_outdated, bool):
            raise ConfigurationError("attestation.allow_outdated must be true or false")
        for name in ("pccs_url", "kds_url"):
            url = getattr(self, name)
            if url is not None and (not isinstance(url, str) or not url.startswith("https://")):
                raise ConfigurationError(f"attestation.{name} must be an https:// URL")
        if self.fetch_ca is not None and (not isinstance(self.fetch_ca, str) or not self.fetch_ca):
            raise ConfigurationError("attestation.fetch_ca must be a file path")

    @property
    def is_default(self) -> bool:
        return self == AttestationSettings()

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "tee_types": list(self.tee_types),
            "allow_outdated": self.allow_outdated,
        }
        for name in ("collateral", "pccs_url", "kds_url", "fetch_ca"):
            if getattr(self, name) is not None:
                out[name] = getattr(self, name)
        return out

    @classmethod
    def from_dict(cls, doc: object) -> AttestationSettings:
        keys = ("tee_types", "collateral", "allow_outdated", "pccs_url", "kds_url", "fetch_ca")
        if not isinstance(doc, dict) or not set(doc) <= set(keys):
            raise ConfigurationError("[attestation] holds only " + ", ".join(keys))
        tee_types = doc.get("tee_types", list(HARDWARE_TEES))
        if not isinstance(tee_types, list):
            raise ConfigurationError("attestation.tee_types must be a list")
        return cls(
            tee_types=tuple(tee_types),
            collateral=doc.get("collateral"),
            allow_outdated=doc.get("allow_outdated", False),
            pccs_url=doc.get("pccs_url"),
            kds_url=doc.get("kds_url"),
            fetch_ca=doc.get("fetch_ca"),
        )


@dataclass(frozen=True, slots=True)
class WorkspaceConfig:
    """The contents of `config.toml`. Holds nothing secret."""

    created_at: dt.datetime
    profile: Profile = "production"
    hosts: tuple[str, ...] = ()
    kdf: KdfParams = field(default_factory=KdfParams)
    default_segment_size: int = DEFAULT_SEGMENT_SIZE
    files: FileNames = field(default_factory=FileNames)
    format_version: int = FORMAT_VERSION
    attestation: AttestationSettings = field(default_factory=AttestationSettings)

    def __post_init__(self) -> None:
        if self.format_version != FORMAT_VERSION:
            raise ConfigurationError(
                f"unsupported workspace format version {self.format_version!r} "
                f"(this ppml reads version {FORMAT_VERSION})"
            )
        if self.profile not in ("dev", "production"):
            raise ConfigurationError(f"unknown profile {self.profile!r}: use dev or production")
        if self.created_at.tzinfo is None:
            raise ConfigurationError("created_at must carry a time zone")
        if not _is_int(self.default_segment_size) or not (
            0 < self.default_segment_size <= _MAX_SEGMENT_SIZE
        ):
            raise ConfigurationError("default_segment_size must be between 1 byte and 1 GiB")
        try:
            normalized = normalize_hosts(self.hosts)
        except UsageError as exc:
            raise ConfigurationError(exc.message) from None
        if normalized != tuple(self.hosts):
            raise ConfigurationError("hosts must be normalized (use normalize_hosts)")
        if not isinstance(self.attestation, AttestationSettings):
            raise ConfigurationError("attestation must be AttestationSettings")

    @property
    def dev(self) -> bool:
        return self.profile == "dev"

    def to_toml(self) -> bytes:
        doc: dict[str, Any] = {
            "format_version": self.format_version,
            "created_at": self.created_at,
            "profile": self.profile,
            "hosts": list(self.hosts),
            "default_segment_size": self.default_segment_size,
            "kdf": {
                "algorithm": "argon2id",
                "memory_kib": self.kdf.memory_kib,
                "iterations": self.kdf.iterations,
                "lanes": self.kdf.lanes,
            },
            "files": self.files.as_dict(),
        }
        if not self.attestation.is_default:
            doc["attestation"] = self.attestation.to_dict()
        return tomli_w.dumps(doc).encode()

    @classmethod
    def from_toml(cls, data: bytes) -> WorkspaceConfig:
        try:
            doc = tomllib.loads(data.decode("utf-8"))
            kdf = doc["kdf"]
            if kdf.get("algorithm") != "argon2id":
                raise ConfigurationError(f"unknown KDF {kdf.get('algorithm')!r}")
            hosts = doc.get("hosts", [])
            ints = (doc["format_version"], doc["default_segment_size"], *_kdf_ints(kdf))
            if not isinstance(hosts, list) or not all(_is_int(i) for i in ints):
                raise TypeError("wrong type")
            created_at = doc["created_at"]
            if not isinstance(created_at, dt.datetime):
                raise TypeError("created_at must be a date-time")
            return cls(
                format_version=doc["format_version"],
                created_at=created_at,
                profile=doc["profile"],
                hosts=tuple(hosts),
                kdf=KdfParams(kdf["memory_kib"], kdf["iterations"], kdf["lanes"]),
                default_segment_size=doc["default_segment_size"],
                files=FileNames.from_dict(doc["files"]),
                attestation=AttestationSettings.from_dict(doc.get("attestation", {})),
            )
        except ConfigurationError as exc:
            raise ConfigurationError(f"config.toml: {exc.message}") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigurationError(f"config.toml is not valid TOML: {exc}") from None
        except (KeyError, TypeError, AttributeError) as exc:
            raise ConfigurationError(f"config.toml is incomplete or malformed ({exc})") from None

    @classmethod
    def load(cls, path: Path) -> WorkspaceConfig:
        """Read and validate `path`; a missing or damaged file is a `ConfigurationError`."""
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise ConfigurationError("the workspace has no config.toml", path=path) from None
        try:
            return cls.from_toml(data)
        except ConfigurationError as exc:
            raise ConfigurationError(exc.message, path=path) from None

    def save(self, path: Path) -> None:
        """Write atomically; the file is public (0644): it holds nothing secret."""
        write_private(path, self.to_toml(), mode=PUBLIC_FILE_MODE)


def _kdf_ints(kdf: dict[str, Any]) -> tuple[Any, ...]:
    return (kdf["memory_kib"], kdf["iterations"], kdf["lanes"])


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
