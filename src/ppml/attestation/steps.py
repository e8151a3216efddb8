"""The outcome of verifying hardware evidence, step by step, and the one way to run a check as a
step (`StepRunner`).

A verifier runs named steps (a certificate chain, a signature, a binding, a CRL) and reports
each one: ``passed``, ``failed`` (with the reason), ``skipped`` (an earlier step it depends on
failed) or ``not_checked`` (nothing to check it with, e.g. no CRL was given). A report is
`verified` only when no step failed or was skipped; ``not_checked`` steps are reported, and a
policy decides whether they are acceptable.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from ppml.errors import EvidenceError

__all__ = ["Step", "StepFailed", "StepRunner", "StepStatus", "VerificationReport"]


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


class StepFailed(Exception):
    """Raised by a step's check: the step failed for this (human, key-free) reason."""


#: What a check may return: None (passed), a reason (failed) or the step itself.
Check = Callable[[], "Step | str | None"]


class StepRunner:
    """Runs named checks in order and records each one as a `Step`.

    A check returns None (passed), a reason (failed) or a `Step`; raising `StepFailed` or
    `EvidenceError` fails it with that message, and raising one of `malformed` (what a library
    raises on a malformed certificate, say) fails it as malformed `what`. A check whose
    prerequisites (`needs`) did not all pass is not run: it is skipped, naming the step that
    failed first.
    """

    def __init__(
        self, *, malformed: tuple[type[BaseException], ...] = (), what: str = "input"
    ) -> None:
        self.steps: list[Step] = []
        self._malformed = malformed
        self._what = what
        self._cause: dict[str, str] = {}

    def add(self, step: Step) -> Step:
        """Record a step decided elsewhere."""
        self.steps.append(step)
        if step.status in (StepStatus.FAILED, StepStatus.SKIPPED):
            self._cause[step.name] = step.name
        else:
            self._cause[step.name] = ""
        return step

    def extend(self, steps: Iterable[Step]) -> None:
        for step in steps:
            self.add(step)

    def blocker(self, *names: str) -> str | None:
        """The step that failed first among the causes of `names` not passing, if any."""
        return next((self._cause[n] for n in names if self._cause.get(n)), None)

    def passed(self, *names: str) -> bool:
        return all(self._cause.get(n) == "" for n in names)

    def run(self, name: str, check: Check, *, needs: Iterable[str] = ()) -> Step:
        blocked = self.blocker(*needs)
        if blocked is not None:
            self.steps.append(Step.skipped(name, blocked))
            self._cause[name] = blocked
            return self.steps[-1]
        step = self._outcome(name, check)
        self.steps.append(step)
        self._cause[name] = "" if step.status is StepStatus.PASSED else name
        return step

    def _outcome(self, name: str, check: Check) -> Step:
        try:
            out = check()
        except StepFailed as exc:
            return Step.failed(name, str(exc))
        except EvidenceError as exc:
            return Step.failed(name, exc.message.removeprefix(f"{name}: "))
        except self._malformed as exc:
            return Step.failed(name, f"malformed {self._what}: {type(exc).__name__}")
        if isinstance(out, Step):
            return out
        return Step.passed(name) if out is None else Step.failed(name, out)

    def report(self) -> VerificationReport:
        return VerificationReport.of(self.steps)
