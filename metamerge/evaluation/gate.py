"""The quality gate: the last check between a merged model and the users who pull `latest`.

A nightly merge that quietly got worse is worse than no merge at all, so the gate compares the
number the table shows (the normalized average, merged / own fine-tune) with a floor and with
the merge published last time under the same name, and refuses to publish on either failure.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from metamerge.errors import GateError
from metamerge.recipe import Gate


@dataclass(frozen=True)
class PublishedBaseline:
    """What the previous publish of this model scored; `None` score: it was published unscored."""

    run_id: str
    normalized_average: float | None


@dataclass(frozen=True)
class GateDecision:
    passed: bool
    normalized_average: float
    checks: tuple[str, ...] = field(default_factory=tuple)
    failures: tuple[str, ...] = field(default_factory=tuple)

    def summary(self) -> str:
        verdict = "passed" if self.passed else "FAILED"
        lines = self.failures if not self.passed else self.checks
        return f"quality gate {verdict}: " + "; ".join(lines)

    def as_records(self) -> list[dict[str, object]]:
        return [{"check": text, "result": "fail"} for text in self.failures] + [
            {"check": text, "result": "pass"} for text in self.checks]

    def raise_if_failed(self) -> None:
        if not self.passed:
            raise GateError(self.summary() + " — not published")


def check_gate(gate: Gate, normalized_average: float, previous: PublishedBaseline | None) -> GateDecision:
    """Every configured check, each described in one line whatever its outcome."""
    checks: list[str] = []
    failures: list[str] = []
    if gate.min_avg_norm is not None:
        line = f"normalized average {normalized_average:.4f} vs minimum {gate.min_avg_norm:.4f}"
        (checks if normalized_average >= gate.min_avg_norm else failures).append(line)
    if gate.no_regression:
        if previous is None:
            checks.append("no earlier publish of this model: nothing to regress from")
        elif previous.normalized_average is None:
            checks.append(f"earlier publish {previous.run_id} has no scores: nothing to compare")
        else:
            floor = previous.normalized_average - gate.tolerance
            line = (f"normalized average {normalized_average:.4f} vs last published {previous.run_id} "
                    f"{previous.normalized_average:.4f}" + (f" (tolerance {gate.tolerance:g})" if gate.tolerance else ""))
            (checks if normalized_average >= floor else failures).append(line)
    return GateDecision(passed=not failures, normalized_average=normalized_average,
                        checks=tuple(checks), failures=tuple(failures))


def baseline_from_manifest(manifest: dict | None) -> PublishedBaseline | None:
    if manifest is None:
        return None
    value = manifest.get("normalized_average")
    return PublishedBaseline(run_id=str(manifest.get("run_id")), normalized_average=float(value) if value is not None else None)
