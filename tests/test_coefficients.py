import numpy as np
import pytest

from metamerge.engine.coefficients import metagpt_lambdas, solve_constant, solve_metagpt

NAMES = ["model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight", "model.layers.0.mlp.up_proj.weight",
         "model.layers.1.self_attn.q_proj.weight", "model.layers.1.input_layernorm.weight", "model.layers.10.mlp.up_proj.weight",
         "model.norm.weight", "lm_head.weight"]
SHAPES = [(11, 3), (3, 3), (3, 5), (3, 3), (3,), (4, 3), (3,), (11, 3)]
# the grouping each granularity must use, written out by hand (not computed by the code under test):
# `layer` puts each transformer block's tensors together (layers.1 and layers.10 are different blocks);
# tensors outside the blocks (embedding, final norm, lm_head) are groups of their own
GROUPS = {
    "model": {name: "model" for name in NAMES},
    "layer": {"model.embed_tokens.weight": "model.embed_tokens.weight",
              "model.layers.0.self_attn.q_proj.weight": "layer.0", "model.layers.0.mlp.up_proj.weight": "layer.0",
              "model.layers.1.self_attn.q_proj.weight": "layer.1", "model.layers.1.input_layernorm.weight": "layer.1",
              "model.layers.10.mlp.up_proj.weight": "layer.10",
              "model.norm.weight": "model.norm.weight", "lm_head.weight": "lm_head.weight"},
    "tensor": {name: name for name in NAMES},
}


def _numpy_metagpt(task_vectors: list[dict[str, np.ndarray]], grouping: dict[str, str]) -> dict[str, list[float]]:
    """Independent reference: λ_t = ‖τ_t‖² / Σ_k ‖τ_k‖² over the tensors of each group."""
    groups: dict[str, list[float]] = {}
    for name in task_vectors[0]:
        sums = groups.setdefault(grouping[name], [0.0] * len(task_vectors))
        for t, tv in enumerate(task_vectors):
            sums[t] += float(np.sum(tv[name].astype(np.float64) ** 2))
    return {g: [s / sum(v) for s in v] for g, v in groups.items()}


@pytest.mark.parametrize("granularity", ["model", "layer", "tensor"])
def test_metagpt_matches_numpy(granularity):
    rng = np.random.default_rng(7)
    # each task's scale differs from tensor to tensor, so every grouping gives different λ
    tvs = [{n: rng.normal(scale=s * (1 + i) ** (t + 1), size=shape)
            for i, (n, shape) in enumerate(zip(NAMES, SHAPES, strict=True))} for t, s in enumerate((0.1, 0.5, 2.0))]
    norms = {f"t{t}": {n: float(np.sum(tv[n] ** 2)) for n in NAMES} for t, tv in enumerate(tvs)}
    got = solve_metagpt(["t0", "t1", "t2"], norms, granularity)
    grouping = GROUPS[granularity]
    want = _numpy_metagpt(tvs, grouping)
    assert len(want) == {"model": 1, "layer": 6, "tensor": 8}[granularity]
    assert got.tensor_groups == grouping
    assert set(got.groups) == set(want)
    for g in want:
        np.testing.assert_allclose(got.groups[g], want[g], rtol=1e-12)
        assert abs(sum(got.groups[g]) - 1) < 1e-12
    for n in NAMES:
        np.testing.assert_allclose(got.weights_for(n), want[grouping[n]], rtol=1e-12)


def test_paper_formula_on_known_norms():
    assert metagpt_lambdas([1.0, 3.0]) == [0.25, 0.75]
    assert metagpt_lambdas([0.0, 0.0]) == [0.5, 0.5]


def test_constant_solvers():
    c = solve_constant(["a", "b", "c"], 0.3, "task_arithmetic")
    assert c.weights_for("anything") == [0.3, 0.3, 0.3]
    assert c.model_level() == {"a": 0.3, "b": 0.3, "c": 0.3}
