"""The public surface: every name a package exports exists, and the errors form one tree."""

from __future__ import annotations

import importlib
import inspect

import pytest

import ppml.errors as errors

PUBLIC_MODULES = [
    "ppml.errors",
    "ppml.crypto.envelope",
    "ppml.crypto.passphrase",
    "ppml.crypto.stream",
    "ppml.kms",
    "ppml.workspace",
    "ppml.data",
    "ppml.data.parquet",
    "ppml.data.pme",
    "ppml.crypto.hpke",
    "ppml.attestation",
    "ppml.kms.broker",
    "ppml.kms.policy",
    "ppml.tee.manifest",
    "ppml.tee.runtime",
    "ppml.tee.channel",
    "ppml.api",
    "ppml",
    "ppml.spark",
    "ppml.engines.spark.jvm",
    "ppml.serving",
    "ppml.data.payload",
    "ppml.serving.queue",
    "ppml.serving.redis_server",
    "ppml.serving.model",
    "ppml.serving.batching",
    "ppml.serving.worker",
    "ppml.server.serving_frontend",
    "ppml.serving.client",
    "ppml.serving.metrics",
]


@pytest.mark.parametrize("name", PUBLIC_MODULES)
def test_all_names_exist_and_are_unique(name: str) -> None:
    module = importlib.import_module(name)
    exported = list(module.__all__)
    assert len(exported) == len(set(exported))
    missing = [n for n in exported if not hasattr(module, n)]
    assert missing == []


def test_every_error_is_a_ppml_error_with_a_documented_exit_code() -> None:
    classes = [
        c for _, c in inspect.getmembers(errors, inspect.isclass) if c.__module__ == errors.__name__
    ]
    assert {c.__name__ for c in classes} == set(errors.__all__)
    families = {
        errors.UsageError: 2,
        errors.IntegrityError: 3,
        errors.KeyAccessError: 4,
        errors.ConfigurationError: 5,
    }
    for cls in classes:
        assert issubclass(cls, errors.PPMLError)
        if cls is not errors.PPMLError:
            family = next(f for f in families if issubclass(cls, f))
            assert cls.exit_code == families[family], cls
        assert cls.__name__ in (errors.__doc__ or ""), f"{cls.__name__} missing from the tree"


def test_integrity_errors_are_opaque() -> None:
    assert str(errors.IntegrityError()) == "integrity check failed"
    assert (
        errors.IntegrityError(path="f").diagnostics()
        == "f: integrity error: integrity check failed"
    )
