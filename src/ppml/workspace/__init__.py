"""The workspace: the directory `ppml init` creates, holding the sealed master key, sealed
secrets, TLS material, the enclave signing key and the embedded KMS database."""

from __future__ import annotations

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
