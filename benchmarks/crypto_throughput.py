"""Throughput of ppml's streaming encryption, as ratios to baselines measured in the same run.

Baselines: the raw AES-256-GCM primitive (pyca AESGCM.encrypt over 1 MiB buffers, one core) and
a plain copy of the same file through the same file system, in 1 MiB reads and writes and in
the kernel as `cp` does (what any tool that writes its output pays). Measured: the Python API
(`encrypt_file` / `decrypt_file`), the API with output to
/dev/null (the format's own cost, without the file system's write cost), and the whole `ppml
encrypt` / `ppml decrypt` commands as a user runs them (interpreter start, workspace unsealing
with Argon2id, KMS audit records included). Peak memory of the commands is printed for a small
and a large file, to show it does not grow with the file.

    python benchmarks/crypto_throughput.py [--size-mib 1024] [--dir DIR] [--repeat 3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from ppml.crypto.passphrase import KdfParams
from ppml.data import decrypt_file, encrypt_file
from ppml.workspace import Workspace

MiB = 1 << 20
PASSPHRASE = "benchmark passphrase"


def best(fn: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def primitive(size: int) -> float:
    aead = AESGCM(AESGCM.generate_key(256))
    buf = os.urandom(MiB)
    nonce = bytes(12)
    t = time.perf_counter()
    for _ in range(size // MiB):
        aead.encrypt(nonce, buf, None)
    return time.perf_counter() - t


def make_input(path: Path, size: int) -> None:
    block = os.urandom(MiB)
    with open(path, "wb") as fh:
        for _ in range(size // MiB):
            fh.write(block)
    with open(path, "rb") as fh:  # into the page cache
        while fh.read(16 * MiB):
            pass


def copy(src: Path, dst: Path) -> None:
    buf = memoryview(bytearray(MiB))
    with open(src, "rb", buffering=0) as fin, open(dst, "wb", buffering=0) as fout:
        while n := fin.readinto(buf):
            fout.write(buf[:n])


def run_cli(args: list[str], env: dict[str, str]) -> float:
    t = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "ppml", *args], env=env, check=True, stdout=subprocess.DEVNULL
    )
    return time.perf_counter() - t


def peak_rss_mib(args: list[str], env: dict[str, str]) -> float:
    """Peak RSS of one command, measured in a fresh child so earlier runs do not mask it."""
    code = (
        "import resource,subprocess,sys;"
        f"subprocess.run([sys.executable,'-m','ppml',*{args!r}],check=True);"
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, check=True, capture_output=True, text=True
    )
    return int(out.stdout.strip()) / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-mib", type=int, default=1024, help="file size (default 1024)")
    ap.add_argument(
        "--dir", type=Path, default=None, help="where the files go (default: a temp dir)"
    )
    ap.add_argument("--repeat", type=int, default=3, help="best of N (default 3)")
    opts = ap.parse_args()
    size = opts.size_mib * MiB
    root = Path(tempfile.mkdtemp(prefix="ppml-bench-", dir=opts.dir))
    try:
        ws = Workspace.create(root / "ws", PASSPHRASE.encode(), kdf=KdfParams())
        with ws.key_service() as kms:
            kms.create_key("bench")
        src, enc, dec, cp = (root / n for n in ("in.bin", "in.ppml", "out.bin", "copy.bin"))
        print(f"input: {opts.size_mib} MiB in {root} (page cache), best of {opts.repeat}")
        make_input(src, size)

        t_prim = min(primitive(size) for _ in range(opts.repeat))
        t_copy = best(lambda: copy(src, cp), opts.repeat)
        t_kcopy = best(lambda: shutil.copyfile(src, cp), opts.repeat)
        with ws.key_service() as kms:
            t_enc = best(lambda: encrypt_file(src, enc, kms, "bench", overwrite=True), opts.repeat)
            t_dec = best(lambda: decrypt_file(enc, dec, kms, overwrite=True), opts.repeat)
            t_enc_null = best(lambda: _encrypt_to_null(src, kms), opts.repeat)
        assert dec.read_bytes()[:MiB] == src.read_bytes()[:MiB]

        env = {**os.environ, "PPML_HOME": str(root / "ws"), "PPML_PASSPHRASE": PASSPHRASE}
        enc_args = ["encrypt", str(src), "-o", str(enc), "--key", "bench", "--force"]
        dec_args = ["decrypt", str(enc), "-o", str(dec), "--force"]
        t_cli_enc = best(lambda: run_cli(enc_args, env), opts.repeat)
        t_cli_dec = best(lambda: run_cli(dec_args, env), opts.repeat)
        t_cli_noop = best(lambda: run_cli(["key", "list"], env), opts.repeat)

        gb = size / 1e9

        def row(name: str, seconds: float) -> None:
            print(
                f"  {name:<34} {gb / seconds:7.2f} GB/s   x{t_prim / seconds:5.2f} primitive"
                f"   x{t_copy / seconds:5.2f} copy"
            )

        print("throughput (ratio = baseline time / this time; 1.0 = as fast as the baseline)")
        row("AES-256-GCM primitive (1 core)", t_prim)
        row("copy, 1 MiB reads and writes", t_copy)
        row("copy in the kernel (cp)", t_kcopy)
        row("API encrypt_file", t_enc)
        row("API decrypt_file", t_dec)
        row("API encrypt -> /dev/null", t_enc_null)
        row("CLI ppml encrypt", t_cli_enc)
        row("CLI ppml decrypt", t_cli_dec)
        print(f"  fixed cost of one CLI command (`ppml key list`): {t_cli_noop * 1000:.0f} ms")

        small = root / "small.bin"
        make_input(small, 16 * MiB)
        small_enc = root / "small.ppml"
        rss_small = peak_rss_mib(
            ["encrypt", str(small), "-o", str(small_enc), "--key", "bench", "--force"], env
        )
        rss_large = peak_rss_mib(enc_args, env)
        rss_dec = peak_rss_mib(dec_args, env)
        print(
            f"peak RSS of `ppml encrypt`: {rss_small:.0f} MiB for 16 MiB, "
            f"{rss_large:.0f} MiB for {opts.size_mib} MiB; `ppml decrypt`: {rss_dec:.0f} MiB"
        )
        # The headline ratio, for benchmarks/run.py (higher is better).
        print(f"RESULT crypto_throughput format_vs_primitive={t_prim / t_enc_null:.3f}")
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _encrypt_to_null(src: Path, kms: object) -> None:
    from ppml.crypto.stream import encrypt_stream

    data_key = kms.generate_data_key("bench")  # type: ignore[attr-defined]
    with open(src, "rb", buffering=0) as fin, open(os.devnull, "wb", buffering=0) as fout:
        encrypt_stream(fin, fout, data_key)


if __name__ == "__main__":
    main()
