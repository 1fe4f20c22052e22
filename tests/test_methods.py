"""Every method, through the streaming engine, against dense references written from the formulas."""

import math
import os

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from metamerge.engine.coefficients import solve_metagpt
from metamerge.engine.merge import merge_checkpoints
from metamerge.methods.kernels import combine, dare_generator, random_mask
from metamerge.methods.plan import MergePlan
from metamerge.methods.registry import plan_for
from metamerge.pipeline import merge as merge_stage
from metamerge.pipeline.extract import extract
from metamerge.pipeline.inputs import resolve
from metamerge.pipeline.solve import solve
from metamerge.recipe import parse_recipe
from tests.helpers import random_family, write_checkpoint
from tests.numba_targets import runs_here, target_env

LABELS = ["ft0", "ft1", "ft2"]


def _run(tmp_path, method: dict, dtype=torch.float32, family=random_family):
    base_dir, ft_dirs, base, fts = family(tmp_path, dtype=dtype)
    recipe = parse_recipe({"name": "t", "base": str(base_dir), "method": method, "workdir": str(tmp_path / "w"),
                           "finetunes": [{"ref": str(d), "name": n} for d, n in zip(ft_dirs, LABELS, strict=True)],
                           "merge": {"device": "cpu"}})
    plan = plan_for(recipe.method)
    resolved = resolve(recipe.base, tmp_path / "w")
    fts_resolved = [resolve(f.ref, tmp_path / "w") for f in recipe.finetunes]
    stats = [extract(resolved, f, n, plan, "base", tmp_path / "w") for f, n in zip(fts_resolved, LABELS, strict=True)]
    coefficients = solve(LABELS, stats, plan, recipe.method.name)
    out = merge_stage.merge(recipe, resolved, fts_resolved, coefficients)
    merged = {}
    for f in (tmp_path / out.path).glob("*.safetensors"):
        merged.update(load_file(str(f)))
    return base, fts, merged, coefficients


def _taus(base, fts, name):
    b = base[name].double().numpy()
    return b, [ft[name].double().numpy() - b for ft in fts]


def _trim(tau, density):
    k = max(1, int(density * tau.size))
    flat = np.abs(tau).ravel()
    keep = np.zeros(tau.size, dtype=bool)
    keep[np.argsort(-flat, kind="stable")[:k]] = True
    return np.where(keep.reshape(tau.shape), tau, 0.0)


def _ties_reference(taus, weights, scale, normalize):
    weighted = [w * t for w, t in zip(weights, taus, strict=True)]
    total = sum(weighted)
    elected = np.where(total >= 0, 1.0, -1.0)
    num = np.zeros_like(total)
    den = np.zeros_like(total)
    for w, t in zip(weights, taus, strict=True):
        agree = np.sign(t) == elected
        num += np.where(agree, w * t, 0.0)
        den += np.where(agree, w, 0.0)
    if normalize:
        num = num / np.where(den == 0, 1.0, den)
    return scale * num


FLOATS = lambda base: [k for k, v in base.items() if v.is_floating_point()]  # noqa: E731


