"""Workload manifests: what the measurement covers, and that any trusted change changes it."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

from ppml.errors import InputNotFound, UsageError
from ppml.tee.imports import local_imports
from ppml.tee.manifest import DEFAULT_ENV_ALLOW, build_manifest


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


def _measure(script: Path, *args: str, **kwargs: object) -> str:
    return build_manifest([sys.executable, str(script), *args], **kwargs).measurement()  # type: ignore[arg-type]


def test_measurement_is_sha384_hex_and_stable(tmp_path: Path) -> None:
    script = _workload(tmp_path)
    first = _measure(script)
    assert re.fullmatch(r"[0-9a-f]{96}", first)
    assert _measure(script) == first


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
    before = _measure(script)
    path = tmp_path / target
    path.write_bytes(path.read_bytes() + b" ")
    assert _measure(script) != before


def test_untrusted_files_do_not_count_but_trusted_ones_do(tmp_path: Path) -> None:
    script = _workload(tmp_path)
    before = _measure(script)
    (tmp_path / "unrelated.py").write_text("changed\n")
    assert _measure(script) == before
    data = tmp_path / "model.bin"
    data.write_bytes(b"weights")
    with_trusted = _measure(script, trusted=[data])
    assert with_trusted != before
    data.write_bytes(b"weightz")
    assert _measure(script, trusted=[data]) != with_trusted


def test_arguments_and_environment_allow_list_are_measured(tmp_path: Path) -> None:
    script = _workload(tmp_path)
    base = _measure(script)
    assert _measure(script, "--rows", "10") != base
    assert _measure(script, env_allow=["MY_SETTING"]) != base


def test_the_path_used_to_call_the_script_does_not_matter(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    script = _workload(tmp_path)
    absolute = _measure(script)
    monkeypatch.chdir(tmp_path)
    assert _measure(Path("job.py")) == absolute


def test_child_environment_is_the_allow_list_only(tmp_path: Path) -> None:
    manifest = build_manifest([sys.executable, str(_workload(tmp_path))], env_allow=["EXTRA"])
    env = {
        "PATH": "/bin",
        "PPML_PASSPHRASE": "secret",
        "PPML_HOME": "/ws",
        "EXTRA": "1",
        "OTHER": "x",
    }
    assert manifest.child_environment(env) == {"PATH": "/bin", "EXTRA": "1"}
    assert set(DEFAULT_ENV_ALLOW) <= set(manifest.env_allow)


def test_refusals(tmp_path: Path) -> None:
    with pytest.raises(UsageError):
        build_manifest([])
    with pytest.raises(InputNotFound):
        build_manifest(["no-such-interpreter-xyz"])
    with pytest.raises(InputNotFound):
        build_manifest([sys.executable, str(tmp_path / "missing.py")])
    script = _workload(tmp_path)
    for name in ("PYTHONPATH", "LD_PRELOAD"):
        with pytest.raises(UsageError, match="cannot be passed"):
            build_manifest([sys.executable, str(script)], env_allow=[name])
    with pytest.raises(InputNotFound):
        build_manifest([sys.executable, str(script)], trusted=[tmp_path / "nope"])
