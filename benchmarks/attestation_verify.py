"""Intel quote verifications per second on one core, as ratios to baselines measured in the same
run.

Measured: `verify_quote` on a real SGX v3 quote (tests/data/vectors/sgx-v3-occlum/quote.dat)
from its bytes, with
the PCK chain cached (`ChainCache`, after one warm-up) and without it, and with the cache on an
already parsed quote. Baseline: the raw ECDSA P-256 / SHA-256 verify of pyca/cryptography. A
quote verification always checks two ECDSA signatures (the QE report by the PCK key, the quote
by the attestation key), so its ceiling is about half the raw ECDSA rate. One process, one
thread.

Also, as the attestation service verifies: a synthetic SGX quote with a collateral directory
(TCB info, QE identity, CRLs: test support), through one `SgxVerifier` (the directory read once,
the verified collateral kept while it is valid) against a verifier built for each quote (the
directory read and its signatures and chains verified every time).

    python benchmarks/attestation_verify.py [--duration 3] [--profile]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from ppml.attestation.intel.chain import ChainCache, intel_sgx_root, verify_quote
from ppml.attestation.intel.quote import parse_quote

GOAL = 2000  # quote verifications per second on one core
ROOT = Path(__file__).resolve().parents[1]
VECTOR = ROOT / "tests/data/vectors/sgx-v3-occlum/quote.dat"
VECTOR_AT = datetime(2025, 6, 1, tzinfo=UTC)  # inside the real PCK chain's validity


def rate(fn: Callable[[], object], duration: float) -> float:
    """Calls per second of `fn` over about `duration` seconds (timed in batches)."""
    fn()
    calls, batch = 0, 16
    start = time.perf_counter()
    end = start + duration
    while True:
        for _ in range(batch):
            fn()
        calls += batch
        now = time.perf_counter()
        if now >= end:
            return calls / (now - start)


def load_quote() -> tuple[bytes, x509.Certificate, datetime, str]:
    return VECTOR.read_bytes(), intel_sgx_root(), VECTOR_AT, f"real SGX v3 quote ({VECTOR.name})"


def collateral_paths(duration: float, work: Path) -> tuple[float, float]:
    """(quotes/s through one verifier over a collateral directory, quotes/s with a verifier
    built for each quote): the verified-collateral cache against reading and verifying again."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from tests.support.evidence.evidence import matching_collateral
    from tests.support.evidence.intel import DEFAULT_AT, IntelTestPki, sgx_body, sgx_quote
    from tests.support.evidence.intel_collateral import write_files

    from ppml.attestation import SgxVerifier
    from ppml.attestation import evidence as evidence_module

    pki = IntelTestPki.create(seed=2)
    directory = write_files(work / "collateral", matching_collateral(pki, status="UpToDate"))
    old = time.time() - 3600  # files written just now are re-read on every use (coarse clocks)
    for file in directory.iterdir():
        os.utime(file, (old, old))
    report_data = bytes(range(64))
    quote = sgx_quote(pki, sgx_body(report_data=report_data))

    def verifier() -> SgxVerifier:
        return SgxVerifier.for_testing(
            root=pki.root_cert, collateral=directory, clock=lambda: DEFAULT_AT
        )

    one = verifier()

    def kept() -> object:
        return one.verify(quote, expected_report_data=report_data)

    def afresh() -> object:
        evidence_module.INTEL_COLLATERAL_CACHE.clear()
        return verifier().verify(quote, expected_report_data=report_data)

    return rate(kept, duration), rate(afresh, duration)


def raw_ecdsa() -> Callable[[], None]:
    key = ec.generate_private_key(ec.SECP256R1())
    message = os.urandom(432)  # the size of an SGX quote's signed header and body
    signature = key.sign(message, ec.ECDSA(hashes.SHA256()))
    public = key.public_key()
    algorithm = ec.ECDSA(hashes.SHA256())
    return lambda: public.verify(signature, message, algorithm)


