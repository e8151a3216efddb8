"""Gramine-SGX: the manifest template (exact text), MRENCLAVE from a SIGSTRUCT built byte by
byte, the gramine-manifest / gramine-sgx-sign pipeline with fake tools first on PATH, and the
in-enclave quote reader against a fake /dev/attestation."""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tomllib
from pathlib import Path

import pytest

from ppml.errors import AttestationFailed, ConfigurationError, UsageError
from ppml.tee.attester import GramineAttester
from ppml.tee.command import ResolvedCommand
from ppml.tee.gramine import (
    EnclaveHost,
    EnclaveOptions,
    enclave_build,
    host_for,
    mrenclave_from_sigstruct,
    render_manifest_template,
)
from ppml.tee.manifest import TrustedFile, WorkloadManifest, build_manifest

# The SIGSTRUCT builder is shared with the fake gramine-sgx-sign, which runs it as a script.
SIGSTRUCT_SOURCE = """
def sigstruct(mrenclave):
    assert len(mrenclave) == 32
    fields = [
        bytes.fromhex("06000000e10000000000010000000000"),  # HEADER
        (0).to_bytes(4, "little"),  # VENDOR
        bytes.fromhex("20260101"),  # DATE (BCD)
        bytes.fromhex("01010000600000006000000001000000"),  # HEADER2
        bytes(4),  # SWDEFINED
        bytes(84),  # reserved
        b"\\x11" * 384,  # MODULUS
        (3).to_bytes(4, "little"),  # EXPONENT
        b"\\x22" * 384,  # SIGNATURE
        bytes(4),  # MISCSELECT
        b"\\xff" * 4,  # MISCMASK
        bytes(20),  # reserved
        bytes(16),  # ATTRIBUTES
        b"\\xff" * 16,  # ATTRIBUTEMASK
        mrenclave,  # ENCLAVEHASH, at offset 960
        bytes(32),  # reserved
        (7).to_bytes(2, "little"),  # ISVPRODID
        (1).to_bytes(2, "little"),  # ISVSVN
        bytes(12),  # reserved
        b"\\x33" * 384,  # Q1
        b"\\x44" * 384,  # Q2
    ]
    data = b"".join(fields)
    assert len(data) == 1808 and data[960:992] == mrenclave
    return data
"""
_ns: dict[str, object] = {}
exec(SIGSTRUCT_SOURCE, _ns)
sigstruct = _ns["sigstruct"]

CA_PEM = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"
PASSPHRASE = "correct horse battery staple"


def fixed_command(*args: str) -> ResolvedCommand:
    return ResolvedCommand(
        kind="python",
        program="/opt/py/bin/python3.11",
        real="/opt/py/bin/python3.11",
        real_sha256="ef" * 32,
        flags=(),
        mode="script",
        target="app/job.py",
        args=args or ("--rows", "10"),
        script=Path("/srv/app/job.py"),
    )


def fixed_workload(*args: str) -> WorkloadManifest:
    return WorkloadManifest(
        command=fixed_command(*args),
        base_dir=Path("/srv/app"),
        trusted_files=(
            TrustedFile("helpers/maths.py", "cd" * 32),
            TrustedFile("job.py", "ab" * 32),
        ),
        env=(
            ("HOME", "/home/ann"),
            ("LANG", "C.UTF-8"),
            ("MY_SETTING", "on"),
            ("PATH", "/usr/bin"),
            ("PPML_PASSPHRASE", "hunter2"),
            ("TMPDIR", "/tmp"),
        ),
        environment=None,
    )


def fixed_host(**changes: object) -> EnclaveHost:
    values: dict[str, object] = {
        "python_lib": ("/opt/py/lib",),
        "python_path": ("/opt/venv/site-packages",),
        "arch_libdir": "/lib/x86_64-linux-gnu",
        "start_dir": "/srv",
        "data_dirs": ("/srv/data",),
        "ca_pem": CA_PEM,
        "env": (("HOME", "/home/ann"), ("LANG", "C.UTF-8"), ("MY_SETTING", "on")),
    }
    values.update(changes)
    return EnclaveHost(**values)  # type: ignore[arg-type]


