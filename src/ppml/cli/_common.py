"""What every command shares: the workspace option, the passphrase, output, and error handling.

Typer is imported only by what declares or parses command lines (the options below, on first
use): the plain `ppml encrypt` and `ppml decrypt` command lines run without it (see
`ppml.cli.files`).
"""

from __future__ import annotations

import contextlib
import getpass
import json
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

from ppml.errors import ConfigurationError, PPMLError, WorkspaceNotFound

if TYPE_CHECKING:
    from ppml.crypto.envelope import DataKey, DataKeyProvider, WrappedKey
    from ppml.kms import KeyInfo, KeyService
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


if TYPE_CHECKING:  # the types; typer's metadata is added where typer reads them (below)
    WorkspaceOption = Annotated[Path | None, "typer.Option"]
    PassphraseFileOption = Annotated[Path | None, "typer.Option"]
    FormatOption = Annotated[str, "typer.Option"]


def _options() -> dict[str, Any]:
    import typer

    return {
        "WorkspaceOption": Annotated[
            Path | None,
            typer.Option(
                "--workspace",
                "-w",
                help="Workspace directory. Default: $PPML_HOME, else ./.ppml",
                show_default=False,
            ),
        ],
        "PassphraseFileOption": Annotated[
            Path | None,
            typer.Option(
                "--passphrase-file",
                help="Read the workspace passphrase from this file (first line). "
                "Default: $PPML_PASSPHRASE, else a prompt.",
                show_default=False,
            ),
        ],
        "FormatOption": Annotated[
            str, typer.Option("--format", help="Output format: text or json.", show_default=True)
        ],
    }


def __getattr__(name: str) -> Any:
    if name in ("WorkspaceOption", "PassphraseFileOption", "FormatOption"):
        globals().update(_options())
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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


def _existing_workspace(workspace: Path | None) -> Path:
    from ppml.workspace.layout import is_workspace

    path = workspace_dir(workspace)
    if not is_workspace(path):
        raise WorkspaceNotFound(
            "no ppml workspace here: run `ppml init` (or pass --workspace / set PPML_HOME)",
            path=path,
        )
    return path


def open_workspace(workspace: Path | None, passphrase_file: Path | None) -> Workspace:
    """Open the workspace (unsealing its master key with the passphrase)."""
    from ppml.workspace import Workspace

    path = _existing_workspace(workspace)
    return Workspace.open(path, read_passphrase(passphrase_file))


class OpeningKeys:
    """The workspace's key service, opened in a background thread.

    Unsealing the master key (Argon2id: the bulk of a key-using command's fixed cost) runs while
    the command does what needs no key: importing the data layer, checking its input and
    output, making the output and reserving its blocks. The first key operation waits for the
    opening and raises what the opening raised. The passphrase is read (or asked for) first, in
    the calling thread; `check_keys` are looked up as soon as the KMS is open, so that an
    unknown key name fails before any data is written.
    """

    def __init__(
        self,
        workspace: Path | None,
        passphrase_file: Path | None,
        *,
        check_keys: Sequence[str] = (),
    ) -> None:
        path = _existing_workspace(workspace)
        passphrase = read_passphrase(passphrase_file)
        self._service: KeyService | None = None
        self._error: Exception | None = None
        self._error_path: str | None = None
        self._thread = threading.Thread(
            target=self._open,
            args=(path, passphrase, tuple(check_keys)),
            name="ppml-open-workspace",
            daemon=True,  # Ctrl-C does not wait for Argon2id to finish
        )
        self._thread.start()

    def _open(self, path: Path, passphrase: bytes, check_keys: tuple[str, ...]) -> None:
        try:
            from ppml.workspace import Workspace

            service = Workspace.open(path, passphrase).key_service()
            try:
                for name in check_keys:
                    service.describe(name)
            except Exception:
                service.close()
                raise
            self._service = service
        except Exception as exc:  # raised again in the thread that asks for a key
            self._error = exc
            self._error_path = exc.path if isinstance(exc, PPMLError) else None

    def _opened(self) -> KeyService:
        self._thread.join()
        if self._error is not None:
            raise self._error
        assert self._service is not None
        return self._service

    def generate_data_key(self, key_name: str) -> DataKey:
        return self._opened().generate_data_key(key_name)

    def unwrap(self, wrapped: WrappedKey) -> bytes:
        return self._opened().unwrap(wrapped)

    def describe(self, name: str) -> KeyInfo:
        return self._opened().describe(name)

    def close(self) -> None:
        """Close the key service, once the opening has ended."""
        self._thread.join()
        if self._service is not None:
            self._service.close()
            self._service = None

    def __enter__(self) -> OpeningKeys:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if isinstance(exc, PPMLError) and exc is self._error:
            # An error of the opening, not of the file that was being worked on when it
            # surfaced (the data layer names its file in the errors it lets through).
            exc.path = self._error_path
        if isinstance(exc, KeyboardInterrupt):
            return  # interrupted: the process ends, and the opening with it
        self.close()


