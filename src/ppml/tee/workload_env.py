"""What `ppml run` hands an attested workload, and how the workload gets evidence: the contract
between the launcher (`ppml.tee.launcher`), the workload's evidence source
(`ppml.tee.attester`) and its key provider (`ppml.tee.runtime`)."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping

from ppml.tee.channel import CHANNEL_ENV

__all__ = ["CA_PEM_ENV", "KMS_URL_ENV", "LIBOS_ENV", "TEE_ENV", "Evidence", "in_attested_run"]

TEE_ENV = "PPML_TEE"
# Which SGX LibOS the enclave runs ("occlum"; Gramine when absent): where its quotes come from.
LIBOS_ENV = "PPML_SGX_LIBOS"
KMS_URL_ENV = "PPML_KMS_URL"
CA_PEM_ENV = "PPML_KMS_CA_PEM"

# Report data (64 bytes) -> (TEE type, evidence over those report data).
Evidence = Callable[[bytes], tuple[str, bytes]]


def in_attested_run(env: Mapping[str, str] = os.environ) -> bool:
    """Whether this process was started by `ppml run`: it has a KMS, and an evidence channel
    or (in a Gramine-SGX enclave) evidence of its own."""
    return KMS_URL_ENV in env and (CHANNEL_ENV in env or env.get(TEE_ENV) == "sgx")