def _close(got, want, dtype):
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 3e-2}
    np.testing.assert_allclose(got.double().numpy(), want, **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_average_and_task_arithmetic(tmp_path, dtype):
    for method, factor in [({"name": "average"}, 1 / 3), ({"name": "task_arithmetic", "lambda": 0.7}, 0.7)]:
        base, fts, merged, _ = _run(tmp_path / method["name"], method, dtype)
        for k in FLOATS(base):
            b, taus = _taus(base, fts, k)
            _close(merged[k], b + factor * sum(taus), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ties_matches_trim_elect_disjoint_mean(tmp_path, dtype):
    base, fts, merged, _ = _run(tmp_path, {"name": "ties", "density": 0.3, "lambda": 0.9}, dtype)
    for k in FLOATS(base):
        b, taus = _taus(base, fts, k)
        taus = [_trim(t.astype(np.float32).astype(np.float64), 0.3) for t in taus]
        _close(merged[k], b + _ties_reference(taus, [1, 1, 1], 0.9, normalize=True), dtype)


@pytest.mark.parametrize("disjoint", ["mean", "sum"])
def test_metagpt_ties_weights_trimmed_vectors_by_their_norms(tmp_path, disjoint):
    """mean (the default): Σ λ m τ / Σ λ m over agreeing entries, mergekit's TIES with weights; sum: no division."""
    base, fts, merged, coefficients = _run(tmp_path, {"name": "metagpt+ties", "density": 0.4, "disjoint": disjoint})
    floats = FLOATS(base)
    trimmed = {k: [_trim(t, 0.4) for t in _taus(base, fts, k)[1]] for k in floats}
    norms = np.array([sum(float(np.sum(trimmed[k][i] ** 2)) for k in floats) for i in range(3)])
    lam = norms / norms.sum()
    np.testing.assert_allclose(list(coefficients.model_level().values()), lam, rtol=1e-5)
    for k in floats:
        want = base[k].double().numpy() + _ties_reference(trimmed[k], lam, 1.0, normalize=disjoint == "mean")
        _close(merged[k], want, torch.float32)


def _breadcrumbs(tau, density, gamma):
    """Keep int(density·n) entries after removing the int(γ·n) largest |τ| (ties: the lower index ranks higher)."""
    n = tau.size
    keep, outliers = max(1, int(density * n)), int(gamma * n)
    outliers = min(outliers, n - keep)
    order = np.argsort(-np.abs(tau).ravel(), kind="stable")
    mask = np.zeros(n, dtype=bool)
    mask[order[outliers : outliers + keep]] = True
    return np.where(mask.reshape(tau.shape), tau, 0.0)


@pytest.mark.parametrize("combine_mode", ["linear", "ties"])
def test_breadcrumbs_drops_the_smallest_and_the_outliers(tmp_path, combine_mode):
    method = {"name": "breadcrumbs", "density": 0.3, "gamma": 0.05, "combine": combine_mode}
    base, fts, merged, _ = _run(tmp_path, method)
    for k in FLOATS(base):
        b, taus = _taus(base, fts, k)
        kept = [_breadcrumbs(t.astype(np.float32).astype(np.float64), 0.3, 0.05) for t in taus]
        if combine_mode == "linear":  # λ defaults to 0.3, as task arithmetic
            want = b + 0.3 * sum(kept)
        else:  # λ 1 and TIES' disjoint mean
            want = b + _ties_reference(kept, [1, 1, 1], 1.0, normalize=True)
        _close(merged[k], want, torch.float32)
    # the largest entry of a task vector is an outlier: it is gone, the (γ·n+1)-th largest is kept
    k = "model.layers.0.mlp.up_proj.weight"
    b, taus = _taus(base, fts, k)
    assert int(0.05 * taus[0].size) >= 1
    kept = _breadcrumbs(taus[0], 0.3, 0.05)
    assert kept.ravel()[np.argmax(np.abs(taus[0]))] == 0.0 and np.count_nonzero(kept) == int(0.3 * taus[0].size)


def test_della_keeps_by_magnitude_rank_within_rows_and_rescales(tmp_path):
    density, epsilon, seed = 0.5, 0.2, 11
    base, fts, merged, _ = _run(tmp_path, {"name": "della", "seed": seed, "density": density, "epsilon": epsilon})
    for k in FLOATS(base):
        b, taus = _taus(base, fts, k)
        columns = taus[0].shape[-1] if taus[0].ndim > 1 else taus[0].size
        rescaled = []
        for label, tau in zip(LABELS, taus, strict=True):
            rows = tau.astype(np.float32).reshape(-1, columns)
            ranks = np.argsort(np.argsort(np.abs(rows), axis=-1, kind="stable"), axis=-1, kind="stable")
            keep = (density - epsilon) + ranks * (2 * epsilon / (columns - 1)) if columns > 1 else np.full(rows.shape, density)
            draw = torch.rand(torch.Size(rows.shape), generator=dare_generator(seed, label, k)).numpy()
            kept = np.where(draw < keep.astype(np.float32), rows.astype(np.float64) / keep, 0.0)
            rescaled.append(kept.reshape(tau.shape))
        _close(merged[k], b + _ties_reference(rescaled, [1, 1, 1], 1.0, normalize=True), torch.float32)
    # read back from the output alone: the probe's entries are all equal, so the rank within a row is the
    # column; keep probability rises from 0.3 (first column) to 0.7 (last), survivors come back as c_t/p
    _, _, probe, _ = _run(tmp_path / "probe", {"name": "della", "seed": 2, "density": 0.5, "epsilon": 0.2,
                                               "combine": "linear", "lambda": 1.0}, family=_probe_family)
    columns = PROBE_SHAPE[1]
    p_col = 0.3 + np.arange(columns) * (0.4 / (columns - 1))
    masks = _decode_linear(probe[PROBE] * torch.tensor(p_col, dtype=torch.float32), 1.0, 1.0)
    half = columns // 2
    for t in range(3):
        assert abs(masks[t].mean() - 0.5) < 0.02, masks[t].mean()
        low, high = masks[t][:, :half].mean(), masks[t][:, half:].mean()
        assert abs(low - 0.4) < 0.03 and abs(high - 0.6) < 0.03, (LABELS[t], low, high)


def test_della_validates_its_probability_range():
    from metamerge.errors import RecipeError

    for density, epsilon in [(0.1, 0.2), (0.95, 0.1)]:  # a keep probability ≤ 0 or above 1
        with pytest.raises(RecipeError, match="density − epsilon"):
            parse_recipe({"name": "t", "base": "b", "finetunes": ["f"],
                          "method": {"name": "della", "seed": 1, "density": density, "epsilon": epsilon}})


def test_iso_c_flattens_the_spectrum_of_each_weight_matrix(tmp_path):
    base, fts, merged, _ = _run(tmp_path, {"name": "iso_c", "lambda": 0.8})
    matrices = 0
    for k in FLOATS(base):
        b, taus = _taus(base, fts, k)
        total = sum(t.astype(np.float32).astype(np.float64) for t in taus)
        if total.ndim == 2 and "embed" not in k and "lm_head" not in k:
            u, sigma, vh = np.linalg.svd(total, full_matrices=False)
            want = b + 0.8 * sigma.mean() * (u @ vh)
            matrices += 1
            got = merged[k].double().numpy() - b
            # the merged update has one singular value, repeated: its spectrum is flat
            spectrum = np.linalg.svd(got, compute_uv=False)
            np.testing.assert_allclose(spectrum, spectrum[0], rtol=1e-3)
        else:  # vectors and vocabulary tables: the mean task vector, scaled
            want = b + 0.8 * total / 3
        np.testing.assert_allclose(merged[k].double().numpy(), want, rtol=1e-4, atol=1e-4)
    assert matrices >= 4


@pytest.mark.parametrize("granularity", ["layer", "tensor"])
def test_granularity_variants_differ_from_model_where_norms_differ(tmp_path, granularity):
    base, fts, merged, coefficients = _run(tmp_path / "g", {"name": "metagpt", "granularity": granularity})
    _, _, merged_model, model_coefficients = _run(tmp_path / "m", {"name": "metagpt"})
    # random_family boosts layer 1 of later fine-tunes: its λ must favour them more than layer 0's
    q1 = coefficients.weights_for("model.layers.1.self_attn.q_proj.weight")
    q0 = coefficients.weights_for("model.layers.0.self_attn.q_proj.weight")
    assert q1[2] > q0[2] and q1 != q0
    name = "model.layers.1.self_attn.q_proj.weight"
    b, taus = _taus(base, fts, name)
    norms = [float(np.sum(t ** 2)) for t in taus]
    if granularity == "tensor":
        np.testing.assert_allclose(q1, np.array(norms) / sum(norms), rtol=1e-6)
    _close(merged[name], b + sum(w * t for w, t in zip(q1, taus, strict=True)), torch.float32)
    assert not torch.allclose(merged[name], merged_model[name])


# --- DARE's masks, read back from the merged file alone (nothing here calls the code's own RNG) -------
# The probe tensor is 0 in the base and the constant c_t in fine-tune t, with c = 1, 2, 4: every
# output element then tells exactly which fine-tunes kept it (a 3-bit code), so the masks, their
# density, their independence and the 1/density rescale are all checked from the output.
PROBE = "model.layers.0.mlp.probe.weight"
PROBE_SHAPE = (125, 96)  # 12 000 elements: kept/total has a standard deviation of 0.004 at density 0.2
CODES = (1.0, 2.0, 4.0)


def _probe_family(root, dtype=torch.float32):
    base = {PROBE: torch.zeros(PROBE_SHAPE, dtype=dtype), "model.norm.weight": torch.ones(12, dtype=dtype)}
    base_dir = write_checkpoint(root / "base", base)
    fts, dirs = [], []
    for label, code in zip(LABELS, CODES, strict=True):
        ft = {PROBE: torch.full(PROBE_SHAPE, code, dtype=dtype), "model.norm.weight": base["model.norm.weight"] + code}
        fts.append(ft)
        dirs.append(write_checkpoint(root / label, ft))
    return base_dir, dirs, base, fts


def _decode_linear(merged: torch.Tensor, weight: float, density: float) -> np.ndarray:
    """Linear DARE: out = Σ_t w·m_t·c_t/density; returns the masks [T, ...] as bools."""
    scaled = merged.double().numpy() * density / weight
    code = np.rint(scaled)
    np.testing.assert_allclose(scaled, code, atol=1e-4, err_msg="survivors are not rescaled by exactly 1/density")
    assert code.min() >= 0 and code.max() <= 7
    return np.stack([(code.astype(int) >> t) & 1 for t in range(3)]).astype(bool)


def _decode_ties(merged: torch.Tensor, scale: float, density: float) -> np.ndarray:
    """DARE + TIES (all c_t > 0, so + is elected): out = scale·Σ_{t kept} c_t/density / #kept."""
    values = {}
    for subset in range(8):
        kept = [t for t in range(3) if subset >> t & 1]
        values[subset] = scale * sum(CODES[t] for t in kept) / density / len(kept) if kept else 0.0
    assert len({round(v, 6) for v in values.values()}) == 8  # every subset gives its own value
    out = merged.double().numpy()
    distance = np.stack([np.abs(out - v) for v in values.values()])
    nearest = distance.argmin(axis=0)
    assert distance.min(axis=0).max() < 1e-4, "an output value is no disjoint mean of rescaled survivors"
    return np.stack([(nearest >> t) & 1 for t in range(3)]).astype(bool)


def _check_masks(masks: np.ndarray, density: float) -> None:
    """Each fine-tune keeps ≈ density of the entries, on its own independent mask."""
    for t in range(3):
        assert abs(masks[t].mean() - density) < 0.02, (LABELS[t], masks[t].mean())
    for a in range(3):
        for b in range(a + 1, 3):
            assert not np.array_equal(masks[a], masks[b]), "two fine-tunes got the same mask"
            both = (masks[a] & masks[b]).mean()
            assert abs(both - density ** 2) < 0.01, (LABELS[a], LABELS[b], both)  # independent draws


def test_dare_masks_keep_density_independently_and_rescale(tmp_path):
    _, _, merged, _ = _run(tmp_path, {"name": "dare", "seed": 7, "density": 0.2, "lambda": 0.5}, family=_probe_family)
    masks = _decode_linear(merged[PROBE], 0.5, 0.2)
    _check_masks(masks, 0.2)


def test_dare_is_reproducible_for_a_seed_and_changes_with_it(tmp_path):
    _, _, a, _ = _run(tmp_path / "a", {"name": "dare", "seed": 1, "density": 0.5})
    _, _, b, _ = _run(tmp_path / "b", {"name": "dare", "seed": 1, "density": 0.5})
    base, fts, c, _ = _run(tmp_path / "c", {"name": "dare", "seed": 2, "density": 0.5})
    name = "model.layers.0.mlp.up_proj.weight"
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a[name], c[name])
    # linear DARE = θ₀ + λ Σ (m_t ⊙ τ_t) / density, with the masks re-drawn here from the same streams
    b0, taus = _taus(base, fts, name)
    want = b0.copy()
    for label, tau in zip(LABELS, taus, strict=True):
        mask = random_mask(torch.Size(tau.shape), 0.5, dare_generator(1, label, name), torch.device("cpu")).numpy()
        want += 0.3 * np.where(mask, tau, 0.0) / 0.5
    _close(a[name], want, torch.float32)
    # the same, read from the output alone: same seed, same masks; another seed, other masks
    seeds = {}
    for seed, folder in [(1, "pa"), (1, "pb"), (2, "pc")]:
        _, _, probe, _ = _run(tmp_path / folder, {"name": "dare", "seed": seed, "density": 0.2, "lambda": 0.5},
                              family=_probe_family)
        seeds.setdefault(seed, []).append(_decode_linear(probe[PROBE], 0.5, 0.2))
    assert np.array_equal(seeds[1][0], seeds[1][1])
    _check_masks(seeds[2][0], 0.2)
    for t in range(3):
        assert not np.array_equal(seeds[1][0][t], seeds[2][0][t]), LABELS[t]


def test_dare_with_ties_combine_and_metagpt_dare(tmp_path):
    base, fts, merged, _ = _run(tmp_path / "t", {"name": "dare", "seed": 3, "density": 0.6, "combine": "ties"})
    name = "model.embed_tokens.weight"
    b, taus = _taus(base, fts, name)
    dropped = []
    for label, tau in zip(LABELS, taus, strict=True):
        mask = random_mask(torch.Size(tau.shape), 0.6, dare_generator(3, label, name), torch.device("cpu")).numpy()
        dropped.append(np.where(mask, tau, 0.0) / 0.6)
    _close(merged[name], b + _ties_reference(dropped, [1, 1, 1], 1.0, normalize=True), torch.float32)
    # and from the output alone: density, independence, rescale and the disjoint mean
    _, _, probe, _ = _run(tmp_path / "p", {"name": "dare", "seed": 3, "density": 0.2, "combine": "ties", "lambda": 0.8},
                          family=_probe_family)
    _check_masks(_decode_ties(probe[PROBE], 0.8, 0.2), 0.2)

    base, fts, merged, coefficients = _run(tmp_path / "m", {"name": "metagpt+dare", "seed": 3, "density": 0.6,
                                                            "combine": "linear"})
    lam = list(coefficients.model_level().values())
    assert abs(sum(lam) - 1) < 1e-9
    b, taus = _taus(base, fts, name)
    want = b + sum(w * d for w, d in zip(lam, dropped, strict=True))
    _close(merged[name], want, torch.float32)
    # the default (issue 17): TIES' election on the λ-weighted dropped vectors, then their λ-weighted disjoint mean
    base, fts, merged, coefficients = _run(tmp_path / "d", {"name": "metagpt+dare", "seed": 3, "density": 0.6})
    lam = list(coefficients.model_level().values())
    _close(merged[name], b + _ties_reference(dropped, lam, 1.0, normalize=True), torch.float32)


def test_sign_election_with_zeros_and_exact_ties():
    taus = torch.tensor([[1.0, -1.0, 0.0, 2.0, 0.0], [-1.0, 1.0, 0.0, -3.0, 5.0]])
    delta = combine(taus, torch.ones(2), MergePlan(consensus="ties", weighting="constant", normalize=True))
    # columns 0,1: the sum is exactly 0 → + is elected (mergekit's convention) → the positive entry alone;
    # column 2: nobody agrees → 0; column 3: − wins → −3; column 4: a zero never votes or counts → 5
    assert delta.tolist() == [1.0, 1.0, 0.0, -3.0, 5.0]


def test_engine_equals_kernel_on_odd_shapes_with_sharding(tmp_path):
    base_dir, ft_dirs, base, fts = random_family(tmp_path, layers=3)
    norms = {n: {k: float(torch.sum((ft[k].double() - base[k].double()) ** 2)) for k in FLOATS(base)}
             for n, ft in zip(LABELS, fts, strict=True)}
    coefficients = solve_metagpt(LABELS, norms, "tensor")
    out = tmp_path / "o"
    # the family is ~11 KB of float32: 2 KB shards split it over several files
    merge_checkpoints(base_dir, list(zip(LABELS, ft_dirs, strict=True)), coefficients, MergePlan(granularity="tensor"),
                      out, device="cpu", shard_size_mb=2048 / (1024 * 1024))
    got = {}
    files = sorted(out.glob("*.safetensors"))
    assert len(files) >= 3, files
    for f in files:
        got.update(load_file(str(f)))
    assert set(got) == set(base)
    from metamerge.engine.checkpoint import CheckpointReader

    reader = CheckpointReader(out)  # through model.safetensors.index.json, as transformers reads it
    assert all(torch.equal(reader.read(k), got[k]) for k in base)
    for k in FLOATS(base):
        b, taus = _taus(base, fts, k)
        lam = np.array(coefficients.weights_for(k))
        _close(got[k], b + sum(w * t for w, t in zip(lam, taus, strict=True)), torch.float32)


@pytest.mark.parametrize("method", [{"name": "metagpt", "granularity": "tensor"}, {"name": "metagpt+dare", "seed": 5, "combine": "linear"},
                                    {"name": "ties"}])
def test_row_chunking_gives_the_same_merge_where_it_applies(tmp_path, monkeypatch, method):
    """Chunked streaming (bounded memory) must not change results; DARE's masks are drawn per chunk."""
    from metamerge.engine import checkpoint

    _, _, whole, _ = _run(tmp_path / "whole", method)
    monkeypatch.setattr(checkpoint, "CHUNK_ELEMENTS", 50)
    base, fts, chunked_result, coefficients = _run(tmp_path / "chunked", method)
    if method["name"] == "metagpt+dare":
        # a different (chunk-keyed) random stream: same formula, different masks; check it is exact
        name = "model.embed_tokens.weight"
        b, taus = _taus(base, fts, name)
        lam = list(coefficients.model_level().values())
        want = b.copy()
        rows_per_chunk = max(1, 50 // 12)
        for r in range(0, 37, rows_per_chunk):
            for label, w, tau in zip(LABELS, lam, taus, strict=True):
                part = tau[r:r + rows_per_chunk]
                mask = random_mask(torch.Size(part.shape), 0.55, dare_generator(5, label, name, r), torch.device("cpu"))
                want[r:r + rows_per_chunk] += w * np.where(mask.numpy(), part, 0.0) / 0.55
        _close(chunked_result[name], want, torch.float32)
    else:
        for k in whole:
            torch.testing.assert_close(chunked_result[k], whole[k], rtol=1e-6, atol=1e-6)


def test_dare_masks_are_drawn_per_row_chunk(tmp_path, monkeypatch):
    """Chunked streaming draws each chunk's mask from its own stream: no chunk repeats another's."""
    from metamerge.engine import checkpoint

    monkeypatch.setattr(checkpoint, "CHUNK_ELEMENTS", 5 * PROBE_SHAPE[1])  # 25 chunks of 5 rows
    _, _, merged, _ = _run(tmp_path, {"name": "dare", "seed": 4, "density": 0.2, "lambda": 0.5}, family=_probe_family)
    masks = _decode_linear(merged[PROBE], 0.5, 0.2)
    _check_masks(masks, 0.2)
    for t in range(3):
        chunks = {masks[t][r : r + 5].tobytes() for r in range(0, PROBE_SHAPE[0], 5)}
        assert len(chunks) == PROBE_SHAPE[0] // 5, (LABELS[t], len(chunks))


def test_kth_largest_is_exact_on_large_tensors_with_ties():
    from metamerge.methods.selection import kth_largest, magnitude_mask

    gen = torch.Generator().manual_seed(0)
    values = torch.randn(3_000_000, generator=gen).to(torch.bfloat16).float().abs()  # many exact ties
    for k in (1, 17, 600_000, 2_999_999):
        assert kth_largest(values, k) == torch.sort(values, descending=True).values[k - 1]
    mask = magnitude_mask(values, 0.2)
    assert int(mask.sum()) == int(0.2 * values.numel())
    assert values[mask].min() >= values[~mask].max()


@pytest.mark.parametrize("n", [1, 65_536, 65_537, 3 * 65_536 + 5])
def test_the_norm_of_a_difference_is_the_norm_of_the_written_difference(n):
    """The fused norm pass must give the very float64 the two-step one gave: λ and stats stay bit-equal."""
    from metamerge.methods.norms import sq_norm, sq_norm_of_difference

    gen = torch.Generator().manual_seed(n)
    theta0 = torch.randn(n, generator=gen)
    theta = theta0 + 1e-3 * torch.randn(n, generator=gen)
    fused = sq_norm_of_difference(theta, theta0)
    assert fused == sq_norm(theta - theta0)
    assert fused == pytest.approx(float(((theta.double() - theta0.double()) ** 2).sum()), rel=1e-5)


_NORMS_SCRIPT = """
import math, os, random, sys
import torch
from metamerge.methods.norms import sq_norm, sq_norm_of_difference, sq_norms_of_differences
torch.set_num_threads(int(sys.argv[1]))
rnd = random.Random(7)
cases = []
for n in (1, 255, 256, 65_536, 65_537, 400_001):
    # inputs from Python's generator: torch.randn itself differs between vector widths
    x = torch.tensor([rnd.gauss(0.0, 1.0) for _ in range(n)])
    cases.append((x, x + torch.tensor([rnd.gauss(0.0, 1e-3) for _ in range(n)])))

def norms():
    values = []
    for x, y in cases:
        values += [sq_norm(x), sq_norm_of_difference(y, x)]
        exact = math.fsum(v * v for v in (y - x).double().tolist())  # the difference is made in float32
        assert abs(values[-1] - exact) <= 1e-12 * exact, (len(x), values[-1], exact)
        # several fine-tunes at once share each base block: each the float of its own difference
        others = [y, 2 * y - x, x + 0.5]
        together = sq_norms_of_differences(others, x)
        assert together == [sq_norm(other - x) for other in others], len(x)
        values += together
    return values

values = norms()
os.environ["METAMERGE_COMPILED"] = "0"  # the torch fallback: the same floats
assert norms() == values
print(" ".join(v.hex() for v in values))
"""


def test_norms_are_the_same_float_on_any_core_count_and_vector_width():
    """λ decides merged bytes: a 2-core AVX2 worker and a 16-core AVX-512 one must compute the same ‖τ‖².

    Each configuration runs in its own process (torch's kernel family and numba's target are
    chosen at start-up; numba's thread count follows torch's); the
    floats must be bit-equal, and close to a correctly rounded reference (checked in the script).
    """
    import subprocess
    import sys

    prints = set()
    runs = [(capability, None, threads) for capability in ("default", "avx2", None) for threads in (1, 2, 4)]
    runs += [(None, cpu, 2) for cpu in ("x86-64", "haswell")]  # the compiled sums for SSE2 only, AVX2 + FMA
    for capability, cpu, threads in [run for run in runs if runs_here(run[1])]:
        env = target_env({k: v for k, v in os.environ.items() if k not in ("ATEN_CPU_CAPABILITY", "METAMERGE_COMPILED")},
                         cpu)
        if capability:
            env["ATEN_CPU_CAPABILITY"] = capability
        done = subprocess.run([sys.executable, "-c", _NORMS_SCRIPT, str(threads)], env=env, capture_output=True,
                              text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        prints.add(done.stdout.strip())
    assert len(prints) == 1, prints


def _sequential_column_norm(x: np.ndarray) -> float:
    """The norm order spelled out in numpy, one row at a time: the independent reference."""
    total = np.zeros(256)
    for start in range(0, x.size, 65_536):
        block = x[start : start + 65_536].astype(np.float64)
        rows = np.zeros(-(-block.size // 256) * 256)
        rows[: block.size] = block * block
        column = np.zeros(256)
        for row in rows.reshape(-1, 256):
            column = column + row
        total = total + column
    return math.fsum(total.tolist())


def test_the_norm_order_is_defined_once_for_both_implementations():
    """norms (which must not import numba) and norm_kernels each name the block and row width: they must agree."""
    pytest.importorskip("numba")
    from metamerge.methods import norm_kernels, norms

    assert (norms.BLOCK, norms.COLUMNS) == (norm_kernels.BLOCK, norm_kernels.COLUMNS) == (65_536, 256)


@pytest.mark.parametrize("n", [1, 255, 257, 65_536, 3 * 65_536 + 300])
def test_compiled_and_torch_norms_are_the_sequential_column_sums(n, monkeypatch):
    """The compiled sums, the torch fallback and a row-by-row numpy loop: the same floats, bit for bit.

    Magnitudes spread over many octaves, so a sum in any other order (torch's own column sum
    cascades) differs in the last bits: this test fails if either implementation reorders.
    """
    from metamerge.methods import norms

    pytest.importorskip("numba")
    monkeypatch.setenv("METAMERGE_COMPILED", "1")

    gen = torch.Generator().manual_seed(n)
    theta0 = torch.randn(n, generator=gen) * torch.exp(4 * torch.randn(n, generator=gen))
    thetas = [theta0 + torch.randn(n, generator=gen) * torch.exp(3 * torch.randn(n, generator=gen)) for _ in range(3)]
    want = [_sequential_column_norm(theta0.numpy())] + [_sequential_column_norm((t - theta0).numpy()) for t in thetas]
    compiled = [norms.sq_norm(theta0), *norms.sq_norms_of_differences(thetas, theta0)]
    assert norms.base_and_difference_sq_norms(thetas, theta0) == (compiled[0], compiled[1:])
    monkeypatch.setenv("METAMERGE_COMPILED", "0")
    fallback = [norms.sq_norm(theta0), *norms.sq_norms_of_differences(thetas, theta0)]
    assert fallback == want
    assert compiled == want
    if n > 65_536:  # the data tells orders apart: torch's own column sum of a block is not the sequential one
        block = ((thetas[0] - theta0)[:65_536].double() ** 2).view(256, 256)
        sequential = np.zeros(256)
        for row in block.numpy():
            sequential = sequential + row
        assert not np.array_equal(block.sum(dim=0).numpy(), sequential)


@pytest.mark.parametrize("n", [70_000, 1_300_000])
@pytest.mark.parametrize("bf16", [False, True])
def test_blockwise_trim_zeroes_exactly_the_entries_a_full_sort_drops(n, bf16):
    """The CPU trim works per block with a sampled bracket; a full sort is the independent reference."""
    from metamerge.methods.selection import kth_largest, trim_

    gen = torch.Generator().manual_seed(n)
    tau = torch.randn(n, generator=gen)
    if bf16:
        tau = tau.to(torch.bfloat16).float()  # thousands of exact ties at every magnitude
    for density in (0.2, 0.01, 0.9):
        k = max(1, int(density * n))
        order = torch.sort(tau.abs(), descending=True, stable=True).indices  # ties: the lower index first
        want = torch.zeros_like(tau)
        want[order[:k]] = tau[order[:k]]
        got = trim_(tau.clone(), density)
        assert torch.equal(got, want), (n, bf16, density)
        assert kth_largest(tau.abs(), k) == tau.abs()[order[k - 1]]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["metagpt", "ties"])
def test_engine_output_files_equal_dense_reference_on_the_zoo(zoo, tmp_path, method):
    """The streaming engine on real checkpoints vs a whole-model dense computation here."""
    labels = list(zoo.finetunes)
    recipe = parse_recipe({"name": "z", "base": str(zoo.base), "method": method, "workdir": str(tmp_path),
                           "finetunes": [{"ref": str(p), "name": n} for n, p in zoo.finetunes.items()],
                           "merge": {"device": "cpu", "shard_size_mb": 2}})
    plan = plan_for(recipe.method)
    b = resolve(recipe.base, tmp_path)
    fs = [resolve(f.ref, tmp_path) for f in recipe.finetunes]
    stats = [extract(b, f, n, plan, "base", tmp_path) for f, n in zip(fs, labels, strict=True)]
    out = merge_stage.merge(recipe, b, fs, solve(labels, stats, plan, method))
    got = {}
    for f in (tmp_path / out.path).glob("*.safetensors"):
        got.update(load_file(str(f)))
    assert len(list((tmp_path / out.path).glob("*.safetensors"))) > 1  # really sharded
    base = load_file(str(zoo.base / "model.safetensors"))
    fts = [load_file(str(p / "model.safetensors")) for p in zoo.finetunes.values()]
    floats = FLOATS(base)
    if method == "metagpt":
        norms = np.array([sum(float(torch.sum((ft[k].double() - base[k].double()) ** 2)) for k in floats) for ft in fts])
        lam = norms / norms.sum()
    for k in floats:
        bk, taus = _taus(base, fts, k)
        if method == "metagpt":
            want = bk + sum(w * t for w, t in zip(lam, taus, strict=True))
        else:
            want = bk + _ties_reference([_trim(t.astype(np.float32).astype(np.float64), 0.2) for t in taus],
                                        [1] * len(taus), 1.0, normalize=True)
        np.testing.assert_allclose(got[k].double().numpy(), want, rtol=1e-4, atol=1e-5, err_msg=k)


def test_iso_c_keeps_a_rank_deficient_sum_in_its_own_subspace():
    """Two rank-1 task vectors: the flattened update is rank 2, σ̄ = the mean of the two non-zero σ,
    the same in float32 and float64 (no null-space direction the SVD routine happened to pick)."""
    gen = torch.Generator().manual_seed(0)
    vectors = [torch.outer(torch.randn(64, generator=gen), torch.randn(48, generator=gen)) for _ in range(2)]
    taus = torch.stack([v.reshape(-1) for v in vectors])
    plan = MergePlan(weighting="uniform", spectral="iso")
    delta = combine(taus.clone(), torch.full((2,), 0.5), plan, matrix_shape=(64, 48)).reshape(64, 48)
    u, sigma, vh = np.linalg.svd((vectors[0] + vectors[1]).double().numpy(), full_matrices=False)
    want = sigma[:2].mean() * (u[:, :2] @ vh[:2])
    np.testing.assert_allclose(delta.double().numpy(), want, rtol=1e-4, atol=1e-4)
    assert np.linalg.matrix_rank(delta.double().numpy(), tol=1e-3) == 2
