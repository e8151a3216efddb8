"""Fetch the collateral that hardware evidence is verified with: Intel PCS / PCCS documents for
SGX and TDX quotes, and AMD KDS certificates for SEV-SNP reports, over verified TLS, cached.

Nothing fetched here is trusted because of where it came from: every document is signed, and the
verifiers check it against a pinned root. The fetcher only makes sure that what it hands over
(and keeps on disk) is complete, well-formed and about the platform that was asked for.

Intel (API v4; the base URL is PCS's ``https://api.trustedservices.intel.com`` or a PCCS)::

    GET {base}/{sgx|tdx}/certification/v4/tcb?fmspc={fmspc}   header TCB-Info-Issuer-Chain
    GET {base}/{sgx|tdx}/certification/v4/qe/identity         SGX-Enclave-Identity-Issuer-Chain
    GET {base}/sgx/certification/v4/pckcrl?ca={platform|processor}&encoding=der
                                                              SGX-PCK-CRL-Issuer-Chain
    GET {root CA CRL URL}   a PCCS's /sgx/certification/v4/rootcacrl, or Intel's published .der

Issuer chains arrive URL-encoded in those headers. A fetched set is written as one collateral
directory (the layout `Collateral.from_dir` reads), built in a temporary directory and renamed
into place, and reused while every document's nextUpdate is after the verification time.

AMD (``https://kdsintf.amd.com``)::

    GET {base}/vcek/v1/{product}/{hwid}?blSPL=&teeSPL=&snpSPL=&ucodeSPL=[&fmcSPL=]   DER
    GET {base}/vcek/v1/{product}/cert_chain                                        PEM ASK, ARK
"""

from __future__ import annotations

import base64
import datetime as _dt
import email.utils
import hashlib
import os
import re
import ssl
import threading
import time
import urllib.parse
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import ClassVar, Final, Literal, Self, TypedDict, Unpack

import httpx
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID

from ppml._internal.clock import Clock, utc_now
from ppml._internal.fs import atomic_output, ensure_private_dir
from ppml.attestation.amd.report import (
    SigningKey,
    SnpReport,
    TcbVersion,
    parse_report,
    tcb_layout_for_product,
)
from ppml.attestation.amd.verify import PRODUCTS
from ppml.attestation.collateral.directory import write_collateral_dir
from ppml.attestation.collateral.models import Collateral
from ppml.attestation.intel.collateral import MAX_CHAIN_BYTES, parse_pem_chain
from ppml.attestation.intel.pck import parse_pck_extensions
from ppml.attestation.intel.quote import SgxQuote, TdxQuote, parse_quote
from ppml.errors import ConfigurationError, EvidenceError, UsageError

__all__ = [
    "DEFAULT_MAX_RESPONSE_BYTES",
    "INTEL_PCS_URL",
    "INTEL_ROOT_CA_CRL_URL",
    "KDS_URL",
    "AmdKdsSource",
    "IntelCollateralSource",
    "SourceOptions",
    "snp_product",
]

INTEL_PCS_URL: Final = "https://api.trustedservices.intel.com"
INTEL_ROOT_CA_CRL_URL: Final = "https://certificates.trustedservices.intel.com/IntelSGXRootCA.der"
KDS_URL: Final = "https://kdsintf.amd.com"
DEFAULT_MAX_RESPONSE_BYTES: Final = 1024 * 1024
_DEFAULT_TIMEOUT: Final = 15.0
_DEFAULT_RETRIES: Final = 3
_DEFAULT_MAX_RETRY_AFTER: Final = 60.0
_RETRY_STATUSES: Final = frozenset({429, 503})

