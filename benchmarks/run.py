"""Run the benchmarks and compare each headline ratio with its goal and its recorded figure.

    python benchmarks/run.py [--quick | --smoke | --full] [--only NAME,...] [--dir DIR]

Every benchmark of this directory runs as a subprocess, one after the other, and ends its output
with one machine-readable line, ``RESULT <benchmark> <metric>=<ratio> ...``. Then one table:
each headline ratio, its goal and the figure last recorded in docs/performance.md, and a verdict.

Modes: ``--quick`` (the default) runs small sizes with few repeats, a few minutes on 2 cores;
``--smoke`` the cheapest meaningful sizes, what CI runs; ``--full`` the configurations that
docs/performance.md documents (an hour or more).

The goals and recorded figures come from markers in docs/performance.md, one per headline
figure, next to its table::

    <!-- bench: sql_tpch total_ratio recorded=2.25 goal<=1.15 -->

``goal<=`` says lower is better (encrypted / plain time), ``goal>=`` higher is better
(throughput against a baseline); a figure without a goal says ``better=lower`` or
``better=higher`` instead. A benchmark without a marker, or a malformed marker, is an error
(exit 2) before anything runs.

Exit status 1 when a benchmark fails (non-zero exit, timeout, no RESULT line, a marked metric
missing from it) or when a ratio is more than 3x worse than its recorded figure: a generous
bound, as the machines are noisy and quick sizes are not the documented ones. Missing a goal
is reported, never fatal.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DOC = ROOT / "docs" / "performance.md"

MODES = ("quick", "smoke", "full")
# A ratio fails when it is more than this many times worse than its recorded figure.
BOUND_FACTOR = 3.0
# Per benchmark, seconds: a hung benchmark fails instead of stalling CI.
TIMEOUTS = {"smoke": 600.0, "quick": 1200.0, "full": 4 * 3600.0}
TAIL_LINES = 15  # output lines shown again when a benchmark fails

Direction = Literal["higher", "lower"]


class MarkerError(ValueError):
    """docs/performance.md lacks a marker, or holds a malformed one."""


# -- the benchmarks and their configurations -----------------------------------------------------


@dataclass(frozen=True)
class Benchmark:
    """A benchmark script and its arguments per mode (split on blanks; ``{dir}`` stands for
    the work directory)."""

    name: str
    args: Mapping[str, str]
    script: Path | None = None  # default: benchmarks/<name>.py

    @property
    def path(self) -> Path:
        return self.script if self.script is not None else HERE / f"{self.name}.py"

    def argv(self, mode: str, workdir: Path) -> list[str]:
        args = [a.replace("{dir}", str(workdir)) for a in self.args[mode].split()]
        return [sys.executable, "-u", str(self.path), *args]


# --smoke runs every benchmark, Spark and serving included: about 2.5 minutes on 2 shared cores,
# of which Spark (one local[*] session, no cluster) takes about 25 s and serving (redis-server,
# which CI installs for the tests anyway) about 45 s. TPC-H at scale 0.01 is meaningful: before
# its regression, `ppml sql` measured 1.19x DuckDB there against 2.25x at scale 1.
BENCHMARKS: tuple[Benchmark, ...] = (
    Benchmark(
        "crypto_throughput",
        {
            "smoke": "--size-mib 128 --repeat 3 --dir {dir}",
            "quick": "--size-mib 256 --repeat 3 --dir {dir}",
            "full": "--size-mib 1024 --repeat 3 --dir {dir}",
        },
    ),
    Benchmark(
        "parquet_overhead",
        {
            "smoke": "--rows 200000 --repeat 3 --dir {dir}",
            "quick": "--rows 1000000 --repeat 3 --dir {dir}",
            "full": "--rows 5000000 --repeat 5 --dir {dir}",
        },
    ),
    Benchmark(
        "kms_load",
        {
            "smoke": "--seconds 1",
            "quick": "--seconds 2",
            "full": "--procs 2 --threads 8 --seconds 5",
        },
    ),
    Benchmark(
        "sql_tpch",
        {
            "smoke": "--scale 0.01 --queries 1,6,14 --repeat 2 --dir {dir}/tpch",
            "quick": "--scale 0.1 --queries 1,3,5,6,10,14,18 --repeat 2 --dir {dir}/tpch",
            "full": "--scale 1 --repeat 3 --dir {dir}/tpch",
        },
    ),
    Benchmark(
        "tpch_spark",
        {
            "smoke": "--sf 0.01 --queries 1,6 --repeat 2 --driver-memory 1g"
            " --shuffle-partitions 4 --dir {dir}/tpch",
            "quick": "--sf 0.1 --queries 1,3,6,14 --repeat 2 --driver-memory 2g"
            " --shuffle-partitions 8 --dir {dir}/tpch",
            "full": "--sf 1 --repeat 2 --dir {dir}/tpch",
        },
    ),
    Benchmark(
        "spark_writer",
        {
            "smoke": "--rows 100000 --repeat 2 --dir {dir}",
            "quick": "--rows 300000 --repeat 3 --dir {dir}",
            "full": "--rows 2000000 --repeat 3 --dir {dir}",
        },
    ),
    Benchmark(
        "flink_stream",
        {
            "smoke": "--records 3000 --rate 100 --live-seconds 20 --dir {dir}",
            "quick": "--records 20000 --rate 100 --live-seconds 30 --dir {dir}",
            "full": "--records 100000 --rate 200 --live-seconds 60 --dir {dir}",
        },
    ),
    Benchmark(
        "serving_load",
        {
            "smoke": "--duration 1 --levels 16 --request-sizes 1,32",
            "quick": "--duration 2 --levels 16 --request-sizes 1,32",
            "full": "--breakdown",
        },
    ),
    Benchmark(
        "attestation_verify",
        {"smoke": "--duration 0.3", "quick": "--duration 1", "full": "--duration 3"},
    ),
    Benchmark(
        "attested_startup",
        {"smoke": "--rounds 1", "quick": "--rounds 2", "full": "--rounds 5"},
    ),
)


# -- the markers in docs/performance.md ------------------------------------------------------------


@dataclass(frozen=True)
class Marker:
    """One headline figure: its recorded value, its goal if any, and which way is better."""

    benchmark: str
    metric: str
    recorded: float
    better: Direction
    goal: float | None = None
    line: int = 0

    @property
    def bound(self) -> float:
        """The worst value that still passes: 3x worse than the recorded figure."""
        if self.better == "higher":
            return self.recorded / BOUND_FACTOR
        return self.recorded * BOUND_FACTOR

    def regressed(self, value: float) -> bool:
        """True when `value` is more than 3x worse than the recorded figure."""
        return value < self.bound if self.better == "higher" else value > self.bound

    def meets_goal(self, value: float) -> bool | None:
        if self.goal is None:
            return None
        return value >= self.goal if self.better == "higher" else value <= self.goal

    def goal_text(self) -> str:
        if self.goal is None:
            return "-"
        return f"{'>=' if self.better == 'higher' else '<='} {self.goal:g}"


# A marker is a line of its own (so that prose can quote the syntax inline).
_MARKER = re.compile(r"^[ \t]*<!--\s*bench\b(?P<body>.*?)-->[ \t]*$", re.MULTILINE)
_NAME = re.compile(r"[a-z][a-z0-9_]*")
_FIELD = re.compile(r"(?P<key>recorded|goal|better)(?P<op>=|<=|>=)(?P<value>\S+)")


def _positive(text: str, what: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise MarkerError(f"{what} is not a number: {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise MarkerError(f"{what} must be a positive number, not {text!r}")
    return value


def _parse_marker(body: str, line: int) -> Marker:
    if not body.startswith(":"):
        raise MarkerError("expected '<!-- bench: BENCHMARK METRIC recorded=X goal<=Y -->'")
    tokens = body[1:].split()
    if len(tokens) < 3:
        raise MarkerError("expected a benchmark, a metric and recorded=X")
    benchmark, metric, fields = tokens[0], tokens[1], tokens[2:]
    for name in (benchmark, metric):
        if not _NAME.fullmatch(name):
            raise MarkerError(f"not a benchmark or metric name: {name!r}")
    recorded: float | None = None
    goal: float | None = None
    goal_direction: Direction | None = None
    better: Direction | None = None
    for token in fields:
        m = _FIELD.fullmatch(token)
        if m is None:
            raise MarkerError(f"unknown field {token!r}")
        key, op, value = m["key"], m["op"], m["value"]
        seen = {"recorded": recorded, "goal": goal, "better": better}[key]
        if seen is not None:
            raise MarkerError(f"{key} given twice")
        if key == "recorded" and op == "=":
            recorded = _positive(value, "recorded")
        elif key == "goal" and op in ("<=", ">="):
            goal = _positive(value, "goal")
            goal_direction = "higher" if op == ">=" else "lower"
        elif key == "better" and op == "=" and value in ("higher", "lower"):
            better = "higher" if value == "higher" else "lower"
        else:
            raise MarkerError(
                f"bad field {token!r} (recorded=X, goal<=X or goal>=X, better=higher|lower)"
            )
    if recorded is None:
        raise MarkerError("no recorded=X")
    if goal_direction is not None and better is not None and goal_direction != better:
        raise MarkerError(f"goal{'>=' if better == 'lower' else '<='} contradicts better={better}")
    direction = goal_direction or better
    if direction is None:
        raise MarkerError("which way is better? give goal<=X / goal>=X, or better=lower|higher")
    return Marker(benchmark, metric, recorded, direction, goal, line)


def parse_markers(text: str, source: str = "docs/performance.md") -> list[Marker]:
    """Every ``<!-- bench: ... -->`` marker of `text`, in order; MarkerError names the line."""
    markers: list[Marker] = []
    seen: dict[tuple[str, str], int] = {}
    for m in _MARKER.finditer(text):
        line = text.count("\n", 0, m.start()) + 1
        try:
            marker = _parse_marker(m["body"].strip(), line)
        except MarkerError as exc:
            raise MarkerError(f"{source}:{line}: malformed marker {m[0]!r}: {exc}") from None
        key = (marker.benchmark, marker.metric)
        if key in seen:
            raise MarkerError(
                f"{source}:{line}: a second marker for {marker.benchmark} {marker.metric} "
                f"(the first is on line {seen[key]})"
            )
        seen[key] = line
        markers.append(marker)
    return markers


def check_markers(
    markers: Sequence[Marker], names: Sequence[str], source: str = "docs/performance.md"
) -> None:
    """Every benchmark has at least one marker, and every marker names a benchmark."""
    known = set(names)
    for marker in markers:
        if marker.benchmark not in known:
            raise MarkerError(
                f"{source}:{marker.line}: the marker names {marker.benchmark!r}, which is not a "
                f"benchmark (known: {', '.join(names)})"
            )
    marked = {m.benchmark for m in markers}
    missing = [n for n in names if n not in marked]
    if missing:
        raise MarkerError(
            f"{source} has no marker for {', '.join(missing)}: add one per headline figure "
            "next to its table, e.g. <!-- bench: NAME METRIC recorded=X goal<=Y -->"
        )


# -- running one benchmark ---------------------------------------------------------------------


@dataclass
class Outcome:
    """What one benchmark run produced: its metrics, or why it failed."""

    name: str
    seconds: float
    metrics: dict[str, float] = field(default_factory=dict)
    error: str | None = None
    tail: list[str] = field(default_factory=list)


_RESULT = re.compile(r"^RESULT\s+(?P<name>\S+)(?P<rest>.*)$")


def parse_result(output: str, name: str) -> dict[str, float]:
    """The metrics of the last ``RESULT <name> key=value ...`` line of `output`."""
    lines = [m for line in output.splitlines() if (m := _RESULT.match(line.strip()))]
    if not lines:
        raise ValueError("printed no RESULT line")
    last = lines[-1]
    if last["name"] != name:
        raise ValueError(f"its RESULT line names {last['name']!r}, not {name!r}")
    metrics: dict[str, float] = {}
    for token in last["rest"].split():
        key, sep, value = token.partition("=")
        if not sep or not _NAME.fullmatch(key):
            raise ValueError(f"malformed RESULT field {token!r}")
        try:
            number = float(value)
        except ValueError:
            raise ValueError(f"RESULT {key}={value!r} is not a number") from None
        if not math.isfinite(number):
            raise ValueError(f"RESULT {key}={value} is not a finite number")
        metrics[key] = number
    if not metrics:
        raise ValueError("its RESULT line holds no metric")
    return metrics


def _stop_group(proc: subprocess.Popen[str]) -> None:
    """Terminate the benchmark and everything it started (its own process group)."""
    for sig, wait in ((signal.SIGTERM, 15.0), (signal.SIGKILL, 5.0)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


def run_benchmark(
    bench: Benchmark, mode: str, workdir: Path, timeout: float, echo: bool = True
) -> Outcome:
    """Run one benchmark as a subprocess (in its own process group), echoing its output."""
    argv = bench.argv(mode, workdir)
    print(f"\n== {bench.name}: {' '.join(argv[2:])}", flush=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    start = time.perf_counter()
    proc = subprocess.Popen(
        argv,
        cwd=ROOT,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
        start_new_session=True,
    )
    lines: list[str] = []

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line.rstrip("\n"))
            if echo:
                print(f"   {line}", end="", flush=True)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    timed_out = False
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        _stop_group(proc)
    except BaseException:  # Ctrl-C: take the benchmark's processes down too
        _stop_group(proc)
        raise
    else:
        # The benchmark is gone; whatever it left running in its group goes too.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGTERM)
    reader.join(10)
    if proc.stdout is not None and not reader.is_alive():
        proc.stdout.close()
    seconds = time.perf_counter() - start
    outcome = Outcome(bench.name, seconds, tail=lines[-TAIL_LINES:])
    if timed_out:
        outcome.error = f"timed out after {timeout:g} s"
    elif proc.returncode != 0:
        outcome.error = f"exited with status {proc.returncode}"
    else:
        try:
            outcome.metrics = parse_result("\n".join(lines), bench.name)
        except ValueError as exc:
            outcome.error = str(exc)
    return outcome


# -- verdicts ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    marker: Marker
    measured: float | None
    verdict: str
    failed: bool
    message: str = ""
    seconds: float | None = None


def _fmt(value: float) -> str:
    return f"{value:.3g}"


def evaluate(marker: Marker, outcome: Outcome) -> Row:
    """The verdict on one headline figure: failed, regressed, or within bounds (goal or not)."""
    name = f"{marker.benchmark} {marker.metric}"
    if outcome.error is not None:
        message = f"{marker.benchmark} failed: {outcome.error}"
        return Row(marker, None, "FAILED", True, message, outcome.seconds)
    value = outcome.metrics.get(marker.metric)
    if value is None:
        message = f"{name}: the benchmark's RESULT line does not report {marker.metric}"
        return Row(marker, None, "FAILED", True, message, outcome.seconds)
    if marker.regressed(value):
        worse = "lower" if marker.better == "higher" else "higher"
        message = (
            f"{name} = {_fmt(value)}: more than {BOUND_FACTOR:g}x worse than the recorded "
            f"{marker.recorded:g} in docs/performance.md ({marker.better} is better; the bound "
            f"is {_fmt(marker.bound)}, this is {worse})"
        )
        return Row(marker, value, "REGRESSION", True, message, outcome.seconds)
    met = marker.meets_goal(value)
    verdict = "ok" if met is None else ("ok, goal met" if met else "ok, goal not met")
    return Row(marker, value, verdict, False, "", outcome.seconds)


def table(rows: Sequence[Row]) -> str:
    header = ("benchmark", "metric", "measured", "goal", "recorded", "fails if", "time", "verdict")
    body = []
    for r in rows:
        m = r.marker
        bound = f"{'<' if m.better == 'higher' else '>'} {_fmt(m.bound)}"
        body.append(
            (
                m.benchmark,
                m.metric,
                "-" if r.measured is None else _fmt(r.measured),
                m.goal_text(),
                f"{m.recorded:g}",
                bound,
                "-" if r.seconds is None else f"{r.seconds:.0f} s",
                r.verdict,
            )
        )
    widths = [max(len(str(row[i])) for row in (header, *body)) for i in range(len(header))]
    lines = [
        "  ".join(f"{cell:<{w}}" for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in (header, *body)
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


# -- the command ---------------------------------------------------------------------------------


def build_parser(names: Sequence[str]) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python benchmarks/run.py",
        description="Run the benchmarks; compare each headline ratio with its goal and with the "
        "figure recorded in docs/performance.md; exit 1 on a failure or a ratio more than "
        f"{BOUND_FACTOR:g}x worse than recorded.",
    )
    mode = p.add_mutually_exclusive_group()
    mode.add_argument(
        "--quick",
        dest="mode",
        action="store_const",
        const="quick",
        help="small sizes, few repeats: a few minutes on 2 cores (the default)",
    )
    mode.add_argument(
        "--smoke",
        dest="mode",
        action="store_const",
        const="smoke",
        help="the cheapest meaningful sizes, for CI",
    )
    mode.add_argument(
        "--full",
        dest="mode",
        action="store_const",
        const="full",
        help="the configurations docs/performance.md documents (an hour or more)",
    )
    p.set_defaults(mode="quick")
    p.add_argument(
        "--only", default="", metavar="NAME,...", help="run these benchmarks only (default: all)"
    )
    p.add_argument(
        "--dir",
        type=Path,
        default=None,
        help="work directory, kept (TPC-H data is reused from it); default: a temporary one",
    )
    p.add_argument("--doc", type=Path, default=DOC, help="where the markers are")
    p.add_argument("--timeout", type=float, default=None, help="seconds per benchmark")
    p.add_argument("-q", "--quiet", action="store_true", help="do not echo benchmark output")
    return p


def main(argv: Sequence[str] | None = None, benchmarks: Sequence[Benchmark] = BENCHMARKS) -> int:
    names = [b.name for b in benchmarks]
    parser = build_parser(names)
    args = parser.parse_args(argv)
    only = [n for n in args.only.split(",") if n]
    unknown = [n for n in only if n not in names]
    if unknown:
        parser.error(f"--only: no benchmark {', '.join(unknown)} (known: {', '.join(names)})")
    selected = [b for b in benchmarks if not only or b.name in only]

    try:
        text = args.doc.read_text(encoding="utf-8")
        markers = parse_markers(text, str(args.doc))
        check_markers(markers, names, str(args.doc))
    except (OSError, MarkerError) as exc:
        print(f"run.py: {exc}", file=sys.stderr)
        return 2

    timeout = args.timeout if args.timeout is not None else TIMEOUTS[args.mode]
    temp = None
    if args.dir is None:
        temp = tempfile.mkdtemp(prefix="ppml-bench-run-")
        workdir = Path(temp)
    else:
        workdir = args.dir.resolve()
        workdir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    outcomes: dict[str, Outcome] = {}
    try:
        print(
            f"{args.mode} run of {len(selected)} benchmarks in {workdir}; "
            f"{os.cpu_count()} CPUs; {timeout:g} s at most each",
            flush=True,
        )
        for bench in selected:
            outcomes[bench.name] = run_benchmark(
                bench, args.mode, workdir, timeout, echo=not args.quiet
            )
    finally:
        if temp is not None:
            shutil.rmtree(temp, ignore_errors=True)
    elapsed = time.perf_counter() - started

    rows = [evaluate(m, outcomes[m.benchmark]) for m in markers if m.benchmark in outcomes]
    print(f"\n== {args.mode} run: {len(selected)} benchmarks in {elapsed:.0f} s\n")
    print(table(rows))
    failures = [r for r in rows if r.failed]
    for name, outcome in outcomes.items():
        if outcome.error is not None and outcome.tail:
            print(f"\n-- the last lines of {name}'s output --", file=sys.stderr)
            print("\n".join(outcome.tail), file=sys.stderr)
    if failures:
        print(f"\nFAILED ({len(failures)}):", file=sys.stderr)
        for message in dict.fromkeys(r.message for r in failures):
            print(f"  {message}", file=sys.stderr)
        return 1
    print(
        f"\nevery headline ratio is within {BOUND_FACTOR:g}x of its recorded figure "
        "(goals are reported, not enforced)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
