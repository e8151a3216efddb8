"""The evidence channel: the workload asks, the launcher signs, the verifier accepts."""

from __future__ import annotations

import hashlib
import os
import socket

import pytest

from ppml.attestation.sim import SimPlatform, SimVerifier
from ppml.errors import AttestationFailed
from ppml.tee.channel import EvidenceChannelServer, request_evidence

MEASUREMENT = hashlib.sha384(b"workload").hexdigest()


def test_round_trip_and_verification() -> None:
    platform = SimPlatform.generate()
    server = EvidenceChannelServer(lambda rd: platform.quote(MEASUREMENT, rd), tee="sim")
    server.start()
    try:
        report_data = os.urandom(64)
        tee, evidence = request_evidence(report_data, fd=server.child_fd)
        assert tee == "sim"
        claims = SimVerifier(platform.public_key).verify(evidence, expected_report_data=report_data)
        assert claims.measurements["measurement"] == MEASUREMENT
        # The workload cannot pick the measurement: only report data goes over the channel.
        _, evidence2 = request_evidence(os.urandom(64), fd=server.child_fd)
        assert evidence2 != evidence
    finally:
        server.close()


def test_bad_requests_are_refused_and_the_server_keeps_serving() -> None:
    platform = SimPlatform.generate()
    server = EvidenceChannelServer(lambda rd: platform.quote(MEASUREMENT, rd), tee="sim")
    server.start()
    try:
        with pytest.raises(AttestationFailed):
            request_evidence(b"short", fd=server.child_fd)
        raw = socket.socket(fileno=os.dup(server.child_fd))
        with raw.makefile("rwb") as stream:
            stream.write(b'{"op": "sign-anything", "data": "00"}\n')
            stream.flush()
            assert b'"ok": false' in stream.readline()
        raw.close()
        tee, _ = request_evidence(os.urandom(64), fd=server.child_fd)
        assert tee == "sim"
    finally:
        server.close()


def test_no_channel_outside_an_attested_run(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PPML_TEE_CHANNEL", raising=False)
    with pytest.raises(AttestationFailed, match="ppml run"):
        request_evidence(os.urandom(64))
