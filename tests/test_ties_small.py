"""TIES on tensors too small to bracket (norm weights): `ties.small_piece`, through the engine's
dispatcher, against the unfused kernels bit for bit and an independent stable sort."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from metamerge.engine import streaming
from metamerge.errors import CheckpointError
from metamerge.methods import compiled, selection, ties, ties_bands
from metamerge.methods.kernels import combine, sparsify_
from metamerge.methods.plan import MergePlan

LABELS = ["a", "b", "c"]

pytestmark = pytest.mark.skipif(not compiled.AVAILABLE, reason="the small path is compiled")


def _plan(**overrides) -> MergePlan:
    fields = dict(sparsify="magnitude", density=0.2, consensus="ties", weighting="constant", scale=1.0,
                  normalize=True)
    fields.update(overrides)
    return MergePlan(**fields)


def _stacked(kind: str, n: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(n)
    base = 1.0 + torch.randn(n, generator=gen) * 0.02  # a norm's weight: near one
    rows = [base] + [base + torch.randn(n, generator=gen) * 0.002 for _ in LABELS]
    stacked = torch.stack(rows)
    if kind == "bf16":  # few distinct |τ|: ties at every threshold
        stacked = stacked.to(torch.bfloat16).to(torch.float32)
    if kind == "sparse":  # most τ exactly zero: the threshold is 0, whose floor is not above SMALLEST_FLOOR
        stacked[1:, n // 10 :] = stacked[0, n // 10 :]
    return stacked


def _unfused(stacked: torch.Tensor, weights: torch.Tensor, plan: MergePlan) -> torch.Tensor:
    taus = stacked[1:] - stacked[0]
    sparsify_(taus, plan, LABELS, "w")
    return combine(taus, weights, plan).add_(stacked[0])


def _dispatched(stacked: torch.Tensor, weights: torch.Tensor, plan: MergePlan, monkeypatch) -> tuple:
    """`streaming._merge_piece` as the engine calls it for a small tensor, and whether the small path merged it."""
    taken = []
    original = ties.small_piece
    monkeypatch.setattr(ties, "small_piece", lambda *a: taken.append(original(*a)) or taken[-1])
    inputs = stacked.clone()
    out = torch.full((stacked.shape[1] + 5,), 7.0)  # the engine's workspace result, sliced to the piece
    merged, gram, base_sq = streaming._merge_piece(inputs, weights, plan, LABELS, "model.norm.weight", 0,
                                                   out[: stacked.shape[1]])
    small = bool(taken) and taken[0] is not None
    assert torch.equal(inputs, stacked) or not small  # the small path only reads (the unfused one makes τ in place)
    assert torch.equal(out[stacked.shape[1]:], torch.full((5,), 7.0))  # nothing past the piece
    return merged, gram, base_sq, small


@pytest.mark.parametrize("n", [1, 7, 768, selection.SELECT_MIN])
@pytest.mark.parametrize("kind", ["random", "bf16", "sparse"])
@pytest.mark.parametrize("variant", [{}, {"normalize": False}, {"scale": 0.7}, {"density": 0.05}])
def test_small_tensors_merge_as_the_unfused_path_bit_for_bit(n, kind, variant, monkeypatch):
    plan, stacked = _plan(**variant), _stacked(kind, n)
    weights = torch.tensor([0.5, 0.3, 0.2])
    merged, gram, base_sq, small = _dispatched(stacked, weights, plan, monkeypatch)
    assert torch.equal(merged.view(torch.int32), _unfused(stacked, weights, plan).view(torch.int32))
    taus = (stacked[1:] - stacked[0]).double()
    assert torch.allclose(gram, taus @ taus.T, rtol=1e-5, atol=1e-30)
    assert base_sq == pytest.approx(float(stacked[0].double().square().sum()), rel=1e-5)
    k = max(1, int(plan.density * n))
    thresholds = torch.sort((stacked[1:] - stacked[0]).abs(), descending=True).values[:, k - 1]
    assert small == bool((thresholds >= 2.0**-100).all())  # a threshold of 0 (sparse τ): the unfused path


def test_the_small_trims_keep_the_stable_sorts_top_k():
    """Independent of both paths: the k largest |τ| by a stable descending sort (ties to the lower index)."""
    gen = torch.Generator().manual_seed(3)
    magnitudes = (torch.randint(0, 6, (3, 500), generator=gen).float() * 0.25).numpy()  # a tie at every threshold
    for k in (1, 37, 100, 499):
        for row, (threshold, cut) in zip(magnitudes, ties_bands.exact_trims(magnitudes, k), strict=True):
            order = np.argsort(-row, kind="stable")
            expected = np.zeros(row.size, bool)
            expected[order[:k]] = True
            positions = np.arange(row.size)
            kept = (row > threshold) | ((row == threshold) & (positions < cut))
            assert np.array_equal(kept, expected)
            assert threshold == row[order[k - 1]]


@pytest.mark.parametrize("where", ["one entry", "every entry"])
def test_nan_in_a_small_fine_tune_names_it(where, monkeypatch):
    stacked = _stacked("random", 768)
    stacked[2, 5 if where == "one entry" else slice(None)] = float("nan")
    with pytest.raises(CheckpointError, match=r"fine-tune 'b': tensor 'model.norm.weight' contains NaN or Inf"):
        _dispatched(stacked, torch.ones(3), _plan(), monkeypatch)


def test_inf_in_a_small_base_blames_the_base(monkeypatch):
    stacked = _stacked("random", 768)
    stacked[0, 3] = float("inf")
    with pytest.raises(CheckpointError, match=r"^base: tensor 'model.norm.weight' contains NaN or Inf"):
        _dispatched(stacked, torch.ones(3), _plan(), monkeypatch)


def test_the_small_path_applies_to_compiled_ties_on_small_cpu_tensors_only(monkeypatch):
    cpu = torch.device("cpu")
    assert ties.small(_plan(), selection.SELECT_MIN, cpu) and ties.small(_plan(), 1, cpu)
    assert not ties.small(_plan(), selection.SELECT_MIN + 1, cpu)  # `fused` takes it
    assert not ties.small(_plan(), 0, cpu)
    assert not ties.small(_plan(sparsify="random"), 768, cpu)
    assert not ties.small(_plan(consensus="none"), 768, cpu)
    assert not ties.small(_plan(density=1.0), 768, cpu)
    monkeypatch.setenv("METAMERGE_COMPILED", "0")
    assert not ties.small(_plan(), 768, cpu)


def test_a_one_block_kernel_runs_on_the_calling_thread_alone():
    """`launch_threads(blocks)`: no more threads than blocks (a second one had to be woken for nothing)."""
    import numba

    from metamerge.methods.numba_runtime import launch_threads

    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        most = min(2, numba.config.NUMBA_NUM_THREADS)
        launch_threads(1)
        assert numba.get_num_threads() == 1
        launch_threads(24)
        assert numba.get_num_threads() == most
        launch_threads()
        assert numba.get_num_threads() == most
    finally:
        torch.set_num_threads(previous)
