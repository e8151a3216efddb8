"""The verified-collateral cache: a second quote neither re-reads nor re-verifies the collateral
directory; a changed file is read again; collateral past its nextUpdate is refused as without
the cache."""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from tests.support.evidence.evidence import matching_collateral
from tests.support.evidence.intel import IntelTestPki, sgx_body, sgx_quote
from tests.support.evidence.intel_collateral import write_files

from ppml.attestation import SgxVerifier, TcbStatus
from ppml.attestation import evidence as evidence_module
from ppml.attestation.collateral import DirectorySource, collateral_source
from ppml.attestation.collateral import sources as sources_module
from ppml.attestation.intel import verified as verified_module
from ppml.attestation.intel.verified import CollateralCache, verify_collateral
from ppml.errors import AttestationFailed, ConfigurationError

AT = dt.datetime(2025, 6, 1, tzinfo=dt.UTC)
LATE = dt.datetime(2026, 7, 1, tzinfo=dt.UTC)  # past the test collateral's nextUpdate
PKI = IntelTestPki.create(seed=21)
RD = bytes(range(64))


def counting(monkeypatch: pytest.MonkeyPatch, module: object, name: str) -> list[int]:
    """Count the calls of `module.name` (still calling it)."""
    calls: list[int] = []
    original: Callable[..., Any] = getattr(module, name)

    def wrapper(*args: Any, **kw: Any) -> Any:
        calls.append(1)
        return original(*args, **kw)

    monkeypatch.setattr(module, name, wrapper)
    return calls


def aged(directory: Path) -> Path:
    """Date the files' last write an hour back: a rewrite within the file system's timestamp
    granularity could otherwise keep their timestamps, so fresh files are read every time."""
    for file in directory.iterdir():
        info = file.stat()
        os.utime(file, ns=(info.st_atime_ns, info.st_mtime_ns - 3600 * 10**9))
    return directory


@pytest.fixture
def counts(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[int]]:
    evidence_module.INTEL_COLLATERAL_CACHE.clear()
    return {
        "reads": counting(monkeypatch, sources_module, "read_intel_dir"),
        "signatures": counting(monkeypatch, verified_module, "verify_signed_body"),
    }


def test_a_second_quote_does_not_reread_or_reverify(
    tmp_path: Path, counts: dict[str, list[int]]
) -> None:
    directory = aged(write_files(tmp_path / "c", matching_collateral(PKI, status="OutOfDate")))
    verifier = SgxVerifier.for_testing(root=PKI.root_cert, collateral=directory, clock=lambda: AT)
    for isv_svn in (1, 2, 3):
        quote = sgx_quote(PKI, sgx_body(report_data=RD, isv_svn=isv_svn))
        claims = verifier.verify(quote, expected_report_data=RD)
        assert claims.tcb_status is TcbStatus.OUT_OF_DATE
    assert len(counts["reads"]) == 1  # read once, when the verifier was built
    assert len(counts["signatures"]) == 2  # TCB info and QE identity, verified once


def test_a_changed_file_is_read_again(tmp_path: Path, counts: dict[str, list[int]]) -> None:
    directory = aged(write_files(tmp_path / "c", matching_collateral(PKI, status="UpToDate")))
    verifier = SgxVerifier.for_testing(root=PKI.root_cert, collateral=directory, clock=lambda: AT)
    quote = sgx_quote(PKI, sgx_body(report_data=RD))
    assert verifier.verify(quote, expected_report_data=RD).tcb_status is TcbStatus.UP_TO_DATE
    aged(write_files(directory, matching_collateral(PKI, status="Revoked")))
    with pytest.raises(AttestationFailed, match="Revoked"):
        verifier.verify(quote, expected_report_data=RD)
    assert len(counts["reads"]) == 2
    # A rewrite whose files get the cached mtimes back is still seen (their ctime changed).
    seen = {n: (directory / n).stat() for n in ("tcb_info.json", "qe_identity.json")}
    write_files(directory, matching_collateral(PKI, status="UpToDate"))
    for name, info in seen.items():
        os.utime(directory / name, ns=(info.st_atime_ns, info.st_mtime_ns))
    assert verifier.verify(quote, expected_report_data=RD).tcb_status is TcbStatus.UP_TO_DATE
    assert len(counts["reads"]) == 3


def test_collateral_past_its_next_update_is_refused_though_cached(
    tmp_path: Path, counts: dict[str, list[int]]
) -> None:
    directory = aged(write_files(tmp_path / "c", matching_collateral(PKI)))
    now = [AT]
    verifier = SgxVerifier.for_testing(
        root=PKI.root_cert, collateral=directory, clock=lambda: now[0]
    )
    quote = sgx_quote(PKI, sgx_body(report_data=RD))
    assert verifier.verify(quote, expected_report_data=RD).tcb_status is TcbStatus.UP_TO_DATE
    now[0] = LATE
    with pytest.raises(AttestationFailed, match="expired"):
        verifier.verify(quote, expected_report_data=RD)
    now[0] = AT  # current again: the cached verification serves
    before = len(counts["signatures"])
    assert verifier.verify(quote, expected_report_data=RD).tcb_status is TcbStatus.UP_TO_DATE
    assert len(counts["signatures"]) == before
    assert len(counts["reads"]) == 1


def test_files_written_just_now_are_read_every_time(tmp_path: Path) -> None:
    source = DirectorySource(write_files(tmp_path / "c", matching_collateral(PKI)))
    source.intel(b"", AT)
    source.intel(b"", AT)
    assert source.reads == 2  # a same-size rewrite in the same clock tick would look unchanged
    aged(source.path)
    source.intel(b"", AT)
    source.intel(b"", AT)
    assert source.reads == 3


def test_the_cache_is_bounded_and_keeps_only_what_passed(tmp_path: Path) -> None:
    cache = CollateralCache(max_entries=1)
    good = DirectorySource(write_files(tmp_path / "a", matching_collateral(PKI))).intel(b"", AT)
    other = matching_collateral(PKI, status="OutOfDate")
    second = DirectorySource(write_files(tmp_path / "b", other)).intel(b"", AT)
    assert good is not None and second is not None
    verify_collateral(good, root=PKI.root_cert, at=LATE, cache=cache)  # expired: not kept
    assert len(cache) == 0
    verify_collateral(good, root=PKI.root_cert, at=AT, cache=cache)
    verify_collateral(second, root=PKI.root_cert, at=AT, cache=cache)
    assert len(cache) == 1
    verify_collateral(second, root=PKI.root_cert, at=AT, cache=cache)
    assert cache.hits == 1
    lenient = verify_collateral(good, root=PKI.root_cert, at=LATE, allow_outdated=True, cache=cache)
    assert lenient.notes and cache.hits == 1  # outdated-but-allowed is never served from cache


def test_one_place_builds_the_source() -> None:
    assert collateral_source() is None
    with pytest.raises(ConfigurationError):
        collateral_source(directory="/nonexistent/collateral")
