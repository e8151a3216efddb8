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


def test_the_tpch_examples_queries_are_measured_with_it(tmp_path: Path) -> None:
    """examples/spark/tpch.py runs SQL from tpch_queries.py, a local import: the measurement
    covers it, so a changed query is another measurement (no query file is read at run time)."""
    import json

    for name in ("tpch.py", "tpch_queries.py"):
        (tmp_path / name).write_bytes((ROOT / "examples" / "spark" / name).read_bytes())
    manifest = run_ppml("measure", "--manifest", "--", sys.executable, tmp_path / "tpch.py", "enc")
    assert manifest.code == 0, manifest.err
    listed = json.loads(manifest.out.split("\n", 1)[1])["trusted_files"]  # after the digest
    assert "tpch_queries.py" in {Path(f["path"]).name for f in listed}
    before = run_ppml("measure", "--", sys.executable, tmp_path / "tpch.py", "enc").out
    queries = tmp_path / "tpch_queries.py"
    queries.write_text(queries.read_text().replace("'GERMANY'", "'FRANCE'"))
    after = run_ppml("measure", "--", sys.executable, tmp_path / "tpch.py", "enc").out
    assert before.splitlines()[0] != after.splitlines()[0]
