"""Fetching collateral from a real local HTTPS server (a test CA made here): Intel PCS/PCCS
documents into a cached collateral directory, and AMD KDS certificates."""

from __future__ import annotations

import contextlib
import datetime as _dt
import ipaddress
import ssl
import stat
import threading
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from tests.support.evidence.intel import IntelTestPki, sgx_quote, tdx_quote
from tests.support.evidence.intel_collateral import (
    TestPki,
    make_crl,
    qe_identity_body,
    signed_document,
    tcb_info_body,
)
from tests.support.evidence.snp import make_evidence

from ppml.attestation.amd.report import parse_report
from ppml.attestation.amd.verify import verify_report
from ppml.attestation.collateral import Collateral, write_collateral_dir
from ppml.attestation.collateral.fetch import AmdKdsSource, IntelCollateralSource
from ppml.attestation.intel.chain import verify_quote
from ppml.attestation.intel.collateral import verify_signed_body
from ppml.attestation.intel.verified import verify_crls
from ppml.errors import ConfigurationError, EvidenceError

AT = _dt.datetime(2025, 1, 15, tzinfo=_dt.UTC)
JAN = _dt.datetime(2025, 1, 1, tzinfo=_dt.UTC)
FEB = _dt.datetime(2025, 2, 1, tzinfo=_dt.UTC)
MAR = _dt.datetime(2025, 3, 1, tzinfo=_dt.UTC)
MiB = 1024 * 1024

# --------------------------------------------------------------------------- TLS and server


def _cert(
    cn: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: x509.Certificate | None,
    issuer_key: ec.EllipticCurvePrivateKey,
    *,
    ca: bool,
) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    now = _dt.datetime.now(_dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer.subject if issuer else name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _dt.timedelta(days=1))
        .not_valid_after(now + _dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        ).add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    else:
        assert issuer is not None
        builder = (
            builder.add_extension(
                x509.SubjectAlternativeName(
                    [
                        x509.DNSName("localhost"),
                        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                    ]
                ),
                critical=False,
            )
            .add_extension(
                x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
                critical=False,
            )
        )
    return builder.sign(issuer_key, hashes.SHA256())


