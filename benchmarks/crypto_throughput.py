"""Throughput of ppml's streaming encryption, as ratios to baselines measured in the same run.

Baselines: the raw AES-256-GCM primitive (pyca AESGCM.encrypt over 1 MiB buffers, one core) and
a plain copy of the same file through the same file system, in 1 MiB reads and writes and in
the kernel as `cp` does (what any tool that writes its output pays). Measured: the Python API
(`encrypt_file` / `decrypt_file`), the API with output to
/dev/null (the format's own cost, without the file system's write cost), and the whole `ppml
encrypt` / `ppml decrypt` commands as a user runs them (interpreter start, workspace unsealing
with Argon2id, KMS audit records included). Peak memory of the commands is printed for a small
and a large file, to show it does not grow with the file.

The whole commands are also compared with `dd if=IN of=OUT bs=8M` copying the same file to the
same place, in the same run, best of N each, outputs removed and the disk synced before every
run: in the benchmark's directory (on disk) and on a RAM file system (`--ram-dir`, default
/dev/shm when present; there the file system's cost is smallest, so the command's own cost shows
most; the workspace stays on disk). The commands run as an installed ppml does, with its
modules' bytecode compiled (a warm-up run compiles it).

    python benchmarks/crypto_throughput.py [--size-mib 1024] [--dir DIR] [--repeat 3]
                                           [--ram-dir DIR | --ram-dir '']
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


def cli_env(workspace: Path) -> dict[str, str]:
    """The environment of the measured commands: the workspace, its passphrase, and bytecode
    written and read as for an installed package (PYTHONDONTWRITEBYTECODE, which some
    development shells set, would make every command compile ppml's modules anew)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    return {**env, "PPML_HOME": str(workspace), "PPML_PASSPHRASE": PASSPHRASE}


def run_fresh(command: list[str], output: Path, env: dict[str, str] | None = None) -> float:
    """Run `command` once, timed, with `output` removed before, as a first write, and what
    earlier runs left to write back to the disk written back (untimed: a command that syncs,
    as the KMS does for its audit records, would otherwise wait for the previous run's data)."""
    output.unlink(missing_ok=True)
    os.sync()
    t = time.perf_counter()
    proc = subprocess.run(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    elapsed = time.perf_counter() - t
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed: {proc.stderr.decode(errors='replace')}")
    return elapsed


def against_dd(directory: Path, size: int, env: dict[str, str], repeat: int) -> dict[str, float]:
    """`dd bs=8M` and the whole `ppml encrypt` / `ppml decrypt` commands on the same files in
    `directory`, interleaved, best of `repeat` each (seconds)."""
    src, enc, out = directory / "dd-in.bin", directory / "dd-in.ppml", directory / "dd-out"
    make_input(src, size)
    ppml = [sys.executable, "-m", "ppml"]
    encrypt = [*ppml, "encrypt", str(src), "-o", str(enc), "--key", "bench", "--force"]
    subprocess.run(encrypt, env=env, check=True)  # the encrypted input; compiles the bytecode
    runs: dict[str, list[float]] = {k: [] for k in ("dd", "encrypt", "dd enc", "decrypt")}
    try:
        for _ in range(repeat):
            runs["dd"].append(run_fresh(["dd", f"if={src}", f"of={out}", "bs=8M"], out))
            runs["encrypt"].append(
                run_fresh([*ppml, "encrypt", str(src), "-o", str(out), "--key", "bench"], out, env)
            )
            runs["dd enc"].append(run_fresh(["dd", f"if={enc}", f"of={out}", "bs=8M"], out))
            runs["decrypt"].append(
                run_fresh([*ppml, "decrypt", str(enc), "-o", str(out)], out, env)
            )
        with open(src, "rb") as a, open(out, "rb") as b:
            assert a.read(MiB) == b.read(MiB)
    finally:
        for f in (src, enc, out):
            f.unlink(missing_ok=True)
    return {k: min(v) for k, v in runs.items()}


def print_against_dd(where: str, t: dict[str, float]) -> None:
    print(
        f"  {where}: encrypt {t['encrypt']:.2f} s, dd of the plaintext {t['dd']:.2f} s:"
        f" x{t['dd'] / t['encrypt']:.2f} | decrypt {t['decrypt']:.2f} s, dd of the encrypted"
        f" file {t['dd enc']:.2f} s: x{t['dd enc'] / t['decrypt']:.2f}"
    )


def default_ram_dir() -> Path | None:
    shm = Path("/dev/shm")
    return shm if shm.is_dir() and os.access(shm, os.W_OK) else None


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
    ap.add_argument(
        "--ram-dir",
        type=lambda v: Path(v) if v else None,
        default=default_ram_dir(),
        help="a directory on a RAM file system for the comparison with dd (default /dev/shm "
        "when present; '' skips it)",
    )
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

        env = cli_env(root / "ws")
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

        print("whole commands against `dd bs=8M` of the same file (ratio = dd time / command time)")
        print_against_dd(f"on disk ({root})", against_dd(root, size, env, opts.repeat))
        if opts.ram_dir is not None:
            ram = Path(tempfile.mkdtemp(prefix="ppml-bench-", dir=opts.ram_dir))
            try:
                t_ram = against_dd(ram, size, env, opts.repeat)
            finally:
                shutil.rmtree(ram, ignore_errors=True)
            print_against_dd(f"RAM file system ({opts.ram_dir})", t_ram)

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
