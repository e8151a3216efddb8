"""Flink's Python environment: which ppml `ppml flink setup` installs into it (never "ppml" by
name from a package index) and where it lives (somewhere attested workloads can see)."""

from __future__ import annotations

import json
import os
from importlib.metadata import PackageNotFoundError
from pathlib import Path
from typing import Any

import pytest

from ppml._internal.fs import state_root
from ppml.engines.flink import environment
from ppml.engines.flink.environment import (
    FlinkEnvironment,
    default_venv,
    find_flink_environment,
    install_spec,
    setup_flink_environment,
)
from ppml.errors import ConfigurationError, UsageError

PYPROJECT = '[project]\nname = "ppml"\nversion = "0.1.0"\n'


class FakeDistribution:
    """What `importlib.metadata.distribution("ppml")` answers, for a chosen direct_url.json."""

    def __init__(self, direct_url: dict[str, Any] | None, site: Path) -> None:
        self._direct_url = direct_url
        self._site = site
        self.version = "0.1.0"

    def read_text(self, name: str) -> str | None:
        if name == "direct_url.json" and self._direct_url is not None:
            return json.dumps(self._direct_url)
        return None

    def locate_file(self, path: str) -> Path:
        return self._site / path


def _source(tmp_path: Path) -> Path:
    src = tmp_path / "clone"
    (src / "src" / "ppml").mkdir(parents=True)
    (src / "pyproject.toml").write_text(PYPROJECT)
    return src


def _spec(direct_url: dict[str, Any] | None, package: Path, site: Path) -> list[str]:
    def distribution(name: str) -> FakeDistribution:
        assert name == "ppml"
        return FakeDistribution(direct_url, site)

    return install_spec(distribution=distribution, package=package)


def test_an_editable_install_is_installed_editable_from_its_source(tmp_path: Path) -> None:
    src = _source(tmp_path)
    # Imported from the clone's src/: the running tree itself.
    assert install_spec(package=src / "src" / "ppml") == ["-e", f"{src}[flink]"]
    # A flat layout, found through pip's record only.
    flat = tmp_path / "flat"
    (flat / "ppml").mkdir(parents=True)
    (flat / "pyproject.toml").write_text(PYPROJECT)
    record = {"url": flat.as_uri(), "dir_info": {"editable": True}}
    assert _spec(record, flat / "ppml", tmp_path / "site") == ["-e", f"{flat}[flink]"]


def test_a_normal_install_from_a_directory_is_installed_from_that_directory(
    tmp_path: Path,
) -> None:
    src = _source(tmp_path)
    site = tmp_path / "site-packages"
    (site / "ppml").mkdir(parents=True)
    record = {"url": src.as_uri(), "dir_info": {}}
    assert _spec(record, site / "ppml", site) == [f"{src}[flink]"]
    # A wheel file pip installed from, still there.
    wheel = tmp_path / "ppml-0.1.0-py3-none-any.whl"
    wheel.write_bytes(b"PK")
    record = {"url": wheel.as_uri(), "archive_info": {"hashes": {}}}
    assert _spec(record, site / "ppml", site) == [f"{wheel}[flink]"]


@pytest.mark.parametrize(
    ("record", "reason"),
    [
        (None, "installed from a package index"),
        ({"url": "https://example.org/ppml-0.1.0.tar.gz", "archive_info": {}}, "https URL"),
        ({"url": "file:///nonexistent/clone", "dir_info": {}}, "is gone"),
        ({"url": "file:///nonexistent/ppml-0.1.0-py3-none-any.whl", "archive_info": {}}, "gone"),
    ],
)
def test_without_a_local_source_setup_refuses_and_never_names_ppml_to_an_index(
    tmp_path: Path, record: dict[str, Any] | None, reason: str
) -> None:
    site = tmp_path / "site-packages"
    (site / "ppml").mkdir(parents=True)
    with pytest.raises(ConfigurationError, match=reason) as caught:
        _spec(record, site / "ppml", site)
    assert caught.value.exit_code == 5
    assert "ppml flink setup --source PATH" in str(caught.value)


def test_pips_record_of_another_ppml_is_not_used(tmp_path: Path) -> None:
    src = _source(tmp_path)
    site = tmp_path / "site-packages"
    (site / "ppml").mkdir(parents=True)
    elsewhere = tmp_path / "elsewhere" / "ppml"
    elsewhere.mkdir(parents=True)
    record = {"url": src.as_uri(), "dir_info": {}}
    with pytest.raises(ConfigurationError, match="not the installed distribution"):
        _spec(record, elsewhere, site)

    def missing(name: str) -> FakeDistribution:
        raise PackageNotFoundError(name)

    with pytest.raises(ConfigurationError, match="--source"):
        install_spec(distribution=missing, package=elsewhere)


