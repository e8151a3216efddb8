"""Test helpers shared by several test modules."""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

from ppml.crypto.envelope import DataKey, WrappedKey, seal, unseal
from ppml.errors import KeyNotFound


class MemoryKeyProvider:
    """A DataKeyProvider over KEKs held in a dict: {name: [kek_v1, kek_v2, ...]}."""

    def __init__(self, *names: str) -> None:
        self.keks: dict[str, list[bytes]] = {n: [os.urandom(32)] for n in names}
        self.calls: list[tuple[str, str]] = []

    def rotate(self, name: str) -> None:
        self.keks[name].append(os.urandom(32))

    def generate_data_key(self, key_name: str) -> DataKey:
        self.calls.append(("generate", key_name))
        if key_name not in self.keks:
            raise KeyNotFound(f"no key named {key_name!r}")
        version = len(self.keks[key_name])
        dek = os.urandom(32)
        probe = WrappedKey(key_name, version, b"x")
        blob = seal(self.keks[key_name][-1], dek, probe.aad())
        return DataKey(dek, WrappedKey(key_name, version, blob))

    def unwrap(self, wrapped: WrappedKey) -> bytes:
        self.calls.append(("unwrap", wrapped.key_name))
        if wrapped.key_name not in self.keks:
            raise KeyNotFound(f"no key named {wrapped.key_name!r}")
        return unseal(self.keks[wrapped.key_name][wrapped.version - 1], wrapped.blob, wrapped.aad())

    def rewrap(self, wrapped: WrappedKey) -> WrappedKey:
        dek = self.unwrap(wrapped)
        version = len(self.keks[wrapped.key_name])
        probe = WrappedKey(wrapped.key_name, version, b"x")
        return WrappedKey(
            wrapped.key_name, version, seal(self.keks[wrapped.key_name][-1], dek, probe.aad())
        )


@contextlib.contextmanager
def locked_directory(path: Path) -> Iterator[Path]:
    """A directory nobody may create files in, root included (root ignores mode bits, so the
    directory is also made immutable with chattr when running as root)."""
    path.mkdir(mode=0o500)
    immutable = False
    if os.geteuid() == 0:
        subprocess.run(["chattr", "+i", str(path)], check=True)
        immutable = True
    try:
        yield path
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", str(path)], check=True)
        path.chmod(0o700)


def dev_workspace_with_keys(path: Path, passphrase: str, *key_names: str) -> Path:
    """A dev workspace at `path` (cheap KDF, for tests) holding the named keys."""
    from ppml.crypto.passphrase import KdfParams
    from ppml.workspace import Workspace

    ws = Workspace.create(path, passphrase.encode(), dev=True, kdf=KdfParams.for_testing())
    with ws.key_service() as keys:
        for name in key_names:
            keys.create_key(name)
    return path
