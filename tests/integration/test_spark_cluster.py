"""`ppml spark cluster up|status|down` and jobs on it: a master and two workers on 127.0.0.1 with
authentication and TLS on every RPC connection (the workspace's keystore and CA).

The master's RPC port speaks TLS 1.3 with the workspace's server certificate and drops plain
text; every example runs on the cluster as on local[*] (pi; wordcount, sql_basic and the TPC-H
queries over encrypted files, attested on the sim TEE with keys released by policy; the TPC-H
results checked against DuckDB); a job from another workspace fails the TLS handshake, and one
with the right CA but another secret fails authentication; no secret is on any command line or
in any log.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

import pytest
from cli_support import PASSPHRASE, run_ppml
from tests.support.tpch_rows import same_value, sorted_rows

from ppml.engines.spark.jvm import kms_client_jar
from ppml.workspace import Workspace

pytest.importorskip("pyspark")

pytestmark = [
    pytest.mark.spark_cluster,
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
]

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples" / "spark"
PI = EXAMPLES / "pi.py"
TPCH_SCALE = 0.01
# Two workers of one core and 1g each; an executor of 512m on each.
EXECUTOR_CONF = (
    "--conf",
    "spark.executor.memory=512m",
    "--conf",
    "spark.cores.max=2",
    "--conf",
    "spark.sql.shuffle.partitions=4",
    "--conf",
    "spark.ui.showConsoleProgress=false",
)
JOB_TIMEOUT = 600


def _env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PPML_")}
    env.update({"PPML_HOME": str(home), "PPML_PASSPHRASE": PASSPHRASE})
    return env


@dataclass
class Job:
    code: int
    out: str
    err: str
    ps: list[str] = field(default_factory=list)


def submit(
    ws: Path,
    url: str,
    app: Path,
    *args: str | Path,
    tee: bool = False,
    pre: tuple[str | Path, ...] = (),
) -> Job:
    """`ppml spark-submit [--tee sim] --master URL [PRE] APP ARGS` on the cluster, while a
    thread records `ps -ww -eo args` (every full command line) until it ends."""
    command = [sys.executable, "-m", "ppml", "spark-submit"]
    if tee:
        # The attested driver sees this test's files under /tmp only as data directories.
        data = {
            Path(a).resolve().parent
            for a in args
            if Path(a).is_absolute() and Path(a).resolve().parent.is_dir()
        }
        command += ["--tee", "sim", *(x for d in sorted(data) for x in ("--data", str(d)))]
    command += ["--master", url, *EXECUTOR_CONF, *map(str, pre), str(app), *map(str, args)]
    proc = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
        env=_env(ws),
        cwd=ROOT,
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
            done.wait(0.3)

    watcher = threading.Thread(target=poll, daemon=True)
    watcher.start()
    try:
        out, err = proc.communicate(timeout=JOB_TIMEOUT)
    finally:
        done.set()
        watcher.join()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return Job(proc.returncode, out, err, snapshots)


def allow(
    ws: Path,
    url: str,
    app: Path,
    *args: str | Path,
    keys: tuple[str, ...],
    pre: tuple[str | Path, ...] = (),
) -> None:
    """Let the attested driver `python APP ARGS`, submitted to `url` with the options `submit`
    uses (they are measured too), have `keys` (its measurement, by policy)."""
    measured = run_ppml(
        "spark-submit", "--measure", "--master", url, *EXECUTOR_CONF, *pre, app, *args, home=ws
    )
    assert measured.code == 0, measured.err
    measurement = measured.out.splitlines()[0]
    for key in keys:
        r = run_ppml("policy", "allow", key, "--tee", "sim", "--measurement", measurement, home=ws)
        assert r.code == 0, r.err


@pytest.fixture(scope="module")
def ws(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("cluster") / "ws"
    assert run_ppml("init", "--dev", "--dir", d).code == 0
    for key in ("data", "tpch", "results", "lenet"):
        assert run_ppml("key", "create", key, home=d).code == 0
    return d


@pytest.fixture(scope="module")
def secrets(ws: Path) -> list[str]:
    opened = Workspace.open(ws, PASSPHRASE.encode())
    return [opened.secret("spark-auth-secret"), opened.secret("keystore-password")]


@pytest.fixture(scope="module")
def cluster(ws: Path) -> Iterator[str]:
    r = run_ppml(
        "spark", "cluster", "up", "--workers", "2", "--cores", "1", "--memory", "1g", home=ws
    )
    assert r.code == 0, r.err
    url = r.out.strip().splitlines()[-1]
    assert re.fullmatch(r"spark://127\.0\.0\.1:\d+", url)
    try:
        yield url
    finally:
        down = run_ppml("spark", "cluster", "down", home=ws)
        assert down.code == 0, down.err
        assert "stopped 3 process(es)" in down.out


def _assert_secret_free(ws: Path, job: Job, secrets: list[str]) -> None:
    """No secret on any command line seen while the job ran, in its output or in any log."""
    logs = [
        p.read_text(errors="replace")
        for p in (ws / "spark").rglob("*")
        if p.is_file()
        and p.suffix != ".conf"
        and p.name != "cluster.json"
        and "conf" not in p.parts
    ]
    assert logs
    for s in secrets:
        assert all(s not in snap for snap in job.ps)
        assert s not in job.out and s not in job.err
        assert all(s not in text for text in logs)


def _assert_ran_on_executors(job: Job) -> None:
    lines = [line for snap in job.ps for line in snap.splitlines()]
    assert any("CoarseGrainedExecutorBackend" in line for line in lines)


# -- the cluster itself --------------------------------------------------------------------------


def test_status_shows_the_recorded_processes(ws: Path, cluster: str) -> None:
    r = run_ppml("spark", "cluster", "status", "--format", "json", home=ws)
    assert r.code == 0, r.err
    info = json.loads(r.out)
    assert info["master_url"] == cluster
    assert info["master"]["alive"] and [w["alive"] for w in info["workers"]] == [True, True]
    state = ws / "spark" / "cluster.json"
    assert oct(state.stat().st_mode & 0o777) == "0o600"
    text = run_ppml("spark", "cluster", "status", home=ws)
    assert cluster in text.out and "up" in text.out


def test_the_master_rpc_port_speaks_tls_with_the_workspace_certificate(
    ws: Path, cluster: str
) -> None:
    port = int(cluster.rsplit(":", 1)[1])
    context = ssl.create_default_context(cafile=str(ws / "tls" / "ca.pem"))
    assert context.check_hostname and context.verify_mode == ssl.CERT_REQUIRED
    with (
        socket.create_connection(("127.0.0.1", port), timeout=30) as raw,
        context.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        assert tls.version() == "TLSv1.3"
        der = tls.getpeercert(binary_form=True)
    server_pem = (ws / "tls" / "server.pem").read_text()
    assert der == ssl.PEM_cert_to_DER_cert(server_pem)
    # A client that trusts another CA cannot complete the handshake.
    stranger = ssl.create_default_context()
    with (
        socket.create_connection(("127.0.0.1", port), timeout=30) as raw,
        pytest.raises(ssl.SSLCertVerificationError),
    ):
        stranger.wrap_socket(raw, server_hostname="127.0.0.1")
    # Plain text (a Spark RPC frame header) is dropped: no reply, the connection closes.
    with socket.create_connection(("127.0.0.1", port), timeout=30) as plain:
        plain.sendall(bytes(8) + b"\x03" + b"not tls at all")
        try:
            reply = plain.recv(1024)
        except ConnectionResetError:
            reply = b""
    assert reply == b""
    log = Path(json.loads((ws / "spark" / "cluster.json").read_text())["master"]["log"])
    deadline = time.monotonic() + 30
    while "NotSslRecordException" not in log.read_text(errors="replace"):
        assert time.monotonic() < deadline, "the master did not log the plain-text record"
        time.sleep(0.2)


# -- the examples --------------------------------------------------------------------------------


def test_pi_runs_on_the_cluster_without_secrets_on_command_lines(
    ws: Path, cluster: str, secrets: list[str]
) -> None:
    job = submit(ws, cluster, PI, "4")
    assert job.code == 0, job.err[-3000:]
    assert re.search(r"^Pi is roughly 3\.1\d*$", job.out, re.MULTILINE), job.out
    assert not re.search(r"WARN|incubator|log4j", job.err), job.err  # a quiet driver
    # The executors' own logs (Spark's default logging on the workers) show their security.
    app_dir = max((ws / "spark" / "work").glob("app-*"), key=lambda p: p.stat().st_mtime)
    logs = [p.read_text(errors="replace") for p in app_dir.glob("*/stderr")]
    assert logs and all("authentication enabled" in t and "RPC SSL enabled" in t for t in logs)
    _assert_ran_on_executors(job)
    _assert_secret_free(ws, job, secrets)
    if kms_client_jar().is_file():  # ppml's jar reached the executors (fetched from the driver)
        assert list((ws / "spark" / "work").glob("app-*/*/ppml-spark.jar"))


def test_wordcount_over_an_encrypted_file_on_the_cluster(
    ws: Path, cluster: str, tmp_path: Path, secrets: list[str]
) -> None:
    src = tmp_path / "words.txt"
    src.write_text(
        "the cat\nthe dog the end\n" + "".join(f"w{i % 7} " * 3 + "\n" for i in range(70))
    )
    enc = tmp_path / "words.txt.ppml"
    r = run_ppml("encrypt", src, "-o", enc, "--key", "data", home=ws)
    assert r.code == 0, r.err
    app = EXAMPLES / "wordcount.py"
    allow(ws, cluster, app, enc, keys=("data",))
    job = submit(ws, cluster, app, enc, tee=True)
    assert job.code == 0, job.err[-3000:]
    lines = job.out.splitlines()
    assert lines[0] == "w0: 30", job.out
    assert "the: 3" in lines and "cat: 1" in lines and "w6: 30" in lines
    assert job.err.count("SIMULATED TEE") == 1
    _assert_ran_on_executors(job)
    _assert_secret_free(ws, job, secrets)


def test_sql_basic_over_encrypted_json_on_the_cluster(
    ws: Path, cluster: str, tmp_path: Path
) -> None:
    enc = tmp_path / "people.json.ppml"
    r = run_ppml("encrypt", ROOT / "examples/data/people.json", "-o", enc, "--key", "data", home=ws)
    assert r.code == 0, r.err
    app = EXAMPLES / "sql_basic.py"
    denied = submit(ws, cluster, app, enc, tee=True)
    assert denied.code != 0 and "access denied" in denied.out + denied.err
    allow(ws, cluster, app, enc, keys=("data",))
    job = submit(ws, cluster, app, enc, tee=True)
    assert job.code == 0, job.err[-3000:]
    out = job.out
    assert "|  19| Justin|" in out  # df.show()
    assert "|-- age: long (nullable = true)" in out
    assert "(age + 1)" in out
    assert "| 30|Andy|" in out  # filter age > 21
    assert "| 19|Justin|" in out  # the SQL query
    assert "Michael" in out


EXAMPLES_JAR = EXAMPLES / "java" / "spark-examples.jar"


def test_a_jvm_application_runs_attested_on_the_cluster(
    ws: Path, cluster: str, secrets: list[str]
) -> None:
    """Java's SparkPi from an attested driver: the measured jar reaches the executors from
    the driver's file server and the tasks run there."""
    job = submit(ws, cluster, EXAMPLES_JAR, "4", tee=True,
                 pre=("--class", "org.ppml.examples.SparkPi"))  # fmt: skip
    assert job.code == 0, job.err[-3000:]
    assert re.search(r"^Pi is roughly 3\.1\d*$", job.out, re.MULTILINE), job.out
    assert job.err.count("SIMULATED TEE") == 1
    _assert_ran_on_executors(job)
    _assert_secret_free(ws, job, secrets)
    assert list((ws / "spark" / "work").glob("app-*/*/spark-examples.jar"))


