"""The file commands end to end: real `ppml` processes, a real workspace, real files."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from cli_support import PASSPHRASE, run_ppml
from tests.support import locked_directory

PEOPLE = b"name,age\nMichael,\nAndy,30\nJustin,19\n"


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    ws = tmp_path_factory.mktemp("ws") / "workspace"
    assert run_ppml("init", "--dir", ws).code == 0
    for name in ("sales", "pii", "other"):
        assert run_ppml("key", "create", name, home=ws).code == 0
    return ws


def _no_leftovers(directory: Path) -> None:
    assert [p.name for p in directory.iterdir() if p.name.startswith(".")] == []


def _encrypted(home: Path, tmp_path: Path, data: bytes = PEOPLE, name: str = "people.csv") -> Path:
    src = tmp_path / name
    src.write_bytes(data)
    enc = tmp_path / f"{name}.ppml"
    r = run_ppml("encrypt", src, "-o", enc, "--key", "sales", "--segment-size", "16", home=home)
    assert r.code == 0, r.err
    return enc


def test_round_trip_and_inspect(home: Path, tmp_path: Path) -> None:
    enc = _encrypted(home, tmp_path)
    assert b"Justin" not in enc.read_bytes()
    r = run_ppml("inspect", enc, "--format", "json")  # no workspace, no passphrase needed
    assert r.code == 0, r.err
    info = json.loads(r.out)
    assert info["key_name"] == "sales" and info["key_version"] == 1
    assert info["content_type"] == "csv" and info["plaintext_bytes"] == len(PEOPLE)
    assert info["segments"] == 3
    out = tmp_path / "out.csv"
    r = run_ppml("decrypt", enc, "-o", out, home=home)
    assert r.code == 0, r.err
    assert out.read_bytes() == PEOPLE


@pytest.mark.parametrize(
    "damage",
    ["flip-body", "flip-header", "truncate", "extend", "cut-segment"],
)
def test_damaged_files_exit_3_and_leave_nothing(home: Path, tmp_path: Path, damage: str) -> None:
    enc = _encrypted(home, tmp_path)
    blob = bytearray(enc.read_bytes())
    if damage == "flip-body":
        blob[-20] ^= 0x40
    elif damage == "flip-header":
        blob[20] ^= 0x01  # inside the salt
    elif damage == "truncate":
        del blob[-1:]
    elif damage == "extend":
        blob += b"\x00"
    else:
        del blob[-(16 + 4) :]  # drop the short last segment whole
    enc.write_bytes(bytes(blob))
    out = tmp_path / "out.csv"
    r = run_ppml("decrypt", enc, "-o", out, home=home)
    assert r.code == 3
    assert r.err.strip() == f"ppml: {enc}: integrity error: integrity check failed"
    assert len(r.err.strip().splitlines()) == 1
    assert not out.exists()
    _no_leftovers(tmp_path)


def test_garbage_header_and_plain_file(home: Path, tmp_path: Path) -> None:
    plain = tmp_path / "plain.csv"
    plain.write_bytes(PEOPLE)
    r = run_ppml("decrypt", plain, "-o", tmp_path / "x", home=home)
    assert r.code == 2 and "not a ppml encrypted file" in r.err and str(plain) in r.err
    garbage = tmp_path / "garbage.ppml"
    garbage.write_bytes(b"\x89PPML\r\n\x1a" + os.urandom(40))
    r = run_ppml("decrypt", garbage, "-o", tmp_path / "y", home=home)
    assert r.code == 3 and "integrity" in r.err
    r = run_ppml("inspect", garbage)
    assert r.code == 3
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_unknown_key_version_in_a_header_is_a_key_error(home: Path, tmp_path: Path) -> None:
    enc = _encrypted(home, tmp_path)
    header = json.loads(run_ppml("inspect", enc, "--format", "json").out)
    blob = bytearray(enc.read_bytes())
    name_len = blob[55]
    blob[56 + name_len : 60 + name_len] = (99).to_bytes(4, "big")  # the mutable key version
    enc.write_bytes(bytes(blob))
    assert header["key_version"] == 1
    r = run_ppml("decrypt", enc, "-o", tmp_path / "out", home=home)
    assert r.code == 4 and "version" in r.err and str(enc) in r.err
    assert not (tmp_path / "out").exists()


def test_bad_requests(home: Path, tmp_path: Path) -> None:
    src = tmp_path / "people.csv"
    src.write_bytes(PEOPLE)
    out = tmp_path / "out.ppml"
    r = run_ppml("encrypt", src, "-o", out, "--key", "nope", home=home)
    assert r.code == 4 and "nope" in r.err
    r = run_ppml("encrypt", tmp_path / "missing.csv", "-o", out, "--key", "sales", home=home)
    assert r.code == 2 and "missing.csv" in r.err
    r = run_ppml("decrypt", tmp_path, "-o", tmp_path / "d", home=home)  # dir of plain files
    assert r.code == 2
    r = run_ppml("encrypt", src, "-o", out, "--key", "sales", home=home, passphrase="wrong")
    assert r.code == 4 and "wrong passphrase" in r.err
    r = run_ppml("encrypt", src, "-o", out, "--key", "sales", home=home, passphrase=None)
    assert r.code == 5 and "PPML_PASSPHRASE" in r.err
    r = run_ppml("encrypt", src, "-o", out, "--key", "sales", home=tmp_path / "nows")
    assert r.code == 5 and "ppml init" in r.err
    assert not out.exists()
    out.write_bytes(b"keep")
    r = run_ppml("encrypt", src, "-o", out, "--key", "sales", home=home)
    assert r.code == 2 and "--force" in r.err and out.read_bytes() == b"keep"
    assert run_ppml("encrypt", src, "-o", out, "--key", "sales", "--force", home=home).code == 0
    with locked_directory(tmp_path / "locked") as locked:
        r = run_ppml("encrypt", src, "-o", locked / "x.ppml", "--key", "sales", home=home)
        assert r.code == 2 and "locked" in r.err
        assert list(locked.iterdir()) == []
    _no_leftovers(tmp_path)


def test_passphrase_file(home: Path, tmp_path: Path) -> None:
    pf = tmp_path / "pass"
    pf.write_text(PASSPHRASE + "\n")
    pf.chmod(0o600)
    r = run_ppml("key", "list", "--passphrase-file", pf, home=home, passphrase=None)
    assert r.code == 0 and "sales" in r.out


def test_directories_round_trip(home: Path, tmp_path: Path) -> None:
    src = tmp_path / "parts"
    (src / "sub").mkdir(parents=True)
    (src / "part-0.csv").write_bytes(PEOPLE)
    (src / "sub" / "part-1.json").write_bytes(b'{"a":1}\n')
    enc = tmp_path / "enc"
    r = run_ppml("encrypt", src, "-o", enc, "--key", "sales", home=home)
    assert r.code == 0, r.err
    assert sorted(str(p.relative_to(enc)) for p in enc.rglob("*") if p.is_file()) == [
        "part-0.csv",
        "sub/part-1.json",
    ]
    dec = tmp_path / "dec"
    assert run_ppml("decrypt", enc, "-o", dec, home=home).code == 0
    assert (dec / "part-0.csv").read_bytes() == PEOPLE
    assert (dec / "sub" / "part-1.json").read_bytes() == b'{"a":1}\n'
    # One bad part: exit 3 and no output directory at all.
    bad = enc / "sub" / "part-1.json"
    bad.write_bytes(bad.read_bytes()[:-1])
    r = run_ppml("decrypt", enc, "-o", tmp_path / "dec2", home=home)
    assert r.code == 3 and "part-1.json" in r.err
    assert not (tmp_path / "dec2").exists()
    _no_leftovers(tmp_path)


def test_rotate_then_rewrap(home: Path, tmp_path: Path) -> None:
    assert run_ppml("key", "create", "rot", home=home).code == 0
    src = tmp_path / "a.txt"
    src.write_bytes(b"to be or not to be\n")
    enc = tmp_path / "a.txt.ppml"
    assert run_ppml("encrypt", src, "-o", enc, "--key", "rot", home=home).code == 0
    r = run_ppml("key", "rotate", "rot", "--format", "json", home=home)
    assert json.loads(r.out)["current_version"] == 2
    # Old files still decrypt after a rotation; new files use the new version.
    assert run_ppml("decrypt", enc, "-o", tmp_path / "a1", home=home).code == 0
    enc2 = tmp_path / "b.ppml"
    assert run_ppml("encrypt", src, "-o", enc2, "--key", "rot", home=home).code == 0
    assert json.loads(run_ppml("inspect", enc2, "--format", "json").out)["key_version"] == 2
    r = run_ppml("rewrap", tmp_path, home=home)
    assert r.code == 0, r.err
    assert "v1 -> v2" in r.out
    assert json.loads(run_ppml("inspect", enc, "--format", "json").out)["key_version"] == 2
    assert run_ppml("decrypt", enc, "-o", tmp_path / "a2", home=home).code == 0
    assert (tmp_path / "a2").read_bytes() == src.read_bytes()


def test_parquet_pme_through_the_cli(home: Path, tmp_path: Path) -> None:
    table = pa.table({"name": ["Michael", "Andy"], "ssn": ["123-45-6789", "987-65-4321"]})
    src = tmp_path / "people.parquet"
    pq.write_table(table, src)
    enc = tmp_path / "people.enc.parquet"
    r = run_ppml("encrypt", src, "-o", enc, "--key", "sales", "--column-key", "pii:ssn", home=home)
    assert r.code == 0, r.err
    assert enc.read_bytes()[:4] == b"PARE" and enc.read_bytes()[-4:] == b"PARE"
    assert b"123-45-6789" not in enc.read_bytes()
    with pytest.raises(Exception):
        pq.read_table(enc)
    info = json.loads(run_ppml("inspect", enc, "--format", "json").out)
    assert info["key_name"] == "sales"
    out = tmp_path / "out.parquet"
    assert run_ppml("decrypt", enc, "-o", out, home=home).code == 0
    assert pq.read_table(out).equals(table)
    # Rotation: `rewrap` re-encrypts PME files under the newest version (column keys kept).
    assert run_ppml("key", "create", "pq", home=home).code == 0
    enc2 = tmp_path / "pq.parquet"
    r = run_ppml("encrypt", src, "-o", enc2, "--key", "pq", "--column-key", "pii:ssn", home=home)
    assert r.code == 0, r.err
    assert run_ppml("key", "rotate", "pq", home=home).code == 0
    r = run_ppml("rewrap", enc2, home=home)
    assert r.code == 0 and "pq v1 -> v2 (re-encrypted)" in r.out, r.err
    assert json.loads(run_ppml("inspect", enc2, "--format", "json").out)["key_version"] == 2
    out2 = tmp_path / "out2.parquet"
    assert run_ppml("decrypt", enc2, "-o", out2, home=home).code == 0
    assert pq.read_table(out2).equals(table)


def _default_signals() -> None:
    """The command as a user's shell starts it: a test runner started in the background
    (`cmd &`, `nohup`) ignores SIGINT or SIGHUP, and a child inherits that."""
    for sig in (signal.SIGINT, signal.SIGHUP, signal.SIGTERM):
        signal.signal(sig, signal.SIG_DFL)


def _wait_for(predicate: object, proc: subprocess.Popen[bytes]) -> None:
    """Poll (without sleeping a fixed time) until `predicate()` holds or the process ended."""
    import time

    deadline = time.monotonic() + 60
    while not predicate():  # type: ignore[operator]
        assert proc.poll() is None, "ppml ended early"
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def _writing_into(pid: int, directory: Path) -> bool:
    """Whether process `pid` has a file in `directory` open (a named temporary, or one with no
    name yet: /proc shows it as ``directory/#inode (deleted)``)."""
    prefix = str(directory) + "/"
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except FileNotFoundError:
        return False
    for fd in fds:
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}").startswith(prefix):
                return True
        except OSError:
            continue
    return False


