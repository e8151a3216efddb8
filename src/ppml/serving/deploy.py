"""`ppml serving up|status|down`: one serving deployment of a workspace, as processes.

A deployment is redis-server (`start_redis`: TLS only, password, AOF), one HTTPS front end
(``python -m ppml.serving.frontend_main``) and N workers (``python -m ppml.serving.worker``), all
on this machine, each in its own session, logging to ``<workspace>/serving/logs/`` (0600). The
state (pids with their start times, ports, paths; nothing secret) is
``<workspace>/serving/deployment.json`` (0600, in a 0700 directory). One deployment per
workspace: `up` refuses while a recorded process still runs.

Keys
----
- **Payload key.** Queue payloads are sealed with a per-deployment 32-byte AES key
  (`PayloadCodec`). It lives in ``<workspace>/serving/<deployment>/payload.key.ppml``: a
  ppml-encrypted file under the KMS named key ``serving-<deployment>`` (created when missing),
  made once and kept across `down`/`up` so that requests kept in Redis's AOF stay readable.
  The file's header holds the wrapped data key; a process gets the payload key by unwrapping it
  through its key provider (`read_secret_file`).
- **Redis password.** The workspace secret ``redis-password`` (`redis_password`), copied into
  ``<workspace>/serving/<deployment>/redis-password.ppml``, encrypted under the same key.
- **Model key.** The model file is ppml-encrypted under whatever key its owner chose
  (``models`` typically); workers decrypt it in memory.

With ``--tee sim`` every front end and worker is an attested child exactly as under `ppml run
--tee sim`: the `up` process serves the attestation service and the KMS on loopback TLS and an
evidence channel per child; keys are released by the keys' policies only, so
``serving-<deployment>`` must allow the worker's and the front end's measurements and the model's
key the worker's. `ppml serving up --measure` prints both and the `ppml policy allow` lines. The
measured argv holds only what is stable for a deployment (model path, deployment name, the
secret files' paths, batch and front-end settings); what changes per start (the Redis port, the
listening socket the front end inherits) comes in environment variables whose *names* are
measured (``PPML_SERVING_REDIS_PORT``, ``PPML_SERVING_LISTEN_FD``). A detached deployment keeps
its keys in its processes' memory; the loopback KMS stops when `up` returns (a restarted worker
needs a new `up`).

Without ``--tee`` (development) no child gets the passphrase or the workspace: the `up` process
unwraps exactly the data keys each child needs (the model's, the payload key file's, the
password file's) and writes them to the child's stdin (a pipe, closed at once;
``--keys-from-stdin``). Nothing secret is ever on a command line, in an environment or a log.

The front end needs the model's signature (`ModelInfo`) without the model: the `up` process,
which holds the workspace (it is the KMS of the deployment), loads the model once in memory,
which also refuses a missing, plaintext or invalid model before anything starts, and passes the
signature on the front end's command line (so it is measured too).
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import secrets
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Final

from ppml._internal.fs import ensure_private_dir, write_private
from ppml._internal.procs import process_identity
from ppml.crypto.envelope import DataKey, WrappedKey
from ppml.errors import (
    ConfigurationError,
    InputNotFound,
    KeyAccessError,
    KeyNotFound,
    NotEncrypted,
    UsageError,
)
from ppml.serving.frontend_main import LISTEN_FD_ENV
from ppml.serving.worker import REDIS_PORT_ENV
from ppml.tee.command import DEFAULT_ENV
from ppml.tee.sandbox import BOOT_DIR

if TYPE_CHECKING:
    from ppml.kms import KeyService
    from ppml.serving.frontend import ModelInfo
    from ppml.serving.redis_server import RedisServer
    from ppml.tee.channel import EvidenceChannelServer
    from ppml.tee.launcher import LaunchedWorkload
    from ppml.tee.manifest import WorkloadManifest
    from ppml.workspace import Workspace

__all__ = [
    "CONFIG_KEYS",
    "LISTEN_FD_ENV",
    "DeploySettings",
    "Deployment",
    "Plan",
    "StaticKeyProvider",
    "deployment_status",
    "load_settings",
    "plan_deployment",
    "read_key_bundle",
    "read_state",
    "start_deployment",
    "stop_deployment",
]

STATE_FILE: Final = "deployment.json"
_BOOT_SUBDIR: Final = "serving"
_READY_NEEDLE: Final = "serving model"
_MAX_BUNDLE: Final = 64 * 1024


# -- settings ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DeploySettings:
    """What `ppml serving up` starts (flags, else the TOML file, else these defaults)."""

    model: Path
    deployment: str = "default"
    workers: int = 1
    tee: str | None = None
    host: str = "127.0.0.1"
    port: int = 8500
    runtime: str = "onnx"
    model_name: str | None = None
    input_shape: tuple[int | None, ...] | None = None
    input_dtype: str = "float32"
    max_batch_size: int = 16
    max_wait_ms: int = 5
    intra_op_threads: int = 1
    sync_timeout_s: float = 10.0
    max_body_bytes: int = 1024 * 1024
    max_instances: int = 256
    redis_maxmemory: str | None = None
    start_timeout_s: float = 60.0

    def __post_init__(self) -> None:
        from ppml.serving.codec import validate_deployment

        validate_deployment(self.deployment)
        if not 1 <= self.workers <= 64:
            raise UsageError("--workers must be between 1 and 64")
        if self.tee not in (None, "sim"):
            raise UsageError(f"unknown or unsupported TEE backend {self.tee!r} (available: sim)")
        if not 0 <= self.port < 65536:
            raise UsageError(f"invalid port {self.port}")
        if self.runtime not in ("onnx", "torchscript"):
            raise UsageError("runtime is onnx or torchscript")
        if self.max_batch_size < 1 or self.max_wait_ms < 0 or self.intra_op_threads < 1:
            raise UsageError("max_batch_size and intra_op_threads >= 1, max_wait_ms >= 0")
        if not self.start_timeout_s > 0:
            raise UsageError("start_timeout_s must be positive")
        object.__setattr__(self, "model", Path(self.model).absolute())


CONFIG_KEYS: Final = tuple(f.name for f in fields(DeploySettings))


def _shape_text(shape: Sequence[int | None]) -> str:
    return ",".join("*" if d is None else str(d) for d in shape)


def _parse_shape(value: Any) -> tuple[int | None, ...]:
    items = value.split(",") if isinstance(value, str) else value
    try:
        return tuple(None if str(d).strip() in ("*", "?", "-1", "None") else int(d) for d in items)
    except (TypeError, ValueError):
        raise UsageError("input_shape is sizes, '*' for a dynamic one: [3, 224, 224]") from None


def load_settings(config_file: Path | None, overrides: Mapping[str, Any]) -> DeploySettings:
    """Settings from `config_file` (TOML: keys at the top level or under ``[serving]``; a
    relative ``model`` is relative to the file), overridden by the non-None `overrides`."""
    values: dict[str, Any] = {}
    if config_file is not None:
        try:
            raw = tomllib.loads(Path(config_file).read_text())
        except FileNotFoundError:
            raise InputNotFound("no such configuration file", path=config_file) from None
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise UsageError(f"not a valid TOML file: {exc}", path=config_file) from None
        section = raw.get("serving", raw)
        if not isinstance(section, dict):
            raise UsageError("[serving] must be a table", path=config_file)
        unknown = set(section) - set(CONFIG_KEYS) - {"serving"}
        if unknown:
            raise UsageError(
                f"unknown settings {sorted(unknown)}; known: {', '.join(CONFIG_KEYS)}",
                path=config_file,
            )
        values.update({k: v for k, v in section.items() if k != "serving"})
        if "model" in values:
            model = Path(str(values["model"])).expanduser()
            values["model"] = model if model.is_absolute() else Path(config_file).parent / model
    values.update({k: v for k, v in overrides.items() if v is not None})
    if values.get("model") is None:
        raise UsageError("no model: pass --model PATH (or `model` in the --config file)")
    if values.get("input_shape") is not None:
        values["input_shape"] = _parse_shape(values["input_shape"])
    try:
        return DeploySettings(**values)
    except TypeError as exc:
        raise UsageError(f"invalid settings: {exc}") from None


# -- the key bundle for children without a TEE ----------------------------------------------------


class StaticKeyProvider:
    """A `DataKeyProvider` that knows a fixed set of unwrapped data keys (and makes none)."""

    def __init__(self, keys: Mapping[WrappedKey, bytes]) -> None:
        self._keys = dict(keys)

    def __repr__(self) -> str:
        return f"StaticKeyProvider({len(self._keys)} keys)"

    def generate_data_key(self, key_name: str) -> DataKey:
        raise KeyAccessError("this process was given keys to read with, not to write with")

    def unwrap(self, wrapped: WrappedKey) -> bytes:
        try:
            return self._keys[wrapped]
        except KeyError:
            raise KeyAccessError("this process was not given that data key") from None


def _bundle(keys: Mapping[WrappedKey, bytes]) -> bytes:
    items = [{"wrapped": w.to_text(), "key": base64.b64encode(k).decode()} for w, k in keys.items()]
    return json.dumps({"keys": items}).encode()


def read_key_bundle(stream: IO[bytes]) -> StaticKeyProvider:
    """The provider for the key bundle `ppml serving up` writes on a child's stdin."""
    data = stream.read(_MAX_BUNDLE + 1)
    try:
        if len(data) > _MAX_BUNDLE:
            raise ValueError
        items = json.loads(data)["keys"]
        keys = {
            WrappedKey.from_text(str(i["wrapped"])): base64.b64decode(str(i["key"]), validate=True)
            for i in items
        }
    except (ValueError, KeyError, TypeError):
        raise ConfigurationError("no valid key bundle on stdin (--keys-from-stdin)") from None
    return StaticKeyProvider(keys)


