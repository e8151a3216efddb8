"""Test helpers shared by several test modules.

`clock` holds the fake clocks, `keys` the in-memory key provider, `evidence` the synthetic
hardware evidence generators; this module re-exports the key provider and holds the small
helpers for workspaces and directories."""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

from tests.support.keys import MemoryKeyProvider

__all__ = ["MemoryKeyProvider", "dev_workspace_with_keys", "locked_directory"]


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
