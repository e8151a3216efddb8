"""Flink's configuration as ppml writes it: mutual TLS, private scratch, Python in threads.

Every Flink process ppml starts (JobManager, TaskManagers, the job client, the mini-cluster of
``ppml flink run --local``) reads a ``config.yaml`` that ppml writes, mode 0600, in a private
(0700) directory named by ``FLINK_CONF_DIR``. It carries:

- internal TLS (``security.ssl.internal.*``): Pekko RPC, the blob server and the data (shuffle)
  connections between JobManager and TaskManagers are mutual TLS 1.3 with one node certificate
  issued by the workspace CA for this cluster (both TLS usages), trusting that CA only and
  pinned to that certificate's fingerprint: a process with any other certificate, even one the
  same CA issued, is refused;
- REST TLS with client authentication (``security.ssl.rest.*``): the REST endpoint (job
  submission, the web UI's API) asks every client for a certificate and accepts only this
  cluster's client certificate (pinned likewise); ``security.ssl.protocol`` and
  ``security.ssl.algorithms`` (TLS 1.3 only) apply to it only with client authentication on;
- the key store passwords: random for each cluster, in this file only;
- private scratch: ``io.tmp.dirs``, the blob store, the web upload and temporary directories,
  the pid files and checkpoints all sit below the cluster's private directory;
- Python operators in thread mode (``python.execution-mode: thread``): a UDF runs inside the
  TaskManager's JVM (PemJa), so no Beam worker is started and no decrypted record crosses the
  Beam gRPC channel (which is plaintext and listens on every interface). Pandas (vectorized)
  UDFs need that worker and are not supported; ``python.execution-mode`` cannot be changed.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import os
import secrets
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from cryptography.hazmat.primitives import serialization

from ppml._internal.fs import ensure_private_dir, write_private

if TYPE_CHECKING:
    from ppml.engines.flink.environment import FlinkEnvironment
    from ppml.workspace import Workspace
    from ppml.workspace.pki import IssuedCert

__all__ = [
    "TLS13_SUITES",
    "ClusterSecurity",
    "base_settings",
    "client_settings",
    "issue_cluster_security",
    "make_scratch",
    "node_settings",
    "private_flink_home",
    "write_config",
]

TLS13_SUITES = "TLS_AES_256_GCM_SHA384,TLS_AES_128_GCM_SHA256,TLS_CHACHA20_POLY1305_SHA256"
NODE_STORE = "node.p12"
CLIENT_STORE = "client.p12"
TRUST_STORE = "truststore.p12"
PASSWORD_FILE = "store-password"  # noqa: S105 -- a file's name, not a password


@dataclass(frozen=True, slots=True)
class ClusterSecurity:
    """One cluster's key stores (in `directory`, 0600) and the password that opens them."""

    directory: Path
    password: str
    fingerprints: tuple[str, ...]  # SHA-1 of the node and client certificates, as Flink pins

    @property
    def node_store(self) -> Path:
        return self.directory / NODE_STORE

    @property
    def client_store(self) -> Path:
        return self.directory / CLIENT_STORE

    @property
    def trust_store(self) -> Path:
        return self.directory / TRUST_STORE

    def __repr__(self) -> str:
        return f"ClusterSecurity({str(self.directory)!r}, password=<hidden>)"

    def moved(self, directory: Path) -> ClusterSecurity:
        """The same stores, as seen in `directory` (a copy, or a sandbox's view)."""
        return ClusterSecurity(directory, self.password, self.fingerprints)

    @classmethod
    def load(cls, directory: Path) -> ClusterSecurity:
        raw = json.loads((directory / PASSWORD_FILE).read_text())
        return cls(directory, str(raw["password"]), tuple(raw["fingerprints"]))


def _fingerprint(issued: IssuedCert) -> str:
    der = issued.cert.public_bytes(serialization.Encoding.DER)
    digest = hashlib.sha1(der, usedforsecurity=False).hexdigest().upper()
    return ":".join(digest[i : i + 2] for i in range(0, len(digest), 2))


