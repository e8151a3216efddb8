"""The Spark launcher's configuration: ppml's jar merged with the user's into one `spark.jars`,
and the security properties (TLS on RPC from the workspace's stores, authentication on)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, cast

import pytest

from ppml.engines.spark import launcher
from ppml.engines.spark.launcher import (
    merge_jars,
    parse_submit_args,
    ppml_jars,
    security_properties,
)
from ppml.errors import ConfigurationError


@pytest.fixture
def app(tmp_path: Path) -> Path:
    path = tmp_path / "job.py"
    path.write_text("print('hi')\n")
    return path


def _jars_of(options: list[str]) -> list[str]:
    """The --jars values of a spark-submit option list (there must be at most one)."""
    values = [options[i + 1] for i, opt in enumerate(options) if opt == "--jars"]
    assert len(values) <= 1, options
    return values[0].split(",") if values else []


def test_merge_keeps_the_users_jars_first_then_adds_extra_once() -> None:
    assert merge_jars([]) == []
    assert merge_jars(["a.jar,b.jar", " c.jar ", ""], [Path("/p/ppml.jar")]) == [
        "a.jar",
        "b.jar",
        "c.jar",
        "/p/ppml.jar",
    ]
    assert merge_jars(["/p/ppml.jar,a.jar"], ["/p/ppml.jar"]) == ["/p/ppml.jar", "a.jar"]
    assert merge_jars([], ["x.jar"]) == ["x.jar"]


def test_users_jars_and_spark_jars_conf_merge_with_ppmls(app: Path, tmp_path: Path) -> None:
    ppml_jar = tmp_path / "ppml-spark.jar"
    req = parse_submit_args(
        [
            "--jars",
            "hdfs://nn/u1.jar,local:/opt/u2.jar",
            "--conf",
            "spark.jars=u3.jar",
            "--jars=u4.jar",
            "--conf",
            "spark.executor.memory=1g",
            str(app),
        ]
    )
    assert req.jars == ("hdfs://nn/u1.jar", "local:/opt/u2.jar", "u3.jar", "u4.jar")
    assert ("spark.jars", "u3.jar") not in req.conf
    assert req.conf == (("spark.executor.memory", "1g"),)
    opts = req.submit_options(extra_jars=[ppml_jar])
    assert _jars_of(opts) == [*req.jars, str(ppml_jar)]
    assert "spark.jars=u3.jar" not in opts  # one --jars carries them all
    # Without ppml's jar the user's are passed unchanged; without any, no --jars at all.
    assert _jars_of(req.submit_options()) == list(req.jars)
    assert _jars_of(parse_submit_args([str(app)]).submit_options()) == []
    assert _jars_of(parse_submit_args([str(app)]).submit_options([ppml_jar])) == [str(ppml_jar)]


def test_ppml_jar_is_added_only_when_it_exists(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import ppml.engines.spark.jvm as jvm

    jar = tmp_path / "jars" / "ppml-spark.jar"
    monkeypatch.setattr(jvm, "kms_client_jar", lambda: jar)
    assert ppml_jars() == []
    jar.parent.mkdir()
    jar.write_bytes(b"PK\x05\x06" + bytes(18))
    assert ppml_jars() == [jar]


class _FakeWorkspace:
    def __init__(self, root: Path) -> None:
        self.keystore = root / "keystore.p12"
        self.truststore = root / "truststore.p12"

    def secret(self, name: str) -> str:
        return {"spark-auth-secret": "auth-s3cret", "keystore-password": "ks-s3cret"}[name]


def test_security_properties_turn_tls_on_for_rpc(tmp_path: Path) -> None:
    ws = _FakeWorkspace(tmp_path)
    ws.keystore.write_bytes(b"k")
    ws.truststore.write_bytes(b"t")
    props = security_properties(cast(Any, ws))
    assert props["spark.authenticate"] == "true"
    assert props["spark.authenticate.secret"] == "auth-s3cret"
    assert props["spark.ssl.enabled"] == props["spark.ssl.rpc.enabled"] == "true"
    assert props["spark.ssl.protocol"] == "TLSv1.3"
    # RPC inherits the stores from spark.ssl.*; Spark reads them with the JVM's default
    # key store type (PKCS12), and PEM settings would switch it to another code path.
    assert props["spark.ssl.keyStore"] == str(ws.keystore)
    assert props["spark.ssl.trustStore"] == str(ws.truststore)
    assert not any(k.startswith("spark.ssl.rpc.") and k != "spark.ssl.rpc.enabled" for k in props)
    assert props["spark.network.crypto.saslFallback"] == "false"
    assert props["spark.io.encryption.enabled"] == "true"


def test_security_properties_need_both_stores(tmp_path: Path) -> None:
    ws = _FakeWorkspace(tmp_path)
    ws.keystore.write_bytes(b"k")
    # Spark's RPC TLS trusts every certificate when its truststore is missing: refuse instead.
    with pytest.raises(ConfigurationError, match="key store"):
        security_properties(cast(Any, ws))


def test_spark_processes_never_inherit_ppml_or_spark_secrets() -> None:
    withheld = launcher._WITHHELD_ENV
    assert {"PPML_PASSPHRASE", "_SPARK_AUTH_SECRET", "_SPARK_SSL_RPC_KEY_STORE_PASSWORD"} <= (
        withheld
    )


def test_conf_dirs_of_killed_launchers_are_swept(tmp_path: Path) -> None:
    import subprocess
    import sys

    runs = tmp_path / "runs"
    runs.mkdir()
    # A launcher that died: its recorded owner process no longer exists.
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    dead = runs / "ppml-spark-dead"
    dead.mkdir()
    (dead / "owner").write_text(f"{child.pid}:1")
    (dead / "spark-defaults.conf").write_text("spark.authenticate.secret=s3cret\n")
    # A recorded pid that now belongs to another process (start time differs): stale too.
    reused = runs / "ppml-spark-reused"
    reused.mkdir()
    (reused / "owner").write_text(f"{os.getpid()}:0")
    # One with no owner record (being created right now by another launcher): kept.
    fresh = runs / "ppml-spark-fresh"
    fresh.mkdir()
    with launcher.private_conf_dir({"spark.x": "1"}, parent=runs) as live:
        assert not dead.exists() and not reused.exists()
        assert fresh.exists()
        # The live directory records this process, so a concurrent launcher keeps it.
        assert launcher.sweep_stale_conf_dirs(runs) == []
        assert live.exists()
        assert (live / "owner").read_text().startswith(f"{os.getpid()}:")
    assert not live.exists()


def test_decrypt_among_sparks_options_is_ppmls_and_never_passed_on(tmp_path: Path) -> None:
    """``--decrypt`` may stand among spark-submit's options (after ``--conf``); it is collected
    for the attested driver and never reaches spark-submit."""
    from ppml.engines.spark.attested import jvm_driver_request, jvm_main_class

    jar = tmp_path / "app.jar"
    jar.write_bytes(b"PK\x05\x06" + bytes(18))  # an empty zip
    args = ["--conf", "spark.executor.memory=1g", "--decrypt", "a.parquet", "--class", "x.Main",
            "--decrypt=b", str(jar), "arg"]  # fmt: skip
    req = parse_submit_args(args)
    assert req.decrypt == ("a.parquet", "b")
    assert "--decrypt" not in req.submit_options()
    assert jvm_main_class(req) == "x.Main"
    driver = jvm_driver_request(req)
    options = driver.submit_options(extra_jars=[tmp_path / "ppml-spark.jar"])
    assert "--class" not in options and "x.Main" not in options
    assert _jars_of(options) == [str(jar.absolute()), str(tmp_path / "ppml-spark.jar")]
    assert driver.app_args == ("arg",)


def test_a_local_or_loopback_master_binds_the_driver_to_loopback() -> None:
    from ppml.engines.spark.launcher import local_ip_for

    for master in ("local[*]", "local", "spark://127.0.0.1:7077", "spark://localhost:7077"):
        assert local_ip_for(master) == "127.0.0.1", master
    assert local_ip_for("spark://10.0.0.5:7077") is None
    assert local_ip_for("k8s://https://10.0.0.1:6443") is None


def test_the_conf_dir_holds_ppmls_driver_logging(tmp_path: Path) -> None:
    """log4j2.xml beside spark-defaults.conf: warnings and up, without the warnings that
    describe ppml's own choices; private like the rest."""
    import stat
    import xml.etree.ElementTree as ET

    from ppml.engines.spark.launcher import private_conf_dir

    with private_conf_dir({"spark.app.name": "x"}, parent=tmp_path) as conf:
        config = ET.parse(conf / "log4j2.xml").getroot()
        assert stat.S_IMODE((conf / "log4j2.xml").stat().st_mode) == 0o600
    root = config.find("Loggers/Root")
    assert root is not None and root.get("level") == "warn"
    denied = [f.get("regex", "") for f in config.iter("RegexFilter") if f.get("onMatch") == "DENY"]
    assert any("Network encryption disabled" in r for r in denied)
    quiet = {e.get("name"): e.get("level") for e in config.iter("Logger")}
    assert quiet == {"org.apache.hadoop.util.NativeCodeLoader": "error"}


