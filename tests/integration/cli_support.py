"""Running the real `ppml` command in a subprocess, as a user would."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

PASSPHRASE = "integration passphrase 0123"


@dataclass
class Result:
    code: int
    out: str
    err: str


def run_ppml(
    *args: str | Path,
    home: Path | None = None,
    passphrase: str | None = PASSPHRASE,
    cwd: Path | None = None,
    stdin: str | None = None,
) -> Result:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PPML_")}
    if home is not None:
        env["PPML_HOME"] = str(home)
    if passphrase is not None:
        env["PPML_PASSPHRASE"] = passphrase
    proc = subprocess.run(
        [sys.executable, "-m", "ppml", *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        input=stdin if stdin is not None else "",
        timeout=120,
        check=False,
    )
    return Result(proc.returncode, proc.stdout, proc.stderr)