def issue_cluster_security(ws: Workspace, directory: Path, hosts: Sequence[str]) -> ClusterSecurity:
    """A node and a client certificate from the workspace CA for one cluster, in PKCS12 stores
    under a fresh random password, in the private `directory`."""
    from ppml.workspace import pki

    ensure_private_dir(directory)
    ca = ws.certificate_authority()
    now = dt.datetime.now(dt.UTC)
    node = pki.issue_flink(ca, "node", hosts, now)
    client = pki.issue_flink(ca, "client", (), now)
    password = secrets.token_urlsafe(32)
    write_private(directory / NODE_STORE, pki.keystore_p12(node, ca.cert, password))
    write_private(directory / CLIENT_STORE, pki.keystore_p12(client, ca.cert, password))
    write_private(directory / TRUST_STORE, pki.truststore_p12(ca.cert, password))
    security = ClusterSecurity(directory, password, (_fingerprint(node), _fingerprint(client)))
    write_private(
        directory / PASSWORD_FILE,
        json.dumps({"password": password, "fingerprints": list(security.fingerprints)}).encode(),
    )
    return security


def _java_options(flink: FlinkEnvironment) -> str:
    """The module openings Flink's own configuration gives every JVM (``env.java.opts.all``):
    Flink's serializers reflect into ``java.base`` and fail without them on Java 17."""
    import re

    text = (flink.flink_home / "conf" / "config.yaml").read_text()
    found = re.search(r"^\s+all:\s*(--add-\S.*)$", text, re.MULTILINE)
    return found.group(1).strip() if found else ""


SCRATCH_DIRS = ("tmp", "blobs", "web", "checkpoints", "log")


def make_scratch(scratch: Path) -> None:
    for name in SCRATCH_DIRS:
        ensure_private_dir(scratch / name)


_MEMORY_RECORD = "checkpoints.path"


def memory_directory(owner: Path, prefix: str) -> Path:
    """A new private (0700) directory in memory (/dev/shm) for Flink's checkpoints, which hold
    operator state, decrypted records included: they never reach a disk (where there is no
    /dev/shm, a private directory under `owner`/scratch). Its path is recorded in `owner`, so
    that `remove_memory_directory(owner)` finds it, after a killed process too."""
    import tempfile

    shm = Path("/dev/shm")  # noqa: S108 -- a private directory made by mkdtemp (0700)
    if shm.is_dir() and os.access(shm, os.W_OK | os.X_OK):
        made = Path(tempfile.mkdtemp(prefix=prefix, dir=shm))
    else:
        ensure_private_dir(owner / "scratch")
        made = Path(tempfile.mkdtemp(prefix=prefix, dir=owner / "scratch"))
    write_private(owner / _MEMORY_RECORD, str(made).encode())
    return made


def remove_memory_directory(owner: Path) -> None:
    """Remove the directory `memory_directory` made for `owner`, if any, and its record."""
    record = owner / _MEMORY_RECORD
    with contextlib.suppress(OSError):
        shutil.rmtree(record.read_text(), ignore_errors=True)
    record.unlink(missing_ok=True)


def base_settings(
    flink: FlinkEnvironment,
    scratch: Path,
    *,
    make: bool = True,
    checkpoints: Path | None = None,
) -> dict[str, str]:
    """What every ppml Flink process shares: Python in threads, private scratch (made here
    unless `make` is false: an attested job makes its own, inside its sandbox), Java's
    temporary files in it too (not the shared /tmp, where Flink's client would put the job's
    Python files), checkpoints in `checkpoints` (default: in the scratch directory)."""
    if make:
        make_scratch(scratch)
    return {
        "env.java.opts.all": f"{_java_options(flink)} -Djava.io.tmpdir={scratch / 'tmp'}".strip(),
        "python.execution-mode": "thread",
        "python.executable": str(flink.python),
        "python.client.executable": str(flink.python),
        # The interpreter that PemJa embeds starts from the base installation and reads no
        # .pth file: it needs the environment's site-packages and ppml's own directory.
        "python.pythonpath": flink.python_path,
        "io.tmp.dirs": str(scratch / "tmp"),
        "blob.storage.directory": str(scratch / "blobs"),
        "web.tmpdir": str(scratch / "web"),
        "web.upload.dir": str(scratch / "web"),
        "env.pid.dir": str(scratch),
        "execution.checkpointing.dir": f"file://{checkpoints or scratch / 'checkpoints'}",
        # Checkpoints commit the encrypted file sink's parts and record the sources' positions.
        "execution.checkpointing.interval": "10 s",
        # A failing job (a tampered input fails its operator) is retried a few times, not forever.
        "restart-strategy.type": "fixed-delay",
        "restart-strategy.fixed-delay.attempts": "2",
        "restart-strategy.fixed-delay.delay": "2 s",
        "python.fn-execution.bundle.size": "1000",
    }