_TCB_CHAIN_HEADERS: Final = ("TCB-Info-Issuer-Chain", "SGX-TCB-Info-Issuer-Chain")
_QE_CHAIN_HEADER: Final = "SGX-Enclave-Identity-Issuer-Chain"
_CRL_CHAIN_HEADER: Final = "SGX-PCK-CRL-Issuer-Chain"
_CA_BY_ISSUER_CN: Final = {
    "Intel SGX PCK Platform CA": "platform",
    "Intel SGX PCK Processor CA": "processor",
}
_HEX_TEXT: Final = re.compile(rb"\s*([0-9a-fA-F]{2})+\s*")
_PEM_CRL: Final = re.compile(
    rb"\s*-----BEGIN X509 CRL-----\s*([A-Za-z0-9+/=\s]+?)-----END X509 CRL-----\s*"
)

TeeName = Literal["sgx", "tdx"]


# --------------------------------------------------------------------------- HTTP


def _display(url: str) -> str:
    """The URL as errors may show it: never any user info (credentials) it might carry."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    return urllib.parse.urlunsplit((parts.scheme, host, parts.path, parts.query, ""))[:300]


def _check_base_url(url: str, what: str) -> str:
    if not isinstance(url, str):
        raise ConfigurationError(f"{what}: the URL must be a string")
    parts = urllib.parse.urlsplit(url)
    if parts.scheme != "https" or not parts.hostname:
        raise ConfigurationError(f"{what}: {_display(url)!r} is not an https:// URL")
    if parts.query or parts.fragment:
        raise ConfigurationError(f"{what}: {_display(url)!r} must not have a query or fragment")
    return url.rstrip("/")


def _tls_verify(verify: bool | str | os.PathLike[str]) -> ssl.SSLContext | Literal[True]:
    if verify is True:
        return True
    if verify is False or isinstance(verify, bool):
        raise ConfigurationError(
            "collateral fetch: TLS verification cannot be turned off; give a CA file instead"
        )
    path = Path(verify)
    if not path.is_file():
        raise ConfigurationError(f"collateral fetch: CA file {str(path)[:200]!r} does not exist")
    try:
        return ssl.create_default_context(cafile=str(path))
    except (ssl.SSLError, OSError) as exc:
        raise ConfigurationError(
            f"collateral fetch: CA file {str(path)[:200]!r} cannot be loaded"
        ) from exc


def _retry_after(value: str | None, now: _dt.datetime) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or an HTTP date)."""
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        return float(int(value))
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=_dt.UTC)
    return max(0.0, (when - now).total_seconds())


class _Response:
    __slots__ = ("body", "headers", "url")

    def __init__(self, url: str, body: bytes, headers: httpx.Headers) -> None:
        self.url = url
        self.body = body
        self.headers = headers


def _tls_refused(exc: BaseException) -> bool:
    """Whether `exc` (or what it wraps) is a failed TLS certificate verification."""
    seen: BaseException | None = exc
    for _ in range(8):
        if seen is None:
            return False
        if isinstance(seen, ssl.SSLCertVerificationError):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


