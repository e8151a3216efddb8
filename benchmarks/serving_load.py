"""Load on Trusted Cluster Serving through its HTTPS front end: encrypted queue vs plaintext.

    python benchmarks/serving_load.py [--duration 5] [--workers 2] [--levels 1,4,16,64]
                                      [--request-sizes 1,32] [--max-batch-size 32]

Real parts only: a TLS + password redis-server with AOF (`ppml.serving.redis_server`), worker
processes running `ppml.serving.worker.main` on a small MLP (16 -> 32 -> 4, built here with
onnx.helper) encrypted under a workspace key, and the front end (`create_app` over a real
`ServingQueue`) served over HTTPS by uvicorn in its own process. Two deployments run side by
side, one with the AES-256-GCM payload codec and one with `PayloadCodec.plaintext` (the workers
are the same code, given a plaintext queue through `main`'s `queue_factory`); at each level the
two take turns (A B B A, ``--rounds``), so that the drift of a noisy machine falls on both.

The load: `level` concurrent clients (threads in `--client-procs` processes, one keep-alive
HTTP/1.1 connection each, the standard library's `http.client` over TLS: a lean client leaves
more of the shared cores to the system under test) calling ``POST /predict`` in a closed loop,
with 1 instance per call and with `n` instances per call (``--request-sizes``).
Reported per codec, request size and level: predictions/s, calls/s, p50 and p99 call latency,
then the encrypted/plaintext throughput ratio and the goals. ``--breakdown`` adds where the
time of one call goes (HTTPS alone, the queue's round trips, the codec).

Note on a 2-core machine: the load generator, the front end, the workers and Redis share the
cores; the numbers are those of the whole system on this machine, not of the front end alone.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import http.client
import json
import math
import multiprocessing as mp
import os
import pstats
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from ppml._internal.fs import write_private
from ppml.crypto.envelope import DataKeyProvider
from ppml.crypto.passphrase import KdfParams
from ppml.data.files import create_encrypted
from ppml.data.payload import KEY_BYTES, PayloadCodec
from ppml.serving.redis_server import RedisServer, redis_password, start_redis
from ppml.workspace import Workspace

PASSPHRASE = "serving benchmark passphrase (dev workspace)"
KEY_NAME = "models"
MODEL = "mlp"
INPUT_DIM, HIDDEN_DIM, OUTPUT_DIM = 16, 32, 4
CODECS = ("encrypted", "plaintext")


# -- the model -------------------------------------------------------------------------------------


def mlp_weights(seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [
        rng.normal(0.0, 0.5, (INPUT_DIM, HIDDEN_DIM)).astype(np.float32),
        rng.normal(0.0, 0.1, HIDDEN_DIM).astype(np.float32),
        rng.normal(0.0, 0.5, (HIDDEN_DIM, OUTPUT_DIM)).astype(np.float32),
        (rng.normal(0.0, 0.1, OUTPUT_DIM) + 2.0).astype(np.float32),
    ]


def mlp_reference(x: np.ndarray) -> np.ndarray:
    w1, b1, w2, b2 = mlp_weights()
    h = np.maximum(x.astype(np.float32) @ w1 + b1, 0.0)
    return np.asarray(np.maximum(h @ w2 + b2, 0.0), dtype=np.float32)


def mlp_onnx_bytes() -> bytes:
    """relu(relu(x @ w1 + b1) @ w2 + b2) as ONNX: input "x" [N, 16] float32, output "y"."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    names = ("w1", "b1", "w2", "b2")
    inits = [numpy_helper.from_array(w, n) for w, n in zip(mlp_weights(), names, strict=True)]
    nodes = [
        helper.make_node("Gemm", ["x", "w1", "b1"], ["h1"]),
        helper.make_node("Relu", ["h1"], ["a1"]),
        helper.make_node("Gemm", ["a1", "w2", "b2"], ["h2"]),
        helper.make_node("Relu", ["h2"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", INPUT_DIM])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", OUTPUT_DIM])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return bytes(model.SerializeToString())


# -- the worker and front end processes (internal subcommands) ----------------------------------


def _worker_main(argv: list[str]) -> int:
    """``_worker CODEC <worker argv>``: `ppml.serving.worker.main`, with a plaintext queue
    when CODEC is "plaintext" (the worker's own CLI always encrypts)."""
    import redis

    from ppml.serving.contract import QueueConfig, open_queue, redis_options
    from ppml.serving.queue import ServingQueue
    from ppml.serving.worker import main

    codec_name, rest = argv[0], argv[1:]

    def plaintext_queue(config: QueueConfig, provider: DataKeyProvider) -> ServingQueue:
        return ServingQueue(
            redis.Redis(**redis_options(config, provider)),
            deployment=config.deployment,
            codec=PayloadCodec.plaintext(config.deployment),
            max_deliveries=config.max_deliveries,
        )

    factory = open_queue if codec_name == "encrypted" else plaintext_queue
    return main(rest, queue_factory=factory)


def _frontend_main(argv: list[str]) -> int:
    """``_frontend --config FILE``: the front end over the deployment's queue, over HTTPS."""
    import redis

    from ppml.api import key_provider
    from ppml.server.serving_frontend import FrontendSettings, create_app
    from ppml.server.tls import TlsFiles, run_https
    from ppml.serving.contract import (
        ModelInfo,
        QueueConfig,
        open_async_client,
        read_secret_file,
        redis_options,
    )
    from ppml.serving.model import load_model
    from ppml.serving.queue import ServingQueue

    p = argparse.ArgumentParser(prog="serving_load.py _frontend")
    p.add_argument("--config", type=Path, required=True)
    p.add_argument("--profile", type=Path)
    args = p.parse_args(argv)
    cfg = json.loads(args.config.read_text())
    provider = key_provider()
    deployment = cfg["deployment"]
    config = QueueConfig(  # how the deployment's own front end reaches its queue
        deployment=deployment,
        redis_port=cfg["redis_port"],
        redis_ca=Path(cfg["ca"]),
        redis_password_file=Path(cfg["password_file"]),
        payload_key_file=Path(cfg["payload_key_file"]),
    )
    if cfg["codec"] == "encrypted":
        key = read_secret_file(Path(cfg["payload_key_file"]), provider)
        codec = PayloadCodec(key, deployment)
    else:
        codec = PayloadCodec.plaintext(deployment)
    client = redis.Redis(**redis_options(config, provider))
    queue = ServingQueue(client, deployment=deployment, codec=codec, max_length=100_000)
    queue.ensure_group()
    info = ModelInfo.from_model(load_model(Path(cfg["model_file"]), provider, name=MODEL))
    aio_client = open_async_client(config, provider)
    aio = queue.asynchronous(aio_client)
    app = create_app(
        queue,
        models={MODEL: info},
        settings=FrontendSettings(max_instances=256),
        waiter=aio.result_notifier(),
        aio=aio,
    )
    sock = socket.socket(socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", cfg["port"]))
    profiler = cProfile.Profile() if args.profile else None
    if profiler is not None:
        profiler.enable()
    # the deployment's own server set-up (uvicorn with uvloop and httptools when present)
    tls = TlsFiles(
        cert=Path(cfg["cert"]),
        key=Path(cfg["key"]),
        ca=Path(cfg["ca"]),
        password=Path(cfg["tls_password_file"]).read_text(),
    )
    run_https(app, tls, sock=sock)
    if profiler is not None:
        profiler.disable()
        profiler.dump_stats(str(args.profile))
    return 0


# -- the deployment under test ------------------------------------------------------------------


@dataclass
class Files:
    root: Path
    ws: Workspace
    model_file: Path
    payload_key_file: Path
    password_file: Path
    tls_password_file: Path
    client: tuple[str, str, str]  # CA, certificate and key of the load's client (mutual TLS)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _child_env(ws: Workspace) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PPML_")}
    return {**env, "PPML_HOME": str(ws.path), "PPML_PASSPHRASE": PASSPHRASE}


def _prepare(root: Path) -> Files:
    ws = Workspace.create(root / "ws", PASSPHRASE.encode(), dev=True, kdf=KdfParams.for_testing())
    model_file, key_file = root / "mlp.onnx.ppml", root / "payload.key.ppml"
    with ws.key_service() as keys:
        keys.create_key(KEY_NAME)
        for path, data in ((model_file, mlp_onnx_bytes()), (key_file, os.urandom(KEY_BYTES))):
            with create_encrypted(path, keys, KEY_NAME) as out:
                out.write(data)
    password_file = root / "redis.password"
    write_private(password_file, redis_password(ws).encode())
    tls_password_file = root / "tls.password"
    write_private(tls_password_file, ws.tls_key_password().encode())
    return Files(
        root, ws, model_file, key_file, password_file, tls_password_file, _client_cert(ws, root)
    )


def _client_cert(ws: Workspace, root: Path) -> tuple[str, str, str]:
    """A serving client's certificate, as `ppml serving client issue bench` makes it."""
    import datetime as dt

    from cryptography.hazmat.primitives import serialization

    from ppml.workspace import pki

    now = dt.datetime.now(dt.UTC)
    issued = pki.issue_serving_client(
        ws.certificate_authority(), "bench", now, dt.timedelta(days=1)
    )
    cert, key = root / "bench.pem", root / "bench-key.pem"
    write_private(cert, issued.cert.public_bytes(serialization.Encoding.PEM))
    write_private(key, pki.private_key_pem(issued.key))
    return str(ws.ca_cert), str(cert), str(key)


def _verifying(tls: tuple[str, str, str]) -> ssl.SSLContext:
    """Verifies the front end against the CA and presents the client certificate."""
    context = ssl.create_default_context(cafile=tls[0])
    context.load_cert_chain(tls[1], tls[2])
    return context


@contextlib.contextmanager
def deployment_running(
    files: Files, server: RedisServer, codec: str, args: argparse.Namespace
) -> Iterator[str]:
    """Workers and a front end for `codec`; yields the front end's URL."""
    name = f"bench-{codec}"
    env = _child_env(files.ws)
    procs: list[subprocess.Popen[bytes]] = []
    logs = files.root / "logs"
    logs.mkdir(exist_ok=True)
    try:
        for i in range(args.workers):
            argv = [
                sys.executable,
                __file__,
                "_worker",
                codec,
                str(files.model_file),
                "--deployment",
                name,
                "--model-name",
                MODEL,
                "--redis-port",
                str(server.port),
                "--redis-ca",
                str(files.ws.ca_cert),
                "--redis-password-file",
                str(files.password_file),
                "--payload-key-file",
                str(files.payload_key_file),
                "--consumer",
                f"{codec}-w{i}",
                "--max-batch-size",
                str(args.max_batch_size),
                "--max-wait-ms",
                str(args.max_wait_ms),
                "--log-level",
                "WARNING",
            ]
            with open(logs / f"{codec}-w{i}.log", "wb") as out:
                procs.append(subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env))
        port = _free_port()
        config = {
            "codec": codec,
            "deployment": name,
            "port": port,
            "redis_port": server.port,
            "ca": str(files.ws.ca_cert),
            "cert": str(files.ws.server_cert),
            "key": str(files.ws.server_key),
            "tls_password_file": str(files.tls_password_file),
            "password_file": str(files.password_file),
            "payload_key_file": str(files.payload_key_file),
            "model_file": str(files.model_file),
        }
        config_file = files.root / f"frontend-{codec}.json"
        config_file.write_text(json.dumps(config))
        argv = [sys.executable, __file__, "_frontend", "--config", str(config_file)]
        if args.profile:
            argv += ["--profile", str(files.root / f"frontend-{codec}.pstats")]
        with open(logs / f"{codec}-frontend.log", "wb") as out:
            front = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env)
        procs.append(front)
        url = f"https://127.0.0.1:{port}"
        _wait_healthy(url, files.client, procs, logs)
        yield url
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if args.profile:
            _print_profile(files.root / f"frontend-{codec}.pstats", codec)


