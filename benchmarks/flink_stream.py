"""Flink over sealed streams: records per second and end-to-end latency, encrypted against the
same pipeline over plaintext, in the same run; and the cluster's start-up time.

    python benchmarks/flink_stream.py [--records N] [--rate R] [--live-seconds S] [--dir DIR]

The pipeline (benchmarks/flink_job.py, on a mini-cluster, parallelism 1): card transactions
read from a Redis stream (the workspace's TLS Redis, password on), a running total per card,
each result written to part files. Encrypted: records sealed with the payload codec, opened by
ppml.flink's source, results into encrypted parts (a fresh data key each, keys from the relay).
Plaintext: the same over JSON records with PyFlink's own pieces. Each mode runs once:

- throughput: N records are in the stream before the job starts; records per second is N over
  the time between the first and the last of their results reaching the sink's input;
- latency: while the job runs, R records a second are appended, each with its production time;
  latency is a result's arrival at the sink's input minus its record's production time,
  counted for records produced after the bulk was done (p50, p99). Parts become visible at the
  next checkpoint; that delay is delivery, not processing, and is not counted.

Needs Flink's environment ($PPML_FLINK_PYTHON or `ppml flink setup`), Java and redis-server.
Ends with ``RESULT flink_stream enc_vs_plain=... p99_enc_vs_plain=... startup_s=...``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ppml.serving.redis_server import RedisServer

ROOT = Path(__file__).resolve().parents[1]
JOB = Path(__file__).resolve().parent / "flink_job.py"
PASSPHRASE = "benchmark passphrase 0123"


def ppml(home: Path, *args: str | Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PPML_HOME": str(home), "PPML_PASSPHRASE": PASSPHRASE}
    done = subprocess.run(
        [sys.executable, "-m", "ppml", *map(str, args)],
        capture_output=True, text=True, env=env, check=False, timeout=900,
    )  # fmt: skip
    if check and done.returncode != 0:
        raise SystemExit(f"ppml {' '.join(map(str, args))} failed:\n{done.stdout}{done.stderr}")
    return done


def record(rnd: random.Random, phase: str) -> dict[str, object]:
    return {
        "card": f"card-{rnd.randrange(50)}",
        "amount_cents": rnd.randrange(1, 100_000),
        "phase": phase,
        "produced_ms": int(time.time() * 1000),
    }


class Feed:
    """Appends records to a stream: sealed (ppml) or as plain JSON."""

    def __init__(self, ws: Path, port: int, ca: Path, files: Path, password: str) -> None:
        import redis

        from ppml.data.payload import PayloadCodec
        from ppml.data.secret_file import read_secret_file
        from ppml.workspace import Workspace

        keys = Workspace.open(ws, PASSPHRASE.encode()).key_service()
        self.codec = PayloadCodec(read_secret_file(files / "payload-key.enc", keys), "bench")
        keys.close()
        self.client = redis.Redis(
            host="127.0.0.1", port=port, password=password, ssl=True, ssl_ca_certs=str(ca),
            ssl_cert_reqs="required",
        )  # fmt: skip

    def add(self, stream: str, sealed: bool, records: list[dict[str, object]]) -> None:
        import uuid

        from ppml.engines.flink.records import seal_record

        pipe = self.client.pipeline(transaction=False)
        for r in records:
            text = json.dumps(r)
            rid = uuid.uuid4().hex
            payload = seal_record(self.codec, rid, text) if sealed else text.encode()
            pipe.xadd(stream, {"id": rid, "payload": payload})
        pipe.execute()


def results(ws: Path, out: Path, sealed: bool) -> list[dict[str, object]]:
    lines: list[str] = []
    for part in sorted(p for p in out.rglob("*") if p.is_file() and not p.name.startswith(".")):
        if sealed:
            plain = part.with_name("." + part.name + ".txt")
            ppml(ws, "decrypt", part, "-o", plain)
            lines += plain.read_text().splitlines()
            plain.unlink()
        else:
            lines += part.read_text().splitlines()
    return [json.loads(line) for line in lines if line]


def run_mode(
    ws: Path, work: Path, feed: Feed, mode: str, args: argparse.Namespace, common: list[str]
) -> tuple[float, float, float]:
    sealed = mode == "ppml"
    stream = f"tx-{mode}"
    rnd = random.Random(1)
    feed.add(stream, sealed, [record(rnd, "bulk") for _ in range(args.records)])
    out = work / f"out-{mode}"
    extra = (
        ["--payload-key-file", work / "files" / "payload-key.enc",
         "--redis-password-file", work / "files" / "password.enc"]
        if sealed else ["--password-file", work / "files" / "password"]
    )  # fmt: skip
    stop = threading.Event()

    def live() -> None:
        while not stop.is_set():
            feed.add(stream, sealed, [record(rnd, "live")])
            stop.wait(1.0 / args.rate)

    producer = threading.Thread(target=live, daemon=True)
    producer.start()
    try:
        ppml(ws, "flink", "run", "--local", JOB, mode, out, "--stream", stream, *common, *extra)
    finally:
        stop.set()
        producer.join()
    rows = results(ws, out, sealed)
    bulk = [r for r in rows if r["phase"] == "bulk"]
    if len(bulk) != args.records:
        raise SystemExit(f"{mode}: {len(bulk)} of {args.records} bulk results")
    first = min(int(r["at_ms"]) for r in bulk)  # type: ignore[call-overload]
    last = max(int(r["at_ms"]) for r in bulk)  # type: ignore[call-overload]
    rate = (len(bulk) - 1) / max((last - first) / 1000, 1e-3)
    latencies = sorted(
        int(r["at_ms"]) - int(r["produced_ms"])  # type: ignore[call-overload]
        for r in rows
        if r["phase"] == "live" and int(r["produced_ms"]) > last + 500  # type: ignore[call-overload]
    )
    if len(latencies) < 20:
        raise SystemExit(f"{mode}: only {len(latencies)} live records to time (run longer)")
    p50 = statistics.median(latencies)
    p99 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))]
    print(f"{mode:6} {rate:10,.0f} records/s   latency p50 {p50:6.0f} ms   p99 {p99:6.0f} ms"
          f"   ({len(bulk)} bulk, {len(latencies)} live timed)")  # fmt: skip
    return rate, p50, p99


def startup(ws: Path) -> float:
    begin = time.perf_counter()
    ppml(ws, "flink", "cluster", "up", "--taskmanagers", "1")
    took = time.perf_counter() - begin
    ppml(ws, "flink", "cluster", "down")
    print(f"cluster start-up (JobManager + 1 TaskManager, mutual TLS): {took:.1f} s")
    return took


def prepare(work: Path) -> tuple[Path, RedisServer, Path, str]:
    from ppml.serving.redis_server import redis_password, start_redis
    from ppml.workspace import Workspace

    ws = work / "ws"
    ppml(ws, "init", "--dev", "-w", ws)
    for key in ("sales", "bench"):
        ppml(ws, "key", "create", key)
    opened = Workspace.open(ws, PASSPHRASE.encode())
    server = start_redis(opened)
    files = work / "files"
    files.mkdir()
    password = redis_password(opened)
    for name, secret in (("password", password.encode()), ("payload-key", os.urandom(32))):
        (files / name).write_bytes(secret)
        (files / name).chmod(0o600)
        ppml(ws, "encrypt", files / name, "-o", files / f"{name}.enc", "--key", "sales")
    return ws, server, opened.ca_cert, password


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=20_000, help="bulk records per mode")
    parser.add_argument("--rate", type=float, default=100.0, help="live records per second")
    parser.add_argument("--live-seconds", type=float, default=40.0, help="how long a job runs")
    parser.add_argument("--dir", type=Path, default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="flink-bench-") as tmp:
        work = Path(tmp)
        ws, server, ca, _password = prepare(work)
        feed = Feed(ws, server.port, ca, work / "files", _password)
        common = ["--redis-port", str(server.port), "--redis-ca", str(ca),
                  "--seconds", str(args.live_seconds)]  # fmt: skip
        try:
            plain = run_mode(ws, work, feed, "plain", args, common)
            enc = run_mode(ws, work, feed, "ppml", args, common)
            took = startup(ws)
        finally:
            server.stop()
    ratio, p99_ratio = enc[0] / plain[0], enc[2] / plain[2]
    print(f"encrypted / plaintext: throughput {ratio:.2f}x, p99 latency {p99_ratio:.2f}x")
    print(f"RESULT flink_stream enc_vs_plain={ratio:.3f} p99_enc_vs_plain={p99_ratio:.3f} "
          f"startup_s={took:.1f}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
