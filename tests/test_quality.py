"""The comparison table's shape, files and parsing of --methods (no Prefect, no models)."""

import json

import pytest

from metamerge.errors import RecipeError
from metamerge.evaluation.compare import Comparison, method_label, parse_method


def _run(merged_label: str, merged: dict, lam: dict) -> dict:
    records = [
        {"model": "base", "t1": 0.25, "t2": 0.2, "avg_abs": 0.225, "avg_norm": 0.25},
        {"model": "a", "t1": 1.0, "t2": None, "avg_abs": 1.0, "avg_norm": None},
        {"model": "b", "t1": None, "t2": 0.8, "avg_abs": 0.8, "avg_norm": None},
        {"model": merged_label, **merged},
    ]
    return {"scores": records, "coefficients": lam}


RUNS = {
    "metagpt": _run("merged (metagpt)", {"t1": 0.9, "t2": 0.4, "avg_abs": 0.65, "avg_norm": 0.7}, {"a": 0.6, "b": 0.4}),
    "ties": _run("merged (ties)", {"t1": 0.5, "t2": 0.6, "avg_abs": 0.55, "avg_norm": 0.625}, {"a": 1.0, "b": 1.0}),
}


def test_rows_are_base_then_finetunes_then_methods(tmp_path):
    comparison = Comparison.from_runs(RUNS)
    assert comparison.tasks == ("t1", "t2")
    assert list(comparison.rows) == ["base", "a", "b", "metagpt", "ties"]
    assert comparison.kinds == {"base": "base", "a": "fine-tune", "b": "fine-tune", "metagpt": "method", "ties": "method"}
    assert comparison.best_method() == "metagpt"

    paths = comparison.write(tmp_path, "q", title="demo")
    data = json.loads(paths["json"].read_text())
    assert data["metagpt"] == {"t1": 0.9, "t2": 0.4, "avg_abs": 0.65, "avg_norm": 0.7}
    assert data["finetune:a"]["t1"] == 1.0 and data["finetune:a"]["t2"] is None
    # the normalized average is the mean of score / own fine-tune's score, recomputed here
    own = {"t1": data["finetune:a"]["t1"], "t2": data["finetune:b"]["t2"]}
    for method in ("metagpt", "ties"):
        assert data[method]["avg_norm"] == pytest.approx(sum(data[method][t] / own[t] for t in own) / 2)

    markdown = paths["markdown"].read_text()
    assert "| **metagpt** | 0.900 | 0.400 | 0.650 | 0.700 |" in markdown
    assert "| fine-tune `b` |  | 0.800 | 0.800 |  |" in markdown
    assert "| ties | a 1.000, b 1.000 |" in markdown

    import matplotlib.image

    image = matplotlib.image.imread(paths["chart"])
    assert image.ndim == 3 and image.shape[0] > 300 and image.shape[1] > 600
    assert image[..., :3].std() > 0.05  # bars were drawn, not a blank canvas


def test_no_scores_is_a_clear_error():
    with pytest.raises(RecipeError, match="needs an 'evaluation' section"):
        Comparison.from_runs({"metagpt": {"scores": None}})


def test_method_specs():
    assert method_label(parse_method("metagpt:tensor")) == "metagpt:tensor"
    assert method_label(parse_method("metagpt")) == "metagpt"
    assert parse_method("dare", seed=7).seed == 7
    assert parse_method(" ties ").name == "ties"
    with pytest.raises(RecipeError, match="unknown method 'tie'"):
        parse_method("tie")
    with pytest.raises(RecipeError, match="invalid method 'ties:layer'"):
        parse_method("ties:layer")
