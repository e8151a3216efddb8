"""Time writing and reading encrypted Parquet (PME via ppml) against plaintext Parquet.

Prints, per configuration, the best of several interleaved runs and the ratio encrypted /
plaintext for writing and for reading. Keys come from a real workspace's KMS (SQLite, audit
records), which ppml asks once per named key and file.

    python benchmarks/parquet_overhead.py [--rows 5000000] [--repeat 11]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ppml._internal.fs import atomic_output
from ppml.crypto.passphrase import KdfParams
from ppml.data.parquet import _write_defaults, read_parquet, write_parquet
from ppml.workspace import Workspace


def make_table(rows: int, seed: int = 7) -> pa.Table:
    rng = np.random.default_rng(seed)
    words = pa.array([f"customer-{i:06d}" for i in range(50_000)])
    return pa.table(
        {
            "id": pa.array(np.arange(rows, dtype=np.int64)),
            "amount": pa.array(rng.normal(100.0, 30.0, rows)),
            "count": pa.array(rng.integers(0, 1_000, rows, dtype=np.int32)),
            "ts": pa.array(
                np.datetime64("2024-01-01T00:00:00.000000")
                + rng.integers(0, 10**9, rows).astype("timedelta64[us]")
            ),
            "customer": pc.take(words, pa.array(rng.integers(0, len(words), rows))),
        }
    )


def timed(fn: Callable[[], Any]) -> tuple[float, float]:
    """Wall-clock and process CPU seconds (CPU time is barely touched by other processes)."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


@dataclass(frozen=True)
class Pair:
    """Best wall time and median CPU time, plaintext and encrypted."""

    wall_plain: float
    wall_enc: float
    cpu_plain: float
    cpu_enc: float


def interleaved(plain: Callable[[], Any], encrypted: Callable[[], Any], repeat: int) -> Pair:
    """Plaintext and encrypted runs taken in alternation, so drift hits both alike.

    The minimum wall time filters out interference from other processes, which only ever adds
    time; the median CPU time is the steadier measure of the work itself.
    """
    plain()  # warm-up: page cache, allocator, thread pool
    encrypted()
    plain_runs, encrypted_runs = [], []
    for _ in range(repeat):
        plain_runs.append(timed(plain))
        encrypted_runs.append(timed(encrypted))
    return Pair(
        min(w for w, _ in plain_runs),
        min(w for w, _ in encrypted_runs),
        statistics.median(c for _, c in plain_runs),
        statistics.median(c for _, c in encrypted_runs),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rows", type=int, default=5_000_000)
    parser.add_argument("--repeat", type=int, default=11)
    parser.add_argument(
        "--dir", type=Path, default=None, help="where to write (default: a tmp dir)"
    )
    args = parser.parse_args()

    table = make_table(args.rows)
    print(f"table: {args.rows:,} rows x {table.num_columns} columns, {table.nbytes / 1e6:.0f} MB")
    print(
        f"{args.repeat} interleaved runs each; wall = best wall-clock seconds, "
        "cpu = median process CPU seconds; ratio = encrypted / plaintext"
    )
    print(
        f"{'options':40} {'write wall plain/enc':>20} {'ratio':>6} {'cpu ratio':>9}"
        f" {'read wall plain/enc':>20} {'ratio':>6} {'cpu ratio':>9} {'MB':>6}"
    )
    configs: list[dict[str, Any]] = [
        {"compression": "snappy"},
        {"compression": "zstd"},
        {"compression": "none"},
        {"compression": "snappy", "data_page_size": 8 << 20},
        {"compression": "snappy", "row_group_size": 256 * 1024},
        {"compression": "snappy", "use_dictionary": False},
    ]
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        ws = Workspace.create(Path(tmp) / "ws", b"benchmark passphrase", kdf=KdfParams())
        provider = ws.key_service()
        provider.create_key("data")
        plain, enc = Path(tmp) / "plain.parquet", Path(tmp) / "enc.parquet"
        headline = ""
        for options in configs:

            def write_plain(options: dict[str, Any] = options) -> None:
                # Same temp-file-and-rename path and layout defaults as write_parquet, so only
                # encryption differs.
                with atomic_output(plain) as fh:
                    pq.write_table(table, fh, **{**_write_defaults(), **options})

            def write_enc(options: dict[str, Any] = options) -> None:
                write_parquet(table, enc, provider, key_name="data", **options)

            def read_plain() -> None:
                with pq.ParquetFile(plain) as pf:
                    pf.read(use_threads=True)

            def read_enc() -> None:
                read_parquet(enc, provider)

            w = interleaved(write_plain, write_enc, args.repeat)
            r = interleaved(read_plain, read_enc, args.repeat)
            assert read_parquet(enc, provider).equals(table)
            label = ", ".join(f"{k}={v}" for k, v in options.items())
            print(
                f"{label:40} {w.wall_plain:9.3f} / {w.wall_enc:6.3f}"
                f" {w.wall_enc / w.wall_plain:6.3f} {w.cpu_enc / w.cpu_plain:9.3f}"
                f" {r.wall_plain:9.3f} / {r.wall_enc:6.3f}"
                f" {r.wall_enc / r.wall_plain:6.3f} {r.cpu_enc / r.cpu_plain:9.3f}"
                f" {enc.stat().st_size / 1e6:6.1f}"
            )
            if not headline:  # the first configuration: pyarrow's default, which ppml uses
                headline = (
                    f"write_ratio={w.wall_enc / w.wall_plain:.3f}"
                    f" read_ratio={r.wall_enc / r.wall_plain:.3f}"
                )
    # The headline ratios, for benchmarks/run.py (encrypted / plaintext: lower is better).
    print(f"RESULT parquet_overhead {headline}")


if __name__ == "__main__":
    main()
