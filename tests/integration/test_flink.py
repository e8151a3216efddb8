"""`ppml flink cluster up|status|down` and `ppml flink run`: real Flink, real TLS, real keys.

One cluster (a JobManager and two TaskManagers on 127.0.0.1) serves the module. Proven here on
real sockets: every port the cluster listens on is loopback and speaks only mutual TLS (a
plaintext peer, a peer without a certificate, one with another workspace's certificate and one
with a certificate the same CA issued for something else are all refused; REST refuses TLS 1.2);
jobs read encrypted files and write encrypted parts, locally and on the cluster, with results
equal to Python's; a tampered input fails the job with no output; no password, relay token,
passphrase or data key shows in argv, in a process environment, in the logs or over REST; no
Beam worker runs (Python operators run in the TaskManager's JVM).
"""

from __future__ import annotations

import collections
import contextlib
import datetime as dt
import json
import os
import re
import shutil
import socket
import ssl
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest
from cli_support import PASSPHRASE, run_ppml
from cryptography.hazmat.primitives import serialization

pytestmark = [pytest.mark.flink, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
WORDCOUNT = ROOT / "examples" / "flink" / "wordcount.py"
TRANSACTIONS = ROOT / "examples" / "flink" / "transactions.py"
SCORING = ROOT / "examples" / "flink" / "scoring.py"
WINDOW_MS = 10_000
FLINK_PYTHON = os.environ.get("PPML_FLINK_PYTHON")
if not FLINK_PYTHON:
    pytest.skip(
        "no Flink environment: scripts/test.sh makes one and sets PPML_FLINK_PYTHON",
        allow_module_level=True,
    )
JOB_TIMEOUT = 600
TEXTS = {
    "a.txt": "the quick brown fox\njumps over the lazy dog\n",
    "b.txt": "the dog sleeps\nthe fox runs\n" * 50,
    "c.txt": "zebra " * 1000 + "\n",
}


def _env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PPML_")}
    assert FLINK_PYTHON is not None
    env.update(
        {"PPML_HOME": str(home), "PPML_PASSPHRASE": PASSPHRASE, "PPML_FLINK_PYTHON": FLINK_PYTHON}
    )
    return env


def ppml(home: Path, *args: str | Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ppml", *map(str, args)],
        capture_output=True,
        text=True,
        env=_env(home),
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
        timeout=timeout,
        check=False,
    )


@dataclass
class Job:
    code: int
    out: str
    err: str
    ps: list[str] = field(default_factory=list)  # every process's argv, sampled while it ran
    environ: list[bytes] = field(default_factory=list)  # Flink processes' environments


def _parent(pid: int) -> int:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0
    return int(stat.rsplit(")", 1)[1].split()[1])


def _flink_pids(roots: set[int]) -> list[int]:
    """Flink's processes started by `roots` (the job's command, the cluster's processes) or
    below them: other processes on this machine are none of this test's business."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        ancestor, hops = pid, 0
        while ancestor > 1 and ancestor not in roots and hops < 64:
            ancestor, hops = _parent(ancestor), hops + 1
        if ancestor in roots:
            pids.append(pid)
    return pids


def _cluster_roots(home: Path) -> set[int]:
    from ppml.engines.flink.cluster import read_cluster_state

    state = read_cluster_state(home / "flink" / "cluster")
    if state is None:
        return set()
    return {state.jobmanager[0], *(pid for pid, _log in state.taskmanagers)}


def flink_start(home: Path, *args: str | Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "ppml", "flink", "run", *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
        env=_env(home),
        cwd=ROOT,
    )


def flink_run(home: Path, *args: str | Path) -> Job:
    """`ppml flink run ARGS` while a thread samples every command line and the environments of
    Flink's processes."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "ppml", "flink", "run", *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
        env=_env(home),
        cwd=ROOT,
    )
    job = Job(0, "", "")
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            job.ps.append(
                subprocess.run(
                    ["ps", "-ww", "-eo", "args"], capture_output=True, text=True, check=False
                ).stdout
            )
            # The job's processes and the cluster's: not `ppml` itself, whose environment is
            # the user's own (it holds PPML_PASSPHRASE here, as the user set it).
            cluster = _cluster_roots(home)
            for pid in _flink_pids({proc.pid, *cluster}):
                if pid == proc.pid:
                    continue
                with contextlib.suppress(OSError):
                    job.environ.append(Path(f"/proc/{pid}/environ").read_bytes())
            done.wait(0.5)

    watcher = threading.Thread(target=sample, daemon=True)
    watcher.start()
    try:
        job.out, job.err = proc.communicate(timeout=JOB_TIMEOUT)
    finally:
        done.set()
        watcher.join()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    job.code = proc.returncode
    return job


def decrypt_parts(home: Path, directory: Path) -> list[str]:
    """Every line of every visible part file under `directory`, decrypted by `ppml decrypt`."""
    lines: list[str] = []
    for part in sorted(directory.glob("part-*")):
        plain = part.with_name("." + part.name + ".plain")
        r = run_ppml("decrypt", part, "-o", plain, home=home)
        assert r.code == 0, r.err
        lines += plain.read_text().splitlines()
        plain.unlink()
    return lines


def expected_counts() -> dict[str, int]:
    counts: collections.Counter[str] = collections.Counter()
    for text in TEXTS.values():
        counts.update(text.split())
    return dict(counts)


def counts_of(lines: list[str]) -> dict[str, int]:
    pairs = [line.split("\t") for line in lines]
    result = {word: int(n) for word, n in pairs}
    assert len(result) == len(pairs), "a word was written twice"
    return result


