"""`ppml demo`: the whole story, on the embedded default, in about a minute.

A data owner encrypts a sensitive dataset, measures an analyst's script, allows exactly that
script to get the keys, runs it attested (sim TEE), and reads the encrypted result; then the
script changes by one byte and the KMS refuses it. Every step is a real `ppml` command, shown
before it runs.
"""

from __future__ import annotations

import os
import random
import secrets
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Annotated

import typer

from ppml.errors import ConfigurationError

ANALYSIS = '''\
"""Spend per region: aggregates only; this script never reads a name, an e-mail or an SSN."""

import duckdb

import ppml

customers = ppml.read_table("data/customers.parquet", columns=["customer_id", "region"])
transactions = ppml.read_table("data/transactions.csv")

con = duckdb.connect()
con.register("customers", customers)
con.register("transactions", transactions)
result = con.sql("""
    SELECT c.region,
           count(DISTINCT c.customer_id) AS customers,
           count(*)                      AS transactions,
           round(sum(t.amount), 2)       AS total_spend,
           round(avg(t.amount), 2)       AS avg_transaction
    FROM transactions t JOIN customers c USING (customer_id)
    GROUP BY c.region
    ORDER BY total_spend DESC
""").to_arrow_table()

ppml.write_table(result, "out/spend_by_region.csv", key="results")
print(f"analysis: wrote {result.num_rows} rows, encrypted, to out/spend_by_region.csv")
'''

_FIRST = [
    "Ada",
    "Grace",
    "Alan",
    "Edsger",
    "Barbara",
    "Donald",
    "Frances",
    "Ken",
    "Radia",
    "Leslie",
]
_LAST = ["Lovelace", "Hopper", "Turing", "Dijkstra", "Liskov", "Knuth", "Allen", "Thompson"]
_REGIONS = ["north", "south", "east", "west"]
_CATEGORIES = ["grocery", "travel", "pharmacy", "electronics", "restaurants"]


def register(app: typer.Typer) -> None:
    app.command("demo")(demo)


class _Story:
    """Narration and real commands, in a working directory with its own workspace."""

    def __init__(self, workdir: Path) -> None:
        from rich.console import Console

        self.console = Console(highlight=False, soft_wrap=True)
        self.workdir = workdir
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("PPML_")},
            "PPML_HOME": str(workdir / "workspace"),
            # A throw-away passphrase for a throw-away workspace, given by environment only.
            "PPML_PASSPHRASE": secrets.token_urlsafe(24),
        }
        self.step_no = 0

    def step(self, title: str, text: str) -> None:
        self.step_no += 1
        self.console.print(f"\n[bold cyan]{self.step_no}. {title}[/]")
        self.console.print(text)

    def ppml(self, *args: str, expect_ok: bool = True, show: bool = True) -> str:
        self.console.print(f"[dim]$[/] [bold]ppml {shlex.join(args)}[/]")
        proc = subprocess.run(  # noqa: S603 -- ppml itself, with fixed arguments
            [sys.executable, "-m", "ppml", *args],
            cwd=self.workdir,
            env=self.env,
            capture_output=True,
            text=True,
            check=False,
        )
        output = (proc.stdout + proc.stderr).rstrip()
        if not expect_ok:
            # A refusal: the workload's traceback matters less than its last line.
            output = "\n".join(
                line for line in output.splitlines() if line.startswith(("ppml", "ppml."))
            )
        if show and output:
            self.console.print(output, markup=False, soft_wrap=True)
        if expect_ok and proc.returncode != 0:
            raise ConfigurationError(f"demo step failed: ppml {' '.join(args)}: {output}")
        if not expect_ok and proc.returncode == 0:
            raise ConfigurationError(f"demo step should have been refused: ppml {' '.join(args)}")
        return proc.stdout


def _make_data(directory: Path, customers: int = 1000, transactions: int = 20000) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = random.Random(7)  # noqa: S311 -- synthetic data, reproducible on purpose
    ids = list(range(1, customers + 1))
    names = [f"{rng.choice(_FIRST)} {rng.choice(_LAST)}" for _ in ids]
    table = pa.table(
        {
            "customer_id": ids,
            "name": names,
            "email": [
                f"{n.lower().replace(' ', '.')}{i}@example.com"
                for i, n in zip(ids, names, strict=True)
            ],
            "ssn": [
                f"{rng.randrange(100, 999)}-{rng.randrange(10, 99)}-{rng.randrange(1000, 9999)}"
                for _ in ids
            ],
            "region": [rng.choice(_REGIONS) for _ in ids],
        }
    )
    pq.write_table(table, directory / "customers.parquet")
    lines = ["customer_id,day,category,amount"]
    for _ in range(transactions):
        lines.append(
            f"{rng.choice(ids)},2026-{rng.randrange(1, 13):02d}-{rng.randrange(1, 29):02d},"
            f"{rng.choice(_CATEGORIES)},{rng.lognormvariate(3.5, 0.8):.2f}"
        )
    (directory / "transactions.csv").write_text("\n".join(lines) + "\n")