def test_decrypt_names_files_and_directories_never_links(tmp_path: Path) -> None:
    """What --decrypt releases keys for: a named file, the data files below a named
    directory; a link is refused as a path and left out below a directory (one the
    application planted for a later run would name a file the measurement does not)."""
    from ppml.engines.spark.jvm_app import decrypt_files
    from ppml.errors import InputNotFound, UsageError

    outside = tmp_path / "outside.parquet"
    outside.write_bytes(b"x")
    d = tmp_path / "in"
    (d / "sub").mkdir(parents=True)
    (d / "a.parquet").write_bytes(b"x")
    (d / "sub" / "b.parquet").write_bytes(b"x")
    (d / "_SUCCESS").write_bytes(b"")
    (d / ".hidden").write_bytes(b"")
    (d / "planted.parquet").symlink_to(outside)
    (d / "planted-dir").symlink_to(tmp_path)
    assert decrypt_files([d]) == [d / "a.parquet", d / "sub" / "b.parquet"]
    assert decrypt_files([outside, d / "a.parquet"]) == [outside, d / "a.parquet"]
    with pytest.raises(UsageError, match="symbolic link"):
        decrypt_files([d / "planted.parquet"])
    with pytest.raises(InputNotFound):
        decrypt_files([tmp_path / "missing.parquet"])