# -- the plan: commands, measurements, files -----------------------------------------------------


@dataclass(frozen=True, slots=True)
class Plan:
    """Everything derived from the settings before anything starts."""

    settings: DeploySettings
    serving_dir: Path
    info: ModelInfo
    model_key: str
    payload_key_file: Path
    password_file: Path
    tls_password_file: Path
    ca: Path
    worker_command: tuple[str, ...]
    frontend_command: tuple[str, ...]
    files: Mapping[str, Path] = field(default_factory=dict)

    @property
    def serving_key(self) -> str:
        return f"serving-{self.settings.deployment}"

    def manifests(
        self, snapshots: tuple[Path | None, Path | None] = (None, None)
    ) -> tuple[WorkloadManifest, WorkloadManifest]:
        """The worker's and the front end's manifests (as `ppml run` would measure them)."""
        from ppml.tee.manifest import build_manifest

        return (
            build_manifest(list(self.worker_command), snapshot=snapshots[0]),
            build_manifest(list(self.frontend_command), snapshot=snapshots[1]),
        )

    def boot_files(self, role: str) -> dict[str, Path]:
        """What an attested child finds in its boot directory (the worker: no TLS key)."""
        names = ["ca.pem", "redis-password.ppml", "payload.key.ppml"]
        if role == "front end":
            names += ["server.pem", "server-key.pem", "tls-key-password.ppml"]
        return {n: self.files[n] for n in names}

    def allow_lines(self) -> list[str]:
        """What `--measure` prints: the measurements and the policy commands they need."""
        worker, frontend = (m.measurement() for m in self.manifests())
        allow = "ppml policy allow {} --tee sim --measurement {}"
        return [
            f"worker {worker}",
            f"frontend {frontend}",
            "# allow them (the same settings give the same measurements):",
            allow.format(self.model_key, worker),
            allow.format(self.serving_key, worker),
            allow.format(self.serving_key, frontend),
        ]


