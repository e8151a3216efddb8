"""Workload manifests: what the measurement covers, and that any change to it changes it."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from ppml.errors import InputNotFound, UsageError
from ppml.tee.command import DEFAULT_ENV
from ppml.tee.imports import local_imports
from ppml.tee.manifest import build_manifest


def _workload(tmp_path: Path) -> Path:
    (tmp_path / "helpers").mkdir()
    (tmp_path / "helpers" / "__init__.py").write_text("from .maths import double\n")
    (tmp_path / "helpers" / "maths.py").write_text("def double(x):\n    return 2 * x\n")
    (tmp_path / "local_mod.py").write_text("VALUE = 1\n")
    (tmp_path / "unrelated.py").write_text("print('not imported')\n")
    script = tmp_path / "job.py"
    script.write_text(
        "import json\nimport local_mod\nfrom helpers import double\nprint(double(2))\n"
    )
    return script


def _measure(*command: str | Path, **kwargs: object) -> str:
    return build_manifest([str(c) for c in command], **kwargs).measurement()  # type: ignore[arg-type]


def test_measurement_is_sha384_hex_and_stable(tmp_path: Path) -> None:
    script = _workload(tmp_path)
    first = _measure(sys.executable, script)
    assert re.fullmatch(r"[0-9a-f]{96}", first)
    assert _measure(sys.executable, script) == first


def test_trusted_files_are_the_script_and_its_local_imports(tmp_path: Path) -> None:
    script = _workload(tmp_path)
    manifest = build_manifest([sys.executable, str(script)])
    assert [f.path for f in manifest.trusted_files] == [
        "helpers/__init__.py",
        "helpers/maths.py",
        "job.py",
        "local_mod.py",
    ]
    assert manifest.entry == "job.py"
    assert local_imports(script) == sorted(
        p.resolve()
        for p in (
            tmp_path / "helpers" / "__init__.py",
            tmp_path / "helpers" / "maths.py",
            tmp_path / "local_mod.py",
        )
    )


@pytest.mark.parametrize(
    "target", ["job.py", "local_mod.py", "helpers/maths.py", "helpers/__init__.py"]
)
def test_any_changed_trusted_byte_changes_the_measurement(tmp_path: Path, target: str) -> None:
    script = _workload(tmp_path)
    before = _measure(sys.executable, script)
    path = tmp_path / target
    path.write_bytes(path.read_bytes() + b" ")
    assert _measure(sys.executable, script) != before


def test_untrusted_files_do_not_count_but_trusted_ones_do(tmp_path: Path) -> None:
    script = _workload(tmp_path)
    before = _measure(sys.executable, script)
    (tmp_path / "unrelated.py").write_text("changed\n")
    assert _measure(sys.executable, script) == before
    data = tmp_path / "model.bin"
    data.write_bytes(b"weights")
    with_trusted = _measure(sys.executable, script, trusted=[data])
    assert with_trusted != before
    data.write_bytes(b"weightz")
    assert _measure(sys.executable, script, trusted=[data]) != with_trusted


def test_arguments_flags_and_variable_values_are_measured(tmp_path: Path) -> None:
    script = _workload(tmp_path)
    base = _measure(sys.executable, script)
    assert _measure(sys.executable, script, "--rows", "10") != base
    assert _measure(sys.executable, "-u", script) != base
    assert _measure(sys.executable, "-X", "utf8", script) != base
    env = {"PATH": os.environ["PATH"], "MY_SETTING": "a"}
    with_a = _measure(sys.executable, script, env=["MY_SETTING"], env_source=env)
    assert with_a != base
    env["MY_SETTING"] = "b"
    assert _measure(sys.executable, script, env=["MY_SETTING"], env_source=env) != with_a
    assert _measure(sys.executable, script, env=["MY_SETTING=a"], env_source=env) == with_a
    env["HOME"] = "/elsewhere"
    assert _measure(sys.executable, script, env_source=env) != base  # HOME's value counts


def test_a_script_after_interpreter_flags_is_measured(tmp_path: Path) -> None:
    script = _workload(tmp_path)
    manifest = build_manifest([sys.executable, "-u", "-B", "-W", "error", str(script)])
    assert manifest.entry == "job.py"
    assert "job.py" in [f.path for f in manifest.trusted_files]
    before = manifest.measurement()
    script.write_text(script.read_text() + "# changed\n")
    assert _measure(sys.executable, "-u", "-B", "-W", "error", script) != before


def test_the_path_used_to_call_the_script_does_not_matter(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    script = _workload(tmp_path)
    absolute = _measure(sys.executable, script)
    monkeypatch.chdir(tmp_path)
    assert _measure(sys.executable, "job.py") == absolute


def test_a_local_module_run_with_m_is_measured(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _workload(tmp_path)
    monkeypatch.chdir(tmp_path)
    manifest = build_manifest([sys.executable, "-m", "job"])
    assert [f.path for f in manifest.trusted_files] == [
        "helpers/__init__.py",
        "helpers/maths.py",
        "job.py",
        "local_mod.py",
    ]
    before = manifest.measurement()
    (tmp_path / "local_mod.py").write_text("VALUE = 2\n")
    assert _measure(sys.executable, "-m", "job") != before


def test_a_module_of_the_environment_is_covered_by_its_digest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`python -I -m ppml` never takes ppml from the working directory: a ./ppml/ package there
    is not measured and changes nothing."""
    monkeypatch.chdir(tmp_path)
    before = build_manifest([sys.executable, "-I", "-m", "ppml", "--help"])
    assert before.trusted_files == () and before.environment is not None
    (tmp_path / "ppml").mkdir()
    (tmp_path / "ppml" / "__init__.py").write_text("print('not ppml')\n")
    after = build_manifest([sys.executable, "-I", "-m", "ppml", "--help"])
    assert after.measurement() == before.measurement()
    # Without -I the working directory comes first, so its ppml is the one measured.
    with pytest.raises(UsageError, match="not a module ppml can measure"):
        build_manifest([sys.executable, "-m", "ppml", "--help"])