def _print_profile(path: Path, codec: str) -> None:
    if not path.exists():
        return
    print(f"\n-- front end ({codec}): event-loop thread, top functions by own time --")
    stats = pstats.Stats(str(path))
    stats.sort_stats("tottime").print_stats(15)


def _wait_healthy(
    url: str, tls: tuple[str, str, str], procs: Sequence[subprocess.Popen[bytes]], logs: Path
) -> None:
    verify = _verifying(tls)
    deadline = time.monotonic() + 60
    with httpx.Client(verify=verify, timeout=2.0) as client:
        while True:
            for proc in procs:
                if proc.poll() is not None:
                    text = "\n".join(p.read_text()[-2000:] for p in logs.glob("*.log"))
                    raise SystemExit(f"a serving process exited with {proc.returncode}:\n{text}")
            with contextlib.suppress(httpx.HTTPError):
                if client.get(url + "/healthz").status_code == 200:
                    return
            if time.monotonic() > deadline:
                raise SystemExit("the front end did not become healthy within 60 s")
            threading.Event().wait(0.1)


# -- the load ------------------------------------------------------------------------------------


def _client_proc(
    url: str,
    tls: tuple[str, str, str],
    threads: int,
    request_size: int,
    duration: float,
    start_at: float,
    out: Any,
) -> None:
    """`threads` closed-loop clients; sends (latencies in s, predictions, failures)."""
    verify = _verifying(tls)
    rng = np.random.default_rng(os.getpid())
    latencies: list[list[float]] = [[] for _ in range(threads)]
    predictions = [0] * threads
    failures = [0] * threads
    checked = [False] * threads

    def run(t: int) -> None:
        x = rng.normal(0.0, 1.0, (request_size, INPUT_DIM)).astype(np.float32)
        body = json.dumps({"instances": x.tolist()}).encode()
        headers = {"content-type": "application/json"}
        parsed = urllib.parse.urlsplit(url)
        conn = http.client.HTTPSConnection(
            parsed.hostname or "127.0.0.1", parsed.port, context=verify, timeout=30.0
        )
        try:
            conn.request("GET", "/healthz")  # the connection (TLS handshake) before the clock
            conn.getresponse().read()
            while time.time() < start_at:
                threading.Event().wait(max(0.0, min(0.05, start_at - time.time())))
            end = start_at + duration
            while time.time() < end:
                t0 = time.perf_counter()
                conn.request("POST", "/predict", body=body, headers=headers)
                response = conn.getresponse()
                data = response.read()
                elapsed = time.perf_counter() - t0
                if response.status != 200:
                    failures[t] += 1
                    continue
                if not checked[t]:
                    got = np.asarray(json.loads(data)["predictions"], dtype=np.float32)
                    np.testing.assert_allclose(got, mlp_reference(x), rtol=1e-4, atol=1e-4)
                    checked[t] = True
                latencies[t].append(elapsed)
                predictions[t] += request_size
        finally:
            conn.close()

    pool = [threading.Thread(target=run, args=(t,)) for t in range(threads)]
    for th in pool:
        th.start()
    for th in pool:
        th.join()
    out.send(([v for lat in latencies for v in lat], sum(predictions), sum(failures)))
    out.close()


