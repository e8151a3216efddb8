"""TPC-H data for the benchmarks: generated with tpchgen-cli, encrypted with ppml (PME) under a
key of a fresh benchmark workspace. Shared by sql_tpch.py and tpch_spark.py."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from ppml.crypto.passphrase import KdfParams
from ppml.data.parquet import decrypt_parquet_file, encrypt_parquet_file
from ppml.workspace import Workspace

TABLES = ("region", "nation", "supplier", "customer", "part", "partsupp", "orders", "lineitem")
KEY = "tpch"


def tpchgen() -> str:
    found = shutil.which("tpchgen-cli") or str(Path(sys.executable).with_name("tpchgen-cli"))
    if not Path(found).exists():
        sys.exit("tpchgen-cli not found: pip install tpchgen-cli")
    return found


def generate(scale: float, plain: Path) -> None:
    """The eight tables as plaintext Parquet in `plain` (kept between runs)."""
    if all((plain / f"{t}.parquet").exists() for t in TABLES):
        return
    plain.mkdir(parents=True, exist_ok=True)
    cmd = [tpchgen(), "parquet", "-s", str(scale), "-o", str(plain), "--overwrite"]
    subprocess.run(cmd, check=True)


def generate_under(root: Path, scale: float) -> tuple[Path, Path]:
    """Generate (or reuse) the plaintext tables under `root`; prints how long it took.

    Returns the plaintext directory and the directory the encrypted tables go to."""
    plain, enc = root / f"sf{scale:g}" / "plain", root / f"sf{scale:g}" / "encrypted"
    start = time.perf_counter()
    generate(scale, plain)
    print(f"data: TPC-H scale {scale:g} in {plain} ({time.perf_counter() - start:.1f} s)")
    return plain, enc


def benchmark_workspace(root: Path) -> Workspace:
    """A fresh workspace (real Argon2id cost) at root/workspace with the key KEY."""
    ws_dir = root / "workspace"
    if ws_dir.exists():
        shutil.rmtree(ws_dir)
    ws = Workspace.create(ws_dir, b"tpch benchmark passphrase", kdf=KdfParams())
    with ws.key_service() as kms:
        kms.create_key(KEY)
    return ws


def encrypt_tables(plain: Path, enc: Path, kms: Any, **options: Any) -> None:
    """Encrypt every table of `plain` into `enc` with PME under KEY; prints a summary."""
    enc.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    for t in TABLES:
        dst = enc / f"{t}.parquet"
        if dst.exists():
            dst.unlink()
        encrypt_parquet_file(plain / f"{t}.parquet", dst, kms, key_name=KEY, **options)
    size = sum((plain / f"{t}.parquet").stat().st_size for t in TABLES)
    print(
        f"encrypted {len(TABLES)} tables ({size / 1e6:.0f} MB of Parquet) with PME in "
        f"{time.perf_counter() - start:.1f} s"
    )


def plaintext_twins(enc: Path, out: Path, kms: Any) -> None:
    """The encrypted tables of `enc` decrypted into `out`, row group for row group, with ppml's
    writer settings: the same layout as the encrypted files, without encryption -- the fair
    baseline for an engine that reads both with the same reader."""
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    for t in TABLES:
        dst = out / f"{t}.parquet"
        if dst.exists():
            dst.unlink()
        decrypt_parquet_file(enc / f"{t}.parquet", dst, kms, store_decimal_as_integer=True)
    print(
        f"decrypted {len(TABLES)} tables into their plaintext twins in "
        f"{time.perf_counter() - start:.1f} s"
    )