def serving_dir_of(workspace_path: Path) -> Path:
    return Path(workspace_path).absolute() / "serving"


def plan_deployment(ws: Workspace, keys: KeyService, settings: DeploySettings) -> Plan:
    """Check the model (it must exist, be ppml-encrypted and load), make sure the named key
    ``serving-<deployment>`` exists, and build the commands."""
    from ppml.crypto.stream import looks_encrypted
    from ppml.data.files import read_stream_header
    from ppml.serving.frontend import ModelInfo
    from ppml.serving.model import load_model

    s = settings
    if not s.model.exists():
        raise InputNotFound("no such model file", path=s.model)
    if not s.model.is_file():
        raise UsageError("the model is not a file", path=s.model)
    if not looks_encrypted(s.model):
        raise NotEncrypted(
            "the model is not ppml-encrypted: `ppml encrypt MODEL -o MODEL.ppml --key models`",
            path=s.model,
        )
    model_key = read_stream_header(s.model)[0].wrapped.key_name
    model = load_model(
        s.model,
        keys,
        runtime=s.runtime,  # type: ignore[arg-type]
        name=s.model_name,
        input_shape=s.input_shape,
        input_dtype=s.input_dtype,
    )
    info = ModelInfo.from_model(model)
    del model
    serving_dir = serving_dir_of(ws.path)
    secrets_dir = serving_dir / s.deployment
    payload_file = secrets_dir / "payload.key.ppml"
    password_file = secrets_dir / "redis-password.ppml"
    tls_password_file = secrets_dir / "tls-key-password.ppml"
    serving_key = f"serving-{s.deployment}"
    try:
        keys.describe(serving_key)
    except KeyNotFound:
        keys.create_key(serving_key)
    files = {
        "ca.pem": ws.ca_cert,
        "redis-password.ppml": password_file,
        "payload.key.ppml": payload_file,
        "server.pem": ws.server_cert,
        "server-key.pem": ws.server_key,
        "tls-key-password.ppml": tls_password_file,
    }
    # An attested child never sees the workspace: it finds these copies in its boot directory.
    where = {n: f"{BOOT_DIR}/{_BOOT_SUBDIR}/{n}" if s.tee else str(p) for n, p in files.items()}
    common = [
        "--deployment",
        s.deployment,
        "--redis-ca",
        where["ca.pem"],
        "--redis-password-file",
        where["redis-password.ppml"],
        "--payload-key-file",
        where["payload.key.ppml"],
    ]
    dev = [] if s.tee else ["--keys-from-stdin"]
    python = sys.executable
    worker = [
        python,
        "-I",
        "-m",
        "ppml.serving.worker",
        str(s.model),
        *common,
        "--runtime",
        s.runtime,
        "--intra-op-threads",
        str(s.intra_op_threads),
        "--max-batch-size",
        str(s.max_batch_size),
        "--max-wait-ms",
        str(s.max_wait_ms),
        *dev,
    ]
    if s.model_name is not None:
        worker += ["--model-name", s.model_name]
    if s.input_shape is not None:
        worker += ["--input-shape", _shape_text(s.input_shape), "--input-dtype", s.input_dtype]
    frontend = [
        python,
        "-I",
        "-m",
        "ppml.serving.frontend_main",
        *common,
        "--model-name",
        info.name,
        "--input-shape",
        _shape_text(info.input_shape) or "-",
        "--dtype",
        info.dtype,
        "--output-names",
        ",".join(info.output_names),
        "--tls-cert",
        where["server.pem"],
        "--tls-key",
        where["server-key.pem"],
        "--tls-key-password-file",
        where["tls-key-password.ppml"],
        "--sync-timeout-s",
        repr(s.sync_timeout_s),
        "--max-body-bytes",
        str(s.max_body_bytes),
        "--max-instances",
        str(s.max_instances),
        *dev,
    ]
    return Plan(
        settings=s,
        serving_dir=serving_dir,
        info=info,
        model_key=model_key,
        payload_key_file=payload_file,
        password_file=password_file,
        tls_password_file=tls_password_file,
        ca=ws.ca_cert,
        worker_command=tuple(worker),
        frontend_command=tuple(frontend),
        files=files,
    )