def test_a_java_job_reads_encrypted_parquet_on_the_cluster(
    ws: Path, cluster: str, tmp_path: Path, secrets: list[str]
) -> None:
    """Java's ParquetSummary over encrypted Parquet with Spark's own reader on the executors:
    the keys come from the attested driver, only once the policy names it."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    regions = [["EU", "US", "APAC"][i % 3] for i in range(3000)]
    plain = tmp_path / "people.parquet"
    pq.write_table(pa.table({"id": list(range(3000)), "region": regions}), plain,
                   row_group_size=500)  # fmt: skip
    enc = tmp_path / "people.enc.parquet"
    assert run_ppml("encrypt", plain, "-o", enc, "--key", "data", home=ws).code == 0
    pre = ("--decrypt", enc, "--class", "org.ppml.examples.ParquetSummary")
    denied = submit(ws, cluster, EXAMPLES_JAR, enc, "region", tee=True, pre=pre)
    assert denied.code == 4 and "access denied" in denied.err
    allow(ws, cluster, EXAMPLES_JAR, enc, "region", keys=("data",), pre=pre)
    job = submit(ws, cluster, EXAMPLES_JAR, enc, "region", tee=True, pre=pre)
    assert job.code == 0, job.err[-3000:]
    counts = sorted(pc.value_counts(pa.array(regions)).to_pylist(), key=lambda c: c["values"])
    expected = ["rows 3000", *(f"{c['values']}\t{c['counts']}" for c in counts)]
    assert job.out.splitlines()[-len(expected) :] == expected, job.out
    _assert_ran_on_executors(job)
    _assert_secret_free(ws, job, secrets)


# -- TPC-H ---------------------------------------------------------------------------------------


def _load_tpch() -> ModuleType:
    sys.path.insert(0, str(EXAMPLES))  # tpch.py's queries, tpch_queries.py, beside it
    spec = importlib.util.spec_from_file_location("ppml_cluster_tpch", EXAMPLES / "tpch.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tpch_data(ws: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(plain, encrypted): the eight tables at scale 0.01, encrypted (PME) under `tpch`."""
    from ppml.data.parquet import encrypt_parquet_file, is_encrypted_parquet

    found = shutil.which("tpchgen-cli") or str(Path(sys.executable).with_name("tpchgen-cli"))
    if not Path(found).exists():
        pytest.skip("tpchgen-cli is not installed (it comes with the dev extra)")
    root = tmp_path_factory.mktemp("tpch")
    plain, enc = root / "plain", root / "encrypted"
    subprocess.run(
        [found, "parquet", "-s", str(TPCH_SCALE), "-o", str(plain)],
        check=True,
        capture_output=True,
        timeout=120,
    )
    enc.mkdir()
    keys = Workspace.open(ws, PASSPHRASE.encode()).key_service()
    try:
        for table in _load_tpch().TABLES:
            dst = enc / f"{table}.parquet"
            encrypt_parquet_file(plain / f"{table}.parquet", dst, keys, key_name="tpch")
            assert is_encrypted_parquet(dst)
    finally:
        keys.close()
    return plain, enc


