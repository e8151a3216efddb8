"""What the KMS commands (`ppml key`, `ppml audit`, `ppml policy`) share: the frame of a command
that prints in a chosen format, and the workspace's key service opened for one use."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from ppml.cli._common import check_format, open_workspace

if TYPE_CHECKING:
    from ppml.kms import KeyService, ReleasePolicies

__all__ = ["kms_command", "with_keys", "with_policies"]

_T = TypeVar("_T")


@contextlib.contextmanager
def kms_command(fmt: str) -> Iterator[None]:
    """A command's frame: the output format is checked before anything else is done (errors
    become exit codes at the CLI's one boundary, the root group in `ppml.cli`)."""
    check_format(fmt)
    yield


def with_keys(
    workspace: Path | None, passphrase_file: Path | None, use: Callable[[KeyService], _T]
) -> _T:
    """What `use` returns from the workspace's key service (opened with the passphrase, closed
    before the caller prints)."""
    with open_workspace(workspace, passphrase_file).key_service() as keys:
        return use(keys)


def with_policies(
    workspace: Path | None, passphrase_file: Path | None, use: Callable[[ReleasePolicies], _T]
) -> _T:
    """What `use` returns from the workspace's release policies (sim rules accepted only in a
    dev workspace)."""
    ws = open_workspace(workspace, passphrase_file)
    with ws.key_service() as keys:
        return use(keys.policies(allow_sim=ws.dev))
