"""Occlum: `Occlum.json`, the start script and the copy_bom file generated from the workload;
MRENCLAVE from a signed enclave built byte by byte; the occlum new / copy_bom / occlum build
pipeline and `ppml run --tee sgx --libos occlum` with fake Occlum tools first on PATH; the
in-enclave quote reader against a fake /dev/sgx."""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import struct
import sys
from pathlib import Path

import pytest
from tests.unit.tee.test_gramine_manifest import (
    CA_PEM,
    SIGSTRUCT_SOURCE,
    fixed_host,
    fixed_workload,
    read_log,
    signing_key,
)
from tests.unit.tee.test_run_hardware import PASSPHRASE, ppml, project, workspace
from typer.testing import CliRunner

from ppml.cli import app
from ppml.errors import AttestationFailed, ConfigurationError, UsageError
from ppml.tee import attester
from ppml.tee.attester import (
    SGXIOC_GEN_DCAP_QUOTE,
    SGXIOC_GET_DCAP_QUOTE_SIZE,
    OcclumAttester,
    evidence_source,
)
from ppml.tee.command import ResolvedCommand
from ppml.tee.manifest import WorkloadManifest
from ppml.tee.occlum import (
    START,
    mrenclave_from_signed_enclave,
    occlum_build,
    render_bom,
    render_occlum_json,
    start_script,
)
from ppml.tee.sgx import EnclaveOptions
from ppml.workspace import Workspace

__all__ = ["project", "signing_key", "workspace"]  # fixtures used here

HINT = "install Occlum: https://occlum.readthedocs.io/en/latest/installation.html"

# A signed enclave as the SGX SDK's signing tool leaves it: an ELF64 file whose .note.sgxmeta
# note ("sgx_metadata", descriptor unpadded after the name) holds metadata with the SIGSTRUCT at
# offset 64. Shared with the fake `occlum build`, which runs it as a script.
ELF_SOURCE = (
    SIGSTRUCT_SOURCE
    + """
import struct as _struct
def signed_enclave(mrenclave, section=b".note.sgxmeta"):
    name = b"sgx_metadata\\0"
    desc = bytes(64) + sigstruct(mrenclave) + bytes(100)
    note = _struct.pack("<III", len(name), len(desc), 1) + name + desc
    strtab = b"\\0.shstrtab\\0" + section + b"\\0"
    note_at, strtab_at = 64, 64 + len(note)
    sh_at = strtab_at + len(strtab)
    header = b"\\x7fELF\\x02\\x01\\x01" + bytes(9) + _struct.pack(
        "<HHIQQQIHHHHHH", 3, 62, 1, 0, 0, sh_at, 0, 64, 0, 0, 64, 3, 1
    )
    def sh(name_at, kind, offset, size):
        return _struct.pack("<IIQQQQIIQQ", name_at, kind, 0, 0, offset, size, 0, 0, 1, 0)
    headers = bytes(64) + sh(1, 3, strtab_at, len(strtab)) + sh(11, 7, note_at, len(note))
    return header + note + strtab + headers
"""
)
_ns: dict[str, object] = {}
exec(ELF_SOURCE, _ns)
signed_enclave = _ns["signed_enclave"]

# -- the fake tools ----------------------------------------------------------------------------

_LOG = """\
import json, os, sys
def log(**extra):
    with open(LOG, "a") as fh:
        entry = {"argv": sys.argv, "cwd": os.getcwd(), "env": dict(os.environ), **extra}
        fh.write(json.dumps(entry) + "\\n")
"""

