"""The plain-Python examples, run attested as the README shows."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
from cli_support import run_ppml

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def ws(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("examples") / "ws"
    assert run_ppml("init", "--dev", "--dir", d).code == 0
    return d


def test_helloworld(ws: Path) -> None:
    script = ROOT / "examples" / "python" / "helloworld.py"
    r = run_ppml("run", "--tee", "sim", "--", sys.executable, script, home=ws)
    assert r.code == 0, r.err
    assert r.out.strip() == "Hello World from ppml (attested, TEE sim)"
    plain = run_ppml("measure", "--", sys.executable, script)
    assert re.fullmatch(r"[0-9a-f]{96}", plain.out.splitlines()[0])


def test_numpy_dot(ws: Path) -> None:
    script = ROOT / "examples" / "python" / "numpy_dot.py"
    r = run_ppml("run", "--tee", "sim", "--", sys.executable, script, "256", home=ws)
    assert r.code == 0, r.err
    assert re.fullmatch(r"numpy\.dot: \d+\.\d{6} sec", r.out.strip())