def expected_template(measurement: str) -> str:
    return f"""\
# Gramine manifest template of a ppml workload (rendered by gramine-manifest).
# ppml workload measurement: {measurement}

libos.entrypoint = "/opt/py/bin/python3.11"
loader.entrypoint = "file:{{{{ gramine.libos }}}}"
loader.log_level = "error"
loader.argv = ["/opt/py/bin/python3.11", "-B", "-s", "app/job.py", "--rows", "10"]

# Fixed values are measured; only the KMS URL (chosen at start) passes through.
loader.env.LD_LIBRARY_PATH = "/lib:/lib/x86_64-linux-gnu:/usr/lib/x86_64-linux-gnu:/opt/py/lib"
loader.env.PYTHONPATH = "/opt/venv/site-packages"
loader.env.PYTHONNOUSERSITE = "1"
loader.env.PYTHONDONTWRITEBYTECODE = "1"
loader.env.PYTHONPYCACHEPREFIX = "/tmp/ppml-pycache"
loader.env.PPML_TEE = "sgx"
loader.env.PPML_KMS_CA_PEM = "-----BEGIN CERTIFICATE-----\\nMIIB\\n-----END CERTIFICATE-----\\n"
loader.env.PPML_KMS_URL = {{ passthrough = true }}
loader.env.HOME = "/home/ann"
loader.env.LANG = "C.UTF-8"
loader.env.MY_SETTING = "on"

fs.start_dir = "/srv"
fs.mounts = [
  {{ path = "/lib", uri = "file:{{{{ gramine.runtimedir() }}}}" }},
  {{ path = "/lib/x86_64-linux-gnu", uri = "file:/lib/x86_64-linux-gnu" }},
  {{ path = "/usr/lib/x86_64-linux-gnu", uri = "file:/usr/lib/x86_64-linux-gnu" }},
  {{ path = "/opt/py/bin/python3.11", uri = "file:/opt/py/bin/python3.11" }},
  {{ path = "/opt/py/lib", uri = "file:/opt/py/lib" }},
  {{ path = "/opt/venv/site-packages", uri = "file:/opt/venv/site-packages" }},
  {{ path = "/srv", uri = "file:/srv" }},
  {{ type = "tmpfs", path = "/tmp" }},
]

sgx.debug = false
sgx.edmm_enable = false
sgx.enclave_size = "4G"
sgx.max_threads = 128
sgx.remote_attestation = "dcap"
sgx.file_check_policy = "strict"

sgx.trusted_files = [
  "file:{{{{ gramine.libos }}}}",
  "file:{{{{ gramine.runtimedir() }}}}/",
  "file:/lib/x86_64-linux-gnu/",
  "file:/usr/lib/x86_64-linux-gnu/",
  {{ uri = "file:/opt/py/bin/python3.11", sha256 = "{"ef" * 32}" }},
  "file:/opt/py/lib/",
  "file:/opt/venv/site-packages/",
  {{ uri = "file:/srv/app/helpers/maths.py", sha256 = "{"cd" * 32}" }},
  {{ uri = "file:/srv/app/job.py", sha256 = "{"ab" * 32}" }},
]

# ppml-encrypted data: ppml authenticates these files itself.
sgx.allowed_files = [
  "file:/srv/data/",
]
"""


# -- the manifest ------------------------------------------------------------------------------


def test_manifest_template_exact_text() -> None:
    workload = fixed_workload()
    text = render_manifest_template(workload, EnclaveOptions(), fixed_host())
    assert text == expected_template(workload.measurement())
    doc = tomllib.loads(text)  # valid TOML before Gramine's Jinja helpers are rendered
    assert doc["sgx"]["remote_attestation"] == "dcap" and doc["sgx"]["debug"] is False
    assert doc["loader"]["env"]["PPML_KMS_CA_PEM"] == CA_PEM


