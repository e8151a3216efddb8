"""A real TLS + password redis-server for a test workspace, for the serving tests.

Use the fixtures by binding them in a test module (pytest finds fixtures by module attribute;
an assignment, unlike a ``from`` import, keeps ruff's F811 quiet)::

    import redis_support

    redis_server = redis_support.redis_server
    deployment = redis_support.deployment

- ``redis_workspace`` (module scope): a dev workspace (cheap KDF) made in a temporary directory;
- ``redis_server`` (module scope): `ppml.serving.redis_server.start_redis` on it, stopped at the
  end; ``redis_server.client()`` is a connected-client factory (TLS checked against the
  workspace CA, password sent);
- ``deployment`` (function scope): a fresh deployment name per test, so tests sharing a server
  never see each other's keys.

Or, without fixtures: ``with running_redis(tmp_path) as (ws, server): ...``.
Tests are skipped (with the reason shown) when redis-server is not installed; under
`scripts/test.sh` (PPML_TESTS_REQUIRE_REDIS) they fail instead.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from ppml.crypto.passphrase import KdfParams
from ppml.serving.redis_server import RedisServer, start_redis
from ppml.workspace import Workspace

PASSPHRASE = b"redis support passphrase"
_counter = itertools.count()


def require_redis_server() -> None:
    if shutil.which("redis-server") is None:
        reason = "redis-server is not installed (apt-get install redis-server)"
        if os.environ.get("PPML_TESTS_REQUIRE_REDIS"):  # scripts/test.sh: never a silent skip
            pytest.fail(reason)
        pytest.skip(reason)


def make_workspace(path: Path) -> Workspace:
    """A dev workspace at `path` with the cheap test KDF."""
    return Workspace.create(path, PASSPHRASE, dev=True, kdf=KdfParams.for_testing())


@contextlib.contextmanager
def running_redis(root: Path, **options: object) -> Iterator[tuple[Workspace, RedisServer]]:
    """A workspace under `root` and its Redis, stopped at the end (whatever happens)."""
    require_redis_server()
    ws = make_workspace(root / "ws")
    server = start_redis(ws, **options)  # type: ignore[arg-type]
    try:
        yield ws, server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def redis_workspace(tmp_path_factory: pytest.TempPathFactory) -> Workspace:
    return make_workspace(tmp_path_factory.mktemp("redis") / "ws")


@pytest.fixture(scope="module")
def redis_server(redis_workspace: Workspace) -> Iterator[RedisServer]:
    require_redis_server()
    server = start_redis(redis_workspace)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def deployment() -> str:
    return f"test-{next(_counter)}"
