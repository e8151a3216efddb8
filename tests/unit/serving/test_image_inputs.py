"""Image inputs through the front end ({"b64": ...}: checked, never decoded, queued as the file's
bytes) and the Python client (image=, user_define_key={"path": ...})."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image
from tests.support.asgi import AsgiClient
from tests.unit.serving.frontend_fakes import FakeClock, FakeQueue, JumpingWaiter, as_client
from tests.unit.serving.test_client import own_cert

from ppml.crypto.passphrase import KdfParams
from ppml.data.payload import EncodedImage
from ppml.errors import InputNotFound, UsageError
from ppml.server.embedded import tls_files_for
from ppml.server.serving_frontend import FrontendSettings, create_app
from ppml.server.tls import serving
from ppml.serving import InputQueue, OutputQueue
from ppml.serving.client import InvalidInput, PredictionFailed
from ppml.serving.contract import ModelInfo
from ppml.serving.image import ImageSpec
from ppml.serving.queue import Result
from ppml.workspace import Workspace

SPEC = ImageSpec("L", resize=(4, 4), max_bytes=2048)
DIGITS = ModelInfo("digits", (1, 4, 4), "float32", ("logits",), image=SPEC)
NUMBERS = ModelInfo("numbers", (3,), "float32", ("y",))


def png(side: int = 6) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.arange(side * side, dtype=np.uint8).reshape(side, side)).save(buf, "PNG")
    return buf.getvalue()


def b64(data: bytes) -> dict[str, str]:
    return {"b64": base64.b64encode(data).decode()}


def client(queue: FakeQueue, *models: ModelInfo) -> AsgiClient:
    clock = FakeClock()
    app = create_app(
        queue,
        authenticate=as_client,
        models={m.name: m for m in models or (DIGITS,)},
        settings=FrontendSettings(),
        waiter=JumpingWaiter(clock),
        clock=clock,
    )
    return AsgiClient(app)


def refused(response: httpx.Response, status: int, part: str) -> None:
    assert response.status_code == status, response.text
    assert part in response.json()["reason"]


def test_an_image_instance_is_queued_as_its_file_bytes() -> None:
    queue = FakeQueue()
    c = client(queue)
    r = c.post("/v1/requests", json={"id": "img-1", "inputs": b64(png())})
    assert r.status_code == 202, r.text
    ((_id, model, value),) = queue.submitted
    assert model == "digits" and value == EncodedImage(png())
    r = c.post("/v1/requests", json={"id": "img-2", "instances": [b64(png())]})
    assert r.status_code == 202


def test_predict_takes_images_and_numbers_together() -> None:
    queue = FakeQueue()
    c = client(queue)
    body = {"instances": [b64(png()), np.zeros((1, 4, 4)).tolist()]}
    r = c.post("/predict", json=body, params={"timeout": 1})
    assert r.status_code == 504  # nobody answers here; what counts is what was queued
    kinds = [type(v).__name__ for _i, _m, v in queue.submitted]
    assert kinds == ["EncodedImage", "ndarray"]


@pytest.mark.parametrize(
    ("instance", "status", "part"),
    [
        (b64(b"hello, not an image"), 400, "instance 0: not an image file of a supported format"),
        ({"b64": "@@@not base64"}, 400, "instance 0: 'b64' is not valid base64"),
        (b64(b"\x89PNG\r\n\x1a\n" + bytes(2048)), 413, "the image is over 2048 bytes"),
        ({"b64": "A" * 4000}, 413, "the image is over 2048 bytes"),
        ({"b64": "aGk=", "x": 1}, 400, 'an object instance is {"b64"'),
        ({"b64": 7}, 400, 'an object instance is {"b64"'),
    ],
)
def test_bad_images_are_refused_before_anything_is_queued(
    instance: Any, status: int, part: str
) -> None:
    queue = FakeQueue()
    c = client(queue)
    refused(c.post("/predict", json={"instances": [instance]}), status, part)
    assert queue.submitted == []


def test_a_model_without_image_settings_refuses_images() -> None:
    queue = FakeQueue()
    c = client(queue, NUMBERS)
    refused(c.post("/predict", json={"instances": [b64(png())]}), 400, "takes no images")
    models = c.get("/models").json()["models"]
    assert "image" not in models[0]
    images = client(queue, DIGITS).get("/models").json()["models"][0]
    assert ImageSpec.from_dict(images["image"]) == SPEC


# -- the client -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Workspace:
    return Workspace.create(
        tmp_path_factory.mktemp("images") / "ws",
        b"image tests passphrase",
        dev=True,
        kdf=KdfParams.for_testing(),
    )


Served = tuple[InputQueue, FakeQueue, OutputQueue]


@pytest.fixture
def served(workspace: Workspace) -> Iterator[Served]:
    queue = FakeQueue()
    app = create_app(queue, models={"digits": DIGITS})
    options: dict[str, Any] = {"ca": workspace.ca_cert, "cert": own_cert(workspace)}
    with (
        serving(app, tls_files_for(workspace)) as handle,
        InputQueue(handle.url, **options) as q,
        OutputQueue(handle.url, **options) as out,
    ):
        yield q, queue, out


def test_client_sends_images_by_path_bytes_and_user_define_key(
    served: Served, tmp_path: Path
) -> None:
    q, queue, _out = served
    path = tmp_path / "digit.png"
    path.write_bytes(png())
    assert q.enqueue("a", image=path) == "a"
    assert q.enqueue("b", image=str(path)) == "b"
    assert q.enqueue("c", image=png()) == "c"
    assert q.enqueue("d", user_define_key={"path": str(path)}) == "d"
    assert [v for _i, _m, v in queue.submitted] == [EncodedImage(png())] * 4
    assert q.models()[0]["image"] == SPEC.to_dict()


def test_client_refuses_ambiguous_or_unknown_inputs(served: Served, tmp_path: Path) -> None:
    q, queue, _out = served
    with pytest.raises(UsageError, match=r"unknown keys: \['file'\]"):
        q.enqueue("a", user_define_key={"path": "x.png", "file": "y"})
    with pytest.raises(UsageError, match="user_define_key takes one key, 'path'"):
        q.enqueue("a", user_define_key="x.png")
    with pytest.raises(UsageError, match="exactly one input"):
        q.enqueue("a", x=np.zeros((1, 4, 4)), image=png())
    with pytest.raises(UsageError, match="exactly one input"):
        q.predict(np.zeros((1, 4, 4)), user_define_key={"path": "x.png"})
    with pytest.raises(UsageError, match="exactly one input"):
        q.enqueue("a")
    with pytest.raises(InputNotFound, match="no such image file"):
        q.enqueue("a", image=tmp_path / "missing.png")
    with pytest.raises(UsageError, match="the image is empty"):
        q.enqueue("a", image=b"")
    with pytest.raises(UsageError, match="a file path or bytes"):
        q.enqueue("a", image=123)
    with pytest.raises(InvalidInput, match="not an image file") as bad:
        q.enqueue("a", image=b"plain text")
    assert bad.value.status == 400
    with pytest.raises(InvalidInput, match="over 2048 bytes") as big:
        q.predict(image=b"\x89PNG\r\n\x1a\n" + bytes(4096))
    assert big.value.status == 413
    assert queue.submitted == []


def test_a_worker_refusal_of_an_image_reaches_the_client(served: Served) -> None:
    q, queue, out = served
    q.enqueue("t", image=png()[:30])
    (queued_id, _m, _v) = queue.submitted[0]
    queue.results[queued_id] = Result(queued_id, None, "the image could not be decoded as PNG")
    with pytest.raises(PredictionFailed, match="could not be decoded as PNG"):
        out.query("t")