def test_tpch_queries_over_encrypted_parquet_on_the_cluster_match_duckdb(
    ws: Path, cluster: str, tpch_data: tuple[Path, Path], tmp_path: Path
) -> None:
    """All 22 queries with tpch.py on the cluster, each result written encrypted under
    `results`, then decrypted here and compared with DuckDB over the plaintext tables."""
    import duckdb

    from ppml.data import read_table
    from ppml.data.parquet import is_encrypted_parquet

    tpch = _load_tpch()
    plain, enc = tpch_data
    out = tmp_path / "results"
    args = (enc, "--scale", str(TPCH_SCALE), "--out", out, "--key", "results")
    app = EXAMPLES / "tpch.py"
    allow(ws, cluster, app, *args, keys=("tpch", "results"))
    job = submit(ws, cluster, app, *args, tee=True)
    assert job.code == 0, job.err[-3000:]
    assert "scale 0.01" in job.out
    _assert_ran_on_executors(job)
    counts = dict(re.findall(r"^Q(\d+)\s+[\d.]+ s\s+(\d+) rows$", job.out, re.MULTILINE))
    assert sorted(map(int, counts)) == list(range(1, 23)), job.out
    con = duckdb.connect(":memory:")
    keys = Workspace.open(ws, PASSPHRASE.encode()).key_service()
    try:
        for table in tpch.TABLES:
            path = str(plain / f"{table}.parquet").replace("'", "''")
            con.execute(f"CREATE VIEW {table} AS SELECT * FROM read_parquet('{path}')")
        for n in range(1, 23):
            want = sorted_rows(con.sql(tpch.query_text(n, TPCH_SCALE)).fetchall())
            assert want, f"Q{n} returns no rows"
            parts = [p for p in (out / f"q{n}").iterdir() if not p.name.startswith(("_", "."))]
            assert parts and all(is_encrypted_parquet(p) for p in parts)
            table = read_table(out / f"q{n}", keys, format="parquet")
            got = sorted_rows([tuple(r.values()) for r in table.to_pylist()])
            assert int(counts[str(n)]) == len(got) == len(want), f"Q{n}"
            for i, (g, w) in enumerate(zip(got, want, strict=True)):
                assert all(same_value(x, y) for x, y in zip(g, w, strict=True)), f"Q{n} row {i}"
    finally:
        keys.close()
        con.close()


