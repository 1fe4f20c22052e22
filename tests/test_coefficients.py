import numpy as np
import pytest

from metamerge.coefficients import group_of, metagpt_lambdas, solve_constant, solve_metagpt


def _numpy_metagpt(task_vectors: list[dict[str, np.ndarray]], group) -> dict[str, list[float]]:
    """Independent reference: λ_t = ‖τ_t‖² / Σ_k ‖τ_k‖² over the tensors of each group."""
    groups: dict[str, list[float]] = {}
    for name in task_vectors[0]:
        g = group(name)
        sums = groups.setdefault(g, [0.0] * len(task_vectors))
        for t, tv in enumerate(task_vectors):
            sums[t] += float(np.sum(tv[name].astype(np.float64) ** 2))
    return {g: [s / sum(v) for s in v] for g, v in groups.items()}


@pytest.mark.parametrize("granularity", ["model", "layer", "tensor"])
def test_metagpt_matches_numpy(granularity):
    rng = np.random.default_rng(7)
    names = ["model.embed_tokens.weight", "model.layers.0.q.weight", "model.layers.0.k.weight",
             "model.layers.1.q.weight", "lm_head.weight"]
    shapes = [(11, 3), (3, 3), (3, 5), (7,), (11, 3)]
    tvs = [{n: rng.normal(scale=s * (1 + i), size=shape) for i, (n, shape) in enumerate(zip(names, shapes, strict=True))}
           for s in (0.1, 0.5, 2.0)]
    norms = {f"t{t}": {n: float(np.sum(tv[n] ** 2)) for n in names} for t, tv in enumerate(tvs)}
    got = solve_metagpt(["t0", "t1", "t2"], norms, granularity)
    want = _numpy_metagpt(tvs, lambda n: group_of(n, granularity))
    assert set(got.groups) == set(want)
    for g in want:
        np.testing.assert_allclose(got.groups[g], want[g], rtol=1e-12)
        assert abs(sum(got.groups[g]) - 1) < 1e-12
    for n in names:
        np.testing.assert_allclose(got.weights_for(n), want[group_of(n, granularity)], rtol=1e-12)
    if granularity == "layer":
        assert got.tensor_groups["model.layers.0.q.weight"] == got.tensor_groups["model.layers.0.k.weight"]
        assert got.tensor_groups["model.layers.1.q.weight"] != got.tensor_groups["model.layers.0.q.weight"]


def test_paper_formula_on_known_norms():
    assert metagpt_lambdas([1.0, 3.0]) == [0.25, 0.75]
    assert metagpt_lambdas([0.0, 0.0]) == [0.5, 0.5]


def test_constant_solvers():
    c = solve_constant(["a", "b", "c"], 0.3, "task_arithmetic")
    assert c.weights_for("anything") == [0.3, 0.3, 0.3]
    assert c.model_level() == {"a": 0.3, "b": 0.3, "c": 0.3}
