"""Per-tensor merge kernels for a MergePlan: sparsify, elect signs, combine.

mergekit's generalized task arithmetic is built the same way; conventions follow it (majority
sign of a zero sum is +, k = int(density·n)).
"""

from __future__ import annotations

import hashlib
import math

import torch

from metamerge.methods.plan import MergePlan


def dare_generator(seed: int, task_label: str, tensor_name: str, part: int = 0) -> torch.Generator:
    """One reproducible stream per (seed, fine-tune, tensor, row chunk), whatever the order of work."""
    suffix = f"\0{part}" if part else ""
    digest = hashlib.sha256(f"{seed}\0{task_label}\0{tensor_name}{suffix}".encode()).digest()
    gen = torch.Generator(device="cpu")
    gen.manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
    return gen


SELECT_MIN = 1 << 16  # from this many entries on, a sampled bracket beats a full kthvalue
SAMPLE = 1 << 14


def _bracket(sample: torch.Tensor, k: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Values around the k-th largest of n, from a sample: ±4 standard errors of its rank (at least ±1 %).

    Any bracket gives the exact answer (a missed one falls back), so this only decides the speed.
    """
    m = sample.numel()
    quantile = 1.0 - k / n
    width = max(0.01, 4.0 * math.sqrt(quantile * (1.0 - quantile) / m))
    lo_rank = min(m, max(1, int((quantile - width) * m)))
    hi_rank = min(m, max(1, int((quantile + width) * m) + 1))
    return torch.kthvalue(sample, lo_rank).values, torch.kthvalue(sample, hi_rank).values


def _sample(values: torch.Tensor) -> torch.Tensor:
    gen = torch.Generator(device="cpu").manual_seed(0)
    return values[torch.randint(values.numel(), (SAMPLE,), generator=gen).to(values.device)]


def kth_largest(values: torch.Tensor, k: int) -> torch.Tensor:
    """Exact k-th largest of a flat tensor, much faster than a full kthvalue on big tensors.

    A fixed-seed sample brackets the answer, one pass counts what lies above the bracket and
    keeps what lies inside it, and kthvalue runs on that small band only. Falls back to a
    full kthvalue whenever the bracket misses, so the result is always exact.
    """
    n = values.numel()
    if n <= SELECT_MIN:
        return torch.kthvalue(values, n - k + 1).values
    lo, hi = _bracket(_sample(values), k, n)
    above = int(torch.count_nonzero(values > hi))
    if above < k:
        band = values[(values >= lo) & (values <= hi)]
        need = k - above
        if band.numel() >= need:
            return torch.kthvalue(band, band.numel() - need + 1).values
    return torch.kthvalue(values, n - k + 1).values


def magnitude_mask(tau: torch.Tensor, density: float) -> torch.Tensor:
    """Keeps the int(density·n) largest |τ| entries (at least one); ties go to the lower index.

    Deterministic tie-breaking matters with bf16 inputs, where many |τ| are exactly equal:
    the same inputs must give the same merge on every device and every run.
    """
    return ~_magnitude_drop(tau.reshape(-1).abs(), density).reshape(tau.shape)


def _magnitude_drop(magnitudes: torch.Tensor, density: float) -> torch.Tensor:
    """Flat bool mask of the entries TIES' trim removes."""
    return _drop_all_but_top(magnitudes, max(1, int(density * magnitudes.numel())))


def _drop_all_but_top(magnitudes: torch.Tensor, k: int) -> torch.Tensor:
    """Flat bool mask of every entry outside the k largest; ties at the threshold keep the lower index."""
    n = magnitudes.numel()
    if k >= n:
        return torch.zeros(n, dtype=torch.bool, device=magnitudes.device)
    if k <= 0:
        return torch.ones(n, dtype=torch.bool, device=magnitudes.device)
    threshold = kth_largest(magnitudes, k)
    drop = magnitudes < threshold
    kept = n - int(torch.count_nonzero(drop))
    if kept > k:  # exact ties at the threshold: keep the lowest-index ones only
        tied = torch.nonzero(magnitudes == threshold).flatten()
        drop[tied[tied.numel() - (kept - k) :]] = True
    return drop


TRIM_BLOCK = 1 << 18  # elements (1 MB of float32): |τ| and masks of one block stay in cache


def trim_(flat: torch.Tensor, density: float) -> torch.Tensor:
    """TIES' trim in place on a flat τ: zeroes exactly the entries `_magnitude_drop` drops.

    On the CPU a large tensor is trimmed in cache-sized blocks and two reads of τ: one finds the
    threshold (the k-th largest |τ|, bracketed by a sample), one zeroes what lies below it. The
    plain version makes whole-tensor |τ|, masks and copies, each a fresh allocation (page faults)
    and a memory pass.
    """
    n = flat.numel()
    k = max(1, int(density * n))
    if k >= n:
        return flat
    if n <= SELECT_MIN or flat.device.type != "cpu":
        return flat.masked_fill_(_magnitude_drop(flat.abs(), density), 0.0)
    threshold, kept = _kth_largest_abs(flat, k)
    ties: list[torch.Tensor] = []
    for start in range(0, n, TRIM_BLOCK):
        block = flat[start : start + TRIM_BLOCK]
        magnitudes = block.abs()
        if kept > k:
            ties.append(torch.nonzero(magnitudes == threshold).flatten() + start)
        block.masked_fill_(magnitudes < threshold, 0.0)
    if kept > k:  # exact ties at the threshold: keep the lowest-index ones only, as `_drop_all_but_top`
        tied = torch.cat(ties)
        flat[tied[tied.numel() - (kept - k) :]] = 0.0
    return flat


def _kth_largest_abs(flat: torch.Tensor, k: int) -> tuple[torch.Tensor, int]:
    """`kth_largest(flat.abs(), k)` (the same exact value) with |τ| made per block, and how many |τ| are ≥ it."""
    n = flat.numel()
    lo, hi = _bracket(_sample(flat).abs(), k, n)
    above, bands = 0, []
    for start in range(0, n, TRIM_BLOCK):
        magnitudes = flat[start : start + TRIM_BLOCK].abs()
        above += int(torch.count_nonzero(magnitudes > hi))
        bands.append(magnitudes[(magnitudes >= lo) & (magnitudes <= hi)])
    band = torch.cat(bands)
    need = k - above
    if 0 < need <= band.numel():
        threshold = torch.kthvalue(band, band.numel() - need + 1).values
        return threshold, above + int(torch.count_nonzero(band >= threshold))
    magnitudes = flat.abs()
    threshold = torch.kthvalue(magnitudes, n - k + 1).values
    return threshold, int(torch.count_nonzero(magnitudes >= threshold))


def outlier_drop(magnitudes: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """Breadcrumbs: keep int(density·n) entries, the largest ones after the int(γ·n) largest (outliers).

    mergekit's `magnitude_outliers` counts the same way (a γ above 1 − density removes fewer
    outliers so that the density is met) but keeps nothing when γ·n < 1; here that keeps the top.
    """
    n = magnitudes.numel()
    keep = max(1, int(density * n))
    outliers = min(int(gamma * n), n - keep)
    return _drop_all_but_top(magnitudes, keep + outliers) | ~_drop_all_but_top(magnitudes, outliers)


def ranked_keep_probabilities(magnitudes: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """DELLA (MagPrune): in each row, keep probability rises linearly with |τ|'s rank, from density − ε
    (smallest) to density + ε (largest), so a row keeps `density` of its entries on average.

    `magnitudes` is [rows, columns]; ties in magnitude are ranked by position (a stable sort).
    """
    columns = magnitudes.shape[-1]
    if columns == 1:
        return torch.full_like(magnitudes, density)
    order = torch.argsort(magnitudes, dim=-1, stable=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(-1, order, torch.arange(columns, device=magnitudes.device).expand_as(order))
    return (density - epsilon) + ranks.to(magnitudes.dtype) * (2 * epsilon / (columns - 1))


def random_mask(shape: torch.Size, density: float, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """Bernoulli(density) keep-mask drawn on the CPU so every device gets identical masks."""
    return (torch.rand(shape, generator=generator) < density).to(device)


def sparsify_(taus: torch.Tensor, plan: MergePlan, labels: list[str], tensor_name: str, part: int = 0,
              row_length: int | None = None) -> torch.Tensor:
    """In place on `taus` [T, ...]: TIES trim, Breadcrumbs, DARE or DELLA drop-and-rescale; returns `taus`.

    `row_length`: the tensor's last dimension, which DELLA ranks within (None: one row).
    """
    if plan.sparsify == "none" or plan.density >= 1.0:
        return taus
    if taus[0].numel() == 0:
        return taus
    for t in range(taus.shape[0]):
        flat = taus[t].reshape(-1)
        if plan.sparsify == "magnitude":
            trim_(flat, plan.density)
        elif plan.sparsify == "outliers":
            flat.masked_fill_(outlier_drop(flat.abs(), plan.density, plan.gamma), 0.0)
        elif plan.sparsify == "random":
            gen = dare_generator(int(plan.seed or 0), labels[t], tensor_name, part)
            taus[t].mul_(random_mask(taus[t].shape, plan.density, gen, taus.device))
            taus[t].div_(plan.density)
        else:  # ranked: keep with a per-entry probability p, rescale kept entries by 1/p (unbiased, as the paper)
            rows = flat.reshape(-1, row_length or flat.numel())
            keep = ranked_keep_probabilities(rows.abs(), plan.density, plan.epsilon)
            gen = dare_generator(int(plan.seed or 0), labels[t], tensor_name, part)
            draw = torch.rand(rows.shape, generator=gen).to(taus.device)
            rows.mul_((draw < keep).to(rows.dtype)).div_(keep)
    return taus


def combine(taus: torch.Tensor, weights: torch.Tensor, plan: MergePlan, out: torch.Tensor | None = None,
            matrix_shape: tuple[int, int] | None = None) -> torch.Tensor:
    """Δ = scale · Σ_t w_t m_t τ_t / (Σ_t w_t m_t if normalize else 1), m from sign election.

    The linear case is one matrix-vector product over [T, n] (a single memory pass), written
    into `out` when given so the streaming engine can reuse its buffers. With `spectral: iso`,
    a weight matrix (`matrix_shape`, given by the engine for 2-D non-vocabulary tensors) gets
    Iso-C's update instead: the sum of task vectors with its singular values all set to their mean.
    """
    if plan.consensus == "none" and not plan.normalize:
        flat = taus.reshape(taus.shape[0], -1)
        delta = torch.matmul(weights.reshape(1, -1), flat, out=None if out is None else out.reshape(1, -1))
        delta = delta.reshape(taus.shape[1:])
    else:
        flat = taus.reshape(taus.shape[0], -1)
        delta = torch.empty(flat.shape[1], dtype=taus.dtype, device=taus.device) if out is None else out.reshape(-1)
        # cache-sized blocks: the election takes ~10 element-wise passes, cheap only in cache
        for start in range(0, flat.shape[1], CONSENSUS_BLOCK):
            block = flat[:, start : start + CONSENSUS_BLOCK]
            _elect_and_combine(block, weights, plan, delta[start : start + CONSENSUS_BLOCK])
        delta = delta.reshape(taus.shape[1:])
    if plan.spectral == "iso" and matrix_shape is not None:
        delta = _isotropic(delta, matrix_shape, taus.shape[0] / float(weights.sum()))
    if plan.scale != 1.0:
        delta.mul_(plan.scale)
    return delta


def _isotropic(delta: torch.Tensor, matrix_shape: tuple[int, int], to_sum: float) -> torch.Tensor:
    """Iso-C (arXiv 2502.04959): U·diag(mean σ)·Vᵀ of the summed task matrix, in place of `delta`.

    `delta` is the (uniformly) weighted Σ w τ; the paper flattens the spectrum of the plain sum
    Σ τ = `to_sum` · delta (T / Σ w), so α = 1 gives the sum's average singular value. On a
    full-rank sum this is the paper's update; a rank-deficient one keeps its own subspace.
    """
    u, sigma, vh = torch.linalg.svd(delta.reshape(matrix_shape) * to_sum, full_matrices=False)
    # the numerical rank only (numpy's matrix_rank tolerance): a null-space direction is whatever the
    # SVD routine picked, so giving it σ̄ would make the merge depend on the library and the device
    rank = int(torch.count_nonzero(sigma > sigma.max() * max(matrix_shape) * torch.finfo(sigma.dtype).eps))
    if rank == 0:
        return delta.zero_()
    flattened = (u[:, :rank] * sigma[:rank].mean()) @ vh[:rank]
    return delta.copy_(flattened.reshape(delta.shape))


CONSENSUS_BLOCK = 1 << 16


def _elect_and_combine(taus: torch.Tensor, weights: torch.Tensor, plan: MergePlan, out: torch.Tensor) -> None:
    """TIES on a [T, b] block: sign of Σ w τ (0 elects +), keep agreeing entries, sum or mean."""
    w = weights.reshape(-1, 1)
    if plan.consensus == "ties":
        majority = torch.where(torch.matmul(weights, taus) >= 0, 1.0, -1.0).to(taus.dtype)
        mask = (taus * majority > 0).to(taus.dtype)  # sign(τ) == majority: τ = 0 agrees with neither
    else:
        mask = torch.ones_like(taus)
    weighted_mask = mask.mul_(w)
    torch.sum(taus * weighted_mask, dim=0, out=out)
    if plan.normalize:
        divisor = weighted_mask.sum(dim=0)
        out.div_(divisor.masked_fill_(divisor == 0, 1.0))


def chunked(plan: MergePlan) -> bool:
    """Row chunks of a tensor merge independently, except under a whole-tensor rule: TIES' and
    Breadcrumbs' magnitude ranks, Iso-C's SVD. (DELLA ranks within rows, and chunks are whole rows.)"""
    return plan.sparsify not in ("magnitude", "outliers") and plan.spectral == "none"


_F64_BLOCK = 1 << 16


def sq_norm(tau: torch.Tensor) -> float:
    """‖τ‖² accumulated in float64, one cache-sized block at a time.

    Not `vector_norm(tau, dtype=float64)`: that casts the whole piece to a new float64 tensor
    first (30 ms for an 8 M-element chunk, five times the arithmetic, and most of MetaGPT's norm
    pass). Blocks of 64 K keep the float64 copy in cache and the sums as exact.
    """
    flat = tau.reshape(-1)
    if flat.dtype == torch.float64 or flat.numel() <= _F64_BLOCK:
        wide = flat.to(torch.float64)
        return float(torch.dot(wide, wide))
    block = torch.empty(_F64_BLOCK, dtype=torch.float64, device=flat.device)
    total = 0.0
    for start in range(0, flat.numel(), _F64_BLOCK):
        part = flat[start : start + _F64_BLOCK]
        wide = block[: part.numel()]
        wide.copy_(part)
        total += float(torch.dot(wide, wide))
    return total


def sq_norm_of_difference(theta: torch.Tensor, theta0: torch.Tensor) -> float:
    """`sq_norm(theta − theta0)`, the same float, without writing the difference to memory first.

    Each 64 K block's difference is made in float32 (as `sub_` would) and summed in float64 with
    the same block boundaries as `sq_norm`: the norm pass then reads each piece once, in cache.
    """
    a, b = theta.reshape(-1), theta0.reshape(-1)
    if a.numel() <= _F64_BLOCK:
        wide = (a - b).to(torch.float64)
        return float(torch.dot(wide, wide))
    narrow = torch.empty(_F64_BLOCK, dtype=a.dtype, device=a.device)
    block = torch.empty(_F64_BLOCK, dtype=torch.float64, device=a.device)
    total = 0.0
    for start in range(0, a.numel(), _F64_BLOCK):
        count = min(_F64_BLOCK, a.numel() - start)
        difference = torch.sub(a[start : start + count], b[start : start + count], out=narrow[:count])
        wide = block[:count]
        wide.copy_(difference)
        total += float(torch.dot(wide, wide))
    return total


def sq_norm_after_sparsify(tau: torch.Tensor, plan: MergePlan, label: str, tensor_name: str, part: int = 0,
                           row_length: int | None = None) -> float:
    """‖sparsify(τ)‖², which is what MetaGPT weighs when combined with TIES or DARE."""
    if plan.sparsify == "none":
        return sq_norm(tau)
    return sq_norm(sparsify_(tau.unsqueeze(0), plan, [label], tensor_name, part, row_length)[0])
