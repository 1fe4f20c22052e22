"""LoRA adapters as fine-tunes, checked against the same adapters merged into the base by peft itself."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from metamerge.engine.coefficients import solve_constant, solve_metagpt
from metamerge.engine.lora import LoraAdapter, check_adapter_base
from metamerge.engine.merge import merge_checkpoints
from metamerge.engine.taskvectors import extract_stats
from metamerge.errors import CheckpointError
from metamerge.methods.registry import plan_for
from metamerge.recipe import Method
from tests.lora_helpers import make_adapter, materialize


@pytest.fixture(scope="module")
def adapters(zoo, tmp_path_factory):
    """Three adapters of the zoo's base (one with rsLoRA, an embedding target and a full lm_head) and
    each one merged into the base by peft's merge_and_unload()."""
    root = tmp_path_factory.mktemp("lora")
    made = {
        "a": make_adapter(zoo.base, root / "a", seed=1),
        "b": make_adapter(zoo.base, root / "b", seed=2, r=8, lora_alpha=4, use_rslora=True,
                          target_modules=["q_proj", "k_proj", "down_proj", "embed_tokens"]),
        "c": make_adapter(zoo.base, root / "c", seed=3, target_modules=["o_proj", "gate_proj"],
                          modules_to_save=["lm_head"]),
    }
    full = {label: materialize(zoo.base, path, root / f"{label}-full") for label, path in made.items()}
    return made, full


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-30)


def test_norms_from_r_by_r_products_equal_the_materialized_task_vectors(zoo, adapters):
    made, full = adapters
    for label in made:
        fast = extract_stats(zoo.base, made[label], label)
        slow = extract_stats(zoo.base, full[label], label)
        assert set(fast.sq_norms) == set(slow.sq_norms)
        changed = {k for k, v in slow.sq_norms.items() if v > 0}
        assert changed == {k for k, v in fast.sq_norms.items() if v > 0} and changed
        for name in changed:
            assert _rel(fast.sq_norms[name], slow.sq_norms[name]) < 1e-5, name  # per tensor: fp32 rounding of θ₀+τ
        assert _rel(fast.total_sq_norm, slow.total_sq_norm) < 1e-6, label
        assert _rel(fast.relative_norm, slow.relative_norm) < 1e-6, label
    tasks = list(made)
    lam_fast = solve_metagpt(tasks, {t: extract_stats(zoo.base, made[t], t).sq_norms for t in tasks}).model_level()
    lam_slow = solve_metagpt(tasks, {t: extract_stats(zoo.base, full[t], t).sq_norms for t in tasks}).model_level()
    for t in tasks:
        assert _rel(lam_fast[t], lam_slow[t]) < 1e-6
    assert len({round(v, 3) for v in lam_fast.values()}) == 3  # three different λ: the check can fail


def test_sq_norm_identity_against_the_m_by_n_product(zoo, adapters):
    """s²·tr((BᵀB)(AAᵀ)) is ‖s·B·A‖² computed independently in float64."""
    made, _ = adapters
    from metamerge.engine.checkpoint import CheckpointReader

    adapter = LoraAdapter(made["b"], "b", CheckpointReader(zoo.base))
    raw = load_file(str(made["b"] / "adapter_model.safetensors"))
    config = json.loads((made["b"] / "adapter_config.json").read_text())
    scale = config["lora_alpha"] / math.sqrt(config["r"])  # rsLoRA
    name = "model.layers.0.self_attn.k_proj.weight"
    a = raw["base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight"].double()
    b = raw["base_model.model.model.layers.0.self_attn.k_proj.lora_B.weight"].double()
    assert adapter.sq_norm(name) == pytest.approx(float(torch.sum((scale * b @ a) ** 2)), rel=1e-12)
    emb = adapter.delta("model.embed_tokens.weight", rows=(3, 9))
    a = raw["base_model.model.model.embed_tokens.lora_embedding_A"].double()
    b = raw["base_model.model.model.embed_tokens.lora_embedding_B"].double()
    torch.testing.assert_close(emb.double(), (scale * (b @ a).T)[3:9], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("method", ["metagpt", "ties", "dare"])
def test_merging_adapters_equals_merging_what_peft_materializes(zoo, adapters, tmp_path, method):
    made, full = adapters
    tasks = list(made)
    plan = plan_for(Method(name=method, **({"seed": 0} if method == "dare" else {})))
    if method == "metagpt":
        coefficients = solve_metagpt(tasks, {t: extract_stats(zoo.base, full[t], t).sq_norms for t in tasks})
    else:
        coefficients = solve_constant(tasks, 1.0, method)
    via_adapters = merge_checkpoints(zoo.base, list(made.items()), coefficients, plan, tmp_path / "a", dtype="float32")
    via_full = merge_checkpoints(zoo.base, list(full.items()), coefficients, plan, tmp_path / "f", dtype="float32")
    merged_a, merged_f = load_file(str(tmp_path / "a" / "model.safetensors")), load_file(str(tmp_path / "f" / "model.safetensors"))
    assert set(merged_a) == set(merged_f)
    for name in merged_f:
        torch.testing.assert_close(merged_a[name], merged_f[name], rtol=1e-6, atol=1e-6)
    def cosines(gram):
        return [[gram[i][j] / math.sqrt(gram[i][i] * gram[j][j]) for j in range(len(gram))] for i in range(len(gram))]

    for row_a, row_f in zip(cosines(via_adapters.gram), cosines(via_full.gram), strict=True):  # the report's cosines
        for x, y in zip(row_a, row_f, strict=True):
            assert abs(x - y) <= 1e-6 * max(abs(y), 1e-3), (x, y)
    base = load_file(str(Path(zoo.base) / "model.safetensors"))
    assert any(not torch.equal(merged_f[k], base[k]) for k in base)  # the merge changed something


def _bad_copy(adapter: Path, folder: Path, *, config: dict | None = None, tensors=None) -> Path:
    folder.mkdir()
    data = json.loads((adapter / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**data, **(config or {})}))
    weights = load_file(str(adapter / "adapter_model.safetensors"))
    save_file(tensors(weights) if tensors else weights, str(folder / "adapter_model.safetensors"))
    return folder