STOPS = {
    signal.SIGINT: (130, b"interrupted"),
    signal.SIGTERM: (143, b"terminated (SIGTERM)"),
    signal.SIGHUP: (129, b"terminated (SIGHUP)"),
    signal.SIGKILL: (-signal.SIGKILL, b""),
}


@pytest.mark.parametrize("sig", STOPS, ids=[s.name for s in STOPS])
@pytest.mark.parametrize("command", ["encrypt", "decrypt"])
def test_a_signal_leaves_nothing_partial(
    home: Path, tmp_path: Path, command: str, sig: signal.Signals
) -> None:
    """ppml reads from a FIFO that we feed slowly; the signal arrives mid-file, while the output
    is open. Ctrl-C, SIGTERM and SIGHUP clean up; SIGKILL cannot be handled, and the output,
    which has no name until it is complete, vanishes with the process."""
    fifo = tmp_path / "in.fifo"
    os.mkfifo(fifo)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    if command == "encrypt":
        payload = os.urandom(3 << 20)
        args = ["encrypt", str(fifo), "-o", str(out_dir / "x.ppml"), "--key", "sales"]
    else:
        enc = _encrypted(home, tmp_path, os.urandom(3 << 20), name="big.bin")
        payload = enc.read_bytes()
        args = ["decrypt", str(fifo), "-o", str(out_dir / "x.bin")]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PPML_")}
    env.update(PPML_HOME=str(home), PPML_PASSPHRASE=PASSPHRASE)
    proc = subprocess.Popen(
        [sys.executable, "-m", "ppml", *args],
        env=env,
        stderr=subprocess.PIPE,
        preexec_fn=_default_signals,
    )
    try:
        with open(fifo, "wb") as feed:
            feed.write(payload[: 2 << 20])  # two segments' worth, then stall
            feed.flush()
            _wait_for(lambda: _writing_into(proc.pid, out_dir), proc)  # the output is open
            proc.send_signal(sig)
            _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    code, message = STOPS[sig]
    assert proc.returncode == code
    assert message in err
    assert list(out_dir.iterdir()) == []


