"""Shared fixtures. `MemoryKeyProvider` (tests/support/keys.py) stands in for the KMS in unit
tests of the data layer only; integration tests use a real workspace and its SQLite KMS."""

from __future__ import annotations

import pytest
from tests.support.keys import MemoryKeyProvider


@pytest.fixture
def provider() -> MemoryKeyProvider:
    return MemoryKeyProvider("sales", "pii")