def profile(fn: Callable[[], object], duration: float, top: int) -> str:
    profiler = cProfile.Profile()
    profiler.enable()
    rate(fn, duration)
    profiler.disable()
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(top)
    return out.getvalue()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--duration", type=float, default=3.0, help="seconds per measurement (default 3)"
    )
    ap.add_argument(
        "--profile",
        action="store_true",
        help="also print a cProfile of the cached path (by own time)",
    )
    opts = ap.parse_args()
    raw, root, at, note = load_quote()
    quote = parse_quote(raw)
    cache = ChainCache()
    warm = verify_quote(raw, root=root, at=at, cache=cache)  # the warm-up fills the cache
    if not warm.verified:
        raise SystemExit(f"the quote does not verify: {warm.first_failure}")

    def cached() -> object:
        return verify_quote(raw, root=root, at=at, cache=cache)

    def cached_parsed() -> object:
        return verify_quote(quote, root=root, at=at, cache=cache)

    def uncached() -> object:
        return verify_quote(raw, root=root, at=at)

    def parse_only() -> object:
        return parse_quote(raw)

    from ppml.attestation import verify_evidence

    def api() -> object:  # the library call: auto-detection, claims, the module's chain cache
        return verify_evidence(raw, root_pem=root, at=at)

    if not verify_evidence(raw, root_pem=root, at=at).verified:
        raise SystemExit("verify_evidence refuses the quote")

    print(f"quote: {note}, {len(raw)} bytes; verified at {at.date()}")
    print(f"one process, one thread, {opts.duration:g} s per measurement")
    r_ecdsa = rate(raw_ecdsa(), opts.duration)
    r_cached = rate(cached, opts.duration)
    r_parsed = rate(cached_parsed, opts.duration)
    r_uncached = rate(uncached, opts.duration)
    r_parse = rate(parse_only, opts.duration)
    r_api = rate(api, opts.duration)
    assert cache.misses == 1, "the cached path must hit the cache"
    import tempfile

    with tempfile.TemporaryDirectory() as work:
        r_kept, r_afresh = collateral_paths(opts.duration, Path(work))

    print()
    print(f"  {'measurement':<44} {'per second':>11} {'µs each':>9} {'x raw ECDSA':>12}")

    def row(name: str, per_second: float) -> None:
        print(
            f"  {name:<44} {per_second:11,.0f} {1e6 / per_second:9.1f} {per_second / r_ecdsa:12.3f}"
        )

    row("raw ECDSA P-256 verify (baseline)", r_ecdsa)
    row("ceiling: 2 ECDSA verifies per quote", r_ecdsa / 2)
    row("verify_quote(bytes), chain cached", r_cached)
    row("verify_quote(parsed quote), chain cached", r_parsed)
    row("verify_quote(bytes), no cache", r_uncached)
    row("parse_quote(bytes) alone", r_parse)
    row("verify_evidence(bytes), the library call", r_api)
    row("SgxVerifier + collateral dir, kept verified", r_kept)
    row("SgxVerifier + collateral dir, read per quote", r_afresh)
    print()
    print(f"  cached verify rate / raw ECDSA rate: {r_cached / r_ecdsa:.3f}")
    print(f"  cached verify rate / ceiling (raw ECDSA / 2): {2 * r_cached / r_ecdsa:.3f}")
    print(f"  cached / uncached: {r_cached / r_uncached:.2f}x")
    print(f"  collateral kept verified / read and verified per quote: {r_kept / r_afresh:.2f}x")
    for label, value in (("verify_quote", r_cached), ("verify_evidence", r_api)):
        met = "met" if value >= GOAL else "NOT met"
        print(
            f"at least {GOAL:,} quote verifications per second on one core ({label}): "
            f"{met} ({value:,.0f}/s)"
        )
    if opts.profile:
        print()
        print("profile of verify_quote(bytes) with the chain cached, by own time:")
        print(profile(cached, opts.duration, 25))
    # The headline ratio, for benchmarks/run.py (higher is better).
    print(f"RESULT attestation_verify evidence_vs_ecdsa={r_api / r_ecdsa:.3f}")


if __name__ == "__main__":
    main()
