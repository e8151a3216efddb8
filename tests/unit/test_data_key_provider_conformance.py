"""One conformance suite for every `DataKeyProvider`: the workspace's KMS (directly, and as the
file commands open it), the attested workload's provider (against the KMS's routes in process,
with sim evidence), the key bundle of a child process without a TEE, the keys the Spark driver
releases to a task, and the tests' in-memory provider. Each is checked against the promises of
the protocol's docstring (`ppml.crypto.envelope.DataKeyProvider`)."""

from __future__ import annotations

import base64
import contextlib
import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import httpx
import pytest
from tests.support import MemoryKeyProvider
from tests.support.asgi import AsgiClient

from ppml.attestation import SimPlatform
from ppml.cli._common import OpeningKeys
from ppml.crypto.envelope import DATA_KEY_BYTES, DataKey, DataKeyProvider, WrappedKey
from ppml.crypto.passphrase import KdfParams
from ppml.errors import IntegrityError, KeyAccessError, PPMLError
from ppml.kms import KeyService
from ppml.server.app import Services, create_app
from ppml.server.embedded import services_for
from ppml.serving.deploy import StaticKeyProvider
from ppml.tee.runtime import AttestedKeyProvider
from ppml.workspace import Workspace

PASSPHRASE = b"conformance passphrase"
NAME, OTHER = "sales", "pii"  # two keys every provider serves
MEASUREMENT = "c0" * 32


@dataclass
class Subject:
    """A provider under test and what the suite needs to know about it."""

    provider: DataKeyProvider
    known: list[DataKey]  # keys it can unwrap, under NAME and OTHER
    makes_keys: bool  # False: it holds only keys given to it, and refuses to make one
    refused_wrapping: type[PPMLError]  # what an altered or foreign wrapped key is refused with
    refusals: list[BaseException] = field(default_factory=list)  # what `refuse` saw raised

    def key(self, name: str = NAME) -> DataKey:
        return next(k for k in self.known if k.wrapped.key_name == name)

    def refuse(self, error: type[BaseException], call: Callable[[], object]) -> None:
        with pytest.raises(error) as info:
            call()
        self.refusals.append(info.value)


# -- the providers -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Workspace:
    root = tmp_path_factory.mktemp("conformance")
    ws = Workspace.create(root / "ws", PASSPHRASE, dev=True, kdf=KdfParams.for_testing())
    with ws.key_service() as keys:
        keys.create_key(NAME)
        keys.create_key(OTHER)
    (root / "passphrase").write_bytes(PASSPHRASE + b"\n")
    return ws


@pytest.fixture(scope="module")
def services(workspace: Workspace) -> Iterator[Services]:
    s = services_for(workspace)
    rule = {"tee": "sim", "measurement": MEASUREMENT, "debug_ok": False, "min_tcb": "UpToDate"}
    for name in (NAME, OTHER):
        s.broker.set_policy(name, [rule])
    yield s
    s.close()


def _known(provider: DataKeyProvider) -> list[DataKey]:
    return [provider.generate_data_key(NAME), provider.generate_data_key(OTHER)]


def _in_process(services: Services) -> httpx.MockTransport:
    """A synchronous transport to the services' HTTP app in this process (no sockets, no TLS)."""
    client = AsgiClient(create_app(services))

    def handle(request: httpx.Request) -> httpx.Response:
        headers = {
            k: v for k, v in request.headers.items() if k in ("authorization", "content-type")
        }
        reply = client.request(
            request.method, request.url.path, content=request.read(), headers=headers
        )
        return httpx.Response(reply.status_code, headers=reply.headers, content=reply.content)

    return httpx.MockTransport(handle)


@contextlib.contextmanager
def kms(workspace: Workspace, services: Services) -> Iterator[Subject]:
    with workspace.key_service() as keys:
        assert isinstance(keys, KeyService)
        yield Subject(keys, _known(keys), True, IntegrityError)