class _Http:
    """GET with verified TLS, timeouts, a bounded body and a bounded retry on 429/503."""

    def __init__(
        self,
        *,
        client: httpx.Client | None,
        verify: bool | str | os.PathLike[str],
        timeout: float,
        max_response_bytes: int,
        retries: int,
        max_retry_after: float,
        sleep: Callable[[float], None],
        clock: Clock,
    ) -> None:
        if max_response_bytes < 1 or retries < 0 or timeout <= 0 or max_retry_after < 0:
            raise ConfigurationError("collateral fetch: limits must be positive")
        if client is None:
            self._client = httpx.Client(
                verify=_tls_verify(verify),
                timeout=httpx.Timeout(timeout, connect=min(timeout, 10.0)),
                follow_redirects=False,
                trust_env=False,
                headers={"Accept-Encoding": "identity"},
            )
            self._owned = True
        else:
            if not isinstance(client, httpx.Client):
                raise ConfigurationError("collateral fetch: client must be an httpx.Client")
            self._client = client
            self._owned = False
        self._max = max_response_bytes
        self._retries = retries
        self._max_retry_after = max_retry_after
        self._sleep = sleep
        self._clock = clock

    def close(self) -> None:
        if self._owned:
            self._client.close()

    def get(self, url: str) -> _Response:
        shown = _display(url)
        attempt = 0
        while True:
            try:
                with self._client.stream("GET", url) as response:
                    status = response.status_code
                    if status in _RETRY_STATUSES and attempt < self._retries:
                        asked = _retry_after(response.headers.get("Retry-After"), self._clock())
                        wait = float(2**attempt) if asked is None else asked
                        if wait > self._max_retry_after:
                            raise EvidenceError(
                                f"collateral fetch: {shown}: HTTP {status}, asked to retry after"
                                f" {wait:.0f} s (more than {self._max_retry_after:.0f} s)"
                            )
                    elif status != 200:
                        raise EvidenceError(f"collateral fetch: {shown}: HTTP {status}")
                    else:
                        return _Response(url, self._read(response, shown), response.headers)
            except httpx.TimeoutException as exc:
                raise ConfigurationError(f"collateral fetch: {shown}: timed out") from exc
            except httpx.TransportError as exc:
                reason = type(exc).__name__
                if _tls_refused(exc):
                    reason = "the server's TLS certificate is not trusted"
                raise ConfigurationError(
                    f"collateral fetch: {shown}: cannot connect ({reason})"
                ) from exc
            attempt += 1
            self._sleep(wait)

    def _read(self, response: httpx.Response, shown: str) -> bytes:
        declared = response.headers.get("Content-Length")
        if declared is not None and declared.strip().isdigit() and int(declared) > self._max:
            raise EvidenceError(
                f"collateral fetch: {shown}: response larger than {self._max} bytes"
            )
        chunks: list[bytes] = []
        size = 0
        for chunk in response.iter_bytes():
            size += len(chunk)
            if size > self._max:
                raise EvidenceError(
                    f"collateral fetch: {shown}: response larger than {self._max} bytes"
                )
            chunks.append(chunk)
        return b"".join(chunks)


def _header_chain(response: _Response, names: tuple[str, ...]) -> bytes:
    """A URL-encoded PEM issuer chain from the first of `names` present, decoded and parsed."""
    shown = _display(response.url)
    raw = next((response.headers[n] for n in names if n in response.headers), None)
    if raw is None:
        raise EvidenceError(f"collateral fetch: {shown}: no {names[0]} header")
    if len(raw) > 3 * MAX_CHAIN_BYTES:
        raise EvidenceError(f"collateral fetch: {shown}: {names[0]} header is too large")
    # Plain unquote, not unquote_plus: '+' is a base64 character and PCS escapes it as %2B.
    try:
        pem = urllib.parse.unquote_to_bytes(raw.encode("ascii"))
        pem.decode("ascii")
    except UnicodeError:
        raise EvidenceError(f"collateral fetch: {shown}: {names[0]} header is not ASCII") from None
    if not pem.lstrip().startswith(b"-----BEGIN CERTIFICATE-----"):
        raise EvidenceError(f"collateral fetch: {shown}: {names[0]} header is not a PEM chain")
    try:
        parse_pem_chain(pem, source=names[0])
    except EvidenceError as exc:
        raise EvidenceError(f"collateral fetch: {shown}: {exc.message}") from None
    return pem


def _crl_der(response: _Response, what: str) -> bytes:
    """A CRL body as DER, whichever way the server sent it: DER (PCS with encoding=der, Intel's
    published file), PEM, or DER as hex text (PCCS's root CA CRL)."""
    body = response.body
    match = _PEM_CRL.fullmatch(body)
    if match is not None:
        try:
            body = base64.b64decode(b"".join(match.group(1).split()), validate=True)
        except ValueError:
            body = b""
    elif _HEX_TEXT.fullmatch(body):
        body = bytes.fromhex(body.decode("ascii").strip())
    try:
        crl = x509.load_der_x509_crl(body)
        _ = (crl.issuer, crl.last_update_utc, crl.next_update_utc)
    except (ValueError, TypeError, x509.InvalidVersion):
        raise EvidenceError(
            f"collateral fetch: {_display(response.url)}: {what} is not a CRL"
        ) from None
    return body