def _run(story: _Story) -> None:
    _encrypt_the_data(story)
    _approve_the_script(story)
    _run_and_change_a_byte(story)


def _encrypt_the_data(story: _Story) -> None:
    w = story.workdir
    story.console.print(
        "[bold]ppml demo[/]: a data owner, an analyst's script, and keys that go only to the "
        f"code the owner approved.\nWorking directory: {w}"
    )
    story.step(
        "A workspace",
        "The data owner creates a development workspace: master key, KMS, certificates.",
    )
    story.ppml("init", "--dev")
    for key in ("sales", "pii", "results"):
        story.ppml("key", "create", key, show=False)
    story.console.print("created keys: sales, pii (names, e-mails, SSNs), results")

    story.step(
        "Sensitive data, encrypted",
        "1,000 customers with PII, 20,000 transactions. PII columns go under their own key.",
    )
    plain = w / "plaintext"
    data = w / "data"
    plain.mkdir()
    data.mkdir()
    _make_data(plain)
    story.ppml(
        "encrypt",
        "plaintext/customers.parquet",
        "-o",
        "data/customers.parquet",
        "--key",
        "sales",
        "--column-key",
        "pii:name,email,ssn",
    )
    story.ppml(
        "encrypt", "plaintext/transactions.csv", "-o", "data/transactions.csv", "--key", "sales"
    )
    shutil.rmtree(plain)
    story.console.print("the plaintext is gone; data/ holds only encrypted files:")
    story.ppml("inspect", "data/transactions.csv")


def _approve_the_script(story: _Story) -> None:
    w = story.workdir
    story.step(
        "The analyst's script",
        "Ordinary Python and SQL (DuckDB) over ppml.read_table; it "
        "reads only customer ids and regions.",
    )
    (w / "analysis.py").write_text(ANALYSIS)
    (w / "out").mkdir()
    story.console.print((w / "analysis.py").read_text(), markup=False)

    story.step(
        "Measure it, and allow exactly that",
        "The measurement covers the interpreter, the "
        "script's bytes, its arguments and its environment allow-list.",
    )
    py = sys.executable
    measurement = story.ppml("measure", "--", py, "analysis.py").splitlines()[0]
    for key in ("sales", "results"):
        story.ppml("policy", "allow", key, "--tee", "sim", "--measurement", measurement)
    story.console.print("(no rule for `pii`: that key is never released to this script)")


def _run_and_change_a_byte(story: _Story) -> None:
    w = story.workdir
    py = sys.executable
    story.step(
        "The attested run",
        "ppml run measures the script, starts it with an evidence "
        "channel, and serves the attestation service and the KMS on loopback TLS. The "
        "script attests the first time it needs a key.",
    )
    story.ppml("run", "--tee", "sim", "--", py, "analysis.py")

    story.step("The result", "Encrypted under `results`; the owner decrypts it.")
    story.ppml("inspect", "out/spend_by_region.csv")
    story.ppml("decrypt", "out/spend_by_region.csv", "-o", "spend_by_region.csv")
    story.console.print((w / "spend_by_region.csv").read_text(), markup=False)

    story.step(
        "One byte changed",
        "Someone edits the script (one added character). Its "
        "measurement changes, and the KMS refuses it every key.",
    )
    (w / "analysis.py").write_text(ANALYSIS + "#")
    story.ppml("run", "--tee", "sim", "--", py, "analysis.py", expect_ok=False)
    story.console.print("\nThe audit log recorded both the releases and the refusals:")
    story.ppml("audit", "show", "--limit", "6")
    story.ppml("audit", "verify")
    story.console.print(
        "\n[bold green]demo complete[/]: data stayed encrypted; keys went only to "
        "the approved code."
    )


def demo(
    directory: Annotated[
        Path | None,
        typer.Option(
            "--dir",
            help="Keep the demo's files here (an empty or new directory). "
            "Default: a temporary directory, removed at the end.",
        ),
    ] = None,
) -> None:
    """Run the whole ppml story on this machine: encrypt, measure, allow, attested run (sim),
    decrypt the result, and a one-byte change refused by the KMS."""
    if directory is not None:
        directory.mkdir(parents=True, exist_ok=True)
        if any(directory.iterdir()):
            raise ConfigurationError("the demo directory must be empty", path=directory)
        _run(_Story(directory.resolve()))
        return
    with tempfile.TemporaryDirectory(prefix="ppml-demo-") as tmp:
        _run(_Story(Path(tmp)))
