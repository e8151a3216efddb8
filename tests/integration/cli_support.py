"""Running the real `ppml` command in a subprocess, as a user would."""

from __future__ import annotations

import os
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

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
    isolated: bool = False,
) -> Result:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PPML_")}
    if home is not None:
        env["PPML_HOME"] = str(home)
    if passphrase is not None:
        env["PPML_PASSPHRASE"] = passphrase
    proc = subprocess.run(
        [sys.executable, *(["-I"] if isolated else []), "-m", "ppml", *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        input=stdin if stdin is not None else "",
        timeout=120,
        check=False,
    )
    return Result(proc.returncode, proc.stdout, proc.stderr)


def admin_tls_context(ws: Path, passphrase: str = PASSPHRASE) -> ssl.SSLContext:
    """Trusts the workspace CA and presents the workspace's client certificate (its key is
    encrypted at rest: the workspace opens it)."""
    from ppml.workspace import Workspace

    return Workspace.open(ws, passphrase.encode()).client_ssl_context()


def client_cert(ws: Path, passphrase: str = PASSPHRASE) -> tuple[Path, Path, str]:
    """The workspace's own client certificate, as `InputQueue(cert=...)` takes it."""
    from ppml.workspace import Workspace

    opened = Workspace.open(ws, passphrase.encode())
    return (opened.client_cert, opened.client_key, opened.tls_key_password())


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def ppml_serve(
    ws: Path, log: Path, passphrase: str = PASSPHRASE, start_timeout: float = 30.0
) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """`ppml serve` for workspace `ws` on a free loopback port, yielded once /healthz answers;
    stopped (terminate, then kill) at the end. Its stderr goes to `log`."""
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PPML_")}
    env["PPML_PASSPHRASE"] = passphrase
    cmd = [sys.executable, "-m", "ppml", "serve", "--port", str(port), "--workspace", str(ws)]
    with open(log, "ab") as err:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=err)
    url = f"https://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + start_timeout
        verify = ssl.create_default_context(cafile=str(ws / "tls" / "ca.pem"))  # /healthz only
        with httpx.Client(base_url=url, verify=verify, timeout=2.0) as client:
            while True:
                assert proc.poll() is None, log.read_text()
                try:
                    if client.get("/healthz").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert time.monotonic() < deadline, "the server did not start: " + log.read_text()
                time.sleep(0.05)  # polling another process's start-up; nothing to wait on
        yield proc, url
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
