"""The CUDA path must equal the CPU path. Runs only where a GPU exists (skipped in CI)."""

import pytest
import torch
from safetensors.torch import load_file

from metamerge.engine.coefficients import solve_constant, solve_metagpt
from metamerge.engine.merge import merge_checkpoints
from metamerge.engine.streaming import resolve_device
from metamerge.methods.plan import MergePlan
from tests.helpers import random_family

LABELS = ["ft0", "ft1", "ft2"]
PLANS = {
    "metagpt": MergePlan(),
    "ties": MergePlan(sparsify="magnitude", density=0.2, consensus="ties", weighting="constant", normalize=True),
    "dare": MergePlan(sparsify="random", density=0.5, seed=1, weighting="constant", weight=0.3),
    "breadcrumbs": MergePlan(sparsify="outliers", density=0.3, gamma=0.05, weighting="constant", weight=0.3),
    "della": MergePlan(sparsify="ranked", density=0.5, epsilon=0.15, seed=1, consensus="ties", weighting="constant",
                       normalize=True),
    "iso_c": MergePlan(weighting="uniform", spectral="iso"),
}


def test_auto_device_is_cuda_when_there_is_one_else_cpu():
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")


def _merged_on_cpu_and_cuda(tmp_path, method: str, **family) -> dict[str, dict[str, torch.Tensor]]:
    base_dir, ft_dirs, base, fts = random_family(tmp_path, **family)
    plan = PLANS[method]
    if plan.weighting == "metagpt":
        norms = {n: {k: float(torch.sum((ft[k].double() - base[k].double()) ** 2)) for k in base
                     if base[k].is_floating_point()} for n, ft in zip(LABELS, fts, strict=True)}
        coefficients = solve_metagpt(LABELS, norms)
    else:
        coefficients = solve_constant(LABELS, plan.weight, method)
    outs = {}
    for device in ("cpu", "cuda"):
        report = merge_checkpoints(base_dir, list(zip(LABELS, ft_dirs, strict=True)), coefficients, plan,
                                   tmp_path / device, device=device)
        assert report.device.startswith(device)
        outs[device] = {}
        for f in (tmp_path / device).glob("*.safetensors"):
            outs[device].update(load_file(str(f)))
    assert outs["cpu"] and set(outs["cuda"]) == set(outs["cpu"]) == set(base)
    for k in outs["cpu"]:
        assert outs["cuda"][k].dtype == outs["cpu"][k].dtype, k
    return outs


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
@pytest.mark.parametrize("method", sorted(PLANS))
def test_cuda_equals_cpu(tmp_path, method):
    """bfloat16 inputs: read and converted into the pinned buffer."""
    outs = _merged_on_cpu_and_cuda(tmp_path, method, dtype=torch.bfloat16, layers=3)
    for k in outs["cpu"]:
        torch.testing.assert_close(outs["cuda"][k].float(), outs["cpu"][k].float(), rtol=1e-2, atol=1e-2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
@pytest.mark.parametrize("chunk", [1 << 23, 64])
@pytest.mark.parametrize("method", ["metagpt", "ties", "dare"])
def test_cuda_equals_cpu_from_mapped_float32(tmp_path, monkeypatch, method, chunk):
    """float32 inputs: mapped, and staged to the GPU through the pinned workspace (`stage_to_device`).
    With 64-entry chunks, TIES' whole tensors (some above SELECT_MIN, which the CPU would map) are wider than the workspace and are read into
    pinned tensors of their own. Same float32 arithmetic on both devices: equal to float32 rounding."""
    from metamerge.engine import checkpoint

    monkeypatch.setattr(checkpoint, "CHUNK_ELEMENTS", chunk)
    outs = _merged_on_cpu_and_cuda(tmp_path, method, layers=2, hidden=300)  # q_proj: 90 000 > SELECT_MIN entries
    for k in outs["cpu"]:
        torch.testing.assert_close(outs["cuda"][k], outs["cpu"][k], rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_cuda_relative_norms_bound_and_base_nan(tmp_path):
    """Issue 13 #8 on the CUDA path: the merge pass's ‖τ‖/‖θ₀‖, its bound, and NaN blamed on the base."""
    from metamerge.engine.taskvectors import extract_stats
    from metamerge.errors import CheckpointError
    from tests.helpers import write_checkpoint

    base_dir, ft_dirs, base, _ = random_family(tmp_path / "fam", n_finetunes=2)
    pairs = [("ft0", ft_dirs[0]), ("ft1", ft_dirs[1])]
    coefficients = solve_constant(["ft0", "ft1"], 0.5, "average")
    report = merge_checkpoints(base_dir, pairs, coefficients, MergePlan(weighting="uniform"), tmp_path / "out",
                               device="cuda", max_relative_norm=0.8)
    for label, path in pairs:
        assert report.relative_norms()[label] == pytest.approx(extract_stats(base_dir, path, label).relative_norm,
                                                               rel=1e-4)
    _, alien, *_ = random_family(tmp_path / "alien", n_finetunes=2, seed=1, scale=[0.01, 0.01])
    with pytest.raises(CheckpointError, match="is above merge.max_relative_norm 0.8"):
        merge_checkpoints(base_dir, [("ft0", alien[0]), ("ft1", alien[1])], coefficients, MergePlan(weighting="uniform"),
                          tmp_path / "alien-out", device="cuda", max_relative_norm=0.8)
    assert not (tmp_path / "alien-out").exists()
    broken = dict(base)
    broken["model.norm.weight"] = base["model.norm.weight"].clone()
    broken["model.norm.weight"][2] = float("inf")
    bad = write_checkpoint(tmp_path / "bad", broken)
    with pytest.raises(CheckpointError) as info:
        merge_checkpoints(bad, pairs, coefficients, MergePlan(weighting="uniform"), tmp_path / "nan-out", device="cuda")
    assert str(info.value) == f"base {bad}: tensor 'model.norm.weight' contains NaN or Inf"
