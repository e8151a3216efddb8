"""Challenges: single use, short-lived, bounded in number, safe under concurrent use."""

from __future__ import annotations

import datetime as _dt
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import pytest
from tests.support.clock import FakeClock

from ppml.attestation import Challenge, ChallengeCapacityExceeded, ChallengeStore
from ppml.errors import AttestationFailed, ConfigurationError

T0 = _dt.datetime(2030, 1, 1, tzinfo=_dt.UTC)
TTL = _dt.timedelta(seconds=60)


def counter_random() -> Callable[[int], bytes]:
    state = {"n": 0}

    def random_bytes(n: int) -> bytes:
        state["n"] += 1
        return state["n"].to_bytes(n, "big")

    return random_bytes


def store(clock: FakeClock, **kwargs: int) -> ChallengeStore:
    return ChallengeStore(ttl=TTL, clock=clock, random_bytes=counter_random(), **kwargs)


def test_issue_gives_a_32_byte_nonce_expiring_after_the_ttl() -> None:
    clock = FakeClock()
    challenge = store(clock).issue()
    assert challenge == Challenge(nonce=(1).to_bytes(32, "big"), expires_at=T0 + TTL)


def test_default_store_uses_unique_random_nonces() -> None:
    challenges = ChallengeStore()
    nonces = {challenges.issue().nonce for _ in range(100)}
    assert len(nonces) == 100
    assert all(len(n) == 32 for n in nonces)


def test_a_nonce_is_accepted_once() -> None:
    challenges = store(FakeClock())
    nonce = challenges.issue().nonce
    challenges.consume(nonce)
    with pytest.raises(AttestationFailed, match="unknown or already used"):
        challenges.consume(nonce)


def test_an_unknown_nonce_is_refused() -> None:
    challenges = store(FakeClock())
    challenges.issue()
    with pytest.raises(AttestationFailed, match="unknown"):
        challenges.consume(b"\x00" * 32)


@pytest.mark.parametrize("nonce", [b"", b"\x01" * 31, b"\x01" * 33, "x" * 32, None])
def test_a_malformed_nonce_is_refused(nonce: object) -> None:
    with pytest.raises(AttestationFailed, match="32 bytes"):
        store(FakeClock()).consume(nonce)  # type: ignore[arg-type]


def test_a_nonce_is_accepted_until_just_before_it_expires() -> None:
    clock = FakeClock()
    challenges = store(clock)
    nonce = challenges.issue().nonce
    clock.advance(seconds=59.999999)
    challenges.consume(nonce)


def test_an_expired_nonce_is_refused_and_forgotten() -> None:
    clock = FakeClock()
    challenges = store(clock)
    nonce = challenges.issue().nonce
    clock.advance(seconds=60)
    with pytest.raises(AttestationFailed, match="expired"):
        challenges.consume(nonce)
    with pytest.raises(AttestationFailed, match="unknown or already used"):
        challenges.consume(nonce)


def test_the_store_is_bounded_by_dropping_the_oldest() -> None:
    """A full store never refuses a new challenge to everyone (a flood would lock every
    workload out): it drops the oldest outstanding one."""
    clock = FakeClock()
    challenges = store(clock, max_outstanding=3)
    first = challenges.issue()
    second = challenges.issue()
    third = challenges.issue()
    fourth = challenges.issue()
    assert len(challenges) == 3
    with pytest.raises(AttestationFailed, match="unknown"):
        challenges.consume(first.nonce)
    for c in (second, third, fourth):
        challenges.consume(c.nonce)
    assert len(challenges) == 0


def test_each_client_holds_a_bounded_number() -> None:
    clock = FakeClock()
    challenges = store(clock, max_per_client=2)
    a1 = challenges.issue("10.0.0.1")
    challenges.issue("10.0.0.1")
    with pytest.raises(ChallengeCapacityExceeded, match="for this client"):
        challenges.issue("10.0.0.1")
    assert issubclass(ChallengeCapacityExceeded, AttestationFailed)
    other = challenges.issue("10.0.0.2")  # another client is not affected
    challenges.issue()  # nor an in-process caller
    challenges.consume(a1.nonce)  # a used one frees a place
    challenges.issue("10.0.0.1")
    clock.advance(minutes=5)  # so do expired ones
    challenges.issue("10.0.0.1")
    challenges.issue("10.0.0.1")
    with pytest.raises(AttestationFailed, match=r"expired|unknown"):
        challenges.consume(other.nonce)


def test_a_flooding_client_cannot_lock_out_another() -> None:
    """The finding: 10,000 challenges from one client blocked every attestation for 60 s."""
    challenges = ChallengeStore()
    refused = 0
    for _ in range(10_000):
        try:
            challenges.issue("198.51.100.7")
        except ChallengeCapacityExceeded:
            refused += 1
    assert refused == 10_000 - 64
    workload = challenges.issue("127.0.0.1")
    challenges.consume(workload.nonce)


def test_expired_challenges_are_dropped_when_new_ones_are_issued() -> None:
    clock = FakeClock()
    challenges = store(clock)
    for _ in range(50):
        challenges.issue()
    clock.advance(minutes=5)
    challenges.issue()
    assert len(challenges) == 1


def test_concurrent_consumers_of_one_nonce_get_exactly_one_success() -> None:
    challenges = ChallengeStore()
    nonce = challenges.issue().nonce
    barrier = threading.Barrier(16)

    def attempt(_: int) -> bool:
        barrier.wait()
        try:
            challenges.consume(nonce)
        except AttestationFailed:
            return False
        return True

    with ThreadPoolExecutor(max_workers=16) as pool:
        results = list(pool.map(attempt, range(16)))
    assert results.count(True) == 1


def test_concurrent_issuers_never_exceed_the_caps() -> None:
    challenges = ChallengeStore(max_outstanding=100, max_per_client=30)

    def issue_many(n: int) -> int:
        issued = 0
        for _ in range(50):
            try:
                challenges.issue(f"client-{n % 4}")
                issued += 1
            except ChallengeCapacityExceeded:
                pass
        return issued

    with ThreadPoolExecutor(max_workers=8) as pool:
        total = sum(pool.map(issue_many, range(8)))
    assert total >= 100
    assert len(challenges) == 100
    assert max(challenges._per_client.values()) <= 30
    assert sum(challenges._per_client.values()) == 100
    assert len(challenges) == 100


def test_a_broken_random_source_is_a_configuration_error() -> None:
    with pytest.raises(ConfigurationError):
        ChallengeStore(random_bytes=lambda n: b"\x00" * (n - 1)).issue()
    repeating = ChallengeStore(random_bytes=lambda n: b"\x07" * n)
    repeating.issue()
    with pytest.raises(ConfigurationError, match="repeated"):
        repeating.issue()


@pytest.mark.parametrize(
    "kwargs",
    [
        {"ttl": _dt.timedelta(0)},
        {"ttl": _dt.timedelta(seconds=-1)},
        {"max_outstanding": 0},
        {"max_outstanding": True},
        {"max_per_client": 0},
        {"max_per_client": 1.5},
    ],
)
def test_bad_settings_are_refused(kwargs: dict[str, object]) -> None:
    with pytest.raises(ConfigurationError):
        ChallengeStore(**kwargs)  # type: ignore[arg-type]
