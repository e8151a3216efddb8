"""The start-up cost of an attested run, as a difference and a ratio to the plain run measured in
the same process.

Measured, as whole commands in subprocesses, taking turns (A B C C B A per round, so that drift
hits every command alike):

- A, the baseline: ``python examples/python/helloworld.py``;
- B: ``ppml measure -- python helloworld.py`` (resolving the command, the Python environment's
  digest from its warm cache, the script's digest);
- C: ``ppml run --tee sim -- python helloworld.py`` in a development workspace (unsealing the
  master key, the measurement and snapshot, the KMS and attestation service on loopback TLS,
  the sandbox, the import guard, the workload, and tearing all down).

One warm-up of each first (the environment cache is filled then). Prints each command's median
and minimum wall time, and the medians' differences and ratios to A.

    python benchmarks/attested_startup.py [--rounds 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HELLO = ROOT / "examples" / "python" / "helloworld.py"
PASSPHRASE = "benchmark passphrase 0123"


def timed(argv: list[str], env: dict[str, str], cwd: Path) -> float:
    start = time.perf_counter()
    proc = subprocess.run(argv, env=env, cwd=cwd, capture_output=True, text=True, check=False)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{argv[:4]} failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    ppml = [sys.executable, "-m", "ppml"]
    with tempfile.TemporaryDirectory(prefix="ppml-bench-") as tmp:
        work = Path(tmp)
        env = {k: v for k, v in os.environ.items() if not k.startswith("PPML_")}
        env.update({"PPML_HOME": str(work / "ws"), "PPML_PASSPHRASE": PASSPHRASE})
        init = [*ppml, "init", "--dev", "--dir", str(work / "ws")]
        subprocess.run(init, env=env, check=True, capture_output=True)
        (work / "project").mkdir()
        cwd = work / "project"
        commands = {
            "A python helloworld.py": [sys.executable, str(HELLO)],
            "B ppml measure": [*ppml, "measure", "--", sys.executable, str(HELLO)],
            "C ppml run --tee sim": [
                *ppml,
                "run",
                "--tee",
                "sim",
                "--",
                sys.executable,
                str(HELLO),
            ],
        }
        times: dict[str, list[float]] = {name: [] for name in commands}
        for argv in commands.values():
            timed(argv, env, cwd)  # warm-up (fills the environment's digest cache)
        order = list(commands)
        for _ in range(args.rounds):
            for name in [*order, *reversed(order)]:
                times[name].append(timed(commands[name], env, cwd))
    base = statistics.median(times[order[0]])
    print(f"{'command':28} {'median s':>9} {'min s':>7} {'- A s':>7} {'/ A':>6}")
    for name in order:
        med = statistics.median(times[name])
        print(f"{name:28} {med:9.3f} {min(times[name]):7.3f} {med - base:7.3f} {med / base:6.1f}")
    # The headline ratios, for benchmarks/run.py (median / A: lower is better).
    measure, run = (statistics.median(times[n]) / base for n in order[1:])
    print(f"RESULT attested_startup measure_vs_plain={measure:.2f} run_vs_plain={run:.2f}")


if __name__ == "__main__":
    main()
