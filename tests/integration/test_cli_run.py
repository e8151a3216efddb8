"""Attested runs end to end: `ppml measure`, `ppml run --tee sim`, `ppml sql --tee sim`, with a
real workspace, a real launcher serving TLS on loopback, and real child processes."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
from cli_support import PASSPHRASE, ppml_serve, run_ppml

WORKLOAD = """\
import json, os, sys
import ppml
table = ppml.read_table("people.csv")
ppml.write_table(table, "out.csv", key="results")
env = {k: v for k, v in os.environ.items() if k.startswith("PPML_")}
print(json.dumps({"rows": table.num_rows, "env": sorted(env)}))
"""


SQL_WORKLOAD = """\
import json
import ppml
from ppml.errors import UsageError
result = ppml.sql(
    "SELECT count(*) AS n, max(age) AS oldest, min(name) AS first FROM people WHERE age > 18",
    tables={"people": "people.parquet"},
)
print(json.dumps(result.to_pylist()))
try:
    ppml.sql("SELECT * FROM read_text('/etc/hostname')", tables={"people": "people.parquet"})
except UsageError:
    print("refused")
"""


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A dev workspace, keys `sales` and `results`, an encrypted table and a workload script."""
    d = tmp_path_factory.mktemp("proj")
    ws = d / "ws"
    assert run_ppml("init", "--dev", "--dir", ws).code == 0
    for key in ("sales", "results"):
        assert run_ppml("key", "create", key, home=ws).code == 0
    (d / "plain.csv").write_text("name,age\nMichael,29\nAndy,30\nJustin,19\n")
    assert (
        run_ppml("encrypt", d / "plain.csv", "-o", d / "people.csv", "-k", "sales", home=ws).code
        == 0
    )
    (d / "plain.csv").unlink()
    (d / "job.py").write_text(WORKLOAD)
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(
        pa.table({"name": ["Michael", "Andy", "Justin"], "age": [29, 30, 19]}), d / "plain.parquet"
    )
    assert (
        run_ppml(
            "encrypt", d / "plain.parquet", "-o", d / "people.parquet", "-k", "sales", home=ws
        ).code
        == 0
    )
    (d / "plain.parquet").unlink()
    (d / "sqljob.py").write_text(SQL_WORKLOAD)
    return d


def _measure(project: Path, *cmd: str) -> str:
    r = run_ppml("measure", "--", *cmd, cwd=project)
    assert r.code == 0, r.err
    first = r.out.splitlines()[0]
    assert re.fullmatch(r"[0-9a-f]{96}", first)
    return first


def _allow(project: Path, measurement: str, *keys: str) -> None:
    for key in keys:
        r = run_ppml(
            "policy",
            "allow",
            key,
            "--tee",
            "sim",
            "--measurement",
            measurement,
            home=project / "ws",
        )
        assert r.code == 0, r.err


def test_measure_and_run_measure_agree(project: Path) -> None:
    m = _measure(project, sys.executable, "job.py")
    r = run_ppml("run", "--measure", "--", sys.executable, "job.py", cwd=project)
    assert r.code == 0 and r.out.splitlines()[0] == m
    r = run_ppml("measure", "--manifest", "--", sys.executable, "job.py", cwd=project)
    manifest = json.loads("\n".join(r.out.splitlines()[1:]))
    assert [f["path"] for f in manifest["trusted_files"]] == ["job.py"]


def test_allowed_workload_gets_its_keys_and_nothing_else(project: Path) -> None:
    ws = project / "ws"
    m = _measure(project, sys.executable, "job.py")
    _allow(project, m, "sales", "results")
    r = run_ppml("run", "--tee", "sim", "--", sys.executable, "job.py", home=ws, cwd=project)
    assert r.code == 0, r.err
    report = json.loads(r.out.strip().splitlines()[-1])
    assert report["rows"] == 3
    # The child saw only the launcher's variables: no passphrase, no workspace path.
    assert "PPML_PASSPHRASE" not in report["env"] and "PPML_HOME" not in report["env"]
    assert {"PPML_TEE", "PPML_TEE_CHANNEL", "PPML_KMS_URL"} <= set(report["env"])
    assert r.err.count("SIMULATED TEE") == 1
    # The owner decrypts the result; the audit log shows the releases.
    out = project / "result.csv"
    assert run_ppml("decrypt", project / "out.csv", "-o", out, "--force", home=ws).code == 0
    assert "Justin" in out.read_text()
    entries = json.loads(run_ppml("audit", "show", "--format", "json", home=ws).out)
    released = {(e["op"], e["key_name"], e["outcome"]) for e in entries}
    assert ("release_unwrap", "sales", "ok") in released
    assert ("release_datakey", "results", "ok") in released


def test_a_changed_script_is_refused_and_audited(project: Path) -> None:
    ws = project / "ws"
    _allow(project, _measure(project, sys.executable, "job.py"), "sales", "results")
    changed = project / "job2.py"
    changed.write_text(WORKLOAD + "#")
    r = run_ppml("run", "--tee", "sim", "--", sys.executable, "job2.py", home=ws, cwd=project)
    assert r.code != 0
    assert "access denied" in r.err
    entries = json.loads(run_ppml("audit", "show", "--format", "json", home=ws).out)
    assert entries[-1]["op"] == "release_unwrap" and entries[-1]["outcome"] == "denied"
    assert run_ppml("audit", "verify", home=ws).code == 0


