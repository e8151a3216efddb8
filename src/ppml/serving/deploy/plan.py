"""The plan of a deployment: the model checked, the named key made, the children's commands and
measurements, the files they need; and the secret files written before they start."""

from __future__ import annotations

import dataclasses
import secrets
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Final

from ppml.crypto.envelope import WrappedKey
from ppml.errors import InputNotFound, KeyNotFound, NotEncrypted, UsageError
from ppml.serving.contract import ModelInfo, format_shape
from ppml.serving.deploy.settings import DeploySettings
from ppml.tee.sandbox import BOOT_DIR

if TYPE_CHECKING:
    from ppml.kms import KeyService
    from ppml.tee.manifest import WorkloadManifest
    from ppml.workspace import Workspace

__all__ = [
    "BOOT_SUBDIR",
    "Plan",
    "plan_deployment",
    "serving_dir_of",
    "unwrapped_keys",
    "write_secret_files",
]

BOOT_SUBDIR: Final = "serving"
FRONT_END: Final = "front end"
_WORKER_FILES: Final = ("ca.pem", "redis-password.ppml", "payload.key.ppml")
_FRONT_END_FILES: Final = ("server.pem", "server-key.pem", "tls-key-password.ppml")


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
        names = [*_WORKER_FILES, *(_FRONT_END_FILES if role == FRONT_END else ())]
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


def _checked_model(settings: DeploySettings, keys: KeyService) -> tuple[str, ModelInfo]:
    """The model's key name and signature; refuses a missing, plaintext or invalid model."""
    from ppml.crypto.stream import looks_encrypted
    from ppml.data.files import read_stream_header
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
    if s.image is not None:  # refuses settings whose instances the model cannot take
        info = dataclasses.replace(info, image=s.image)
    return model_key, info


def _common_args(s: DeploySettings, where: Mapping[str, str]) -> list[str]:
    return [
        "--deployment",
        s.deployment,
        "--redis-ca",
        where["ca.pem"],
        "--redis-password-file",
        where["redis-password.ppml"],
        "--payload-key-file",
        where["payload.key.ppml"],
        *([] if s.tee else ["--keys-from-stdin"]),
    ]


def _worker_command(s: DeploySettings, where: Mapping[str, str]) -> tuple[str, ...]:
    worker = [
        sys.executable,
        "-I",
        "-m",
        "ppml.serving.worker",
        str(s.model),
        *_common_args(s, where),
        "--runtime",
        s.runtime,
        "--intra-op-threads",
        str(s.intra_op_threads),
        "--max-batch-size",
        str(s.max_batch_size),
        "--max-wait-ms",
        str(s.max_wait_ms),
    ]
    if s.model_name is not None:
        worker += ["--model-name", s.model_name]
    if s.input_shape is not None:
        worker += ["--input-shape", format_shape(s.input_shape), "--input-dtype", s.input_dtype]
    if s.image is not None:
        worker += ["--image-spec", s.image.to_json()]
    return tuple(worker)


def _frontend_command(
    s: DeploySettings, info: ModelInfo, where: Mapping[str, str]
) -> tuple[str, ...]:
    return (
        sys.executable,
        "-I",
        "-m",
        "ppml.server.serving_frontend_main",
        *_common_args(s, where),
        "--model-info",
        info.to_json(),
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
    )


def plan_deployment(ws: Workspace, keys: KeyService, settings: DeploySettings) -> Plan:
    """Check the model (it must exist, be ppml-encrypted and load), make sure the named key
    ``serving-<deployment>`` exists, and build the commands."""
    s = settings
    model_key, info = _checked_model(s, keys)
    serving_dir = serving_dir_of(ws.path)
    secrets_dir = serving_dir / s.deployment
    files = {
        "ca.pem": ws.ca_cert,
        "redis-password.ppml": secrets_dir / "redis-password.ppml",
        "payload.key.ppml": secrets_dir / "payload.key.ppml",
        "server.pem": ws.server_cert,
        "server-key.pem": ws.server_key,
        "tls-key-password.ppml": secrets_dir / "tls-key-password.ppml",
    }
    try:
        keys.describe(f"serving-{s.deployment}")
    except KeyNotFound:
        keys.create_key(f"serving-{s.deployment}")
    # An attested child never sees the workspace: it finds these copies in its boot directory.
    where = {n: f"{BOOT_DIR}/{BOOT_SUBDIR}/{n}" if s.tee else str(p) for n, p in files.items()}
    return Plan(
        settings=s,
        serving_dir=serving_dir,
        info=info,
        model_key=model_key,
        payload_key_file=files["payload.key.ppml"],
        password_file=files["redis-password.ppml"],
        tls_password_file=files["tls-key-password.ppml"],
        ca=ws.ca_cert,
        worker_command=_worker_command(s, where),
        frontend_command=_frontend_command(s, info, where),
        files=files,
    )


def write_secret_files(ws: Workspace, keys: KeyService, plan: Plan) -> None:
    """The payload key (made once), the Redis password and the TLS key's password, each
    encrypted under the serving key."""
    from ppml._internal.fs import ensure_private_dir
    from ppml.data.files import create_encrypted
    from ppml.data.payload import KEY_BYTES
    from ppml.serving.redis_server import redis_password

    ensure_private_dir(plan.payload_key_file.parent)
    if not plan.payload_key_file.is_file():
        with create_encrypted(plan.payload_key_file, keys, plan.serving_key) as out:
            out.write(secrets.token_bytes(KEY_BYTES))
    with create_encrypted(plan.password_file, keys, plan.serving_key) as out:
        out.write(redis_password(ws).encode())
    with create_encrypted(plan.tls_password_file, keys, plan.serving_key) as out:
        out.write(ws.tls_key_password().encode())


def unwrapped_keys(keys: KeyService, paths: Sequence[Path]) -> dict[WrappedKey, bytes]:
    """The data keys of ppml-encrypted `paths`, unwrapped (for a development child's bundle)."""
    from ppml.data.files import read_stream_header

    wrapped = [read_stream_header(p)[0].wrapped for p in paths]
    return {w: keys.unwrap(w) for w in wrapped}
