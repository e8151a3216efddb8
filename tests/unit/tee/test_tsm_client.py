"""The configfs-tsm client against an emulated report tree: a tmp directory whose file
operations get the kernel's side effects from `FakeKernel` (creating an entry populates it,
writing `inblob` bumps `generation` and makes `outblob` available)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from ppml.errors import AttestationFailed, ConfigurationError, UsageError
from ppml.tee.tsm import ConfigfsOps, TsmClient

REPORT_DATA = bytes(range(64))


def fake_report(provider: str, report_data: bytes) -> bytes:
    """A report of the right size carrying `report_data` where the real one does."""
    if provider == "sev_guest":
        report = bytearray(1184)
        report[0x50 : 0x50 + 64] = report_data
    else:  # a TDX quote v4: header, TD report body, then signature data
        report = bytearray(48 + 584 + 4 + 64)
        report[0:2] = (4).to_bytes(2, "little")
        report[568 : 568 + 64] = report_data
    return bytes(report)


class FakeKernel(ConfigfsOps):
    """The kernel's part, on a real directory tree."""

    def __init__(self, provider: str, *, auxblob: bytes | None = None) -> None:
        self.provider = provider
        self.auxblob = auxblob
        self.entries: list[Path] = []
        self.reports = 0
        self.extra_writes = 0  # another writer's writes, between our inblob write and its read
        self.short = False
        self.fail_mkdir: OSError | None = None
        self.fail_outblob: OSError | None = None

    def mkdir(self, path: Path) -> None:
        if self.fail_mkdir is not None:
            raise self.fail_mkdir
        super().mkdir(path)
        self.entries.append(path)
        (path / "provider").write_text(self.provider + "\n")
        (path / "generation").write_text("0\n")
        (path / "inblob").write_bytes(b"")
        (path / "outblob").write_bytes(b"")
        if self.provider == "sev_guest":
            (path / "auxblob").write_bytes(b"")
            (path / "privlevel").write_bytes(b"")

    def write(self, path: Path, data: bytes) -> None:
        super().write(path, data)
        entry = path.parent
        generation = int((entry / "generation").read_text()) + 1 + self.extra_writes
        (entry / "generation").write_text(f"{generation}\n")
        if path.name == "inblob":
            report = fake_report(self.provider, data)
            (entry / "outblob").write_bytes(report[:100] if self.short else report)
            if self.auxblob is not None:
                (entry / "auxblob").write_bytes(self.auxblob)

    def read(self, path: Path, limit: int) -> bytes:
        if path.name == "outblob":
            if self.fail_outblob is not None:
                raise self.fail_outblob
            self.reports += 1
        return super().read(path, limit)

    def rmdir(self, path: Path) -> None:
        for child in path.iterdir():  # configfs removes an entry's attributes with it
            child.unlink()
        super().rmdir(path)


@pytest.fixture
def base(tmp_path: Path) -> Path:
    report = tmp_path / "tsm" / "report"
    report.mkdir(parents=True)
    return report


def test_tdx_report(base: Path) -> None:
    kernel = FakeKernel("tdx_guest")
    report = TsmClient("tdx", base=base, ops=kernel).report(REPORT_DATA)
    assert report.provider == "tdx_guest" and report.tee == "tdx"
    assert report.outblob == fake_report("tdx_guest", REPORT_DATA)
    assert report.auxblob == b"" and report.generation == 1
    assert list(base.iterdir()) == []  # the entry is gone
    assert len(kernel.entries) == 1 and kernel.entries[0].name.startswith("ppml-")


def test_snp_report_with_certificate_table_and_privlevel(base: Path) -> None:
    kernel = FakeKernel("sev_guest", auxblob=b"cert-table")
    report = TsmClient("snp", base=base, ops=kernel, privlevel=2).report(REPORT_DATA)
    assert report.tee == "snp" and report.auxblob == b"cert-table"
    assert report.outblob[0x50 : 0x50 + 64] == REPORT_DATA
    assert report.generation == 2  # privlevel, then inblob
    assert list(base.iterdir()) == []


def test_snp_without_certificates_from_the_host(base: Path) -> None:
    report = TsmClient("snp", base=base, ops=FakeKernel("sev_guest")).report(REPORT_DATA)
    assert report.auxblob == b""


def test_wrong_provider_is_named(base: Path) -> None:
    client = TsmClient("tdx", base=base, ops=FakeKernel("sev_guest"))
    message = (
        "configfs-tsm provider is 'sev_guest', not 'tdx_guest' as --tee tdx needs: "
        "this is an AMD SEV-SNP guest (use --tee snp)"
    )
    with pytest.raises(ConfigurationError) as info:
        client.report(REPORT_DATA)
    assert str(info.value) == message
    with pytest.raises(ConfigurationError):
        client.check()
    assert list(base.iterdir()) == []