def test_lenet_trains_on_encrypted_digits_on_the_cluster(
    ws: Path, cluster: str, tmp_path: Path
) -> None:
    """examples/spark/lenet.py: the digits written encrypted and read back through the cluster's
    executors, trained by TorchDistributor on the (attested) driver; the model written encrypted."""
    pytest.importorskip("torch")
    pytest.importorskip("sklearn")
    from ppml.crypto.stream import looks_encrypted

    model = tmp_path / "lenet.pt.ppml"
    args = ("--model-out", model, "--work-dir", tmp_path / "work", "--epochs", "2")
    app = EXAMPLES / "lenet.py"
    allow(ws, cluster, app, *args, keys=("lenet",))
    job = submit(ws, cluster, app, *args, tee=True)
    assert job.code == 0, job.err[-3000:]
    assert "1438 training, 359 test images" in job.out
    epochs = [int(m) for m in re.findall(r"^epoch (\d+): test accuracy 0\.\d{3}", job.out, re.M)]
    assert epochs == [1, 2], job.out
    assert re.search(r"^final test accuracy 0\.\d{3}", job.out, re.MULTILINE)
    assert looks_encrypted(model)
    _assert_ran_on_executors(job)


# -- refusals ------------------------------------------------------------------------------------


def _refused(home: Path, cluster: str, needle: str) -> None:
    """Submit Pi from `home`; `needle` must appear on the driver's stderr (the driver would
    retry for a minute: it is stopped once refused), and Pi must never be computed."""
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
        env=_env(home),
        start_new_session=True,
    )
    refused = threading.Event()

    def scan() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            if needle in line:
                refused.set()

    with proc:
        reader = threading.Thread(target=scan, daemon=True)
        reader.start()
        try:
            assert refused.wait(120), f"the master did not refuse the job ({needle})"
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


def test_a_job_from_another_workspace_fails_the_tls_handshake(tmp_path: Path, cluster: str) -> None:
    other = tmp_path / "other"
    assert run_ppml("init", "--dev", "--dir", other).code == 0
    # The master's certificate does not chain to the other workspace's CA.
    _refused(other, cluster, "Path does not chain with any of the trust anchors")


def test_a_job_with_the_right_ca_but_another_secret_is_refused(
    tmp_path: Path, ws: Path, cluster: str
) -> None:
    twin = tmp_path / "twin"
    shutil.copytree(ws, twin, ignore=shutil.ignore_patterns("spark"))
    Workspace.open(twin, PASSPHRASE.encode()).set_secret("spark-auth-secret", os.urandom(32).hex())
    # TLS succeeds (same CA, same keystore); Spark's authentication does not.
    _refused(twin, cluster, "Authentication failed")
