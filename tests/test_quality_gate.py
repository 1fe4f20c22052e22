"""The quality gate inside merge_flow: a merge that is not good enough is never published."""

import pytest

from metamerge.io.manifests import latest_manifest
from tests.flowtools import bucket_keys, flow_artifacts, zoo_recipe
from tests.zoo_reference import one_example

pytestmark = [pytest.mark.slow, pytest.mark.quality]


def test_gate_refuses_a_regression_and_a_low_score_and_publishes_nothing(zoo, s3_endpoint, bucket, prefect_api, tmp_path):
    from metamerge_prefect.flows.merge_flow import merge_flow

    # one fine-tune: λ = 1, so the first merge is that fine-tune (avg_norm ≈ 1) and a near-base merge
    # falls below it by the zoo's contract (own ≥ bar, base ≤ ceiling) on any CPU
    recipe = zoo_recipe(zoo, s3_endpoint, bucket, tmp_path / "work", skills=["capitals"], gate={"no_regression": True})
    first = merge_flow(recipe, return_state=True)
    assert first.is_completed(), first.message
    summary = first.result()
    assert summary["gate"].startswith("quality gate passed: no earlier publish")
    manifest = latest_manifest(recipe["publish"]["target"], recipe["name"], s3_endpoint)
    assert manifest["run_id"] == summary["run_id"]
    assert manifest["normalized_average"] == pytest.approx(summary["normalized_average"])
    records = {r["model"]: r for r in summary["scores"]}
    assert summary["normalized_average"] == pytest.approx(1.0, abs=one_example(zoo, "zoo_capitals"))
    assert records["base"]["avg_norm"] <= zoo.contract["base_ceiling"] / zoo.contract["bar"] + 0.05

    # a merge that is (almost) the base: below the published one, so it must not be published
    published_keys = bucket_keys(s3_endpoint, bucket)
    worse = {**recipe, "method": {"name": "task_arithmetic", "lambda": 0.01}}
    state = merge_flow(worse, return_state=True)
    assert state.is_failed()
    assert "quality gate FAILED: normalized average" in state.message
    assert f"vs last published {summary['run_id']} {summary['normalized_average']:.4f}" in state.message
    assert "not published" in state.message
    assert bucket_keys(s3_endpoint, bucket) == published_keys
    assert latest_manifest(recipe["publish"]["target"], recipe["name"], s3_endpoint)["run_id"] == summary["run_id"]
    artifacts = flow_artifacts(state.state_details.flow_run_id, expect=("quality-gate", "merge-scores"))
    assert artifacts["quality-gate"][0]["result"] == "fail"
    scores = {r["model"]: r for r in artifacts["merge-scores"]}
    assert scores["merged (task_arithmetic)"]["avg_norm"] < summary["normalized_average"]
    assert "Quality gate: FAILED, not published" in artifacts["merge-report"]

    # a floor alone (no regression check): the near-base merge is far below it, and is not published
    strict = {**worse, "gate": {"min_avg_norm": 0.999}}
    state = merge_flow(strict, return_state=True)
    assert state.is_failed() and "vs minimum 0.9990" in state.message
    assert bucket_keys(s3_endpoint, bucket) == published_keys
    worse_norm = scores["merged (task_arithmetic)"]["avg_norm"]
    assert flow_artifacts(state.state_details.flow_run_id, expect=("quality-gate",))["quality-gate"] == [
        {"check": f"normalized average {worse_norm:.4f} vs minimum 0.9990", "result": "fail"}]
