"""Attested runs tried as an attacker would: each way a workload or a planted file could reach
an owner secret or run unmeasured code under a measurement that a policy allows.

Every test drives the real `ppml` command (a real workspace, the real launcher serving TLS on
loopback, the real sandbox) and asserts that the attack either runs the measured code only or
is refused."""

from __future__ import annotations

import json
import os
import py_compile
import re
import shutil
import sys
import textwrap
from pathlib import Path

import pytest
from cli_support import PASSPHRASE, run_ppml

PY = sys.executable
READER = """\
import ppml
table = ppml.read_table("people.csv")
print("rows", table.num_rows)
"""


@pytest.fixture(scope="module")
def ws(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("attacks")
    ws = d / "ws"
    assert run_ppml("init", "--dev", "--dir", ws).code == 0
    assert run_ppml("key", "create", "sales", home=ws).code == 0
    return ws


@pytest.fixture
def project(ws: Path, tmp_path: Path) -> Path:
    """A fresh project directory holding an encrypted people.csv."""
    plain = tmp_path / "plain.csv"
    plain.write_text("name,age\nMichael,29\nAndy,30\nJustin,19\n")
    d = tmp_path / "project"
    d.mkdir()
    assert run_ppml("encrypt", plain, "-o", d / "people.csv", "-k", "sales", home=ws).code == 0
    plain.unlink()
    return d


def measure(project: Path, *command: str, extra: tuple[str, ...] = ()) -> str:
    r = run_ppml("measure", *extra, "--", *command, cwd=project)
    assert r.code == 0, r.err
    line = r.out.splitlines()[0]
    assert re.fullmatch(r"[0-9a-f]{96}", line)
    return line


def allow(ws: Path, measurement: str) -> None:
    r = run_ppml("policy", "allow", "sales", "--tee", "sim", "--measurement", measurement, home=ws)
    assert r.code == 0, r.err


def run(ws: Path, project: Path, *command: str, options: tuple[str, ...] = ()) -> tuple[int, str]:
    r = run_ppml("run", "--tee", "sim", *options, "--", *command, home=ws, cwd=project)
    return r.code, r.out + r.err


# -- 1. no owner secret within the workload's reach ---------------------------------------------

THIEF = """\
import json, os, sys
needles = [n.encode() for n in json.loads(sys.argv[1])]
found = []
for pid in (p for p in os.listdir("/proc") if p.isdigit() and int(p) != os.getpid()):
    for name in ("environ", "cmdline", "mem", "maps"):
        try:
            data = open(f"/proc/{pid}/{name}", "rb").read(1 << 22)
        except OSError:
            continue
        found += [f"{pid}/{name}" for n in needles if n in data]
for name, value in os.environ.items():
    found += [f"env {name}" for n in needles if n in value.encode()]
ws = json.loads(sys.argv[2])
for root, _dirs, files in os.walk(ws):
    for f in files:
        try:
            path = os.path.join(root, f)
            found.append("file " + path + " " + open(path, "rb").read(8).hex())
        except OSError:
            pass
for path in json.loads(sys.argv[3]):
    try:
        data = open(path, "rb").read()
        if data:
            found.append("passphrase file " + path)
    except OSError:
        pass
pids = sorted(int(p) for p in os.listdir("/proc") if p.isdigit())
print(json.dumps({"found": found, "pids": pids}))
"""


@pytest.mark.parametrize("via", ["environment", "file"])
def test_the_workload_finds_no_owner_secret_anywhere(
    ws: Path, project: Path, tmp_path: Path, via: str
) -> None:
    """The launcher's /proc entries, the environment, the workspace's files, the passphrase
    file: none gives the workload the passphrase, the workspace path or a key."""
    (project / "thief.py").write_text(THIEF)
    passfile = tmp_path / "secret" / "passphrase.txt"
    passfile.parent.mkdir()
    passfile.write_text(PASSPHRASE + "\n")
    needles = [PASSPHRASE, str(ws), str(passfile)]
    args = ["thief.py", json.dumps(needles), json.dumps(str(ws)), json.dumps([str(passfile)])]
    options: tuple[str, ...] = ()
    env_passphrase: str | None = PASSPHRASE
    if via == "file":
        options, env_passphrase = ("--passphrase-file", str(passfile)), None
    r = run_ppml(
        "run", "--tee", "sim", *options, "--", PY, *args,
        home=ws, cwd=project, passphrase=env_passphrase,
    )  # fmt: skip
    assert r.code == 0, r.err
    report = json.loads(r.out.strip().splitlines()[-1])
    assert report["found"] == []
    assert report["pids"] == [1, 2]  # the sandbox's init and the workload: nothing else


def test_the_admin_credentials_cannot_be_used_from_the_workload(ws: Path, project: Path) -> None:
    """The client certificate that makes a caller administrator of the loopback KMS lives in
    the workspace, which the workload sees as an empty directory (or not at all: here it lies
    in /tmp, and the workload's /tmp is its own)."""
    (project / "admin.py").write_text(
        textwrap.dedent(
            """\
            import os, sys
            ws = sys.argv[1]
            print(sorted(os.listdir(ws)) if os.path.isdir(ws) else [])
            for name in ("tls/client-key.pem", "tls/server-key.pem", "kms.sqlite", "config.toml"):
                print(name, os.path.exists(os.path.join(ws, name)))
            """
        )
    )
    code, out = run(ws, project, PY, "admin.py", str(ws))
    assert code == 0, out
    assert "[]" in out and "True" not in out


# -- 2. every command form measured completely, or refused ---------------------------------------


def test_a_script_after_interpreter_flags_is_measured_and_pinned(ws: Path, project: Path) -> None:
    (project / "job.py").write_text(READER)
    allow(ws, measure(project, PY, "-u", "-X", "utf8", "job.py"))
    code, out = run(ws, project, PY, "-u", "-X", "utf8", "job.py")
    assert code == 0 and "rows 3" in out, out
    (project / "job.py").write_text(READER + "print('changed')\n")
    code, out = run(ws, project, PY, "-u", "-X", "utf8", "job.py")
    assert code != 0 and "access denied" in out


def test_a_local_module_run_with_m_is_measured(ws: Path, project: Path) -> None:
    (project / "job.py").write_text("import helper\n" + READER)
    (project / "helper.py").write_text("VALUE = 1\n")
    allow(ws, measure(project, PY, "-m", "job"))
    code, out = run(ws, project, PY, "-m", "job")
    assert code == 0 and "rows 3" in out, out
    (project / "helper.py").write_text("VALUE = 2\n")
    code, out = run(ws, project, PY, "-m", "job")
    assert code != 0 and "access denied" in out  # another measurement: no key


def test_a_planted_ppml_package_does_not_replace_ppml_in_an_attested_query(
    ws: Path, project: Path
) -> None:
    args = ["sql", "SELECT count(*) AS n FROM t", "-t", "t=people.csv", "--format", "json"]
    r = run_ppml(*args, "--measure", cwd=project)
    assert r.code == 0, r.err
    allow(ws, r.out.splitlines()[0])
    (project / "ppml").mkdir()
    (project / "ppml" / "__init__.py").write_text("print('PLANTED'); import sys; sys.exit(0)\n")
    (project / "ppml" / "__main__.py").write_text("print('PLANTED')\n")
    # The owner's own command runs isolated here (`python -m` would take ./ppml itself; the
    # installed `ppml` script does not); the attested child's working directory is the project.
    again = run_ppml(*args, "--measure", cwd=project, isolated=True)
    assert again.out.splitlines()[0] == r.out.splitlines()[0]
    r = run_ppml(*args, "--tee", "sim", home=ws, cwd=project, isolated=True)
    assert r.code == 0, r.err
    assert "PLANTED" not in r.out + r.err
    assert json.loads(r.out.splitlines()[0]) == {"n": 3}


def test_a_shell_script_is_measured_and_runs_only_measured_python(ws: Path, project: Path) -> None:
    (project / "job.py").write_text(READER)
    (project / "job.sh").write_text(f"set -e\n{PY} job.py\n")
    allow(ws, measure(project, "bash", "job.sh", extra=("--trusted", str(project / "job.py"))))
    code, out = run(ws, project, "bash", "job.sh", options=("--trusted", str(project / "job.py")))
    assert code == 0 and "rows 3" in out, out
    # The same script without job.py measured: Python refuses to run an unmeasured script.
    allow(ws, measure(project, "bash", "job.sh"))
    code, out = run(ws, project, "bash", "job.sh")
    assert code != 0 and "job.py is not a measured file" in out and "rows" not in out
    (project / "job.sh").write_text(f"set -e\n{PY} job.py\necho changed\n")
    code, out = run(ws, project, "bash", "job.sh", options=("--trusted", str(project / "job.py")))
    assert code != 0 and "access denied" in out


def test_env_resolves_to_the_program_it_names(ws: Path, project: Path) -> None:
    (project / "job.py").write_text(READER)
    assert measure(project, "/usr/bin/env", PY, "job.py") == measure(project, PY, "job.py")


@pytest.mark.parametrize(
    ("command", "message"),
    [
        ((PY,), "standard input"),
        ((PY, "-"), "standard input"),
        ((PY, "-i", "job.py"), "-i reads code"),
        ((PY, "-S", "job.py"), "import guard"),
        ((PY, "-X", "pycache_prefix=/tmp/x", "job.py"), "-X pycache_prefix"),
        ((PY, "--check-hash-based-pycs", "never", "job.py"), "bytecode caches"),
        (("bash",), "standard input"),
        (("bash", "--rcfile", "x", "job.sh"), "other files"),
        (("/usr/bin/env", "-i", PY, "job.py"), "--env NAME=VALUE"),
        (("java", "-jar", "app.jar"), "cannot measure the code that java loads"),
    ],
)
def test_forms_that_cannot_be_measured_are_refused(
    project: Path, command: tuple[str, ...], message: str
) -> None:
    (project / "job.py").write_text(READER)
    (project / "job.sh").write_text("true\n")
    if command[0] == "java" and shutil.which("java") is None:
        pytest.skip("no java on PATH to resolve")
    r = run_ppml("measure", "--", *command, cwd=project)
    assert r.code == 2 and message in r.err, r.err


def test_a_shim_is_refused(project: Path, tmp_path: Path) -> None:
    """A pyenv-style shim picks the interpreter from the working directory (.python-version):
    ppml refuses it and says to name the interpreter."""
    shims = tmp_path / "shims"
    shims.mkdir()
    shim = shims / "python"
    shim.write_text('#!/usr/bin/env bash\nexec "$(pyenv which python)" "$@"\n')
    shim.chmod(0o755)
    (project / "job.py").write_text(READER)
    r = run_ppml("measure", "--", str(shim), "job.py", cwd=project)
    assert r.code == 2 and "shim" in r.err and "pyenv which python" in r.err


# -- 3. Python loads only measured files -----------------------------------------------------------


def _helper_project(ws: Path, project: Path) -> None:
    (project / "job.py").write_text("import helper\nprint('helper', helper.VALUE)\n" + READER)
    (project / "helper.py").write_text("VALUE = 'measured'\n")
    allow(ws, measure(project, PY, "job.py"))


def test_a_package_planted_beside_a_measured_module_is_refused(ws: Path, project: Path) -> None:
    _helper_project(ws, project)
    (project / "helper").mkdir()
    (project / "helper" / "__init__.py").write_text("VALUE = 'PLANTED'\n")
    code, out = run(ws, project, PY, "job.py")
    assert code != 0 and "PLANTED" not in out and "refused to import helper" in out


def test_an_extension_module_planted_beside_a_measured_module_is_refused(
    ws: Path, project: Path
) -> None:
    import importlib.machinery

    _helper_project(ws, project)
    suffix = importlib.machinery.EXTENSION_SUFFIXES[0]
    (project / f"helper{suffix}").write_bytes(b"\x7fELF not really")
    code, out = run(ws, project, PY, "job.py")
    assert code != 0 and "refused to import helper" in out


def test_a_forged_bytecode_cache_is_never_read(ws: Path, project: Path) -> None:
    _helper_project(ws, project)
    source = project / "helper.py"
    forged_source = project / "forged.py"
    forged_source.write_text("VALUE = 'FORGED'\n".ljust(len(source.read_text())))
    cache = project / "__pycache__" / f"helper.{sys.implementation.cache_tag}.pyc"
    cache.parent.mkdir()
    st = source.stat()
    os.utime(forged_source, ns=(st.st_atime_ns, st.st_mtime_ns))
    py_compile.compile(str(forged_source), cfile=str(cache), dfile=str(source))
    forged_source.unlink()
    code, out = run(ws, project, PY, "job.py")
    assert code == 0, out
    assert "helper measured" in out and "FORGED" not in out


def test_a_module_named_like_a_library_one_is_refused(ws: Path, project: Path) -> None:
    """pyarrow.py beside the script: ppml imports pyarrow, the script does not, so the planted
    file is not measured and the guard refuses it."""
    (project / "job.py").write_text(READER)
    allow(ws, measure(project, PY, "job.py"))
    (project / "pyarrow.py").write_text("print('PLANTED')\n")
    code, out = run(ws, project, PY, "job.py")
    assert code != 0 and "PLANTED" not in out and "refused to import pyarrow" in out


def test_a_sitecustomize_beside_the_script_does_not_run(ws: Path, project: Path) -> None:
    (project / "job.py").write_text(READER)
    allow(ws, measure(project, PY, "job.py"))
    (project / "sitecustomize.py").write_text("print('PLANTED')\n")
    (project / "usercustomize.py").write_text("print('PLANTED')\n")
    code, out = run(ws, project, PY, "job.py")
    assert code == 0 and "rows 3" in out and "PLANTED" not in out


def test_dynamic_imports_and_files_run_by_path_are_guarded(ws: Path, project: Path) -> None:
    (project / "job.py").write_text(
        textwrap.dedent(
            """\
            import importlib, runpy, sys
            for attempt in (
                lambda: importlib.import_module("plug" + "in"),
                lambda: __import__("plugin"),
                lambda: runpy.run_path("plugin.py"),
                lambda: exec(compile(open("plugin.py").read(), "plugin.py", "exec")),
            ):
                try:
                    attempt()
                    print("RAN")
                except (ImportError, RuntimeError) as exc:
                    print("refused:", exc)
            """
        )
    )
    (project / "plugin.py").write_text("print('PLANTED')\n")
    allow(ws, measure(project, PY, "job.py"))
    code, out = run(ws, project, PY, "job.py")
    assert code == 0, out
    assert out.count("refused:") == 4 and "PLANTED" not in out and "RAN" not in out


def test_a_pth_file_added_to_site_packages_changes_the_measurement(ws: Path, project: Path) -> None:
    import sysconfig

    (project / "job.py").write_text(READER)
    before = measure(project, PY, "job.py")
    allow(ws, before)
    pth = Path(sysconfig.get_paths()["purelib"]) / "zz-ppml-attack-test.pth"
    try:
        pth.write_text("/nonexistent/planted\n")
        assert measure(project, PY, "job.py") != before
        code, out = run(ws, project, PY, "job.py")
        assert code != 0 and "access denied" in out
    finally:
        pth.unlink(missing_ok=True)
    assert measure(project, PY, "job.py") == before


# -- 5. the environment: an allow-list of names whose values are measured -------------------------

REFUSED = [
    "LD_AUDIT",
    "LD_PRELOAD",
    "GCONV_PATH",
    "PYTHONUSERBASE",
    "PYTHONWARNINGS",
    "PYTHONPYCACHEPREFIX",
    "PYTHONPATH",
    "BASH_ENV",
    "JAVA_TOOL_OPTIONS",
    "PPML_HOME",
]


@pytest.mark.parametrize("name", REFUSED)
def test_variables_that_change_which_code_runs_are_refused(project: Path, name: str) -> None:
    (project / "job.py").write_text(READER)
    for item in (name, f"{name}=/tmp/evil"):
        r = run_ppml("measure", "--env", item, "--", PY, "job.py", cwd=project)
        assert r.code == 2 and "can change which code runs" in r.err, r.err


def test_values_are_measured_and_the_user_site_is_off(ws: Path, project: Path) -> None:
    (project / "job.py").write_text(
        "import os, site, sys\nprint(os.environ.get('MODE'), site.ENABLE_USER_SITE, "
        "sys.flags.no_user_site)\n"
    )
    one = measure(project, PY, "job.py", extra=("--env", "MODE=one"))
    two = measure(project, PY, "job.py", extra=("--env", "MODE=two"))
    assert one != two
    code, out = run(ws, project, PY, "job.py", options=("--env", "MODE=one"))
    assert code == 0 and "one False 1" in out, out


# -- 6. the workspace profile is sealed ----------------------------------------------------------


def test_editing_config_toml_does_not_turn_production_into_dev(tmp_path: Path) -> None:
    prod = tmp_path / "prod"
    assert run_ppml("init", "--dir", prod).code == 0
    config = prod / "config.toml"
    config.write_text(config.read_text().replace('profile = "production"', 'profile = "dev"'))
    assert 'profile = "dev"' in config.read_text()
    r = run_ppml("policy", "allow", "k", "--tee", "sim", "--measurement", "ab" * 48, home=prod)
    assert r.code != 0
    (tmp_path / "job.py").write_text("print('ran')\n")
    r = run_ppml("run", "--tee", "sim", "--", PY, "job.py", home=prod, cwd=tmp_path)
    assert r.code == 5 and "development workspace" in r.err and "ran" not in r.out
    from ppml.workspace import Workspace

    opened = Workspace.open(prod, PASSPHRASE.encode())
    assert opened.profile == "production" and not opened.dev
    assert opened.describe()["profile"] == "production"


def test_a_stricter_config_toml_is_honoured(tmp_path: Path) -> None:
    from ppml.workspace import Workspace

    dev = tmp_path / "dev"
    assert run_ppml("init", "--dev", "--dir", dev).code == 0
    assert Workspace.open(dev, PASSPHRASE.encode()).dev
    config = dev / "config.toml"
    config.write_text(config.read_text().replace('profile = "dev"', 'profile = "production"'))
    assert not Workspace.open(dev, PASSPHRASE.encode()).dev


# -- 4. time of check, time of use -----------------------------------------------------------------


def test_a_script_swapped_after_measurement_never_runs(
    ws: Path, project: Path, tmp_path: Path
) -> None:
    """The launcher measures a private copy and mounts that copy over the script: replacing the
    script between measurement and start changes nothing."""
    from ppml.attestation.sim import SimPlatform
    from ppml.cli._attested import loopback_services
    from ppml.tee import launcher
    from ppml.tee.manifest import build_manifest
    from ppml.workspace import Workspace

    script = project / "job.py"
    script.write_text(READER)
    opened = Workspace.open(ws, PASSPHRASE.encode())
    platform = SimPlatform(opened.sim_platform_key())
    log = tmp_path / "out.log"
    with launcher.prepared_run(ws / "run") as run_dir:
        manifest = build_manifest([PY, str(script)], snapshot=run_dir.snapshot)
        allow(ws, manifest.measurement())
        script.write_text("print('SWAPPED')\n" + READER)  # after the measurement
        with loopback_services(opened, "sim:toctou", None) as url, open(log, "wb") as out:
            started = launcher.start(
                manifest,
                run_dir,
                tee="sim",
                quote=lambda rd: platform.quote(manifest.measurement(), rd),
                kms_url=url,
                ca_pem=opened.ca_cert.read_text(),
                isolation=launcher.Isolation(hidden=(ws,)),
                cwd=project,
                stdout=out,
                stderr=out,
            )
            assert started.wait() == 0, log.read_text()
    assert "rows 3" in log.read_text() and "SWAPPED" not in log.read_text()
    assert not run_dir.path.exists()


def test_the_workspace_is_never_a_data_directory(ws: Path, project: Path) -> None:
    (project / "job.py").write_text(READER)
    for data in (ws, ws / "tls"):
        code, out = run(ws, project, PY, "job.py", options=("--data", str(data)))
        assert code == 2 and "never visible to a workload" in out


# -- what the launcher copies: only regular files of code -----------------------------------------


def test_a_symbolic_link_cannot_make_the_launcher_copy_a_secret(ws: Path, project: Path) -> None:
    """A "local module" or --trusted file that is a symbolic link into the workspace, to the
    launcher's own /proc entries, or a FIFO: refused before anything is copied or measured."""
    (project / "job.py").write_text(READER)
    (project / "helper.py").symlink_to(ws / "tls" / "client-key.pem")
    for command in ((PY, "-m", "helper"), (PY, "job.py")):
        options = () if command[1] == "-m" else ("--trusted", str(project / "helper.py"))
        code, out = run(ws, project, *command, options=options)
        assert code == 2 and "inside the workspace" in out, out
        r = run_ppml("measure", *options, "--", *command, home=ws, cwd=project)
        assert r.code == 2 and "inside the workspace" in r.err, r.err
    (project / "helper.py").unlink()
    (project / "environ").symlink_to("/proc/self/environ")
    code, out = run(ws, project, PY, "job.py", options=("--trusted", str(project / "environ")))
    assert code == 2 and "file of the kernel" in out, out
    os.mkfifo(project / "pipe.py")
    code, out = run(ws, project, PY, "job.py", options=("--trusted", str(project / "pipe.py")))
    assert code != 0 and "rows" not in out
    assert not list((ws / "run").glob("run-*/snapshot/*"))


def test_a_shell_script_starting_python_isolated_is_what_was_measured(
    ws: Path, project: Path
) -> None:
    """The guard reaches the Python programs that inherit the workload's variables. A measured
    shell script that starts `python -I` on purpose runs that interpreter without the guard:
    the measurement covers that line, and a change to it changes the measurement."""
    (project / "job.py").write_text(READER)
    (project / "job.sh").write_text(f"set -e\n{PY} -I job.py\n")
    trusted = ("--trusted", str(project / "job.py"))
    allow(ws, measure(project, "bash", "job.sh", extra=trusted))
    code, out = run(ws, project, "bash", "job.sh", options=trusted)
    assert code == 0 and "rows 3" in out, out
    (project / "job.sh").write_text(f"set -e\n{PY} -I other.py\n")
    (project / "other.py").write_text(READER)
    code, out = run(ws, project, "bash", "job.sh", options=trusted)
    assert code != 0 and "access denied" in out and "rows" not in out


def test_a_running_workload_cannot_change_another_ones_files(
    ws: Path, project: Path, tmp_path: Path
) -> None:
    """A workload whose data directory holds another's measured shell script could rename a
    file over it while it runs (a rename from another mount namespace detaches the read-only
    pin). While the first runs, a second whose files the first can write is refused, and so is
    one that could write the first one's files; one elsewhere runs."""
    import subprocess
    import time

    (project / "slow.py").write_text(
        "import os, time\nopen('started', 'w').close()\n"
        "while not os.path.exists('stop'):\n    time.sleep(0.05)\n"
    )
    (project / "job.sh").write_text("echo measured shell\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PPML_")}
    env.update(PPML_HOME=str(ws), PPML_PASSPHRASE=PASSPHRASE)
    first = subprocess.Popen(
        [PY, "-m", "ppml", "run", "--tee", "sim", "--", PY, "slow.py"],
        cwd=project,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while not (project / "started").exists():
            assert first.poll() is None and time.monotonic() < deadline, first.stdout
            time.sleep(0.05)
        other = tmp_path / "other"
        other.mkdir()
        code, out = run(ws, other, "bash", str(project / "job.sh"))
        assert code == 2 and "needed unchanged by this workload" in out, out
        assert "measured shell" not in out
        (other / "job.sh").write_text("echo elsewhere\n")
        code, out = run(ws, other, "bash", "job.sh", options=("--data", str(project.parent)))
        assert code == 2 and "--data directory holds" in out, out
        code, out = run(ws, other, "bash", "job.sh")
        assert code == 0 and "elsewhere" in out, out
    finally:
        (project / "stop").touch()
        first.communicate(timeout=60)
    assert first.returncode == 0
    code, out = run(
        ws, tmp_path, "bash", str(project / "job.sh"), options=("--data", str(tmp_path))
    )
    assert code == 0 and "measured shell" in out, out


# -- code that runs later: environments, bytecode, the home directory ------------------------------


def test_a_data_directory_cannot_hold_the_environment_ppml_s_caches_or_home(
    ws: Path, project: Path
) -> None:
    import sysconfig

    from ppml.tee.environment import bytecode_dir

    (project / "job.py").write_text(READER)
    site = sysconfig.get_paths()["purelib"]
    cases = [
        (site, "Python environment"),  # an import root
        (os.path.join(site, "ppml_attack_dir_that_does_not_exist", ".."), "Python environment"),
        (os.path.join(sys.base_prefix, "lib"), "Python environment"),  # libpython's directory
        (str(bytecode_dir()), "ppml's caches"),
        (os.path.expanduser("~"), "home directory"),
        ("/", "root directory"),
    ]
    for data, why in cases:
        code, out = run(ws, project, PY, "job.py", options=("--data", data))
        assert code == 2 and why in out, (data, out)
        assert "rows" not in out


PLANT_BYTECODE = """\
import importlib.util, marshal, os, sys
source = sys.argv[1]
st = os.stat(source)
code = compile("VALUE = 'PLANTED'\\n", "<planted>", "exec")
header = importlib.util.MAGIC_NUMBER + bytes(4)
header += int(st.st_mtime).to_bytes(4, "little") + (st.st_size & 0xFFFFFFFF).to_bytes(4, "little")
pyc = os.path.join(os.path.dirname(source), "__pycache__",
                   os.path.basename(importlib.util.cache_from_source(source)))
os.makedirs(os.path.dirname(pyc), exist_ok=True)
with open(pyc, "wb") as fh:
    fh.write(header + marshal.dumps(code))
print("planted", pyc)
"""


def test_bytecode_planted_in_another_environment_never_runs(
    ws: Path, project: Path, tmp_path: Path
) -> None:
    """One run's data directory covers a second virtual environment; its workload plants a
    forged __pycache__ file (right time stamp and size) for a module there. No measurement covers
    bytecode, so a later attested run in that environment must run the module's source. After
    that run, ppml's own bytecode cache holds the module, compiled by ppml."""
    import subprocess

    from ppml.tee.environment import bytecode_dir

    shared = tmp_path / "shared"
    shared.mkdir()
    subprocess.run([PY, "-m", "venv", "--without-pip", shared / "venv2"], check=True)
    python2 = shared / "venv2" / "bin" / "python"
    site2 = subprocess.run(
        [python2, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    module = Path(site2) / "envmod.py"
    module.write_text("VALUE = 'source'\n")
    (project / "plant.py").write_text(PLANT_BYTECODE)
    code, out = run(ws, project, PY, "plant.py", str(module), options=("--data", str(shared)))
    assert code == 0 and "planted" in out, out
    assert any((Path(site2) / "__pycache__").glob("envmod.*.pyc"))

    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "job2.py").write_text("import envmod\nprint('value', envmod.VALUE)\n")
    code, out = run(ws, victim, str(python2), "job2.py")
    assert code == 0 and "value source" in out and "PLANTED" not in out, out
    cached = list(bytecode_dir().joinpath(os.path.realpath(site2).lstrip("/")).glob("envmod.*.pyc"))
    assert len(cached) == 1 and cached[0].read_bytes()[4:8] == (3).to_bytes(4, "little")
    code, out = run(ws, victim, str(python2), "job2.py")  # now from ppml's cache
    assert code == 0 and "value source" in out, out


def test_a_local_package_run_with_m_is_measured(ws: Path, project: Path) -> None:
    """``python -m pkg`` runs pkg/__init__.py (empty or not) before pkg/__main__.py: both are
    measured, and a changed __init__.py is another measurement."""
    pkg = project / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "__main__.py").write_text(READER)
    allow(ws, measure(project, PY, "-m", "pkg"))
    code, out = run(ws, project, PY, "-m", "pkg")
    assert code == 0 and "rows 3" in out, out
    (pkg / "__init__.py").write_text("print('CHANGED')\n")
    code, out = run(ws, project, PY, "-m", "pkg")
    assert code != 0 and "access denied" in out
