"""`InputQueue` / `OutputQueue` against the front end served by uvicorn over HTTPS on a loopback
port, with a workspace's certificates (server, and clients' by mutual TLS); the queue behind it
is the in-memory fake."""

from __future__ import annotations

import ssl
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from tests.unit.serving.frontend_fakes import (
    MODELS,
    FakeClock,
    FakeQueue,
    FakeWorker,
    JumpingWaiter,
)

from ppml.crypto.passphrase import KdfParams
from ppml.errors import ConfigurationError, PPMLError, UsageError
from ppml.server.embedded import tls_files_for
from ppml.server.serving_frontend import FrontendSettings, RateLimit, create_app
from ppml.server.tls import serving
from ppml.serving import InputQueue, OutputQueue
from ppml.serving.client import (
    InvalidInput,
    NotAuthenticated,
    PredictionFailed,
    PredictionTimeout,
    RateLimited,
    ServingError,
    UnknownRequest,
)
from ppml.serving.queue import DuplicateRequest, QueueFull
from ppml.workspace import Workspace


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Workspace:
    return Workspace.create(
        tmp_path_factory.mktemp("serving") / "ws",
        b"serving tests passphrase",
        dev=True,
        kdf=KdfParams.for_testing(),
    )


@pytest.fixture(scope="module")
def other_workspace(tmp_path_factory: pytest.TempPathFactory) -> Workspace:
    """Another workspace: another CA."""
    return Workspace.create(
        tmp_path_factory.mktemp("other") / "ws",
        b"serving tests passphrase",
        dev=True,
        kdf=KdfParams.for_testing(),
    )


def own_cert(ws: Workspace) -> tuple[Path, Path, str]:
    return (ws.client_cert, ws.client_key, ws.tls_key_password())


