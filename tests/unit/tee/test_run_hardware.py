"""`ppml run --tee sgx|tdx|snp` through the CLI: what is missing is named before anything is
opened or started; `--measure` prints MRENCLAVE; a run launches `gramine-sgx` (a fake one here)
or hands configfs-tsm reports (from an emulated kernel) to the workload."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from tests.unit.tee.test_gramine_manifest import install_fake_gramine, read_log
from tests.unit.tee.test_tsm_client import FakeKernel
from typer.testing import CliRunner

from ppml.cli import app
from ppml.crypto.passphrase import KdfParams
from ppml.tee import attester, tsm
from ppml.workspace import Workspace

PASSPHRASE = "hardware run passphrase"
HINT = "install Gramine: https://gramine.readthedocs.io/en/stable/installation.html"
TSM_MISSING = (
    "not present: not a TDX/SNP guest or configfs not mounted, or the kernel is older than 6.7"
)
JOB = "print('hello from the workload')\n"


def ppml(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, list(args))
    return result.exit_code, result.stdout, result.stderr


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """app/job.py and data/, as the current directory; no workspace at $PPML_HOME (anything
    that opened one would fail differently)."""
    d = tmp_path / "project"
    (d / "app").mkdir(parents=True)
    (d / "data").mkdir()
    (d / "app" / "job.py").write_text(JOB)
    monkeypatch.chdir(d)
    monkeypatch.setenv("PPML_HOME", str(tmp_path / "no-workspace"))
    monkeypatch.setenv("PPML_PASSPHRASE", PASSPHRASE)
    return d


@pytest.fixture
def workspace(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    ws = Workspace.create(
        tmp_path / "ws", PASSPHRASE.encode(), dev=True, kdf=KdfParams.for_testing()
    )
    monkeypatch.setenv("PPML_HOME", str(ws.path))
    return ws.path


def run(*options: str) -> tuple[int, str, str]:
    return ppml("run", *options, "--", sys.executable, "app/job.py")


# -- missing hardware --------------------------------------------------------------------------


@pytest.mark.parametrize("missing", ["gramine-manifest", "gramine-sgx-sign", "gramine-sgx"])
def test_sgx_without_gramine(
    project: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, missing: str
) -> None:
    install_fake_gramine(tmp_path / "bin", monkeypatch, tmp_path / "log.jsonl")
    (tmp_path / "bin" / missing).unlink()
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    code, out, err = run("--tee", "sgx", "--data", "data")
    assert code == 5 and out == ""
    assert err == f"ppml: configuration error: {missing} not found on PATH ({HINT})\n"
    assert not (tmp_path / "log.jsonl").exists()  # nothing was started


def test_sgx_without_the_enclave_device(
    project: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    install_fake_gramine(tmp_path / "bin", monkeypatch, tmp_path / "log.jsonl")
    device = tmp_path / "dev" / "sgx_enclave"
    monkeypatch.setattr(attester, "SGX_DEVICE", device)
    code, _, err = run("--tee", "sgx", "--data", "data")
    assert code == 5
    assert err == f"ppml: configuration error: {device} not present: this machine has no SGX\n"
    assert not (tmp_path / "log.jsonl").exists()


@pytest.mark.skipif(Path("/dev/sgx_enclave").exists(), reason="this machine has SGX")
def test_sgx_device_message_on_this_machine(
    project: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    install_fake_gramine(tmp_path / "bin", monkeypatch, tmp_path / "log.jsonl")
    code, _, err = run("--tee", "sgx", "--data", "data")
    assert code == 5
    assert err == (
        "ppml: configuration error: /dev/sgx_enclave not present: this machine has no SGX\n"
    )


@pytest.mark.parametrize("tee", ["tdx", "snp"])
def test_tdx_snp_without_configfs_tsm(
    project: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tee: str
) -> None:
    base = tmp_path / "config" / "tsm" / "report"
    monkeypatch.setattr(attester, "TSM_REPORT_DIR", base)
    code, _, err = run("--tee", tee)
    assert code == 5
    assert err == f"ppml: configuration error: {base} {TSM_MISSING}\n"


@pytest.mark.skipif(Path("/sys/kernel/config/tsm/report").exists(), reason="a TDX/SNP guest")
def test_tsm_message_on_this_machine(project: Path) -> None:
    code, _, err = run("--tee", "tdx")
    assert code == 5
    assert err == f"ppml: configuration error: /sys/kernel/config/tsm/report {TSM_MISSING}\n"


def test_wrong_guest_kind(project: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    base = tmp_path / "report"
    base.mkdir()
    monkeypatch.setattr(attester, "TSM_REPORT_DIR", base)
    monkeypatch.setattr(tsm, "ConfigfsOps", lambda: FakeKernel("sev_guest"))
    code, _, err = run("--tee", "tdx")
    assert code == 5
    assert err == (
        "ppml: configuration error: configfs-tsm provider is 'sev_guest', not 'tdx_guest' as "
        "--tee tdx needs: this is an AMD SEV-SNP guest (use --tee snp)\n"
    )
    assert list(base.iterdir()) == []


def test_unknown_backend_and_measure_on_a_vm(project: Path) -> None:
    code, _, err = run("--tee", "sev")
    assert code == 2 and "available: sim, sgx, tdx, snp" in err
    code, _, err = run("--tee", "tdx", "--measure")
    assert code == 2 and "MRTD" in err


def test_help_documents_the_backends() -> None:
    code, out, _ = ppml("run", "--help")
    assert code == 0
    flat = " ".join(out.replace("│", " ").split())
    for text in ("sgx (an Intel SGX enclave through Gramine", "tdx or snp", "--debug-enclave"):
        assert text in flat


# -- sgx with fake Gramine tools ---------------------------------------------------------------


def test_sgx_measure_prints_mrenclave(
    project: Path, workspace: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = tmp_path / "log.jsonl"
    install_fake_gramine(tmp_path / "bin", monkeypatch, log)
    monkeypatch.setattr(attester, "SGX_DEVICE", tmp_path / "absent")  # --measure needs no SGX
    code, out, err = run("--tee", "sgx", "--measure", "--data", "data")
    assert code == 0, err
    calls = read_log(log)
    assert out == f"{calls[-1]['mrenclave']}\n"
    assert [Path(str(c["argv"][0])).name for c in calls] == [  # type: ignore[index]
        "gramine-manifest",
        "gramine-sgx-sign",
    ]
    key = str(workspace / Workspace.open(workspace, PASSPHRASE.encode()).enclave_key_path)
    assert calls[1]["argv"][1:3] == ["--key", key]  # type: ignore[index]
    assert PASSPHRASE not in log.read_text()
    # Another enclave size is another enclave.
    code, out2, _ = run("--tee", "sgx", "--measure", "--data", "data", "--enclave-size", "8G")
    assert code == 0 and out2 != out


def test_sgx_data_must_be_apart_from_code(
    project: Path, workspace: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    install_fake_gramine(tmp_path / "bin", monkeypatch, tmp_path / "log.jsonl")
    code, _, err = run("--tee", "sgx", "--measure", "--data", "app")
    assert code == 2 and "overlaps the workload's code" in err


def test_debug_enclave_needs_a_dev_workspace(
    project: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    prod = Workspace.create(tmp_path / "prod", PASSPHRASE.encode(), kdf=KdfParams.for_testing())
    monkeypatch.setenv("PPML_HOME", str(prod.path))
    install_fake_gramine(tmp_path / "bin", monkeypatch, tmp_path / "log.jsonl")
    code, _, err = run("--tee", "sgx", "--measure", "--data", "data", "--debug-enclave")
    assert code == 5 and "--debug-enclave runs only with a development workspace" in err


def test_sgx_run_launches_gramine_sgx(
    project: Path, workspace: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = tmp_path / "log.jsonl"
    install_fake_gramine(tmp_path / "bin", monkeypatch, log)
    device = tmp_path / "sgx_enclave"
    device.touch()
    monkeypatch.setattr(attester, "SGX_DEVICE", device)
    (tmp_path / "bin" / "exit-code").write_text("3")
    code, _, err = run("--tee", "sgx", "--data", "data")
    assert code == 3, err  # the workload's exit code
    _, sign_call, sgx_call = read_log(log)
    argv = sgx_call["argv"]
    assert Path(str(argv[0])).name == "gramine-sgx"  # type: ignore[index]
    assert Path(str(argv[1])).name == "workload"  # type: ignore[index]
    assert not Path(str(argv[1])).parent.exists()  # type: ignore[index]  # removed afterwards
    env = sgx_call["env"]
    assert isinstance(env, dict)
    assert env["PPML_KMS_URL"].startswith("https://127.0.0.1:")
    assert not {"PPML_PASSPHRASE", "PPML_HOME", "PPML_TEE_CHANNEL"} & set(env)
    assert f"SGX enclave {sign_call['mrenclave']}" in err
    assert PASSPHRASE not in log.read_text()


# -- tdx / snp with an emulated configfs-tsm ---------------------------------------------------

WORKLOAD = """\
import json, sys
from ppml.tee.channel import request_evidence
report_data = bytes(range(64))
tee, evidence = request_evidence(report_data)
with open(sys.argv[1], "w") as fh:
    json.dump({"tee": tee, "size": len(evidence), "bound": report_data.hex() in evidence.hex()}, fh)
