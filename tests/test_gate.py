"""The quality gate's decisions, and the recipe keys that configure it."""

import pytest

from metamerge.errors import GateError, RecipeError
from metamerge.evaluation.gate import PublishedBaseline, baseline_from_manifest, check_gate
from metamerge.recipe import Gate, parse_recipe

EVALUATED = {"name": "m", "base": "/b", "finetunes": [{"ref": "/f1", "name": "a", "tasks": ["t1"]}],
             "evaluation": {"tasks_dir": "/t"}}


def test_floor_passes_at_the_threshold_and_fails_below_it():
    gate = Gate(min_avg_norm=0.5)
    assert check_gate(gate, 0.5, None).passed
    decision = check_gate(gate, 0.4999, None)
    assert not decision.passed
    assert decision.failures == ("normalized average 0.4999 vs minimum 0.5000",)
    with pytest.raises(GateError, match="quality gate FAILED: normalized average 0.4999 vs minimum 0.5000 — not published"):
        decision.raise_if_failed()


def test_no_regression_compares_with_the_last_publish_within_tolerance():
    gate = Gate(no_regression=True, tolerance=0.02)
    previous = PublishedBaseline("20261124-abc", 0.61)
    assert check_gate(gate, 0.595, previous).passed  # 0.61 - 0.02 = 0.59
    failed = check_gate(gate, 0.585, previous)
    assert not failed.passed and "last published 20261124-abc 0.6100 (tolerance 0.02)" in failed.failures[0]
    first = check_gate(gate, 0.1, None)
    assert first.passed and "no earlier publish" in first.checks[0]
    unscored = check_gate(gate, 0.1, PublishedBaseline("r1", None))
    assert unscored.passed and "has no scores" in unscored.checks[0]


def test_both_checks_are_reported_each_with_its_outcome():
    decision = check_gate(Gate(min_avg_norm=0.3, no_regression=True), 0.35, PublishedBaseline("r0", 0.4))
    assert not decision.passed
    assert decision.as_records() == [
        {"check": "normalized average 0.3500 vs last published r0 0.4000", "result": "fail"},
        {"check": "normalized average 0.3500 vs minimum 0.3000", "result": "pass"},
    ]


def test_baseline_is_read_from_the_manifest():
    assert baseline_from_manifest(None) is None
    assert baseline_from_manifest({"run_id": "r9", "normalized_average": 0.7}) == PublishedBaseline("r9", 0.7)
    assert baseline_from_manifest({"run_id": "r9"}) == PublishedBaseline("r9", None)


@pytest.mark.parametrize(
    ("patch", "fragment"),
    [
        ({"gate": {}}, "gate: set 'min_avg_norm' and/or 'no_regression: true'"),
        ({"gate": {"min_avg_norm": -1}}, "gate.min_avg_norm"),
        ({"gate": {"min_avg_norm": 0.5, "minimum": 1}}, "gate.minimum: unknown key"),
        ({"gate": {"no_regression": True}}, "add a 'publish' section"),
        ({"gate": {"min_avg_norm": 0.5}, "evaluation": None}, "needs an 'evaluation' section"),
    ],
)
def test_bad_gate_sections_name_the_key(patch, fragment):
    data = {**EVALUATED, **patch}
    if data.get("evaluation") is None:
        data.pop("evaluation")
    with pytest.raises(RecipeError) as info:
        parse_recipe(data)
    assert fragment in str(info.value)


def test_a_valid_gate_parses():
    recipe = parse_recipe({**EVALUATED, "publish": {"target": "/out"}, "gate": {"min_avg_norm": 0.4, "no_regression": True}})
    assert recipe.gate == Gate(min_avg_norm=0.4, no_regression=True, tolerance=0.0)
