"""Best of several (`candidates:`): each candidate merged and scored once, the best one gated and published."""

import json

import pytest

from metamerge.io.s3 import s3_client
from tests.flowtools import task_states, zoo_recipe

pytestmark = pytest.mark.slow


def test_candidates_publish_the_best_by_normalized_average_merging_each_once(zoo, s3_endpoint, bucket, prefect_api,
                                                                             tmp_path):
    from metamerge_prefect.flows.merge_flow import merge_flow

    recipe = zoo_recipe(zoo, s3_endpoint, bucket, tmp_path / "work", skills=["capitals", "reverse"])
    single = {name: merge_flow({**recipe, "method": {"name": name}, "publish": None})
              for name in ("metagpt", "task_arithmetic")}  # each alone: the independent verdict
    recipe.pop("method")
    recipe["candidates"] = ["metagpt", "task_arithmetic"]
    state = merge_flow(recipe, return_state=True)
    assert state.is_completed(), state.message
    summary = state.result()

    want = max(single, key=lambda name: single[name]["normalized_average"])
    assert summary["chosen"] == want
    assert {c["method"]: c["avg_norm"] for c in summary["candidates"]} == pytest.approx(
        {name: run["normalized_average"] for name, run in single.items()}, abs=1e-4)  # the table rounds to 4 places
    assert summary["merged_fingerprint"] == single[want]["merged_fingerprint"]
    # the winner's run merged and scored nothing again: every merge and evaluation came from the cache
    states = task_states(summary["flow_run_id"], expect={"merge"})
    heavy = {name: runs for name, runs in states.items() if name == "merge" or name.startswith("evaluate")}
    assert heavy and all(state == "Cached" for runs in heavy.values() for state in runs), heavy

    client = s3_client(s3_endpoint)
    manifest_key = summary["published"]["manifest_uri"].removeprefix(f"s3://{bucket}/")
    manifest = json.loads(client.get_object(Bucket=bucket, Key=manifest_key)["Body"].read())
    assert manifest["method"] == want
    run_prefix = manifest_key.rsplit("/", 1)[0]
    candidates = json.loads(client.get_object(Bucket=bucket, Key=f"{run_prefix}/candidates.json")["Body"].read())
    assert [c["method"] for c in candidates if c["chosen"]] == [want] and len(candidates) == 2
    report = client.get_object(Bucket=bucket, Key=f"{run_prefix}/report.md")["Body"].read().decode()
    assert "## Candidates (best of 2 by avg_norm)" in report and "task_arithmetic" in report


def test_candidates_are_validated():
    from metamerge.errors import RecipeError
    from metamerge.recipe import parse_recipe

    base = {"name": "m", "base": "b", "finetunes": [{"ref": "f", "tasks": ["t"]}], "evaluation": {}}
    with pytest.raises(RecipeError, match="either 'method' or 'candidates'"):
        parse_recipe({**base, "method": "ties", "candidates": ["metagpt", "ties"]})
    with pytest.raises(RecipeError, match="at least two"):
        parse_recipe({**base, "candidates": ["metagpt"]})
    with pytest.raises(RecipeError, match="add an 'evaluation' section"):
        parse_recipe({k: v for k, v in base.items() if k != "evaluation"} | {"candidates": ["metagpt", "ties"]})
    assert [c.name for c in parse_recipe({**base, "candidates": ["metagpt", {"name": "dare", "seed": 1}]}).candidates] \
        == ["metagpt", "dare"]