@contextlib.contextmanager
def opening_kms(workspace: Workspace, services: Services) -> Iterator[Subject]:
    with OpeningKeys(workspace.path, workspace.path.parent / "passphrase") as keys:
        yield Subject(keys, _known(keys), True, IntegrityError)


@contextlib.contextmanager
def attested(workspace: Workspace, services: Services) -> Iterator[Subject]:
    platform = SimPlatform(workspace.sim_platform_key())
    with AttestedKeyProvider(
        "https://kms.test",
        workspace.ca_cert.read_text(),
        evidence=lambda report_data: ("sim", platform.quote(MEASUREMENT, report_data)),
        transport=_in_process(services),
    ) as provider:
        # Keys of files the workspace wrote, and keys the workload made for itself.
        known = [services.keys.generate_data_key(NAME), provider.generate_data_key(OTHER)]
        yield Subject(provider, known, True, KeyAccessError)


@contextlib.contextmanager
def static_bundle(workspace: Workspace, services: Services) -> Iterator[Subject]:
    known = _known(MemoryKeyProvider(NAME, OTHER))
    provider = StaticKeyProvider({k.wrapped: k.plaintext for k in known})
    yield Subject(provider, known, False, KeyAccessError)


@contextlib.contextmanager
def spark_released(workspace: Workspace, services: Services) -> Iterator[Subject]:
    datasource = pytest.importorskip("ppml.engines.spark.datasource")
    origin = MemoryKeyProvider(NAME, OTHER)
    known = _known(origin)
    released = [datasource.ReleasedKey(k.wrapped, k.plaintext) for k in known]
    fresh = [origin.generate_data_key(NAME) for _ in range(2)]  # a write task's keys
    yield Subject(datasource.ReleasedKeys(released, fresh), known, True, KeyAccessError)


@contextlib.contextmanager
def memory(workspace: Workspace, services: Services) -> Iterator[Subject]:
    provider = MemoryKeyProvider(NAME, OTHER)
    yield Subject(provider, _known(provider), True, IntegrityError)


PROVIDERS = [kms, opening_kms, attested, static_bundle, spark_released, memory]


@pytest.fixture(params=PROVIDERS, ids=[p.__name__ for p in PROVIDERS])
def subject(
    request: pytest.FixtureRequest, workspace: Workspace, services: Services
) -> Iterator[Subject]:
    with request.param(workspace, services) as subject:
        yield subject


def _assert_no_key_material(subject: Subject) -> None:
    """Nothing the provider shows, and no refusal it raised, contains a key it holds."""
    shown = [repr(subject.provider), str(subject.provider)]
    shown += [repr(k) for k in subject.known] + [str(k) for k in subject.known]
    for refusal in subject.refusals:
        shown += [repr(refusal), str(refusal)]
        if isinstance(refusal, PPMLError):
            shown.append(refusal.diagnostics())
    for key in subject.known:
        secret = key.plaintext
        forms = [secret.hex(), secret.hex().upper(), base64.b64encode(secret).decode()]
        forms += [base64.urlsafe_b64encode(secret).decode().rstrip("="), repr(secret)[2:-1]]
        for text in shown:
            assert not any(form in text for form in forms), text


def _flipped(blob: bytes, index: int) -> bytes:
    changed = bytearray(blob)
    changed[index] ^= 0x01
    return bytes(changed)


# -- the promises --------------------------------------------------------------------------------


def test_is_a_data_key_provider(subject: Subject) -> None:
    assert isinstance(subject.provider, DataKeyProvider)


def test_known_keys_unwrap_to_their_plaintext(subject: Subject) -> None:
    for key in subject.known:
        assert subject.provider.unwrap(key.wrapped) == key.plaintext
        assert subject.provider.unwrap(key.wrapped) == key.plaintext  # and again, the same


