"""The `ppml` command line: the one place that turns errors into exit codes.

Commands raise `ppml.errors.PPMLError`; the error boundary (`handle_errors`, around every
command: the root group's `invoke`, and the plain file command lines that run without typer)
prints it as one line on stderr and exits with its family's code.

Exit codes: 0 success; 1 unexpected internal error; 2 usage error (bad arguments, missing or
wrong input, output exists); 3 integrity error (tampered, truncated or mixed-up data, or a
broken audit chain); 4 key access error (wrong passphrase, unknown key or version); 5
configuration error (no or damaged workspace, missing passphrase); 130 interrupted (Ctrl-C); 143
and 129 terminated by SIGTERM or SIGHUP (handled like Ctrl-C: no partial output is left).
"""

from __future__ import annotations

import contextlib
import importlib
import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ppml import __version__
from ppml.cli._common import Terminated, handle_errors, install_signal_handlers

if TYPE_CHECKING:
    import typer

__all__ = ["app", "main"]

# The modules that register commands, in help order, and the commands (or command groups) each
# registers. A command line names one of them: `main` imports and registers only that module, so
# that `ppml encrypt` does not import what `ppml run` or `ppml serving` need, nor has typer
# build their commands. `app` (for tests and embedding) has every command.
_MODULES: dict[str, tuple[str, ...]] = {
    "init_cmd": ("init",),
    "file_cmds": ("encrypt", "decrypt", "inspect", "rewrap"),
    "key_cmds": ("key", "audit", "secret"),
    "policy_cmds": ("policy",),
    "attest_cmds": ("attest",),
    "sql_cmd": ("sql",),
    "run_cmd": ("measure", "run", "serve"),
    "demo_cmd": ("demo",),
    "spark_cmds": ("spark-submit", "spark"),
    "flink_cmds": ("flink",),
    "serving_cmds": ("serving",),
}
_COMMAND_MODULES = {cmd: module for module, cmds in _MODULES.items() for cmd in cmds}
_registered: list[str] = []
_root_app: list[typer.Typer] = []


def _new_app() -> typer.Typer:
    import typer

    from ppml.cli.boundary import ErrorBoundary

    app = typer.Typer(
        cls=ErrorBoundary,
        name="ppml",
        help="ppml: encrypted data, attested workloads, keys released only to code you trust.",
        no_args_is_help=True,
        add_completion=False,
        pretty_exceptions_enable=False,
        context_settings={"help_option_names": ["-h", "--help"]},
    )

    def _version(value: bool) -> None:
        if value:
            typer.echo(f"ppml {__version__}")
            raise typer.Exit()

    @app.callback()
    def _root(
        version: bool = typer.Option(
            False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
        ),
    ) -> None:
        """ppml: encrypted data, attested workloads, keys released only to code you trust.

        Exit codes: 0 ok, 2 usage, 3 integrity, 4 key access, 5 configuration, 130 interrupted.
        """

    return app


def _register(modules: Sequence[str]) -> typer.Typer:
    if not _root_app:
        _root_app.append(_new_app())
    app = _root_app[0]
    for name in _MODULES:
        if name in modules and name not in _registered:
            importlib.import_module(f"ppml.cli.{name}").register(app)
            _registered.append(name)
    return app


def _app_for(argv: Sequence[str]) -> typer.Typer:
    """The application with the commands that `argv` can reach: only its command's module when
    it starts with a known command name, else all of them (help, version, a misspelling)."""
    module = _COMMAND_MODULES.get(argv[0]) if argv else None
    return _register([module] if module is not None else list(_MODULES))


def __getattr__(name: str) -> Any:
    if name == "app":
        return _register(list(_MODULES))
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _run_direct(argv: Sequence[str]) -> None:
    """Run a plain `ppml encrypt` or `ppml decrypt` command line without typer (see
    `ppml.cli.files.parse_direct`), then end the process; return when typer must parse `argv`."""
    if not argv or argv[0] not in ("encrypt", "decrypt"):
        return
    from ppml.cli.files import parse_direct

    direct = parse_direct(argv)
    if direct is None:
        return
    command, kwargs = direct
    try:
        with handle_errors():
            command(**kwargs)
        code = 0
    except SystemExit as exc:  # the error boundary's exit code
        code = exc.code if isinstance(exc.code, int) else 1
    # End without the interpreter's teardown (finalizing every module and object: some 50 ms
    # after a file command). The command is over: its output is complete and in place or
    # removed, the KMS is closed, and the standard streams are flushed here.
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    os._exit(code)


def main() -> None:
    """Console-script entry point."""
    install_signal_handlers()
    try:
        _run_direct(sys.argv[1:])
        _app_for(sys.argv[1:])()
    except Terminated as exc:  # outside a command body
        sys.stderr.write(f"ppml: terminated ({exc.name})\n")
        sys.exit(128 + exc.signum)
    except KeyboardInterrupt:  # Ctrl-C outside a command body
        sys.stderr.write("ppml: interrupted\n")
        sys.exit(130)
