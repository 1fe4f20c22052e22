"""A nightly recipe mixing two trained LoRA adapters and one full fine-tune, end to end in the flow."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from metamerge.io.s3 import s3_client
from tests.flowtools import zoo_recipe
from tests.lora_helpers import materialize, train_adapter
from tests.zoo_reference import accuracy_of_state, merged_state, one_example

pytestmark = [pytest.mark.slow, pytest.mark.quality]  # the adapters are trained: verdicts follow the CPU kernels


def test_two_adapters_and_a_full_finetune_merge_evaluate_and_publish(zoo, s3_endpoint, bucket, prefect_api, tmp_path):
    from metamerge_prefect.flows.merge_flow import merge_flow

    adapters = {skill: train_adapter(zoo, skill, tmp_path / f"lora-{skill}") for skill in ("shift", "backshift")}
    recipe = zoo_recipe(zoo, s3_endpoint, bucket, tmp_path / "work", skills=["capitals", "shift", "backshift"],
                        name="zoo-lora")
    for entry in recipe["finetunes"]:
        entry["ref"] = str(adapters.get(entry["name"], entry["ref"]))
    state = merge_flow(recipe, return_state=True)
    assert state.is_completed(), state.message
    summary = state.result()

    # the same adapters merged into the base by peft: the independent reference for every number
    full = {skill: materialize(zoo.base, path, tmp_path / f"full-{skill}") for skill, path in adapters.items()}
    folders = {"capitals": zoo.finetunes["capitals"], **full}
    base = load_file(str(zoo.base / "model.safetensors"))
    norms = {}
    for skill, folder in folders.items():
        ft = load_file(str(folder / "model.safetensors"))
        norms[skill] = sum(float(torch.sum((ft[k].double() - base[k].double()) ** 2)) for k in base)
    for skill, lam in summary["coefficients"].items():
        assert lam == pytest.approx(norms[skill] / sum(norms.values()), rel=1e-6), skill

    records = {r["model"]: r for r in summary["scores"]}
    for skill, folder in folders.items():  # lm-eval scored each adapter on its base as peft merges it
        task = zoo.task_names[skill]
        want = accuracy_of_state(zoo, load_file(str(folder / "model.safetensors")), task)
        assert records[skill][task] == pytest.approx(want, abs=one_example(zoo, task)), skill
        assert records[skill][task] > records["base"][task]  # each input learned its skill
    reference = merged_state(zoo, summary["coefficients"], folders)
    for skill in folders:
        task = zoo.task_names[skill]
        assert records["merged (metagpt)"][task] == pytest.approx(accuracy_of_state(zoo, reference, task),
                                                                  abs=one_example(zoo, task)), task

    client = s3_client(s3_endpoint)
    key = summary["published"]["manifest_uri"].removeprefix(f"s3://{bucket}/")
    manifest = json.loads(client.get_object(Bucket=bucket, Key=key)["Body"].read())
    assert {str(p) for p in adapters.values()} <= set(manifest["inputs"]["finetunes"])
    merged = {}
    for name in manifest["files"]:
        if name.endswith(".safetensors"):
            body = client.get_object(Bucket=bucket, Key=key.rsplit("/", 1)[0] + "/" + name)["Body"].read()
            from safetensors.torch import load

            merged.update(load(body))
    for name, value in reference.items():
        if value.is_floating_point():
            torch.testing.assert_close(merged[name], value, rtol=1e-5, atol=1e-5)