def _fresh_until(collateral: Collateral) -> _dt.datetime | None:
    """The earliest nextUpdate of the documents in `collateral` (None if one has none)."""
    ends: list[_dt.datetime] = []
    tcb, qe = collateral.tcb_info(), collateral.qe_identity()
    for doc in (tcb, qe):
        if doc is not None:
            ends.append(doc.body.next_update)
    for crl in (collateral.pck_crl_parsed(), collateral.root_ca_crl_parsed()):
        if crl is not None:
            if crl.next_update_utc is None:
                return None
            ends.append(crl.next_update_utc)
    return min(ends) if ends else None


class SourceOptions(TypedDict, total=False):
    """How a source reaches its server and keeps what it fetched: `cache_dir` (None: nothing
    kept), `client` (replaces the HTTP client; its TLS settings are then the caller's),
    `verify` (True: the system's CAs, or a CA file; never False), `timeout` (seconds),
    `max_response_bytes`, `retries` and `max_retry_after` (on HTTP 429/503), `clock`, `sleep`."""

    cache_dir: str | Path | None
    client: httpx.Client | None
    verify: bool | str | os.PathLike[str]
    timeout: float
    max_response_bytes: int
    retries: int
    max_retry_after: float
    clock: Clock
    sleep: Callable[[float], None]


class _Source:
    """What both sources share: the checked base URL, the cache directory, the HTTP client
    (verified TLS, timeouts, bounded bodies and retries) and a lock; closing."""

    _WHAT: ClassVar[str]

    def __init__(self, base_url: str, **options: Unpack[SourceOptions]) -> None:
        self.base_url = _check_base_url(base_url, self._WHAT)
        cache_dir = options.get("cache_dir")
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self._clock = options.get("clock", utc_now)
        self._http = _Http(
            client=options.get("client"),
            verify=options.get("verify", True),
            timeout=options.get("timeout", _DEFAULT_TIMEOUT),
            max_response_bytes=options.get("max_response_bytes", DEFAULT_MAX_RESPONSE_BYTES),
            retries=options.get("retries", _DEFAULT_RETRIES),
            max_retry_after=options.get("max_retry_after", _DEFAULT_MAX_RETRY_AFTER),
            sleep=options.get("sleep", time.sleep),
            clock=self._clock,
        )
        self._lock = threading.Lock()

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --------------------------------------------------------------------------- Intel


