"""`ppml spark cluster up|status|down` and jobs on it: a master and a worker on 127.0.0.1 with
authentication and RPC encryption; the Pi example runs on it; a job holding another workspace's
secret is refused; no secret is on any command line."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from cli_support import PASSPHRASE, run_ppml

from ppml.workspace import Workspace

pytest.importorskip("pyspark")

pytestmark = [pytest.mark.spark_cluster, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
PI = ROOT / "examples" / "spark" / "pi.py"
# The worker offers 1g; executors must fit in it.
EXECUTOR_CONF = ("--conf", "spark.executor.memory=512m", "--conf", "spark.cores.max=2")


def _env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PPML_")}
    env.update({"PPML_HOME": str(home), "PPML_PASSPHRASE": PASSPHRASE})
    return env


@pytest.fixture(scope="module")
def ws(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("cluster") / "ws"
    assert run_ppml("init", "--dev", "--dir", d).code == 0
    return d


@pytest.fixture(scope="module")
def cluster(ws: Path) -> Iterator[str]:
    r = run_ppml(
        "spark", "cluster", "up", "--workers", "1", "--cores", "2", "--memory", "1g", home=ws
    )
    assert r.code == 0, r.err
    url = r.out.strip().splitlines()[-1]
    assert re.fullmatch(r"spark://127\.0\.0\.1:\d+", url)
    try:
        yield url
    finally:
        down = run_ppml("spark", "cluster", "down", home=ws)
        assert down.code == 0, down.err
        assert "stopped 2 process(es)" in down.out


def test_status_shows_the_recorded_processes(ws: Path, cluster: str) -> None:
    r = run_ppml("spark", "cluster", "status", "--format", "json", home=ws)
    assert r.code == 0, r.err
    info = json.loads(r.out)
    assert info["master_url"] == cluster
    assert info["master"]["alive"] and [w["alive"] for w in info["workers"]] == [True]
    state = ws / "spark" / "cluster.json"
    assert oct(state.stat().st_mode & 0o777) == "0o600"
    text = run_ppml("spark", "cluster", "status", home=ws)
    assert cluster in text.out and "up" in text.out


def test_pi_runs_on_the_cluster_without_secrets_on_command_lines(ws: Path, cluster: str) -> None:
    opened = Workspace.open(ws, PASSPHRASE.encode())
    secrets = [opened.secret("spark-auth-secret"), opened.secret("keystore-password")]
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "ppml",
            "spark-submit",
            "--master",
            cluster,
            *EXECUTOR_CONF,
            str(PI),
            "2",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
        env=_env(ws),
    )
    snapshots: list[str] = []
    done = threading.Event()

    def poll() -> None:
        while not done.is_set():
            snapshots.append(
                subprocess.run(
                    ["ps", "-ww", "-eo", "args"], capture_output=True, text=True, check=False
                ).stdout
            )
            done.wait(0.2)

    watcher = threading.Thread(target=poll, daemon=True)
    watcher.start()
    try:
        out, err = proc.communicate(timeout=180)
    finally:
        done.set()
        watcher.join()
    assert proc.returncode == 0, err[-3000:]
    assert re.search(r"^Pi is roughly 3\.1\d*$", out, re.MULTILINE), out
    lines = [line for snap in snapshots for line in snap.splitlines()]
    assert any("CoarseGrainedExecutorBackend" in line for line in lines)  # a real executor
    logs = [
        p.read_text(errors="replace")
        for p in (ws / "spark").rglob("*")
        if p.is_file()
        and p.suffix != ".conf"
        and p.name != "cluster.json"
        and "conf" not in p.parts
    ]
    for s in secrets:
        assert all(s not in snap for snap in snapshots)
        assert s not in out and s not in err
        assert all(s not in text for text in logs)


def test_a_job_with_another_secret_is_refused(tmp_path: Path, ws: Path, cluster: str) -> None:
    other = tmp_path / "other"
    assert run_ppml("init", "--dev", "--dir", other).code == 0
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "ppml",
            "spark-submit",
            "--master",
            cluster,
            *EXECUTOR_CONF,
            str(PI),
            "2",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
        env=_env(other),
        start_new_session=True,
    )
    refused = threading.Event()

    def scan() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            if "Authentication failed" in line:
                refused.set()

    with proc:
        reader = threading.Thread(target=scan, daemon=True)
        reader.start()
        try:
            # The master refuses the connection at once; the driver would retry for a minute.
            assert refused.wait(120), "the master did not refuse the job"
        finally:
            if proc.poll() is None:  # SIGTERM lets ppml remove its private configuration
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)
            reader.join(timeout=30)
        assert proc.stdout is not None
        assert "Pi is roughly" not in proc.stdout.read()