def test_options_reach_the_manifest() -> None:
    options = EnclaveOptions(enclave_size="16G", max_threads=256, edmm=True, debug=True)
    doc = tomllib.loads(render_manifest_template(fixed_workload(), options, fixed_host()))
    assert doc["sgx"] == doc["sgx"] | {
        "debug": True,
        "edmm_enable": True,
        "enclave_size": "16G",
        "max_threads": 256,
    }


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"enclave_size": "3G"}, "power of two"),
        ({"enclave_size": "4 GB"}, "K, M or G"),
        ({"max_threads": 2}, "max threads"),
    ],
)
def test_bad_options(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(UsageError, match=message):
        EnclaveOptions(**kwargs)  # type: ignore[arg-type]


def test_no_secret_and_no_template_markup_reaches_the_manifest() -> None:
    workload = fixed_workload()
    host = host_for(workload, ca_pem=CA_PEM, start_dir=Path("/"), python_paths=lambda _: ([], []))
    # A ppml variable is never passed in, even when listed; PATH and TMPDIR name host
    # locations. The others go in with their values, which MRENCLAVE then covers.
    assert host.env == (("HOME", "/home/ann"), ("LANG", "C.UTF-8"), ("MY_SETTING", "on"))
    text = render_manifest_template(workload, EnclaveOptions(), host)
    assert "PASSPHRASE" not in text and "hunter2" not in text and "PRIVATE KEY" not in text
    sneaky = fixed_workload("{{ env.PPML_PASSPHRASE }}")
    with pytest.raises(UsageError, match="template markup"):
        render_manifest_template(sneaky, EnclaveOptions(), fixed_host())


def test_data_directories_must_not_hold_code(tmp_path: Path) -> None:
    for bad in ("/srv", "/srv/app", "/srv/app/data", "/opt/venv"):
        with pytest.raises(UsageError, match="overlaps the workload's code"):
            render_manifest_template(
                fixed_workload(), EnclaveOptions(), fixed_host(data_dirs=(bad,))
            )
    text = render_manifest_template(fixed_workload(), EnclaveOptions(), fixed_host(data_dirs=()))
    assert "allowed_files" not in text
    # A data directory holding code, wherever it is, is refused: it would be loaded unchecked.
    data = tmp_path / "data"
    (data / "nested").mkdir(parents=True)
    (data / "table.csv.ppml").write_bytes(b"PPML")
    render_manifest_template(fixed_workload(), EnclaveOptions(), fixed_host(data_dirs=(str(data),)))
    for name in ("helper.py", "ext.cpython-311-x86_64-linux-gnu.so", "evil.pth", "x.pyc"):
        (data / "nested" / name).write_bytes(b"code")
        with pytest.raises(UsageError, match="holds code"):
            render_manifest_template(
                fixed_workload(), EnclaveOptions(), fixed_host(data_dirs=(str(data),))
            )
        (data / "nested" / name).unlink()


def test_host_for_a_real_workload(tmp_path: Path) -> None:
    (tmp_path / "app").mkdir()
    (tmp_path / "data").mkdir()
    script = tmp_path / "app" / "job.py"
    script.write_text("print('hi')\n")
    workload = build_manifest([sys.executable, str(script)])
    host = host_for(workload, ca_pem=CA_PEM, data_dirs=[tmp_path / "data"], start_dir=tmp_path)
    assert host.data_dirs == (str((tmp_path / "data").resolve()),)
    assert host.python_lib and all(Path(p).is_dir() for p in host.python_lib)
    text = render_manifest_template(workload, EnclaveOptions(), host)
    doc = tomllib.loads(text)
    assert doc["libos"]["entrypoint"] == str(Path(sys.executable).resolve())
    hashed = {e["uri"]: e["sha256"] for e in doc["sgx"]["trusted_files"] if isinstance(e, dict)}
    assert hashed[f"file:{script.resolve()}"] == hashlib.sha256(script.read_bytes()).hexdigest()
    with pytest.raises(UsageError, match="does not exist"):
        host_for(workload, ca_pem=CA_PEM, data_dirs=[tmp_path / "nope"])


# -- SIGSTRUCT ---------------------------------------------------------------------------------


def test_mrenclave_from_a_sigstruct_built_byte_by_byte() -> None:
    mrenclave = bytes(range(32))
    assert mrenclave_from_sigstruct(sigstruct(mrenclave)) == mrenclave.hex()  # type: ignore[operator]


def test_malformed_sigstructs() -> None:
    good: bytes = sigstruct(bytes(32))  # type: ignore[operator]
    with pytest.raises(ConfigurationError, match="not a 1808-byte SIGSTRUCT"):
        mrenclave_from_sigstruct(good[:-1])
    for offset in (0, 24):
        bad = bytearray(good)
        bad[offset] ^= 0xFF
        with pytest.raises(ConfigurationError, match="headers"):
            mrenclave_from_sigstruct(bytes(bad))


# -- the pipeline with fake Gramine tools ------------------------------------------------------

FAKE_MANIFEST = """\
import json, os, sys
with open(LOG, "a") as fh:
    fh.write(json.dumps({"argv": sys.argv, "env": dict(os.environ)}) + "\\n")
if os.environ.get("FAKE_FAIL") == "gramine-manifest":
    sys.stderr.write("gramine-manifest: unknown manifest key sgx.bogus\\n")
    sys.exit(2)
source, output = sys.argv[1], sys.argv[2]
text = open(source).read().replace("{{ gramine.libos }}", "/gramine/libsysdb.so")
open(output, "w").write(text.replace("{{ gramine.runtimedir() }}", "/gramine/runtime"))
"""

FAKE_SIGN = (
    SIGSTRUCT_SOURCE
    + """
import hashlib, json, os, sys
args = dict(zip(sys.argv[1::2], sys.argv[2::2]))
manifest = open(args["--manifest"], "rb").read()
with open(LOG, "a") as fh:
    entry = {"argv": sys.argv, "env": dict(os.environ)}
    entry["mrenclave"] = hashlib.sha256(manifest).hexdigest()
    fh.write(json.dumps(entry) + "\\n")
open(args["--output"], "wb").write(manifest)
if os.environ.get("FAKE_FAIL") == "gramine-sgx-sign":
    open(args["--sigfile"], "wb").write(b"half")
    sys.stderr.write("gramine-sgx-sign: the key must be RSA-3072 with exponent 3\\n")
    sys.exit(1)
open(args["--sigfile"], "wb").write(sigstruct(hashlib.sha256(manifest).digest()))
"""
)

# It gets only the workload's allow-listed environment: its exit code comes from a file.
FAKE_SGX = """\
import json, os, sys
with open(LOG, "a") as fh:
    fh.write(json.dumps({"argv": sys.argv, "env": dict(os.environ)}) + "\\n")
code = os.path.join(os.path.dirname(sys.argv[0]), "exit-code")
sys.exit(int(open(code).read()) if os.path.exists(code) else 0)
"""


def install_fake_gramine(bin_dir: Path, monkeypatch: pytest.MonkeyPatch, log: Path) -> None:
    """Fake gramine-manifest, gramine-sgx-sign and gramine-sgx, first on PATH."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    for name, body in (
        ("gramine-manifest", FAKE_MANIFEST),
        ("gramine-sgx-sign", FAKE_SIGN),
        ("gramine-sgx", FAKE_SGX),
    ):
        tool = bin_dir / name
        tool.write_text(f"#!{sys.executable}\nLOG = {str(log)!r}\n{body}")
        tool.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ.get('PATH', os.defpath)}")


def read_log(log: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in log.read_text().splitlines()]


def expected_mrenclave(template: str) -> str:
    rendered = template.replace("{{ gramine.libos }}", "/gramine/libsysdb.so").replace(
        "{{ gramine.runtimedir() }}", "/gramine/runtime"
    )
    return hashlib.sha256(rendered.encode()).hexdigest()


@pytest.fixture
def signing_key(tmp_path: Path) -> Path:
    key = tmp_path / "enclave-signing-key.pem"
    key.write_text(
        "-----BEGIN RSA PRIVATE KEY-----\nsecret-key-bytes\n-----END RSA PRIVATE KEY-----\n"
    )
    key.chmod(0o600)
    return key


def test_build_passes_arguments_and_reads_mrenclave(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, signing_key: Path
) -> None:
    log = tmp_path / "log.jsonl"
    install_fake_gramine(tmp_path / "bin", monkeypatch, log)
    monkeypatch.setenv("PPML_PASSPHRASE", PASSPHRASE)
    work = tmp_path / "work"
    work.mkdir()
    template = render_manifest_template(fixed_workload(), EnclaveOptions(), fixed_host())
    with enclave_build(template, signing_key, parent=work) as enclave:
        assert enclave.mrenclave == expected_mrenclave(template)
        assert os.stat(enclave.directory).st_mode & 0o777 == 0o700
        assert (enclave.directory / "workload.manifest.sgx").is_file()
        d = enclave.directory
    assert list(work.iterdir()) == []  # removed afterwards
    calls = read_log(log)
    assert [Path(str(c["argv"][0])).name for c in calls] == [  # type: ignore[index]
        "gramine-manifest",
        "gramine-sgx-sign",
    ]
    assert calls[0]["argv"][1:] == [  # type: ignore[index]
        str(d / "workload.manifest.template"),
        str(d / "workload.manifest"),
    ]
    assert calls[1]["argv"][1:] == [  # type: ignore[index]
        "--key",
        str(signing_key),
        "--manifest",
        str(d / "workload.manifest"),
        "--output",
        str(d / "workload.manifest.sgx"),
        "--sigfile",
        str(d / "workload.sig"),
    ]
    # Neither the passphrase nor the key's bytes reach a tool's argv or environment.
    everything = log.read_text()
    assert PASSPHRASE not in everything and "secret-key-bytes" not in everything
    assert all("PPML_PASSPHRASE" not in c["env"] for c in calls)  # type: ignore[operator]


@pytest.mark.parametrize(
    ("tool", "stderr"),
    [
        ("gramine-manifest", "unknown manifest key sgx.bogus"),
        ("gramine-sgx-sign", "the key must be RSA-3072 with exponent 3"),
    ],
)
def test_a_failing_tool_is_reported_and_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, signing_key: Path, tool: str, stderr: str
) -> None:
    install_fake_gramine(tmp_path / "bin", monkeypatch, tmp_path / "log.jsonl")
    monkeypatch.setenv("FAKE_FAIL", tool)
    work = tmp_path / "work"
    work.mkdir()
    template = render_manifest_template(fixed_workload(), EnclaveOptions(), fixed_host())
    with (
        pytest.raises(ConfigurationError) as info,
        enclave_build(template, signing_key, parent=work),
    ):
        pass
    exit_code = 2 if tool == "gramine-manifest" else 1
    assert str(info.value) == f"{tool} failed (exit {exit_code}): {tool}: {stderr}"
    assert list(work.iterdir()) == []


def test_missing_tool_and_unsafe_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, signing_key: Path
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with (
        pytest.raises(ConfigurationError, match=r"^gramine-manifest not found on PATH"),
        enclave_build("", signing_key, parent=tmp_path),
    ):
        pass
    signing_key.chmod(0o644)
    with (
        pytest.raises(ConfigurationError, match="readable by others"),
        enclave_build("", signing_key, parent=tmp_path),
    ):
        pass


# -- inside the enclave: /dev/attestation ------------------------------------------------------

REPORT_DATA = bytes(range(64, 128))


class FakeAttestationDir:
    """A directory standing in for Gramine's /dev/attestation."""

    def __init__(self, root: Path, kind: str = "dcap") -> None:
        self.root = root
        root.mkdir()
        (root / "attestation_type").write_text(kind)
        (root / "user_report_data").write_bytes(bytes(64))
        self.quote_for(bytes(64))

    def quote_for(self, report_data: bytes) -> bytes:
        quote = bytearray(48 + 384 + 4 + 100)
        quote[0:2] = (3).to_bytes(2, "little")
        quote[368:432] = report_data
        (self.root / "quote").write_bytes(bytes(quote))
        return bytes(quote)


def test_gramine_quote(tmp_path: Path) -> None:
    fake = FakeAttestationDir(tmp_path / "attestation")
    expected = fake.quote_for(REPORT_DATA)  # what Gramine makes once report data is written
    attester = GramineAttester(fake.root)
    assert attester.tee == "sgx"
    assert attester.evidence(REPORT_DATA) == expected
    assert (fake.root / "user_report_data").read_bytes() == REPORT_DATA


def test_gramine_quote_refusals(tmp_path: Path) -> None:
    with pytest.raises(AttestationFailed, match="not running inside a Gramine-SGX enclave"):
        GramineAttester(tmp_path / "none").evidence(REPORT_DATA)
    fake = FakeAttestationDir(tmp_path / "epid", kind="none")
    with pytest.raises(AttestationFailed, match="'none', not 'dcap'"):
        GramineAttester(fake.root).evidence(REPORT_DATA)
    fake = FakeAttestationDir(tmp_path / "stale")  # a quote over other report data
    with pytest.raises(AttestationFailed, match="other report data"):
        GramineAttester(fake.root).evidence(REPORT_DATA)
    (fake.root / "quote").write_bytes(b"short")
    with pytest.raises(AttestationFailed, match="too short"):
        GramineAttester(fake.root).evidence(REPORT_DATA)
    with pytest.raises(UsageError):
        GramineAttester(fake.root).evidence(b"short")


def test_a_local_module_run_with_m_is_listed_with_its_digest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`python -m job` from a project directory: the module and its local imports are trusted
    files with their SHA-256, never allowed files; the data directory is apart."""
    project = tmp_path / "project"
    project.mkdir()
    (tmp_path / "data").mkdir()
    (project / "job.py").write_text("import helper\n")
    (project / "helper.py").write_text("VALUE = 1\n")
    monkeypatch.chdir(project)
    workload = build_manifest([sys.executable, "-m", "job"])
    host = host_for(workload, ca_pem=CA_PEM, data_dirs=[tmp_path / "data"], start_dir=project)
    doc = tomllib.loads(render_manifest_template(workload, EnclaveOptions(), host))
    hashed = {e["uri"]: e["sha256"] for e in doc["sgx"]["trusted_files"] if isinstance(e, dict)}
    for name in ("job.py", "helper.py"):
        path = (project / name).resolve()
        assert hashed[f"file:{path}"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert doc["sgx"]["allowed_files"] == [f"file:{(tmp_path / 'data').resolve()}/"]
    assert doc["loader"]["argv"][-2:] == ["-m", "job"]
    # The project directory itself as data would let unchecked code in: refused.
    host = host_for(workload, ca_pem=CA_PEM, data_dirs=[project], start_dir=project)
    with pytest.raises(UsageError, match="overlaps the workload's code"):
        render_manifest_template(workload, EnclaveOptions(), host)
