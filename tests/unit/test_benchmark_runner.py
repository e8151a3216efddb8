"""benchmarks/run.py: the markers of docs/performance.md, the RESULT lines, the 3x bound and the
verdicts. The benchmarks here are small scripts that print a RESULT line or fail; nothing is
timed."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _load_runner() -> ModuleType:
    spec = importlib.util.spec_from_file_location("ppml_benchmarks_run", ROOT / "benchmarks/run.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


run = _load_runner()

DOC = """# Performance

| what | ratio |
|---|---|
| a | 0.59 |

<!-- bench: crypto format_vs_primitive recorded=0.59 goal>=0.5 -->
<!-- bench: crypto decrypt_vs_copy recorded=1.57 better=higher -->

Some prose quoting the syntax inline: `<!-- bench: nope x recorded=oops -->` is not a marker.

  <!--  bench: sql total_ratio   recorded=2.25 goal<=1.15  -->
<!-- bench: startup run_vs_plain recorded=7.2 better=lower -->
"""


def marker(better: str, recorded: float, goal: float | None = None) -> Any:
    return run.Marker("b", "m", recorded, better, goal)


# -- markers -------------------------------------------------------------------------------------


def test_markers_are_parsed_with_their_direction_goal_and_line() -> None:
    markers = run.parse_markers(DOC)
    got = [(m.benchmark, m.metric, m.recorded, m.better, m.goal, m.line) for m in markers]
    assert got == [
        ("crypto", "format_vs_primitive", 0.59, "higher", 0.5, 7),
        ("crypto", "decrypt_vs_copy", 1.57, "higher", None, 8),
        ("sql", "total_ratio", 2.25, "lower", 1.15, 12),
        ("startup", "run_vs_plain", 7.2, "lower", None, 13),
    ]


def test_the_projects_own_document_has_a_valid_marker_for_every_benchmark() -> None:
    text = (ROOT / "docs" / "performance.md").read_text(encoding="utf-8")
    markers = run.parse_markers(text)
    run.check_markers(markers, [b.name for b in run.BENCHMARKS])  # raises when one is missing
    assert {m.benchmark for m in markers} == {b.name for b in run.BENCHMARKS}


def test_a_benchmark_without_a_marker_is_refused_by_name() -> None:
    markers = run.parse_markers(DOC)
    with pytest.raises(run.MarkerError, match="no marker for kms_load"):
        run.check_markers(markers, ["crypto", "sql", "startup", "kms_load"])


def test_a_marker_naming_no_benchmark_is_refused() -> None:
    markers = run.parse_markers(DOC)
    with pytest.raises(run.MarkerError, match=r"names 'startup', which is not a benchmark"):
        run.check_markers(markers, ["crypto", "sql"])


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        ("bench sql total_ratio recorded=2.25 goal<=1.15", "expected '<!-- bench:"),
        ("bench: sql total_ratio", "expected a benchmark, a metric and recorded"),
        ("bench: sql total_ratio goal<=1.15", "no recorded=X"),
        ("bench: sql total_ratio recorded=2.25", "which way is better"),
        ("bench: sql total_ratio recorded=fast goal<=1.15", "recorded is not a number"),
        ("bench: sql total_ratio recorded=0 goal<=1.15", "must be a positive number"),
        ("bench: sql total_ratio recorded=nan goal<=1.15", "must be a positive number"),
        ("bench: sql total_ratio recorded=2.25 goal=1.15", "bad field 'goal=1.15'"),
        ("bench: sql total_ratio recorded=2.25 goal<1.15", "unknown field 'goal<1.15'"),
        ("bench: sql total_ratio recorded=2.25 better=faster", "bad field 'better=faster'"),
        ("bench: sql total_ratio recorded=2.25 goal<=1.15 speed", "unknown field 'speed'"),
        ("bench: sql total_ratio recorded=2.25 recorded=2 better=lower", "recorded given twice"),
        ("bench: sql total_ratio recorded=2.25 goal<=1.15 better=higher", "contradicts"),
        ("bench: SQL total_ratio recorded=2.25 goal<=1.15", "not a benchmark or metric name"),
    ],
)
def test_a_malformed_marker_is_refused_with_its_line(body: str, reason: str) -> None:
    text = f"# Performance\n\n<!-- {body} -->\n"
    with pytest.raises(run.MarkerError, match=r"performance\.md:3: malformed marker") as caught:
        run.parse_markers(text, "performance.md")
    assert reason in str(caught.value)


def test_a_second_marker_for_the_same_figure_is_refused() -> None:
    text = DOC + "<!-- bench: sql total_ratio recorded=5 goal<=1.15 -->\n"
    with pytest.raises(run.MarkerError, match="a second marker for sql total_ratio"):
        run.parse_markers(text)


def test_main_refuses_a_document_without_markers_before_running_anything(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    doc = tmp_path / "performance.md"
    doc.write_text("# Performance\n\nno markers here\n")
    ran = tmp_path / "ran"
    bench = _script(tmp_path, "fast", f"open({str(ran)!r}, 'w').close()\nprint('RESULT fast r=1')")
    assert run.main(["--smoke", "--doc", str(doc), "-q"], benchmarks=[bench]) == 2
    assert "no marker for fast" in capsys.readouterr().err
    assert not ran.exists()


# -- the 3x bound, in both directions ------------------------------------------------------------


def test_higher_is_better_fails_only_below_a_third_of_the_recorded_figure() -> None:
    m = marker("higher", 0.6)
    assert m.bound == pytest.approx(0.2)
    assert not m.regressed(0.21)
    assert not m.regressed(0.2)  # exactly 3x worse: still within the bound
    assert m.regressed(0.19)
    assert not m.regressed(50.0)  # far better is never a regression


def test_lower_is_better_fails_only_above_three_times_the_recorded_figure() -> None:
    m = marker("lower", 2.25)
    assert m.bound == pytest.approx(6.75)
    assert not m.regressed(6.7)
    assert not m.regressed(6.75)
    assert m.regressed(6.8)
    assert m.regressed(57.0)  # the SQL slowdown that went unnoticed
    assert not m.regressed(0.01)


@pytest.mark.parametrize(
    ("better", "recorded", "goal", "value", "verdict", "failed"),
    [
        ("lower", 2.25, 1.15, 1.1, "ok, goal met", False),
        ("lower", 2.25, 1.15, 2.0, "ok, goal not met", False),
        ("lower", 2.25, 1.15, 7.0, "REGRESSION", True),
        ("higher", 0.59, 0.5, 0.6, "ok, goal met", False),
        ("higher", 0.59, 0.5, 0.3, "ok, goal not met", False),
        ("higher", 0.59, 0.5, 0.1, "REGRESSION", True),
        ("higher", 0.23, None, 0.2, "ok", False),
        ("lower", 7.2, None, 30.0, "REGRESSION", True),
    ],
)
def test_verdicts(
    better: str, recorded: float, goal: float | None, value: float, verdict: str, failed: bool
) -> None:
    outcome = run.Outcome("b", 1.0, metrics={"m": value})
    row = run.evaluate(marker(better, recorded, goal), outcome)
    assert (row.verdict, row.failed, row.measured) == (verdict, failed, value)


def test_a_regression_message_names_the_benchmark_the_figure_and_the_bound() -> None:
    m = run.Marker("sql_tpch", "total_ratio", 2.25, "lower", 1.15)
    row = run.evaluate(m, run.Outcome("sql_tpch", 1.0, metrics={"total_ratio": 57.0}))
    assert row.failed
    assert "sql_tpch total_ratio = 57" in row.message
    assert "recorded 2.25" in row.message
    assert "bound is 6.75" in row.message


# -- RESULT lines --------------------------------------------------------------------------------


def test_the_last_result_line_of_the_benchmark_counts() -> None:
    output = "warming up\nRESULT sql_tpch total_ratio=9\nmore\nRESULT sql_tpch total_ratio=1.08\n"
    assert run.parse_result(output, "sql_tpch") == {"total_ratio": 1.08}


@pytest.mark.parametrize(
    ("output", "reason"),
    [
        ("total ratio: 1.08x\n", "printed no RESULT line"),
        ("RESULT other total_ratio=1.08\n", "names 'other', not 'sql_tpch'"),
        ("RESULT sql_tpch\n", "holds no metric"),
        ("RESULT sql_tpch total_ratio=fast\n", "is not a number"),
        ("RESULT sql_tpch total_ratio=nan\n", "not a finite number"),
        ("RESULT sql_tpch total_ratio\n", "malformed RESULT field"),
    ],
)
def test_a_missing_or_malformed_result_line_is_an_error(output: str, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        run.parse_result(output, "sql_tpch")


# -- benchmark subprocesses ----------------------------------------------------------------------


def _script(tmp_path: Path, name: str, code: str, args: str = "") -> Any:
    script = tmp_path / f"{name}.py"
    script.write_text(code + "\n")
    return run.Benchmark(name, {m: args for m in run.MODES}, script=script)


def _doc(tmp_path: Path, *markers: str) -> Path:
    doc = tmp_path / "performance.md"
    doc.write_text("# Performance\n\n" + "".join(f"<!-- bench: {m} -->\n" for m in markers))
    return doc


def test_a_benchmark_that_exits_with_an_error_is_a_failure(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = "import sys\nprint('RESULT broken ratio=1.0')\nprint('boom: no data')\nsys.exit(3)"
    bench = _script(tmp_path, "broken", code)
    outcome = run.run_benchmark(bench, "smoke", tmp_path, timeout=60, echo=False)
    assert outcome.error == "exited with status 3"
    assert outcome.tail[-1] == "boom: no data"
    row = run.evaluate(run.Marker("broken", "ratio", 1.0, "lower"), outcome)
    assert (row.verdict, row.failed) == ("FAILED", True)
    assert "broken failed: exited with status 3" in row.message

    doc = _doc(tmp_path, "broken ratio recorded=1.0 better=lower")
    status = run.main(["--smoke", "--doc", str(doc), "-q"], benchmarks=[bench])
    err = capsys.readouterr().err
    assert status == 1
    assert "broken failed: exited with status 3" in err
    assert "boom: no data" in err  # the end of its output, to see why


def test_a_benchmark_without_a_result_line_or_a_marked_metric_is_a_failure(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    silent = _script(tmp_path, "silent", "print('done, all good')")
    partial = _script(tmp_path, "partial", "print('RESULT partial write_ratio=1.0')")
    doc = _doc(
        tmp_path,
        "silent ratio recorded=1.0 better=lower",
        "partial write_ratio recorded=1.0 goal<=1.1",
        "partial read_ratio recorded=1.0 goal<=1.1",
    )
    status = run.main(["--smoke", "--doc", str(doc), "-q"], benchmarks=[silent, partial])
    captured = capsys.readouterr()
    assert status == 1
    assert "silent failed: printed no RESULT line" in captured.err
    assert "partial read_ratio: the benchmark's RESULT line does not report read_ratio" in (
        captured.err
    )
    assert "ok, goal met" in captured.out  # partial's write_ratio itself is fine


def test_a_benchmark_that_does_not_finish_in_time_is_a_failure(tmp_path: Path) -> None:
    bench = _script(tmp_path, "hung", "import time\ntime.sleep(600)")
    outcome = run.run_benchmark(bench, "smoke", tmp_path, timeout=0.5, echo=False)
    assert outcome.error == "timed out after 0.5 s"
    row = run.evaluate(run.Marker("hung", "ratio", 1.0, "lower"), outcome)
    assert row.failed


def test_a_regressed_ratio_fails_the_run_and_a_good_one_passes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    slow = _script(tmp_path, "slow", "import sys\nprint('RESULT slow total_ratio=' + sys.argv[1])")
    doc = _doc(tmp_path, "slow total_ratio recorded=2.25 goal<=1.15")

    bench = run.Benchmark("slow", {m: "57.3" for m in run.MODES}, script=slow.path)
    assert run.main(["--smoke", "--doc", str(doc), "-q"], benchmarks=[bench]) == 1
    captured = capsys.readouterr()
    assert "REGRESSION" in captured.out
    assert "slow total_ratio = 57.3: more than 3x worse than the recorded 2.25" in captured.err

    bench = run.Benchmark("slow", {m: "2.5" for m in run.MODES}, script=slow.path)
    assert run.main(["--smoke", "--doc", str(doc), "-q"], benchmarks=[bench]) == 0
    assert "ok, goal not met" in capsys.readouterr().out


def test_each_mode_runs_its_own_arguments_and_only_selects(tmp_path: Path) -> None:
    code = "import sys\nprint('RESULT echo ratio=' + sys.argv[1])"
    script = tmp_path / "echo.py"
    script.write_text(code + "\n")
    echo = run.Benchmark("echo", {"quick": "1", "smoke": "2", "full": "3"}, script=script)
    other = _script(tmp_path, "other", "import sys\nsys.exit(1)")
    doc = _doc(
        tmp_path,
        "echo ratio recorded=2 better=lower",
        "other ratio recorded=2 better=lower",
    )
    for flag, value in (("--quick", 1.0), ("--smoke", 2.0), ("--full", 3.0)):
        outcome = run.run_benchmark(echo, flag[2:], tmp_path, timeout=60, echo=False)
        assert outcome.metrics == {"ratio": value}
    # `other` would fail; --only leaves it out, and no --mode flag means --quick.
    assert run.main(["--only", "echo", "--doc", str(doc), "-q"], benchmarks=[echo, other]) == 0


def test_every_benchmark_has_a_script_and_every_mode() -> None:
    for bench in run.BENCHMARKS:
        assert bench.path.is_file(), bench.name
        assert set(bench.args) == set(run.MODES), bench.name
