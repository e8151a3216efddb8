"""Several processes sharing one key store: versions stay distinct and the audit chain valid."""

from __future__ import annotations

import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ppml.crypto.envelope import WrappedKey
from ppml.kms import KeyService

MASTER = bytes(range(64, 96))
WORKERS = 3
ROUNDS = 12

# Each worker waits for the master key on stdin, which doubles as the start signal, so that
# all of them open the (not yet existing) store and write at the same time.
WORKER = r"""
import json, sys
from pathlib import Path
from ppml.errors import KeyExists
from ppml.kms import KeyService

path, me = Path(sys.argv[1]), sys.argv[2]
print("ready", flush=True)
master = bytes.fromhex(sys.stdin.readline().strip())
rotated, deks = [], []
with KeyService(path, master, actor=me) as kms:
    try:
        kms.create_key("shared")
    except KeyExists:
        pass
    kms.create_key(me)
    for _ in range(int(sys.argv[3])):
        rotated.append(kms.rotate("shared").current_version)
        dek = kms.generate_data_key("shared")
        deks.append([dek.wrapped.to_text(), dek.plaintext.hex()])
print(json.dumps({"rotated": rotated, "deks": deks}))
"""


def test_concurrent_writers_keep_versions_distinct_and_the_chain_valid(tmp_path: Path) -> None:
    db = tmp_path / "kms.db"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, str(db), f"worker-{i}", str(ROUNDS)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(WORKERS)
    ]
    for proc in procs:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    for proc in procs:
        assert proc.stdin is not None
        proc.stdin.write(MASTER.hex() + "\n")
        proc.stdin.flush()
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        results.append(json.loads(out))

    rotated = sorted(v for r in results for v in r["rotated"])
    assert rotated == list(range(2, 2 + WORKERS * ROUNDS))
    with KeyService(db, MASTER) as kms:
        info = kms.describe("shared")
        assert [v.version for v in info.versions] == list(range(1, 2 + WORKERS * ROUNDS))
        assert sorted(k.name for k in kms.list_keys()) == ["shared"] + [
            f"worker-{i}" for i in range(WORKERS)
        ]
        for result in results:
            for text, plaintext in result["deks"]:
                assert kms.unwrap(WrappedKey.from_text(text)).hex() == plaintext
        unwraps = WORKERS * ROUNDS
        verification = kms.audit.verify()
        assert verification.ok, verification.reason
        assert verification.count == WORKERS * (2 + 2 * ROUNDS) + unwraps
        creates = [e for e in kms.audit.entries(key_name="shared") if e.op == "create"]
        assert sorted(e.outcome for e in creates) == ["denied"] * (WORKERS - 1) + ["ok"]


def test_threads_can_share_one_service(tmp_path: Path) -> None:
    with KeyService(tmp_path / "kms.db", MASTER) as kms:
        kms.create_key("shared")
        with ThreadPoolExecutor(max_workers=4) as pool:
            versions = list(pool.map(lambda _: kms.rotate("shared").current_version, range(20)))
        assert sorted(versions) == list(range(2, 22))
        assert kms.audit.verify().count == 21
