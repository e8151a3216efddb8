"""`ppml serving up|status|down` with real processes: redis-server (TLS, password, AOF), the
HTTPS front end and worker processes, with and without the sim TEE."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from cli_support import PASSPHRASE, client_cert, run_ppml
from redis_support import require_redis_server
from tests.support.serving_models import mlp_onnx_bytes, mlp_reference, write_encrypted

from ppml.serving import InputQueue, OutputQueue
from ppml.serving.contract import read_secret_file
from ppml.workspace import Workspace

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def _pids(status: dict[str, object]) -> list[int]:
    entries = [status["redis"], status["frontend"], *status["workers"]]  # type: ignore[misc]
    return [int(e["pid"]) for e in entries]  # type: ignore[index]


def _status(home: Path) -> dict[str, object]:
    r = run_ppml("serving", "status", "--format", "json", home=home, passphrase=None)
    assert r.code == 0, r.err
    return json.loads(r.out)  # type: ignore[no-any-return]


def _wait_gone(pids: list[int], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while any(_alive(p) for p in pids):
        assert time.monotonic() < deadline, f"still running: {[p for p in pids if _alive(p)]}"
        time.sleep(0.05)  # polling other processes' exit; nothing to wait on


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    require_redis_server()
    root = tmp_path_factory.mktemp("serving-cli")
    ws = root / "ws"
    r = run_ppml("init", "--dev", "--workspace", ws)
    assert r.code == 0, r.err
    r = run_ppml("key", "create", "models", home=ws)
    assert r.code == 0, r.err
    opened = Workspace.open(ws, PASSPHRASE.encode())
    with opened.key_service() as keys:
        write_encrypted(mlp_onnx_bytes(), root / "mlp.onnx.ppml", keys, "models")
    (root / "plain.onnx").write_bytes(mlp_onnx_bytes())
    return ws


@pytest.fixture
def clean(home: Path) -> Iterator[Path]:
    """Whatever a test leaves running is stopped afterwards."""
    yield home
    run_ppml("serving", "down", home=home, passphrase=None)


def _secrets(home: Path) -> list[str]:
    """The Redis password and the payload key (raw, hex, base64) as they must never appear."""
    ws = Workspace.open(home, PASSPHRASE.encode())
    with ws.key_service() as keys:
        payload = read_secret_file(home / "serving" / "default" / "payload.key.ppml", keys)
    return [
        ws.secret("redis-password"),
        payload.hex(),
        base64.b64encode(payload).decode(),
        base64.urlsafe_b64encode(payload).decode(),
        PASSPHRASE,
    ]


def _check_no_leak(home: Path, *texts: str) -> None:
    ps = subprocess.run(["ps", "-ww", "-eo", "args"], capture_output=True, text=True, check=True)
    logs = [p.read_text(errors="replace") for p in (home / "serving" / "logs").glob("*.log")]
    for secret in _secrets(home):
        for text in (ps.stdout, *logs, *texts):
            assert secret not in text


def test_up_predict_status_down(clean: Path) -> None:
    home = clean
    model = home.parent / "mlp.onnx.ppml"
    up = run_ppml(
        "serving", "up", "--model", model, "--workers", "2", "--port", "0", "--detach", home=home
    )
    assert up.code == 0, up.err
    url = up.out.strip().splitlines()[-1]
    assert url.startswith("https://127.0.0.1:")
    serving = home / "serving"
    assert (serving.stat().st_mode & 0o777) == 0o700
    assert ((serving / "deployment.json").stat().st_mode & 0o777) == 0o600

    status = _status(home)
    assert status["url"] == url and status["healthy"] is True
    assert status["queue_depth"] == 0.0
    assert len(status["workers"]) == 2  # type: ignore[arg-type]
    pids = _pids(status)
    assert all(_alive(p) for p in pids)

    ca = home / "tls" / "ca.pem"
    rng = np.random.default_rng(7)
    x = rng.normal(size=(16,)).astype(np.float32)
    cert = client_cert(home)
    with InputQueue(url, ca=ca, cert=cert) as q:
        np.testing.assert_allclose(q.predict(x), mlp_reference(x[None])[0], rtol=1e-5, atol=1e-5)
        batch = rng.normal(size=(5, 16)).astype(np.float32)
        got = np.stack(q.predict_batch(list(batch)))
        np.testing.assert_allclose(got, mlp_reference(batch), rtol=1e-5, atol=1e-5)
        ids = [q.enqueue(f"req-{i}", x=batch[i]) for i in range(3)]
    with OutputQueue(url, ca=ca, cert=cert) as out:
        deadline = time.monotonic() + 20
        while out.query(ids[0]) is None:
            assert time.monotonic() < deadline
            time.sleep(0.02)  # polling the service as a client does
        np.testing.assert_allclose(out.query(ids[0]), mlp_reference(batch[:1])[0], atol=1e-5)
        results: dict[str, object] = {}
        while len(results) < 3:
            assert time.monotonic() < deadline
            results.update(out.dequeue())
        for i, request_id in enumerate(ids):
            np.testing.assert_allclose(results[request_id], mlp_reference(batch)[i], atol=1e-5)

    # clients issued by the CLI: each has its own ids and results; no certificate, no access
    certs = home.parent / "clients"
    certs.mkdir(exist_ok=True)
    for name in ("alice", "bob"):
        issued = run_ppml("serving", "client", "issue", name, "--out", certs, "--force", home=home)
        assert issued.code == 0, issued.err
        assert ((certs / f"{name}-key.pem").stat().st_mode & 0o777) == 0o600
    alice = (certs / "alice.pem", certs / "alice-key.pem")
    bob = (certs / "bob.pem", certs / "bob-key.pem")
    with InputQueue(url, ca=ca, cert=alice) as a, InputQueue(url, ca=ca, cert=bob) as b:
        a.enqueue("req-0", x=batch[0])  # the id the owner used too
        b.enqueue("req-0", x=batch[1])
    with OutputQueue(url, ca=ca, cert=alice) as a, OutputQueue(url, ca=ca, cert=bob) as b:
        deadline = time.monotonic() + 20
        got: dict[str, dict[str, object]] = {"a": {}, "b": {}}
        while not (got["a"] and got["b"]):
            assert time.monotonic() < deadline
            got["a"].update(a.dequeue())
            got["b"].update(b.dequeue())
        np.testing.assert_allclose(got["a"]["req-0"], mlp_reference(batch[:1])[0], atol=1e-5)
        np.testing.assert_allclose(got["b"]["req-0"], mlp_reference(batch[1:2])[0], atol=1e-5)
    bad = run_ppml("serving", "client", "issue", "Bad Name\n", "--out", certs, home=home)
    assert bad.code == 2 and "invalid client name" in bad.err
    import ssl as _ssl

    import httpx

    anonymous = _ssl.create_default_context(cafile=str(ca))
    with httpx.Client(base_url=url, verify=anonymous) as c:
        assert c.get("/v1/results").status_code == 401
        assert c.get("/healthz").status_code == 200

    again = run_ppml("serving", "up", "--model", model, "--port", "0", "--detach", home=home)
    assert again.code == 2
    assert "already up" in again.err and "ppml serving down" in again.err
    assert _pids(_status(home)) == pids  # the first deployment is untouched

    text = run_ppml("serving", "status", home=home, passphrase=None)
    assert text.code == 0 and "healthy" in text.out and url in text.out
    _check_no_leak(home, up.out, up.err, again.err)

    down = run_ppml("serving", "down", home=home, passphrase=None)
    assert down.code == 0 and "stopped 4 process(es)" in down.out, down.err
    _wait_gone(pids)
    assert not (serving / "deployment.json").exists()
    gone = run_ppml("serving", "status", "--format", "json", home=home, passphrase=None)
    assert gone.code == 1 and json.loads(gone.out) == {"running": False}


def test_tee_sim_measured_and_allowed(clean: Path) -> None:
    home = clean
    config = home.parent / "serving.toml"
    config.write_text('[serving]\nmodel = "mlp.onnx.ppml"\nworkers = 1\nport = 0\n')
    measure = run_ppml(
        "serving", "up", "--config", config, "--workers", "2", "--measure", home=home
    )
    assert measure.code == 0, measure.err
    lines = measure.out.splitlines()
    worker = lines[0].split()[1]
    frontend = lines[1].split()[1]
    assert lines[0].startswith("worker ") and len(worker) == 96
    assert lines[1].startswith("frontend ") and len(frontend) == 96

    # Nothing allowed yet: the attested workers get no keys, and nothing is left running.
    denied = run_ppml(
        "serving", "up", "--config", config, "--workers", "2", "--tee", "sim", "--detach",
        home=home,
    )  # fmt: skip
    assert denied.code != 0
    assert "exited while starting" in denied.err
    assert not (home / "serving" / "deployment.json").exists()

    for key, m in (("models", worker), ("serving-default", worker), ("serving-default", frontend)):
        r = run_ppml("policy", "allow", key, "--tee", "sim", "--measurement", m, home=home)
        assert r.code == 0, r.err
    up = run_ppml(
        "serving", "up", "--config", config, "--workers", "2", "--tee", "sim", "--detach",
        home=home,
    )  # fmt: skip
    assert up.code == 0, up.err
    assert "SIMULATED TEE" in up.err
    url = up.out.strip().splitlines()[-1]
    status = _status(home)
    assert status["tee"] == "sim" and status["healthy"] is True
    assert len(status["workers"]) == 2  # type: ignore[arg-type]  # the flag beat the file
    x = np.arange(16, dtype=np.float32) / 16
    with InputQueue(url, ca=home / "tls" / "ca.pem", cert=client_cert(home)) as q:
        np.testing.assert_allclose(q.predict(x), mlp_reference(x[None])[0], atol=1e-5)
    _check_no_leak(home, up.out, up.err)
    pids = _pids(status)
    down = run_ppml("serving", "down", home=home, passphrase=None)
    assert down.code == 0, down.err
    _wait_gone(pids)


def _serving_processes(home: Path) -> list[str]:
    ps = subprocess.run(["ps", "-ww", "-eo", "args"], capture_output=True, text=True, check=True)
    return [
        line
        for line in ps.stdout.splitlines()
        if str(home) in line and ("ppml.serving" in line or "redis-server" in line)
    ]


def test_bad_models_are_refused_before_anything_starts(clean: Path) -> None:
    home = clean
    missing = run_ppml("serving", "up", "--model", home.parent / "nope.ppml", "--port", "0",
                       "--detach", home=home)  # fmt: skip
    assert missing.code == 2 and "no such model file" in missing.err
    plain = run_ppml("serving", "up", "--model", home.parent / "plain.onnx", "--port", "0",
                     "--detach", home=home)  # fmt: skip
    assert plain.code == 2 and "not ppml-encrypted" in plain.err
    none = run_ppml("serving", "up", "--port", "0", home=home)
    assert none.code == 2 and "--model" in none.err
    assert not (home / "serving" / "deployment.json").exists()
    assert _serving_processes(home) == []


def test_foreground_stops_everything_on_sigterm(clean: Path) -> None:
    home = clean
    env = {k: v for k, v in os.environ.items() if not k.startswith("PPML_")}
    env.update({"PPML_HOME": str(home), "PPML_PASSPHRASE": PASSPHRASE})
    proc = subprocess.Popen(
        [sys.executable, "-m", "ppml", "serving", "up", "--model", str(home.parent /
         "mlp.onnx.ppml"), "--port", "0"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        url = proc.stdout.readline().strip()  # printed once everything is ready
        assert url.startswith("https://"), proc.stderr.read() if proc.stderr else ""
        pids = _pids(_status(home))
        x = np.ones(16, dtype=np.float32)
        with InputQueue(url, ca=home / "tls" / "ca.pem", cert=client_cert(home)) as q:
            np.testing.assert_allclose(q.predict(x), mlp_reference(x[None])[0], atol=1e-5)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        _wait_gone(pids)
        assert not (home / "serving" / "deployment.json").exists()
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()  # reaps it and closes the pipes
