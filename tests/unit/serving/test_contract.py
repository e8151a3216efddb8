"""What the deployment's processes agree on: shapes, the --model-info JSON, the key bundle, the
ready pipe, the recorded state, and the front end's /queue."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest
from tests.support import MemoryKeyProvider
from tests.support.asgi import AsgiClient
from tests.unit.serving.frontend_fakes import MODELS, FakeQueue, as_client

from ppml.crypto.envelope import WrappedKey
from ppml.errors import ConfigurationError, KeyAccessError, UsageError
from ppml.server.serving_frontend import create_app
from ppml.serving.contract import (
    READY_FD_ENV,
    READY_LINE,
    ModelInfo,
    format_shape,
    key_bundle,
    parse_shape,
    read_key_bundle,
    signal_ready,
)
from ppml.serving.deploy.state import DeploymentState, ProcessEntry, read_state


@pytest.mark.parametrize(
    ("text", "shape"),
    [("3,224,224", (3, 224, 224)), ("3,*,?", (3, None, None)), ("-1, 4", (None, 4)), ("-", ())],
)
def test_one_shape_grammar(text: str, shape: tuple[int | None, ...]) -> None:
    assert parse_shape(text) == shape
    assert parse_shape(format_shape(shape)) == shape
    assert parse_shape([3, "*", None]) == (3, None, None)
    with pytest.raises(UsageError, match="comma-separated"):
        parse_shape("3,x")


def test_model_info_travels_as_one_json() -> None:
    info = ModelInfo("count", (2, None), "int8", ("n", "m"))
    assert ModelInfo.from_json(info.to_json()) == info
    assert info.to_json() == ModelInfo.from_json(info.to_json()).to_json()  # canonical
    for bad in ("", "[]", '{"name": "m"}', '{"name": "m", "input_shape": [3], "extra": 1}'):
        with pytest.raises(UsageError):
            ModelInfo.from_json(bad)


def test_key_bundle_round_trip() -> None:
    wrapped = WrappedKey.from_text(_wrapped_text())
    provider = read_key_bundle(io.BytesIO(key_bundle({wrapped: b"k" * 32})))
    assert provider.unwrap(wrapped) == b"k" * 32
    with pytest.raises(KeyAccessError):
        provider.generate_data_key("any")
    with pytest.raises(ConfigurationError):
        read_key_bundle(io.BytesIO(b"not json"))


def _wrapped_text() -> str:
    return MemoryKeyProvider("models").generate_data_key("models").wrapped.to_text()


def test_signal_ready_writes_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    read, write = os.pipe()
    monkeypatch.setenv(READY_FD_ENV, str(write))
    signal_ready()
    assert os.read(read, 64) == READY_LINE
    assert os.read(read, 64) == b""  # the child closed its end
    os.close(read)
    monkeypatch.delenv(READY_FD_ENV)
    signal_ready()  # no pipe: nothing to do


def test_state_round_trip(tmp_path: Path) -> None:
    state = DeploymentState(
        deployment="default",
        url="https://127.0.0.1:1",
        port=1,
        tee=None,
        model="/m.ppml",
        model_info=MODELS["double"].to_dict(),
        ca="/ca.pem",
        status="ready",
        started_at="2026-01-01T00:00:00Z",
        up_pid=1,
        redis=ProcessEntry(pid=2, identity="2:1", log="/r.log", port=3),
        frontend=ProcessEntry(pid=4, identity="4:1", log="/f.log"),
        workers=[ProcessEntry(pid=5, identity=None, log="/w.log")],
    )
    state.save(tmp_path)
    assert read_state(tmp_path) == state
    assert (tmp_path / "deployment.json").stat().st_mode & 0o777 == 0o600
    assert state.to_dict()["redis"] == {"pid": 2, "identity": "2:1", "port": 3, "log": "/r.log"}
    assert state.workers[0].shown() == {"pid": 5, "log": "/w.log", "alive": False}
    (tmp_path / "deployment.json").write_text('{"workers": 1}')
    with pytest.raises(ConfigurationError, match="damaged"):
        read_state(tmp_path)
    assert read_state(tmp_path / "none") is None


def test_queue_depth_route() -> None:
    queue = FakeQueue()
    client = AsgiClient(create_app(queue, authenticate=as_client, models=MODELS))
    assert client.get("/queue").json() == {"depth": 0}
    queue.fail = ConnectionError
    assert client.get("/queue").status_code == 503
