"""ppml.names: one full-match rule per kind of name, and every place that takes a name uses it."""

from __future__ import annotations

import re
import string
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ppml import names
from ppml.crypto.envelope import validate_key_name
from ppml.data.payload import validate_deployment, validate_model, validate_request_id
from ppml.engines.sql import validate_table_name
from ppml.errors import UsageError
from ppml.kms import KeyService
from ppml.workspace.secrets import validate_secret_name

RULES = {
    "key": names.KEY,
    "secret": names.SECRET,
    "deployment": names.DEPLOYMENT,
    "client": names.CLIENT,
    "request id": names.REQUEST_ID,
    "model": names.MODEL,
    "actor": names.ACTOR,
    "table": names.TABLE,
}
VALIDATORS: dict[str, Callable[[Any], str]] = {
    "key": validate_key_name,
    "secret": validate_secret_name,
    "deployment": validate_deployment,
    "request id": validate_request_id,
    "model": validate_model,
    "table": validate_table_name,
}
GOOD = {
    "key": "sales.2024_v-1",
    "secret": "spark-auth-secret",
    "deployment": "fraud-v2",
    "client": "team.a",
    "request id": "9f1c2e3a-0b4d-4c5e-8f6a-7b8c9d0e1f2a",
    "model": "resnet50@v1:best+int8",
    "actor": "serve 10.0.0.5",
    "table": "_orders2",
}
CONTROL = [chr(c) for c in [*range(0x20), 0x7F]]


@pytest.mark.parametrize("kind", RULES)
def test_good_names_pass(kind: str) -> None:
    assert RULES[kind].check(GOOD[kind]) == GOOD[kind]


@pytest.mark.parametrize("kind", RULES)
@pytest.mark.parametrize("suffix", ["\n", "\r\n", "\x00", "\t", "\u00e9", "\u200b", "\uff21"])
def test_a_trailing_character_outside_the_rule_is_refused(kind: str, suffix: str) -> None:
    """`re.match` with `$` lets a trailing newline through; a full match does not."""
    assert not RULES[kind].ok(GOOD[kind] + suffix)
    with pytest.raises(UsageError, match=f"invalid {RULES[kind].kind}"):
        RULES[kind].check(GOOD[kind] + suffix)


def test_only_an_actor_may_hold_a_space() -> None:
    assert [kind for kind, rule in RULES.items() if rule.ok(GOOD[kind] + " x")] == ["actor"]
    assert not names.ACTOR.ok(" leading")


@pytest.mark.parametrize("kind", VALIDATORS)
def test_every_validator_is_the_rule(kind: str) -> None:
    assert VALIDATORS[kind](GOOD[kind]) == GOOD[kind]
    for bad in (GOOD[kind] + "\n", "", "\n" + GOOD[kind], 7, None):
        with pytest.raises(UsageError):
            VALIDATORS[kind](bad)


@pytest.mark.parametrize("kind", RULES)
@given(data=st.data())
def test_no_control_character_anywhere(kind: str, data: st.DataObject) -> None:
    good = GOOD[kind]
    at = data.draw(st.integers(0, len(good)))
    bad = good[:at] + data.draw(st.sampled_from(CONTROL)) + good[at:]
    assert not RULES[kind].ok(bad)


@pytest.mark.parametrize("kind", RULES)
@given(value=st.text(max_size=200))
def test_accepted_names_are_printable_ascii_and_bounded(kind: str, value: str) -> None:
    if RULES[kind].ok(value):
        assert value.isascii() and value.isprintable() and "\n" not in value
        assert 1 <= len(value) <= 128
        assert re.fullmatch(RULES[kind].pattern, value)


@given(value=st.text(alphabet=string.ascii_letters + string.digits + "._-", max_size=140))
def test_key_names_are_exactly_the_documented_set(value: str) -> None:
    expected = 1 <= len(value) <= 128 and value[0].isalnum()
    assert names.KEY.ok(value) is expected


@pytest.mark.parametrize("kind", RULES)
@given(value=st.text(max_size=80))
def test_the_error_never_prints_a_raw_control_character(kind: str, value: str) -> None:
    if RULES[kind].ok(value):
        return
    with pytest.raises(UsageError) as caught:
        RULES[kind].check(value)
    message = str(caught.value)
    assert not any(c in message for c in CONTROL)


def test_the_error_cuts_a_long_value() -> None:
    with pytest.raises(UsageError) as caught:
        names.KEY.check("x" * 1000 + "\n")
    assert len(str(caught.value)) < 250


def test_a_key_name_with_a_newline_never_reaches_the_store(tmp_path: Path) -> None:
    with KeyService(tmp_path / "kms.db", bytes(32)) as kms:
        with pytest.raises(UsageError, match="invalid key name 'evil\\\\n'"):
            kms.create_key("evil\n")
        assert kms.list_keys() == []
        with pytest.raises(UsageError, match="invalid actor"):
            KeyService(tmp_path / "kms.db", bytes(32), actor="me\n")
