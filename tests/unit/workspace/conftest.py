"""Fixtures for the workspace tests: cheap KDF parameters and ready-made workspaces."""

from __future__ import annotations

from pathlib import Path

import pytest

from ppml.crypto.passphrase import KdfParams
from ppml.workspace import Workspace

PASSPHRASE = b"correct horse battery staple"
EXTRA_HOSTS = ("ppml.example.org", "10.1.2.3", "2001:db8::7")


@pytest.fixture
def passphrase() -> bytes:
    return PASSPHRASE


@pytest.fixture
def extra_hosts() -> tuple[str, ...]:
    return EXTRA_HOSTS


@pytest.fixture
def kdf() -> KdfParams:
    return KdfParams.for_testing()


@pytest.fixture
def make_workspace(tmp_path: Path, kdf: KdfParams):
    def make(name: str = "ws", **kwargs: object) -> Workspace:
        kwargs.setdefault("kdf", kdf)
        return Workspace.create(tmp_path / name, PASSPHRASE, **kwargs)  # type: ignore[arg-type]

    return make


@pytest.fixture(scope="session")
def shared_ws(tmp_path_factory: pytest.TempPathFactory) -> Workspace:
    """One workspace (with extra hosts) for the tests that only read it."""
    root = tmp_path_factory.mktemp("shared")
    return Workspace.create(
        root / ".ppml", PASSPHRASE, hosts=EXTRA_HOSTS, kdf=KdfParams.for_testing()
    )