@dataclass
class Tls:
    ca_file: Path  # the CA that issued the server's certificate
    other_ca_file: Path  # a CA that did not
    server_context: ssl.SSLContext


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> Tls:
    d = tmp_path_factory.mktemp("tls")
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _cert("fetch test CA", ca_key, None, ca_key, ca=True)
    other_key = ec.generate_private_key(ec.SECP256R1())
    other = _cert("another test CA", other_key, None, other_key, ca=True)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = _cert("localhost", key, ca, ca_key, ca=False)
    (d / "ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    (d / "other.pem").write_bytes(other.public_bytes(serialization.Encoding.PEM))
    (d / "server.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (d / "server.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(d / "server.pem", d / "server.key")
    return Tls(d / "ca.pem", d / "other.pem", context)


Reply = tuple[int, dict[str, str], bytes]


def _route(target: str) -> tuple[str, frozenset[tuple[str, str]]]:
    parts = urllib.parse.urlsplit(target)
    return parts.path, frozenset(urllib.parse.parse_qsl(parts.query))


@dataclass
class Server:
    """Answers GETs from `routes` (path with query -> reply, or a callable of the request
    count so far), records every request target."""

    port: int
    routes: dict[Any, Reply | Callable[[int], Reply]] = field(default_factory=dict)
    requests: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def set(self, target: str, reply: Reply | Callable[[int], Reply]) -> None:
        self.routes[_route(target)] = reply

    def count(self, prefix: str = "") -> int:
        with self.lock:
            return sum(1 for r in self.requests if r.startswith(prefix))


class _Handler(BaseHTTPRequestHandler):
    server: _HttpsServer

    def do_GET(self) -> None:
        state = self.server.state
        with state.lock:
            state.requests.append(self.path)
            n = sum(1 for r in state.requests if _route(r) == _route(self.path))
        reply = state.routes.get(_route(self.path), (404, {}, b"not found"))
        status, headers, body = reply(n) if callable(reply) else reply
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        if "Content-Length" not in headers and not headers.get("X-No-Length"):
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        with contextlib.suppress(BrokenPipeError, ConnectionResetError, ssl.SSLError):
            self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _HttpsServer(ThreadingHTTPServer):
    daemon_threads = True
    state: Server

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass


@pytest.fixture
def server(tls: Tls) -> Iterator[Server]:
    httpd = _HttpsServer(("127.0.0.1", 0), _Handler)
    httpd.socket = tls.server_context.wrap_socket(httpd.socket, server_side=True)
    state = Server(httpd.server_address[1])
    httpd.state = state
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield state
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join()


# --------------------------------------------------------------------------- Intel collateral


@dataclass
class Pcs:
    qpki: IntelTestPki
    cpki: TestPki
    fmspc: str


@pytest.fixture(scope="module")
def pcs() -> Pcs:
    qpki = IntelTestPki.create(seed=7)
    cpki = TestPki.create(root=qpki.root_cert, root_key=qpki.root_key)
    return Pcs(qpki, cpki, qpki.pck_extensions.fmspc.hex())


def _pem(*certs: x509.Certificate) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


def _chain_header(pem: bytes) -> str:
    return urllib.parse.quote(pem.decode(), safe="")


def serve_intel(
    server: Server,
    pcs: Pcs,
    *,
    tee: str = "sgx",
    ca: str = "platform",
    issue: _dt.datetime = JAN,
    next_update: _dt.datetime = FEB,
    fmspc: str | None = None,
) -> None:
    """Serve one consistent set of collateral for `tee`, valid from `issue` to `next_update`."""
    tdx = tee == "tdx"
    sign = pcs.cpki.signing_key
    tcb = signed_document(
        "tcbInfo",
        tcb_info_body(tee=tee, fmspc=fmspc or pcs.fmspc, issue_date=issue, next_update=next_update),
        sign,
    )
    qe = signed_document(
        "enclaveIdentity",
        qe_identity_body(ident="TD_QE" if tdx else "QE", issue_date=issue, next_update=next_update),
        sign,
    )
    q = pcs.qpki
    pck_crl = make_crl(q.ca_cert, q.ca_key, last_update=issue, next_update=next_update)
    root_crl = make_crl(q.root_cert, q.root_key, last_update=issue, next_update=next_update)
    signing_chain = _chain_header(pcs.cpki.signing_chain_pem())
    server.set(
        f"/{tee}/certification/v4/tcb?fmspc={pcs.fmspc}",
        (200, {"TCB-Info-Issuer-Chain": signing_chain}, tcb),
    )
    server.set(
        f"/{tee}/certification/v4/qe/identity",
        (200, {"SGX-Enclave-Identity-Issuer-Chain": signing_chain}, qe),
    )
    server.set(
        f"/sgx/certification/v4/pckcrl?ca={ca}&encoding=der",
        (200, {"SGX-PCK-CRL-Issuer-Chain": _chain_header(_pem(q.ca_cert, q.root_cert))}, pck_crl),
    )
    server.set("/sgx/certification/v4/rootcacrl", (200, {}, root_crl.hex().encode()))


def source(server: Server, tls: Tls, cache: Path | None, **kw: Any) -> IntelCollateralSource:
    kw.setdefault("verify", tls.ca_file)
    return IntelCollateralSource(server.url, cache_dir=cache, **kw)


def _no_entries(cache: Path) -> bool:
    intel = cache / "intel"
    return not intel.exists() or not any(intel.iterdir())


def _verify_all(c: Collateral, pcs: Pcs, quote: bytes) -> None:
    root = pcs.qpki.root_cert
    tcb, qe = c.tcb_info(), c.qe_identity()
    tcb_chain, qe_chain = c.tcb_info_chain(), c.qe_identity_chain()
    assert tcb is not None and qe is not None and tcb_chain and qe_chain
    verify_signed_body(tcb, tcb_chain, root=root, at=AT, source="tcb_info.json")
    verify_signed_body(qe, qe_chain, root=root, at=AT, source="qe_identity.json")
    report, checker = verify_crls(c, root=root, at=AT)
    assert report.verified, report.to_list()
    assert checker.covers(pcs.qpki.ca_cert.subject) and checker.covers(root.subject)
    result = verify_quote(
        quote,
        root=root,
        at=AT,
        pck_crl=c.pck_crl_parsed(),
        root_crl=c.root_ca_crl_parsed(),
    )
    assert result.verified, result.to_list()


@pytest.mark.parametrize("tee", ["sgx", "tdx"])
def test_fetch_writes_a_collateral_directory_that_verifies(
    server: Server, tls: Tls, pcs: Pcs, tmp_path: Path, tee: str
) -> None:
    serve_intel(server, pcs, tee=tee)
    quote = sgx_quote(pcs.qpki) if tee == "sgx" else tdx_quote(pcs.qpki, version=5)
    with source(server, tls, tmp_path / "cache") as src:
        collateral = src.fetch_for(quote, at=AT)
        entry = src.entry_dir(tee, pcs.fmspc, "platform")  # type: ignore[arg-type]
    assert sorted(server.requests) == sorted(
        [
            f"/{tee}/certification/v4/tcb?fmspc={pcs.fmspc}",
            f"/{tee}/certification/v4/qe/identity",
            "/sgx/certification/v4/pckcrl?ca=platform&encoding=der",
            "/sgx/certification/v4/rootcacrl",
        ]
    )
    assert sorted(p.name for p in entry.iterdir()) == [
        "pck_crl.der",
        "pck_crl_issuer_chain.pem",
        "qe_identity.json",
        "qe_identity_issuer_chain.pem",
        "root_ca_crl.der",
        "tcb_info.json",
        "tcb_info_issuer_chain.pem",
    ]
    assert Collateral.from_dir(entry) == collateral
    _verify_all(Collateral.from_dir(entry), pcs, quote)
    for path in [tmp_path / "cache", tmp_path / "cache" / "intel", entry]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o700
    for path in entry.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert not [p for p in entry.parent.iterdir() if p.name.startswith(".")]


def test_without_a_cache_nothing_is_written(
    server: Server, tls: Tls, pcs: Pcs, tmp_path: Path
) -> None:
    serve_intel(server, pcs)
    quote = sgx_quote(pcs.qpki)
    with source(server, tls, None) as src:
        collateral = src.fetch_for(quote, at=AT)
        _verify_all(collateral, pcs, quote)
        src.fetch_for(quote, at=AT)
    assert server.count() == 8
    assert not any(tmp_path.iterdir())


def test_processor_ca_is_taken_from_the_pck_issuer(
    server: Server, tls: Tls, pcs: Pcs, tmp_path: Path
) -> None:
    qpki = IntelTestPki.create(seed=8, ca_cn="Intel SGX PCK Processor CA")
    local = Pcs(qpki, TestPki.create(root=qpki.root_cert, root_key=qpki.root_key), pcs.fmspc)
    serve_intel(server, local, ca="processor")
    quote = sgx_quote(qpki)
    assert IntelCollateralSource.platform_of(quote) == ("sgx", pcs.fmspc, "processor")
    with source(server, tls, tmp_path) as src:
        _verify_all(src.fetch_for(quote, at=AT), local, quote)
    assert server.count("/sgx/certification/v4/pckcrl?ca=processor") == 1


def test_cache_hit_makes_no_request_even_from_a_new_source(
    server: Server, tls: Tls, pcs: Pcs, tmp_path: Path
) -> None:
    serve_intel(server, pcs)
    quote = sgx_quote(pcs.qpki)
    with source(server, tls, tmp_path) as src:
        first = src.fetch_for(quote, at=AT)
        assert server.count() == 4
        assert src.fetch_for(quote, at=AT + _dt.timedelta(days=10)) == first
    with source(server, tls, tmp_path) as again:
        assert again.fetch_for(quote, at=AT) == first
    assert server.count() == 4


def test_cache_is_keyed_by_base_url_and_tee(
    server: Server, tls: Tls, pcs: Pcs, tmp_path: Path
) -> None:
    serve_intel(server, pcs, tee="sgx")
    serve_intel(server, pcs, tee="tdx")
    with source(server, tls, tmp_path) as src:
        src.fetch_for(sgx_quote(pcs.qpki), at=AT)
        src.fetch_for(tdx_quote(pcs.qpki), at=AT)
    assert server.count() == 8
    other = IntelCollateralSource(
        f"https://localhost:{server.port}", cache_dir=tmp_path, verify=tls.ca_file
    )
    with other:
        other.fetch_for(sgx_quote(pcs.qpki), at=AT)
    assert server.count() == 12
    assert len(list((tmp_path / "intel").iterdir())) == 3


def test_entry_past_next_update_is_refetched_and_replaced(
    server: Server, tls: Tls, pcs: Pcs, tmp_path: Path
) -> None:
    serve_intel(server, pcs, next_update=FEB)
    quote = sgx_quote(pcs.qpki)
    with source(server, tls, tmp_path) as src:
        old = src.fetch_for(quote, at=AT)
        serve_intel(server, pcs, issue=FEB, next_update=MAR)
        later = FEB + _dt.timedelta(days=2)
        new = src.fetch_for(quote, at=later)
        assert server.count() == 8
        assert new != old
        tcb = new.tcb_info()
        assert tcb is not None and tcb.body.next_update == MAR
        entry = src.entry_dir("sgx", pcs.fmspc, "platform")
        assert Collateral.from_dir(entry) == new
        assert src.fetch_for(quote, at=later) == new
        assert server.count() == 8
    assert [p.name for p in entry.parent.iterdir()] == [entry.name]


def test_a_damaged_cache_entry_is_refetched(
    server: Server, tls: Tls, pcs: Pcs, tmp_path: Path
) -> None:
    serve_intel(server, pcs)
    quote = sgx_quote(pcs.qpki)
    with source(server, tls, tmp_path) as src:
        good = src.fetch_for(quote, at=AT)
        entry = src.entry_dir("sgx", pcs.fmspc, "platform")
        (entry / "tcb_info.json").write_bytes(b"{garbage")
        assert src.fetch_for(quote, at=AT) == good
    assert server.count() == 8


def _fetch_fails(
    server: Server,
    tls: Tls,
    pcs: Pcs,
    cache: Path,
    error: type[Exception],
    match: str,
    **kw: Any,
) -> str:
    with source(server, tls, cache, **kw) as src, pytest.raises(error, match=match) as info:
        src.fetch_for(sgx_quote(pcs.qpki), at=AT)
    assert _no_entries(cache)
    assert not [p for p in cache.rglob("*") if p.is_file()]
    return str(info.value)


@pytest.mark.parametrize("which", ["tcb", "qe/identity", "pckcrl", "rootcacrl"])
def test_a_server_error_leaves_no_directory(
    server: Server, tls: Tls, pcs: Pcs, tmp_path: Path, which: str
) -> None:
    serve_intel(server, pcs)
    for route in list(server.routes):
        if which in route[0]:
            server.routes[route] = (500, {}, b"internal error")
    message = _fetch_fails(server, tls, pcs, tmp_path, EvidenceError, "HTTP 500")
    assert f"127.0.0.1:{server.port}" in message and which in message


def test_an_error_never_shows_url_credentials(
    server: Server, tls: Tls, pcs: Pcs, tmp_path: Path
) -> None:
    serve_intel(server, pcs)
    server.set(f"/sgx/certification/v4/tcb?fmspc={pcs.fmspc}", (404, {}, b""))
    url = f"https://apikey:s3cr3t@127.0.0.1:{server.port}"
    with (
        IntelCollateralSource(url, verify=tls.ca_file) as src,
        pytest.raises(EvidenceError, match="HTTP 404") as info,
    ):
        src.fetch_for(sgx_quote(pcs.qpki), at=AT)
    assert "s3cr3t" not in str(info.value) and "apikey" not in str(info.value)


@pytest.mark.parametrize("declared", [True, False])
def test_an_oversized_response_leaves_no_directory(
    server: Server, tls: Tls, pcs: Pcs, tmp_path: Path, declared: bool
) -> None:
    serve_intel(server, pcs)
    route = _route("/sgx/certification/v4/qe/identity")
    status, headers, _ = server.routes[route]  # type: ignore[misc]
    if not declared:
        headers = {**headers, "X-No-Length": "1", "Connection": "close"}
    server.routes[route] = (status, headers, b" " * (2 * MiB))
    _fetch_fails(server, tls, pcs, tmp_path, EvidenceError, "larger than 1048576 bytes")


@pytest.mark.parametrize(
    ("header", "value", "match"),
    [
        ("TCB-Info-Issuer-Chain", None, "no TCB-Info-Issuer-Chain header"),
        ("TCB-Info-Issuer-Chain", "not%20a%20chain", "not a PEM chain"),
        (
            "TCB-Info-Issuer-Chain",
            urllib.parse.quote("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"),
            "not a PEM certificate chain",
        ),
        ("SGX-PCK-CRL-Issuer-Chain", None, "no SGX-PCK-CRL-Issuer-Chain header"),
        ("SGX-Enclave-Identity-Issuer-Chain", "%FF%FE", "not ASCII|not a PEM chain"),
    ],
)
def test_a_bad_issuer_chain_header_leaves_no_directory(
    server: Server,
    tls: Tls,
    pcs: Pcs,
    tmp_path: Path,
    header: str,
    value: str | None,
    match: str,
) -> None:
    serve_intel(server, pcs)
    for route, reply in list(server.routes.items()):
        status, headers, body = reply  # type: ignore[misc]
        if header in headers:
            headers = {k: v for k, v in headers.items() if k != header}
            if value is not None:
                headers[header] = value
            server.routes[route] = (status, headers, body)
    _fetch_fails(server, tls, pcs, tmp_path, EvidenceError, match)


def test_collateral_for_another_platform_is_refused(
    server: Server, tls: Tls, pcs: Pcs, tmp_path: Path
) -> None:
    serve_intel(server, pcs, fmspc="00a06f000000")
    _fetch_fails(server, tls, pcs, tmp_path, EvidenceError, "FMSPC 00a06f000000")


def test_malformed_documents_are_refused(
    server: Server, tls: Tls, pcs: Pcs, tmp_path: Path
) -> None:
    serve_intel(server, pcs)
    server.set("/sgx/certification/v4/rootcacrl", (200, {}, b"\x30\x03\x01\x01\x00"))
    _fetch_fails(server, tls, pcs, tmp_path, EvidenceError, "root CA CRL is not a CRL")
    serve_intel(server, pcs)
    route = _route(f"/sgx/certification/v4/tcb?fmspc={pcs.fmspc}")
    status, headers, _ = server.routes[route]  # type: ignore[misc]
    server.routes[route] = (status, headers, b'{"tcbInfo": {}, "signature": "00"}')
    _fetch_fails(server, tls, pcs, tmp_path, EvidenceError, "tcb_info.json")


def test_root_ca_crl_in_der_or_pem_from_a_configured_url(
    server: Server, tls: Tls, pcs: Pcs, tmp_path: Path
) -> None:
    serve_intel(server, pcs)
    q = pcs.qpki
    der = make_crl(q.root_cert, q.root_key)
    server.set("/IntelSGXRootCA.der", (200, {}, der))
    pem = x509.load_der_x509_crl(der).public_bytes(serialization.Encoding.PEM)
    server.set("/root.pem", (200, {}, pem))
    for path in ("/IntelSGXRootCA.der", "/root.pem"):
        with source(server, tls, None, root_ca_crl_url=server.url + path) as src:
            collateral = src.fetch_for(sgx_quote(q), at=AT)
        assert collateral.root_ca_crl == der
    assert server.count("/sgx/certification/v4/rootcacrl") == 0


def test_untrusted_server_certificate_is_refused(
    server: Server, tls: Tls, pcs: Pcs, tmp_path: Path
) -> None:
    serve_intel(server, pcs)
    message = _fetch_fails(
        server, tls, pcs, tmp_path, ConfigurationError, "cannot connect", verify=tls.other_ca_file
    )
    assert server.url in message
    _fetch_fails(server, tls, pcs, tmp_path, ConfigurationError, "cannot connect", verify=True)
    assert server.count() == 0


def test_configuration_is_checked() -> None:
    with pytest.raises(ConfigurationError, match="https"):
        IntelCollateralSource("http://pccs.example:8081")
    with pytest.raises(ConfigurationError, match="cannot be turned off"):
        IntelCollateralSource("https://pccs.example:8081", verify=False)
    with pytest.raises(ConfigurationError, match="does not exist"):
        IntelCollateralSource("https://pccs.example:8081", verify="/nonexistent/ca.pem")
    with pytest.raises(ConfigurationError, match="https"):
        AmdKdsSource("ftp://kds.example")
    with IntelCollateralSource() as pcs_source:
        assert pcs_source.root_ca_crl_url.startswith("https://certificates.trustedservices")
    with IntelCollateralSource("https://pccs.example:8081/") as pccs:
        assert pccs.root_ca_crl_url == "https://pccs.example:8081/sgx/certification/v4/rootcacrl"


def test_retry_after_is_honoured_within_bounds(
    server: Server, tls: Tls, pcs: Pcs, tmp_path: Path
) -> None:
    serve_intel(server, pcs)
    route = _route("/sgx/certification/v4/qe/identity")
    good = server.routes[route]
    server.routes[route] = lambda n: good if n > 2 else (429, {"Retry-After": "3"}, b"")  # type: ignore[assignment,return-value]
    waits: list[float] = []
    with source(server, tls, tmp_path, sleep=waits.append) as src:
        src.fetch_for(sgx_quote(pcs.qpki), at=AT)
    assert waits == [3.0, 3.0]

    server.routes[route] = (429, {"Retry-After": "1"}, b"")
    waits.clear()
    _fetch_fails(server, tls, pcs, tmp_path / "b", EvidenceError, "HTTP 429", sleep=waits.append)
    assert waits == [1.0, 1.0, 1.0]

    server.routes[route] = (503, {"Retry-After": "3600"}, b"")
    waits.clear()
    _fetch_fails(server, tls, pcs, tmp_path / "c", EvidenceError, "retry after 3600 s")
    assert waits == []


def test_write_collateral_dir_does_not_overwrite_by_default(tmp_path: Path, pcs: Pcs) -> None:
    q = pcs.qpki
    c = Collateral(root_ca_crl=make_crl(q.root_cert, q.root_key))
    out = write_collateral_dir(c, tmp_path / "col")
    assert Collateral.from_dir(out) == c
    with pytest.raises(ConfigurationError, match="exists already"):
        write_collateral_dir(c, out)
    bad = Collateral(root_ca_crl=b"\x30\x00")
    with pytest.raises(EvidenceError):
        write_collateral_dir(bad, out, replace=True)
    assert Collateral.from_dir(out) == c
    assert [p.name for p in tmp_path.iterdir()] == ["col"]


# --------------------------------------------------------------------------- AMD KDS


@pytest.mark.parametrize("product", ["Milan", "Turin"])
def test_kds_fetch_verifies_and_is_cached(
    server: Server, tls: Tls, tmp_path: Path, product: str
) -> None:
    ev = make_evidence(product=product)
    report = parse_report(ev.raw)
    if product == "Turin":
        hwid = report.chip_id[:8].hex()
        spl = "blSPL=4&teeSPL=0&snpSPL=24&ucodeSPL=219&fmcSPL=1"
    else:
        hwid = report.chip_id.hex()
        spl = "blSPL=4&teeSPL=0&snpSPL=24&ucodeSPL=219"
    vcek_der = ev.vcek.public_bytes(serialization.Encoding.DER)
    chain_pem = _pem(*ev.ask_ark)
    server.set(f"/vcek/v1/{product}/{hwid}?{spl}", (200, {}, vcek_der))
    server.set(f"/vcek/v1/{product}/cert_chain", (200, {}, chain_pem))
    with AmdKdsSource(server.url, cache_dir=tmp_path, verify=tls.ca_file) as kds:
        vcek, ask_ark = kds.fetch_for(report, product)
        assert (vcek, ask_ark) == (vcek_der, chain_pem)
        assert kds.fetch_for(ev.raw, product) == (vcek, ask_ark)
    assert server.count() == 2
    result = verify_report(
        report,
        vcek=x509.load_der_x509_certificate(vcek),
        ask_ark=x509.load_pem_x509_certificates(ask_ark),
        at=ev.at,
        roots=ev.pki.roots,
        signing_keys=ev.pki.signing_keys,
    )
    assert result.verified, result.to_list()
    files = list((tmp_path / "amd").iterdir())
    assert len(files) == 2
    assert all(stat.S_IMODE(f.stat().st_mode) == 0o600 for f in files)
    assert stat.S_IMODE((tmp_path / "amd").stat().st_mode) == 0o700


def test_kds_refuses_what_it_cannot_fetch(server: Server, tls: Tls, tmp_path: Path) -> None:
    with AmdKdsSource(server.url, cache_dir=tmp_path, verify=tls.ca_file) as kds:
        vlek = parse_report(make_evidence(vlek=True).raw)
        with pytest.raises(EvidenceError, match="VLEK"):
            kds.fetch_for(vlek, "Milan")
        with pytest.raises(EvidenceError, match="unknown product"):
            kds.fetch_for(make_evidence().raw, "Venice")
        with pytest.raises(EvidenceError, match="HTTP 404"):
            kds.fetch_for(make_evidence().raw, "Milan")
        report = parse_report(make_evidence().raw)
        hwid, params = kds.vcek_query(report, "Milan")
        query = "&".join(f"{k}={v}" for k, v in params.items())
        server.set(f"/vcek/v1/Milan/{hwid}?{query}", (200, {}, b"not a certificate"))
        with pytest.raises(EvidenceError, match="not a certificate"):
            kds.fetch_for(report, "Milan")
    assert not (tmp_path / "amd").exists() or not any((tmp_path / "amd").iterdir())


# ------------------------------------------------------------ the CLI: --pccs and --kds


def _cli(*args: str | Path) -> tuple[int, dict[str, Any] | None, str]:
    import json

    from typer.testing import CliRunner

    from ppml.cli import app

    result = CliRunner().invoke(app, ["attest", "verify", *map(str, args), "--format", "json"])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    try:
        return result.exit_code, json.loads(result.stdout), result.stderr
    except ValueError:
        return result.exit_code, None, result.stderr


def serve_matching(server: Server, pcs: Pcs) -> None:
    """Serve, as a PCCS would, collateral that matches `pcs`'s quotes (their QE too)."""
    from tests.support.evidence.evidence import matching_collateral

    files = matching_collateral(pcs.qpki, issue_date=JAN, next_update=FEB)
    server.set(
        f"/sgx/certification/v4/tcb?fmspc={pcs.fmspc}",
        (
            200,
            {"TCB-Info-Issuer-Chain": _chain_header(files["tcb_info_issuer_chain.pem"])},
            files["tcb_info.json"],
        ),
    )
    server.set(
        "/sgx/certification/v4/qe/identity",
        (
            200,
            {
                "SGX-Enclave-Identity-Issuer-Chain": _chain_header(
                    files["qe_identity_issuer_chain.pem"]
                )
            },
            files["qe_identity.json"],
        ),
    )
    server.set(
        "/sgx/certification/v4/pckcrl?ca=platform&encoding=der",
        (
            200,
            {"SGX-PCK-CRL-Issuer-Chain": _chain_header(files["pck_crl_issuer_chain.pem"])},
            files["pck_crl.der"],
        ),
    )
    server.set("/sgx/certification/v4/rootcacrl", (200, {}, files["root_ca_crl.der"]))


def test_cli_fetches_intel_collateral_from_a_pccs_and_caches_it(
    server: Server, tls: Tls, pcs: Pcs, tmp_path: Path
) -> None:
    serve_matching(server, pcs)
    quote, root = tmp_path / "quote.dat", tmp_path / "root.pem"
    quote.write_bytes(sgx_quote(pcs.qpki))
    root.write_bytes(_pem(pcs.qpki.root_cert))
    args = (quote, "--root", root, "--at", AT.isoformat(), "--pccs", server.url)
    fetch = ("--fetch-ca", tls.ca_file, "--cache-dir", tmp_path / "cache")
    code, out, err = _cli(*args, *fetch)
    assert code == 0, (err, out and [s for s in out["steps"] if s["status"] != "passed"])
    assert out is not None and out["verified"] and out["tcb_status"] == "UpToDate"
    assert server.count() == 4
    code, out, _ = _cli(*args, *fetch)  # the second time from the cache
    assert code == 0 and out is not None and out["tcb_status"] == "UpToDate"
    assert server.count() == 4
    # an untrusted PCCS certificate: refused before anything is used (exit 5: configuration)
    code, _, err = _cli(*args, "--fetch-ca", tls.other_ca_file, "--cache-dir", tmp_path / "c2")
    assert code == 5 and "TLS certificate is not trusted" in err


def test_cli_fetches_an_snp_vcek_from_kds(server: Server, tls: Tls, tmp_path: Path) -> None:
    ev = make_evidence(product="Milan")
    report = parse_report(ev.raw)
    spl = "blSPL=4&teeSPL=0&snpSPL=24&ucodeSPL=219"
    server.set(
        f"/vcek/v1/Milan/{report.chip_id.hex()}?{spl}",
        (200, {}, ev.vcek.public_bytes(serialization.Encoding.DER)),
    )
    server.set("/vcek/v1/Milan/cert_chain", (200, {}, _pem(*ev.ask_ark)))
    evidence, ark = tmp_path / "report.bin", tmp_path / "ark.pem"
    evidence.write_bytes(ev.raw)
    ark.write_bytes(_pem(ev.ask_ark[1]))
    code, out, err = _cli(
        evidence,
        "--root",
        ark,
        "--at",
        ev.at.isoformat(),
        "--kds",
        server.url,
        "--fetch-ca",
        tls.ca_file,
        "--cache-dir",
        tmp_path / "cache",
    )
    assert code == 0, err
    assert out is not None and out["type"] == "snp" and out["verified"]
    assert server.count() == 2


@pytest.mark.parametrize(
    "extra, message",
    [
        (("--collateral", "."), "either --collateral or --pccs"),
        (("--kds", "https://127.0.0.1:1"), "--kds is for SEV-SNP"),
    ],
)
def test_cli_fetch_options_are_checked(
    pcs: Pcs, tmp_path: Path, extra: tuple[str, ...], message: str
) -> None:
    quote = tmp_path / "quote.dat"
    quote.write_bytes(sgx_quote(pcs.qpki))
    pccs = () if "--kds" in extra else ("--pccs", "https://127.0.0.1:1")
    code, _, err = _cli(quote, *pccs, *extra)
    assert code == 2 and message in err


def test_cli_fetch_only_options_need_a_source(pcs: Pcs, tmp_path: Path) -> None:
    quote = tmp_path / "quote.dat"
    quote.write_bytes(sgx_quote(pcs.qpki))
    code, _, err = _cli(quote, "--product", "Milan")
    assert code == 2 and "go with --pccs or --kds" in err


# ------------------------------------------------------------ the service's verifiers fetch too


def test_a_hardware_verifier_fetches_the_collateral_of_each_quote(
    server: Server, tls: Tls, pcs: Pcs, tmp_path: Path
) -> None:
    from ppml.attestation import SgxVerifier, TcbStatus
    from ppml.attestation.collateral import RemoteSource as CollateralSource
    from ppml.errors import EvidenceError

    serve_matching(server, pcs)
    with source(server, tls, tmp_path / "cache") as intel:
        verifier = SgxVerifier.for_testing(
            root=pcs.qpki.root_cert, clock=lambda: AT, source=CollateralSource(intel, None)
        )
        quote = sgx_quote(pcs.qpki)
        assert verifier.check(quote).tcb_status is TcbStatus.UP_TO_DATE
        assert verifier.check(quote).tcb_status is TcbStatus.UP_TO_DATE
        assert server.count() == 4  # fetched once, then cached
        # without a source: the same quote has no TCB status to give
        bare = SgxVerifier.for_testing(root=pcs.qpki.root_cert, clock=lambda: AT)
        assert bare.check(quote).tcb_status is TcbStatus.UNKNOWN
    with source(server, tls, tmp_path / "cold", verify=tls.other_ca_file) as untrusted:
        refusing = SgxVerifier.for_testing(
            root=pcs.qpki.root_cert, clock=lambda: AT, source=CollateralSource(untrusted, None)
        )
        with pytest.raises(EvidenceError, match="collateral unavailable"):
            refusing.check(sgx_quote(pcs.qpki))


def test_the_workspace_settings_name_the_servers(tmp_path: Path) -> None:
    from ppml.errors import ConfigurationError
    from ppml.workspace.config import AttestationSettings

    settings = AttestationSettings.from_dict(
        {"pccs_url": "https://pccs.example:8081", "kds_url": "https://kdsintf.amd.com"}
    )
    assert settings.to_dict()["pccs_url"] == "https://pccs.example:8081"
    assert AttestationSettings.from_dict(settings.to_dict()) == settings
    for bad in ({"pccs_url": "http://pccs.example"}, {"kds_url": 3}, {"fetch_ca": ""}):
        with pytest.raises(ConfigurationError):
            AttestationSettings.from_dict(bad)


def test_an_snp_verifier_fetches_the_vcek_of_each_report(
    server: Server, tls: Tls, tmp_path: Path
) -> None:
    from ppml.attestation import SnpVerifier
    from ppml.attestation.collateral import RemoteSource as CollateralSource
    from ppml.errors import EvidenceError

    ev = make_evidence(product="Milan")
    report = parse_report(ev.raw)
    spl = "blSPL=4&teeSPL=0&snpSPL=24&ucodeSPL=219"
    vcek_path = f"/vcek/v1/Milan/{report.chip_id.hex()}?{spl}"
    server.set("/vcek/v1/Milan/cert_chain", (200, {}, _pem(*ev.ask_ark)))
    ark = ev.ask_ark[1]
    with AmdKdsSource(server.url, cache_dir=tmp_path / "a", verify=tls.ca_file) as kds:
        missing = SnpVerifier.for_testing(
            root=ark, clock=lambda: ev.at, source=CollateralSource(None, kds)
        )
        with pytest.raises(EvidenceError):  # KDS has no VCEK for this chip: refused
            missing.check(ev.raw)
    server.set(vcek_path, (200, {}, ev.vcek.public_bytes(serialization.Encoding.DER)))
    with AmdKdsSource(server.url, cache_dir=tmp_path / "b", verify=tls.ca_file) as kds:
        verifier = SnpVerifier.for_testing(
            root=ark, clock=lambda: ev.at, source=CollateralSource(None, kds)
        )
        assert verifier.check(ev.raw).verified
        assert verifier.check(ev.raw).verified  # the second time from the cache
    assert server.count(vcek_path.split("?")[0]) == 2  # the refused one, then one fetch