def test_bad_adapters_fail_with_one_clear_line(zoo, adapters, tmp_path):
    made, _ = adapters
    a = made["a"]
    cases = {
        "DoRA adapters are not supported": _bad_copy(a, tmp_path / "dora", config={"use_dora": True}),
        "target 'model.layers.0.self_attn.qq_proj.weight' is not in the base": _bad_copy(
            a, tmp_path / "missing", tensors=lambda w: {k.replace("layers.0.self_attn.q_proj", "layers.0.self_attn.qq_proj"): v
                                                         for k, v in w.items()}),
        "shape mismatch for 'model.layers.0.self_attn.q_proj.weight'": _bad_copy(
            a, tmp_path / "shape", tensors=lambda w: {k: (torch.zeros(v.shape[0], v.shape[1] + 1) if
                                                          k.endswith("layers.0.self_attn.q_proj.lora_A.weight") else v)
                                                      for k, v in w.items()}),
        "has only one of its two LoRA matrices": _bad_copy(
            a, tmp_path / "half", tensors=lambda w: {k: v for k, v in w.items() if "layers.1.mlp.up_proj.lora_B" not in k}),
        "peft_type 'IA3' is not supported": _bad_copy(a, tmp_path / "ia3", config={"peft_type": "IA3"}),
    }
    corrupt = _bad_copy(a, tmp_path / "corrupt")
    body = (corrupt / "adapter_model.safetensors").read_bytes()
    (corrupt / "adapter_model.safetensors").write_bytes(body[:6] + b"\xff" * 20)
    cases["is not a readable safetensors file"] = corrupt
    for says, folder in cases.items():
        with pytest.raises(CheckpointError) as failure:
            extract_stats(zoo.base, folder, "ft")
        message = str(failure.value)
        assert says in message and "'ft'" in message and "\n" not in message, (says, message)
    nan = _bad_copy(a, tmp_path / "nan", tensors=lambda w: {k: (v * float("nan") if "layers.1.mlp.up_proj.lora_B" in k else v)
                                                             for k, v in w.items()})
    with pytest.raises(CheckpointError, match="NaN or Inf"):
        extract_stats(zoo.base, nan, "ft")


def test_an_adapter_of_another_base_is_refused_where_that_can_be_told(zoo, adapters, tmp_path):
    made, full = adapters
    other = _bad_copy(made["a"], tmp_path / "other-base", config={"base_model_name_or_path": str(full["a"])})
    with pytest.raises(CheckpointError, match=r"trained on .*a-full.*but the recipe's base is"):
        check_adapter_base(other, "ft", str(zoo.base), zoo.base)
    same = _bad_copy(made["a"], tmp_path / "same-base", config={"base_model_name_or_path": str(zoo.base)})
    check_adapter_base(same, "ft", str(zoo.base), zoo.base)
    hub = _bad_copy(made["a"], tmp_path / "hub", config={"base_model_name_or_path": "org/other-model"})
    with pytest.raises(CheckpointError, match="org/other-model"):
        check_adapter_base(hub, "ft", "hf://org/base-model", zoo.base)
    check_adapter_base(hub, "ft", "hf://org/other-model@main", zoo.base)
    check_adapter_base(hub, "ft", str(zoo.base), zoo.base)  # a hub name against a local base: cannot tell