def _tls(security: ClusterSecurity, kind: str, store: Path) -> dict[str, str]:
    prefix = f"security.ssl.{kind}"
    return {
        f"{prefix}.enabled": "true",
        f"{prefix}.keystore": str(store),
        f"{prefix}.keystore-password": security.password,
        f"{prefix}.key-password": security.password,
        f"{prefix}.truststore": str(security.trust_store),
        f"{prefix}.truststore-password": security.password,
        f"{prefix}.cert.fingerprint": ",".join(security.fingerprints),
    }


def node_settings(security: ClusterSecurity) -> dict[str, str]:
    """Internal and REST mutual TLS for the JobManager and TaskManagers."""
    return {
        **_tls(security, "internal", security.node_store),
        **_tls(security, "rest", security.node_store),
        "security.ssl.rest.authentication-enabled": "true",
        "security.ssl.protocol": "TLSv1.3",
        "security.ssl.algorithms": TLS13_SUITES,
    }


def client_settings(security: ClusterSecurity) -> dict[str, str]:
    """What a job client needs: REST mutual TLS with the cluster's client certificate."""
    return {
        **_tls(security, "rest", security.client_store),
        "security.ssl.rest.authentication-enabled": "true",
        "security.ssl.protocol": "TLSv1.3",
        "security.ssl.algorithms": TLS13_SUITES,
    }


def write_config(conf_dir: Path, settings: Mapping[str, str], flink: FlinkEnvironment) -> None:
    """`settings` as ``conf_dir/config.yaml`` (0600; every value a quoted YAML string) beside
    Flink's own logging configuration."""
    ensure_private_dir(conf_dir)
    lines = [f"{key}: {json.dumps(str(value))}" for key, value in sorted(settings.items())]
    write_private(conf_dir / "config.yaml", ("\n".join(lines) + "\n").encode())
    for name in ("log4j.properties", "log4j-console.properties", "log4j-cli.properties"):
        source = flink.flink_home / "conf" / name
        if source.is_file():
            shutil.copyfile(source, conf_dir / name)
            os.chmod(conf_dir / name, 0o600)


def private_flink_home(flink: FlinkEnvironment, home: Path, extra_jars: Sequence[Path]) -> Path:
    """A FLINK_HOME of links into the environment's distribution (its scripts copied) whose
    ``lib/`` also holds
    flink-python's jar (thread-mode jobs after the first on a session cluster fail without it)
    and `extra_jars`; ``log/`` is private. The distribution itself is never changed."""
    ensure_private_dir(home)
    for name in ("plugins", "conf"):
        _link(flink.flink_home / name, home / name)
    # Flink walks opt/ without following links: a directory of links to its files.
    _link_each(sorted((flink.flink_home / "opt").iterdir()), home / "opt")
    # Flink's scripts find their home from their own resolved path: copies, not links, so
    # that they use this home's lib/.
    if (home / "bin").is_symlink():
        (home / "bin").unlink()
    shutil.rmtree(home / "bin", ignore_errors=True)
    shutil.copytree(flink.flink_home / "bin", home / "bin", symlinks=False)
    jars = [*sorted((flink.flink_home / "lib").glob("*.jar")), flink.python_jar, *extra_jars]
    _link_each(jars, home / "lib")
    ensure_private_dir(home / "log")
    return home


def _link_each(targets: Sequence[Path], directory: Path) -> None:
    if directory.is_symlink():
        directory.unlink()
    shutil.rmtree(directory, ignore_errors=True)
    ensure_private_dir(directory)
    for target in targets:
        (directory / target.name).symlink_to(target)


def _link(target: Path, link: Path) -> None:
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(target)
