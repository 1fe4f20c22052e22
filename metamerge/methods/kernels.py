"""Per-tensor merge kernels for a MergePlan: sparsify, elect signs, combine.

mergekit's generalized task arithmetic is built the same way; conventions follow it (majority
sign of a zero sum is +, k = int(density·n)).
"""

from __future__ import annotations

import hashlib

import torch

from metamerge.methods.plan import MergePlan
from metamerge.methods.selection import outlier_drop, trim_


def dare_generator(seed: int, task_label: str, tensor_name: str, part: int = 0) -> torch.Generator:
    """One reproducible stream per (seed, fine-tune, tensor, row chunk), whatever the order of work."""
    suffix = f"\0{part}" if part else ""
    digest = hashlib.sha256(f"{seed}\0{task_label}\0{tensor_name}{suffix}".encode()).digest()
    gen = torch.Generator(device="cpu")
    gen.manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
    return gen


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

    `taus` is the caller's scratch: the linear case scales it in place (`weighted_sum_`), so no
    [T, n] temporary is made. The result goes into `out` when given, so the streaming engine can
    reuse its buffers. With `spectral: iso`, a weight matrix (`matrix_shape`, given by the
    engine for 2-D non-vocabulary tensors) gets Iso-C's update instead: the sum of task vectors
    with its singular values all set to their mean.
    """
    if plan.consensus == "none" and not plan.normalize:
        flat = taus.reshape(taus.shape[0], -1)
        delta = weighted_sum_(flat, weights, out=None if out is None else out.reshape(-1))
        delta = delta.reshape(taus.shape[1:])
    else:
        flat = taus.reshape(taus.shape[0], -1)
        delta = torch.empty(flat.shape[1], dtype=taus.dtype, device=taus.device) if out is None else out.reshape(-1)
        # cache-sized blocks: the election takes ~10 element-wise passes, cheap only in cache
        for start in range(0, flat.shape[1], CONSENSUS_BLOCK):
            block = flat[:, start : start + CONSENSUS_BLOCK]
            elect_and_combine(block, weights, plan, delta[start : start + CONSENSUS_BLOCK])
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


def elect_and_combine(taus: torch.Tensor, weights: torch.Tensor, plan: MergePlan, out: torch.Tensor) -> None:
    """TIES on a [T, b] block: sign of Σ w τ (0 elects +), keep agreeing entries, sum or mean.

    Float arithmetic only: on the CPU a comparison into a bool tensor, a bool-to-float cast or a
    masked fill costs 3–25× an add on the same entries. Each step is exact (signs are ±1, 0
    or −0; products by 1 or 0), and every zero, whatever its sign, adds nothing to a sum that
    starts from +0, so the result is the same floats as sign(τ) == majority with boolean masks.

    Sums over fine-tunes run in their order, from +0, one add at a time (`_in_order`): not a
    BLAS product or torch's reduction, whose order and fused multiply-adds vary with the CPU
    and the library. So the compiled kernels (`methods/compiled.py`) and every machine give
    the same floats.
    """
    w = weights.reshape(-1, 1)
    if plan.consensus == "ties":
        majority = _in_order(taus * w).sign_().add_(0.5).sign_()  # −1 or +1; a 0 sum elects +
        weighted_mask = torch.mul(taus, majority).sign_().clamp_min_(0.0).mul_(w)  # w where τ agrees, else ±0
    else:
        weighted_mask = w.expand_as(taus)
    _in_order(taus * weighted_mask, out=out)
    if plan.normalize:
        divisor = _in_order(weighted_mask)
        out.div_(divisor.add_(divisor.sign().abs_().neg_().add_(1.0)))  # a 0 divisor becomes 1, others stay


def weighted_sum_(taus: torch.Tensor, weights: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Σ_t w_t τ_t over a [T, n] scratch (scaled in place): each product and each add rounded once.

    Not a BLAS product: its order and fused multiply-adds follow the CPU's vendor, not only its
    vector width. MKL's float32 product gave different merged bytes on an Intel and an AMD
    AVX-512 machine (53 of 150 digested files: every merge whose last step it was), while TIES'
    sums, done this way, were the same. Elementwise products and adds are IEEE operations on
    every CPU and kernel.
    """
    taus.mul_(weights.reshape(-1, *([1] * (taus.dim() - 1))).to(taus.dtype))
    return _in_order(taus, out=out)


LINEAR_BLOCK = 1 << 16


def linear_blocked(rows: list[torch.Tensor], weights: torch.Tensor, out: torch.Tensor) -> tuple[torch.Tensor, float]:
    """out[:n] = θ₀ + Σ w τ in cache-sized column blocks, so τ, the gram and the sum touch memory
    once; returns (gram [T, T] float64, ‖θ₀‖²). The rows are only read: τ goes to a scratch block.
    The torch twin of `linear_kernels.linear_merge` (the fallback, and its reference)."""
    count, n = len(rows) - 1, rows[0].numel()
    gram = torch.zeros((count, count), dtype=torch.float64)
    base_sq = 0.0
    scratch = torch.empty((count, min(n, LINEAR_BLOCK)))
    for start in range(0, n, LINEAR_BLOCK):
        base = rows[0][start : start + LINEAR_BLOCK]
        taus = scratch[:, : base.numel()]
        for t in range(count):
            torch.sub(rows[t + 1][start : start + LINEAR_BLOCK], base, out=taus[t])
        base_sq += float(torch.dot(base, base))
        gram += (taus @ taus.T).double()
        weighted_sum_(taus, weights, out=out[start : start + base.numel()]).add_(base)
    return gram, base_sq


def _in_order(rows: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """(((+0 + rows[0]) + rows[1]) + …): a sum over dim 0 whose order is fixed by this code."""
    total = torch.add(rows[0], 0.0, out=out)
    for row in rows[1:]:
        total.add_(row)
    return total


def chunked(plan: MergePlan) -> bool:
    """Row chunks of a tensor merge independently, except under a whole-tensor rule: TIES' and
    Breadcrumbs' magnitude ranks, Iso-C's SVD. (DELLA ranks within rows, and chunks are whole rows.)"""
    return plan.sparsify not in ("magnitude", "outliers") and plan.spectral == "none"
