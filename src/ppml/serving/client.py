"""Clients of the serving front end, in the spirit of BigDL Cluster Serving's Python API.

::

    from ppml.serving import InputQueue, OutputQueue

    q = InputQueue(url="https://127.0.0.1:10023")   # the workspace's CA and client certificate
    q.enqueue("req-1", x=np.array([...]))            # asynchronous: returns the request id
    y = q.predict(x=np.array([...]), timeout=5)      # synchronous: the prediction (np.ndarray)
    q.enqueue("img-1", image="cat.png")              # an image file (path or bytes), when the
    y = q.predict(image=png_bytes)                   # deployment takes images (--image-mode)
    q.enqueue("img-2", user_define_key={"path": "cat.png"})   # BigDL's form of image=PATH
    OutputQueue(url=...).query("req-1")              # the prediction, or None while pending
    OutputQueue(url=...).dequeue()                   # every finished result: {id: array}

HTTPS only, and the server's certificate is always verified: against the CA file given as
`ca=`, else the CA of the workspace (`$PPML_HOME`, else ``./.ppml``). There is no way to turn
verification off. The client authenticates with a certificate of the workspace CA (mutual
TLS): `cert=(CERT, KEY)` or `(CERT, KEY, PASSWORD)` as `ppml serving client issue NAME` wrote
them, else the workspace's own client certificate, whose key is opened with the workspace's
passphrase (`$PPML_PASSPHRASE`). A client sees only its own requests and results. The front
end's refusals become exceptions (all `PPMLError`)::

    PPMLError
    ├── UsageError
    │   ├── InvalidInput         400, 413  the input was refused; `reason` says why
    │   ├── PredictionFailed     400       the request was run and failed; `reason` says why
    │   ├── UnknownRequest       404       no such request id (never accepted, taken, expired,
    │   │                                  or another client's)
    │   └── DuplicateRequest     409       ServingDuplicate: the id was accepted already
    ├── QueueFull                503       ServingFull: the queue is full, retry later
    ├── RateLimited              429       too many requests: retry later
    ├── NotAuthenticated         401       no client certificate the front end accepts
    ├── PredictionTimeout        504       no answer in time; `request_ids` fetch them later
    └── ServingError                       anything else: another status, no connection, or a
                                           certificate that did not verify against the CA

(`DuplicateRequest` and `QueueFull` are the queue's own, so that code written against the
in-process queue catches the same failures.) Each of them also derives from `ServingError`,
which carries `status`, `reason` and `retry_after` (seconds, from the Retry-After header).
With ``retries=N`` a client waits Retry-After (at most `max_retry_wait_s`) and tries again,
up to N times, on 429 and 503.
"""

from __future__ import annotations

import base64
import math
import os
import ssl
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Self
from urllib.parse import quote

import httpx
import numpy as np

from ppml.errors import ConfigurationError, InputNotFound, PPMLError, UsageError
from ppml.serving.queue import DuplicateRequest, QueueFull

__all__ = [
    "InputQueue",
    "InvalidInput",
    "NotAuthenticated",
    "OutputQueue",
    "PredictionFailed",
    "PredictionTimeout",
    "RateLimited",
    "ServingDuplicate",
    "ServingError",
    "ServingFull",
    "UnknownRequest",
]

_RETRIED = frozenset({429, 503})


