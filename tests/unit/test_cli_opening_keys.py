"""`OpeningKeys`: the file commands' key service, opened (Argon2id and all) in a background
thread while the command prepares its work; what the opening raises surfaces at the first key
operation, reported as the opening's error, not as the error of the file being worked on."""

from __future__ import annotations

from pathlib import Path

import pytest

from ppml.cli._common import OpeningKeys
from ppml.crypto.passphrase import KdfParams
from ppml.data.files import annotate_errors
from ppml.errors import KeyNotFound, WorkspaceNotFound, WrongPassphrase
from ppml.workspace import Workspace

PASSPHRASE = b"opening keys passphrase"


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("ws")
    ws = Workspace.create(root / "ws", PASSPHRASE, kdf=KdfParams.for_testing())
    with ws.key_service() as kms:
        kms.create_key("sales")
    (root / "pass").write_bytes(PASSPHRASE + b"\n")
    (root / "wrong").write_bytes(b"not the passphrase\n")
    return ws.path


def test_keys_from_the_opened_workspace(workspace: Path) -> None:
    with OpeningKeys(workspace, workspace.parent / "pass", check_keys=["sales"]) as keys:
        data_key = keys.generate_data_key("sales")
        assert keys.unwrap(data_key.wrapped) == data_key.plaintext
        assert keys.describe("sales").name == "sales"


def test_an_unknown_key_fails_at_the_first_key_operation_as_itself(workspace: Path) -> None:
    with (
        pytest.raises(KeyNotFound) as info,
        OpeningKeys(workspace, workspace.parent / "pass", check_keys=["sales", "nope"]) as keys,
        annotate_errors(Path("people.csv")),  # the data layer names its file in errors
    ):
        keys.generate_data_key("sales")
    assert info.value.path is None
    assert info.value.diagnostics() == "key access error: no key named 'nope'"


def test_a_wrong_passphrase_names_the_workspace(workspace: Path) -> None:
    with (
        pytest.raises(WrongPassphrase) as info,
        OpeningKeys(workspace, workspace.parent / "wrong") as keys,
        annotate_errors(Path("people.csv")),
    ):
        keys.unwrap(keys.generate_data_key("sales").wrapped)
    assert info.value.path == str(workspace)


def test_no_workspace_fails_before_anything_starts(tmp_path: Path) -> None:
    with pytest.raises(WorkspaceNotFound):
        OpeningKeys(tmp_path / "none", tmp_path / "pass")


def test_leaving_without_a_key_operation_closes_what_was_opened(workspace: Path) -> None:
    keys = OpeningKeys(workspace, workspace.parent / "pass")
    with keys:
        pass
    assert keys._service is None  # closed once the opening ended


def test_an_unexpected_error_of_the_opening_surfaces_as_it_is(
    workspace: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: object, **kwargs: object) -> Workspace:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(Workspace, "open", broken)
    with (
        pytest.raises(OSError, match="Input/output error"),
        OpeningKeys(workspace, workspace.parent / "pass") as keys,
    ):
        keys.generate_data_key("sales")
