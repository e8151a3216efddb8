"""The root command group of `ppml`: every command (and command group) runs inside the error
boundary (`ppml.cli._common.handle_errors`). Imported when the typer app is built, never by the
plain file command lines (they run without typer, inside the same boundary)."""

from __future__ import annotations

from typing import Any

from typer.core import TyperGroup

from ppml.cli._common import handle_errors

__all__ = ["ErrorBoundary"]


class ErrorBoundary(TyperGroup):
    """A typer root group that turns ppml errors and signals into one line on stderr and the
    documented exit code, for every command under it."""

    def invoke(self, ctx: Any) -> Any:  # typer's own click Context
        with handle_errors():
            return super().invoke(ctx)