FAKE_OCCLUM = (
    ELF_SOURCE
    + _LOG
    + """
import hashlib, subprocess
command = sys.argv[1]
if command == "new":
    log()
    instance = sys.argv[2]
    for d in ("bin", "lib", "lib64", "etc", "tmp", "host"):
        os.makedirs(os.path.join(instance, "image", d))
    with open(os.path.join(instance, "Occlum.json"), "w") as fh:
        json.dump({"entry_points": ["/bin"], "metadata": {"debuggable": True}}, fh)
elif command == "build":
    h = hashlib.sha256(open("Occlum.json", "rb").read())
    for root, dirs, files in sorted(os.walk("image")):
        dirs.sort()
        for name in sorted(files):
            path = os.path.join(root, name)
            h.update(path.encode() + b"\\0" + open(path, "rb").read())
    log(mrenclave=h.hexdigest(), image=sorted(
        os.path.relpath(os.path.join(r, f), "image") for r, _, fs in os.walk("image") for f in fs
    ), config=json.load(open("Occlum.json")))
    if os.environ.get("FAKE_FAIL") == "occlum-build":
        sys.stderr.write("Error: invalid signing key path: the key must be RSA-3072\\n")
        sys.exit(1)
    os.makedirs("build/lib")
    with open("build/lib/libocclum-libos.signed.so", "wb") as fh:
        fh.write(signed_enclave(h.digest()))
elif command == "run":
    log()
    # The start script, run as Occlum would (its interpreter from the shebang line).
    start = os.path.join("image", sys.argv[2].lstrip("/"))
    interpreter = open(start).readline()[2:].strip()
    sys.exit(subprocess.call([interpreter, start, *sys.argv[3:]]))
"""
)

FAKE_COPY_BOM = (
    _LOG
    + """
import hashlib, shutil
args = dict(zip(sys.argv[1::2], sys.argv[2::2]))
bom, root = json.load(open(args["--file"])), args["--root"]
log(bom=bom)
for target in bom["targets"]:
    dest = os.path.join(root, target["target"].lstrip("/"))
    for d in target.get("mkdirs", []):
        os.makedirs(os.path.join(dest, d), exist_ok=True)
    for copy in target.get("copy", []):
        for entry in copy.get("files", []):
            name = entry["name"] if isinstance(entry, dict) else entry
            digest = hashlib.sha256(open(name, "rb").read()).hexdigest().upper()
            if isinstance(entry, dict) and entry.get("hash") != digest:
                sys.stderr.write(f"The hash value of {name} should be {digest!r}\\n")
                sys.exit(2)
            os.makedirs(dest, exist_ok=True)
            shutil.copy2(name, dest)
        for d in copy.get("dirs", []):  # recorded, not copied: a real environment is large
            os.makedirs(os.path.join(dest, os.path.basename(d)), exist_ok=True)
"""
)


