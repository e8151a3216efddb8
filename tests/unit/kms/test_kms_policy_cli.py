"""`ppml policy allow|show|revoke`, driven through a Typer app that registers only them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from ppml.cli import policy_cmds
from ppml.cli.boundary import ErrorBoundary
from ppml.crypto.passphrase import KdfParams
from ppml.workspace import Workspace

PASSPHRASE = b"policy cli passphrase"
M = "3c" * 32
M48 = "c3" * 48


@pytest.fixture(scope="module")
def app() -> typer.Typer:
    root = typer.Typer(cls=ErrorBoundary)  # the CLI's own root group: errors become exit codes

    @root.callback()
    def _root() -> None:
        """Test root."""

    policy_cmds.register(root)
    return root


@pytest.fixture(scope="module")
def passphrase_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("pass") / "passphrase"
    path.write_bytes(PASSPHRASE + b"\n")
    return path


def _workspace(root: Path, *, dev: bool) -> Path:
    ws = Workspace.create(root / "ws", PASSPHRASE, dev=dev, kdf=KdfParams.for_testing())
    with ws.key_service() as keys:
        keys.create_key("sales")
    return ws.path


@pytest.fixture
def prod_ws(tmp_path: Path) -> Path:
    return _workspace(tmp_path, dev=False)


@pytest.fixture
def dev_ws(tmp_path: Path) -> Path:
    return _workspace(tmp_path, dev=True)


class Cli:
    def __init__(self, app: typer.Typer, ws: Path, passphrase_file: Path) -> None:
        self.app, self.ws, self.passphrase_file = app, ws, passphrase_file

    def __call__(self, *args: str) -> tuple[int, str, str]:
        options = ["--workspace", str(self.ws), "--passphrase-file", str(self.passphrase_file)]
        result = CliRunner().invoke(self.app, ["policy", *args, *options])
        return result.exit_code, result.stdout, result.stderr


@pytest.fixture
def prod(app: typer.Typer, prod_ws: Path, passphrase_file: Path) -> Cli:
    return Cli(app, prod_ws, passphrase_file)


@pytest.fixture
def dev(app: typer.Typer, dev_ws: Path, passphrase_file: Path) -> Cli:
    return Cli(app, dev_ws, passphrase_file)


def test_allow_show_revoke(prod: Cli) -> None:
    code, out, _ = prod("allow", "sales", "--tee", "sgx", "--measurement", M.upper())
    assert code == 0
    assert f"sgx  no     UpToDate                           {M}" in out
    code, out, _ = prod(
        "allow", "sales", "--tee", "TDX", "--measurement", M48, "--min-tcb", "outofdate"
    )
    assert code == 0
    code, out, _ = prod("show", "sales", "--format", "json")
    assert code == 0
    assert json.loads(out) == {
        "key": "sales",
        "rules": [
            {"tee": "sgx", "measurement": M, "debug_ok": False, "min_tcb": "UpToDate"},
            {"tee": "tdx", "measurement": M48, "debug_ok": False, "min_tcb": "OutOfDate"},
        ],
    }
    code, out, _ = prod("revoke", "sales", "--measurement", M)
    assert code == 0
    code, out, _ = prod("revoke", "sales", "--measurement", M48, "--format", "json")
    assert (code, json.loads(out)) == (0, {"key": "sales", "rules": []})
    code, out, _ = prod("show", "sales")
    assert (code, out) == (0, "key sales: no rules, every release is denied\n")


def test_debug_ok_is_recorded_and_warned_about(prod: Cli) -> None:
    code, out, err = prod("allow", "sales", "--tee", "sgx", "--measurement", M, "--debug-ok")
    assert code == 0
    assert "sgx  ok" in out
    assert "warning: --debug-ok" in err


def test_sim_rules_are_refused_in_a_production_workspace(prod: Cli) -> None:
    code, _, err = prod("allow", "sales", "--tee", "sim", "--measurement", M)
    assert code == 2
    assert "sim rules are refused outside a dev workspace" in err


def test_sim_rules_are_accepted_in_a_dev_workspace(dev: Cli) -> None:
    code, out, _ = dev("allow", "sales", "--tee", "sim", "--measurement", M)
    assert code == 0
    assert out.splitlines()[-1].startswith("sim ")


BAD = {
    "short hex": (["--tee", "sgx", "--measurement", "ab" * 31], "64 or 96 hex digits"),
    "odd hex": (["--tee", "sgx", "--measurement", M + "a"], "64 or 96 hex digits"),
    "not hex": (["--tee", "sgx", "--measurement", "zz" * 32], "non-hex"),
    "unknown tee": (["--tee", "tpm", "--measurement", M], "unknown TEE type 'tpm'"),
    "unknown tcb": (
        ["--tee", "sgx", "--measurement", M, "--min-tcb", "Great"],
        "unknown TCB status 'Great'",
    ),
}


@pytest.mark.parametrize(("args", "message"), BAD.values(), ids=BAD.keys())
def test_bad_arguments_are_usage_errors(prod: Cli, args: list[str], message: str) -> None:
    code, _, err = prod("allow", "sales", *args)
    assert code == 2
    assert message in err


def test_unknown_keys_and_rules(prod: Cli) -> None:
    code, _, err = prod("show", "ghost")
    assert (code, err.strip()) == (4, "ppml: key access error: no key named 'ghost'")
    code, _, err = prod("allow", "ghost", "--tee", "sgx", "--measurement", M)
    assert code == 4
    code, _, err = prod("revoke", "sales", "--measurement", M)
    assert code == 2
    assert "has no release rule for measurement" in err
