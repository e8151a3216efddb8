"""A deployment's life: `start_deployment` (Redis, the workers, the front end, each ready),
`Deployment` (what the `up` process owns), `stop_deployment` and `deployment_status` (from the
recorded state: no passphrase needed)."""

from __future__ import annotations

import contextlib
import os
import ssl
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ppml._internal.fs import ensure_private_dir
from ppml._internal.procs import process_identity
from ppml.errors import ConfigurationError, UsageError
from ppml.serving.contract import LISTEN_FD_ENV, REDIS_PORT_ENV
from ppml.serving.deploy.plan import FRONT_END, Plan, unwrapped_keys, write_secret_files
from ppml.serving.deploy.state import STATE_FILE, DeploymentState, ProcessEntry, read_state
from ppml.serving.deploy.supervise import Child, Launch, bind, launch, tail, terminate

if TYPE_CHECKING:
    from ppml.kms import KeyService
    from ppml.serving.redis_server import RedisServer
    from ppml.workspace import Workspace

__all__ = ["Deployment", "deployment_status", "start_deployment", "stop_deployment"]

Echo = Callable[[str], None]


@dataclass
class Deployment:
    """A started deployment (owned by the `up` process)."""

    plan: Plan
    url: str
    redis: RedisServer
    state: DeploymentState
    children: list[Child] = field(default_factory=list)

    @property
    def state_file(self) -> Path:
        return self.plan.serving_dir / STATE_FILE

    def save(self) -> None:
        self.state.save(self.plan.serving_dir)

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
            c.close_channel()
            c.close_ready()

    def stop(self, grace: float = 20.0) -> None:
        """Stop the front end, then the workers (each finishes its batch), then Redis."""
        front = [c for c in self.children if c.role == FRONT_END]
        workers = [c for c in self.children if c.role != FRONT_END]
        for group in (front, workers):
            terminate([c.entry() for c in group], group=True, grace=grace)
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


def _check_not_running(serving_dir: Path) -> None:
    state = read_state(serving_dir)
    if state is None:
        return
    if any(p.alive for p in state.processes()):
        raise UsageError(
            f"a serving deployment ({state.deployment}) is already up at "
            f"{state.url}: stop it first with `ppml serving down`"
        )
    (serving_dir / STATE_FILE).unlink(missing_ok=True)  # stale: every process is gone


def _url(host: str, port: int) -> str:
    shown = "127.0.0.1" if host in ("0.0.0.0", "") else host  # noqa: S104
    return f"https://{shown}:{port}" if ":" not in shown else f"https://[{shown}]:{port}"


def _initial_state(plan: Plan, url: str, port: int, redis: RedisServer) -> DeploymentState:
    s = plan.settings
    return DeploymentState(
        deployment=s.deployment,
        url=url,
        port=port,
        tee=s.tee,
        model=str(s.model),
        model_info=plan.info.to_dict(),
        ca=str(plan.ca),
        status="starting",
        started_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        up_pid=os.getpid(),
        redis=ProcessEntry(
            pid=redis.pid or 0,
            identity=process_identity(redis.pid or 0),
            log=str(redis.log_file),
            port=redis.port,
        ),
    )