class ServingError(PPMLError):
    """The front end refused or failed a call: `status` (HTTP), `reason` (its text)."""

    def __init__(
        self, message: str, *, status: int = 0, reason: str = "", retry_after: float | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason
        self.retry_after = retry_after


class InvalidInput(ServingError, UsageError):
    """400 or 413: the front end refused the input."""


class PredictionFailed(ServingError, UsageError):
    """The request was accepted and run, and its result is an error."""


class UnknownRequest(ServingError, UsageError):
    """404: the front end knows no request of that id."""


class ServingDuplicate(ServingError, DuplicateRequest):
    """409: a request with this id was accepted already."""


class ServingFull(ServingError, QueueFull):
    """503: the queue is full (or the front end unavailable); `retry_after` says when."""


class RateLimited(ServingError):
    """429: the front end's rate limit; `retry_after` says when."""


class NotAuthenticated(ServingError):
    """401: the front end accepted no client certificate (none, or not of its workspace)."""


class PredictionTimeout(ServingError):
    """504: the results were not ready in time; `request_ids` can be fetched later."""

    def __init__(self, message: str, *, request_ids: list[str], **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.request_ids = request_ids


def _workspace_ca() -> Path:
    from ppml.workspace import Layout, WorkspaceConfig, default_workspace_dir

    root = default_workspace_dir()
    config_path = Layout(root).config
    if not config_path.is_file():
        raise ConfigurationError(
            "no workspace to take the CA from: pass ca=PATH or set PPML_HOME", path=root
        )
    return Layout(root, WorkspaceConfig.load(config_path).files).path("ca_cert")


ClientCert = tuple[str | Path, str | Path] | tuple[str | Path, str | Path, str]
"""A client certificate: (certificate file, key file) or (certificate, key, key password)."""


def _tls_context(
    ca: str | Path | ssl.SSLContext | None, cert: ClientCert | None = None
) -> ssl.SSLContext:
    """A verifying TLS context that presents the client certificate; refuses anything that
    would not verify the server. A given `ssl.SSLContext` is used as it is (it holds its own
    client certificate, if any)."""
    if isinstance(ca, bool):
        raise UsageError("certificate verification cannot be turned off: pass ca=PATH")
    if isinstance(ca, ssl.SSLContext):
        if ca.verify_mode != ssl.CERT_REQUIRED or not ca.check_hostname:
            raise UsageError("the TLS context must verify certificates and host names")
        if cert is not None:
            raise UsageError("give the client certificate in the SSLContext, or cert=, not both")
        return ca
    path = Path(ca) if ca is not None else _workspace_ca()
    if not path.is_file():
        raise ConfigurationError("the CA certificate file is missing", path=path)
    try:
        context = ssl.create_default_context(cafile=str(path))
    except ssl.SSLError:
        raise ConfigurationError("the CA certificate file cannot be read", path=path) from None
    if cert is None:
        cert = _workspace_client_cert()
    if not isinstance(cert, tuple) or len(cert) not in (2, 3):
        raise UsageError("cert= is (CERT, KEY) or (CERT, KEY, PASSWORD)")
    cert_file, key_file = Path(cert[0]), Path(cert[1])
    password = cert[2] if len(cert) == 3 else None
    for p in (cert_file, key_file):
        if not p.is_file():
            raise ConfigurationError("the client certificate file is missing", path=p)
    try:
        context.load_cert_chain(cert_file, key_file, password=password)
    except ssl.SSLError:
        raise ConfigurationError(
            "the client certificate or its key cannot be read (a wrong key password?)",
            path=key_file,
        ) from None
    return context


def _workspace_client_cert() -> ClientCert:
    """The workspace's own client certificate, its key opened with the workspace passphrase."""
    from ppml.workspace import Workspace, default_workspace_dir

    passphrase = os.environ.get("PPML_PASSPHRASE", "")
    if not passphrase:
        raise ConfigurationError(
            "the front end authenticates clients: pass cert=(CERT, KEY) (made by `ppml serving "
            "client issue NAME`), or set PPML_PASSPHRASE to use the workspace's client "
            "certificate"
        )
    ws = Workspace.open(default_workspace_dir(), passphrase.encode())
    return (ws.client_cert, ws.client_key, ws.tls_key_password())


_ONE_INPUT = (
    "give exactly one input: an array (positionally or as one keyword, x=...) or an image "
    "(image=PATH_OR_BYTES, or user_define_key={'path': PATH})"
)


def _one_input(data: Any, inputs: Mapping[str, Any]) -> np.ndarray | bytes:
    """The one input: an array, given positionally or by keyword (BigDL style, `x=...`), or an
    image file's bytes (`image=PATH_OR_BYTES`, or BigDL's `user_define_key={"path": PATH}`)."""
    inputs = dict(inputs)
    images = []
    if "image" in inputs:
        images.append(inputs.pop("image"))
    if "user_define_key" in inputs:
        key = inputs.pop("user_define_key")
        if not isinstance(key, Mapping) or set(key) != {"path"}:
            extra = sorted(map(str, set(key) - {"path"})) if isinstance(key, Mapping) else []
            raise UsageError(
                "user_define_key takes one key, 'path' (an image file to send)"
                + (f"; unknown keys: {extra}" if extra else "")
            )
        images.append(key["path"])
    given = ([data] if data is not None else []) + list(inputs.values())
    if len(given) + len(images) != 1:
        raise UsageError(_ONE_INPUT)
    if images:
        return _image_bytes(images[0])
    return _array(given[0])


def _array(value: Any) -> np.ndarray:
    if isinstance(value, bytes | bytearray | memoryview | str | os.PathLike):
        raise UsageError("an image is sent with image=PATH_OR_BYTES, not as an array")
    array = np.asarray(value)
    if array.dtype.kind not in "biuf":
        raise UsageError("the input must be an array of numbers")
    return array


def _image_bytes(value: Any) -> bytes:
    """An image file's bytes: given as bytes, or read from a path (str or os.PathLike)."""
    if isinstance(value, bytes | bytearray | memoryview):
        data = bytes(value)
    elif isinstance(value, str | os.PathLike):
        path = Path(value)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise InputNotFound("no such image file", path=path) from None
        except IsADirectoryError:
            raise UsageError("the image is a directory, not a file", path=path) from None
        except OSError as exc:
            raise UsageError(f"cannot read the image: {exc.strerror}", path=path) from None
    else:
        raise UsageError(f"an image is a file path or bytes, not {type(value).__name__}")
    if not data:
        raise UsageError("the image is empty")
    return data


def _instance(value: np.ndarray | bytes) -> Any:
    """One instance as the front end's JSON takes it."""
    if isinstance(value, bytes):
        return {"b64": base64.b64encode(value).decode("ascii")}
    return value.tolist()


class _Client:
    def __init__(
        self,
        url: str,
        *,
        ca: str | Path | ssl.SSLContext | None = None,
        cert: ClientCert | None = None,
        timeout: float = 30.0,
        retries: int = 0,
        max_retry_wait_s: float = 30.0,
        transport: httpx.BaseTransport | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if not url.startswith("https://"):
            raise UsageError("the serving front end is reached over https:// only")
        if retries < 0:
            raise UsageError("retries must be >= 0")
        # Built even when a transport is injected (tests), so a missing CA always fails.
        verify = _tls_context(ca, cert)
        self._http = httpx.Client(
            base_url=url.rstrip("/"), verify=verify, transport=transport, timeout=timeout
        )
        self._timeout = timeout
        self._retries = retries
        self._max_wait = max_retry_wait_s
        self._sleep = sleep

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        attempt = 0
        while True:
            try:
                response = self._http.request(method, path, **kwargs)
            except httpx.ConnectError as exc:
                if _certificate_failure(exc):
                    raise ServingError(
                        "TLS: the front end's certificate did not verify against the CA"
                    ) from exc
                raise ServingError(f"cannot reach the front end: {type(exc).__name__}") from exc
            except httpx.TransportError as exc:
                raise ServingError(f"cannot reach the front end: {type(exc).__name__}") from exc
            if response.status_code not in _RETRIED or attempt >= self._retries:
                return response
            wait = _retry_after(response)
            self._sleep(min(wait if wait is not None else 1.0, self._max_wait))
            attempt += 1


def _certificate_failure(exc: BaseException) -> bool:
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ssl.SSLCertVerificationError):
            return True
        seen = seen.__cause__ or seen.__context__
    return "CERTIFICATE_VERIFY_FAILED" in str(exc)


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after", "")
    try:
        seconds = float(value)
    except ValueError:
        return None
    return seconds if math.isfinite(seconds) and seconds >= 0 else None


def _body(response: httpx.Response) -> dict[str, Any]:
    try:
        body = response.json()
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


def _raise_for(response: httpx.Response, *, failed: bool = False) -> None:
    """The exception for a refusal (nothing for 2xx). `failed`: a 400 means a failed result."""
    status = response.status_code
    if status < 400:
        return
    body = _body(response)
    reason = str(body.get("reason") or body.get("error") or response.reason_phrase)
    kwargs: dict[str, Any] = {
        "status": status,
        "reason": reason,
        "retry_after": _retry_after(response),
    }
    message = f"serving front end: {status} {reason}"
    if status in (400, 413):
        failed = failed or body.get("status") == "failed"
        raise (PredictionFailed if failed else InvalidInput)(message, **kwargs)
    if status == 401:
        raise NotAuthenticated(message, **kwargs)
    if status == 404:
        raise UnknownRequest(message, **kwargs)
    if status == 409:
        raise ServingDuplicate(message, **kwargs)
    if status == 429:
        raise RateLimited(message, **kwargs)
    if status == 503:
        raise ServingFull(message, **kwargs)
    if status == 504:
        ids = body.get("ids")
        ids = [str(i) for i in ids] if isinstance(ids, list) else []
        raise PredictionTimeout(message, request_ids=ids, **kwargs)
    raise ServingError(message, **kwargs)


class InputQueue(_Client):
    """Sends inputs: `enqueue` (asynchronous, by id) and `predict` (synchronous)."""

    def __init__(self, url: str, *, model: str | None = None, **kwargs: Any) -> None:
        """`model`: which served model (None: the front end's only one). `ca`: the CA file (or
        a verifying `ssl.SSLContext`); `cert`: the client certificate, (CERT, KEY) or (CERT,
        KEY, PASSWORD) (default: the workspace's); `timeout` (s) per HTTP call; `retries` on
        429/503."""
        super().__init__(url, **kwargs)
        self._model = model

    def models(self) -> list[dict[str, Any]]:
        """The served models as the front end describes them (``GET /models``): name,
        input_shape, dtype, output_names and, for a deployment that takes images, its image
        settings (``ppml.serving.image.ImageSpec.from_dict`` reads them)."""
        response = self._call("GET", "/models")
        _raise_for(response)
        models = _body(response).get("models", [])
        return [m for m in models if isinstance(m, dict)]

    def _with_model(self, body: dict[str, Any]) -> dict[str, Any]:
        return body if self._model is None else {**body, "model": self._model}

    def enqueue(self, request_id: str | None = None, data: Any = None, **inputs: Any) -> str:
        """Submit one instance under `request_id` (None: the server picks one); returns the id.
        The instance is an array (positionally or `x=...`) or an image file (`image=PATH` or
        bytes; `user_define_key={"path": PATH}` as BigDL wrote it). Fetch the answer with
        `OutputQueue.query(id)` or `OutputQueue.dequeue()`."""
        value = _one_input(data, inputs)
        body = self._with_model({"inputs": _instance(value)})
        if request_id is not None:
            body["id"] = request_id
        response = self._call("POST", "/v1/requests", json=body)
        _raise_for(response)
        return str(_body(response)["id"])

    def predict(self, data: Any = None, *, timeout: float | None = None, **inputs: Any) -> Any:
        """The prediction for one instance (an array, or `image=PATH_OR_BYTES`; as `enqueue`),
        waiting up to `timeout` seconds (the server's limit when None). `PredictionTimeout`
        carries the request id to fetch it later; an image the workers cannot decode is an
        `InvalidInput` (400) saying why, as any instance the model refuses."""
        return self._predict_values([_one_input(data, inputs)], timeout)[0]

    def predict_batch(self, instances: Any, *, timeout: float | None = None) -> list[np.ndarray]:
        """Predictions for several instances, in their order: arrays, or image files given as
        bytes or `pathlib.Path`."""
        return self._predict_values(
            [
                _image_bytes(x) if isinstance(x, bytes | bytearray | os.PathLike) else _array(x)
                for x in instances
            ],
            timeout,
        )

    def _predict_values(
        self, arrays: list[np.ndarray | bytes], timeout: float | None
    ) -> list[np.ndarray]:
        if not arrays:
            return []
        params = {"timeout": timeout} if timeout is not None else None
        http_timeout = max(self._timeout, (timeout or 0.0) + 10.0)
        response = self._call(
            "POST",
            "/predict",
            json=self._with_model({"instances": [_instance(a) for a in arrays]}),
            params=params,
            timeout=http_timeout,
        )
        _raise_for(response)
        return [np.asarray(p) for p in _body(response)["predictions"]]


class OutputQueue(_Client):
    """Fetches results: one by id (`query`) or every finished one (`dequeue`)."""

    def query(self, request_id: str) -> np.ndarray | None:
        """The prediction of `request_id`, or None while it is pending. `PredictionFailed` if it
        failed, `UnknownRequest` if the front end does not know it."""
        response = self._call("GET", f"/v1/requests/{quote(request_id, safe='')}")
        if response.status_code == 202:
            return None
        _raise_for(response, failed=True)
        return np.asarray(_body(response)["prediction"])

    def dequeue(self) -> dict[str, np.ndarray | PredictionFailed]:
        """Every finished result of the requests accepted for later fetching, removed from the
        queue: id -> prediction (a failed request maps to its `PredictionFailed`)."""
        response = self._call("GET", "/v1/results")
        _raise_for(response)
        out: dict[str, np.ndarray | PredictionFailed] = {}
        for item in _body(response).get("results", []):
            request_id = str(item["id"])
            if item.get("status") == "failed":
                reason = str(item.get("reason", ""))
                out[request_id] = PredictionFailed(
                    f"request {request_id}: {reason}", status=400, reason=reason
                )
            else:
                out[request_id] = np.asarray(item["prediction"])
        return out
