"""Where GPU work goes on Dask: `place` decides from the number of workers that declare a GPU."""

from __future__ import annotations

import pytest

from metamerge.pipeline.placement import place
from metamerge.recipe import Recipe


def _recipe(merge_device: str, eval_device: str | None, resource: str = "GPU") -> Recipe:
    data = {"name": "r", "base": "/b", "finetunes": [{"ref": "/f", "name": "f", "tasks": ["t"]}],
            "merge": {"device": merge_device}, "workdir": "/w",
            "runner": {"kind": "dask", "gpu_resource": resource}}
    if eval_device is not None:
        data["evaluation"] = {"device": eval_device}
    return Recipe.model_validate(data)


@pytest.mark.parametrize(("merge_device", "eval_device", "gpus", "merge_gpu", "eval_gpu", "merge_after", "eval_after"), [
    ("auto", "auto", 2, True, True, "auto", "auto"),
    ("cuda", "cuda", 1, True, True, "cuda", "cuda"),
    ("cpu", "cpu", 1, False, False, "cpu", "cpu"),  # asked for CPU: stays on any worker
    ("cuda", "cuda", 0, False, False, "cpu", "cpu"),  # no GPU worker: falls back, never fails on a CPU worker
    ("auto", "auto", 0, False, False, "auto", "auto"),
])
def test_gpu_work_is_placed_or_falls_back(merge_device, eval_device, gpus, merge_gpu, eval_gpu, merge_after, eval_after):
    recipe, placement = place(_recipe(merge_device, eval_device, "A100"), gpus)
    assert (placement.merge_on_gpu, placement.evaluation_on_gpu) == (merge_gpu, eval_gpu)
    assert recipe.merge.device == merge_after and recipe.evaluation.device == eval_after
    notes = " | ".join(placement.notes)
    if gpus and merge_gpu:
        assert f"merge shards ran on the {gpus} worker(s) that declare a A100 resource" in notes
    if not gpus and merge_device == "cuda":
        assert "merge.device is cuda but no Dask worker declares a A100 resource" in notes
        assert "evaluation.device is cuda but no Dask worker declares a A100 resource" in notes
    if not gpus and eval_device == "auto":
        assert notes == "no Dask worker declares a A100 resource: evaluations ran on CPU workers"


def test_runner_options_of_dask_are_refused_for_the_local_runner():
    with pytest.raises(ValueError, match="'inputs' applies only to kind 'dask'"):
        Recipe.model_validate({"name": "r", "base": "/b", "finetunes": [{"ref": "/f", "tasks": ["t"]}],
                               "runner": {"inputs": "download"}})
    assert _recipe("auto", None).runner.inputs == "ranged"  # the default on Dask