@dataclass(frozen=True)
class Row:
    codec: str
    request_size: int
    level: int
    calls_per_s: float
    predictions_per_s: float
    p50_ms: float
    p99_ms: float
    failures: int


@dataclass
class Sample:
    """The raw outcome of load runs of one codec at one (request size, level)."""

    latencies: list[float]
    predictions: int = 0
    failures: int = 0
    seconds: float = 0.0

    def add(self, other: Sample) -> None:
        self.latencies += other.latencies
        self.predictions += other.predictions
        self.failures += other.failures
        self.seconds += other.seconds

    def row(self, codec: str, request_size: int, level: int) -> Row:
        if not self.latencies:
            return Row(codec, request_size, level, 0.0, 0.0, math.nan, math.nan, self.failures)
        lat = np.asarray(self.latencies) * 1000
        return Row(
            codec,
            request_size,
            level,
            len(self.latencies) / self.seconds,
            self.predictions / self.seconds,
            float(np.percentile(lat, 50)),
            float(np.percentile(lat, 99)),
            self.failures,
        )


def run_level(
    url: str,
    tls: tuple[str, str, str],
    level: int,
    request_size: int,
    duration: float,
    client_procs: int,
) -> Sample:
    procs_n = max(1, min(client_procs, level))
    shares = [level // procs_n + (1 if i < level % procs_n else 0) for i in range(procs_n)]
    ctx = mp.get_context("spawn")
    start_at = time.time() + 3.0  # spawn, import and connect before the clock starts
    pipes, procs = [], []
    for share in shares:
        parent, child = ctx.Pipe(duplex=False)
        proc = ctx.Process(
            target=_client_proc,
            args=(url, tls, share, request_size, duration, start_at, child),
        )
        proc.start()
        child.close()
        pipes.append(parent)
        procs.append(proc)
    sample = Sample([], seconds=duration)
    for parent in pipes:
        lat, pred, fail = parent.recv()
        sample.latencies += lat
        sample.predictions += pred
        sample.failures += fail
    for proc in procs:
        proc.join()
        if proc.exitcode != 0:
            raise SystemExit(f"a client process failed (exit {proc.exitcode})")
    return sample


# -- where the time goes -------------------------------------------------------------------------


def breakdown(files: Files, server: RedisServer, url: str, codec: str, n: int = 2000) -> None:
    """Single-threaded costs of the parts of one /predict call (the encrypted deployment)."""
    from ppml.data.payload import PayloadCodec as Codec
    from ppml.serving.queue import Result, ServingQueue
    from ppml.serving.worker import read_secret_file

    with files.ws.key_service() as keys:
        key = read_secret_file(files.payload_key_file, keys)
    name = f"bench-breakdown-{codec}"
    codecs = {"encrypted": Codec(key, name), "plaintext": Codec.plaintext(name)}
    queue = ServingQueue(server.client(), deployment=name, codec=codecs[codec], max_length=n + 1)
    queue.ensure_group()
    x = np.random.default_rng(0).normal(size=INPUT_DIM).astype(np.float32)

    def per_call(fn: Any, count: int = n) -> float:
        t0 = time.perf_counter()
        for i in range(count):
            fn(i)
        return (time.perf_counter() - t0) / count * 1e6

    c = codecs[codec]
    seal = per_call(lambda i: c.seal(f"r{i}", "request", x, model=MODEL))
    blob = c.seal("r1", "request", x, model=MODEL)
    open_ = per_call(lambda i: c.open("r1", "request", blob, model=MODEL))
    submit = per_call(lambda i: queue.submit(f"b{i}", MODEL, x))
    pending = per_call(lambda i: queue.take_if_complete([f"b{i}"]))
    queue.complete([(r, Result(r.request_id, r.array)) for r in queue.read("bench", n, 0)])
    take = per_call(lambda i: queue.take_if_complete([f"b{i}"]))
    server.client().delete(queue.stream_key)
    body = json.dumps({"instances": [x.tolist()]}).encode()
    parse = per_call(lambda i: np.asarray(json.loads(body)["instances"][0], dtype=np.float32))
    with httpx.Client(base_url=url, verify=_verifying(files.client)) as client:
        client.get("/models")
        models = per_call(lambda i: client.get("/models"), 500)
        healthz = per_call(lambda i: client.get("/healthz"), 500)
        predict = per_call(lambda i: client.post("/predict", content=body), 300)
    print(f"\n-- where one /predict goes ({codec} codec; sequential, microseconds per call) --")
    for label, value in (
        ("HTTPS keep-alive GET /models (no Redis)", models),
        ("HTTPS GET /healthz (one XLEN via the threadpool)", healthz),
        ("POST /predict, 1 instance, end to end", predict),
        ("  queue.submit (seal + Lua script round trip)", submit),
        ("  queue.take_if_complete, still pending", pending),
        ("  queue.take_if_complete, done (taken, opened)", take),
        ("  codec seal, 1 instance", seal),
        ("  codec open, 1 instance", open_),
        ("  JSON parse + to array (client side estimate)", parse),
    ):
        print(f"  {label:<52} {value:9.0f}")


# -- the run -----------------------------------------------------------------------------------


def _ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError("a comma-separated list of integers") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError("positive integers, e.g. 1,4,16,64")
    return values


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python benchmarks/serving_load.py",
        description="Throughput and latency of ppml serving through its HTTPS front end, "
        "with the encrypted queue and with the plaintext baseline.",
    )
    p.add_argument("--duration", type=float, default=5.0, help="seconds per level (5)")
    p.add_argument("--workers", type=int, default=2, help="worker processes (2)")
    p.add_argument("--levels", type=_ints, default=[1, 4, 16, 64], help="concurrency levels")
    p.add_argument(
        "--request-sizes",
        type=_ints,
        default=[1, 32],
        help="instances per /predict call, each measured (1,32)",
    )
    p.add_argument("--max-batch-size", type=int, default=32, help="worker batch size (32)")
    p.add_argument("--max-wait-ms", type=int, default=2, help="worker batch fill wait (2)")
    p.add_argument("--client-procs", type=int, default=2, help="load generator processes (2)")
    p.add_argument(
        "--rounds",
        type=int,
        default=2,
        help="turns per codec and level, interleaved A B B A (2)",
    )
    p.add_argument("--codecs", default=",".join(CODECS), help="encrypted,plaintext")
    p.add_argument("--breakdown", action="store_true", help="time the parts of one call")
    p.add_argument("--profile", action="store_true", help="cProfile the front end's loop")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    codecs = [c for c in args.codecs.split(",") if c]
    if not set(codecs) <= set(CODECS) or args.workers < 1 or args.duration <= 0:
        raise SystemExit("--codecs is encrypted and/or plaintext; --workers, --duration > 0")
    if args.rounds < 1:
        raise SystemExit("--rounds must be at least 1")
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="ppml-serving-bench-") as tmp:
        files = _prepare(Path(tmp))
        server = start_redis(files.ws)
        try:
            print(
                f"{os.cpu_count()} CPUs; {args.workers} workers per codec (batch "
                f"{args.max_batch_size}, {args.max_wait_ms} ms wait); {args.duration:g} s per "
                f"level and codec, in {args.rounds} interleaved rounds; {args.client_procs} "
                "client processes",
                flush=True,
            )
            with contextlib.ExitStack() as stack:
                # Both deployments run side by side (idle workers block on Redis, costing
                # nothing); the codecs then take turns, A B B A ..., so that drift on a noisy
                # machine falls on both alike.
                urls = {
                    c: stack.enter_context(deployment_running(files, server, c, args))
                    for c in codecs
                }
                for url in urls.values():  # warm up, up to the highest level (connections)
                    run_level(url, files.client, max(args.levels), 1, 1.0, args.client_procs)
                for size in args.request_sizes:
                    for level in args.levels:
                        samples = {c: Sample([]) for c in codecs}
                        for r in range(args.rounds):
                            order = codecs if r % 2 == 0 else codecs[::-1]
                            for codec in order:
                                samples[codec].add(
                                    run_level(
                                        urls[codec],
                                        files.client,
                                        level,
                                        size,
                                        args.duration / args.rounds,
                                        args.client_procs,
                                    )
                                )
                        for codec in codecs:
                            row = samples[codec].row(codec, size, level)
                            rows.append(row)
                            print(_format(row), flush=True)
                if args.breakdown:
                    for codec in codecs:
                        breakdown(files, server, urls[codec], codec)
        finally:
            server.stop()
    ratios = _report(rows)
    if ratios:  # the headline ratio, for benchmarks/run.py (higher is better)
        print(f"RESULT serving_load enc_vs_plain={sum(ratios) / len(ratios):.3f}")
    return 0