"""


@pytest.mark.parametrize(("tee", "provider"), [("tdx", "tdx_guest"), ("snp", "sev_guest")])
def test_vm_run_hands_reports_to_the_workload(
    project: Path,
    workspace: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    tee: str,
    provider: str,
) -> None:
    base = tmp_path / "report"
    base.mkdir()
    kernel = FakeKernel(provider)
    monkeypatch.setattr(attester, "TSM_REPORT_DIR", base)
    monkeypatch.setattr(tsm, "ConfigfsOps", lambda: kernel)
    (project / "app" / "attest.py").write_text(WORKLOAD)
    result = project / "data" / "result.json"  # the workload writes to its data directories only
    code, _, err = ppml(
        "run", "--tee", tee, "--data", "data", "--", sys.executable, "app/attest.py", str(result)
    )
    assert code == 0, err
    assert json.loads(result.read_text()) == {
        "tee": tee,
        "size": len(kernel_report(provider)),
        "bound": True,
    }
    assert kernel.reports == 1 and list(base.iterdir()) == []
    assert "SIMULATED" not in err


def kernel_report(provider: str) -> bytes:
    from tests.unit.tee.test_tsm_client import fake_report

    return fake_report(provider, bytes(64))


def test_vm_report_failure_reaches_the_workload_as_a_refusal(
    project: Path, workspace: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    base = tmp_path / "report"
    base.mkdir()
    kernel = FakeKernel("tdx_guest")
    kernel.fail_outblob = OSError(5, "Input/output error")
    monkeypatch.setattr(attester, "TSM_REPORT_DIR", base)
    monkeypatch.setattr(tsm, "ConfigfsOps", lambda: kernel)
    (project / "app" / "attest.py").write_text(WORKLOAD)
    result = project / "data" / "result.json"
    code, _, _ = ppml(
        "run", "--tee", "tdx", "--data", "data", "--", sys.executable, "app/attest.py", str(result)
    )
    assert code == 1  # the workload's AttestationFailed; the launcher did not hang
    assert not result.exists() and list(base.iterdir()) == []
