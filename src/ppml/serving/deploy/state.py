"""The recorded state of a deployment: ``<workspace>/serving/deployment.json`` (0600, in a 0700
directory). Pids with their start times, ports, paths; nothing secret. `ppml serving status`
and `down` read it without the passphrase."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Final

from ppml._internal.fs import write_private
from ppml._internal.procs import process_identity
from ppml.errors import ConfigurationError

__all__ = ["STATE_FILE", "DeploymentState", "ProcessEntry", "read_state"]

STATE_FILE: Final = "deployment.json"


@dataclass(frozen=True, slots=True)
class ProcessEntry:
    """A started process: its pid, its identity (pid and start time, so that a reused pid is
    never taken for it), its log; `port` for redis-server."""

    pid: int
    identity: str | None
    log: str
    port: int | None = None

    @property
    def alive(self) -> bool:
        return self.identity is not None and process_identity(self.pid) == self.identity

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"pid": self.pid, "identity": self.identity}
        if self.port is not None:
            out["port"] = self.port
        out["log"] = self.log
        return out

    def shown(self) -> dict[str, Any]:
        """What `ppml serving status` shows of it (no identity; whether it is alive)."""
        out = {k: v for k, v in self.to_dict().items() if k != "identity"}
        out["alive"] = self.alive
        return out

    @classmethod
    def from_dict(cls, data: Any) -> ProcessEntry:
        if not isinstance(data, dict) or not isinstance(data.get("pid"), int):
            raise ValueError("not a process entry")
        identity, port = data.get("identity"), data.get("port")
        return cls(
            pid=data["pid"],
            identity=identity if isinstance(identity, str) else None,
            log=str(data.get("log", "")),
            port=port if isinstance(port, int) else None,
        )


@dataclass(slots=True)
class DeploymentState:
    """One deployment as recorded; `save` writes it, `read_state` reads it back."""

    deployment: str
    url: str
    port: int
    tee: str | None
    model: str
    model_info: dict[str, Any]
    ca: str
    status: str
    started_at: str
    up_pid: int
    redis: ProcessEntry | None
    frontend: ProcessEntry | None = None
    workers: list[ProcessEntry] = field(default_factory=list)

    def processes(self) -> list[ProcessEntry]:
        """The front end, the workers, then redis-server (the order they stop in)."""
        front = [] if self.frontend is None else [self.frontend]
        return [*front, *self.workers, *([] if self.redis is None else [self.redis])]

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["redis"] = None if self.redis is None else self.redis.to_dict()
        out["frontend"] = None if self.frontend is None else self.frontend.to_dict()
        out["workers"] = [w.to_dict() for w in self.workers]
        return out

    def save(self, serving_dir: Path) -> None:
        write_private(serving_dir / STATE_FILE, json.dumps(self.to_dict(), indent=2).encode())

    @classmethod
    def from_dict(cls, data: Any) -> DeploymentState:
        if not isinstance(data, dict) or not isinstance(data.get("workers"), list):
            raise ValueError("not a deployment state")

        def entry(value: Any) -> ProcessEntry | None:
            return None if value is None else ProcessEntry.from_dict(value)

        return cls(
            deployment=str(data["deployment"]),
            url=str(data["url"]),
            port=int(data["port"]),
            tee=None if data.get("tee") is None else str(data["tee"]),
            model=str(data["model"]),
            model_info=dict(data.get("model_info") or {}),
            ca=str(data["ca"]),
            status=str(data["status"]),
            started_at=str(data["started_at"]),
            up_pid=int(data["up_pid"]),
            redis=entry(data.get("redis")),
            frontend=entry(data.get("frontend")),
            workers=[ProcessEntry.from_dict(w) for w in data["workers"]],
        )


def read_state(serving_dir: Path) -> DeploymentState | None:
    """The recorded deployment, None when there is none; a damaged file is an error."""
    path = serving_dir / STATE_FILE
    try:
        return DeploymentState.from_dict(json.loads(path.read_text()))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError):
        raise ConfigurationError("the serving state file is damaged", path=path) from None
