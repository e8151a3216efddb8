"""Building a new workspace: every file is written into a fresh private sibling directory,
read back, and only then renamed into place (replacing an old workspace only when forced)."""

from __future__ import annotations

import contextlib
import logging
import os
import secrets as _random
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from ppml._internal.clock import Clock, utc_now
from ppml._internal.fs import PRIVATE_DIR_MODE, ensure_private_dir, write_private
from ppml.crypto.passphrase import KdfParams, seal_with_passphrase, unseal_with_passphrase
from ppml.errors import ConfigurationError, UsageError, WorkspaceExists
from ppml.workspace import pki
from ppml.workspace.config import WorkspaceConfig
from ppml.workspace.layout import Layout, is_workspace
from ppml.workspace.secrets import MASTER_KEY_BYTES, PROFILE_SECRET, TLS_KEY_SECRET, SecretStore

__all__ = [
    "INITIAL_SECRETS",
    "MASTER_KEY_BYTES",
    "PROFILE_SECRET",
    "TLS_KEY_SECRET",
    "Progress",
    "build_workspace",
]

INITIAL_SECRETS = (
    "spark-auth-secret",
    "keystore-password",
    "ca-key-password",
    TLS_KEY_SECRET,
    PROFILE_SECRET,
)

_log = logging.getLogger(__name__)
Progress = Callable[[str], None]


def build_workspace(
    path: Path,
    passphrase: bytes,
    *,
    dev: bool = False,
    hosts: Sequence[str] = (),
    force: bool = False,
    kdf: KdfParams | None = None,
    progress: Progress | None = None,
    clock: Clock = utc_now,
) -> tuple[WorkspaceConfig, bytes]:
    """Create a complete workspace at `path`; returns its configuration and master key."""
    if isinstance(hosts, str):
        raise UsageError("hosts must be a list of names, not one string")
    extra_hosts = pki.normalize_hosts(hosts)
    if not passphrase:
        raise UsageError("the passphrase must not be empty")
    replace = _check_target(path, force)
    say = progress or (lambda _line: None)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{_random.token_hex(6)}.creating")
    tmp.mkdir(mode=PRIVATE_DIR_MODE)
    try:
        os.chmod(tmp, PRIVATE_DIR_MODE)
        config = WorkspaceConfig(
            created_at=clock().replace(microsecond=0),
            profile="dev" if dev else "production",
            hosts=extra_hosts,
            kdf=kdf or KdfParams(),
        )
        layout = Layout(tmp, config.files)
        master_key = _build(layout, config, passphrase, say)
        say("verifying the new workspace")
        _verify(layout, passphrase, master_key)
        _install(tmp, path, replace)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    say(f"workspace ready at {path}")
    return config, master_key


def _check_target(path: Path, force: bool) -> bool:
    """Refuse what must not be replaced; returns whether something is there to replace."""
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        raise WorkspaceExists("exists and is not a directory; refusing to replace it", path=path)
    if not path.exists():
        return False
    if is_workspace(path):
        if not force:
            raise WorkspaceExists(
                "a ppml workspace exists already (use --force to replace it)", path=path
            )
        return True
    if any(path.iterdir()):
        # Even --force never deletes a directory that ppml did not make.
        raise WorkspaceExists(
            "the directory is not empty and is not a ppml workspace; refusing to use it "
            "(choose another --dir, or empty it yourself)",
            path=path,
        )
    return False  # an empty directory: the new workspace is renamed over it


def _write(layout: Layout, field: str, data: bytes) -> None:
    dest = layout.path(field)
    ensure_private_dir(dest.parent)
    mode = layout.mode(field)
    write_private(dest, data, mode=mode)
    os.chmod(dest, mode)  # exact bits, whatever the umask


def _build(layout: Layout, config: WorkspaceConfig, passphrase: bytes, say: Progress) -> bytes:
    """Write every file of a new workspace under `layout.root`; returns the master key."""
    say("generating and sealing the master key")
    master_key = os.urandom(MASTER_KEY_BYTES)
    _write(layout, "master_key", seal_with_passphrase(master_key, passphrase, config.kdf))

    say("sealing workspace secrets")
    values = {
        "spark-auth-secret": os.urandom(32).hex(),
        "keystore-password": _random.token_urlsafe(32),
        "ca-key-password": _random.token_urlsafe(32),
        # The TLS server and client keys are encrypted at rest under this one.
        TLS_KEY_SECRET: _random.token_urlsafe(32),
        # The profile, authenticated: editing config.toml cannot turn production into dev.
        PROFILE_SECRET: config.profile,
    }
    store = SecretStore(layout.path("secrets"), master_key)
    store.set_many(values, create=True)

    now = config.created_at
    say("creating CA")
    ca = pki.new_ca(now)
    _write(layout, "ca_cert", ca.cert.public_bytes(serialization.Encoding.PEM))
    _write(layout, "ca_key", pki.encrypted_key_pem(ca.key, values["ca-key-password"]))
    for kind in ("server", "client"):
        say(f"issuing the TLS {kind} certificate")
        leaf = pki.issue_leaf(ca, kind, config.hosts, now)
        _write(layout, f"{kind}_cert", leaf.cert.public_bytes(serialization.Encoding.PEM))
        _write(layout, f"{kind}_key", pki.encrypted_key_pem(leaf.key, values[TLS_KEY_SECRET]))
        if kind == "server":
            say("writing the Java keystore and truststore")
            password = values["keystore-password"]
            _write(layout, "keystore", pki.keystore_p12(leaf, ca.cert, password))
            _write(layout, "truststore", pki.truststore_p12(ca.cert, password))

    say("generating the enclave signing key (RSA-3072)")
    _write(layout, "enclave_signing_key", pki.enclave_signing_key()[1])

    say("writing config.toml")
    config.save(layout.config)
    os.chmod(layout.config, 0o644)
    return master_key


def _verify(layout: Layout, passphrase: bytes, master_key: bytes) -> None:
    """Read back what was written, so that only a workspace that opens is put in place."""
    if unseal_with_passphrase(layout.path("master_key").read_bytes(), passphrase) != master_key:
        raise ConfigurationError("the new workspace's master key did not read back")
    store = SecretStore(layout.path("secrets"), master_key)
    for name in INITIAL_SECRETS:
        store.get(name)
    ca = x509.load_pem_x509_certificate(layout.path("ca_cert").read_bytes())
    for kind in ("server", "client"):
        cert = x509.load_pem_x509_certificate(layout.path(f"{kind}_cert").read_bytes())
        cert.verify_directly_issued_by(ca)
    WorkspaceConfig.load(layout.config)


def _install(tmp: Path, path: Path, replace: bool) -> None:
    """Rename the finished `tmp` into place; with `replace`, the old one is moved aside first."""
    if not replace:
        try:
            os.rename(tmp, path)  # also replaces an empty directory, atomically
        except OSError:
            raise WorkspaceExists(
                "appeared while the workspace was being created", path=path
            ) from None
        return
    aside = path.with_name(f".{path.name}.{_random.token_hex(6)}.replaced")
    os.rename(path, aside)
    try:
        os.rename(tmp, path)
    except BaseException:
        os.rename(aside, path)
        raise
    try:
        shutil.rmtree(aside)
    except OSError:
        _log.warning("could not remove the replaced workspace at %s; remove it by hand", aside)
        with contextlib.suppress(OSError):
            os.chmod(aside, PRIVATE_DIR_MODE)