HEADER = (
    f"{'codec':<10} {'inst/call':>9} {'conc':>5} {'calls/s':>9} {'pred/s':>9} "
    f"{'p50 ms':>8} {'p99 ms':>8} {'fail':>5}"
)


def _format(r: Row) -> str:
    return (
        f"{r.codec:<10} {r.request_size:>9} {r.level:>5} {r.calls_per_s:>9.0f} "
        f"{r.predictions_per_s:>9.0f} {r.p50_ms:>8.1f} {r.p99_ms:>8.1f} {r.failures:>5}"
    )


def _report(rows: list[Row]) -> list[float]:
    print("\n" + HEADER)
    for r in rows:
        print(_format(r))
    by = {(r.codec, r.request_size, r.level): r for r in rows}
    ratios = []
    print("\nencrypted / plaintext throughput:")
    for (codec, size, level), r in sorted(by.items()):
        other = by.get(("plaintext", size, level))
        if codec == "encrypted" and other is not None and other.predictions_per_s > 0:
            ratio = r.predictions_per_s / other.predictions_per_s
            ratios.append(ratio)
            print(f"  {size:>3} inst/call, concurrency {level:>3}: {ratio:.2f}x")
    print("\ngoals:")
    if ratios:
        worst = min(ratios)
        print(
            f"  encrypted >= 0.9x plaintext: {'met' if worst >= 0.9 else 'NOT met'} "
            f"(lowest {worst:.2f}x, mean {sum(ratios) / len(ratios):.2f}x)"
        )
    for size in sorted({r.request_size for r in rows}):
        best = max(
            (r for r in rows if r.request_size == size and r.codec == "encrypted"),
            key=lambda r: r.predictions_per_s,
            default=None,
        )
        if best is not None:
            met = "met" if best.predictions_per_s >= 2000 else "NOT met"
            print(
                f"  >= 2000 predictions/s, encrypted, {size} inst/call: {met} "
                f"(best {best.predictions_per_s:.0f} at concurrency {best.level})"
            )
        at16 = by.get(("encrypted", size, 16))
        if at16 is not None:
            met = "met" if at16.p99_ms < 50 else "NOT met"
            print(
                f"  p99 < 50 ms at concurrency 16, encrypted, {size} inst/call: {met} "
                f"({at16.p99_ms:.1f} ms)"
            )
    return ratios


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_worker":
        raise SystemExit(_worker_main(sys.argv[2:]))
    if len(sys.argv) > 1 and sys.argv[1] == "_frontend":
        raise SystemExit(_frontend_main(sys.argv[2:]))
    raise SystemExit(main())
