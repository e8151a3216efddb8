"""Load on the HTTPS KMS: a trivial route, unwrap with a cached token, and full attestation
round trips, measured in one run against a `ppml serve` subprocess.

    python benchmarks/kms_load.py [--procs 2] [--threads 8] [--seconds 5]

Several client processes (so the load generator does not share the server's GIL, nor one GIL
among its own clients), each with several threads holding one keep-alive HTTPS connection.
Phases, one after the other:

  (a) healthz   GET /healthz
  (b) unwrap    POST /kms/v1/keys/bench/unwrap with a token obtained once per connection
  (c) attest    POST challenge, POST attest (fresh sim evidence, fresh X25519 key), POST unwrap

Prints requests/s, p50 and p99 per phase, the throughput ratio (b)/(a) and the p50 of (c);
`--single` adds the same three phases with one connection (latency without queueing).
"""

from __future__ import annotations

import argparse
import base64
import multiprocessing as mp
import os
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from ppml.attestation import SimPlatform, report_data_for
from ppml.crypto.hpke import generate_keypair
from ppml.crypto.passphrase import KdfParams
from ppml.kms import ReleasedKey, open_released
from ppml.server.embedded import services_for
from ppml.workspace import Workspace

PASSPHRASE = "kms load benchmark passphrase"
MEASUREMENT = "be" * 48
KEY = "bench"
PHASES = ("healthz", "unwrap", "attest")


@dataclass(frozen=True)
class Target:
    url: str
    ca_pem: str
    platform_pem: bytes
    wrapped: str


@dataclass
class Result:
    phase: str
    requests: int
    seconds: float
    latencies: list[float]
    errors: int
    server_cpu: float = float("nan")  # seconds of server CPU time during the phase

    @property
    def cpu_per_request_us(self) -> float:
        return self.server_cpu / self.requests * 1e6 if self.requests else float("nan")

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    def percentile(self, p: float) -> float:
        if not self.latencies:
            return float("nan")
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(p * len(ordered)))] * 1000


# -- the workload side (runs in the client processes) ------------------------------------------


class Session:
    """One keep-alive connection, attesting as the benchmark's sim workload."""

    def __init__(self, target: Target) -> None:
        self.target = target
        context = ssl.create_default_context(cadata=target.ca_pem)
        self.http = httpx.Client(base_url=target.url, verify=context, timeout=60.0)
        key = serialization.load_pem_private_key(target.platform_pem, None)
        assert isinstance(key, Ed25519PrivateKey)
        self.platform = SimPlatform(key)
        self.token = ""
        self.private: Any = None
        self.opened = False

    def healthz(self) -> None:
        self._ok(self.http.get("/healthz"))

    def attest(self) -> None:
        nonce = base64.b64decode(self._ok(self.http.post("/attestation/v1/challenge"))["nonce"])
        private, public = generate_keypair()
        evidence = self.platform.quote(MEASUREMENT, report_data_for(nonce, public))
        body = {
            "tee": "sim",
            "evidence": base64.b64encode(evidence).decode(),
            "nonce": base64.b64encode(nonce).decode(),
            "public_key": base64.b64encode(public).decode(),
        }
        self.token = self._ok(self.http.post("/attestation/v1/attest", json=body))["token"]
        self.private = private
        self.opened = False

    def unwrap(self) -> None:
        reply = self._ok(
            self.http.post(
                f"/kms/v1/keys/{KEY}/unwrap",
                json={"wrapped_key": self.target.wrapped},
                headers={"Authorization": f"Bearer {self.token}"},
            )
        )
        if not self.opened:
            # Open the first release of each token (the workload caches the data key); the
            # load loop then measures the server, not the client's HPKE.
            open_released(ReleasedKey.from_dict(reply), self.private)
            self.opened = True

    def attest_and_unwrap(self) -> None:
        self.attest()
        self.unwrap()

    @staticmethod
    def _ok(response: httpx.Response) -> Any:
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}: {response.text[:200]}")
        return response.json()


