"""The names ppml accepts, one rule each: key, secret, deployment, serving client and model
names, request ids (as clients give them, and as the queue holds them), audit actors and SQL
table names.

Every rule is a full match of the whole string (`re.fullmatch`): a trailing newline, a control
character or any non-ASCII letter is refused, so a name can go into a table, a log line, an
audit record, a Redis key or a file name as it is. Each rule's `check` raises `UsageError`
naming the kind of name and what it may hold.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from ppml.errors import UsageError

__all__ = [
    "ACTOR",
    "CLIENT",
    "DEPLOYMENT",
    "KEY",
    "MODEL",
    "QUEUE_ID",
    "REQUEST_ID",
    "SECRET",
    "TABLE",
    "NameRule",
]


@dataclass(frozen=True, slots=True)
class NameRule:
    """One kind of name: `pattern` must match the whole of it."""

    kind: str
    pattern: str
    description: str
    _regex: re.Pattern[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_regex", re.compile(self.pattern, re.ASCII))

    def ok(self, value: Any) -> bool:
        """Whether `value` is a string that this rule accepts."""
        return isinstance(value, str) and self._regex.fullmatch(value) is not None

    def check(self, value: Any) -> str:
        """`value` if the rule accepts it, else `UsageError` (the value shown escaped, cut at
        40 characters)."""
        if self.ok(value):
            return str(value)
        if isinstance(value, str):
            shown = repr(value[:40] + "..." if len(value) > 40 else value)
        else:
            shown = f"of type {type(value).__name__}"
        raise UsageError(f"invalid {self.kind} {shown}: use {self.description}")


_ALNUM = "A-Za-z0-9"

KEY = NameRule(
    "key name",
    rf"[{_ALNUM}][{_ALNUM}._-]{{0,127}}",
    "1-128 letters, digits, '.', '_' or '-', starting with a letter or digit",
)
SECRET = NameRule(
    "secret name",
    r"[a-z0-9][a-z0-9._-]{0,63}",
    "1-64 lower-case letters, digits, '.', '_' or '-', starting with a letter or digit",
)
# Deployment and client names appear in Redis keys and certificate subjects: no ':', spaces or
# glob characters.
DEPLOYMENT = NameRule(
    "deployment name",
    r"[a-z0-9][a-z0-9._-]{0,63}",
    "1-64 lower-case letters, digits, '.', '_' or '-', starting with a letter or digit",
)
CLIENT = NameRule(
    "client name",
    r"[a-z0-9][a-z0-9._-]{0,63}",
    "1-64 lower-case letters, digits, '.', '_' or '-', starting with a letter or digit",
)
REQUEST_ID = NameRule(
    "request id",
    rf"[{_ALNUM}][{_ALNUM}._-]{{0,127}}",
    "1-128 ASCII letters, digits, '.', '_' or '-', starting with a letter or digit",
)
# In the queue, a front end's request id is prefixed with its client's tag (16 hex digits and
# a dot): ids are scoped per client.
QUEUE_ID = NameRule(
    "queued request id",
    rf"[{_ALNUM}][{_ALNUM}._-]{{0,159}}",
    "1-160 ASCII letters, digits, '.', '_' or '-', starting with a letter or digit",
)
MODEL = NameRule(
    "model name",
    rf"[{_ALNUM}][{_ALNUM}._:@+-]{{0,127}}",
    "1-128 ASCII letters, digits, '.', '_', ':', '@', '+' or '-', starting with a letter or digit",
)
ACTOR = NameRule(
    "actor",
    r"[\x21-\x7e][\x20-\x7e]{0,127}",
    "1-128 printable ASCII characters, not starting with a space",
)
TABLE = NameRule(
    "table name",
    r"[A-Za-z_][A-Za-z0-9_]{0,62}",
    "1-63 letters, digits or '_', not starting with a digit",
)