def test_setup_refuses_before_making_anything_and_never_runs_pip_by_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    commands: list[list[str]] = []
    monkeypatch.setattr(environment, "_run", lambda command, _failure: commands.append(command))

    def refuse(source: Path | None = None, **_kw: Any) -> list[str]:
        raise ConfigurationError("no local source (--source)")

    monkeypatch.setattr(environment, "install_spec", refuse)
    with pytest.raises(ConfigurationError):
        setup_flink_environment(tmp_path / "venv")
    assert commands == [] and not (tmp_path / "venv").exists()


def test_source_names_a_ppml_directory_or_wheel(tmp_path: Path) -> None:
    src = _source(tmp_path)
    assert install_spec(src) == [f"{src}[flink]"]
    wheel = tmp_path / "ppml-0.1.0-py3-none-any.whl"
    wheel.write_bytes(b"PK")
    assert install_spec(wheel) == [f"{wheel}[flink]"]
    other = tmp_path / "other"
    other.mkdir()
    (other / "pyproject.toml").write_text('[project]\nname = "ppml-but-not"\n')
    for bad in (other, tmp_path / "torch-2.0-py3-none-any.whl", tmp_path / "missing"):
        with pytest.raises(UsageError):
            install_spec(bad)


# -- where it lives ------------------------------------------------------------------------------


def test_the_default_environment_is_outside_the_directories_workloads_never_see(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ppml.tee.launcher import shared_directory

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("XDG_DATA_HOME", raising=False)
    monkeypatch.delenv("XDG_STATE_HOME", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert default_venv() == tmp_path / "home" / ".local" / "share" / "ppml" / "flink-venv"
    for hidden in (state_root(), shared_directory()):
        assert not default_venv().is_relative_to(hidden)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    assert default_venv() == tmp_path / "data" / "ppml" / "flink-venv"
    with pytest.raises(UsageError, match="state directory"):
        setup_flink_environment(state_root() / "flink-venv")


def test_an_environment_in_the_old_place_is_named_and_not_used(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    for name in ("XDG_DATA_HOME", "XDG_STATE_HOME"):
        monkeypatch.delenv(name, raising=False)
    old = state_root() / "flink-venv" / "bin" / "python"
    old.parent.mkdir(parents=True)
    old.symlink_to(os.path.realpath("/bin/sh"))
    monkeypatch.setattr(environment.sys, "executable", str(tmp_path / "no-python"))
    with pytest.raises(ConfigurationError, match="not used any more") as caught:
        find_flink_environment({})
    assert "ppml flink setup" in str(caught.value)


def test_an_attested_job_refuses_an_environment_the_sandbox_hides(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ppml.engines.flink.attested import check_visible_to_workloads

    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    venv = state_root() / "flink-venv"

    def flink(prefix: Path) -> FlinkEnvironment:
        site = prefix / "lib" / "site-packages"
        return FlinkEnvironment(
            prefix / "bin" / "python", site / "pyflink", "2.3.0", site, site / "ppml", "3.11"
        )

    with pytest.raises(ConfigurationError, match="hidden from attested workloads") as caught:
        check_visible_to_workloads(flink(venv))
    assert "ppml flink setup" in str(caught.value)
    check_visible_to_workloads(flink(tmp_path / "data" / "flink-venv"))


def test_the_launcher_refuses_a_program_in_a_directory_it_hides(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Any attested workload whose program lies in what the sandbox hides is told so before it
    starts, not "No such file or directory" for a file that is there outside."""
    import shutil

    from ppml.tee.launcher import Isolation, RunDirectory, start
    from ppml.tee.manifest import build_manifest

    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    tool = state_root() / "bin" / "tool"
    tool.parent.mkdir(parents=True)
    shutil.copy(os.path.realpath("/bin/true"), tool)
    (tmp_path / "ws").mkdir()
    (tmp_path / "cwd").mkdir()
    run = RunDirectory.create(tmp_path / "ws")
    try:
        manifest = build_manifest([str(tool)], snapshot=run.snapshot)
        with pytest.raises(ConfigurationError, match="hidden from attested workloads"):
            start(
                manifest,
                run,
                tee="sim",
                quote=None,
                kms_url="https://127.0.0.1:1",
                ca_pem="",
                isolation=Isolation(hidden=(tmp_path / "ws",)),
                cwd=tmp_path / "cwd",
            )
    finally:
        run.remove()