class IntelCollateralSource(_Source):
    """Collateral for Intel SGX and TDX quotes from Intel PCS or a PCCS (API v4).

    `fetch_for(quote)` derives the FMSPC and the PCK CA (platform or processor) from the
    quote's PCK certificate, fetches TCB info and QE identity for the quote's TEE, the PCK CRL
    and the root CA CRL, and returns them as a `Collateral`. With `cache_dir`, each set is
    kept as a collateral directory keyed by (base URL, TEE, FMSPC, CA) and reused while every
    document's nextUpdate is after the verification time.

    `verify` is True (the system's CAs) or the path of a CA file; TLS verification cannot be
    turned off. `client` replaces the HTTP client (its TLS settings are then the caller's).
    """

    _WHAT = "Intel collateral source"

    def __init__(
        self,
        base_url: str = INTEL_PCS_URL,
        *,
        root_ca_crl_url: str | None = None,
        **options: Unpack[SourceOptions],
    ) -> None:
        super().__init__(base_url, **options)
        if root_ca_crl_url is None:
            is_pcs = (
                urllib.parse.urlsplit(self.base_url).hostname == "api.trustedservices.intel.com"
            )
            root_ca_crl_url = (
                INTEL_ROOT_CA_CRL_URL
                if is_pcs
                else f"{self.base_url}/sgx/certification/v4/rootcacrl"
            )
        else:
            parts = urllib.parse.urlsplit(root_ca_crl_url)
            if parts.scheme != "https" or not parts.hostname:
                raise ConfigurationError(
                    f"Intel collateral source: root CA CRL URL {_display(root_ca_crl_url)!r}"
                    " is not an https:// URL"
                )
        self.root_ca_crl_url = root_ca_crl_url

    @staticmethod
    def platform_of(quote: SgxQuote | TdxQuote | bytes) -> tuple[TeeName, str, str]:
        """(tee, fmspc as lower-case hex, ca) of a quote: what its collateral is keyed by."""
        q = parse_quote(bytes(quote)) if isinstance(quote, bytes | bytearray) else quote
        if isinstance(q, SgxQuote):
            tee: TeeName = "sgx"
        elif isinstance(q, TdxQuote):
            tee = "tdx"
        else:
            raise EvidenceError("collateral fetch: quote must be an SgxQuote, a TdxQuote or bytes")
        leaf = q.pck_chain[0]
        fmspc = parse_pck_extensions(leaf).fmspc.hex()
        names = leaf.issuer.get_attributes_for_oid(NameOID.COMMON_NAME)
        issuer_cn = names[0].value if len(names) == 1 else ""
        ca = _CA_BY_ISSUER_CN.get(issuer_cn if isinstance(issuer_cn, str) else "")
        if ca is None:
            raise EvidenceError(
                "collateral fetch: the PCK certificate is not issued by an Intel SGX PCK"
                " Platform or Processor CA"
            )
        return tee, fmspc, ca

    def entry_dir(self, tee: TeeName, fmspc: str, ca: str) -> Path:
        """The cache directory of one (base URL, TEE, FMSPC, CA)."""
        if self.cache_dir is None:
            raise ConfigurationError("Intel collateral source: no cache directory configured")
        key = "\x00".join(("ppml-intel-collateral/1", self.base_url, self.root_ca_crl_url))
        tag = hashlib.sha256(key.encode()).hexdigest()[:16]
        return self.cache_dir / "intel" / f"{tee}-{fmspc}-{ca}-{tag}"

    def fetch_for(
        self, quote: SgxQuote | TdxQuote | bytes, *, at: _dt.datetime | None = None
    ) -> Collateral:
        """The collateral to verify `quote` at time `at` (default: now)."""
        at = self._clock() if at is None else at
        if at.tzinfo is None:
            raise EvidenceError("collateral fetch: the time `at` must be timezone-aware")
        tee, fmspc, ca = self.platform_of(quote)
        if self.cache_dir is None:
            return self._fetch(tee, fmspc, ca)
        entry = self.entry_dir(tee, fmspc, ca)
        with self._lock:
            cached = self._load_fresh(entry, at)
            if cached is not None:
                return cached
            collateral = self._fetch(tee, fmspc, ca)
            ensure_private_dir(self.cache_dir)
            ensure_private_dir(entry.parent)
            write_collateral_dir(collateral, entry, replace=True)
            return collateral

    @staticmethod
    def _load_fresh(entry: Path, at: _dt.datetime) -> Collateral | None:
        if not entry.is_dir():
            return None
        try:
            collateral = Collateral.from_dir(entry)
            until = _fresh_until(collateral)
        except EvidenceError:
            return None  # unreadable or damaged: fetched again and replaced
        if until is None or until <= at or collateral.tcb_info_json is None:
            return None
        return collateral

    def _fetch(self, tee: TeeName, fmspc: str, ca: str) -> Collateral:
        v4 = f"{self.base_url}/{tee}/certification/v4"
        tcb = self._http.get(f"{v4}/tcb?fmspc={fmspc}")
        qe = self._http.get(f"{v4}/qe/identity")
        crl = self._http.get(f"{self.base_url}/sgx/certification/v4/pckcrl?ca={ca}&encoding=der")
        root_crl = self._http.get(self.root_ca_crl_url)
        collateral = Collateral(
            tcb_info_json=tcb.body,
            tcb_info_issuer_chain=_header_chain(tcb, _TCB_CHAIN_HEADERS),
            qe_identity_json=qe.body,
            qe_identity_issuer_chain=_header_chain(qe, (_QE_CHAIN_HEADER,)),
            pck_crl=_crl_der(crl, "the PCK CRL"),
            pck_crl_issuer_chain=_header_chain(crl, (_CRL_CHAIN_HEADER,)),
            root_ca_crl=_crl_der(root_crl, "the root CA CRL"),
        )
        try:
            collateral.parse_all()
        except EvidenceError as exc:
            raise EvidenceError(f"collateral fetch: {_display(self.base_url)}: {exc}") from None
        self._check_matches(collateral, tee, fmspc)
        return collateral

    def _check_matches(self, collateral: Collateral, tee: TeeName, fmspc: str) -> None:
        where = f"collateral fetch: {_display(self.base_url)}"
        tcb, qe = collateral.tcb_info(), collateral.qe_identity()
        assert tcb is not None and qe is not None
        if tcb.body.fmspc.hex() != fmspc:
            raise EvidenceError(
                f"{where}: TCB info is for FMSPC {tcb.body.fmspc.hex()}, not {fmspc}"
            )
        if tcb.body.id != tee.upper():
            raise EvidenceError(f"{where}: TCB info is for {tcb.body.id}, not {tee.upper()}")
        expected_qe = "TD_QE" if tee == "tdx" else "QE"
        if qe.body.id != expected_qe:
            raise EvidenceError(f"{where}: QE identity is {qe.body.id!r}, not {expected_qe!r}")
        crl, chain = collateral.pck_crl_parsed(), collateral.pck_crl_chain()
        if crl is not None and chain is not None and crl.issuer != chain[0].subject:
            raise EvidenceError(f"{where}: the PCK CRL is not issued by its issuer chain's leaf")


