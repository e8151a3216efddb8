"""Inside an attested workload: attest lazily, cache the token, get data keys sealed to us.

`AttestedKeyProvider` is a `DataKeyProvider`: the data layer uses it exactly as it uses the
workspace's KMS. The first time a key is needed it makes an ephemeral X25519 key pair, asks the
attestation service for a challenge, asks the launcher (over the evidence channel) for evidence
binding SHA-512(nonce || public key), trades the evidence for a token, and from then on asks the
key broker for data keys sealed to that public key. Tokens are reused until shortly before they
expire; data keys live only in this process's memory.

`process_key_provider` is the one place that chooses a process's keys: attested under `ppml
run`, else what the caller opens (the workspace's KMS).
"""

from __future__ import annotations

import base64
import datetime as _dt
import os
import ssl
import threading
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import httpx
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from ppml._internal.clock import Clock, utc_now
from ppml.attestation.claims import report_data_for
from ppml.crypto.envelope import DataKey, DataKeyProvider, WrappedKey
from ppml.crypto.hpke import generate_keypair
from ppml.errors import AccessDenied, AttestationFailed, ConfigurationError, KeyAccessError
from ppml.kms.broker import ReleasedKey, open_released
from ppml.tee.attester import evidence_source
from ppml.tee.channel import request_evidence
from ppml.tee.workload_env import CA_PEM_ENV, KMS_URL_ENV, TEE_ENV, Evidence, in_attested_run

__all__ = [
    "CA_PEM_ENV",
    "KMS_URL_ENV",
    "TEE_ENV",
    "AttestedKeyProvider",
    "ClosableKeyProvider",
    "in_attested_run",
    "process_key_provider",
]

_REFRESH_MARGIN = _dt.timedelta(seconds=30)


class ClosableKeyProvider(DataKeyProvider, Protocol):
    """A key provider its owner closes when done with it."""

    def close(self) -> None: ...


def process_key_provider(
    open_workspace_keys: Callable[[], ClosableKeyProvider],
    env: Mapping[str, str] = os.environ,
) -> ClosableKeyProvider:
    """This process's keys: released by the key broker after attestation when it runs under
    `ppml run`, else `open_workspace_keys()` (the workspace's KMS, which needs its passphrase).
    The caller closes what it gets."""
    if in_attested_run(env):
        return AttestedKeyProvider.from_environment(env)
    return open_workspace_keys()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


class AttestedKeyProvider:
    """Data keys from the key broker, released to this attested workload only."""

    def __init__(
        self,
        base_url: str,
        ca_pem: str,
        *,
        evidence: Evidence = request_evidence,
        transport: httpx.BaseTransport | None = None,
        clock: Clock = utc_now,
    ) -> None:
        context = ssl.create_default_context(cadata=ca_pem)
        self._http = httpx.Client(
            base_url=base_url, verify=context, transport=transport, timeout=30.0
        )
        self._evidence = evidence
        self._clock = clock
        self._lock = threading.Lock()
        self._private: X25519PrivateKey | None = None
        self._token: str | None = None
        self._token_expires = _dt.datetime.min.replace(tzinfo=_dt.UTC)
        self._keys: dict[WrappedKey, bytes] = {}

    @classmethod
    def from_environment(cls, env: Mapping[str, str] = os.environ) -> AttestedKeyProvider:
        try:
            return cls(env[KMS_URL_ENV], env[CA_PEM_ENV], evidence=evidence_source(env))
        except KeyError as exc:
            raise ConfigurationError(f"not an attested run: {exc.args[0]} is not set") from None

    def close(self) -> None:
        self._http.close()
        self._keys.clear()

    def __enter__(self) -> AttestedKeyProvider:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- attestation ---------------------------------------------------------------------------

    def _attest(self) -> None:
        private, public = generate_keypair()
        challenge = self._post("/attestation/v1/challenge", {})
        nonce = base64.b64decode(challenge["nonce"])
        tee, evidence = self._evidence(report_data_for(nonce, public))
        result = self._post(
            "/attestation/v1/attest",
            {
                "tee": tee,
                "evidence": _b64(evidence),
                "nonce": _b64(nonce),
                "public_key": _b64(public),
            },
        )
        self._private = private
        self._token = str(result["token"])
        self._token_expires = _dt.datetime.fromisoformat(str(result["expires_at"]))

    def _current_token(self) -> tuple[str, X25519PrivateKey]:
        if self._token is None or self._clock() >= self._token_expires - _REFRESH_MARGIN:
            self._attest()
        assert self._token is not None and self._private is not None
        return self._token, self._private

    # -- the DataKeyProvider interface ---------------------------------------------------------

    def generate_data_key(self, key_name: str) -> DataKey:
        with self._lock:
            token, private = self._current_token()
            reply = self._post(f"/kms/v1/keys/{key_name}/datakey", {}, token=token)
            released = ReleasedKey.from_dict(reply)
            return open_released(released, private)

    def unwrap(self, wrapped: WrappedKey) -> bytes:
        with self._lock:
            cached = self._keys.get(wrapped)
            if cached is not None:
                return cached
            token, private = self._current_token()
            reply = self._post(
                f"/kms/v1/keys/{wrapped.key_name}/unwrap",
                {"wrapped_key": wrapped.to_text()},
                token=token,
            )
            key = open_released(ReleasedKey.from_dict(reply), private).plaintext
            self._keys[wrapped] = key
            return key

    # -- HTTP ----------------------------------------------------------------------------------

    def _post(self, path: str, body: Mapping[str, Any], *, token: str | None = None) -> Any:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        try:
            response = self._http.post(path, json=dict(body), headers=headers)
        except httpx.HTTPError as exc:
            raise KeyAccessError(f"cannot reach the KMS: {type(exc).__name__}") from None
        if response.status_code == 401:
            raise AttestationFailed("attestation failed (the service refused the evidence)")
        if response.status_code in (403, 404):
            raise AccessDenied(
                "access denied: the key's release policy does not allow this workload"
            )
        if response.status_code != 200:
            raise KeyAccessError(f"the KMS answered {response.status_code}")
        return response.json()
