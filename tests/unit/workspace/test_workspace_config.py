"""config.toml round trips and validation, `describe`, and the package's public surface."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pytest

import ppml.workspace
from ppml.crypto.passphrase import KdfParams
from ppml.errors import ConfigurationError
from ppml.workspace import FileNames, Workspace, WorkspaceConfig

NOW = dt.datetime(2030, 1, 2, 3, 4, 5, tzinfo=dt.UTC)


def test_public_api() -> None:
    assert sorted(ppml.workspace.__all__) == [
        "DEFAULT_DIRNAME",
        "FileNames",
        "Layout",
        "Workspace",
        "WorkspaceConfig",
        "default_workspace_dir",
    ]
    for name in ppml.workspace.__all__:
        assert hasattr(ppml.workspace, name)


def test_config_round_trip(tmp_path: Path) -> None:
    config = WorkspaceConfig(
        created_at=NOW, profile="dev", hosts=("a.example", "10.0.0.1"), kdf=KdfParams.for_testing()
    )
    config.save(tmp_path / "config.toml")
    assert WorkspaceConfig.load(tmp_path / "config.toml") == config
    assert config.dev


def test_created_at_comes_from_the_injected_clock(tmp_path: Path, kdf, passphrase) -> None:
    ws = Workspace.create(tmp_path / "ws", passphrase, kdf=kdf, clock=lambda: NOW)
    assert ws.config.created_at == NOW
    facts = ws.describe()["certificates"]["ca"]
    assert facts["not_before"] == (NOW - dt.timedelta(minutes=5)).isoformat()


def _with(text: str, old: str, new: str) -> bytes:
    assert old in text
    return text.replace(old, new, 1).encode()


@pytest.mark.parametrize(
    ("old", "new", "match"),
    [
        ("format_version = 1", "format_version = 2", "format version"),
        ('profile = "production"', 'profile = "staging"', "profile"),
        ('"a.example"', '"bad host!"', "invalid host"),
        ('master_key = "master-key.sealed"', 'master_key = "../outside"', "inside the workspace"),
        ('master_key = "master-key.sealed"', 'master_key = "/etc/passwd"', "inside the workspace"),
        ("memory_kib = 1024", "memory_kib = 1", "Argon2id"),
        ('algorithm = "argon2id"', 'algorithm = "md5"', "KDF"),
        ("default_segment_size = 1048576", "default_segment_size = 0", "segment"),
        ("default_segment_size = 1048576", "default_segment_size = true", "malformed"),
        ("[files]", '[files]\nextra = "x"', "unknown"),
        ("profile", "profile_", "incomplete"),
    ],
)
def test_damaged_config_is_a_configuration_error(
    tmp_path: Path, old: str, new: str, match: str
) -> None:
    path = tmp_path / "config.toml"
    config = WorkspaceConfig(created_at=NOW, hosts=("a.example",), kdf=KdfParams.for_testing())
    path.write_bytes(_with(config.to_toml().decode(), old, new))
    with pytest.raises(ConfigurationError, match=match):
        WorkspaceConfig.load(path)


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match=r"no config\.toml"):
        WorkspaceConfig.load(tmp_path / "config.toml")


def test_file_names_are_validated() -> None:
    with pytest.raises(ConfigurationError):
        FileNames(keystore="tls/../../x.p12")
    with pytest.raises(ConfigurationError):
        FileNames(secrets="config.toml")


def test_describe_shows_public_facts_only(shared_ws: Workspace, extra_hosts) -> None:
    facts = shared_ws.describe()
    text = json.dumps(facts)  # must be JSON-serializable for `ppml workspace show --json`
    for name in shared_ws.secret_names():
        assert shared_ws.secret(name) not in text
    assert shared_ws._master_key.hex() not in text
    assert facts["path"] == str(shared_ws.path)
    assert facts["files"]["server_key"] == str(shared_ws.server_key)
    assert set(extra_hosts) <= set(facts["certificates"]["server"]["sans"])
    assert facts["certificates"]["server"]["issuer"] == facts["certificates"]["ca"]["subject"]
    assert len(facts["certificates"]["ca"]["sha256"]) == 64
    assert facts["secrets"] == shared_ws.secret_names()