def test_jobs_on_the_workspaces_cluster_get_executors_a_worker_can_hold(
    app: Path, tmp_path: Path
) -> None:
    """`cluster up --memory 512m` and a job naming only `--master`: the executors ask for what a
    worker offers (Spark's 1g default would wait forever); a job's own setting wins; another
    master, or no cluster, gets nothing."""
    import json

    from ppml.engines.spark.launcher import CLUSTER_STATE, ClusterState, executor_defaults

    url = "spark://127.0.0.1:7077"
    state = ClusterState(url, 7077, 1, "m.log", ((2, "w.log"),), "conf", worker_memory="512m")
    assert executor_defaults(parse_submit_args(["--master", url, str(app)]), tmp_path) == {}
    (tmp_path / CLUSTER_STATE).write_text(json.dumps(state.to_dict()))
    on_cluster = parse_submit_args(["--master", url, str(app)])
    assert executor_defaults(on_cluster, tmp_path) == {"spark.executor.memory": "512m"}
    for own in (["--executor-memory", "256m"], ["--conf", "spark.executor.memory=2g"]):
        req = parse_submit_args(["--master", url, *own, str(app)])
        assert executor_defaults(req, tmp_path) == {}
    elsewhere = parse_submit_args(["--master", "spark://10.0.0.5:7077", str(app)])
    assert executor_defaults(elsewhere, tmp_path) == {}
    assert executor_defaults(parse_submit_args([str(app)]), tmp_path) == {}


def test_a_session_ppmlcontext_starts_gets_the_quiet_driver(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """PPMLContext in the user's own Python: ppml's driver logging, no progress bar off a
    terminal, a local master's driver on loopback; what the builder already says wins."""
    from ppml.engines.spark import context
    from ppml.engines.spark.launcher import driver_log4j2

    class Builder:
        def __init__(self, **options: str) -> None:
            self._options = dict(options)

        def config(self, key: str, value: str) -> Builder:
            self._options[key] = value
            return self

    monkeypatch.delenv("SPARK_LOCAL_IP", raising=False)
    monkeypatch.setattr("sys.stderr.isatty", lambda: False)
    quiet = context._quiet_driver(Builder())._options
    assert quiet["spark.driver.extraJavaOptions"] == f"-Dlog4j2.configurationFile={driver_log4j2()}"
    assert driver_log4j2().is_file()
    assert quiet["spark.ui.showConsoleProgress"] == "false"
    assert os.environ["SPARK_LOCAL_IP"] == "127.0.0.1"
    monkeypatch.delenv("SPARK_LOCAL_IP")
    own = Builder(**{"spark.driver.extraJavaOptions": "-Xss4m", "spark.master": "spark://h:7077"})
    kept = context._quiet_driver(own)._options
    assert kept["spark.driver.extraJavaOptions"] == "-Xss4m"
    assert "SPARK_LOCAL_IP" not in os.environ
