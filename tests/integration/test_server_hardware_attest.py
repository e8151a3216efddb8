"""SGX evidence end to end against the real server (uvicorn over TLS on loopback): a synthetic
quote that binds the challenge gets a token with the SGX claims and a key its policy allows;
wrong report data, a bad signature and a foreign root are refused at attestation; a TCB status
below a policy's minimum and a debug enclave get no key."""

from __future__ import annotations

import base64
import datetime as dt
import json
import ssl
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from tests.support.evidence.evidence import matching_collateral
from tests.support.evidence.intel import Corrupt, IntelTestPki, sgx_body, sgx_quote
from tests.support.evidence.intel_collateral import write_files

from ppml.attestation import SgxVerifier, TcbStatus, TeeType, report_data_for
from ppml.crypto.hpke import generate_keypair
from ppml.crypto.passphrase import KdfParams
from ppml.kms.policy import Rule
from ppml.server.app import create_app
from ppml.server.embedded import services_for, tls_files_for
from ppml.server.tls import serving
from ppml.workspace import Workspace
from ppml.workspace.config import AttestationSettings, WorkspaceConfig

PKI = IntelTestPki.create(seed=41)
FOREIGN = IntelTestPki.create(seed=42)
BODY = sgx_body(isv_prod_id=1, isv_svn=4)
FAR = dt.datetime(2049, 1, 1, tzinfo=dt.UTC)


@dataclass
class Server:
    client: httpx.Client

    def attest(self, body: Any = BODY, *, pki: IntelTestPki = PKI, **kw: Any) -> httpx.Response:
        nonce = base64.b64decode(self.client.post("/attestation/v1/challenge").json()["nonce"])
        _, public = generate_keypair()
        bound = kw.pop("bind", None) or report_data_for(nonce, public)
        quote = sgx_quote(pki, body.__class__(**{**_fields(body), "report_data": bound}), **kw)
        return self.client.post(
            "/attestation/v1/attest",
            json={
                "tee": "sgx",
                "evidence": base64.b64encode(quote).decode(),
                "nonce": base64.b64encode(nonce).decode(),
                "public_key": base64.b64encode(public).decode(),
            },
        )

    def datakey(self, key: str, token: str) -> httpx.Response:
        return self.client.post(
            f"/kms/v1/keys/{key}/datakey", headers={"Authorization": f"Bearer {token}"}
        )


def _fields(body: Any) -> dict[str, Any]:
    return {name: getattr(body, name) for name in body.__dataclass_fields__}


def _payload(token: str) -> dict[str, Any]:
    part = token.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    d = tmp_path_factory.mktemp("hw")
    ws = Workspace.create(d / "ws", b"hardware e2e passphrase", kdf=KdfParams.for_testing())
    collateral = write_files(
        d / "collateral",
        matching_collateral(PKI, status="SWHardeningNeeded", next_update=FAR),
    )
    with ws.key_service() as keys:
        policies = keys.policies(allow_sim=False)
        for name, min_tcb in (("strict", TcbStatus.UP_TO_DATE), ("lenient", TcbStatus.OUT_OF_DATE)):
            keys.create_key(name)
            rule = Rule(TeeType.SGX, BODY.mr_enclave.hex(), min_tcb=min_tcb,
                        mr_signer=BODY.mr_signer.hex(), isv_prod_id=1, min_isv_svn=4)  # fmt: skip
            policies.replace(name, [rule])
    verifier = SgxVerifier.for_testing(root=PKI.root_cert, collateral=collateral)
    services = services_for(ws, verifiers={TeeType.SGX: verifier})
    context = ssl.create_default_context(cafile=str(ws.ca_cert))
    with (
        serving(create_app(services), tls_files_for(ws)) as handle,
        httpx.Client(base_url=handle.url, verify=context, timeout=30.0) as client,
    ):
        yield Server(client)


def test_a_bound_sgx_quote_gets_a_token_with_the_sgx_claims(server: Server) -> None:
    r = server.attest()
    assert r.status_code == 200, r.text
    claims = _payload(r.json()["token"])
    assert claims["tee"] == "sgx" and claims["debug"] is False
    assert claims["tcb_status"] == "SWHardeningNeeded"
    assert claims["measurements"] == {
        "mr_enclave": BODY.mr_enclave.hex(),
        "mr_signer": BODY.mr_signer.hex(),
    }
    assert claims["extra"]["isv_prod_id"] == 1 and claims["extra"]["isv_svn"] == 4
    assert claims["policies_matched"] == ["lenient"]
    assert server.datakey("lenient", r.json()["token"]).status_code == 200


def test_a_tcb_below_the_policy_minimum_gets_no_key(server: Server) -> None:
    token = server.attest().json()["token"]
    assert server.datakey("strict", token).status_code == 403  # the policy denies


def test_a_debug_enclave_gets_no_key(server: Server) -> None:
    r = server.attest(sgx_body(isv_prod_id=1, isv_svn=4, debug=True))
    assert r.status_code == 200
    assert _payload(r.json()["token"])["policies_matched"] == []
    assert server.datakey("lenient", r.json()["token"]).status_code == 403


def test_an_older_isv_svn_gets_no_key(server: Server) -> None:
    r = server.attest(sgx_body(isv_prod_id=1, isv_svn=3))
    assert r.status_code == 200
    assert server.datakey("lenient", r.json()["token"]).status_code == 403


@pytest.mark.parametrize(
    "kw",
    [
        {"bind": b"\x01" * 64},  # report data for another challenge
        {"corrupt": [Corrupt.QUOTE_SIGNATURE]},
        {"corrupt": [Corrupt.QE_REPORT_SIGNATURE]},
        {"pki": FOREIGN},  # a chain to another root
    ],
    ids=["wrong report data", "bad quote signature", "bad QE signature", "wrong root"],
)
def test_bad_evidence_is_refused(server: Server, kw: dict[str, Any]) -> None:
    r = server.attest(**kw)
    assert r.status_code == 401
    assert "token" not in r.json()


def test_the_workspace_configures_the_hardware_verifiers(tmp_path: Path) -> None:
    settings = AttestationSettings(tee_types=("sgx",), collateral="collateral")
    config = WorkspaceConfig(
        created_at=dt.datetime(2026, 1, 1, tzinfo=dt.UTC), attestation=settings
    )
    assert WorkspaceConfig.from_toml(config.to_toml()).attestation == settings
    plain = WorkspaceConfig(created_at=dt.datetime(2026, 1, 1, tzinfo=dt.UTC))
    assert b"[attestation]" not in plain.to_toml()
    ws = Workspace.create(tmp_path / "ws", b"config passphrase", kdf=KdfParams.for_testing())
    services = services_for(ws)
    assert services.attestation.tee_types == {TeeType.SGX, TeeType.TDX}  # no VCEK: no SNP
    services.keys.close()