def test_adapters_resolve_through_s3_and_hf_refs(zoo, adapters, tmp_path, s3_endpoint, bucket, monkeypatch):
    """An adapter folder on S3 or in a Hugging Face cache is a fine-tune like a local one."""
    from metamerge import refs
    from tests.test_remote_refs import _hf_cache, _upload

    made, _ = adapters
    local = extract_stats(zoo.base, made["c"], "c")
    _upload(made["c"], s3_endpoint, bucket, "adapters/c")
    on_s3 = refs.resolve_ref(f"s3://{bucket}/adapters/c", tmp_path / "cache", s3_endpoint)
    assert extract_stats(zoo.base, on_s3.path, "c").sq_norms == local.sq_norms

    commit = "89abcdef0123456789abcdef0123456789abcdef"
    cache = tmp_path / "hf"
    _hf_cache(cache, "acme/lora-c", commit, made["c"])
    import huggingface_hub.constants as constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    on_hub = refs.resolve_ref("hf://acme/lora-c@main", tmp_path / "w")
    assert (on_hub.path / "adapter_config.json").exists()
    assert extract_stats(zoo.base, on_hub.path, "c").sq_norms == local.sq_norms


def test_fan_in_fan_out_and_trained_biases_of_a_gpt2_adapter(tmp_path):
    """GPT-2 stores its projections as Conv1D (in × out): peft's fan_in_fan_out, plus `bias: lora_only`."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=50, n_positions=16)).save_pretrained(
        tmp_path / "base", safe_serialization=True)
    adapter = make_adapter(tmp_path / "base", tmp_path / "adapter", seed=4, target_modules=["c_attn", "c_fc"],
                           fan_in_fan_out=True, bias="lora_only")
    keys = load_file(str(adapter / "adapter_model.safetensors"))
    assert any(k.endswith("c_attn.base_layer.bias") for k in keys)  # the trained biases are in the adapter
    full = materialize(tmp_path / "base", adapter, tmp_path / "full")
    fast, slow = extract_stats(tmp_path / "base", adapter, "g"), extract_stats(tmp_path / "base", full, "g")
    assert _rel(fast.total_sq_norm, slow.total_sq_norm) < 1e-6
    assert {k for k, v in fast.sq_norms.items() if v > 0} == {k for k, v in slow.sq_norms.items() if v > 0}
    assert any(k.endswith("c_attn.bias") and v > 0 for k, v in fast.sq_norms.items())
    coefficients = solve_constant(["g"], 0.7, "task_arithmetic")
    plan = plan_for(Method(name="task_arithmetic"))
    merge_checkpoints(tmp_path / "base", [("g", adapter)], coefficients, plan, tmp_path / "m1", dtype="float32")
    merge_checkpoints(tmp_path / "base", [("g", full)], coefficients, plan, tmp_path / "m2", dtype="float32")
    one, two = load_file(str(tmp_path / "m1" / "model.safetensors")), load_file(str(tmp_path / "m2" / "model.safetensors"))
    for name in two:
        torch.testing.assert_close(one[name], two[name], rtol=1e-6, atol=1e-6)


@pytest.mark.llm
def test_adapters_of_the_smollm2_zoo_match_their_materialized_merge(tmp_path):
    from metamerge.demo.llm_zoo import build_llm_zoo
    from tests.flowtools import REPO

    base = build_llm_zoo(REPO / ".cache" / "llm-zoo").base
    made = {f"l{i}": make_adapter(base, tmp_path / f"l{i}", seed=10 + i, r=16, lora_alpha=32, b_scale=0.005,
                                  target_modules=["q_proj", "v_proj", "down_proj"]) for i in range(2)}
    full = {label: materialize(base, path, tmp_path / f"{label}-full") for label, path in made.items()}
    fast = {label: extract_stats(base, path, label) for label, path in made.items()}
    slow = {label: extract_stats(base, path, label) for label, path in full.items()}
    for label in made:
        assert _rel(fast[label].total_sq_norm, slow[label].total_sq_norm) < 1e-6, label
    coefficients = solve_metagpt(list(made), {label: s.sq_norms for label, s in fast.items()})
    plan = plan_for(Method(name="metagpt"))
    a = merge_checkpoints(base, list(made.items()), coefficients, plan, tmp_path / "a", dtype="float32")
    f = merge_checkpoints(base, list(full.items()), coefficients, plan, tmp_path / "f", dtype="float32")
    from metamerge.engine.checkpoint import CheckpointReader

    ra, rf = CheckpointReader(tmp_path / "a"), CheckpointReader(tmp_path / "f")
    assert ra.names == rf.names
    for name in ra.names:
        torch.testing.assert_close(ra.read(name), rf.read(name), rtol=1e-6, atol=1e-6)
    assert _rel(a.gram[0][1], f.gram[0][1]) < 1e-5
