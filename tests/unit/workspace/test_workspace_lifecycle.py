"""Creating, opening, replacing and failing to create workspaces."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest

from ppml.errors import (
    ConfigurationError,
    UsageError,
    WorkspaceExists,
    WorkspaceNotFound,
    WrongPassphrase,
)
from ppml.workspace import DEFAULT_DIRNAME, Workspace, default_workspace_dir
from ppml.workspace import build as build_mod

PASSPHRASE = b"correct horse battery staple"  # the one conftest.py creates workspaces with


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_create_then_open_round_trip(tmp_path: Path, make_workspace) -> None:
    lines: list[str] = []
    ws = make_workspace(hosts=["db.internal"], progress=lines.append)
    assert Workspace.exists(ws.path)
    assert "creating CA" in lines
    assert not ws.dev and ws.config.profile == "production"
    again = Workspace.open(tmp_path / "ws", PASSPHRASE)
    assert again.config == ws.config
    assert again.config.hosts == ("db.internal",)
    for name in ("spark-auth-secret", "keystore-password", "ca-key-password"):
        assert again.secret(name) == ws.secret(name)
    assert ws.kms_path == ws.path / "kms.sqlite"
    assert ws.enclave_key_path == ws.path / "enclave-signing-key.pem"


def test_dev_profile(make_workspace) -> None:
    ws = make_workspace(dev=True)
    assert ws.dev and ws.config.profile == "dev"
    assert Workspace.open(ws.path, PASSPHRASE).dev


def test_only_the_workspace_is_left_in_the_parent(tmp_path: Path, make_workspace) -> None:
    make_workspace()
    assert [p.name for p in tmp_path.iterdir()] == ["ws"]


def test_wrong_passphrase(make_workspace) -> None:
    ws = make_workspace()
    with pytest.raises(WrongPassphrase, match="wrong passphrase"):
        Workspace.open(ws.path, b"not the passphrase")


def test_empty_passphrase_refused(tmp_path: Path, kdf) -> None:
    with pytest.raises(UsageError):
        Workspace.create(tmp_path / "ws", b"", kdf=kdf)
    assert not (tmp_path / "ws").exists()


def test_open_missing_workspace(tmp_path: Path) -> None:
    with pytest.raises(WorkspaceNotFound) as info:
        Workspace.open(tmp_path / "nothing", PASSPHRASE)
    assert str(tmp_path / "nothing") in str(info.value)
    assert not Workspace.exists(tmp_path / "nothing")


def test_open_damaged_workspace(make_workspace) -> None:
    ws = make_workspace()
    ws.config_path.write_text("format_version = 1\nprofile = [")
    with pytest.raises(ConfigurationError, match=r"config\.toml"):
        Workspace.open(ws.path, PASSPHRASE)


def test_open_without_master_key(make_workspace) -> None:
    ws = make_workspace()
    ws.master_key_path.unlink()
    with pytest.raises(ConfigurationError, match="master key is missing"):
        Workspace.open(ws.path, PASSPHRASE)


def test_open_with_damaged_secrets_file(make_workspace) -> None:
    ws = make_workspace()
    ws.secrets_path.write_text("{}")
    with pytest.raises(ConfigurationError, match="secrets"):
        Workspace.open(ws.path, PASSPHRASE)


def test_existing_workspace_is_not_overwritten(make_workspace) -> None:
    ws = make_workspace()
    before = _snapshot(ws.path)
    with pytest.raises(WorkspaceExists) as info:
        make_workspace()
    assert str(ws.path) in str(info.value)
    assert _snapshot(ws.path) == before


def test_force_replaces_the_workspace(tmp_path: Path, make_workspace) -> None:
    old = make_workspace()
    old_secret = old.secret("spark-auth-secret")
    (old.path / "marker").write_text("old")
    new = make_workspace(force=True)
    assert not (new.path / "marker").exists()
    assert Workspace.open(new.path, PASSPHRASE).secret("spark-auth-secret") != old_secret
    assert [p.name for p in tmp_path.iterdir()] == ["ws"]


def test_non_workspace_directory_refused(tmp_path: Path, make_workspace) -> None:
    target = tmp_path / "ws"
    target.mkdir()
    (target / "notes.txt").write_text("mine")
    with pytest.raises(WorkspaceExists, match="not a ppml workspace"):
        make_workspace()
    assert (target / "notes.txt").read_text() == "mine"
    with pytest.raises(WorkspaceExists, match="not a ppml workspace"):
        make_workspace(force=True)  # --force replaces workspaces only, never other data
    assert (target / "notes.txt").read_text() == "mine"


def test_empty_directory_is_used(tmp_path: Path, make_workspace) -> None:
    (tmp_path / "ws").mkdir(mode=0o755)
    ws = make_workspace()
    assert os.stat(ws.path).st_mode & 0o777 == 0o700


def test_regular_file_is_refused_even_with_force(tmp_path: Path, make_workspace) -> None:
    (tmp_path / "ws").write_text("a file")
    with pytest.raises(WorkspaceExists):
        make_workspace(force=True)
    assert (tmp_path / "ws").read_text() == "a file"


def test_failure_midway_leaves_nothing(tmp_path: Path, make_workspace, monkeypatch) -> None:
    def boom(*args: object, **kwargs: object) -> object:
        raise RuntimeError("injected failure")

    monkeypatch.setattr(build_mod.pki, "issue_leaf", boom)
    with pytest.raises(RuntimeError, match="injected"):
        make_workspace()
    assert list(tmp_path.iterdir()) == []


def test_failure_midway_keeps_the_existing_workspace(
    tmp_path: Path, make_workspace, monkeypatch
) -> None:
    ws = make_workspace()
    before = _snapshot(ws.path)
    monkeypatch.setattr(build_mod.pki, "enclave_signing_key", _raise_interrupt)
    with pytest.raises(KeyboardInterrupt):
        make_workspace(force=True)
    assert _snapshot(ws.path) == before
    assert [p.name for p in tmp_path.iterdir()] == ["ws"]
    assert Workspace.open(ws.path, PASSPHRASE).secret("ca-key-password")


def test_failed_rename_restores_the_old_workspace(
    tmp_path: Path, make_workspace, monkeypatch
) -> None:
    ws = make_workspace()
    before = _snapshot(ws.path)
    real_rename = os.rename

    def rename(src: object, dst: object) -> None:
        if ".creating" in str(src):
            raise OSError("injected rename failure")
        real_rename(src, dst)  # type: ignore[arg-type]

    monkeypatch.setattr(build_mod.os, "rename", rename)
    with pytest.raises(OSError, match="injected"):
        make_workspace(force=True)
    assert _snapshot(ws.path) == before
    assert [p.name for p in tmp_path.iterdir()] == ["ws"]


def _raise_interrupt() -> object:
    raise KeyboardInterrupt


def test_default_workspace_dir(tmp_path: Path) -> None:
    assert default_workspace_dir({"PPML_HOME": "/srv/ppml"}) == Path("/srv/ppml")
    assert default_workspace_dir({}, cwd=tmp_path) == tmp_path / DEFAULT_DIRNAME
    assert default_workspace_dir({"PPML_HOME": ""}, cwd=tmp_path) == tmp_path / ".ppml"


def test_master_key_is_never_shown(make_workspace) -> None:
    ws = make_workspace()
    key = ws._master_key
    assert key.hex() not in repr(ws) and repr(key) not in repr(ws)
    assert "ws" in repr(ws)
    with pytest.raises(TypeError):
        pickle.dumps(ws)


def test_key_service_uses_the_workspace_database(make_workspace) -> None:
    kms = pytest.importorskip("ppml.kms")
    if not hasattr(kms, "KeyService"):
        pytest.skip("ppml.kms.KeyService is not available yet")
    ws = make_workspace()
    assert not ws.kms_path.exists()
    with ws.key_service() as service:
        assert isinstance(service, kms.KeyService)
        assert service.list_keys() == []
    assert ws.kms_path.exists()
    assert ws.describe()["kms_initialized"] is True
    with Workspace.open(ws.path, PASSPHRASE).key_service(actor="tester") as again:
        assert again.list_keys() == []