def _write_secret_files(ws: Workspace, keys: KeyService, plan: Plan) -> None:
    """The payload key (made once), the Redis password and the TLS key's password, each
    encrypted under the serving key."""
    from ppml.data.files import create_encrypted
    from ppml.serving.codec import KEY_BYTES
    from ppml.serving.redis_server import redis_password

    ensure_private_dir(plan.payload_key_file.parent)
    if not plan.payload_key_file.is_file():
        with create_encrypted(plan.payload_key_file, keys, plan.serving_key) as out:
            out.write(secrets.token_bytes(KEY_BYTES))
    with create_encrypted(plan.password_file, keys, plan.serving_key) as out:
        out.write(redis_password(ws).encode())
    with create_encrypted(plan.tls_password_file, keys, plan.serving_key) as out:
        out.write(ws.tls_key_password().encode())


def _unwrapped(keys: KeyService, paths: Sequence[Path]) -> dict[WrappedKey, bytes]:
    from ppml.data.files import read_stream_header

    wrapped = [read_stream_header(p)[0].wrapped for p in paths]
    return {w: keys.unwrap(w) for w in wrapped}


# -- processes -------------------------------------------------------------------------------------


def _alive(entry: Mapping[str, Any]) -> bool:
    ident = entry.get("identity")
    pid = entry.get("pid")
    return isinstance(pid, int) and ident is not None and process_identity(pid) == ident