def test_check_probes_without_making_a_report(base: Path) -> None:
    kernel = FakeKernel("tdx_guest")
    TsmClient("tdx", base=base, ops=kernel).check()
    assert kernel.reports == 0 and len(kernel.entries) == 1
    assert list(base.iterdir()) == []


def test_generation_skew_is_retried_with_a_fresh_entry(base: Path) -> None:
    kernel = FakeKernel("tdx_guest")
    kernel.extra_writes = 1
    client = TsmClient("tdx", base=base, ops=kernel, attempts=3)
    with pytest.raises(AttestationFailed, match="generation skew"):
        client.report(REPORT_DATA)
    assert len(kernel.entries) == 3 and len(set(kernel.entries)) == 3
    assert list(base.iterdir()) == []


def test_skew_once_then_success(base: Path) -> None:
    class OnceSkewed(FakeKernel):
        def write(self, path: Path, data: bytes) -> None:
            self.extra_writes = 1 if len(self.entries) == 1 else 0
            super().write(path, data)

    kernel = OnceSkewed("tdx_guest")
    report = TsmClient("tdx", base=base, ops=kernel).report(REPORT_DATA)
    assert report.generation == 1 and len(kernel.entries) == 2


def test_missing_directory(tmp_path: Path) -> None:
    missing = tmp_path / "no" / "report"
    client = TsmClient("snp", base=missing, ops=FakeKernel("sev_guest"))
    expected = (
        f"{missing} not present: not a TDX/SNP guest or configfs not mounted, "
        "or the kernel is older than 6.7"
    )
    for call in (client.check, lambda: client.report(REPORT_DATA)):
        with pytest.raises(ConfigurationError) as info:
            call()
        assert str(info.value) == expected


def test_permission_denied_creating_the_entry(base: Path) -> None:
    kernel = FakeKernel("tdx_guest")
    kernel.fail_mkdir = PermissionError(13, "Permission denied")
    with pytest.raises(ConfigurationError, match=r"permission denied .*need root"):
        TsmClient("tdx", base=base, ops=kernel).report(REPORT_DATA)


def test_permission_denied_writing_inblob_removes_the_entry(base: Path) -> None:
    class ReadOnly(FakeKernel):
        def write(self, path: Path, data: bytes) -> None:
            raise PermissionError(13, "Permission denied")

    with pytest.raises(ConfigurationError, match=r"cannot write .*inblob: permission denied"):
        TsmClient("tdx", base=base, ops=ReadOnly("tdx_guest")).report(REPORT_DATA)
    assert list(base.iterdir()) == []


def test_the_tee_failing_to_make_a_report(base: Path) -> None:
    kernel = FakeKernel("tdx_guest")
    kernel.fail_outblob = OSError(5, "Input/output error")
    with pytest.raises(AttestationFailed, match=r"could not produce a report \(outblob: Input"):
        TsmClient("tdx", base=base, ops=kernel).report(REPORT_DATA)
    assert list(base.iterdir()) == []


@pytest.mark.parametrize(
    ("tee", "provider", "size"), [("tdx", "tdx_guest", 632), ("snp", "sev_guest", 1184)]
)
def test_short_outblob(base: Path, tee: str, provider: str, size: int) -> None:
    kernel = FakeKernel(provider)
    kernel.short = True
    with pytest.raises(AttestationFailed) as info:
        TsmClient(tee, base=base, ops=kernel).report(REPORT_DATA)
    assert str(info.value) == (
        f"configfs-tsm returned a 100-byte report; a {provider} report is at least {size} bytes"
    )
    assert list(base.iterdir()) == []


def test_a_report_over_other_report_data_is_refused(base: Path) -> None:
    class Replaying(FakeKernel):
        def write(self, path: Path, data: bytes) -> None:
            super().write(path, bytes(64) if path.name == "inblob" else data)

    with pytest.raises(AttestationFailed, match="other report data"):
        TsmClient("snp", base=base, ops=Replaying("sev_guest")).report(REPORT_DATA)


def test_argument_checks(base: Path) -> None:
    with pytest.raises(UsageError):
        TsmClient("sgx", base=base)
    with pytest.raises(UsageError):
        TsmClient("tdx", base=base, privlevel=1)
    with pytest.raises(UsageError):
        TsmClient("tdx", base=base, ops=FakeKernel("tdx_guest")).report(b"short")


def test_default_ops_do_plain_file_io(tmp_path: Path) -> None:
    ops = ConfigfsOps()
    entry = tmp_path / "entry"
    ops.mkdir(entry)
    assert ops.exists(entry) and os.stat(entry).st_mode & 0o777 == 0o700
    (entry / "inblob").write_bytes(b"")
    ops.write(entry / "inblob", REPORT_DATA)
    assert ops.read(entry / "inblob", 64) == REPORT_DATA
    (entry / "inblob").unlink()
    ops.rmdir(entry)
    assert not entry.exists()