def issued(ws: Workspace, name: str, directory: Path) -> tuple[Path, Path]:
    """A serving client's certificate, as `ppml serving client issue NAME` writes it."""
    import datetime as dt

    from cryptography.hazmat.primitives import serialization

    from ppml.workspace import pki

    now = dt.datetime.now(dt.UTC)
    cert = pki.issue_serving_client(ws.certificate_authority(), name, now, dt.timedelta(days=1))
    cert_file, key_file = directory / f"{name}.pem", directory / f"{name}-key.pem"
    cert_file.write_bytes(cert.cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(pki.private_key_pem(cert.key))
    return cert_file, key_file


class Server:
    def __init__(self, url: str, queue: FakeQueue, clock: FakeClock, ws: Workspace) -> None:
        self.url = url
        self.queue = queue
        self.clock = clock
        self.ca = ws.ca_cert
        self.cert = own_cert(ws)

    def inputs(self, **kwargs: Any) -> InputQueue:
        kwargs.setdefault("ca", self.ca)
        if not isinstance(kwargs["ca"], ssl.SSLContext):
            kwargs.setdefault("cert", self.cert)
        return InputQueue(self.url, **kwargs)

    def outputs(self, **kwargs: Any) -> OutputQueue:
        kwargs.setdefault("ca", self.ca)
        if not isinstance(kwargs["ca"], ssl.SSLContext):
            kwargs.setdefault("cert", self.cert)
        return OutputQueue(self.url, **kwargs)


@contextmanager
def running(ws: Workspace, *, waiter: bool = False, **settings: Any) -> Iterator[Server]:
    queue = FakeQueue()
    clock = FakeClock()
    app = create_app(
        queue,
        models={"double": MODELS["double"]},
        settings=FrontendSettings(**settings),
        waiter=JumpingWaiter(clock) if waiter else None,
        clock=clock,
    )
    tls = tls_files_for(ws)
    with serving(app, tls) as handle:
        yield Server(handle.url, queue, clock, ws)


@pytest.fixture
def server(workspace: Workspace) -> Iterator[Server]:
    with running(workspace) as s:
        yield s


def test_predict_over_https(server: Server) -> None:
    with FakeWorker(server.queue), server.inputs() as q:
        y = q.predict(x=np.array([1.0, 2.0, 3.5]), timeout=5)
        assert isinstance(y, np.ndarray)
        np.testing.assert_array_equal(y, [2.0, 4.0, 7.0])
        ys = q.predict_batch([[1, 1, 1], [2, 2, 2], [3, 3, 3]])
        assert [y.tolist() for y in ys] == [[2, 2, 2], [4, 4, 4], [6, 6, 6]]
        np.testing.assert_array_equal(q.predict(np.zeros(3)), np.zeros(3))


def test_enqueue_query_dequeue(server: Server) -> None:
    with server.inputs(model="double") as q, server.outputs() as out:
        assert q.enqueue("req-1", x=np.array([1, 2, 3])) == "req-1"
        generated = q.enqueue(None, np.array([0, 0, 1]))
        q.enqueue("req-bad", x=[-5, 0, 0])
        assert out.query("req-1") is None  # pending
        server.queue.process()
        np.testing.assert_array_equal(out.query("req-1"), [2, 4, 6])
        with pytest.raises(PredictionFailed, match="negative input") as failed:
            out.query("req-bad")
        assert isinstance(failed.value, UsageError)
        results = out.dequeue()
        assert set(results) == {"req-1", generated, "req-bad"}
        np.testing.assert_array_equal(results[generated], [0, 0, 2])
        assert isinstance(results["req-bad"], PredictionFailed)
        assert out.dequeue() == {}
        with pytest.raises(UnknownRequest):
            out.query("req-1")  # taken
        with pytest.raises(UnknownRequest):
            out.query("../../models")  # quoted into one path segment, refused by the server


def test_refusals_become_exceptions(workspace: Workspace) -> None:
    with running(workspace, retry_after_s=3) as server, server.inputs() as q:
        with pytest.raises(InvalidInput, match="expected shape") as bad:
            q.enqueue("r1", x=np.zeros((2, 2)))
        assert bad.value.status == 400 and isinstance(bad.value, UsageError)
        q.enqueue("r1", x=np.zeros(3))
        with pytest.raises(DuplicateRequest) as dup:
            q.enqueue("r1", x=np.zeros(3))
        assert isinstance(dup.value, ServingError) and dup.value.status == 409
        server.queue.max_length = 1
        with pytest.raises(QueueFull) as full:
            q.enqueue("r2", x=np.zeros(3))
        assert isinstance(full.value, ServingError) and full.value.retry_after == 3
        with pytest.raises(UsageError):
            q.enqueue("r3", x=np.zeros(3), y=np.zeros(3))  # one input only
        with pytest.raises(UsageError):
            q.enqueue("r3", x=np.array(["a", "b", "c"]))


def test_timeout_gives_the_ids_to_fetch_later(workspace: Workspace) -> None:
    with running(workspace, waiter=True) as server, server.inputs() as q, server.outputs() as out:
        with pytest.raises(PredictionTimeout) as late:
            q.predict(x=np.ones(3), timeout=1)
        (request_id,) = late.value.request_ids
        assert late.value.status == 504
        assert out.query(request_id) is None
        server.queue.process()
        np.testing.assert_array_equal(out.query(request_id), [2, 2, 2])


def test_retries_honour_retry_after(workspace: Workspace) -> None:
    limit = RateLimit(rate=0.25, burst=1)
    with running(workspace, rate_limit=limit) as server:
        slept: list[float] = []

        def sleep(seconds: float) -> None:  # the server's clock moves instead of real time
            slept.append(seconds)
            server.clock.advance(seconds)

        with server.inputs() as q:
            q.enqueue("a", x=np.zeros(3))
            with pytest.raises(RateLimited) as limited:
                q.enqueue("b", x=np.zeros(3))
            assert limited.value.retry_after == 4 and limited.value.status == 429
        with server.inputs(retries=2, sleep=sleep) as q:
            assert q.enqueue("b", x=np.zeros(3)) == "b"
            assert slept == [4.0]
        with server.inputs(retries=1, sleep=sleep, max_retry_wait_s=1.0) as q:
            with pytest.raises(RateLimited):
                q.enqueue("c", x=np.zeros(3))
            assert slept[-1] == 1.0  # capped


def test_refuses_a_server_whose_certificate_is_from_another_ca(
    server: Server, other_workspace: Workspace
) -> None:
    with server.inputs(ca=other_workspace.ca_cert) as q:
        with pytest.raises(ServingError, match="did not verify") as refused:
            q.enqueue("r", x=np.zeros(3))
        assert isinstance(refused.value.__cause__, Exception)
    assert server.queue.submitted == []
    with pytest.raises(ServingError, match="did not verify"):
        server.outputs(ca=ssl.create_default_context()).query("r")  # the system CAs


def test_the_workspace_ca_is_the_default(
    server: Server, workspace: Workspace, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("PPML_HOME", str(workspace.path))
    monkeypatch.setenv("PPML_PASSPHRASE", "serving tests passphrase")
    with OutputQueue(server.url) as out:  # the workspace's CA and client certificate
        assert out.dequeue() == {}
    monkeypatch.delenv("PPML_PASSPHRASE")
    with pytest.raises(ConfigurationError, match="authenticates clients"):
        OutputQueue(server.url)
    monkeypatch.setenv("PPML_HOME", str(tmp_path / "none"))
    with pytest.raises(ConfigurationError, match="no workspace"):
        OutputQueue(server.url)


def test_verification_cannot_be_turned_off(server: Server, tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="https"):
        InputQueue(server.url.replace("https", "http"), ca=server.ca)
    with pytest.raises(UsageError, match="cannot be turned off"):
        InputQueue(server.url, ca=False)
    unverified = ssl.create_default_context()
    unverified.check_hostname = False
    unverified.verify_mode = ssl.CERT_NONE
    with pytest.raises(UsageError, match="must verify"):
        InputQueue(server.url, ca=unverified)
    with pytest.raises(ConfigurationError, match="missing"):
        InputQueue(server.url, ca=tmp_path / "nope.pem")
    (tmp_path / "junk.pem").write_text("not a certificate")
    with pytest.raises(ConfigurationError, match="cannot be read"):
        InputQueue(server.url, ca=tmp_path / "junk.pem")
    with pytest.raises(UsageError):
        InputQueue(server.url, ca=server.ca, retries=-1)


def test_unreachable_front_end(workspace: Workspace) -> None:
    with running(workspace) as server:
        url = server.url
    with InputQueue(url, ca=workspace.ca_cert, cert=own_cert(workspace), timeout=2) as q:
        with pytest.raises(ServingError, match="cannot reach") as down:
            q.enqueue("r", x=np.zeros(3))
        assert isinstance(down.value, PPMLError)


# -- client authentication and per-client requests ----------------------------------------------


def test_a_client_without_a_certificate_is_401(server: Server) -> None:
    """What an anonymous caller of the finding tried first: read every client's results."""
    import httpx

    context = ssl.create_default_context(cafile=str(server.ca))
    with httpx.Client(base_url=server.url, verify=context) as anonymous:
        for method, path in [
            ("GET", "/v1/results"),
            ("GET", "/v1/requests/req-1"),
            ("POST", "/v1/requests"),
            ("POST", "/predict"),
        ]:
            r = anonymous.request(method, path, content=b"{not json")
            assert r.status_code == 401, (method, path)
            assert r.json()["error"] == "unauthorized"
        assert anonymous.get("/healthz").status_code == 200
        assert anonymous.get("/models").status_code == 200
    assert server.queue.submitted == []
    with server.inputs(ca=context) as q, pytest.raises(NotAuthenticated):
        q.enqueue("r", x=np.zeros(3))


def test_a_certificate_that_is_not_for_client_authentication_is_refused(
    server: Server, workspace: Workspace
) -> None:
    """The workspace's server certificate (server authentication only) is no client's: the
    TLS layer refuses it."""
    cert = (workspace.server_cert, workspace.server_key, workspace.tls_key_password())
    with server.inputs(cert=cert) as q, pytest.raises(ServingError):
        q.enqueue("r", x=np.zeros(3))
    assert server.queue.submitted == []


def test_a_certificate_of_another_ca_is_refused(server: Server, other_workspace: Workspace) -> None:
    with server.inputs(cert=own_cert(other_workspace)) as q, pytest.raises(ServingError):
        q.enqueue("r", x=np.zeros(3))
    assert server.queue.submitted == []


def test_each_client_has_its_own_requests_and_results(
    server: Server, workspace: Workspace, tmp_path: Path
) -> None:
    alice, bob = issued(workspace, "alice", tmp_path), issued(workspace, "bob", tmp_path)
    with (
        server.inputs(cert=alice) as alice_in,
        server.outputs(cert=alice) as alice_out,
        server.inputs(cert=bob) as bob_in,
        server.outputs(cert=bob) as bob_out,
    ):
        # squatting: bob takes the id alice will use first; both are accepted, apart
        assert bob_in.enqueue("req-1", x=np.full(3, 10.0)) == "req-1"
        assert alice_in.enqueue("req-1", x=np.ones(3)) == "req-1"
        alice_in.enqueue("alice-only", x=np.ones(3))
        server.queue.process()
        # guessing another's id: unknown, not another's prediction
        with pytest.raises(UnknownRequest):
            bob_out.query("alice-only")
        np.testing.assert_array_equal(alice_out.query("req-1"), np.full(3, 2.0))
        np.testing.assert_array_equal(bob_out.query("req-1"), np.full(3, 20.0))
        # /v1/results: each client takes its own, and only its own
        assert set(bob_out.dequeue()) == {"req-1"}
        mine = alice_out.dequeue()
        assert set(mine) == {"req-1", "alice-only"}
        assert bob_out.dequeue() == {} and alice_out.dequeue() == {}
        # an id is a duplicate only for the client that used it
        with pytest.raises(DuplicateRequest):
            alice_in.enqueue("alice-only", x=np.ones(3))
        bob_in.enqueue("alice-only", x=np.ones(3))


def test_an_issued_key_with_a_password(
    server: Server, workspace: Workspace, tmp_path: Path
) -> None:
    import datetime as dt

    from cryptography.hazmat.primitives import serialization

    from ppml.workspace import pki

    now = dt.datetime.now(dt.UTC)
    cert = pki.issue_serving_client(workspace.certificate_authority(), "carol", now,
                                    dt.timedelta(days=1))  # fmt: skip
    (tmp_path / "c.pem").write_bytes(cert.cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "c-key.pem").write_bytes(pki.encrypted_key_pem(cert.key, "a long password"))
    with server.outputs(cert=(tmp_path / "c.pem", tmp_path / "c-key.pem", "a long password")) as q:
        assert q.dequeue() == {}
    with pytest.raises(ConfigurationError, match="wrong key password"):
        server.outputs(cert=(tmp_path / "c.pem", tmp_path / "c-key.pem", "wrong"))


def test_bad_client_certificates_are_refused_clearly(server: Server, tmp_path: Path) -> None:
    with pytest.raises(UsageError, match=r"\(CERT, KEY\)"):
        InputQueue(server.url, ca=server.ca, cert=(server.cert[0],))  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="client certificate file is missing"):
        InputQueue(server.url, ca=server.ca, cert=(tmp_path / "no.pem", tmp_path / "no-key.pem"))
    context = ssl.create_default_context(cafile=str(server.ca))
    with pytest.raises(UsageError, match="not both"):
        InputQueue(server.url, ca=context, cert=server.cert)