def test_a_new_data_key_round_trips_or_is_refused_by_a_provider_that_makes_none(
    subject: Subject,
) -> None:
    provider = subject.provider
    if not subject.makes_keys:
        subject.refuse(KeyAccessError, lambda: provider.generate_data_key(NAME))
        return
    first, second = provider.generate_data_key(NAME), provider.generate_data_key(NAME)
    for key in (first, second):
        assert len(key.plaintext) == DATA_KEY_BYTES
        assert key.wrapped.key_name == NAME
        assert provider.unwrap(key.wrapped) == key.plaintext
    assert first.plaintext != second.plaintext
    assert first.wrapped != second.wrapped
    subject.known += [first, second]


def test_an_unknown_key_name_is_refused(subject: Subject) -> None:
    provider, blob = subject.provider, subject.key().wrapped.blob
    subject.refuse(KeyAccessError, lambda: provider.generate_data_key("no-such-key"))
    subject.refuse(KeyAccessError, lambda: provider.unwrap(WrappedKey("no-such-key", 1, blob)))


def test_an_unknown_key_version_is_refused(subject: Subject) -> None:
    wrapped = subject.key().wrapped
    unknown = WrappedKey(wrapped.key_name, wrapped.version + 41, wrapped.blob)
    subject.refuse(KeyAccessError, lambda: subject.provider.unwrap(unknown))


@pytest.mark.parametrize("where", ["nonce", "ciphertext", "tag"])
def test_an_altered_wrapped_key_is_refused(subject: Subject, where: str) -> None:
    wrapped = subject.key().wrapped
    index = {"nonce": 0, "ciphertext": 12 + DATA_KEY_BYTES // 2, "tag": -1}[where]
    altered = WrappedKey(wrapped.key_name, wrapped.version, _flipped(wrapped.blob, index))
    subject.refuse(subject.refused_wrapping, lambda: subject.provider.unwrap(altered))


def test_a_wrapped_key_relabelled_to_another_key_is_refused(subject: Subject) -> None:
    wrapped = subject.key(NAME).wrapped
    relabelled = WrappedKey(OTHER, subject.key(OTHER).wrapped.version, wrapped.blob)
    subject.refuse(subject.refused_wrapping, lambda: subject.provider.unwrap(relabelled))


def test_a_wrapped_key_of_another_kms_is_refused(subject: Subject) -> None:
    version = subject.key(NAME).wrapped.version
    stranger = MemoryKeyProvider(NAME)  # another KMS with a key of the same name
    while len(stranger.keks[NAME]) < version:
        stranger.rotate(NAME)
    foreign = stranger.generate_data_key(NAME).wrapped
    assert foreign.version == version
    subject.refuse(subject.refused_wrapping, lambda: subject.provider.unwrap(foreign))


def test_a_refusal_leaves_the_provider_working(subject: Subject) -> None:
    key = subject.key()
    altered = WrappedKey(key.wrapped.key_name, key.wrapped.version, _flipped(key.wrapped.blob, -1))
    subject.refuse(subject.refused_wrapping, lambda: subject.provider.unwrap(altered))
    subject.refuse(
        KeyAccessError, lambda: subject.provider.unwrap(WrappedKey("no-such-key", 1, b"x" * 60))
    )
    assert subject.provider.unwrap(key.wrapped) == key.plaintext


def test_no_key_material_in_its_repr_or_its_refusals(subject: Subject) -> None:
    provider, wrapped = subject.provider, subject.key().wrapped
    if subject.makes_keys:
        subject.known.append(provider.generate_data_key(NAME))
    for refused in (
        WrappedKey(wrapped.key_name, wrapped.version, _flipped(wrapped.blob, 0)),
        WrappedKey(OTHER, subject.key(OTHER).wrapped.version, wrapped.blob),
        WrappedKey(wrapped.key_name, wrapped.version + 41, wrapped.blob),
        WrappedKey("no-such-key", 1, wrapped.blob),
    ):
        subject.refuse(PPMLError, functools.partial(provider.unwrap, refused))
    _assert_no_key_material(subject)