def _client_process(
    target: Target, phase: str, threads: int, start_at: float, seconds: float, out: Any
) -> None:
    sessions = [Session(target) for _ in range(threads)]
    for s in sessions:
        s.healthz()  # connect (TLS handshake) before the clock starts
        if phase == "unwrap":
            s.attest()  # the cached token
    op: dict[str, Callable[[Session], None]] = {
        "healthz": Session.healthz,
        "unwrap": Session.unwrap,
        "attest": Session.attest_and_unwrap,
    }
    latencies: list[list[float]] = [[] for _ in sessions]
    errors = [0] * threads
    stop_at = start_at + seconds

    def loop(i: int) -> None:
        while time.time() < start_at:
            time.sleep(0.001)
        while time.time() < stop_at:
            t0 = time.perf_counter()
            try:
                op[phase](sessions[i])
            except Exception:
                errors[i] += 1
                continue
            latencies[i].append(time.perf_counter() - t0)

    workers = [threading.Thread(target=loop, args=(i,)) for i in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    for s in sessions:
        s.http.close()
    out.put(([x for per in latencies for x in per], sum(errors)))


def _cpu_seconds(pid: int | None) -> float:
    """User + system CPU time of process `pid` (Linux /proc), NaN elsewhere."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return float("nan")


def run_phase(
    target: Target,
    phase: str,
    procs: int,
    threads: int,
    seconds: float,
    server_pid: int | None = None,
) -> Result:
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    start_at = time.time() + 2.0 + 0.3 * procs * threads / 8
    workers = [
        ctx.Process(target=_client_process, args=(target, phase, threads, start_at, seconds, out))
        for _ in range(procs)
    ]
    for w in workers:
        w.start()
    while time.time() < start_at:
        time.sleep(0.001)
    cpu_start = _cpu_seconds(server_pid)
    time.sleep(seconds)
    cpu = _cpu_seconds(server_pid) - cpu_start
    latencies: list[float] = []
    errors = 0
    for _ in workers:
        lat, err = out.get(timeout=seconds + 120)
        latencies += lat
        errors += err
    for w in workers:
        w.join()
    return Result(phase, len(latencies), seconds, latencies, errors, cpu)


# -- the server side ---------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def prepare(directory: Path) -> tuple[Workspace, Target, int]:
    ws = Workspace.create(
        directory / "ws", PASSPHRASE.encode(), dev=True, kdf=KdfParams.for_testing()
    )
    services = services_for(ws)
    services.keys.create_key(KEY)
    services.broker.set_policy(
        KEY, [{"tee": "sim", "measurement": MEASUREMENT, "debug_ok": False, "min_tcb": "UpToDate"}]
    )
    wrapped = services.keys.generate_data_key(KEY).wrapped.to_text()
    services.keys.close()
    platform_pem = ws.sim_platform_key().private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    port = _free_port()
    target = Target(f"https://127.0.0.1:{port}", ws.ca_cert.read_text(), platform_pem, wrapped)
    return ws, target, port


def start_server(ws: Workspace, port: int, log: Path) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PPML_")}
    env["PPML_PASSPHRASE"] = PASSPHRASE
    with open(log, "wb") as err:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "ppml",
                "serve",
                "--port",
                str(port),
                "--workspace",
                str(ws.path),
            ],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
    context = ssl.create_default_context(cafile=str(ws.ca_cert))
    deadline = time.monotonic() + 30
    with httpx.Client(verify=context, timeout=2.0) as client:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError("the server exited: " + log.read_text())
            try:
                if client.get(f"https://127.0.0.1:{port}/healthz").status_code == 200:
                    return proc
            except httpx.TransportError:
                time.sleep(0.05)
    proc.kill()
    raise RuntimeError("the server did not start: " + log.read_text())


def report(results: list[Result], label: str) -> None:
    print(f"\n{label}")
    print(
        f"{'phase':<10}{'requests':>10}{'req/s':>10}{'p50 ms':>10}{'p99 ms':>10}{'errors':>8}"
        f"{'server CPU us/req':>19}"
    )
    for r in results:
        print(
            f"{r.phase:<10}{r.requests:>10}{r.rps:>10.0f}{r.percentile(0.5):>10.2f}"
            f"{r.percentile(0.99):>10.2f}{r.errors:>8}{r.cpu_per_request_us:>19.0f}"
        )
    by = {r.phase: r for r in results}
    ratio = by["unwrap"].rps / by["healthz"].rps if by["healthz"].rps else float("nan")
    print(f"unwrap/healthz throughput: {ratio:.2f} (goal >= 0.5)")
    print(f"attest+unwrap p50: {by['attest'].percentile(0.5):.2f} ms (goal < 20 ms)")
    if by["attest"].latencies:
        print(f"attest+unwrap mean: {statistics.fmean(by['attest'].latencies) * 1000:.2f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--procs", type=int, default=2, help="client processes")
    parser.add_argument("--threads", type=int, default=8, help="connections per process")
    parser.add_argument("--seconds", type=float, default=5.0, help="duration of each phase")
    parser.add_argument("--single", action="store_true", help="also run with one connection")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="ppml-kms-load-") as tmp:
        ws, target, port = prepare(Path(tmp))
        log = Path(tmp) / "server.log"
        server = start_server(ws, port, log)
        try:
            print(
                f"ppml serve pid {server.pid} on {target.url}; {os.cpu_count()} CPUs; "
                f"{args.procs} client processes x {args.threads} connections, "
                f"{args.seconds:g} s per phase"
            )
            results = [
                run_phase(target, p, args.procs, args.threads, args.seconds, server.pid)
                for p in PHASES
            ]
            report(results, "concurrent load")
            if args.single:
                single = [run_phase(target, p, 1, 1, args.seconds, server.pid) for p in PHASES]
                report(single, "one connection")
            # The headline ratio, for benchmarks/run.py (higher is better).
            by = {r.phase: r for r in results}
            ratio = by["unwrap"].rps / by["healthz"].rps if by["healthz"].rps else float("nan")
            print(f"RESULT kms_load unwrap_vs_healthz={ratio:.3f}")
        finally:
            server.terminate()
            server.wait(timeout=15)


if __name__ == "__main__":
    main()