def test_the_environment_is_measured(tmp_path: Path) -> None:
    """A file added to the interpreter's site-packages (a .pth, a sitecustomize) changes every
    measurement made with that interpreter."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    (tmp_path / "app").mkdir()
    script = _workload(tmp_path / "app")
    manifest = build_manifest([str(python), str(script)])
    assert manifest.environment is not None
    site = next(r for r in manifest.environment.roots if r.endswith("site-packages"))
    assert site.startswith(str(venv.resolve()))
    before = manifest.measurement()
    Path(site, "evil.pth").write_text("import os\n")
    assert _measure(python, script) != before
    Path(site, "evil.pth").unlink()
    assert _measure(python, script) == before
    (Path(site) / "__pycache__").mkdir()
    (Path(site) / "__pycache__" / "x.cpython-311.pyc").write_bytes(b"cache")
    assert _measure(python, script) == before  # bytecode caches are not measured


def test_snapshot_copies_hold_the_measured_bytes(tmp_path: Path) -> None:
    script = _workload(tmp_path)
    snapshot = tmp_path / "snap"
    snapshot.mkdir()
    manifest = build_manifest([sys.executable, str(script)], snapshot=snapshot)
    original = script.read_bytes()
    script.write_text("print('swapped')\n")
    entry = next(f for f in manifest.trusted_files if f.path == "job.py")
    assert entry.copy is not None and Path(entry.copy).read_bytes() == original
    assert entry.source == str(script.resolve())
    assert _measure(sys.executable, script) != manifest.measurement()
    script.write_bytes(original)
    assert _measure(sys.executable, script) == manifest.measurement()


def test_child_environment_is_the_allow_list_with_values(tmp_path: Path) -> None:
    env = {
        "PATH": "/bin",
        "HOME": "/home/x",
        "PPML_PASSPHRASE": "secret",
        "PPML_HOME": "/ws",
        "EXTRA": "1",
        "OTHER": "x",
        "TERM": "xterm",
    }
    manifest = build_manifest(
        [sys.executable, str(_workload(tmp_path))], env=["EXTRA"], env_source=env
    )
    assert manifest.child_environment() == {
        "PATH": "/bin",
        "HOME": "/home/x",
        "EXTRA": "1",
        "TMPDIR": "/tmp",
    }
    assert set(manifest.env_allow) <= {*DEFAULT_ENV, "EXTRA", "TMPDIR"}


REFUSED_VARIABLES = [
    "LD_PRELOAD",
    "LD_AUDIT",
    "LD_LIBRARY_PATH",
    "PYTHONPATH",
    "PYTHONHOME",
    "PYTHONSTARTUP",
    "PYTHONUSERBASE",
    "PYTHONWARNINGS",
    "PYTHONPYCACHEPREFIX",
    "PYTHONINSPECT",
    "GCONV_PATH",
    "BASH_ENV",
    "ENV",
    "BASH_FUNC_ls%%",
    "JAVA_TOOL_OPTIONS",
    "_JAVA_OPTIONS",
    "JDK_JAVA_OPTIONS",
    "NODE_OPTIONS",
    "PERL5LIB",
    "GLIBC_TUNABLES",
    "OPENSSL_CONF",
    "SPARK_CONF_DIR",
    "PYSPARK_SUBMIT_ARGS",
    "CLASSPATH",
    "TMPDIR",
    "PPML_KMS_URL",
    "QT_PLUGIN_PATH",
]


@pytest.mark.parametrize("name", REFUSED_VARIABLES)
def test_variables_that_change_the_code_are_refused(tmp_path: Path, name: str) -> None:
    script = _workload(tmp_path)
    for item in (name, f"{name}=/tmp/x"):
        with pytest.raises(UsageError):
            build_manifest([sys.executable, str(script)], env=[item], env_source={name: "x"})


def test_refusals(tmp_path: Path) -> None:
    with pytest.raises(UsageError):
        build_manifest([])
    with pytest.raises(InputNotFound):
        build_manifest(["no-such-interpreter-xyz"])
    with pytest.raises(InputNotFound):
        build_manifest([sys.executable, str(tmp_path / "missing.py")])
    script = _workload(tmp_path)
    with pytest.raises(InputNotFound):
        build_manifest([sys.executable, str(script)], trusted=[tmp_path / "nope"])
    for safe in ("PYTHONUNBUFFERED", "MY_SETTING", "PATH"):
        build_manifest([sys.executable, str(script)], env=[safe], env_source={safe: "1"})
