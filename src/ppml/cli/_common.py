"""What every command shares: the workspace option, the passphrase, output, and error handling."""

from __future__ import annotations

import contextlib
import getpass
import json
import os
import signal
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer

from ppml.errors import ConfigurationError, PPMLError, WorkspaceNotFound

if TYPE_CHECKING:
    from ppml.crypto.envelope import DataKeyProvider
    from ppml.workspace import Workspace

PASSPHRASE_ENV = "PPML_PASSPHRASE"  # noqa: S105 -- the variable's name, not a value
HOME_ENV = "PPML_HOME"
INTERRUPTED_EXIT = 130


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised in the main thread like Ctrl-C: every cleanup that runs on
    Ctrl-C runs (no partial output, no plaintext temporary left behind)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name


def _terminated(signum: int, _frame: object) -> None:
    raise Terminated(signum)


def install_signal_handlers() -> None:
    """Make SIGTERM and SIGHUP stop a command the way Ctrl-C does (a command that manages its
    own children installs its own handlers over these)."""
    for sig in (signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(sig) is signal.SIG_DFL:
            signal.signal(sig, _terminated)


WorkspaceOption = Annotated[
    Path | None,
    typer.Option(
        "--workspace",
        "-w",
        help="Workspace directory. Default: $PPML_HOME, else ./.ppml",
        show_default=False,
    ),
]
PassphraseFileOption = Annotated[
    Path | None,
    typer.Option(
        "--passphrase-file",
        help="Read the workspace passphrase from this file (first line). "
        "Default: $PPML_PASSPHRASE, else a prompt.",
        show_default=False,
    ),
]
FormatOption = Annotated[
    str, typer.Option("--format", help="Output format: text or json.", show_default=True)
]


def workspace_dir(option: Path | None) -> Path:
    """The workspace directory: the option, else $PPML_HOME, else ./.ppml."""
    if option is not None:
        return option
    env = os.environ.get(HOME_ENV)
    return Path(env) if env else Path.cwd() / ".ppml"


def read_passphrase(passphrase_file: Path | None, *, confirm: bool = False) -> bytes:
    """The passphrase from --passphrase-file, $PPML_PASSPHRASE, or a prompt on a terminal."""
    if passphrase_file is not None:
        try:
            lines = passphrase_file.read_bytes().splitlines()
        except OSError as exc:
            raise ConfigurationError(
                f"cannot read the passphrase file: {exc.strerror}", path=passphrase_file
            ) from None
        value = lines[0] if lines else b""
    elif PASSPHRASE_ENV in os.environ:
        value = os.environ[PASSPHRASE_ENV].encode()
    elif sys.stdin.isatty():
        value = getpass.getpass("Workspace passphrase: ").encode()
        if confirm and getpass.getpass("Repeat the passphrase: ").encode() != value:
            raise ConfigurationError("the two passphrases differ")
    else:
        raise ConfigurationError(
            "no passphrase: set PPML_PASSPHRASE, pass --passphrase-file, or run in a terminal"
        )
    if not value:
        raise ConfigurationError("the passphrase is empty")
    return value


def open_workspace(workspace: Path | None, passphrase_file: Path | None) -> Workspace:
    """Open the workspace (unsealing its master key with the passphrase)."""
    from ppml.workspace import Workspace

    path = workspace_dir(workspace)
    if not Workspace.exists(path):
        raise WorkspaceNotFound(
            "no ppml workspace here: run `ppml init` (or pass --workspace / set PPML_HOME)",
            path=path,
        )
    return Workspace.open(path, read_passphrase(passphrase_file))


@contextlib.contextmanager
def key_provider(workspace: Path | None, passphrase_file: Path | None) -> Iterator[DataKeyProvider]:
    """The keys for a command: released by the key broker after attestation when running under
    `ppml run`, else the workspace's own KMS (which needs the passphrase)."""
    from ppml.tee.runtime import AttestedKeyProvider, in_attested_run

    if in_attested_run():
        with AttestedKeyProvider.from_environment() as attested:
            yield attested
        return
    with open_workspace(workspace, passphrase_file).key_service() as keys:
        yield keys


def print_json(value: Any) -> None:
    sys.stdout.write(json.dumps(value, indent=2, default=str) + "\n")


def check_format(fmt: str) -> str:
    if fmt not in ("text", "json"):
        raise typer.BadParameter("expected text or json", param_hint="--format")
    return fmt


def fail(exc: PPMLError) -> NoReturn:
    typer.echo(f"ppml: {exc.diagnostics()}", err=True)
    raise typer.Exit(exc.exit_code)


@contextlib.contextmanager
def handle_errors() -> Iterator[None]:
    """Turn ppml errors and Ctrl-C into one line on stderr and the documented exit code."""
    try:
        yield
    except PPMLError as exc:
        fail(exc)
    except Terminated as exc:
        typer.echo(f"ppml: terminated ({exc.name})", err=True)
        raise typer.Exit(128 + exc.signum) from None
    except KeyboardInterrupt:
        typer.echo("ppml: interrupted", err=True)
        raise typer.Exit(INTERRUPTED_EXIT) from None


class ByteProgress:
    """A progress bar on stderr for long work; silent unless stderr is a terminal and the work
    is large."""

    THRESHOLD = 256 << 20

    def __init__(self, total: int, description: str) -> None:
        self._bar: Any = None
        if total >= self.THRESHOLD and sys.stderr.isatty():
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                DownloadColumn,
                Progress,
                TimeRemainingColumn,
                TransferSpeedColumn,
            )

            self._bar = Progress(
                "[progress.description]{task.description}",
                BarColumn(),
                DownloadColumn(),
                TransferSpeedColumn(),
                TimeRemainingColumn(),
                console=Console(stderr=True),
                transient=True,
            )
            self._task = self._bar.add_task(description, total=total)

    def __enter__(self) -> ByteProgress:
        if self._bar is not None:
            self._bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.stop()

    def advance(self, n: int) -> None:
        if self._bar is not None:
            self._bar.advance(self._task, n)

    @property
    def callback(self) -> Callable[[int], None] | None:
        return self.advance if self._bar is not None else None
