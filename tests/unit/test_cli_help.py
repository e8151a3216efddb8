"""Every command's --help renders its text as paragraphs that the terminal wraps, not with the
docstrings' own line breaks in the middle of sentences."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import typer.main
from typer.testing import CliRunner

from ppml.cli import app
from ppml.cli.boundary import reflow


def _commands(command: Any, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
    yield path, command
    for name, sub in getattr(command, "commands", {}).items():
        yield from _commands(sub, (*path, name))


def _help(path: tuple[str, ...], width: int) -> str:
    result = CliRunner().invoke(
        app, [*path, "--help"], env={"COLUMNS": str(width)}, terminal_width=width
    )
    assert result.exit_code == 0, result.output
    return result.output


def test_reflow_joins_prose_and_keeps_lists_and_examples() -> None:
    text = """First line
    goes on.

    A paragraph wrapped
    by hand, ending here.

    - an item
      that continues
    - another item

        ppml example --kept
        as written
    """
    assert reflow(text) == (
        "First line goes on.\n\n"
        "A paragraph wrapped by hand, ending here.\n\n"
        "- an item that continues\n- another item\n\n"
        "    ppml example --kept\n    as written"
    )


def test_serving_up_help_is_wrapped_by_the_terminal() -> None:
    wide = _help(("serving", "up"), 200)
    assert "with --detach it returns after readiness. State, logs" in wide
    narrow = _help(("serving", "up"), 60)
    widths = [len(line.rstrip()) for line in narrow.splitlines() if line.strip()]
    assert max(widths) <= 60


COMMANDS = [path for path, _ in _commands(typer.main.get_command(app)) if path]


@pytest.mark.parametrize("path", COMMANDS, ids=[" ".join(p) for p in COMMANDS])
def test_no_prose_line_is_broken_where_the_docstring_was(path: tuple[str, ...]) -> None:
    """At 200 columns the first 150 characters of each prose paragraph of a command's help are
    on one line (a docstring's own line breaks would cut them)."""
    root = typer.main.get_command(app)
    command = root
    for name in path:
        command = command.commands[name]
    lines = [" ".join(line.replace("`", "").split()) for line in _help(path, 200).splitlines()]
    for paragraph in reflow(command.help or "").split("\n\n"):
        if paragraph.startswith((" ", "\b")) or "\n" in paragraph or "[" in paragraph:
            continue  # an example or a list (lines as written), or rich markup
        plain = " ".join(paragraph.replace("`", "").split())[:150]
        assert any(plain in line for line in lines), (path, paragraph)