# --------------------------------------------------------------------------- AMD


class AmdKdsSource(_Source):
    """VCEK certificates and ASK/ARK chains for SEV-SNP reports from AMD's KDS.

    `fetch_for(report, product)` returns ``(vcek_der, ask_ark_pem)``: the VCEK of the report's
    chip (hwID = CHIP_ID, its first 8 bytes for Turin) at the report's REPORTED_TCB, and the
    product's ASK and ARK in KDS's order. With `cache_dir`, VCEKs are kept by (base URL,
    product, hwID, SPLs) and chains by (base URL, product), reused while not expired.
    """

    _WHAT = "AMD KDS source"

    def __init__(self, base_url: str = KDS_URL, **options: Unpack[SourceOptions]) -> None:
        super().__init__(base_url, **options)

    @staticmethod
    def vcek_query(report: SnpReport | bytes, product: str) -> tuple[str, Mapping[str, int]]:
        """(hwID as lower-case hex, the SPL query parameters) for `report` on `product`."""
        r = parse_report(bytes(report)) if isinstance(report, bytes | bytearray) else report
        if not isinstance(r, SnpReport):
            raise EvidenceError("KDS fetch: report must be an SnpReport or bytes")
        if product not in PRODUCTS:
            raise EvidenceError(f"KDS fetch: unknown product {str(product)[:20]!r}")
        if r.signing_key is not SigningKey.VCEK:
            raise EvidenceError(
                "KDS fetch: the report is not signed by a VCEK (a VLEK comes from the host)"
            )
        if r.mask_chip_key or not any(r.chip_id):
            raise EvidenceError("KDS fetch: the report's CHIP_ID is masked")
        layout = tcb_layout_for_product(product)
        tcb = TcbVersion.decode(r.reported_tcb.raw, layout)
        turin = product == "Turin"
        hwid = (r.chip_id[:8] if turin else r.chip_id).hex()
        params = {
            "blSPL": tcb.bootloader,
            "teeSPL": tcb.tee,
            "snpSPL": tcb.snp,
            "ucodeSPL": tcb.microcode,
        }
        if turin:
            assert tcb.fmc is not None
            params["fmcSPL"] = tcb.fmc
        return hwid, params

    def fetch_for(
        self, report: SnpReport | bytes, product: str, *, at: _dt.datetime | None = None
    ) -> tuple[bytes, bytes]:
        """``(vcek_der, ask_ark_pem)`` for `report` on `product` (Milan, Genoa or Turin)."""
        hwid, params = self.vcek_query(report, product)
        at = self._clock() if at is None else at
        if at.tzinfo is None:
            raise EvidenceError("KDS fetch: the time `at` must be timezone-aware")
        query = "&".join(f"{k}={v}" for k, v in params.items())
        vcek_url = f"{self.base_url}/vcek/v1/{product}/{hwid}?{query}"
        chain_url = f"{self.base_url}/vcek/v1/{product}/cert_chain"
        with self._lock:
            vcek = self._cached_or_fetch(vcek_url, f"vcek-{hwid[:16]}", ".der", _vcek_der, at)
            chain = self._cached_or_fetch(chain_url, "cert_chain", ".pem", _ask_ark_pem, at)
        return vcek, chain

    def _cached_or_fetch(
        self,
        url: str,
        stem: str,
        suffix: str,
        check: Callable[[bytes, str], tuple[bytes, _dt.datetime]],
        at: _dt.datetime,
    ) -> bytes:
        path: Path | None = None
        if self.cache_dir is not None:
            tag = hashlib.sha256(f"ppml-kds/1\x00{url}".encode()).hexdigest()[:24]
            path = self.cache_dir / "amd" / f"{stem}-{tag}{suffix}"
            if path.is_file():
                try:
                    data = path.read_bytes()
                    _, until = check(data, f"cached {path.name}")
                    if at < until:
                        return data
                except (OSError, EvidenceError):
                    pass  # damaged: fetched again and replaced
        response = self._http.get(url)
        data, _ = check(response.body, _display(url))
        if path is not None and self.cache_dir is not None:
            ensure_private_dir(self.cache_dir)
            ensure_private_dir(path.parent)
            with atomic_output(path) as fh:
                fh.write(data)
        return data