def install_fake_occlum(
    bin_dir: Path, monkeypatch: pytest.MonkeyPatch, log: Path, home: Path
) -> None:
    """Fake occlum and copy_bom first on PATH, and an Occlum installation at `home`."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    for name, body in (("occlum", FAKE_OCCLUM), ("copy_bom", FAKE_COPY_BOM)):
        tool = bin_dir / name
        tool.write_text(f"#!{sys.executable}\nLOG = {str(log)!r}\n{body}")
        tool.chmod(0o755)
    (home / "etc" / "template").mkdir(parents=True, exist_ok=True)
    monkeypatch.setattr(attester, "OCCLUM_DIR", home)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ.get('PATH', os.defpath)}")


# -- Occlum.json, the start script, the bom ----------------------------------------------------


def config(options: EnclaveOptions | None = None, **host: object) -> dict[str, object]:
    text = render_occlum_json(fixed_workload(), options or EnclaveOptions(), fixed_host(**host))
    doc = json.loads(text)
    assert isinstance(doc, dict)
    return doc


def test_occlum_json() -> None:
    doc = config()
    assert doc["entry_points"] == [START]
    assert doc["resource_limits"] == {
        "user_space_size": "4GB",
        "kernel_space_heap_size": "64MB",
        "kernel_space_stack_size": "1MB",
        "max_num_of_threads": 128,
    }
    assert doc["env"] == {
        "default": [
            "LD_LIBRARY_PATH=/opt/occlum/glibc/lib:/lib/x86_64-linux-gnu:"
            "/usr/lib/x86_64-linux-gnu:/opt/py/lib",
            "PYTHONPATH=/opt/venv/site-packages",
            "PYTHONNOUSERSITE=1",
            "PYTHONDONTWRITEBYTECODE=1",
            "PYTHONPYCACHEPREFIX=/tmp/ppml-pycache",
            "PPML_TEE=sgx",
            "PPML_SGX_LIBOS=occlum",
            f"PPML_KMS_CA_PEM={CA_PEM}",
            "HOME=/home/ann",
            "LANG=C.UTF-8",
            "MY_SETTING=on",
        ],
        "untrusted": ["PPML_KMS_URL"],  # the only variable the host chooses
    }
    assert doc["metadata"]["debuggable"] is False  # type: ignore[index]
    assert doc["feature"]["enable_edmm"] is False  # type: ignore[index]
    mounts = doc["mount"]
    assert isinstance(mounts, list)
    assert mounts[0]["type"] == "unionfs"
    assert [(m["target"], m["type"]) for m in mounts[1:]] == [
        ("/proc", "procfs"),
        ("/dev", "devfs"),
        ("/tmp", "ramfs"),
        ("/srv/data", "hostfs"),
    ]
    assert mounts[-1]["source"] == "/srv/data"
    text = json.dumps(doc)
    assert "/host" not in text  # no host directory but the data directories
    assert "hunter2" not in text and "PASSPHRASE" not in text and "PRIVATE KEY" not in text


def test_options_reach_occlum_json() -> None:
    doc = config(EnclaveOptions(enclave_size="16G", max_threads=256, edmm=True, debug=True))
    assert doc["metadata"]["debuggable"] is True  # type: ignore[index]
    assert doc["feature"]["enable_edmm"] is True  # type: ignore[index]
    limits = doc["resource_limits"]
    assert limits["max_num_of_threads"] == 256  # type: ignore[index]
    assert limits["user_space_size"] == "256MB"  # type: ignore[index]
    assert limits["user_space_max_size"] == "16GB"  # type: ignore[index]
    assert config(EnclaveOptions(enclave_size="512M"))["resource_limits"]["user_space_size"] == (  # type: ignore[index]
        "512MB"
    )
    for kwargs in ({"enclave_size": "3G"}, {"enclave_size": "4 GB"}, {"max_threads": 2}):
        with pytest.raises(UsageError):
            EnclaveOptions(**kwargs)  # type: ignore[arg-type]


def test_start_script_fixes_the_command() -> None:
    text = start_script(fixed_workload(), fixed_host())
    assert text.startswith("#!/opt/py/bin/python3.11\n")
    assert "os.chdir('/srv')\n" in text
    argv = "['/opt/py/bin/python3.11', '-B', '-s', 'app/job.py', '--rows', '10']"
    assert f"argv = {argv}\n" in text
    assert "sys.argv" not in text  # the host's arguments are never read
    compile(text, "start", "exec")


def test_unmeasured_code_is_refused() -> None:
    for bad in ("/srv", "/srv/app", "/opt/venv"):  # data directories are not measured
        with pytest.raises(UsageError, match="overlaps the workload's code"):
            config(data_dirs=(bad,))
    program = ResolvedCommand(
        kind="program",
        program="/usr/bin/tool",
        real="/usr/bin/tool",
        real_sha256="ef" * 32,
        flags=(),
        mode="program",
        target=None,
        args=(),
        script=None,
    )
    workload = WorkloadManifest(program, Path("/srv"), (), (), None)
    with pytest.raises(UsageError, match="--libos occlum runs Python workloads"):
        render_occlum_json(workload, EnclaveOptions(), fixed_host())


def test_bom_copies_the_interpreter_checked_and_the_import_directories() -> None:
    bom = json.loads(render_bom(fixed_workload(), fixed_host()))
    assert bom["targets"] == [
        {
            "target": "/opt/py/bin",
            "copy": [{"files": [{"name": "/opt/py/bin/python3.11", "hash": "EF" * 32}]}],
        },
        # /opt/py/lib and /opt/venv/site-packages do not exist here: nothing to copy
        {"target": "/", "mkdirs": ["proc", "dev", "tmp"]},
    ]
    host = fixed_host(python_lib=(str(Path(os.__file__).parent),), python_path=())
    bom = json.loads(render_bom(fixed_workload(), host))
    lib = str(Path(os.__file__).parent)
    assert {"target": str(Path(lib).parent), "copy": [{"dirs": [lib]}]} in bom["targets"]


# -- MRENCLAVE from the signed enclave ---------------------------------------------------------


def test_mrenclave_from_a_signed_enclave_built_byte_by_byte() -> None:
    mrenclave = bytes(range(32))
    elf: bytes = signed_enclave(mrenclave)  # type: ignore[operator]
    assert mrenclave_from_signed_enclave(elf) == mrenclave.hex()
    # Where other tools read it: 1049 bytes into the section.
    assert elf[64 + 1049 : 64 + 1081] == mrenclave


def test_malformed_signed_enclaves() -> None:
    good: bytes = signed_enclave(bytes(32))  # type: ignore[operator]
    with pytest.raises(ConfigurationError, match="not a 64-bit ELF"):
        mrenclave_from_signed_enclave(b"MZ" + good[2:])
    with pytest.raises(ConfigurationError, match=r"no \.note\.sgxmeta section"):
        mrenclave_from_signed_enclave(signed_enclave(bytes(32), b".note.sgxmetb"))  # type: ignore[operator]
    with pytest.raises(ConfigurationError, match="section table is damaged"):
        mrenclave_from_signed_enclave(good[:-70])
    bad = bytearray(good)
    bad[64 + 25 + 64] ^= 0xFF  # the SIGSTRUCT's first header byte
    with pytest.raises(ConfigurationError, match="headers"):
        mrenclave_from_signed_enclave(bytes(bad))


# -- the pipeline with fake Occlum tools -------------------------------------------------------


@pytest.fixture
def real_workload(tmp_path: Path) -> WorkloadManifest:
    """A workload of this interpreter whose files exist: /srv/app stands at tmp_path/srv/app."""
    from ppml.tee.manifest import build_manifest

    app = tmp_path / "srv" / "app"
    (app / "helpers").mkdir(parents=True)
    (tmp_path / "srv" / "data").mkdir()
    (app / "job.py").write_text("import helpers.maths\n")
    (app / "helpers" / "maths.py").write_text("VALUE = 1\n")
    return build_manifest([sys.executable, str(app / "job.py")], env_source={"PATH": "/usr/bin"})


def real_host(tmp_path: Path, **changes: object) -> object:
    values: dict[str, object] = {
        "start_dir": str(tmp_path / "srv"),
        "data_dirs": (str(tmp_path / "srv" / "data"),),
        "python_lib": (),
        "python_path": (),
        **changes,
    }
    return fixed_host(**values)


def test_build_fills_signs_and_reads_mrenclave(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    signing_key: Path,
    real_workload: WorkloadManifest,
) -> None:
    log = tmp_path / "log.jsonl"
    install_fake_occlum(tmp_path / "bin", monkeypatch, log, tmp_path / "opt-occlum")
    monkeypatch.setenv("PPML_PASSPHRASE", PASSPHRASE)
    work = tmp_path / "work"
    work.mkdir()
    host = real_host(tmp_path)
    options = EnclaveOptions(edmm=True)
    with occlum_build(real_workload, options, host, signing_key, parent=work) as enclave:  # type: ignore[arg-type]
        d = enclave.directory
        assert d.name == "instance" and os.stat(d.parent).st_mode & 0o777 == 0o700
        image = d / "image"
        for f in real_workload.trusted_files:  # the measured files, at their own paths
            copy = image / f.source.lstrip("/")
            assert hashlib.sha256(copy.read_bytes()).hexdigest() == f.sha256
        start = image / START.lstrip("/")
        assert start.read_text() == start_script(real_workload, host)  # type: ignore[arg-type]
        assert os.stat(start).st_mode & 0o111
        assert (image / str(tmp_path / "srv" / "data").lstrip("/")).is_dir()  # mount point
    assert list(work.iterdir()) == []  # removed afterwards
    new, copy_bom, build = read_log(log)
    assert new["argv"][1:] == ["new", str(d)]  # type: ignore[index]
    assert Path(str(copy_bom["argv"][0])).name == "copy_bom"  # type: ignore[index]
    assert copy_bom["argv"][3:] == [  # type: ignore[index]
        "--root",
        str(d / "image"),
        "--include-dir",
        str(tmp_path / "opt-occlum" / "etc" / "template"),
    ]
    assert build["argv"][1:] == ["build", "--sign-key", str(signing_key), "--enable-edmm", "Y"]  # type: ignore[index]
    assert build["cwd"] == str(d)
    assert enclave.mrenclave == build["mrenclave"]
    # The Occlum.json built is ppml's, not the template `occlum new` wrote.
    assert build["config"] == json.loads(render_occlum_json(real_workload, options, host))  # type: ignore[arg-type]
    everything = log.read_text()
    assert PASSPHRASE not in everything and "secret-key-bytes" not in everything
    assert all("PPML_PASSPHRASE" not in c["env"] for c in read_log(log))  # type: ignore[operator]


def test_a_changed_measured_file_is_refused(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    signing_key: Path,
    real_workload: WorkloadManifest,
) -> None:
    install_fake_occlum(tmp_path / "bin", monkeypatch, tmp_path / "log", tmp_path / "occlum")
    (tmp_path / "srv" / "app" / "helpers" / "maths.py").write_text("import os; os.system('x')\n")
    with (
        pytest.raises(UsageError, match=r"maths.py changed since it was measured"),
        occlum_build(real_workload, EnclaveOptions(), real_host(tmp_path), signing_key),  # type: ignore[arg-type]
    ):
        pass
    # The interpreter is checked by copy_bom against its measured digest.
    workload = WorkloadManifest(
        real_workload.command.__class__(
            **{
                **{
                    k: getattr(real_workload.command, k)
                    for k in real_workload.command.__dataclass_fields__
                },
                "real_sha256": "00" * 32,
            }
        ),
        real_workload.base_dir,
        (),
        (),
        None,
    )
    with (
        pytest.raises(ConfigurationError, match=r"^copy_bom failed \(exit 2\): The hash value of"),
        occlum_build(workload, EnclaveOptions(), real_host(tmp_path), signing_key),  # type: ignore[arg-type]
    ):
        pass


def test_a_failing_build_is_reported_and_leaves_nothing(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    signing_key: Path,
    real_workload: WorkloadManifest,
) -> None:
    install_fake_occlum(tmp_path / "bin", monkeypatch, tmp_path / "log", tmp_path / "occlum")
    monkeypatch.setenv("FAKE_FAIL", "occlum-build")
    work = tmp_path / "work"
    work.mkdir()
    with (
        pytest.raises(ConfigurationError) as info,
        occlum_build(
            real_workload,
            EnclaveOptions(),
            real_host(tmp_path),  # type: ignore[arg-type]
            signing_key,
            parent=work,
        ),
    ):
        pass
    assert str(info.value) == (
        "occlum failed (exit 1): Error: invalid signing key path: the key must be RSA-3072"
    )
    assert list(work.iterdir()) == []
    signing_key.chmod(0o644)
    with (
        pytest.raises(ConfigurationError, match="readable by others"),
        occlum_build(real_workload, EnclaveOptions(), real_host(tmp_path), signing_key),  # type: ignore[arg-type]
    ):
        pass


# -- ppml run --tee sgx --libos occlum ---------------------------------------------------------


def occlum_run(*options: str, script: str = "app/job.py") -> tuple[int, str, str]:
    return ppml("run", "--tee", "sgx", "--libos", "occlum", *options, "--", sys.executable, script)


@pytest.fixture
def fake_occlum(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    log = tmp_path / "log.jsonl"
    install_fake_occlum(tmp_path / "bin", monkeypatch, log, tmp_path / "opt-occlum")
    device = tmp_path / "sgx_enclave"
    device.touch()
    monkeypatch.setattr(attester, "SGX_DEVICE", device)
    return log


@pytest.mark.parametrize("missing", ["occlum", "copy_bom", "/opt/occlum", "/dev/sgx_enclave"])
def test_missing_occlum_is_named(
    project: Path, tmp_path: Path, fake_occlum: Path, monkeypatch: pytest.MonkeyPatch, missing: str
) -> None:
    if missing.startswith("/opt"):
        monkeypatch.setattr(attester, "OCCLUM_DIR", tmp_path / "no-occlum")
        expected = f"{tmp_path / 'no-occlum'} not present ({HINT})"
    elif missing.startswith("/dev"):
        monkeypatch.setattr(attester, "SGX_DEVICE", tmp_path / "absent")
        expected = f"{tmp_path / 'absent'} not present: this machine has no SGX"
    else:
        (tmp_path / "bin" / missing).unlink()
        monkeypatch.setenv("PATH", str(tmp_path / "bin"))
        expected = f"{missing} not found on PATH ({HINT})"
    code, out, err = occlum_run("--data", "data")
    assert code == 5 and out == ""
    assert err == f"ppml: configuration error: {expected}\n"
    assert not fake_occlum.exists()  # nothing was started


def test_libos_refusals(project: Path, fake_occlum: Path) -> None:
    code, _, err = ppml("run", "--tee", "sim", "--libos", "occlum", "--", sys.executable, "x.py")
    assert code == 2 and "--libos chooses the SGX library OS" in err
    code, _, err = ppml("run", "--tee", "sgx", "--libos", "graphene", "--", "python", "x.py")
    assert code == 2 and "available: gramine, occlum" in err
    code, _, err = occlum_run("--enclave-size", "3G")
    assert code == 2 and "power of two" in err
    assert not fake_occlum.exists()


def test_occlum_measure_prints_mrenclave(
    project: Path,
    workspace: Path,
    tmp_path: Path,
    fake_occlum: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(attester, "SGX_DEVICE", tmp_path / "absent")  # --measure needs no SGX
    code, out, err = occlum_run("--measure", "--data", "data")
    assert code == 0, err
    calls = read_log(fake_occlum)
    assert [c["argv"][1] for c in calls] == ["new", "--file", "build"]  # type: ignore[index]
    assert out == f"{calls[-1]['mrenclave']}\n"
    key = Workspace.open(workspace, PASSPHRASE.encode()).enclave_key_path
    assert calls[-1]["argv"][2:4] == ["--sign-key", str(workspace / key)]  # type: ignore[index]
    image = calls[-1]["image"]
    assert isinstance(image, list)
    assert str(project / "app" / "job.py").lstrip("/") in image
    assert START.lstrip("/") in image
    assert PASSPHRASE not in fake_occlum.read_text()
    # Other threads are another enclave; the data directory is apart from the code.
    code, out2, _ = occlum_run("--measure", "--data", "data", "--max-threads", "64")
    assert code == 0 and out2 != out
    code, _, err = occlum_run("--measure", "--data", "app")
    assert code == 2 and "overlaps the workload's code" in err


def test_debug_enclave_needs_a_dev_workspace(
    project: Path, tmp_path: Path, fake_occlum: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    prod = Workspace.create(tmp_path / "prod", PASSPHRASE.encode(), kdf=_kdf())
    monkeypatch.setenv("PPML_HOME", str(prod.path))
    code, _, err = occlum_run("--measure", "--data", "data", "--debug-enclave")
    assert code == 5 and "--debug-enclave runs only with a development workspace" in err


def _kdf():  # type: ignore[no-untyped-def]
    from ppml.crypto.passphrase import KdfParams

    return KdfParams.for_testing()


def test_occlum_run_starts_the_measured_command(
    project: Path, workspace: Path, tmp_path: Path, fake_occlum: Path
) -> None:
    (project / "app" / "exit3.py").write_text(
        "import os, sys\n"
        "open('data/argv.json', 'w').write(__import__('json').dumps("
        "[sys.argv, os.getcwd(), os.environ['PPML_KMS_URL']]))\n"
        "sys.exit(3)\n"
    )
    code, _, err = occlum_run("--data", "data", script="app/exit3.py")
    assert code == 3, err  # the workload's exit code, through the start script and occlum run
    *_, build, run = read_log(fake_occlum)
    assert run["argv"][1:] == ["run", START]  # type: ignore[index]
    assert Path(str(run["cwd"])).name == "instance"
    assert not Path(str(run["cwd"])).exists()  # removed afterwards
    env = run["env"]
    assert isinstance(env, dict)
    assert env["PPML_KMS_URL"].startswith("https://127.0.0.1:")
    assert not {"PPML_PASSPHRASE", "PPML_HOME", "PPML_TEE_CHANNEL"} & set(env)
    assert f"SGX enclave {build['mrenclave']} (Occlum)" in err
    argv, cwd, url = json.loads((project / "data" / "argv.json").read_text())
    assert argv == ["app/exit3.py"] and cwd == str(project) and url == env["PPML_KMS_URL"]


def test_help_names_occlum() -> None:
    result = CliRunner().invoke(app, ["run", "--help"])
    flat = " ".join(result.stdout.replace("│", " ").split())
    assert "--libos" in flat and "through Occlum with --libos occlum" in flat


# -- inside the enclave: Occlum's /dev/sgx -----------------------------------------------------

REPORT_DATA = bytes(range(64, 128))


class FakeDevSgx:
    """Occlum's two DCAP ioctls, reading and writing through the pointers ppml passes."""

    def __init__(self, size: int = 48 + 384 + 4 + 100, *, fail: int | None = None) -> None:
        self.size = size
        self.fail = fail
        self.report_data = b""

    def quote(self, report_data: bytes) -> bytes:
        quote = bytearray(self.size)
        quote[0:2] = (3).to_bytes(2, "little")
        quote[368:432] = report_data
        return bytes(quote)

    def __call__(self, fd: int, request: int, arg: object) -> int:
        assert isinstance(fd, int) and fd >= 0
        if request == self.fail:
            raise OSError(5, "Input/output error")
        if request == SGXIOC_GET_DCAP_QUOTE_SIZE:
            assert isinstance(arg, ctypes.c_uint32)
            arg.value = self.size
        elif request == SGXIOC_GEN_DCAP_QUOTE:
            report_ptr, size_ptr, quote_ptr = struct.unpack("<3Q", bytes(arg))  # type: ignore[call-overload]
            assert ctypes.c_uint32.from_address(size_ptr).value >= self.size
            self.report_data = ctypes.string_at(report_ptr, 64)
            quote = self.quote(self.report_data)
            ctypes.memmove(quote_ptr, quote, len(quote))
        else:
            raise OSError(25, "Inappropriate ioctl for device")
        return 0