@pytest.fixture(scope="module")
def big_dir(home: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An encrypted directory: a small a.csv, then a 256 MiB b.bin (decrypting it takes long
    enough to stop the command in the middle)."""
    root = tmp_path_factory.mktemp("big")
    src = root / "plain"
    src.mkdir()
    (src / "a.csv").write_bytes(PEOPLE)
    with open(src / "b.bin", "wb") as fh:
        fh.truncate(256 << 20)
    assert run_ppml("encrypt", src, "-o", root / "enc", "--key", "sales", home=home).code == 0
    return root / "enc"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_a_killed_directory_decrypt_is_swept_by_the_next_run(
    home: Path, tmp_path: Path, big_dir: Path, sig: signal.Signals
) -> None:
    """A directory is decrypted into a hidden temporary directory beside the output; SIGTERM
    removes it, SIGKILL leaves it (with the files completed so far), and the next run into that
    folder removes it."""
    out_parent = tmp_path / "out"
    out_parent.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PPML_")}
    env.update(PPML_HOME=str(home), PPML_PASSPHRASE=PASSPHRASE)
    args = ["decrypt", str(big_dir), "-o", str(out_parent / "plain")]
    proc = subprocess.Popen(
        [sys.executable, "-m", "ppml", *args],
        env=env,
        stderr=subprocess.PIPE,
        preexec_fn=_default_signals,
    )
    try:
        _wait_for(lambda: any(out_parent.glob(".plain.ppml-*.tmp/a.csv")), proc)
        proc.send_signal(sig)
        proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    left = list(out_parent.iterdir())
    if sig == signal.SIGTERM:
        assert proc.returncode == 143
        assert left == []
        return
    # SIGKILL: the temporary directory stayed, holding a.csv's plaintext
    (leftover,) = left
    assert leftover.name.startswith(".plain.ppml-") and leftover.name.endswith(".tmp")
    assert (leftover / "a.csv").read_bytes() == PEOPLE
    enc = _encrypted(home, tmp_path, PEOPLE, name="c.csv")
    r = run_ppml("decrypt", enc, "-o", out_parent / "c.csv", home=home)
    assert r.code == 0, r.err
    assert [p.name for p in out_parent.iterdir()] == ["c.csv"]
    assert "left by an interrupted ppml" in r.err


def test_output_names_ppml_cannot_write_atomically_are_refused(home: Path, tmp_path: Path) -> None:
    enc = _encrypted(home, tmp_path)
    r = run_ppml("decrypt", enc, "-o", "-", home=home, cwd=tmp_path)
    assert r.code == 2 and "standard output" in r.err and "Traceback" not in r.err
    assert not (tmp_path / "-").exists()
    r = run_ppml("decrypt", enc, "-o", tmp_path / ("x" * 250), home=home)
    assert r.code == 2 and "output name too long" in r.err and "Traceback" not in r.err
    r = run_ppml("encrypt", enc, "-o", "-", "--key", "sales", home=home, cwd=tmp_path)
    assert r.code == 2 and "standard output" in r.err


def test_encrypting_a_directory_does_not_follow_symbolic_links(home: Path, tmp_path: Path) -> None:
    """A link in the tree could lead to any file of the machine: it is left out, and named."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "private.txt").write_text("not part of the data set")
    src = tmp_path / "data"
    (src / "sub").mkdir(parents=True)
    (src / "a.csv").write_bytes(PEOPLE)
    (src / "sub" / "b.csv").write_bytes(PEOPLE)
    (src / "leak.txt").symlink_to(outside / "private.txt")
    (src / "dirlink").symlink_to(outside, target_is_directory=True)
    r = run_ppml("encrypt", src, "-o", tmp_path / "enc", "--key", "sales", home=home)
    assert r.code == 0, r.err
    assert "left out 2 symbolic link(s)" in r.err
    written = sorted(str(p.relative_to(tmp_path / "enc")) for p in (tmp_path / "enc").rglob("*"))
    assert written == ["a.csv", "sub", "sub/b.csv"]


def test_plain_file_commands_import_only_what_they_use(home: Path, tmp_path: Path) -> None:
    """A plain `ppml encrypt` or `ppml decrypt` runs without typer (and the pydantic it
    builds its parsers with), the certificate machinery and the attestation verifiers: a script
    that loops over many files pays the command's fixed cost each time."""
    src, enc, out = tmp_path / "people.csv", tmp_path / "people.csv.ppml", tmp_path / "out.csv"
    src.write_bytes(PEOPLE)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PPML_")}
    env |= {"PPML_HOME": str(home), "PPML_PASSPHRASE": PASSPHRASE}
    for args in (["encrypt", src, "-o", enc, "--key", "sales"], ["decrypt", enc, "-o", out]):
        proc = subprocess.run(
            [sys.executable, "-X", "importtime", "-m", "ppml", *map(str, args)],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert proc.returncode == 0, proc.stderr
        imported = {
            line.rsplit("|", 1)[-1].strip()
            for line in proc.stderr.splitlines()
            if line.startswith("import time:")
        }
        assert "ppml.cli.files" in imported
        unwanted = ("typer", "pydantic", "rich", "cryptography.x509", "ssl", "ppml.kms.broker")
        assert [m for m in imported if m.startswith(unwanted)] == []
        assert [m for m in imported if m.startswith("ppml.attestation.")] == [
            "ppml.attestation.claims"  # the release policies' types
        ]
    assert out.read_bytes() == PEOPLE
