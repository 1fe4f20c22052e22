"""Which Dask workers the merge shards and evaluations go to (runner: dask; docs/scaling.md).

Workers declare a GPU as a Dask worker resource (`dask worker --resources GPU=1`; the name is
`runner.gpu_resource`). GPU work is pinned to them when there are any; with none it runs on
CPU workers, a device of `cuda` falls back to `cpu`, and the report says so, rather than
failing on a worker that has no GPU or, worse, splitting one merge over two kinds of device.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from metamerge.recipe import Recipe


@dataclass
class Placement:
    gpu_workers: int
    merge_on_gpu: bool
    evaluation_on_gpu: bool
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"gpu_workers": self.gpu_workers, "merge_on_gpu": self.merge_on_gpu,
                "evaluation_on_gpu": self.evaluation_on_gpu, "notes": self.notes}


def place(recipe: Recipe, gpu_workers: int) -> tuple[Recipe, Placement]:
    """The recipe to run (devices possibly falling back to cpu) and where its GPU work goes."""
    resource = recipe.runner.gpu_resource
    evaluation = recipe.evaluation
    placement = Placement(gpu_workers, merge_on_gpu=gpu_workers > 0 and recipe.merge.device in ("auto", "cuda"),
                          evaluation_on_gpu=gpu_workers > 0 and evaluation is not None
                          and evaluation.device in ("auto", "cuda"))
    if placement.merge_on_gpu:
        placement.notes.append(f"merge shards ran on the {gpu_workers} worker(s) that declare a {resource} resource")
    elif recipe.merge.device == "cuda":
        recipe = recipe.model_copy(update={"merge": recipe.merge.model_copy(update={"device": "cpu"})})
        placement.notes.append(f"merge.device is cuda but no Dask worker declares a {resource} resource: "
                               "the merge ran on CPU workers")
    if placement.evaluation_on_gpu:
        placement.notes.append(f"evaluations ran on the {gpu_workers} worker(s) that declare a {resource} resource")
    elif evaluation is not None and evaluation.device == "cuda":
        recipe = recipe.model_copy(update={"evaluation": evaluation.model_copy(update={"device": "cpu"})})
        placement.notes.append(f"evaluation.device is cuda but no Dask worker declares a {resource} resource: "
                               "evaluations ran on CPU workers")
    elif evaluation is not None and gpu_workers == 0:
        placement.notes.append(f"no Dask worker declares a {resource} resource: evaluations ran on CPU workers")
    return recipe, placement
