"""`ppml sql` end to end: real `ppml` processes, a real workspace, encrypted files."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from cli_support import run_ppml

PEOPLE = b"id,name,city,ssn\n1,Michael,Paris,ssn-111\n2,Andy,Rome,ssn-222\n3,Justin,Paris,ssn-333\n"
SECRET = "ssn-111"


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    ws = tmp_path_factory.mktemp("ws") / "workspace"
    assert run_ppml("init", "--dir", ws).code == 0
    for name in ("sales", "results"):
        assert run_ppml("key", "create", name, home=ws).code == 0
    return ws


@pytest.fixture
def data(home: Path, tmp_path: Path) -> Path:
    """A working directory with people.csv.ppml and orders.parquet (PME), no plaintext."""
    work = tmp_path / "work"
    work.mkdir()
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "people.csv").write_bytes(PEOPLE)
    orders = pa.table({"order_id": [10, 11, 12], "id": [1, 1, 3], "amount": [10.5, 4.5, 2.0]})
    pq.write_table(orders, plain / "orders.parquet")
    for src, dst in (("people.csv", "people.csv.ppml"), ("orders.parquet", "orders.parquet")):
        r = run_ppml("encrypt", plain / src, "-o", work / dst, "--key", "sales", home=home)
        assert r.code == 0, r.err
    return work


def _files(directory: Path) -> list[str]:
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*"))


def test_text_output(home: Path, data: Path) -> None:
    before = _files(data)
    r = run_ppml(
        "sql",
        "SELECT city, count(*) AS n FROM people GROUP BY city ORDER BY city",
        "--table",
        "people=people.csv.ppml",
        home=home,
        cwd=data,
    )
    assert r.code == 0, r.err
    assert "Paris" in r.out and "Rome" in r.out and "city" in r.out
    assert "(2 rows)" in r.err
    assert _files(data) == before  # nothing written, not even a DuckDB temp directory


def test_json_and_csv_output_with_a_join(home: Path, data: Path) -> None:
    query = (
        "SELECT p.name, sum(o.amount) AS spent FROM people p JOIN orders o USING (id) "
        "GROUP BY p.name ORDER BY p.name"
    )
    tables = ("-t", "people=people.csv.ppml", "-t", "orders=orders.parquet")
    r = run_ppml("sql", query, *tables, "--format", "json", home=home, cwd=data)
    assert r.code == 0, r.err
    rows = [json.loads(line) for line in r.out.splitlines()]
    assert rows == [{"name": "Justin", "spent": 2.0}, {"name": "Michael", "spent": 15.0}]
    r = run_ppml("sql", query, *tables, "--format", "csv", home=home, cwd=data)
    assert r.code == 0, r.err
    assert list(csv.reader(io.StringIO(r.out))) == [
        ["name", "spent"],
        ["Justin", "2"],
        ["Michael", "15"],
    ]


@pytest.mark.parametrize("suffix", ["csv", "json", "parquet"])
def test_encrypted_output_decrypts(home: Path, data: Path, suffix: str) -> None:
    before = _files(data)
    out = f"result.{suffix}"
    r = run_ppml(
        "sql",
        "SELECT id, name, ssn FROM people WHERE city = 'Paris' ORDER BY id",
        "-t",
        "people=people.csv.ppml",
        "-o",
        out,
        "--key",
        "results",
        home=home,
        cwd=data,
    )
    assert r.code == 0, r.err
    assert r.out == ""
    assert len(r.err.strip().splitlines()) == 1 and "2 rows" in r.err
    assert _files(data) == sorted([*before, out])
    assert SECRET.encode() not in (data / out).read_bytes()
    info = run_ppml("inspect", data / out, "--format", "json")
    assert info.code == 0 and json.loads(info.out)["key_name"] == "results"
    # The encrypted result is an ordinary ppml table: query it back, decrypt it.
    back = run_ppml(
        "sql", "SELECT name FROM r", "-t", f"r={out}", "--format", "csv", home=home, cwd=data
    )
    assert back.code == 0, back.err
    assert back.out.split() == ['"name"', '"Michael"', '"Justin"']
    plain = data.parent / f"decrypted.{suffix}"
    d = run_ppml("decrypt", data / out, "-o", plain, home=home)
    assert d.code == 0, d.err
    if suffix == "parquet":
        assert pq.read_table(plain).column("ssn").to_pylist() == [SECRET, "ssn-333"]
    else:
        assert SECRET in plain.read_text()


def test_output_exists_needs_force(home: Path, data: Path) -> None:
    args = ("sql", "SELECT 1 AS x FROM people", "-t", "people=people.csv.ppml")
    assert run_ppml(*args, "-o", "r.csv", "-k", "results", home=home, cwd=data).code == 0
    r = run_ppml(*args, "-o", "r.csv", "-k", "results", home=home, cwd=data)
    assert r.code == 2 and "--force" in r.err
    r = run_ppml(*args, "-o", "r.csv", "-k", "results", "--force", home=home, cwd=data)
    assert r.code == 0, r.err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("SELECT * FROM nosuch", "-t", "people=people.csv.ppml"), "nosuch does not exist"),
        (("SELEC 1", "-t", "people=people.csv.ppml"), "Parser Error"),
        (("SELECT 1", "-t", "people"), "NAME=PATH"),
        (("SELECT 1", "-t", "people=missing.csv"), "missing.csv"),
        (("SELECT 1", "-t", "bad-name=people.csv.ppml"), "invalid table name"),
        (("SELECT 1",), "--table"),
        (("COPY people TO 'x.csv'", "-t", "people=people.csv.ppml"), "COPY"),
        (("SELECT * FROM read_csv('/etc/passwd')", "-t", "people=people.csv.ppml"), "Permission"),
        (("SELECT CAST(ssn AS INT) FROM people", "-t", "people=people.csv.ppml"), "withheld"),
        (("SELECT 1", "-t", "people=people.csv.ppml", "-o", "r.csv"), "--key"),
        (("SELECT 1", "-t", "people=people.csv.ppml", "-k", "results"), "-o"),
        (("SELECT 1", "-t", "people=people.csv.ppml", "-o", "r.txt", "-k", "results"), "r.txt"),
    ],
)
def test_bad_input_exits_2_with_one_line(
    home: Path, data: Path, args: tuple[str, ...], message: str
) -> None:
    before = _files(data)
    r = run_ppml("sql", *args, home=home, cwd=data)
    assert r.code == 2, (r.code, r.err)
    assert message in r.err
    assert len(r.err.strip().splitlines()) == 1
    assert r.out == ""
    assert SECRET not in r.err and "Michael" not in r.err
    assert _files(data) == before


def test_copy_to_a_file_is_refused_and_writes_nothing(home: Path, data: Path) -> None:
    target = data.parent / "leak.csv"
    r = run_ppml(
        "sql", f"COPY people TO '{target}'", "-t", "people=people.csv.ppml", home=home, cwd=data
    )
    assert r.code == 2
    assert not target.exists()


def test_tampered_table_exits_3(home: Path, data: Path) -> None:
    enc = data / "people.csv.ppml"
    blob = bytearray(enc.read_bytes())
    blob[-20] ^= 0x40
    enc.write_bytes(bytes(blob))
    r = run_ppml(
        "sql", "SELECT count(*) FROM people", "-t", "people=people.csv.ppml", home=home, cwd=data
    )
    assert r.code == 3
    assert r.err.strip().endswith("integrity error: integrity check failed")


def test_no_workspace_exits_5(tmp_path: Path, data: Path) -> None:
    r = run_ppml(
        "sql",
        "SELECT 1 FROM people",
        "-t",
        "people=people.csv.ppml",
        home=tmp_path / "none",
        cwd=data,
    )
    assert r.code == 5


def test_a_value_python_cannot_print_is_not_quoted_in_the_error(tmp_path: Path) -> None:
    """A date past Python's range makes the printer fail with the day count in its message:
    computed from a cell, it must not be shown."""
    ws = tmp_path / "ws"
    assert run_ppml("init", "--dev", "--dir", ws).code == 0
    assert run_ppml("key", "create", "sales", home=ws).code == 0
    (tmp_path / "p.csv").write_text("id,ssn\n1,111-1234-00\n")
    enc = tmp_path / "people.csv"
    assert run_ppml("encrypt", tmp_path / "p.csv", "-o", enc, "-k", "sales", home=ws).code == 0
    query = "SELECT DATE '3000000-01-01' + CAST(split_part(ssn, '-', 2) AS INTEGER) AS d FROM t"
    for fmt in ("text", "json"):
        r = run_ppml("sql", query, "-t", f"t={enc}", "--format", fmt, home=ws)
        assert r.code == 2, r.err
        assert "could not be printed" in r.err
        assert "1234" not in r.err and "1095" not in r.err and "Traceback" not in r.err
