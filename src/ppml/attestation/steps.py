"""The outcome of verifying hardware evidence, step by step.

A verifier runs named steps (a certificate chain, a signature, a binding, a CRL) and reports
each one: ``passed``, ``failed`` (with the reason), ``skipped`` (an earlier step it depends on
failed) or ``not_checked`` (nothing to check it with, e.g. no CRL was given). A report is
`verified` only when no step failed or was skipped; ``not_checked`` steps are reported, and a
policy decides whether they are acceptable.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass

from ppml.errors import EvidenceError

__all__ = ["Step", "StepStatus", "VerificationReport"]


class StepStatus(enum.StrEnum):
    PASSED = "passed"
    FAILED = "failed"
    SKIPPED = "skipped"
    NOT_CHECKED = "not_checked"


@dataclass(frozen=True, slots=True)
class Step:
    """One verification step: its name (``pck_chain``, ``quote_signature`` ...), its status and
    a short human reason (empty when it passed)."""

    name: str
    status: StepStatus
    detail: str = ""

    @classmethod
    def passed(cls, name: str, detail: str = "") -> Step:
        return cls(name, StepStatus.PASSED, detail)

    @classmethod
    def failed(cls, name: str, detail: str) -> Step:
        return cls(name, StepStatus.FAILED, detail)

    @classmethod
    def skipped(cls, name: str, because: str) -> Step:
        return cls(name, StepStatus.SKIPPED, f"not run: {because} failed")

    @classmethod
    def not_checked(cls, name: str, detail: str) -> Step:
        return cls(name, StepStatus.NOT_CHECKED, detail)

    def to_dict(self) -> dict[str, str]:
        return {"name": self.name, "status": str(self.status), "detail": self.detail}


@dataclass(frozen=True, slots=True)
class VerificationReport:
    """The steps of one verification, in the order they ran."""

    steps: tuple[Step, ...]

    @classmethod
    def of(cls, steps: Iterable[Step]) -> VerificationReport:
        return cls(tuple(steps))

    @property
    def verified(self) -> bool:
        """No step failed or was skipped (``not_checked`` steps do not count against it)."""
        return bool(self.steps) and all(
            s.status in (StepStatus.PASSED, StepStatus.NOT_CHECKED) for s in self.steps
        )

    @property
    def first_failure(self) -> Step | None:
        return next((s for s in self.steps if s.status is StepStatus.FAILED), None)

    def step(self, name: str) -> Step:
        for s in self.steps:
            if s.name == name:
                return s
        raise KeyError(name)

    def __add__(self, other: VerificationReport) -> VerificationReport:
        return VerificationReport(self.steps + other.steps)

    def raise_for_failure(self) -> None:
        """Raise `EvidenceError` naming the first failed step, if any step failed or was
        skipped (or there were no steps at all)."""
        if self.verified:
            return
        bad = self.first_failure or next(
            (s for s in self.steps if s.status is StepStatus.SKIPPED), None
        )
        if bad is None:
            raise EvidenceError("evidence verification ran no step")
        raise EvidenceError(f"{bad.name}: {bad.detail}")

    def to_list(self) -> list[dict[str, str]]:
        return [s.to_dict() for s in self.steps]
