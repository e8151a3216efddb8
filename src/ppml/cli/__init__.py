"""The `ppml` command line: the one place that turns errors into exit codes.

Exit codes: 0 success; 1 unexpected internal error; 2 usage error (bad arguments, missing or
wrong input, output exists); 3 integrity error (tampered, truncated or mixed-up data, or a
broken audit chain); 4 key access error (wrong passphrase, unknown key or version); 5
configuration error (no or damaged workspace, missing passphrase); 130 interrupted (Ctrl-C); 143
and 129 terminated by SIGTERM or SIGHUP (handled like Ctrl-C: no partial output is left).
"""

from __future__ import annotations

import sys

import typer

from ppml import __version__
from ppml.cli import (
    attest_cmds,
    demo_cmd,
    file_cmds,
    init_cmd,
    key_cmds,
    policy_cmds,
    run_cmd,
    serving_cmds,
    spark_cmds,
    sql_cmd,
)
from ppml.cli._common import Terminated, install_signal_handlers

__all__ = ["app", "main"]

app = typer.Typer(
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


init_cmd.register(app)
file_cmds.register(app)
key_cmds.register(app)
policy_cmds.register(app)
attest_cmds.register(app)
sql_cmd.register(app)
run_cmd.register(app)
demo_cmd.register(app)
spark_cmds.register(app)
serving_cmds.register(app)


def main() -> None:
    """Console-script entry point."""
    install_signal_handlers()
    try:
        app()
    except Terminated as exc:  # outside a command body
        sys.stderr.write(f"ppml: terminated ({exc.name})\n")
        sys.exit(128 + exc.signum)
    except KeyboardInterrupt:  # Ctrl-C outside a command body
        sys.stderr.write("ppml: interrupted\n")
        sys.exit(130)