def _terminate(entries: Sequence[Mapping[str, Any]], *, group: bool, grace: float) -> int:
    """SIGTERM every live entry (its process group when `group`), SIGKILL after `grace` s."""
    live = [e for e in entries if _alive(e)]
    for e in live:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            if group:
                os.killpg(int(e["pid"]), signal.SIGTERM)
            else:
                os.kill(int(e["pid"]), signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(_alive(e) for e in live):
        time.sleep(0.05)
    for e in live:
        if _alive(e):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(int(e["pid"]), signal.SIGKILL) if group else os.kill(
                    int(e["pid"]), signal.SIGKILL
                )
    return len(live)


def _open_log(path: Path) -> int:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.fchmod(fd, 0o600)
    return fd


def _tail(path: Path, lines: int = 6) -> str:
    try:
        text = path.read_text(errors="replace").strip().splitlines()[-lines:]
    except OSError:
        return ""
    return (": " + " | ".join(text)) if text else ""


@dataclass
class _Child:
    role: str
    proc: subprocess.Popen[bytes]
    log: Path
    identity: str
    channel: EvidenceChannelServer | None = None

    def entry(self) -> dict[str, Any]:
        return {"pid": self.proc.pid, "identity": self.identity, "log": str(self.log)}


def read_state(serving_dir: Path) -> dict[str, Any] | None:
    path = serving_dir / STATE_FILE
    try:
        state = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        raise ConfigurationError("the serving state file is damaged", path=path) from None
    if not isinstance(state, dict) or not isinstance(state.get("workers"), list):
        raise ConfigurationError("the serving state file is damaged", path=path)
    return state


def _entries(state: Mapping[str, Any]) -> list[dict[str, Any]]:
    out = [e for e in [state.get("frontend"), *state.get("workers", [])] if isinstance(e, dict)]
    return out


@dataclass
class Deployment:
    """A started deployment (owned by the `up` process)."""

    plan: Plan
    url: str
    redis: RedisServer
    children: list[_Child] = field(default_factory=list)
    state: dict[str, Any] = field(default_factory=dict)

    @property
    def state_file(self) -> Path:
        return self.plan.serving_dir / STATE_FILE

    def _save(self) -> None:
        write_private(self.state_file, json.dumps(self.state, indent=2).encode())

    def problem(self) -> str | None:
        """Why the deployment is not whole any more (None while it is)."""
        if not self.state_file.is_file():
            return "stopped by `ppml serving down`"
        if not self.redis.running:
            return "redis-server exited"
        for c in self.children:
            if c.proc.poll() is not None:
                return f"the {c.role} exited (code {c.proc.returncode}; see {c.log})"
        return None

    def close_channels(self) -> None:
        for c in self.children:
            if c.channel is not None:
                c.channel.close()
                c.channel = None

    def stop(self, grace: float = 20.0) -> None:
        """Stop the front end, then the workers (each finishes its batch), then Redis."""
        front = [c for c in self.children if c.role == "front end"]
        workers = [c for c in self.children if c.role != "front end"]
        for group in (front, workers):
            _terminate([c.entry() for c in group], group=True, grace=grace)
            for c in group:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    c.proc.wait(1)
        self.redis.stop()
        self.close_channels()
        self.state_file.unlink(missing_ok=True)

    def wait(self, stop: threading.Event, poll_s: float = 0.5) -> str | None:
        """Block until `stop` is set (None) or the deployment breaks (the reason)."""
        while not stop.wait(poll_s):
            problem = self.problem()
            if problem is not None:
                return problem
        return None


def _bind(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise UsageError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    sock.listen(512)
    return sock


def _check_not_running(serving_dir: Path) -> None:
    state = read_state(serving_dir)
    if state is None:
        return
    redis = state.get("redis")
    live = [e for e in [*_entries(state), redis] if isinstance(e, dict) and _alive(e)]
    if live:
        raise UsageError(
            f"a serving deployment ({state.get('deployment')}) is already up at "
            f"{state.get('url')}: stop it first with `ppml serving down`"
        )
    (serving_dir / STATE_FILE).unlink(missing_ok=True)  # stale: every process is gone


def start_deployment(
    ws: Workspace,
    keys: KeyService,
    plan: Plan,
    *,
    kms_url: str | None = None,
    echo: Callable[[str], None] = lambda _: None,
) -> Deployment:
    """Start Redis, the workers and the front end; return once all are ready. `kms_url` (the
    loopback KMS of this process) is required with ``tee="sim"``. On any failure everything
    started is stopped again."""
    from ppml.serving.redis_server import start_redis

    s = plan.settings
    if s.tee is not None and kms_url is None:
        raise ConfigurationError("an attested deployment needs the KMS URL")
    ensure_private_dir(plan.serving_dir)
    _check_not_running(plan.serving_dir)
    logs = plan.serving_dir / "logs"
    ensure_private_dir(logs)
    sock = _bind(s.host, s.port)
    port = int(sock.getsockname()[1])
    shown_host = "127.0.0.1" if s.host in ("0.0.0.0", "") else s.host  # noqa: S104
    url = (
        f"https://{shown_host}:{port}"
        if ":" not in shown_host
        else f"https://[{shown_host}]:{port}"
    )
    _write_secret_files(ws, keys, plan)
    redis = start_redis(ws, maxmemory=s.redis_maxmemory)
    dep = Deployment(plan=plan, url=url, redis=redis)
    dep.state = {
        "deployment": s.deployment,
        "url": url,
        "port": port,
        "tee": s.tee,
        "model": str(s.model),
        "model_info": plan.info.to_dict(),
        "ca": str(plan.ca),
        "status": "starting",
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "up_pid": os.getpid(),
        "redis": {
            "pid": redis.pid,
            "identity": process_identity(redis.pid or 0),
            "port": redis.port,
            "log": str(redis.log_file),
        },
        "frontend": None,
        "workers": [],
    }
    try:
        dep._save()
        env_extra = {REDIS_PORT_ENV: str(redis.port)}
        worker_keys = frontend_keys = None
        if s.tee is None:
            shared = [plan.payload_key_file, plan.password_file]
            frontend_keys = _unwrapped(keys, [*shared, plan.tls_password_file])
            worker_keys = {**_unwrapped(keys, shared), **_unwrapped(keys, [s.model])}
        for n in range(s.workers):
            child = _launch(
                f"worker {n}",
                plan,
                plan.worker_command,
                env_extra,
                logs / f"worker-{n}.log",
                kms_url=kms_url,
                ws=ws,
                keys=worker_keys,
            )
            dep.children.append(child)
            dep.state["workers"].append(child.entry())
            dep._save()
        child = _launch(
            "front end",
            plan,
            plan.frontend_command,
            {**env_extra, LISTEN_FD_ENV: str(sock.fileno())},
            logs / "frontend.log",
            kms_url=kms_url,
            ws=ws,
            keys=frontend_keys,
            pass_fds=(sock.fileno(),),
        )
        dep.children.append(child)
        dep.state["frontend"] = child.entry()
        dep._save()
        sock.close()  # the front end holds it now
        _wait_ready(dep, s.start_timeout_s, echo)
        dep.state["status"] = "ready"
        dep._save()
    except BaseException:
        sock.close()
        dep.stop(grace=5.0)
        raise
    return dep


def _launch(
    role: str,
    plan: Plan,
    command: Sequence[str],
    env_extra: Mapping[str, str],
    log: Path,
    *,
    kms_url: str | None,
    ws: Workspace,
    keys: Mapping[WrappedKey, bytes] | None,
    pass_fds: tuple[int, ...] = (),
) -> _Child:
    out = _open_log(log)
    try:
        if kms_url is not None:
            launched = _launch_attested(role, plan, command, env_extra, out, kms_url, ws, pass_fds)
            return _Child(role, launched.proc, log, _identity_of(launched.proc), launched.channel)
        env = {k: os.environ[k] for k in DEFAULT_ENV if k in os.environ}
        env.update(env_extra)
        try:
            proc = subprocess.Popen(  # noqa: S603 -- our own command, no shell
                list(command),
                env=env,
                stdin=subprocess.PIPE if keys is not None else subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                pass_fds=pass_fds,
                start_new_session=True,
                cwd=str(log.parent),
            )
        except OSError as exc:
            raise ConfigurationError(f"cannot start the {role}: {exc.strerror}") from None
    finally:
        os.close(out)
    if keys is not None:
        assert proc.stdin is not None
        with contextlib.suppress(BrokenPipeError):
            proc.stdin.write(_bundle(keys))
        proc.stdin.close()
    return _Child(role, proc, log, _identity_of(proc))


def _identity_of(proc: subprocess.Popen[bytes]) -> str:
    return process_identity(proc.pid) or f"{proc.pid}:?"


def _launch_attested(
    role: str,
    plan: Plan,
    command: Sequence[str],
    env_extra: Mapping[str, str],
    out: int,
    kms_url: str,
    ws: Workspace,
    pass_fds: tuple[int, ...],
) -> LaunchedWorkload:
    """A sandboxed, attested child (`ppml.tee.launcher`), detached: it outlives `up`."""
    import shutil

    from ppml.attestation.sim import SimPlatform
    from ppml.tee import launcher
    from ppml.tee.manifest import build_manifest

    with launcher.prepared_run(ws.path / "run") as run:
        boot = run.boot / _BOOT_SUBDIR
        ensure_private_dir(boot)
        for name, source in plan.boot_files(role).items():
            shutil.copyfile(source, boot / name)
        manifest = build_manifest(list(command), snapshot=run.snapshot, forbidden=[ws.path])
        measurement = manifest.measurement()
        platform = SimPlatform(ws.sim_platform_key())
        return launcher.start(
            manifest,
            run,
            tee="sim",
            quote=lambda rd: platform.quote(measurement, rd),
            kms_url=kms_url,
            ca_pem=ws.ca_cert.read_text(),
            isolation=launcher.Isolation(
                hidden=(ws.path,), visible=(plan.settings.model,), no_data=True
            ),
            extra_env=env_extra,
            pass_fds=pass_fds,
            cwd=Path("/"),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
            detach=True,
        )


def _wait_ready(dep: Deployment, timeout: float, echo: Callable[[str], None]) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    pending = {c.role: c for c in dep.children if c.role != "front end"}
    front = next(c for c in dep.children if c.role == "front end")
    context = ssl.create_default_context(cafile=str(dep.plan.ca))
    front_ready = False
    with httpx.Client(base_url=dep.url, verify=context, timeout=2.0) as http:
        while pending or not front_ready:
            for c in dep.children:
                if c.proc.poll() is not None:
                    raise ConfigurationError(
                        f"the {c.role} exited while starting (code {c.proc.returncode})"
                        + _tail(c.log),
                        path=c.log,
                    )
            for role, c in list(pending.items()):
                with contextlib.suppress(OSError):
                    if _READY_NEEDLE in c.log.read_text(errors="replace"):
                        del pending[role]
                        echo(f"{role} ready (pid {c.proc.pid})")
            if not front_ready:
                with contextlib.suppress(httpx.HTTPError):
                    front_ready = http.get("/healthz").status_code == 200
                    if front_ready:
                        echo(f"front end ready (pid {front.proc.pid})")
            if time.monotonic() > deadline:
                waiting = [*pending, *([] if front_ready else ["front end"])]
                raise ConfigurationError(
                    f"not ready within {timeout:g} s: {', '.join(waiting)}",
                    path=dep.plan.serving_dir / "logs",
                )
            time.sleep(0.1)


# -- status and down (no passphrase needed) ------------------------------------------------------


def stop_deployment(serving_dir: Path, *, grace: float = 20.0) -> int:
    """Stop the recorded front end, workers and Redis; remove the state. Returns how many
    processes were running (0 when none is recorded)."""
    state = read_state(serving_dir)
    if state is None:
        return 0
    stopped = 0
    front = state.get("frontend")
    if isinstance(front, dict):
        stopped += _terminate([front], group=True, grace=grace)
    stopped += _terminate(
        [w for w in state["workers"] if isinstance(w, dict)], group=True, grace=grace
    )
    redis = state.get("redis")
    if isinstance(redis, dict):
        # redis-server flushes its AOF on SIGTERM.
        stopped += _terminate([redis], group=False, grace=grace)
    (serving_dir / STATE_FILE).unlink(missing_ok=True)
    return stopped


def _queue_depth(url: str, ca: str) -> tuple[bool, float | None]:
    """(healthy, queue depth) from the front end's /healthz and /metrics."""
    import httpx

    try:
        context = ssl.create_default_context(cafile=ca)
        with httpx.Client(base_url=url, verify=context, timeout=3.0) as http:
            healthy = http.get("/healthz").status_code == 200
            metrics = http.get("/metrics").text
    except (httpx.HTTPError, OSError, ssl.SSLError):
        return False, None
    for line in metrics.splitlines():
        if line.startswith("ppml_serving_queue_depth "):
            with contextlib.suppress(ValueError):
                value = float(line.split()[1])
                return healthy, value if value == value else None
    return healthy, None


def deployment_status(serving_dir: Path) -> dict[str, Any] | None:
    """The recorded deployment with `alive` per process, health and queue depth, or None."""
    state = read_state(serving_dir)
    if state is None:
        return None

    def show(e: Any) -> dict[str, Any] | None:
        if not isinstance(e, dict):
            return None
        out = {k: v for k, v in e.items() if k != "identity"}
        out["alive"] = _alive(e)
        return out

    info = {k: v for k, v in state.items() if k not in ("frontend", "workers", "redis")}
    info["redis"] = show(state.get("redis"))
    info["frontend"] = show(state.get("frontend"))
    info["workers"] = [show(w) for w in state["workers"]]
    healthy, depth = False, None
    if info["frontend"] is not None and info["frontend"]["alive"]:
        healthy, depth = _queue_depth(str(state.get("url")), str(state.get("ca")))
    info["healthy"] = healthy and all(
        p is not None and p["alive"] for p in [info["redis"], info["frontend"], *info["workers"]]
    )
    info["queue_depth"] = depth
    return info


@contextlib.contextmanager
def signals_to_event(stop: threading.Event) -> Iterator[None]:
    """SIGINT and SIGTERM set `stop` for the block (a foreground `up` stops cleanly)."""

    def handler(signum: int, frame: object) -> None:
        stop.set()

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def with_overrides(settings: DeploySettings, **changes: Any) -> DeploySettings:
    return replace(settings, **changes)
