"""The root command group of `ppml`: every command (and command group) runs inside the error
boundary (`ppml.cli._common.handle_errors`). Imported when the typer app is built, never by the
plain file command lines (they run without typer, inside the same boundary)."""

from __future__ import annotations

import inspect
import re
from typing import Any

from typer.core import TyperGroup

from ppml.cli._common import handle_errors

__all__ = ["ErrorBoundary", "reflow"]


class ErrorBoundary(TyperGroup):
    """A typer root group that turns ppml errors and signals into one line on stderr and the
    documented exit code, for every command under it."""

    def invoke(self, ctx: Any) -> Any:  # typer's own click Context
        with handle_errors():
            return super().invoke(ctx)

    def main(self, *args: Any, **kwargs: Any) -> Any:
        _reflow_help(self)
        return super().main(*args, **kwargs)


_ITEM = re.compile(r"(?:[-*\u2022]|\d+[.)]|\$)\s")


def reflow(text: str) -> str:
    """Help text as paragraphs: the line breaks that wrap a docstring's prose are dropped (the
    terminal wraps it); list items stay one per line; a paragraph that starts indented (an
    example) or with ``\\b`` stays as written."""
    paragraphs = inspect.cleandoc(text).split("\n\n")
    return "\n\n".join(_reflow_paragraph(p) for p in paragraphs)


def _reflow_paragraph(paragraph: str) -> str:
    lines = paragraph.split("\n")
    listed = any(_ITEM.match(line) for line in lines)
    indented = any(line[:1].isspace() for line in lines)
    if paragraph[:1] in ("\b", " ") or (indented and not listed):
        return paragraph
    out: list[str] = []
    for line in lines:
        if out and not _ITEM.match(line):
            out[-1] = f"{out[-1]} {line.strip()}"
        else:
            out.append(line.strip())
    return "\n".join(out)


def _reflow_help(command: Any) -> None:
    """Reflow the help of `command`, its parameters and every command under it (once)."""
    if getattr(command, "_ppml_reflowed", False):
        return
    command._ppml_reflowed = True
    if command.help:
        command.help = reflow(command.help)
    for param in command.params:
        text = getattr(param, "help", None)
        if text:
            param.help = reflow(text)
    for sub in getattr(command, "commands", {}).values():  # a group's (typer's own click)
        _reflow_help(sub)
