"""The workspace: the directory `ppml init` creates, holding the sealed master key, sealed
secrets, TLS material, the enclave signing key and the embedded KMS database.

The names below are imported from their modules on first use: checking whether a directory is a
workspace (`ppml.workspace.layout`) does not import the certificate machinery.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ppml._internal.lazy import lazy_exports

if TYPE_CHECKING:
    from ppml.workspace.config import WorkspaceConfig
    from ppml.workspace.layout import FileNames, Layout
    from ppml.workspace.workspace import DEFAULT_DIRNAME, Workspace, default_workspace_dir

__all__ = [
    "DEFAULT_DIRNAME",
    "FileNames",
    "Layout",
    "Workspace",
    "WorkspaceConfig",
    "default_workspace_dir",
]

__getattr__ = lazy_exports(
    __name__,
    {
        "ppml.workspace.config": ("WorkspaceConfig",),
        "ppml.workspace.layout": ("FileNames", "Layout"),
        "ppml.workspace.workspace": ("DEFAULT_DIRNAME", "Workspace", "default_workspace_dir"),
    },
)
