"""Intel PCS collateral: loading, strict parsing, signatures over the exact bytes, issuer chains,
freshness and CRLs."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from tests.support.evidence.intel_collateral import (
    DEFAULT_QE_MRSIGNER,
    TestPki,
    build_files,
    collateral_from_files,
    isv_level,
    make_cert,
    make_crl,
    module_identity,
    qe_identity_body,
    signed_document,
    tcb_info_body,
    tcb_level,
    write_files,
)

from ppml.attestation.claims import TcbStatus
from ppml.attestation.collateral import Collateral
from ppml.attestation.intel.collateral import (
    RevocationChecker,
    extract_signed_body,
    parse_crl,
    parse_pem_chain,
    parse_qe_identity_json,
    parse_tcb_info_json,
)
from ppml.attestation.intel.tcb import PlatformTcb, QeReportInfo, TcbOutcome, evaluate
from ppml.attestation.intel.verified import verify_crls
from ppml.attestation.steps import StepStatus
from ppml.errors import EvidenceError

AT = dt.datetime(2025, 1, 15, tzinfo=dt.UTC)


@pytest.fixture(scope="module")
def pki() -> TestPki:
    return TestPki.create()


PLATFORM = PlatformTcb(
    fmspc=bytes.fromhex("00906ed50000"),
    pce_id=b"\x00\x00",
    sgx_tcb_components=(2,) * 16,
    pce_svn=13,
)
QE = QeReportInfo(
    mr_signer=bytes.fromhex(DEFAULT_QE_MRSIGNER),
    isv_prod_id=1,
    isv_svn=8,
    misc_select=0,
    attributes=bytes.fromhex("11000000000000000000000000000000"),
)


def _eval(files: dict[str, bytes], pki: TestPki, *, at: dt.datetime = AT, **kw: object):  # type: ignore[no-untyped-def]
    return evaluate(
        collateral_from_files(files), PLATFORM, QE, root=pki.root, at=at, tee="sgx", **kw
    )  # type: ignore[arg-type]


def _full(pki: TestPki, **kw: object) -> dict[str, bytes]:
    return build_files(pki, tcb_info=tcb_info_body(), qe_identity=qe_identity_body(), **kw)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- loading


def test_from_dir_loads_and_verifies_everything(pki: TestPki, tmp_path: Path) -> None:
    write_files(tmp_path, _full(pki))
    collateral = Collateral.from_dir(tmp_path)
    report, result = evaluate(collateral, PLATFORM, QE, root=pki.root, at=AT, tee="sgx")
    assert report.verified, report.to_list()
    assert result.outcome is TcbOutcome.EVALUATED
    assert result.status is TcbStatus.UP_TO_DATE
    assert [s.name for s in report.steps] == [
        "root_ca_crl_signature",
        "root_ca_crl_fresh",
        "pck_crl_signature",
        "pck_crl_fresh",
        "tcb_info_signature",
        "tcb_info_fresh",
        "qe_identity_signature",
        "qe_identity_fresh",
        "issuer_revocation",
        "tcb_info_match",
        "qe_identity_match",
        "tcb_level",
    ]


def test_from_dir_pem_crls(pki: TestPki, tmp_path: Path) -> None:
    write_files(tmp_path, _full(pki, pem_crls=True))
    collateral = Collateral.from_dir(tmp_path)
    assert collateral.pck_crl is not None and collateral.pck_crl.startswith(b"-----BEGIN")
    report, _ = evaluate(collateral, PLATFORM, QE, root=pki.root, at=AT, tee="sgx")
    assert report.verified


def test_from_dir_empty_directory_is_no_collateral(pki: TestPki, tmp_path: Path) -> None:
    collateral = Collateral.from_dir(tmp_path)
    assert collateral.empty
    report, result = evaluate(collateral, PLATFORM, QE, root=pki.root, at=AT, tee="sgx")
    assert result.outcome is TcbOutcome.NO_COLLATERAL
    assert result.status is TcbStatus.UNKNOWN
    assert all(s.status is StepStatus.NOT_CHECKED for s in report.steps)


def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(EvidenceError, match="does not exist"):
        Collateral.from_dir(tmp_path / "nope")


@pytest.mark.parametrize(
    ("drop", "named"),
    [
        ("tcb_info_issuer_chain.pem", "tcb_info.json"),
        ("tcb_info.json", "tcb_info_issuer_chain.pem"),
        ("qe_identity_issuer_chain.pem", "qe_identity.json"),
        ("pck_crl_issuer_chain.pem", "pck_crl"),
    ],
)
def test_part_without_its_chain(pki: TestPki, tmp_path: Path, drop: str, named: str) -> None:
    files = _full(pki)
    del files[drop]
    write_files(tmp_path, files)
    with pytest.raises(EvidenceError, match=named):
        Collateral.from_dir(tmp_path)


def test_both_der_and_pem_crl(pki: TestPki, tmp_path: Path) -> None:
    files = _full(pki)
    files["pck_crl.pem"] = make_crl(pki.pck_ca, pki.pck_ca_key, pem=True)
    write_files(tmp_path, files)
    with pytest.raises(EvidenceError, match="pck_crl"):
        Collateral.from_dir(tmp_path)


@pytest.mark.parametrize(
    "name",
    [
        "tcb_info.json",
        "qe_identity.json",
        "tcb_info_issuer_chain.pem",
        "pck_crl.der",
        "root_ca_crl.der",
    ],
)
def test_malformed_file_is_named(pki: TestPki, tmp_path: Path, name: str) -> None:
    files = _full(pki)
    files[name] = b"garbage"
    write_files(tmp_path, files)
    with pytest.raises(EvidenceError, match=name.split(".")[0]):
        Collateral.from_dir(tmp_path)


def test_unreadable_file_is_named(pki: TestPki, tmp_path: Path) -> None:
    files = _full(pki)
    del files["tcb_info.json"]
    write_files(tmp_path, files)
    (tmp_path / "tcb_info.json").mkdir()
    with pytest.raises(EvidenceError, match=r"tcb_info\.json"):
        Collateral.from_dir(tmp_path)


# --------------------------------------------------------------------------- parsing


def test_parse_v3_tdx_fields(pki: TestPki) -> None:
    body = tcb_info_body(
        tee="tdx",
        module_identities=[module_identity("TDX_01", [isv_level(2), isv_level(0, "OutOfDate")])],
        levels=[tcb_level(tdx=(1,) * 16, advisory_ids=["INTEL-SA-00001"])],
    )
    body["tcbLevels"][0]["tcb"]["sgxtcbcomponents"][0].update(category="BIOS", type="Microcode")
    signed = parse_tcb_info_json(signed_document("tcbInfo", body, pki.signing_key))
    info = signed.body
    assert (info.id, info.version, info.fmspc.hex(), info.pce_id) == (
        "TDX",
        3,
        "00906ed50000",
        b"\0\0",
    )
    assert info.tcb_evaluation_data_number == 17
    level = info.tcb_levels[0]
    assert (
        level.sgx_components[0].category == "BIOS" and level.sgx_components[0].type == "Microcode"
    )
    assert level.tdx_svns == (1,) * 16 and level.advisory_ids == ("INTEL-SA-00001",)
    assert info.tdx_module is not None and info.tdx_module.mr_signer == bytes(48)
    assert info.tdx_module_identities[0].tcb_levels[1].status is TcbStatus.OUT_OF_DATE
    assert info.issue_date == dt.datetime(2025, 1, 1, tzinfo=dt.UTC)


def test_parse_v2(pki: TestPki) -> None:
    body = tcb_info_body(version=2, levels=[tcb_level(version=2, sgx=range(16))])
    info = parse_tcb_info_json(signed_document("tcbInfo", body, pki.signing_key)).body
    assert info.id == "SGX" and info.version == 2
    assert info.tcb_levels[0].sgx_svns == tuple(range(16)) and info.tcb_levels[0].tdx_svns is None


def test_parse_qe_identity(pki: TestPki) -> None:
    doc = signed_document("enclaveIdentity", qe_identity_body(ident="TD_QE"), pki.signing_key)
    ident = parse_qe_identity_json(doc).body
    assert ident.id == "TD_QE" and ident.miscselect_mask == 0xFFFFFFFF
    assert ident.attributes_mask == bytes.fromhex("FBFFFFFFFFFFFFFF0000000000000000")
    assert ident.tcb_levels[0].isv_svn == 8


@pytest.mark.parametrize(
    "change",
    [
        lambda b: b.update(extra=1),
        lambda b: b.pop("fmspc"),
        lambda b: b.update(fmspc="00906ed5000"),
        lambda b: b.update(version=4),
        lambda b: b.update(version=3.0),
        lambda b: b.update(tcbType=1),
        lambda b: b.update(issueDate="2025-01-01 00:00:00"),
        lambda b: b.update(tcbLevels=[]),
        lambda b: b["tcbLevels"][0].update(tcbStatus="Unknown"),
        lambda b: b["tcbLevels"][0].update(advisoryIDs=["x y"]),
        lambda b: b["tcbLevels"][0]["tcb"]["sgxtcbcomponents"].pop(),
        lambda b: b["tcbLevels"][0]["tcb"]["sgxtcbcomponents"][0].update(svn=256),
        lambda b: b["tcbLevels"][0]["tcb"].update(pcesvn=True),
        lambda b: b.update(tdxModule={}),
        lambda b: b["tcbLevels"].append(dict(b["tcbLevels"][0])),
    ],
)
def test_strict_tcb_info_fields(pki: TestPki, change) -> None:  # type: ignore[no-untyped-def]
    body = tcb_info_body()
    change(body)
    with pytest.raises(EvidenceError, match=r"tcb_info\.json"):
        parse_tcb_info_json(signed_document("tcbInfo", body, pki.signing_key))


def test_tdx_tcb_info_needs_tdx_components(pki: TestPki) -> None:
    body = tcb_info_body(tee="tdx", levels=[tcb_level()])
    with pytest.raises(EvidenceError, match="tdxtcbcomponents"):
        parse_tcb_info_json(signed_document("tcbInfo", body, pki.signing_key))


@pytest.mark.parametrize(
    "change",
    [
        lambda b: b.update(id="XE"),
        lambda b: b.update(version=1),
        lambda b: b.update(mrsigner="00"),
        lambda b: b.pop("isvprodid"),
        lambda b: b.update(tcbLevels=[isv_level(1), isv_level(1)]),
    ],
)
def test_strict_qe_identity_fields(pki: TestPki, change) -> None:  # type: ignore[no-untyped-def]
    body = qe_identity_body()
    change(body)
    with pytest.raises(EvidenceError, match=r"qe_identity\.json"):
        parse_qe_identity_json(signed_document("enclaveIdentity", body, pki.signing_key))


# --------------------------------------------------------------------------- exact bytes


def _tcb_sig_step(pki: TestPki, document: bytes) -> StepStatus:
    files = _full(pki)
    files["tcb_info.json"] = document
    report, _ = _eval(files, pki)
    return report.step("tcb_info_signature").status


def test_signature_is_over_the_exact_body_bytes(pki: TestPki) -> None:
    compact = json.dumps(tcb_info_body(), separators=(",", ":")).encode()
    spaced = json.dumps(tcb_info_body(), indent=2).encode()
    assert _tcb_sig_step(pki, signed_document("tcbInfo", spaced, pki.signing_key)) == "passed"
    # Signed compact, but the file holds the same JSON with different white space inside.
    moved = signed_document("tcbInfo", spaced, pki.signing_key, sign_over=compact)
    assert _tcb_sig_step(pki, moved) == "failed"
    one_space = compact.replace(b'"version":3', b'"version": 3')
    assert (
        _tcb_sig_step(
            pki, signed_document("tcbInfo", one_space, pki.signing_key, sign_over=compact)
        )
        == "failed"
    )


def test_white_space_and_order_outside_the_body_do_not_matter(pki: TestPki) -> None:
    template = b'\n {  "signature" : "<SIG>" ,\r\n\t"<KEY>" :<BODY>  }\n\n'
    doc = signed_document("tcbInfo", tcb_info_body(), pki.signing_key, template=template)
    assert _tcb_sig_step(pki, doc) == "passed"


def test_broken_signature(pki: TestPki) -> None:
    doc = signed_document("tcbInfo", tcb_info_body(), pki.signing_key, corrupt_signature=True)
    assert _tcb_sig_step(pki, doc) == "failed"
    other = ec.generate_private_key(ec.SECP256R1())
    assert _tcb_sig_step(pki, signed_document("tcbInfo", tcb_info_body(), other)) == "failed"


def test_broken_qe_identity_signature(pki: TestPki) -> None:
    files = _full(pki)
    files["qe_identity.json"] = signed_document(
        "enclaveIdentity", qe_identity_body(), pki.signing_key, corrupt_signature=True
    )
    report, result = _eval(files, pki)
    assert report.step("qe_identity_signature").status is StepStatus.FAILED
    assert report.step("qe_identity_match").status is StepStatus.SKIPPED
    assert result.outcome is TcbOutcome.FAILED and result.status is None


def test_extracted_span_is_byte_exact() -> None:
    body = b'{ "a" : [1, 2,\n3], "b": "\\u00e9\xc3\xa9" }'
    doc = b'{"x":' + body + b', "signature":"' + b"ab" * 64 + b'"}'
    raw, parsed, sig = extract_signed_body(doc, "x", source="t")
    assert raw == body and parsed["a"] == [1, 2, 3] and sig == b"\xab" * 64


@pytest.mark.parametrize(
    "doc",
    [
        b'{"tcbInfo":{"a":1},"tcbInfo":{"a":2},"signature":"<SIG>"}',
        b'{"tcbInfo":{"a":1,"a":2},"signature":"<SIG>"}',
        b'{"tcbInfo":{"a":[{"b":1,"b":1}]},"signature":"<SIG>"}',
        b'{"tcbInfo":{"a":1},"signature":"<SIG>","signature":"<SIG>"}',
        b'{"tcbInfo":{"a":1},"signature":"<SIG>"} {}',
        b'{"tcbInfo":{"a":1},"signature":"<SIG>","x":1}',
        b'{"tcbInfo":{"a":1}}',
        b'{"tcbInfo":[1],"signature":"<SIG>"}',
        b'{"tcbInfo":{"a":NaN},"signature":"<SIG>"}',
        b'{"tcbInfo":{"a":1},"signature":"abcd"}',
        b'{"tcbInfo":{"a":1},"signature":"<SIG>",}',
        b'\xef\xbb\xbf{"tcbInfo":{"a":1},"signature":"<SIG>"}',
        b'{"tcbInfo":{"a":1}\x00,"signature":"<SIG>"}',
        b"",
    ],
)
def test_malformed_signed_documents(doc: bytes) -> None:
    doc = doc.replace(b"<SIG>", b"00" * 64)
    with pytest.raises(EvidenceError, match="source"):
        extract_signed_body(doc, "tcbInfo", source="source")


def test_duplicate_body_key_is_refused_with_a_valid_signature(pki: TestPki) -> None:
    template = b'{"<KEY>":<BODY>,"<KEY>":{"version":3},"signature":"<SIG>"}'
    doc = signed_document("tcbInfo", tcb_info_body(), pki.signing_key, template=template)
    with pytest.raises(EvidenceError, match="duplicate key"):
        parse_tcb_info_json(doc)


# --------------------------------------------------------------------------- chains


def test_chain_to_another_root_fails(pki: TestPki) -> None:
    other = TestPki.create()
    files = _full(pki)
    files["tcb_info.json"] = signed_document("tcbInfo", tcb_info_body(), other.signing_key)
    files["tcb_info_issuer_chain.pem"] = other.signing_chain_pem()
    report, _ = _eval(files, pki)
    assert report.step("tcb_info_signature").status is StepStatus.FAILED
    assert "not issued by" in report.step("tcb_info_signature").detail


def test_chain_without_root_is_accepted(pki: TestPki) -> None:
    from cryptography.hazmat.primitives import serialization

    files = _full(pki)
    files["tcb_info_issuer_chain.pem"] = pki.signing.public_bytes(serialization.Encoding.PEM)
    report, _ = _eval(files, pki)
    assert report.step("tcb_info_signature").status is StepStatus.PASSED


def test_expired_signing_certificate(pki: TestPki) -> None:
    from cryptography.hazmat.primitives import serialization

    key = ec.generate_private_key(ec.SECP256R1())
    old = make_cert(
        "Test SGX TCB Signing",
        key,
        issuer=pki.root,
        issuer_key=pki.root_key,
        ca=False,
        not_after=dt.datetime(2024, 1, 1, tzinfo=dt.UTC),
    )
    files = _full(pki)
    files["tcb_info.json"] = signed_document("tcbInfo", tcb_info_body(), key)
    files["tcb_info_issuer_chain.pem"] = old.public_bytes(serialization.Encoding.PEM)
    report, _ = _eval(files, pki)
    assert "not valid at" in report.step("tcb_info_signature").detail


def test_chain_through_a_non_ca_fails(pki: TestPki) -> None:
    from cryptography.hazmat.primitives import serialization

    key = ec.generate_private_key(ec.SECP256R1())
    leaf = make_cert("leaf", key, issuer=pki.signing, issuer_key=pki.signing_key, ca=False)
    files = _full(pki)
    files["tcb_info.json"] = signed_document("tcbInfo", tcb_info_body(), key)
    files["tcb_info_issuer_chain.pem"] = b"".join(
        c.public_bytes(serialization.Encoding.PEM) for c in (leaf, pki.signing, pki.root)
    )
    report, _ = _eval(files, pki)
    assert "is not a CA" in report.step("tcb_info_signature").detail


def test_parse_pem_chain_bounds(pki: TestPki) -> None:
    with pytest.raises(EvidenceError, match="chain"):
        parse_pem_chain(b"", source="chain")
    with pytest.raises(EvidenceError, match="chain"):
        parse_pem_chain(pki.signing_chain_pem() * 3, source="chain")


# --------------------------------------------------------------------------- freshness


@pytest.mark.parametrize(
    ("at", "problem"),
    [
        (dt.datetime(2025, 2, 1, 0, 0, 1, tzinfo=dt.UTC), "expired"),
        (dt.datetime(2024, 12, 31, tzinfo=dt.UTC), "issued at"),
    ],
)
@pytest.mark.parametrize("name", ["tcb_info", "qe_identity", "pck_crl", "root_ca_crl"])
def test_freshness(pki: TestPki, at: dt.datetime, problem: str, name: str) -> None:
    # Everything else is valid over a wide window; only `name` is dated January 2025.
    wide = {"issue_date": "2020-01-01T00:00:00Z", "next_update": "2040-01-01T00:00:00Z"}
    crl_wide = {
        "last_update": dt.datetime(2020, 1, 1, tzinfo=dt.UTC),
        "next_update": dt.datetime(2040, 1, 1, tzinfo=dt.UTC),
    }
    files = build_files(
        pki,
        tcb_info=tcb_info_body() if name == "tcb_info" else tcb_info_body(**wide),  # type: ignore[arg-type]
        qe_identity=qe_identity_body() if name == "qe_identity" else qe_identity_body(**wide),  # type: ignore[arg-type]
        pck_crl=None if name == "pck_crl" else make_crl(pki.pck_ca, pki.pck_ca_key, **crl_wide),
        root_ca_crl=None if name == "root_ca_crl" else make_crl(pki.root, pki.root_key, **crl_wide),
    )
    report, result = _eval(files, pki, at=at)
    step = report.step(f"{name}_fresh")
    assert step.status is StepStatus.FAILED and problem in step.detail
    assert result.status is None
    report, result = _eval(files, pki, at=at, allow_outdated=True)
    assert report.verified, report.to_list()
    assert report.step(f"{name}_fresh").detail.startswith("outdated, allowed")
    assert result.status is TcbStatus.UP_TO_DATE and len(result.notes) == 1


def test_fresh_at_the_edges(pki: TestPki) -> None:
    files = _full(pki)
    for at in (dt.datetime(2025, 1, 1, tzinfo=dt.UTC), dt.datetime(2025, 2, 1, tzinfo=dt.UTC)):
        report, _ = _eval(files, pki, at=at)
        assert report.verified


# --------------------------------------------------------------------------- CRLs


def test_crl_signature_failures(pki: TestPki) -> None:
    rogue = ec.generate_private_key(ec.SECP256R1())
    files = _full(pki, pck_crl=make_crl(pki.pck_ca, pki.pck_ca_key, signer_key=rogue))
    report, result = _eval(files, pki)
    assert report.step("pck_crl_signature").status is StepStatus.FAILED
    assert report.step("pck_crl_fresh").status is StepStatus.SKIPPED
    assert result.outcome is TcbOutcome.FAILED
    files = _full(pki, root_ca_crl=make_crl(pki.root, pki.root_key, signer_key=rogue))
    report, _ = _eval(files, pki)
    assert report.step("root_ca_crl_signature").status is StepStatus.FAILED
    assert report.step("issuer_revocation").status is StepStatus.NOT_CHECKED


def test_crl_from_the_wrong_issuer(pki: TestPki) -> None:
    files = _full(pki, pck_crl=make_crl(pki.root, pki.root_key))
    report, _ = _eval(files, pki)
    assert "is not issued by" in report.step("pck_crl_signature").detail


def test_pck_crl_chain_to_another_root(pki: TestPki) -> None:
    other = TestPki.create()
    files = _full(pki, pck_crl=make_crl(other.pck_ca, other.pck_ca_key))
    files["pck_crl_issuer_chain.pem"] = other.pck_ca_chain_pem()
    report, _ = _eval(files, pki)
    assert report.step("pck_crl_signature").status is StepStatus.FAILED


def test_revocation_checker(pki: TestPki) -> None:
    files = _full(pki, pck_crl=make_crl(pki.pck_ca, pki.pck_ca_key, revoked_serials=[7, 9]))
    report, checker = verify_crls(collateral_from_files(files), root=pki.root, at=AT)
    assert report.verified
    assert checker.is_revoked(7, pki.pck_ca.subject)
    assert not checker.is_revoked(8, pki.pck_ca.subject)
    assert checker.covers(pki.root.subject)
    assert not checker.is_certificate_revoked(pki.signing)
    with pytest.raises(EvidenceError, match="no verified CRL"):
        RevocationChecker().is_revoked(7, pki.pck_ca.subject)


def test_outdated_crl_is_not_used_for_revocation(pki: TestPki) -> None:
    files = _full(pki)
    late = dt.datetime(2025, 3, 1, tzinfo=dt.UTC)
    _, checker = verify_crls(collateral_from_files(files), root=pki.root, at=late)
    assert not checker.covers(pki.pck_ca.subject)
    _, checker = verify_crls(
        collateral_from_files(files), root=pki.root, at=late, allow_outdated=True
    )
    assert checker.covers(pki.pck_ca.subject)


def test_revoked_tcb_signing_certificate(pki: TestPki) -> None:
    crl = make_crl(pki.root, pki.root_key, revoked_serials=[pki.signing.serial_number])
    report, result = _eval(_full(pki, root_ca_crl=crl), pki)
    step = report.step("issuer_revocation")
    assert step.status is StepStatus.FAILED and "Test SGX TCB Signing" in step.detail
    assert report.step("tcb_level").status is StepStatus.SKIPPED
    assert result.outcome is TcbOutcome.FAILED and result.status is None


def test_revoked_pck_ca(pki: TestPki) -> None:
    crl = make_crl(pki.root, pki.root_key, revoked_serials=[pki.pck_ca.serial_number])
    report, _ = _eval(_full(pki, root_ca_crl=crl), pki)
    assert "Test SGX PCK Platform CA" in report.step("issuer_revocation").detail


def test_parse_crl_rejects_garbage() -> None:
    for data in (
        b"",
        b"\x30\x03\x02\x01\x01",
        b"-----BEGIN X509 CRL-----\nAAAA\n-----END X509 CRL-----\n",
    ):
        with pytest.raises(EvidenceError, match="crl"):
            parse_crl(data, source="crl")


def test_no_crls_are_not_checked(pki: TestPki) -> None:
    files = build_files(pki, tcb_info=tcb_info_body(), qe_identity=qe_identity_body())
    for name in ("pck_crl.der", "pck_crl_issuer_chain.pem", "root_ca_crl.der"):
        del files[name]
    report, result = _eval(files, pki)
    assert report.step("pck_crl_signature").status is StepStatus.NOT_CHECKED
    assert report.step("issuer_revocation").status is StepStatus.NOT_CHECKED
    assert report.verified and result.status is TcbStatus.UP_TO_DATE