def test_workload_exit_code_is_passed_on(project: Path) -> None:
    (project / "fail.py").write_text("import sys\nsys.exit(7)\n")
    r = run_ppml(
        "run", "--tee", "sim", "--", sys.executable, "fail.py", home=project / "ws", cwd=project
    )
    assert r.code == 7


def test_sim_needs_a_dev_workspace_and_known_backends(tmp_path: Path, project: Path) -> None:
    prod = tmp_path / "prod"
    assert run_ppml("init", "--dir", prod).code == 0
    r = run_ppml("run", "--tee", "sim", "--", sys.executable, "job.py", home=prod, cwd=project)
    assert r.code == 5 and "--dev" in r.err
    r = run_ppml("policy", "allow", "sales", "--tee", "sim", "--measurement", "ab" * 48, home=prod)
    assert r.code != 0
    r = run_ppml(
        "run",
        "--tee",
        "sgx-please",
        "--",
        sys.executable,
        "job.py",
        home=project / "ws",
        cwd=project,
    )
    assert r.code == 2


def test_sql_inside_the_sim_tee(project: Path) -> None:
    ws = project / "ws"
    query = "SELECT count(*) AS n, max(age) AS oldest FROM people"
    args = ["sql", query, "-t", "people=people.csv", "--format", "json"]
    r = run_ppml(*args, "--tee", "sim", home=ws, cwd=project)
    assert r.code == 4 and "access denied" in r.err  # no policy names this query yet
    r = run_ppml(*args, "--measure", cwd=project)
    assert r.code == 0, r.err
    _allow(project, r.out.splitlines()[0], "sales")
    r = run_ppml(*args, "--tee", "sim", home=ws, cwd=project)
    assert r.code == 0, r.err
    assert json.loads(r.out.splitlines()[0]) == {"n": 3, "oldest": 30}
    # Another query is another measurement: refused.
    other = ["sql", "SELECT name FROM people", "-t", "people=people.csv", "--tee", "sim"]
    assert run_ppml(*other, home=ws, cwd=project).code == 4


def test_python_sql_over_encrypted_parquet_inside_the_sim_tee(project: Path) -> None:
    """`ppml.sql` in an attested, sandboxed workload: the Parquet table decrypted into the
    sandbox's memory, keys released by policy, file access from SQL still refused."""
    ws = project / "ws"
    r = run_ppml("run", "--tee", "sim", "--", sys.executable, "sqljob.py", home=ws, cwd=project)
    assert r.code == 1 and "access denied" in r.err  # not allowed yet: the script's exception
    _allow(project, _measure(project, sys.executable, "sqljob.py"), "sales")
    r = run_ppml("run", "--tee", "sim", "--", sys.executable, "sqljob.py", home=ws, cwd=project)
    assert r.code == 0, r.err
    lines = r.out.strip().splitlines()
    assert json.loads(lines[-2]) == [{"n": 3, "oldest": 30, "first": "Andy"}]
    assert lines[-1] == "refused"


def test_sql_over_encrypted_parquet_inside_the_sim_tee(project: Path) -> None:
    ws = project / "ws"
    args = [
        "sql",
        "SELECT CAST(sum(age) AS BIGINT) AS total FROM p",
        "-t",
        "p=people.parquet",
        "--format",
        "json",
    ]
    r = run_ppml(*args, "--measure", cwd=project)
    assert r.code == 0, r.err
    _allow(project, r.out.splitlines()[0], "sales")
    r = run_ppml(*args, "--tee", "sim", home=ws, cwd=project)
    assert r.code == 0, r.err
    assert json.loads(r.out.splitlines()[0]) == {"total": 78}


def test_passphrase_is_not_needed_by_the_workload(project: Path) -> None:
    """The child never gets the passphrase: a workload that tries to open the workspace fails."""
    (project / "thief.py").write_text(
        "import os, sys\n"
        "from ppml.workspace import Workspace\n"
        "sys.exit(0 if os.environ.get('PPML_PASSPHRASE') else 3)\n"
    )
    r = run_ppml(
        "run", "--tee", "sim", "--", sys.executable, "thief.py", home=project / "ws", cwd=project
    )
    assert r.code == 3
    assert PASSPHRASE not in r.out + r.err


def test_run_against_a_separate_ppml_serve(project: Path, tmp_path: Path) -> None:
    """The launcher only signs evidence; keys come from a `ppml serve` in another process."""
    ws = project / "ws"
    _allow(project, _measure(project, sys.executable, "job.py"), "sales", "results")
    with ppml_serve(ws, tmp_path / "serve.log") as (_, url):
        r = run_ppml(
            "run",
            "--tee",
            "sim",
            "--kms",
            url,
            "--",
            sys.executable,
            "job.py",
            home=ws,
            cwd=project,
        )
        assert r.code == 0, r.err
        assert json.loads(r.out.strip().splitlines()[-1])["rows"] == 3
        plain = url.replace("https://", "http://")
        r = run_ppml("run", "--kms", plain, "--", sys.executable, "job.py", home=ws, cwd=project)
        assert r.code == 2 and "https" in r.err
