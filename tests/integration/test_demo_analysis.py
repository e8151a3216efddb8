"""The analyst's script that `ppml demo` runs, run on its own with deprecation warnings as errors:
a DuckDB (or pyarrow, or ppml) API that a new release deprecates fails here, not in front of a
user watching the demo."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from cli_support import PASSPHRASE

from ppml.cli.demo_cmd import ANALYSIS, _make_data
from ppml.crypto.passphrase import KdfParams
from ppml.data import decrypt_file, encrypt_file
from ppml.data.parquet import encrypt_parquet_file
from ppml.workspace import Workspace


def test_the_demo_analysis_runs_with_deprecation_warnings_as_errors(tmp_path: Path) -> None:
    ws = Workspace.create(
        tmp_path / "workspace", PASSPHRASE.encode(), dev=True, kdf=KdfParams.for_testing()
    )
    plain, data, out = tmp_path / "plaintext", tmp_path / "data", tmp_path / "out"
    for d in (plain, data, out):
        d.mkdir()
    _make_data(plain, customers=50, transactions=500)
    with ws.key_service() as kms:
        for key in ("sales", "pii", "results"):
            kms.create_key(key)
        # As the demo encrypts them: the PII columns under their own key.
        encrypt_parquet_file(
            plain / "customers.parquet",
            data / "customers.parquet",
            kms,
            key_name="sales",
            column_keys={"pii": ["name", "email", "ssn"]},
        )
        encrypt_file(plain / "transactions.csv", data / "transactions.csv", kms, "sales")
    (tmp_path / "analysis.py").write_text(ANALYSIS)

    env = {k: v for k, v in os.environ.items() if not k.startswith("PPML_")}
    env |= {"PPML_HOME": str(ws.path), "PPML_PASSPHRASE": PASSPHRASE}
    proc = subprocess.run(
        [sys.executable, "-W", "error::DeprecationWarning", "analysis.py"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "Warning" not in proc.stderr
    assert "wrote 4 rows" in proc.stdout  # one per region

    with ws.key_service() as kms:
        decrypt_file(out / "spend_by_region.csv", tmp_path / "result.csv", kms)
    header, *rows = (tmp_path / "result.csv").read_text().splitlines()
    assert header.split(",")[0].strip('"') == "region" and len(rows) == 4