def start_deployment(
    ws: Workspace,
    keys: KeyService,
    plan: Plan,
    *,
    kms_url: str | None = None,
    echo: Echo = lambda _: None,
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
    sock = bind(s.host, s.port)
    port = int(sock.getsockname()[1])
    write_secret_files(ws, keys, plan)
    redis = start_redis(ws, maxmemory=s.redis_maxmemory)
    url = _url(s.host, port)
    dep = Deployment(plan=plan, url=url, redis=redis, state=_initial_state(plan, url, port, redis))
    try:
        dep.save()
        _start_children(dep, Launch(plan, ws, logs, kms_url), keys, sock)
        _wait_ready(dep, s.start_timeout_s, echo)
        dep.state.status = "ready"
        dep.save()
    except BaseException:
        sock.close()
        dep.stop(grace=5.0)
        raise
    return dep


def _start_children(dep: Deployment, how: Launch, keys: KeyService, sock: Any) -> None:
    """The workers, then the front end (on `sock`), each recorded as soon as it runs."""
    plan = dep.plan
    env_extra = {REDIS_PORT_ENV: str(dep.redis.port)}
    worker_keys = frontend_keys = None
    if how.kms_url is None:
        shared = [plan.payload_key_file, plan.password_file]
        frontend_keys = unwrapped_keys(keys, [*shared, plan.tls_password_file])
        worker_keys = unwrapped_keys(keys, [*shared, plan.settings.model])
    for n in range(plan.settings.workers):
        child = launch(
            how,
            f"worker {n}",
            plan.worker_command,
            env_extra,
            log_name=f"worker-{n}.log",
            keys=worker_keys,
        )
        dep.children.append(child)
        dep.state.workers.append(child.entry())
        dep.save()
    child = launch(
        how,
        FRONT_END,
        plan.frontend_command,
        {**env_extra, LISTEN_FD_ENV: str(sock.fileno())},
        log_name="frontend.log",
        keys=frontend_keys,
        pass_fds=(sock.fileno(),),
    )
    dep.children.append(child)
    dep.state.frontend = child.entry()
    dep.save()
    sock.close()  # the front end holds it now


def _wait_ready(dep: Deployment, timeout: float, echo: Echo) -> None:
    """Until every worker has written its ready line and the front end answers /healthz."""
    import httpx

    deadline = time.monotonic() + timeout
    pending = [c for c in dep.children if c.role != FRONT_END]
    front = next(c for c in dep.children if c.role == FRONT_END)
    context = ssl.create_default_context(cafile=str(dep.plan.ca))
    front_ready = False
    with httpx.Client(base_url=dep.url, verify=context, timeout=2.0) as http:
        while pending or not front_ready:
            _check_started(dep)
            for c in [c for c in pending if c.has_signalled_ready()]:
                pending.remove(c)
                echo(f"{c.role} ready (pid {c.proc.pid})")
            if not front_ready:
                with contextlib.suppress(httpx.HTTPError):
                    front_ready = http.get("/healthz").status_code == 200
                    if front_ready:
                        echo(f"front end ready (pid {front.proc.pid})")
            if time.monotonic() > deadline:
                waiting = [c.role for c in pending] + ([] if front_ready else [FRONT_END])
                raise ConfigurationError(
                    f"not ready within {timeout:g} s: {', '.join(waiting)}",
                    path=dep.plan.serving_dir / "logs",
                )
            time.sleep(0.1)
    front.close_ready()


def _check_started(dep: Deployment) -> None:
    for c in dep.children:
        if c.proc.poll() is not None:
            raise ConfigurationError(
                f"the {c.role} exited while starting (code {c.proc.returncode})" + tail(c.log),
                path=c.log,
            )


# -- status and down (no passphrase needed) ------------------------------------------------------


def stop_deployment(serving_dir: Path, *, grace: float = 20.0) -> int:
    """Stop the recorded front end, workers and Redis; remove the state. Returns how many
    processes were running (0 when none is recorded)."""
    state = read_state(serving_dir)
    if state is None:
        return 0
    stopped = 0
    if state.frontend is not None:
        stopped += terminate([state.frontend], group=True, grace=grace)
    stopped += terminate(state.workers, group=True, grace=grace)
    if state.redis is not None:
        # redis-server flushes its AOF on SIGTERM.
        stopped += terminate([state.redis], group=False, grace=grace)
    (serving_dir / STATE_FILE).unlink(missing_ok=True)
    return stopped


def _health(url: str, ca: str) -> tuple[bool, float | None]:
    """(healthy, queue depth) as the front end tells them: its /healthz, and its /queue (the
    queue's own count of requests accepted and not answered)."""
    import httpx

    try:
        context = ssl.create_default_context(cafile=ca)
        with httpx.Client(base_url=url, verify=context, timeout=3.0) as http:
            healthy = http.get("/healthz").status_code == 200
            depth = http.get("/queue").json().get("depth")
    except (httpx.HTTPError, OSError, ssl.SSLError, ValueError, AttributeError):
        return False, None
    return healthy, float(depth) if isinstance(depth, int) else None


def deployment_status(serving_dir: Path) -> dict[str, Any] | None:
    """The recorded deployment with `alive` per process, health and queue depth, or None."""
    state = read_state(serving_dir)
    if state is None:
        return None
    info = {k: v for k, v in state.to_dict().items() if k not in ("frontend", "workers", "redis")}
    info["redis"] = None if state.redis is None else state.redis.shown()
    info["frontend"] = None if state.frontend is None else state.frontend.shown()
    info["workers"] = [w.shown() for w in state.workers]
    healthy, depth = False, None
    if state.frontend is not None and state.frontend.alive:
        healthy, depth = _health(state.url, state.ca)
    everything = [state.redis, state.frontend, *state.workers]
    info["healthy"] = healthy and all(p is not None and p.alive for p in everything)
    info["queue_depth"] = depth
    return info
