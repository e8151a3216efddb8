"""What a verifier needs besides the evidence (RATS endorsements), as typed values.

`Collateral`: Intel PCS collateral for SGX and TDX quotes (TCB info, QE identity, CRLs and their
issuer chains), exactly as PCS returned it. `SnpCollateral`: the VCEK (or VLEK) that signed an
SEV-SNP report and, optionally, its ASK/ARK chain.

A collateral directory holds (each optional, but a document never without its chain)
``tcb_info.json`` + ``tcb_info_issuer_chain.pem``, ``qe_identity.json`` +
``qe_identity_issuer_chain.pem``, ``pck_crl.der`` (or ``.pem``) + ``pck_crl_issuer_chain.pem``,
``root_ca_crl.der`` (or ``.pem``); for SEV-SNP, ``vcek.der`` (or ``vcek.pem``) and
``ask_ark.pem``. `INTEL_FILES` and `SNP_FILES` are that layout, for readers and writers alike.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Final, NoReturn

from cryptography import x509
from cryptography.utils import CryptographyDeprecationWarning

from ppml.attestation.intel.collateral import (
    MAX_CHAIN_BYTES,
    MAX_CRL_BYTES,
    MAX_JSON_BYTES,
    SignedEnclaveIdentity,
    SignedTcbInfo,
    parse_crl,
    parse_pem_chain,
    parse_qe_identity_json,
    parse_tcb_info_json,
)
from ppml.errors import EvidenceError

__all__ = [
    "INTEL_FILES",
    "MAX_CERT_FILE",
    "SNP_FILES",
    "Collateral",
    "SnpCollateral",
    "certificates_from",
]

#: Collateral field -> its file names in a directory (the first one is what writers use).
INTEL_FILES: Final[Mapping[str, tuple[str, ...]]] = MappingProxyType(
    {
        "tcb_info_json": ("tcb_info.json",),
        "tcb_info_issuer_chain": ("tcb_info_issuer_chain.pem",),
        "qe_identity_json": ("qe_identity.json",),
        "qe_identity_issuer_chain": ("qe_identity_issuer_chain.pem",),
        "pck_crl": ("pck_crl.der", "pck_crl.pem"),
        "pck_crl_issuer_chain": ("pck_crl_issuer_chain.pem",),
        "root_ca_crl": ("root_ca_crl.der", "root_ca_crl.pem"),
    }
)
#: SEV-SNP collateral files: the VCEK (DER or PEM) and the ASK/ARK chain (PEM).
SNP_FILES: Final[Mapping[str, tuple[str, ...]]] = MappingProxyType(
    {"vcek": ("vcek.der", "vcek.pem"), "ask_ark": ("ask_ark.pem",)}
)
MAX_CERT_FILE: Final = 64 * 1024

_PAIRS = (
    ("tcb_info_json", "tcb_info_issuer_chain", "tcb_info.json", "tcb_info_issuer_chain.pem"),
    (
        "qe_identity_json",
        "qe_identity_issuer_chain",
        "qe_identity.json",
        "qe_identity_issuer_chain.pem",
    ),
    ("pck_crl", "pck_crl_issuer_chain", "pck_crl", "pck_crl_issuer_chain.pem"),
)
_LIMITS = {
    "tcb_info_json": MAX_JSON_BYTES,
    "qe_identity_json": MAX_JSON_BYTES,
    "tcb_info_issuer_chain": MAX_CHAIN_BYTES,
    "qe_identity_issuer_chain": MAX_CHAIN_BYTES,
    "pck_crl_issuer_chain": MAX_CHAIN_BYTES,
    "pck_crl": MAX_CRL_BYTES,
    "root_ca_crl": MAX_CRL_BYTES,
}


def _fail(source: str, reason: str) -> NoReturn:
    raise EvidenceError(f"{source}: {reason}")


def _read(path: Path, limit: int) -> bytes:
    try:
        with path.open("rb") as fh:
            data = fh.read(limit + 1)
    except OSError as exc:
        _fail(path.name, f"cannot be read ({exc.strerror or type(exc).__name__})")
    if len(data) > limit:
        _fail(path.name, f"larger than {limit} bytes")
    return data


@dataclass(frozen=True, slots=True)
class Collateral:
    """The PCS responses for one platform, as PCS returned them; every part optional, but
    a signed document or CRL never without its issuer chain (and vice versa)."""

    tcb_info_json: bytes | None = None
    tcb_info_issuer_chain: bytes | None = None
    qe_identity_json: bytes | None = None
    qe_identity_issuer_chain: bytes | None = None
    pck_crl: bytes | None = None
    pck_crl_issuer_chain: bytes | None = None
    root_ca_crl: bytes | None = None

    def __post_init__(self) -> None:
        for name, limit in _LIMITS.items():
            value = getattr(self, name)
            if value is not None and (not isinstance(value, bytes) or len(value) > limit):
                _fail(name, f"must be bytes, at most {limit}")
        for doc, chain, doc_name, chain_name in _PAIRS:
            if (getattr(self, doc) is None) != (getattr(self, chain) is None):
                present, absent = (
                    (doc_name, chain_name) if getattr(self, doc) else (chain_name, doc_name)
                )
                _fail(present, f"is given without {absent}")

    @property
    def empty(self) -> bool:
        return all(getattr(self, name) is None for name in _LIMITS)

    @classmethod
    def from_dir(cls, path: str | Path) -> Collateral:
        """Load collateral files from a directory (see the module docstring for the names)
        and parse each of them, so that anything malformed fails here, naming the file."""
        directory = Path(path)
        if not directory.is_dir():
            raise EvidenceError(f"collateral directory {str(directory)[:200]!r} does not exist")
        parts: dict[str, bytes | None] = {}
        for field_name, names in INTEL_FILES.items():
            found = [directory / n for n in names if (directory / n).exists()]
            if len(found) > 1:
                _fail(names[0], f"both {names[0]} and {names[1]} are present")
            parts[field_name] = _read(found[0], _LIMITS[field_name]) if found else None
        collateral = cls(**parts)
        collateral.parse_all()
        return collateral

    def parse_all(self) -> None:
        """Parse every part present (raises `EvidenceError` naming the first bad file)."""
        self.tcb_info()
        self.qe_identity()
        self.tcb_info_chain()
        self.qe_identity_chain()
        self.pck_crl_chain()
        self.pck_crl_parsed()
        self.root_ca_crl_parsed()

    def tcb_info(self) -> SignedTcbInfo | None:
        return None if self.tcb_info_json is None else parse_tcb_info_json(self.tcb_info_json)

    def qe_identity(self) -> SignedEnclaveIdentity | None:
        if self.qe_identity_json is None:
            return None
        return parse_qe_identity_json(self.qe_identity_json)

    def tcb_info_chain(self) -> tuple[x509.Certificate, ...] | None:
        return _chain(self.tcb_info_issuer_chain, "tcb_info_issuer_chain.pem")

    def qe_identity_chain(self) -> tuple[x509.Certificate, ...] | None:
        return _chain(self.qe_identity_issuer_chain, "qe_identity_issuer_chain.pem")

    def pck_crl_chain(self) -> tuple[x509.Certificate, ...] | None:
        return _chain(self.pck_crl_issuer_chain, "pck_crl_issuer_chain.pem")

    def pck_crl_parsed(self) -> x509.CertificateRevocationList | None:
        return None if self.pck_crl is None else parse_crl(self.pck_crl, source="pck_crl")

    def root_ca_crl_parsed(self) -> x509.CertificateRevocationList | None:
        if self.root_ca_crl is None:
            return None
        return parse_crl(self.root_ca_crl, source="root_ca_crl")


def _chain(data: bytes | None, source: str) -> tuple[x509.Certificate, ...] | None:
    return None if data is None else parse_pem_chain(data, source=source)


def certificates_from(data: object, what: str) -> list[x509.Certificate]:
    """Certificates from PEM (one or more), DER (one), a certificate or a sequence of them."""
    if isinstance(data, x509.Certificate):
        return [data]
    if isinstance(data, Sequence) and not isinstance(data, str | bytes):
        if not all(isinstance(c, x509.Certificate) for c in data):
            raise EvidenceError(f"{what}: must be certificates")
        return list(data)
    if isinstance(data, str):
        data = data.encode("ascii", "replace")
    if not isinstance(data, bytes):
        raise EvidenceError(f"{what}: must be PEM or DER bytes or a certificate")
    if len(data) > MAX_CERT_FILE:
        raise EvidenceError(f"{what}: larger than {MAX_CERT_FILE} bytes")
    try:
        with warnings.catch_warnings():
            # AMD's KDS issues VCEKs with serial number 0, which cryptography warns about;
            # the certificate is still checked step by step by the verifier.
            warnings.simplefilter("ignore", CryptographyDeprecationWarning)
            if b"-----BEGIN CERTIFICATE-----" in data:
                certs = x509.load_pem_x509_certificates(data)
            else:
                certs = [x509.load_der_x509_certificate(data)]
    except ValueError as exc:
        raise EvidenceError(f"{what}: not a valid PEM or DER certificate") from exc
    return certs


@dataclass(frozen=True, slots=True)
class SnpCollateral:
    """The VCEK (or VLEK) certificate of an SEV-SNP report and, when given, its issuer chain
    ``(ASK, ARK)`` (``(ASVK, ARK)`` for a VLEK) in the order AMD's KDS ``cert_chain`` gives."""

    vcek: x509.Certificate
    ask_ark: tuple[x509.Certificate, x509.Certificate] | None = None

    @classmethod
    def of(cls, vcek: object, ask_ark: object = None) -> SnpCollateral:
        """From PEM or DER bytes or certificates (`certificates_from`)."""
        vcek_certs = certificates_from(vcek, "VCEK")
        if len(vcek_certs) != 1:
            raise EvidenceError("VCEK: give exactly one certificate")
        if ask_ark is None:
            return cls(vcek_certs[0])
        chain = certificates_from(ask_ark, "ASK/ARK")
        if len(chain) != 2:
            raise EvidenceError("ASK/ARK: give two certificates, the ASK (or ASVK) then the ARK")
        return cls(vcek_certs[0], (chain[0], chain[1]))
