"""`ppml attest verify` through the real `ppml` Typer app: the real vectors, synthetic quotes with
synthetic collateral, time, tampering, policy files, and `ppml policy` with hardware fields."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from tests.support.evidence.evidence import matching_collateral, root_pem
from tests.support.evidence.intel import IntelTestPki, sgx_body, sgx_quote
from tests.support.evidence.intel_collateral import write_files
from tests.support.vectors import VECTORS
from typer.testing import CliRunner

from ppml.attestation import TeeType
from ppml.cli import app
from ppml.crypto.passphrase import KdfParams
from ppml.kms.policy import Policy, Rule
from ppml.workspace import Workspace

ROOT_DIR = Path(__file__).resolve().parents[2]
SNP_DATA = ROOT_DIR / "tests" / "data" / "snp"
AT = "2025-06-01T00:00:00Z"
PKI = IntelTestPki.create(seed=31)
BODY = sgx_body(isv_prod_id=2, isv_svn=5)


def ppml(*args: str | Path) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, [str(a) for a in args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout, result.stderr


def as_json(*args: str | Path) -> tuple[int, dict[str, Any]]:
    code, out, _ = ppml("attest", "verify", *args, "--format", "json")
    return code, json.loads(out)


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("attest")
    (d / "root.pem").write_bytes(root_pem(PKI))
    (d / "quote.dat").write_bytes(sgx_quote(PKI, BODY))
    tampered = bytearray(sgx_quote(PKI, BODY))
    tampered[48 + 64] ^= 1  # a byte of MRENCLAVE: signed by the attestation key
    (d / "tampered.dat").write_bytes(bytes(tampered))
    write_files(d / "uptodate", matching_collateral(PKI))
    write_files(
        d / "outofdate",
        matching_collateral(PKI, status="OutOfDate", advisory_ids=["INTEL-SA-00828"]),
    )
    write_files(d / "nomatch", matching_collateral(PKI, match=False))
    return {
        "root": d / "root.pem",
        "quote": d / "quote.dat",
        "tampered": d / "tampered.dat",
        "uptodate": d / "uptodate",
        "outofdate": d / "outofdate",
        "nomatch": d / "nomatch",
        "dir": d,
    }


def test_real_sgx_quote() -> None:
    expected = json.loads((VECTORS / "sgx-v3-occlum" / "expected.json").read_text())["body"]
    code, doc = as_json(VECTORS / "sgx-v3-occlum" / "quote.dat", "--at", AT)
    assert code == 0, doc
    assert doc["type"] == "sgx" and doc["verified"] is True and doc["tcb_status"] == "Unknown"
    for name in ("mr_enclave", "mr_signer", "isv_prod_id", "isv_svn", "report_data"):
        assert doc["claims"][name] == expected[name]
    assert doc["claims"]["debug"] is True
    assert doc["trailing_bytes"]["length"] == 0


def test_real_tdx_quote_with_explicit_type_and_root() -> None:
    expected = json.loads((VECTORS / "tdx-v4" / "expected.json").read_text())["body"]
    code, doc = as_json(
        VECTORS / "tdx-v4" / "quote.dat",
        "--type",
        "tdx",
        "--root",
        VECTORS / "IntelSGXRootCA.pem",
        "--at",
        AT,
    )
    assert code == 0 and doc["type"] == "tdx" and doc["tcb_status"] == "Unknown"
    for name in ("mr_td", "mr_seam", "rtmr0", "rtmr1", "rtmr2", "rtmr3", "report_data"):
        assert doc["claims"][name] == expected[name]
    code, _, err = ppml("attest", "verify", VECTORS / "tdx-v4" / "quote.dat", "--type", "sgx")
    assert code == 4 and "SGX v3" in err


def test_real_snp_report_with_vcek() -> None:
    code, doc = as_json(
        SNP_DATA / "milan_report_v3.bin", "--vcek", SNP_DATA / "milan_vcek.pem", "--at", AT
    )
    assert code == 0, doc
    assert doc["type"] == "snp" and doc["tcb_status"] == "UpToDate"
    assert doc["claims"]["reported_tcb"] == {
        "bootloader": 4,
        "tee": 0,
        "snp": 24,
        "microcode": 219,
    }
    code, _, err = ppml("attest", "verify", SNP_DATA / "milan_report_v3.bin")
    assert code == 4 and "VCEK" in err


def test_synthetic_up_to_date_and_out_of_date(files: dict[str, Path]) -> None:
    base = (files["quote"], "--root", files["root"], "--at", AT)
    code, doc = as_json(*base, "--collateral", files["uptodate"])
    assert code == 0 and doc["tcb_status"] == "UpToDate" and doc["advisory_ids"] == []
    code, doc = as_json(*base, "--collateral", files["outofdate"])
    assert code == 0 and doc["tcb_status"] == "OutOfDate"
    assert doc["advisory_ids"] == ["INTEL-SA-00828"]
    code, out, err = ppml("attest", "verify", *base, "--collateral", files["nomatch"])
    assert code == 4 and "no matching TCB level" in out and "tcb_level" in err


def test_at_past_next_update_fails_unless_allowed(files: dict[str, Path]) -> None:
    late = ("--at", "2026-07-01T00:00:00Z")
    args = (files["quote"], "--root", files["root"], "--collateral", files["uptodate"], *late)
    code, out, err = ppml("attest", "verify", *args)
    assert code == 4 and "FAILED at pck_crl" in out and "expired" in err
    code, doc = as_json(*args, "--allow-outdated")
    assert code == 0 and doc["tcb_status"] == "UpToDate" and doc["notes"]


def test_tampered_quote_names_the_step(files: dict[str, Path]) -> None:
    code, out, err = ppml("attest", "verify", files["tampered"], "--root", files["root"])
    assert code == 4
    assert "FAILED at quote_signature" in out and "quote_signature" in err
    code, doc = as_json(files["tampered"], "--root", files["root"])
    assert code == 4 and doc["verified"] is False and doc["failed_step"] == "quote_signature"
    code, out, err = ppml("attest", "verify", files["quote"])  # the pinned Intel root
    assert code == 4 and "pck_chain" in err


def test_policy_file(files: dict[str, Path]) -> None:
    mr_enclave = BODY.mr_enclave.hex()
    allow = files["dir"] / "allow.json"
    allow.write_text(
        json.dumps(
            Policy(
                "k",
                (Rule(TeeType.SGX, mr_enclave, min_tcb="OutOfDate", isv_prod_id=2, min_isv_svn=5),),  # type: ignore[arg-type]
            ).to_dict()
        )
    )
    deny = files["dir"] / "deny.json"
    deny.write_text(
        json.dumps(Policy("k", (Rule(TeeType.SGX, mr_enclave, min_isv_svn=6),)).to_dict())
    )
    base = (files["quote"], "--root", files["root"], "--at", AT)
    code, doc = as_json(*base, "--collateral", files["outofdate"], "--policy", allow)
    assert code == 0 and doc["policy"]["allowed"] is True and doc["ok"] is True
    code, doc = as_json(*base, "--collateral", files["uptodate"], "--policy", deny)
    assert code == 4 and doc["policy"]["reason"] == "svn_too_low"
    code, out, err = ppml("attest", "verify", *base, "--policy", allow)  # TCB Unknown
    assert code == 4 and "tcb_too_low" in out and "policy" in err


def test_bad_arguments_exit_2(files: dict[str, Path]) -> None:
    for args in (
        ("--type", "tpm"),
        ("--at", "yesterday"),
        ("--collateral", files["dir"] / "missing"),
        ("--policy", files["dir"] / "missing.json"),
        ("--format", "xml"),
    ):
        code, _, _ = ppml("attest", "verify", files["quote"], *args)
        assert code == 2, args
    assert ppml("attest", "verify", files["dir"] / "nothing.dat")[0] == 2


def test_help_explains_every_option() -> None:
    code, out, _ = ppml("attest", "verify", "--help")
    assert code == 0
    for option in ("--type", "--root", "--collateral", "--at", "--policy", "--allow-outdated",
                   "--vcek", "--format"):  # fmt: skip
        assert option in out


def test_policy_commands_with_hardware_fields(tmp_path: Path) -> None:
    passphrase = tmp_path / "pass"
    passphrase.write_bytes(b"attest cli passphrase\n")
    ws = Workspace.create(tmp_path / "ws", b"attest cli passphrase", kdf=KdfParams.for_testing())
    with ws.key_service() as keys:
        keys.create_key("sales")
    common = ("--workspace", ws.path, "--passphrase-file", passphrase, "--format", "json")
    m = "ab" * 32
    code, out, err = ppml("policy", "allow", "sales", "--tee", "sgx", "--measurement", m, *common)
    assert code == 0, err
    code, out, err = ppml(
        "policy", "allow", "sales", "--tee", "sgx", "--measurement", "cd" * 32,
        "--mr-signer", "ef" * 32, "--isv-prod-id", "3", "--min-isv-svn", "2", *common,
    )  # fmt: skip
    assert code == 0, err
    rules = json.loads(out)["rules"]
    assert {"mr_signer": "ef" * 32, "isv_prod_id": 3, "min_isv_svn": 2}.items() <= rules[1].items()
    code, out, err = ppml(
        "policy", "allow", "sales", "--tee", "snp", "--measurement", "12" * 48,
        "--no-migration-agent", "--min-reported-tcb", "bootloader=4,snp=24", *common,
    )  # fmt: skip
    assert code == 0, err
    snp = json.loads(out)["rules"][-1]
    assert snp["migration_agent_ok"] is False
    assert snp["min_reported_tcb"] == {"bootloader": 4, "snp": 24}
    code, _, err = ppml(
        "policy", "allow", "sales", "--tee", "tdx", "--measurement", "12" * 48,
        "--rtmr", "5=" + "00" * 48, *common,
    )  # fmt: skip
    assert code == 2 and "--rtmr" in err
    code, _, err = ppml(
        "policy", "allow", "sales", "--tee", "sgx", "--measurement", m, "--mr-seam", "00" * 48,
        *common,
    )  # fmt: skip
    assert code == 2 and "another TEE type" in err
    policy_file = tmp_path / "p.json"
    policy_file.write_text(json.dumps({"rules": [{"tee": "tdx", "measurement": "34" * 48,
                                                  "debug_ok": False, "min_tcb": "UpToDate",
                                                  "rtmr1": "56" * 48}]}))  # fmt: skip
    code, out, err = ppml("policy", "set", "sales", "--file", policy_file, *common)
    assert code == 0, err
    assert json.loads(out)["rules"] == json.loads(policy_file.read_text())["rules"]
    code, out, _ = ppml("policy", "show", "sales", *common[:-2])
    assert "rtmr1: " + "56" * 48 in out