@contextlib.contextmanager
def key_provider(workspace: Path | None, passphrase_file: Path | None) -> Iterator[DataKeyProvider]:
    """The keys for a command: released by the key broker after attestation when running under
    `ppml run`, else the workspace's own KMS (which needs the passphrase)."""
    from ppml.tee.runtime import process_key_provider

    def workspace_keys() -> KeyService:
        return open_workspace(workspace, passphrase_file).key_service()

    with contextlib.closing(process_key_provider(workspace_keys)) as keys:
        yield keys


def print_json(value: Any) -> None:
    sys.stdout.write(json.dumps(value, indent=2, default=str) + "\n")


def check_format(fmt: str) -> str:
    if fmt not in ("text", "json"):
        import typer

        raise typer.BadParameter("expected text or json", param_hint="--format")
    return fmt


def echo_error(message: str) -> None:
    """One line on stderr."""
    sys.stderr.write(message + "\n")
    sys.stderr.flush()


def fail(exc: PPMLError) -> NoReturn:
    echo_error(f"ppml: {exc.diagnostics()}")
    raise SystemExit(exc.exit_code)


@contextlib.contextmanager
def handle_errors() -> Iterator[None]:
    """Turn ppml errors and Ctrl-C into one line on stderr and the documented exit code."""
    try:
        yield
    except PPMLError as exc:
        fail(exc)
    except Terminated as exc:
        echo_error(f"ppml: terminated ({exc.name})")
        raise SystemExit(128 + exc.signum) from None
    except KeyboardInterrupt:
        echo_error("ppml: interrupted")
        raise SystemExit(INTERRUPTED_EXIT) from None


class ByteProgress:
    """A progress bar on stderr for long work, started once the total is known (`start`, which
    the data layer's verbs call); silent unless stderr is a terminal and the work is large."""

    THRESHOLD = 256 << 20

    def __init__(self, description: str) -> None:
        self._description = description
        self._bar: Any = None

    def start(self, total: int) -> Callable[[int], None] | None:
        """Show the bar for `total` bytes when it is worth it; the callback for bytes done."""
        if total < self.THRESHOLD or not sys.stderr.isatty():
            return None
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
        self._task = self._bar.add_task(self._description, total=total)
        self._bar.start()
        return self.advance

    def __enter__(self) -> ByteProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.stop()

    def advance(self, n: int) -> None:
        if self._bar is not None:
            self._bar.advance(self._task, n)


def cluster_status_text(info: dict[str, Any] | None, fmt: str) -> dict[str, Any] | None:
    """A cluster's status as `ppml spark|flink cluster status` show it: with no cluster, "no
    cluster" (or ``{"running": false}``) and exit 1; as JSON, printed here (None is returned);
    as text, `info` is returned for the caller to print."""
    import typer

    check_format(fmt)
    if info is None:
        if fmt == "json":
            print_json({"running": False})
        else:
            typer.echo("no cluster")
        raise typer.Exit(1)
    if fmt == "json":
        print_json(info)
        return None
    return info