def test_occlum_quote(tmp_path: Path) -> None:
    device = tmp_path / "sgx"
    device.touch()
    fake = FakeDevSgx()
    occlum = OcclumAttester(device, ioctl=fake)
    assert occlum.tee == "sgx"
    assert occlum.evidence(REPORT_DATA) == fake.quote(REPORT_DATA)
    assert fake.report_data == REPORT_DATA


def test_occlum_quote_refusals(tmp_path: Path) -> None:
    with pytest.raises(AttestationFailed, match="not running inside Occlum"):
        OcclumAttester(tmp_path / "none", ioctl=FakeDevSgx()).evidence(REPORT_DATA)
    device = tmp_path / "sgx"
    device.touch()
    for request in (SGXIOC_GET_DCAP_QUOTE_SIZE, SGXIOC_GEN_DCAP_QUOTE):
        with pytest.raises(AttestationFailed, match="refused the DCAP"):
            OcclumAttester(device, ioctl=FakeDevSgx(fail=request)).evidence(REPORT_DATA)
    with pytest.raises(AttestationFailed, match="not a quote"):
        OcclumAttester(device, ioctl=FakeDevSgx(size=10)).evidence(REPORT_DATA)

    class Stale(FakeDevSgx):
        def quote(self, report_data: bytes) -> bytes:
            return super().quote(bytes(64))

    with pytest.raises(AttestationFailed, match="Occlum returned a quote over other report data"):
        OcclumAttester(device, ioctl=Stale()).evidence(REPORT_DATA)
    with pytest.raises(UsageError):
        OcclumAttester(device, ioctl=FakeDevSgx()).evidence(b"short")


def test_evidence_source_follows_the_measured_libos(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    device = tmp_path / "sgx"
    device.touch()
    fake = FakeDevSgx()
    monkeypatch.setattr(attester, "OcclumAttester", lambda: OcclumAttester(device, ioctl=fake))
    source = evidence_source({"PPML_TEE": "sgx", "PPML_SGX_LIBOS": "occlum"})
    assert source(REPORT_DATA) == ("sgx", fake.quote(REPORT_DATA))
    gramine = evidence_source({"PPML_TEE": "sgx"})  # Gramine's /dev/attestation, absent here
    with pytest.raises(AttestationFailed, match="Gramine-SGX"):
        gramine(REPORT_DATA)