@pytest.fixture(scope="module")
def ws(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("flink") / "ws"
    assert run_ppml("init", "--dev", "-w", d).code == 0
    for key in ("sales", "flink-output"):
        assert run_ppml("key", "create", key, home=d).code == 0
    return d


@pytest.fixture(scope="module")
def inputs(ws: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    plain = tmp_path_factory.mktemp("plain")
    enc = tmp_path_factory.mktemp("encrypted")
    for name, text in TEXTS.items():
        (plain / name).write_text(text)
        r = run_ppml("encrypt", plain / name, "-o", enc / f"{name}.enc", "--key", "sales", home=ws)
        assert r.code == 0, r.err
    return enc


@pytest.fixture(scope="module")
def cluster(ws: Path) -> Iterator[dict[str, object]]:
    up = ppml(
        ws, "flink", "cluster", "up", "--taskmanagers", "2", "--slots", "1", "--memory", "1280m"
    )
    assert up.returncode == 0, up.stderr
    try:
        status = ppml(ws, "flink", "cluster", "status", "--format", "json")
        assert status.returncode == 0, status.stderr
        yield json.loads(status.stdout)
    finally:
        down = ppml(ws, "flink", "cluster", "down")
        assert down.returncode == 0, down.stderr


# -- jobs ----------------------------------------------------------------------------------------


def test_wordcount_on_a_mini_cluster_equals_python(ws: Path, inputs: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    job = flink_run(ws, "--local", WORDCOUNT, inputs, out)
    assert job.code == 0, job.err
    assert counts_of(decrypt_parts(ws, out)) == expected_counts()
    assert not any(p.name.startswith(".") for p in out.iterdir()), "an in-progress part was left"


def test_wordcount_on_the_cluster_equals_python(
    ws: Path, inputs: Path, cluster: dict[str, object], tmp_path: Path
) -> None:
    out = tmp_path / "out"
    job = flink_run(ws, WORDCOUNT, inputs, out)
    assert job.code == 0, job.err
    assert "on the cluster" in job.err
    assert counts_of(decrypt_parts(ws, out)) == expected_counts()


PROBE = """\
import json, os, sys, tempfile
from pyflink.common import Types
from pyflink.datastream import StreamExecutionEnvironment
from pyflink.datastream.functions import MapFunction
from ppml.flink import write_encrypted_files


class Probe(MapFunction):
    def map(self, value):
        return json.dumps({"path": sys.path, "cwd": os.getcwd(), "tmp": tempfile.gettempdir()})


env = StreamExecutionEnvironment.get_execution_environment()
probe = env.from_collection(["x"], type_info=Types.STRING())
probe = probe.map(Probe(), output_type=Types.STRING())
write_encrypted_files(probe, sys.argv[1], key="sales")
env.execute("probe")
"""


def test_operators_import_only_from_flinks_environment_and_use_no_shared_tmp(
    ws: Path, cluster: dict[str, object], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The interpreter that runs the operators in a TaskManager has no working directory, user
    site or other environment on its path, and neither it nor Flink's client writes to the
    shared /tmp (a directory there, made by someone else first, could swap in code)."""
    flink_python = os.environ["PPML_FLINK_PYTHON"]
    prefixes = subprocess.run(
        [flink_python, "-c", "import sys; print(sys.prefix); print(sys.base_prefix)"],
        capture_output=True, text=True, check=True,
    ).stdout.split()  # fmt: skip
    allowed = (*prefixes, str(ROOT / "src"))
    shared = Path("/tmp/pyflink")
    before = set(shared.iterdir()) if shared.is_dir() else set()
    (tmp_path / "probe.py").write_text(PROBE)
    monkeypatch.chdir(tmp_path)
    job = flink_run(ws, tmp_path / "probe.py", tmp_path / "out")
    assert job.code == 0, job.err
    (seen,) = (json.loads(line) for line in decrypt_parts(ws, tmp_path / "out"))
    assert "" not in seen["path"] and "." not in seen["path"], seen["path"]
    for entry in seen["path"]:
        assert entry.startswith(allowed), f"{entry} is outside Flink's environment"
    assert not seen["cwd"].startswith(str(tmp_path))
    assert seen["tmp"].startswith(str(ws)), seen["tmp"]
    after = set(shared.iterdir()) if shared.is_dir() else set()
    assert after == before, "a run wrote into the shared /tmp/pyflink"
    config = (ws / "flink" / "cluster" / "conf" / "config.yaml").read_text()
    (checkpoints,) = re.findall(r"execution.checkpointing.dir: ?\"?file://([^\"\n]+)", config)
    if Path("/dev/shm").is_dir():
        assert checkpoints.startswith("/dev/shm/"), "checkpoints (operator state) on disk"
    assert os.stat(checkpoints).st_mode & 0o777 == 0o700


def test_links_in_an_input_directory_are_skipped(ws: Path, inputs: Path, tmp_path: Path) -> None:
    """A link planted among the inputs (to a file or a directory the job was not given) is
    not read, as ``ppml encrypt`` skips links."""
    src, other = tmp_path / "in", tmp_path / "elsewhere"
    shutil.copytree(inputs, src)
    other.mkdir()
    (other / "planted.txt").write_text("planted planted\n")
    r = run_ppml("encrypt", other / "planted.txt", "-o", other / "planted.txt.enc",
                 "--key", "sales", home=ws)  # fmt: skip
    assert r.code == 0, r.err
    (other / "planted.txt").unlink()
    (src / "zz-link.txt.enc").symlink_to(other / "planted.txt.enc")
    (src / "zz-dir").symlink_to(other)
    out = tmp_path / "out"
    job = flink_run(ws, "--local", WORDCOUNT, src, out)
    assert job.code == 0, job.err
    assert counts_of(decrypt_parts(ws, out)) == expected_counts()


def test_a_tampered_input_fails_the_job_with_no_output(
    ws: Path, inputs: Path, cluster: dict[str, object], tmp_path: Path
) -> None:
    bad = tmp_path / "in"
    bad.mkdir()
    for f in inputs.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    target = bad / "b.txt.enc"
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0x01
    target.write_bytes(bytes(data))
    out = tmp_path / "out"
    job = flink_run(ws, WORDCOUNT, bad, out)
    assert job.code != 0
    assert "integrity check failed" in job.out + job.err
    assert not list(out.glob("part-*")) if out.exists() else True


def test_plaintext_input_is_refused(ws: Path, tmp_path: Path) -> None:
    plain = tmp_path / "in"
    plain.mkdir()
    (plain / "a.txt").write_text("not encrypted\n")
    job = flink_run(ws, "--local", WORDCOUNT, plain, tmp_path / "out")
    assert job.code != 0
    assert "not a ppml-encrypted file" in job.out + job.err
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").glob("part-*"))


def test_a_missing_output_key_fails_the_job_in_one_line_naming_it(
    ws: Path, inputs: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    job = flink_run(ws, "--local", WORDCOUNT, inputs, out, "--key", "no-such-output")
    assert job.code != 0
    lines = [line for line in job.err.splitlines() if "no-such-output" in line]
    assert lines == [
        "ppml: key access error: no such key 'no-such-output': create it with "
        "`ppml key create no-such-output`"
    ], job.err
    assert "Traceback" not in job.err and "at org.apache" not in job.err, job.err
    assert not out.exists() or not list(out.iterdir())


def test_an_attested_job_refuses_a_flink_environment_the_sandbox_hides(tmp_path: Path) -> None:
    """An environment in ppml's state directory (where `ppml flink setup` once made it) is
    hidden from attested workloads: the job says so, not "No such file or directory"."""
    assert FLINK_PYTHON is not None
    state = tmp_path / "state"
    (state / "ppml").mkdir(parents=True)
    (state / "ppml" / "flink-venv").symlink_to(Path(FLINK_PYTHON).parents[1])
    home = tmp_path / "ws"
    env = {**_env(home), "XDG_STATE_HOME": str(state)}
    env["PPML_FLINK_PYTHON"] = str(state / "ppml" / "flink-venv" / "bin" / "python")

    def ppml_here(*args: str | Path) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "ppml", *map(str, args)],
            capture_output=True, text=True, env=env, cwd=ROOT, stdin=subprocess.DEVNULL,
            timeout=300, check=False,
        )  # fmt: skip

    assert ppml_here("init", "--dev", "-w", home).returncode == 0
    r = ppml_here("flink", "run", "--tee", "sim", "--local", WORDCOUNT, tmp_path, tmp_path / "o")
    assert r.returncode == 5, r.stderr
    assert "hidden from attested workloads" in r.stderr and "ppml flink setup" in r.stderr
    assert "No such file or directory" not in r.stderr


def test_a_job_without_a_cluster_or_with_bad_arguments_is_refused(ws: Path, tmp_path: Path) -> None:
    r = ppml(ws, "flink", "run", "--local", "--cluster", WORDCOUNT)
    assert r.returncode == 2 and "exclude each other" in r.stderr
    r = ppml(ws, "flink", "run", "--local", tmp_path / "missing.py")
    assert r.returncode == 2 and "no such job file" in r.stderr
    r = ppml(ws, "flink", "run", "--tee", "tdx", "--local", WORDCOUNT)
    assert r.returncode == 2 and "unsupported TEE backend" in r.stderr
    other = tmp_path / "ws2"
    assert run_ppml("init", "--dev", "-w", other).code == 0
    r = ppml(other, "flink", "run", "--measure", "--cluster", WORDCOUNT)
    assert r.returncode == 2 and "no Flink cluster is up" in r.stderr


def test_scoring_with_the_encrypted_model_equals_onnxruntime(
    ws: Path, cluster: dict[str, object], tmp_path: Path
) -> None:
    import numpy as np
    import onnxruntime
    from tests.support.serving_models import INPUT_DIM, mlp_onnx_bytes

    model = mlp_onnx_bytes(seed=5)
    (tmp_path / "model.onnx").write_bytes(model)
    r = run_ppml("encrypt", tmp_path / "model.onnx", "-o", tmp_path / "model.onnx.enc",
                 "--key", "sales", home=ws)  # fmt: skip
    assert r.code == 0, r.err
    (tmp_path / "model.onnx").unlink()
    rng = np.random.default_rng(11)
    features = rng.normal(size=(300, INPUT_DIM)).astype(np.float32)
    plain, enc = tmp_path / "records.jsonl", tmp_path / "in"
    enc.mkdir()
    plain.write_text("".join(
        json.dumps({"id": f"r{i}", "features": row.tolist()}) + "\n"
        for i, row in enumerate(features)
    ))  # fmt: skip
    r = run_ppml("encrypt", plain, "-o", enc / "records.jsonl.enc", "--key", "sales", home=ws)
    assert r.code == 0, r.err
    out = tmp_path / "out"
    job = flink_run(ws, SCORING, tmp_path / "model.onnx.enc", enc, out)
    assert job.code == 0, job.out + job.err
    got = {r["id"]: r["scores"] for r in map(json.loads, decrypt_parts(ws, out))}
    session = onnxruntime.InferenceSession(model)
    expected = session.run(None, {session.get_inputs()[0].name: features})[0]
    assert sorted(got) == sorted(f"r{i}" for i in range(len(features)))
    for i, row in enumerate(expected):
        np.testing.assert_allclose(got[f"r{i}"], row, rtol=1e-5, atol=1e-6)


PARQUET_JOB = """
import sys
from pyflink.datastream import StreamExecutionEnvironment
from ppml.flink import read_encrypted_parquet, write_encrypted_files

env = StreamExecutionEnvironment.get_execution_environment()
rows = read_encrypted_parquet(env, sys.argv[1], columns=["id", "city", "amount"])
write_encrypted_files(rows, sys.argv[2], key="flink-output", content="json")
env.execute("parquet")
"""


def test_encrypted_parquet_as_a_bounded_source(ws: Path, tmp_path: Path) -> None:
    import pyarrow as pa

    from ppml.data.parquet import write_parquet
    from ppml.workspace import Workspace

    table = pa.table({
        "id": list(range(500)),
        "city": [f"city-{i % 7}" for i in range(500)],
        "amount": [i * 1.5 for i in range(500)],
        "ssn": [f"000-00-{i:04d}" for i in range(500)],
    })  # fmt: skip
    data = tmp_path / "in"
    data.mkdir()
    keys = Workspace.open(ws, PASSPHRASE.encode()).key_service()
    try:
        for n in range(2):
            write_parquet(table.slice(n * 250, 250), data / f"part-{n}.parquet", keys,
                          key_name="sales", column_keys={"flink-output": ["ssn"]})  # fmt: skip
    finally:
        keys.close()
    job_file = tmp_path / "parquet_job.py"
    job_file.write_text(PARQUET_JOB)
    out = tmp_path / "out"
    job = flink_run(ws, "--local", job_file, data, out)
    assert job.code == 0, job.out + job.err
    rows = sorted((json.loads(line) for line in decrypt_parts(ws, out)), key=lambda r: r["id"])
    assert rows == table.select(["id", "city", "amount"]).to_pylist()


def test_a_watched_directory_is_read_as_files_arrive(
    ws: Path, inputs: Path, tmp_path: Path
) -> None:
    """`--watch`: files added while the job runs are counted; counts are reported as they
    change (the job runs until stopped)."""
    import signal
    import time

    watched, out = tmp_path / "watched", tmp_path / "out"
    watched.mkdir()
    proc = flink_start(ws, "--local", WORDCOUNT, watched, out, "--watch", "1", "--report", "1")
    try:
        for name in sorted(p.name for p in inputs.iterdir()):
            (watched / name).write_bytes((inputs / name).read_bytes())
        deadline = time.monotonic() + 240
        latest: dict[str, int] = {}
        while time.monotonic() < deadline and latest != expected_counts():
            time.sleep(3)
            if out.exists() and list(out.glob("part-*")):
                for word, n in (line.split("\t") for line in decrypt_parts(ws, out)):
                    latest[word] = max(latest.get(word, 0), int(n))
        assert latest == expected_counts()
        assert proc.poll() is None, "a watching job must keep running"
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()


def _live_jobs(ws: Path) -> list[dict[str, object]]:
    from ppml.engines.flink.cluster import read_cluster_state, rest_get

    d = ws / "flink" / "cluster"
    state = read_cluster_state(d)
    assert state is not None
    jobs = rest_get(d, state, "/jobs/overview")["jobs"]
    return [j for j in jobs if j["state"] in ("CREATED", "INITIALIZING", "RUNNING", "RESTARTING")]


def test_a_cluster_job_ends_with_its_run(
    ws: Path, inputs: Path, cluster: dict[str, object], tmp_path: Path
) -> None:
    """SIGTERM to `ppml flink run` of a job that never ends (`--watch`): the job is cancelled
    on the cluster, not left running (and checkpointing) without its run."""
    import signal
    import time

    assert not _live_jobs(ws)
    proc = flink_start(ws, WORDCOUNT, inputs, tmp_path / "out", "--watch", "1")
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and not _live_jobs(ws):
            assert proc.poll() is None, proc.communicate()
            time.sleep(1)
        assert _live_jobs(ws), "the job never started"
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    assert "cancelled the job on the cluster" in err, out + err
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and _live_jobs(ws):
        time.sleep(1)
    assert not _live_jobs(ws)


# -- secrets -------------------------------------------------------------------------------------


def _secrets(ws: Path, inputs: Path) -> dict[str, str]:
    """The values that must never show: the cluster's store password, the passphrase, and the
    data key of an input file (hex and base64)."""
    import base64

    from ppml.crypto.stream import read_header
    from ppml.workspace import Workspace

    stores = json.loads((ws / "flink" / "cluster" / "conf" / "store-password").read_text())
    opened = Workspace.open(ws, PASSPHRASE.encode())
    with open(inputs / "a.txt.enc", "rb") as fh:
        header, _ = read_header(fh)
    keys = opened.key_service()
    try:
        dek = keys.unwrap(header.wrapped)
    finally:
        keys.close()
    return {
        "store password": stores["password"],
        "passphrase": PASSPHRASE,
        "data key (hex)": dek.hex(),
        "data key (base64)": base64.b64encode(dek).decode(),
    }


def test_no_secret_in_argv_environment_logs_or_rest(
    ws: Path, inputs: Path, cluster: dict[str, object], tmp_path: Path
) -> None:
    from ppml.engines.flink.cluster import read_cluster_state, rest_get

    job = flink_run(ws, WORDCOUNT, inputs, tmp_path / "out")
    assert job.code == 0, job.err
    secrets = _secrets(ws, inputs)
    assert job.ps and job.environ, "the job's processes were not observed"
    cluster_dir = ws / "flink" / "cluster"
    logs = [p for p in (cluster_dir / "log").rglob("*") if p.is_file()]
    assert logs
    state = read_cluster_state(cluster_dir)
    assert state is not None
    jobs = rest_get(cluster_dir, state, "/jobs")["jobs"]
    rest = [json.dumps(rest_get(cluster_dir, state, "/jobmanager/config"))]
    for j in jobs:
        for path in ("", "/config", "/plan", "/exceptions"):
            rest.append(json.dumps(rest_get(cluster_dir, state, f"/jobs/{j['id']}{path}")))
    for tm in rest_get(cluster_dir, state, "/taskmanagers")["taskmanagers"]:
        rest.append(json.dumps(rest_get(cluster_dir, state, f"/taskmanagers/{tm['id']}")))
    places = {
        "argv": "\n".join(job.ps),
        "environment": b"\n".join(job.environ).decode(errors="replace"),
        "logs": "\n".join(p.read_text(errors="replace") for p in logs),
        "REST": "\n".join(rest),
        "command output": job.out + job.err,
    }
    for where, text in places.items():
        for name, value in secrets.items():
            assert value not in text, f"the {name} shows in {where}"
    # The relay's token is made per run: it must not show either (it is in no file after).
    assert "PPML_PASSPHRASE" not in places["environment"]


# -- TLS on real sockets -------------------------------------------------------------------------


def _listening_ports(pid: int) -> list[tuple[str, int]]:
    """(address, port) of the TCP sockets `pid` listens on (from /proc)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    found = []
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state == "0A" and inode in inodes:
                address, port = local.split(":")
                found.append((address, int(port, 16)))
    return found


def _cluster_ports(cluster: dict[str, object]) -> list[tuple[str, int]]:
    jm = cluster["jobmanager"]
    tms = cluster["taskmanagers"]
    assert isinstance(jm, dict) and isinstance(tms, list)
    ports = []
    for pid in [jm["pid"], *(tm["pid"] for tm in tms)]:
        ports += _listening_ports(int(pid))
    return ports


def test_every_cluster_port_is_loopback(cluster: dict[str, object]) -> None:
    ports = _cluster_ports(cluster)
    assert len(ports) >= 5  # RPC, blob, REST, and each TaskManager's RPC and data ports
    loopback = {"0100007F", "0000000000000000FFFF00000100007F"}  # 127.0.0.1, ::ffff:127.0.0.1
    for address, port in ports:
        assert address in loopback, f"port {port} listens on {address}, not 127.0.0.1"


def _handshake(port: int, context: ssl.SSLContext) -> str | None:
    """None if a TLS session with `context` is set up and survives a first read; else why not."""
    try:
        with (
            socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
            context.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
        ):
            tls.settimeout(2)
            try:
                if tls.recv(1) == b"":
                    return "closed"
            except TimeoutError:
                return None
            return None
    except (ssl.SSLError, ConnectionError, OSError) as exc:
        return type(exc).__name__


def _client_context(
    cert_pem: bytes | None, key_pem: bytes | None, ca_pem: bytes, tls12: bool = False
) -> ssl.SSLContext:
    from ppml._internal.fs import memory_files

    context = ssl.create_default_context(cadata=ca_pem.decode())
    context.check_hostname = False
    if tls12:
        context.maximum_version = ssl.TLSVersion.TLSv1_2
    if cert_pem is not None and key_pem is not None:
        with memory_files(cert_pem, key_pem) as (cert_file, key_file):
            context.load_cert_chain(cert_file, key_file)
    return context


def _foreign_identity(tmp: Path) -> tuple[bytes, bytes, bytes]:
    """A certificate with both TLS usages from another workspace's CA: (cert, key, that CA)."""
    from ppml.workspace import Workspace, pki

    other = tmp / "other-ws"
    assert run_ppml("init", "--dev", "-w", other).code == 0
    ca = Workspace.open(other, PASSPHRASE.encode()).certificate_authority()
    node = pki.issue_flink(ca, "node", ["127.0.0.1"], dt.datetime.now(dt.UTC))
    return (
        node.cert.public_bytes(serialization.Encoding.PEM),
        pki.private_key_pem(node.key),
        ca.cert.public_bytes(serialization.Encoding.PEM),
    )


def _same_ca_other_cert(ws: Path) -> tuple[bytes, bytes, bytes]:
    """A serving client certificate of this very workspace (same CA, not this cluster's)."""
    from ppml.workspace import Workspace, pki

    ca = Workspace.open(ws, PASSPHRASE.encode()).certificate_authority()
    now = dt.datetime.now(dt.UTC)
    client = pki.issue_serving_client(ca, "someone", now, dt.timedelta(days=1))
    return (
        client.cert.public_bytes(serialization.Encoding.PEM),
        pki.private_key_pem(client.key),
        ca.cert.public_bytes(serialization.Encoding.PEM),
    )


def _cluster_client(ws: Path) -> tuple[bytes, bytes, bytes]:
    from cryptography.hazmat.primitives.serialization import pkcs12

    from ppml.engines.flink.config import ClusterSecurity

    security = ClusterSecurity.load(ws / "flink" / "cluster" / "conf")
    store = pkcs12.load_pkcs12(security.client_store.read_bytes(), security.password.encode())
    assert store.key is not None and store.cert is not None
    key = store.key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    ca = b"".join(
        c.certificate.public_bytes(serialization.Encoding.PEM) for c in store.additional_certs
    )
    return store.cert.certificate.public_bytes(serialization.Encoding.PEM), key, ca


def test_every_port_refuses_plaintext_and_foreign_or_missing_certificates(
    ws: Path, cluster: dict[str, object], tmp_path: Path
) -> None:
    foreign_cert, foreign_key, foreign_ca = _foreign_identity(tmp_path)
    other_cert, other_key, ca = _same_ca_other_cert(ws)
    for _address, port in _cluster_ports(cluster):
        # Plain text: the server answers no HTTP and holds no session.
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
            raw.sendall(b"GET /overview HTTP/1.1\r\nHost: x\r\n\r\n")
            raw.settimeout(5)
            try:
                reply = raw.recv(4096)
            except (TimeoutError, ConnectionError):
                reply = b""
            assert b"taskmanagers" not in reply and b"200 OK" not in reply, port
        # No client certificate; another workspace's; this CA's but not this cluster's.
        for name, context in {
            "no certificate": _client_context(None, None, ca),
            "another workspace": _client_context(foreign_cert, foreign_key, ca + foreign_ca),
            "same CA, not the cluster's": _client_context(other_cert, other_key, ca),
        }.items():
            assert _handshake(port, context) is not None, f"port {port} accepted {name}"


def test_rest_needs_the_cluster_client_certificate_and_tls13(
    ws: Path, cluster: dict[str, object]
) -> None:
    url = str(cluster["rest_url"])
    port = int(url.rsplit(":", 1)[1])
    cert, key, ca = _cluster_client(ws)
    assert _handshake(port, _client_context(cert, key, ca)) is None
    assert _handshake(port, _client_context(cert, key, ca, tls12=True)) is not None
    overview = cluster["overview"]
    assert isinstance(overview, dict) and overview["taskmanagers"] == 2


def test_no_beam_worker_runs_the_operators(
    ws: Path, inputs: Path, cluster: dict[str, object], tmp_path: Path
) -> None:
    job = flink_run(ws, WORDCOUNT, inputs, tmp_path / "out")
    assert job.code == 0, job.err
    seen = "\n".join(job.ps)
    assert "beam_boot" not in seen and "fn_execution.beam" not in seen
    assert "pyflink-udf-runner" not in seen


def test_status_and_down(ws: Path, tmp_path: Path) -> None:
    other = tmp_path / "ws2"
    assert run_ppml("init", "--dev", "-w", other).code == 0
    r = ppml(other, "flink", "cluster", "status")
    assert r.returncode == 1 and "no cluster" in r.stdout
    r = ppml(other, "flink", "cluster", "down")
    assert r.returncode == 0 and "stopped 0" in r.stdout


# -- attested jobs ------------------------------------------------------------------------------


def _allow(ws: Path, *args: str | Path, keys: tuple[str, ...] = ("sales", "flink-output")) -> str:
    """Let the attested job `args` (as `ppml flink run` takes them) have `keys`."""
    first = ppml(ws, "flink", "run", "--measure", *args)
    again = ppml(ws, "flink", "run", "--measure", *args)
    assert first.returncode == 0, first.stderr
    measurement = first.stdout.splitlines()[0]
    assert again.stdout.splitlines()[0] == measurement, "the measurement is not stable"
    assert "covers Flink 2.3" in first.stderr
    for key in keys:
        r = run_ppml("policy", "allow", key, "--tee", "sim", "--measurement", measurement, home=ws)
        assert r.code == 0, r.err
    return measurement


@pytest.mark.parametrize("where", ["--local", "--cluster"])
def test_an_attested_job_gets_its_keys_by_policy(
    ws: Path, inputs: Path, cluster: dict[str, object], tmp_path: Path, where: str
) -> None:
    out = tmp_path / "out"
    _allow(ws, where, WORDCOUNT, inputs, out)
    job = flink_run(ws, "--tee", "sim", "--data", inputs, "--data", tmp_path, where,
                    WORDCOUNT, inputs, out)  # fmt: skip
    assert job.code == 0, job.out + job.err
    assert "SIMULATED TEE" in job.err
    assert counts_of(decrypt_parts(ws, out)) == expected_counts()
    if where == "--cluster":
        status = json.loads(ppml(ws, "flink", "cluster", "status", "--format", "json").stdout)
        assert status["overview"]["jobs-finished"] >= 1


def test_attested_scoring_on_the_cluster(
    ws: Path, cluster: dict[str, object], tmp_path: Path
) -> None:
    """The seed's distributed model inference: the model's key too is released by policy only
    (the model and the records are under `sales`, the output under `flink-output`)."""
    import numpy as np
    from tests.support.serving_models import INPUT_DIM, mlp_onnx_bytes, mlp_reference

    (tmp_path / "model.onnx").write_bytes(mlp_onnx_bytes(seed=6))
    assert run_ppml("encrypt", tmp_path / "model.onnx", "-o", tmp_path / "model.onnx.enc",
                    "--key", "sales", home=ws).code == 0  # fmt: skip
    features = np.random.default_rng(12).normal(size=(50, INPUT_DIM)).astype(np.float32)
    (tmp_path / "r.jsonl").write_text("".join(
        json.dumps({"id": f"r{i}", "features": row.tolist()}) + "\n"
        for i, row in enumerate(features)
    ))  # fmt: skip
    (tmp_path / "in").mkdir()
    assert run_ppml("encrypt", tmp_path / "r.jsonl", "-o", tmp_path / "in" / "r.jsonl.enc",
                    "--key", "sales", home=ws).code == 0  # fmt: skip
    args = ("--cluster", SCORING, tmp_path / "model.onnx.enc", tmp_path / "in", tmp_path / "out")
    _allow(ws, *args)
    job = flink_run(ws, "--tee", "sim", "--data", tmp_path, *args)
    assert job.code == 0, job.out + job.err
    got = {r["id"]: r["scores"] for r in map(json.loads, decrypt_parts(ws, tmp_path / "out"))}
    expected = mlp_reference(features, seed=6)
    for i, row in enumerate(expected):
        np.testing.assert_allclose(got[f"r{i}"], row, rtol=1e-5, atol=1e-5)


def test_an_attested_job_changed_by_one_byte_gets_no_key(
    ws: Path, inputs: Path, tmp_path: Path
) -> None:
    job_file = tmp_path / "wordcount.py"
    job_file.write_bytes(WORDCOUNT.read_bytes())
    out = tmp_path / "out"
    _allow(ws, "--local", job_file, inputs, out)
    job_file.write_bytes(WORDCOUNT.read_bytes() + b"\n")
    job = flink_run(ws, "--tee", "sim", "--data", inputs, "--data", tmp_path, "--local",
                    job_file, inputs, out)  # fmt: skip
    assert job.code != 0
    assert "access denied" in job.out + job.err
    assert not out.exists() or not list(out.glob("part-*"))


# -- sealed Redis streams, event time, a TaskManager killed --------------------------------------


@dataclass
class Stream:
    """The workspace's TLS Redis and the files a job needs to read a sealed stream from it."""

    port: int
    ca: Path
    password_file: Path  # ppml-encrypted
    payload_key_file: Path  # ppml-encrypted

    def args(self, stream: str, *more: str) -> list[str]:
        return [
            "--stream", stream, "--deployment", "cards",
            "--payload-key-file", str(self.payload_key_file),
            "--redis-port", str(self.port), "--redis-ca", str(self.ca),
            "--redis-password-file", str(self.password_file), *more,
        ]  # fmt: skip

    def target(self, stream: str) -> object:
        from ppml.flink import RedisStream

        return RedisStream(
            stream=stream,
            deployment="cards",
            payload_key_file=self.payload_key_file,
            port=self.port,
            ca=self.ca,
            password_file=self.password_file,
        )


@pytest.fixture(scope="module")
def redis(ws: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stream]:
    import redis_support

    from ppml.serving.redis_server import redis_password, start_redis
    from ppml.workspace import Workspace

    redis_support.require_redis_server()
    opened = Workspace.open(ws, PASSPHRASE.encode())
    server = start_redis(opened)
    files = tmp_path_factory.mktemp("stream-secrets")
    try:
        for name, secret in (
            ("password", redis_password(opened).encode()),
            ("payload-key", os.urandom(32)),
        ):
            plain = files / name
            plain.write_bytes(secret)
            plain.chmod(0o600)
            r = run_ppml("encrypt", plain, "-o", files / f"{name}.enc", "--key", "sales", home=ws)
            assert r.code == 0, r.err
            plain.unlink()
        yield Stream(server.port, opened.ca_cert, files / "password.enc", files / "payload-key.enc")
    finally:
        server.stop()


def produce(ws: Path, redis: Stream, stream: str, n: int, seed: int) -> dict[str, list[int]]:
    """Append `n` sealed transactions; the per-card, per-window counts and totals they make."""
    import random

    from ppml.flink import append_records
    from ppml.workspace import Workspace

    rnd = random.Random(seed)
    records = [
        {"card": f"card-{rnd.randrange(7)}", "amount_cents": rnd.randrange(1, 100_000),
         "ts": 1_700_000_000_000 + i * 97 + rnd.randrange(0, 500)}
        for i in range(n)
    ]  # fmt: skip
    keys = Workspace.open(ws, PASSPHRASE.encode()).key_service()
    try:
        assert append_records(redis.target(stream), keys, map(json.dumps, records)) == n
    finally:
        keys.close()
    expected: dict[str, list[int]] = {}
    for r in records:
        start = r["ts"] // WINDOW_MS * WINDOW_MS
        count, total = expected.get(f"{r['card']}|{start}", [0, 0])
        expected[f"{r['card']}|{start}"] = [count + 1, total + r["amount_cents"]]
    return expected


def window_totals(ws: Path, out: Path) -> dict[str, list[int]]:
    got: dict[str, list[int]] = {}
    for line in decrypt_parts(ws, out):
        r = json.loads(line)
        key = f"{r['card']}|{r['window_start']}"
        assert key not in got, f"window {key} written twice"
        assert r["window_end"] - r["window_start"] == WINDOW_MS
        got[key] = [r["count"], r["total_cents"]]
    return got


def test_transactions_from_a_sealed_stream_on_a_mini_cluster(
    ws: Path, redis: Stream, tmp_path: Path
) -> None:
    expected = produce(ws, redis, "tx-local", 3000, seed=1)
    out = tmp_path / "out"
    job = flink_run(ws, "--local", TRANSACTIONS, out, *redis.args("tx-local", "--seconds", "5"))
    assert job.code == 0, job.err
    assert window_totals(ws, out) == expected


def test_attested_transactions_on_the_cluster(
    ws: Path, redis: Stream, cluster: dict[str, object], tmp_path: Path
) -> None:
    """Event-time windows from the sealed stream under ``--tee sim`` on the cluster: the Redis
    password, the payload key and the output key reach the operators only through the attested
    job's relay, released by policy."""
    expected = produce(ws, redis, "tx-tee", 1000, seed=5)
    shutil.copy(redis.ca, tmp_path / "ca.pem")
    stream = replace(redis, ca=tmp_path / "ca.pem")
    out = tmp_path / "out"
    args = ("--cluster", TRANSACTIONS, out, *stream.args("tx-tee", "--seconds", "5"))
    _allow(ws, *args)
    job = flink_run(ws, "--tee", "sim", "--data", tmp_path, "--data",
                    redis.payload_key_file.parent, *args)  # fmt: skip
    assert job.code == 0, job.out + job.err
    assert "SIMULATED TEE" in job.err
    assert window_totals(ws, out) == expected


def test_totals_sealed_into_an_output_stream(ws: Path, redis: Stream, tmp_path: Path) -> None:
    """The Redis sink: every window's totals, sealed, appended to the output stream (at least
    once: a run without failures writes each exactly once)."""
    from ppml.flink import read_records
    from ppml.workspace import Workspace

    expected = produce(ws, redis, "tx-in", 1000, seed=4)
    out = tmp_path / "out"
    args = redis.args("tx-in", "--seconds", "4", "--out-stream", "tx-totals")
    job = flink_run(ws, "--local", TRANSACTIONS, out, *args)
    assert job.code == 0, job.err
    keys = Workspace.open(ws, PASSPHRASE.encode()).key_service()
    try:
        target = redis.target("tx-totals")
        rows = [json.loads(t) for t in read_records(target, keys)]  # type: ignore[arg-type]
    finally:
        keys.close()
    got = {f"{r['card']}|{r['window_start']}": [r["count"], r["total_cents"]] for r in rows}
    assert len(rows) == len(got) and got == expected


def test_an_altered_stream_record_fails_the_job_with_no_output(
    ws: Path, redis: Stream, tmp_path: Path
) -> None:
    from ppml.serving.redis_server import redis_password
    from ppml.workspace import Workspace

    produce(ws, redis, "tx-bad", 50, seed=2)
    import redis as redis_py

    opened = Workspace.open(ws, PASSPHRASE.encode())
    client = redis_py.Redis(
        host="127.0.0.1", port=redis.port, password=redis_password(opened), ssl=True,
        ssl_ca_certs=str(redis.ca), ssl_cert_reqs="required",
    )  # fmt: skip
    _entry_id, fields = client.xrange("tx-bad", count=1)[0]
    payload = bytearray(fields[b"payload"])
    payload[-1] ^= 1
    client.xadd("tx-bad", {"id": fields[b"id"], "payload": bytes(payload)})
    client.close()
    out = tmp_path / "out"
    job = flink_run(ws, "--local", TRANSACTIONS, out, *redis.args("tx-bad", "--seconds", "4"))
    assert job.code != 0
    assert "integrity check failed" in job.out + job.err
    assert not out.exists() or not list(out.glob("part-*"))


def _job_id(cluster_dir: Path) -> str:
    from ppml.engines.flink.cluster import read_cluster_state, rest_get

    state = read_cluster_state(cluster_dir)
    assert state is not None
    for _ in range(600):
        running = [
            j for j in rest_get(cluster_dir, state, "/jobs")["jobs"] if j["status"] == "RUNNING"
        ]
        if running:
            return str(running[0]["id"])
        threading.Event().wait(0.2)
    raise AssertionError("the job did not start")


def _completed_checkpoints(cluster_dir: Path, job_id: str) -> int:
    from ppml.engines.flink.cluster import read_cluster_state, rest_get

    state = read_cluster_state(cluster_dir)
    assert state is not None
    counts = rest_get(cluster_dir, state, f"/jobs/{job_id}/checkpoints")["counts"]
    return int(counts["completed"])


def test_a_taskmanager_killed_mid_stream_loses_and_repeats_nothing(
    ws: Path, redis: Stream, cluster: dict[str, object], tmp_path: Path
) -> None:
    """Exactly once from the sealed stream to the encrypted files: the TaskManager running the
    job is killed after a checkpoint; the job restarts on the other from that checkpoint (the
    stream position, the open windows and the unwritten part are Flink state; parts appear only
    when a checkpoint covering them completes), and every window is written once, right."""
    import signal

    expected = produce(ws, redis, "tx-kill", 4000, seed=3)
    out = tmp_path / "out"
    # 20 polls of 10 records a second: the stream takes 20 s to read; checkpoints every 2 s.
    proc = flink_start(
        ws, TRANSACTIONS, out,
        *redis.args("tx-kill", "--seconds", "30", "--batch", "10", "--checkpoint", "2"),
    )  # fmt: skip
    cluster_dir = ws / "flink" / "cluster"
    try:
        job_id = _job_id(cluster_dir)
        for _ in range(600):
            if _completed_checkpoints(cluster_dir, job_id) >= 2:
                break
            threading.Event().wait(0.2)
        tms = cluster["taskmanagers"]
        assert isinstance(tms, list)
        running = [tm for tm in tms if job_id in Path(tm["log"]).read_text(errors="replace")]
        assert len(running) == 1, "the job should run in one slot of one TaskManager"
        os.killpg(int(running[0]["pid"]), signal.SIGKILL)
        _out, err_text = proc.communicate(timeout=JOB_TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err_text
    from ppml.engines.flink.cluster import read_cluster_state, rest_get

    state = read_cluster_state(cluster_dir)
    assert state is not None
    history = rest_get(cluster_dir, state, f"/jobs/{job_id}/exceptions")["exceptionHistory"]
    assert history["entries"], "the job did not fail over: the kill was not seen"
    assert window_totals(ws, out) == expected
