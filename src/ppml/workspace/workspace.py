"""The workspace: one directory holding a passphrase-sealed master key, sealed secrets, TLS
material, the enclave signing key and the KMS database; created atomically, opened by passphrase."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from ppml._internal.clock import Clock, utc_now
from ppml._internal.fs import ensure_private_dir, locked, write_private
from ppml.crypto.passphrase import KdfParams, unseal_with_passphrase
from ppml.errors import ConfigurationError, SecretNotFound, WorkspaceNotFound, WrongPassphrase
from ppml.workspace.config import WorkspaceConfig
from ppml.workspace.layout import CONFIG_FILE, Layout, is_workspace
from ppml.workspace.secrets import MASTER_KEY_BYTES, PROFILE_SECRET, TLS_KEY_SECRET, SecretStore

# The certificate machinery (x509, pki, TLS) is imported by the methods that use it: opening a
# workspace for its keys, which every key-using command does first, needs none of it.
if TYPE_CHECKING:
    import ssl

    from cryptography.hazmat.primitives.asymmetric import ec, ed25519

    from ppml.kms import KeyService
    from ppml.workspace import pki
    from ppml.workspace.build import Progress

__all__ = ["DEFAULT_DIRNAME", "Workspace", "default_workspace_dir"]

DEFAULT_DIRNAME = ".ppml"
_TLS_KEYS = ("server_key", "client_key")
_LOCK_NAME = ".workspace.lock"
_log = logging.getLogger(__name__)
_SERVICE_KEY_SECRET = "service-keys-password"  # noqa: S105 -- a secret's name, not its value


def default_workspace_dir(env: Mapping[str, str] = os.environ, cwd: Path | None = None) -> Path:
    """`$PPML_HOME` when set (and not empty), else `./.ppml` under `cwd` (default: the cwd)."""
    home = env.get("PPML_HOME", "")
    if home:
        return Path(home).expanduser()
    return (cwd if cwd is not None else Path.cwd()) / DEFAULT_DIRNAME


class Workspace:
    """An opened workspace. It holds the master key in memory; it never shows it."""

    __slots__ = ("_master_key", "config", "layout", "path", "profile")

    def __init__(self, path: Path, config: WorkspaceConfig, master_key: bytes) -> None:
        self.path = path
        self.config = config
        self.layout = Layout(path, config.files)
        self._master_key = master_key
        self.profile = self._sealed_profile()

    def _sealed_profile(self) -> str:
        """The profile in force: dev only when both config.toml (which anyone who can write the
        workspace's files can edit) and the profile sealed under the master key say dev. A
        workspace without a sealed profile (made by an older ppml) is production."""
        try:
            sealed = self._secrets().get(PROFILE_SECRET)
        except SecretNotFound:
            sealed = "production"
        return "dev" if sealed == "dev" and self.config.profile == "dev" else "production"

    def __repr__(self) -> str:
        return f"Workspace(path={str(self.path)!r}, profile={self.config.profile!r})"

    def __reduce__(self) -> NoReturn:
        raise TypeError("a Workspace holds the master key and cannot be pickled")

    # -- creating and opening ------------------------------------------------------------------

    @classmethod
    def exists(cls, path: Path) -> bool:
        """Whether `path` is a ppml workspace (a directory with a config.toml)."""
        return is_workspace(Path(path))

    @classmethod
    def create(
        cls,
        path: Path,
        passphrase: bytes,
        *,
        dev: bool = False,
        hosts: Sequence[str] = (),
        force: bool = False,
        kdf: KdfParams | None = None,
        progress: Progress | None = None,
        clock: Clock = utc_now,
    ) -> Workspace:
        """Create a workspace at `path`. Nothing appears at `path` until it is complete.

        An existing workspace, or a non-empty directory, is replaced only with `force=True`.
        """
        from ppml.workspace.build import build_workspace

        path = Path(path).absolute()
        config, master_key = build_workspace(
            path,
            passphrase,
            dev=dev,
            hosts=hosts,
            force=force,
            kdf=kdf,
            progress=progress,
            clock=clock,
        )
        return cls(path, config, master_key)

    @classmethod
    def open(cls, path: Path, passphrase: bytes) -> Workspace:
        """Open the workspace at `path` with `passphrase`.

        `WorkspaceNotFound` if there is none, `WrongPassphrase` if the passphrase does not open
        it, `ConfigurationError` if it is damaged.
        """
        path = Path(path).absolute()
        if not cls.exists(path):
            raise WorkspaceNotFound(
                "no ppml workspace here (create one with `ppml init`)", path=path
            )
        config = WorkspaceConfig.load(path / CONFIG_FILE)
        layout = Layout(path, config.files)
        sealed_path = layout.path("master_key")
        try:
            sealed = sealed_path.read_bytes()
        except FileNotFoundError:
            raise ConfigurationError("the sealed master key is missing", path=sealed_path) from None
        try:
            master_key = unseal_with_passphrase(sealed, passphrase)
        except WrongPassphrase as exc:
            raise WrongPassphrase(exc.message, path=path) from None
        if len(master_key) != MASTER_KEY_BYTES:
            raise ConfigurationError("the sealed master key has the wrong length", path=sealed_path)
        SecretStore(layout.path("secrets"), master_key).check()
        ws = cls(path, config, master_key)
        ws._encrypt_plain_tls_keys()
        return ws

    # -- services and secrets --------------------------------------------------------------------

    @property
    def dev(self) -> bool:
        """A development workspace (the sim TEE, debug enclaves): as sealed, not as written."""
        return self.profile == "dev"

    def key_service(self, *, actor: str = "local") -> KeyService:
        """The embedded KMS of this workspace, backed by `kms_path`."""
        from ppml.kms import KeyService
        from ppml.kms.state import counter_directory

        return KeyService(
            self.kms_path, self._master_key, actor=actor, counter_dir=counter_directory()
        )

    def _secrets(self) -> SecretStore:
        return SecretStore(self.layout.path("secrets"), self._master_key)

    def secret(self, name: str) -> str:
        """The value of the sealed secret `name` (`SecretNotFound` lists the known names)."""
        return self._secrets().get(name)

    def set_secret(self, name: str, value: str) -> None:
        """Add or replace the sealed secret `name`."""
        self._secrets().set_many({name: value})

    def secret_names(self) -> list[str]:
        """The secrets' names (the sealed profile, which is not secret, is not listed)."""
        return [n for n in self._secrets().names() if n != PROFILE_SECRET]

    # -- TLS credentials ---------------------------------------------------------------------------

    def tls_key_password(self) -> str:
        """The password of the TLS server and client keys (both encrypted PKCS#8 at rest)."""
        return self.secret(TLS_KEY_SECRET)

    def server_ssl_context(self) -> ssl.SSLContext:
        """A TLS server context with the workspace's server certificate and key; client
        certificates optional, verified against the workspace CA when presented."""
        import ssl

        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(self.ca_cert))
        ctx.load_cert_chain(self.server_cert, self.server_key, password=self.tls_key_password())
        ctx.verify_mode = ssl.CERT_OPTIONAL
        return ctx

    def client_ssl_context(self) -> ssl.SSLContext:
        """A TLS client context that trusts the workspace CA and presents the workspace's client
        certificate (mutual TLS: the administrator of `ppml serve`)."""
        import ssl

        ctx = ssl.create_default_context(cafile=str(self.ca_cert))
        ctx.load_cert_chain(self.client_cert, self.client_key, password=self.tls_key_password())
        return ctx

    def certificate_authority(self) -> pki.IssuedCert:
        """The workspace CA: its certificate and its private key (unsealed for the caller)."""
        from cryptography import x509
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ec

        from ppml.workspace import pki

        cert = x509.load_pem_x509_certificate(self.ca_cert.read_bytes())
        password = self.secret("ca-key-password").encode()
        try:
            key = serialization.load_pem_private_key(self.ca_key.read_bytes(), password)
        except (ValueError, TypeError):
            raise ConfigurationError("the CA key is damaged", path=self.ca_key) from None
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ConfigurationError("the CA key is not an EC key", path=self.ca_key)
        return pki.IssuedCert(key, cert)

    def _encrypt_plain_tls_keys(self) -> None:
        """A workspace made before the TLS keys were encrypted at rest gets them encrypted in
        place (once; under a lock, so that concurrent openers agree on the password)."""
        if not any(_plain_private_key(self.layout.path(f)) for f in _TLS_KEYS):
            return
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ec

        from ppml.workspace import pki

        with locked(self.path / _LOCK_NAME):
            try:
                password = self.secret(TLS_KEY_SECRET)
            except SecretNotFound:
                import secrets

                password = secrets.token_urlsafe(32)
                self.set_secret(TLS_KEY_SECRET, password)
            for field in _TLS_KEYS:
                path = self.layout.path(field)
                if not _plain_private_key(path):
                    continue
                try:
                    key = serialization.load_pem_private_key(path.read_bytes(), None)
                except (ValueError, TypeError):
                    raise ConfigurationError("a TLS key is damaged", path=path) from None
                if not isinstance(key, ec.EllipticCurvePrivateKey):
                    raise ConfigurationError("a TLS key is not an EC key", path=path)
                write_private(path, pki.encrypted_key_pem(key, password))
                _log.warning("%s: encrypted the TLS key at rest (it was stored in the clear)", path)

    # -- service keys ----------------------------------------------------------------------------

    def token_signing_key(self) -> ec.EllipticCurvePrivateKey:
        """The attestation service's ES256 (P-256) token signing key, made on first use."""
        from cryptography.hazmat.primitives.asymmetric import ec

        key = self._service_key(
            "token_signing_key", lambda: ec.generate_private_key(ec.SECP256R1())
        )
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ConfigurationError("the token signing key is not an EC key")
        return key

    def sim_platform_key(self) -> ed25519.Ed25519PrivateKey:
        """The simulated TEE's platform key (signs sim evidence), made on first use. Only the
        launcher holds it, never a workload."""
        from cryptography.hazmat.primitives.asymmetric import ed25519

        key = self._service_key("sim_platform_key", ed25519.Ed25519PrivateKey.generate)
        if not isinstance(key, ed25519.Ed25519PrivateKey):
            raise ConfigurationError("the sim platform key is not an Ed25519 key")
        return key

    def _service_key(self, field: str, generate: Callable[[], Any]) -> Any:
        """Load the private key in `field`, encrypted under a sealed secret; create both if
        missing (atomically, 0600)."""
        from cryptography.hazmat.primitives import serialization

        path = self.layout.path(field)
        try:
            password = self.secret(_SERVICE_KEY_SECRET).encode()
        except SecretNotFound:
            import secrets

            password = secrets.token_urlsafe(32).encode()
            self.set_secret(_SERVICE_KEY_SECRET, password.decode())
        if path.exists():
            try:
                return serialization.load_pem_private_key(path.read_bytes(), password)
            except (ValueError, TypeError):
                raise ConfigurationError("a service key is damaged", path=path) from None
        key = generate()
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(password),
        )
        ensure_private_dir(path.parent)
        write_private(path, pem)
        return key

    # -- paths -----------------------------------------------------------------------------------

    @property
    def config_path(self) -> Path:
        return self.layout.config

    @property
    def master_key_path(self) -> Path:
        return self.layout.path("master_key")

    @property
    def secrets_path(self) -> Path:
        return self.layout.path("secrets")

    @property
    def kms_path(self) -> Path:
        return self.layout.path("kms_db")

    @property
    def enclave_key_path(self) -> Path:
        return self.layout.path("enclave_signing_key")

    @property
    def ca_cert(self) -> Path:
        return self.layout.path("ca_cert")

    @property
    def ca_key(self) -> Path:
        return self.layout.path("ca_key")

    @property
    def server_cert(self) -> Path:
        return self.layout.path("server_cert")

    @property
    def server_key(self) -> Path:
        return self.layout.path("server_key")

    @property
    def client_cert(self) -> Path:
        return self.layout.path("client_cert")

    @property
    def client_key(self) -> Path:
        return self.layout.path("client_key")

    @property
    def keystore(self) -> Path:
        return self.layout.path("keystore")

    @property
    def truststore(self) -> Path:
        return self.layout.path("truststore")

    def describe(self) -> dict[str, Any]:
        """Paths and public facts (certificates, enclave MRSIGNER, secret names): nothing secret."""
        from cryptography import x509
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import rsa

        from ppml.workspace import pki

        certs = {
            kind: pki.certificate_facts(x509.load_pem_x509_certificate(p.read_bytes()))
            for kind, p in (
                ("ca", self.ca_cert),
                ("server", self.server_cert),
                ("client", self.client_cert),
            )
        }
        signing_key = serialization.load_pem_private_key(self.enclave_key_path.read_bytes(), None)
        if not isinstance(signing_key, rsa.RSAPrivateKey):
            raise ConfigurationError(
                "the enclave signing key is not RSA", path=self.enclave_key_path
            )
        enclave = signing_key.public_key()
        return {
            "path": str(self.path),
            "format_version": self.config.format_version,
            "profile": self.profile,
            "created_at": self.config.created_at.isoformat(),
            "hosts": [*pki.DEFAULT_HOSTS, *self.config.hosts],
            "kdf": {
                "algorithm": "argon2id",
                "memory_kib": self.config.kdf.memory_kib,
                "iterations": self.config.kdf.iterations,
                "lanes": self.config.kdf.lanes,
            },
            "default_segment_size": self.config.default_segment_size,
            "files": {
                "config": str(self.config_path),
                **{f: str(self.layout.path(f)) for f in self.config.files.as_dict()},
            },
            "kms_initialized": self.kms_path.exists(),
            "certificates": certs,
            "keystore_alias": pki.KEYSTORE_ALIAS,
            "truststore_alias": pki.TRUSTSTORE_ALIAS,
            "enclave_signing_key": {
                "algorithm": f"RSA-{enclave.key_size}",
                "public_exponent": enclave.public_numbers().e,
                "mrsigner": pki.mrsigner(enclave),
            },
            "secrets": self.secret_names(),
        }


def _plain_private_key(path: Path) -> bool:
    """Whether `path` holds a private key in the clear (a PEM key that is not encrypted)."""
    try:
        head = path.read_bytes()[:4096]
    except FileNotFoundError:
        return False
    return b"PRIVATE KEY-----" in head and b"ENCRYPTED PRIVATE KEY" not in head
