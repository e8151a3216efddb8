"""What `ppml` does on a terminal: the passphrase prompt and the progress bar (on a real pty)."""

from __future__ import annotations

import os
import pty
import select
import subprocess
import sys
import time
from pathlib import Path

from cli_support import PASSPHRASE, run_ppml


def _run_on_pty(args: list[str], env: dict[str, str], answers: list[bytes]) -> tuple[int, bytes]:
    """Run ppml with stdin, stdout and stderr on a pty; answer each prompt in turn."""
    leader, follower = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "ppml", *args],
        stdin=follower,
        stdout=follower,
        stderr=follower,
        env=env,
        close_fds=True,
    )
    os.close(follower)
    seen = b""
    answered = 0
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([leader], [], [], 0.5)
            if ready:
                try:
                    chunk = os.read(leader, 65536)
                except OSError:  # the child closed the pty
                    break
                if not chunk:
                    break
                seen += chunk
                # Answer each prompt once, when it has appeared (not on its echoed newline).
                while answered < min(seen.count(b"passphrase:"), len(answers)):
                    os.write(leader, answers[answered] + b"\n")
                    answered += 1
            elif proc.poll() is not None:
                break
        return proc.wait(timeout=60), seen
    finally:
        os.close(leader)
        if proc.poll() is None:
            proc.kill()


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PPML_")}
    env.update(extra)
    return env


def test_init_prompts_twice_on_a_terminal(tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    code, out = _run_on_pty(
        ["init", "--dir", str(ws)], _env(), [b"typed passphrase", b"typed passphrase"]
    )
    assert code == 0, out
    assert b"Workspace passphrase:" in out and b"Repeat the passphrase:" in out
    assert b"typed passphrase" not in out  # not echoed
    assert run_ppml("key", "list", home=ws, passphrase="typed passphrase").code == 0


def test_init_refuses_two_different_passphrases(tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    code, out = _run_on_pty(["init", "--dir", str(ws)], _env(), [b"one", b"two"])
    assert code == 5 and b"differ" in out
    assert not ws.exists()


def test_progress_bar_for_large_files_on_a_terminal(tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    assert run_ppml("init", "--dir", ws).code == 0
    assert run_ppml("key", "create", "k", home=ws).code == 0
    big = tmp_path / "big.bin"
    with open(big, "wb") as fh:
        fh.truncate(300 << 20)  # over the 256 MiB threshold
    env = _env(PPML_HOME=str(ws), PPML_PASSPHRASE=PASSPHRASE)
    code, out = _run_on_pty(
        ["encrypt", str(big), "-o", str(tmp_path / "big.ppml"), "-k", "k"], env, []
    )
    assert code == 0, out
    assert b"encrypting" in out and b"MB" in out
    # Not on a terminal: no bar at all.
    r = run_ppml("encrypt", big, "-o", tmp_path / "big2.ppml", "-k", "k", home=ws)
    assert r.code == 0 and r.err == ""
