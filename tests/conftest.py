"""Shared fixtures. `MemoryKeyProvider` stands in for the KMS in unit tests of the data layer
only; integration tests use a real workspace and its SQLite KMS."""

from __future__ import annotations

import pytest
from tests.support import MemoryKeyProvider


@pytest.fixture
def provider() -> MemoryKeyProvider:
    return MemoryKeyProvider("sales", "pii")
