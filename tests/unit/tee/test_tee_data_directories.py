"""Which directories the launcher lets a workload write: its rules on their own."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from ppml.errors import UsageError
from ppml.tee.launcher import Isolation, _check_data_directory


def test_the_default_data_directory_is_the_working_directory_unless_none_is_wanted() -> None:
    cwd = Path("/srv/project")
    assert Isolation().data_directories(cwd) == (cwd,)
    assert Isolation(writable=(Path("/data"),)).data_directories(cwd) == (Path("/data"),)
    # A serving worker writes nothing: no data directory, not the working directory "/".
    assert Isolation(no_data=True).data_directories(Path("/")) == ()


@pytest.mark.parametrize(
    ("data", "why"),
    [
        ("/", "root directory"),
        ("HOME", "home directory"),
        ("/opt/py/lib/python3.11", "Python environment"),
        ("/opt/py/lib/python3.11/site-packages", "Python environment"),
        ("/opt/py", "Python environment"),  # holds code too, but is itself listed here
    ],
)
def test_data_directories_that_would_let_a_workload_change_later_code_are_refused(
    data: str, why: str
) -> None:
    home = os.path.realpath(os.path.expanduser("~"))
    data = home if data == "HOME" else data
    with pytest.raises(UsageError, match=why):
        _check_data_directory("--data x", data, ["/opt/py/lib/python3.11", "/opt/py"])


def test_other_data_directories_are_accepted() -> None:
    _check_data_directory("--data x", "/srv/project/out", ["/opt/py/lib/python3.11", "/opt/py"])
    _check_data_directory("--data x", "/opt/pyx", ["/opt/py"])  # a prefix of the name only
