"""`metamerge compare`: every method through the cached pipeline, one paper-style table."""

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file
from typer.testing import CliRunner

from metamerge_prefect.cli import app, demo_recipe
from tests.flowtools import task_states

pytestmark = [pytest.mark.slow, pytest.mark.quality, pytest.mark.usefixtures("restore_environment")]




def test_compare_writes_the_table_from_real_merges_and_reuses_the_pipeline(zoo, isolated_results, tmp_path):
    skills = ["capitals", "reverse"]
    recipe = demo_recipe(zoo, None, tmp_path / "work", skills=skills)
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    result = CliRunner().invoke(app, ["compare", str(tmp_path / "recipe.yaml"), "--methods", "metagpt,task_arithmetic",
                                      "--out", str(tmp_path / "out"), "--stem", "q"])
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "out" / "q.json").read_text())
    tasks = [zoo.task_names[s] for s in skills]
    assert set(data) == {"base", "finetune:capitals", "finetune:reverse", "metagpt", "task_arithmetic"}
    own = {task: data[f"finetune:{skill}"][task] for skill, task in zip(skills, tasks, strict=True)}
    for row in ("base", "metagpt", "task_arithmetic"):
        scores = data[row]
        assert scores["avg_abs"] == pytest.approx(sum(scores[t] for t in tasks) / 2, abs=1e-4)
        assert scores["avg_norm"] == pytest.approx(sum(scores[t] / own[t] for t in tasks) / 2, abs=1e-4)
    assert (tmp_path / "out" / "q.png").stat().st_size > 10_000
    markdown = (tmp_path / "out" / "q.md").read_text()
    assert "| fine-tune `capitals` |" in markdown and "best by avg_norm" in result.output

    # the metagpt row's λ are the paper's closed form on the two task vectors, recomputed here
    base = load_file(str(zoo.base / "model.safetensors"))
    norms = {}
    for skill in skills:
        ft = load_file(str(zoo.finetunes[skill] / "model.safetensors"))
        norms[skill] = sum(float(torch.sum((ft[k].double() - base[k].double()) ** 2)) for k in base)
    assert f"capitals {norms['capitals'] / sum(norms.values()):.3f}" in markdown

    # every number in the table, computed independently: the zoo's recorded base and fine-tune scores,
    # and each method's merge built here from θ₀ + Σ λ τ and scored with the zoo's own scorer
    from tests.zoo_reference import accuracy_of_state, merged_state, one_example

    lam = {"metagpt": {k: v / sum(norms.values()) for k, v in norms.items()}, "task_arithmetic": dict.fromkeys(skills, 0.3)}
    for task in tasks:
        one = one_example(zoo, task)
        assert data["base"][task] == pytest.approx(zoo.base_score(task), abs=one), task
        for method, weights in lam.items():
            want = accuracy_of_state(zoo, merged_state(zoo, weights), task)
            assert data[method][task] == pytest.approx(want, abs=one), (method, task, want)
    for skill, task in zip(skills, tasks, strict=True):
        assert own[task] == pytest.approx(zoo.own_score(skill), abs=one_example(zoo, task)), skill

    # both methods went through one cached pipeline: the second subflow re-scored nothing it had
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName
    from prefect.client.schemas.sorting import FlowRunSort

    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(like_="zoo-metagpt · ")),
                                     sort=FlowRunSort.START_TIME_ASC)
    second = [r for r in runs if r.name.endswith("task_arithmetic")][-1]
    states = task_states(second.id)
    assert states["evaluate base on ('zoo_capitals',)"] == ["Cached"]
    assert states["evaluate capitals on ('zoo_capitals',)"] == ["Cached"]
    assert states["evaluate merged on ('zoo_capitals',)"] == ["Completed"]