def _vcek_der(body: bytes, where: str) -> tuple[bytes, _dt.datetime]:
    try:
        if body.lstrip().startswith(b"-----BEGIN CERTIFICATE-----"):
            cert = x509.load_pem_x509_certificate(body)
        else:
            cert = x509.load_der_x509_certificate(body)
        return cert.public_bytes(Encoding.DER), cert.not_valid_after_utc
    except (ValueError, TypeError):
        raise EvidenceError(f"KDS fetch: {where}: not a certificate") from None


def _ask_ark_pem(body: bytes, where: str) -> tuple[bytes, _dt.datetime]:
    try:
        certs = x509.load_pem_x509_certificates(body)
    except (ValueError, TypeError):
        raise EvidenceError(f"KDS fetch: {where}: not a PEM certificate chain") from None
    if len(certs) != 2:
        raise EvidenceError(f"KDS fetch: {where}: expected 2 certificates (ASK, ARK)")
    pem = b"".join(c.public_bytes(Encoding.PEM) for c in certs)
    return pem, min(c.not_valid_after_utc for c in certs)


def snp_product(report: SnpReport | bytes, product: str | None = None) -> str:
    """The SEV-SNP product (Milan, Genoa or Turin) for a KDS query: `product` when given,
    otherwise from the report's CPUID family and model (reports of version 3 and later)."""
    if product is not None:
        name = product.strip().capitalize()
        if name not in PRODUCTS:
            raise UsageError(f"unknown SEV-SNP product {product[:16]!r}: Milan, Genoa or Turin")
        return name
    parsed = parse_report(report) if isinstance(report, bytes) else report
    family, model = parsed.cpuid_family, parsed.cpuid_model
    if family == 0x1A:
        return "Turin"
    if family == 0x19 and model is not None:
        if model <= 0x0F:
            return "Milan"
        if 0x10 <= model <= 0x1F or 0xA0 <= model <= 0xAF:
            return "Genoa"
    raise EvidenceError("cannot tell the SEV-SNP product from this report (no CPUID): name it")
