"""Linear merges give the same bytes on every x86 CPU: Σ w τ is the fixed-order, unfused sum.

A BLAS product had computed it (MKL's sgemm). Its order and fused multiply-adds follow the CPU's
vendor: of benchmarks/results/merge_digests.json, recorded on an Intel AVX-512 machine, the 53
files of the 18 merges whose last step was that product differed on an AMD AVX-512 one, while
the 97 files of the TIES-style merges matched.
The reference here is numpy, one IEEE float32 operation at a time, so a fused or reordered sum
fails it (on machines whose BLAS fuses: the AMD one's did not).
"""

from __future__ import annotations

import os
import random
import subprocess
import sys

import numpy as np
import pytest
import torch

from metamerge.engine.streaming import _linear_piece_blocked
from metamerge.methods import native
from metamerge.methods.kernels import LINEAR_BLOCK, combine, linear_blocked
from metamerge.methods.plan import MergePlan
from tests.numba_targets import runs_here, target_env

WEIGHTS = [0.3, 1 / 3, 0.7111, 0.123]


def _rows(n: int, seed: int = 5) -> list[torch.Tensor]:
    """Base and fine-tunes from Python's generator (torch.randn differs between vector widths),
    spread over many octaves so that fused and unfused sums part in many entries."""
    rnd = random.Random(seed)
    base = [rnd.gauss(0.0, 0.02) * 2.0 ** rnd.randint(-20, 4) for _ in range(n)]
    rows = [torch.tensor(base, dtype=torch.float32)]
    for _ in WEIGHTS:
        rows.append(rows[0] + torch.tensor([rnd.gauss(0.0, 2e-3) * 2.0 ** rnd.randint(-20, 4) for _ in range(n)]))
    rows[1][:7] = rows[0][:7]  # exact zeros in τ: their sign must not change the sum
    rows[2][3:5] = -rows[2][3:5]
    return rows


def _reference(rows: list[torch.Tensor], weights: np.ndarray, scale_first: float, scale_after: float) -> np.ndarray:
    """(((+0 + w₀τ₀) + w₁τ₁) + …)·s + θ₀ in numpy, each product and add rounded to float32."""
    arrays = [row.numpy() for row in rows]
    base = arrays[0]
    weights = (weights * np.float32(scale_first)).astype(np.float32)
    total = np.zeros_like(base)
    for w, row in zip(weights, arrays[1:], strict=True):
        total = total + (row - base) * w
    if scale_after != 1.0:
        total = total * np.float32(scale_after)
    return total + base


def _implementations() -> list:
    found = [pytest.param(linear_blocked, id="torch")]
    if native.use_compiled():
        found.append(pytest.param(native.linear_kernels().linear_merge, id="compiled"))
    return found


@pytest.mark.parametrize("implementation", _implementations())
@pytest.mark.parametrize("n", [1, 1000, LINEAR_BLOCK + 123, 3 * LINEAR_BLOCK + 1029])
def test_the_linear_merge_is_the_unfused_sum_in_order(n, implementation):
    rows = _rows(n)
    scaled = torch.tensor(WEIGHTS) * 0.3
    out = torch.full((n + 5,), 7.0)  # a reused buffer may be longer than the piece
    gram, base_sq = implementation(rows, scaled, out)
    want = _reference(rows, np.array(WEIGHTS, dtype=np.float32), 0.3, 1.0)
    assert np.array_equal(out[:n].numpy().view(np.uint32), want.view(np.uint32))
    assert bool((out[n:] == 7.0).all())
    taus = (torch.stack(rows[1:]) - rows[0]).double()  # τ is made in float32 everywhere
    exact = taus @ taus.T
    assert torch.allclose(gram, exact, rtol=0, atol=1e-5 * float(exact.diagonal().max()))  # float32 products
    assert base_sq == pytest.approx(float(rows[0].double() @ rows[0].double()), rel=1e-5)


def test_the_streaming_engine_takes_the_compiled_pass_when_it_can(monkeypatch):
    if not native.use_compiled():
        pytest.skip("numba is not installed")
    calls = []
    module = native.linear_kernels()
    monkeypatch.setattr(module, "linear_merge", lambda *args: calls.append(1) or linear_blocked(*args))
    rows = _rows(1000)
    _linear_piece_blocked(rows, torch.tensor(WEIGHTS), MergePlan(weighting="constant"), list("abcd"), "t",
                          torch.empty(1000))
    assert calls == [1]
    monkeypatch.setenv("METAMERGE_COMPILED", "0")
    _linear_piece_blocked(rows, torch.tensor(WEIGHTS), MergePlan(weighting="constant"), list("abcd"), "t",
                          torch.empty(1000))
    assert calls == [1]


def test_the_whole_tensor_linear_combine_is_the_unfused_sum_in_order():
    rows = _rows(3 * 1000)
    weights = torch.tensor(WEIGHTS)
    taus = torch.stack(rows[1:]).sub_(rows[0]).reshape(len(WEIGHTS), 30, 100)
    delta = combine(taus, weights, MergePlan(weighting="constant", scale=0.3))
    assert delta.shape == (30, 100)
    want = _reference(rows, np.array(WEIGHTS, dtype=np.float32), 1.0, 0.3)
    got = delta.reshape(-1).add_(rows[0])
    assert np.array_equal(got.numpy().view(np.uint32), want.view(np.uint32))


_SCRIPT = """
import hashlib, sys
import torch
sys.path.insert(0, sys.argv[2])
from tests.test_linear_bytes import WEIGHTS, _rows
from metamerge.engine.streaming import _linear_piece_blocked
from metamerge.methods.plan import MergePlan
torch.set_num_threads(int(sys.argv[1]))
rows = _rows(200_001)
out = torch.empty(200_001)
merged, _, _ = _linear_piece_blocked(rows, torch.tensor(WEIGHTS), MergePlan(weighting="constant", scale=0.3),
                                     ["a", "b", "c", "d"], "t", out)
print(hashlib.sha256(merged.numpy().tobytes()).hexdigest())
"""


def test_linear_merge_bytes_do_not_follow_the_kernels_or_the_thread_count():
    """torch's default, AVX2 and native kernels with 1 and 2 threads; the compiled pass for numba
    targets x86-64 (SSE2), haswell (AVX2 + FMA) and this machine's, and the torch fallback: one set of bytes."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    runs = [(capability, None, threads, "0") for capability in ("default", "avx2", None) for threads in (1, 2)]
    if native.use_compiled():
        runs += [(None, cpu, threads, "1") for cpu in ("x86-64", "haswell", None) for threads in (1, 2)]
    prints = set()
    for capability, cpu, threads, compiled in [run for run in runs if runs_here(run[1])]:
        env = target_env({k: v for k, v in os.environ.items() if k != "ATEN_CPU_CAPABILITY"}, cpu)
        env["METAMERGE_COMPILED"] = compiled
        if capability:
            env["ATEN_CPU_CAPABILITY"] = capability
        done = subprocess.run([sys.executable, "-c", _SCRIPT, str(threads), repo], env=env, capture_output=True,
                              text=True, timeout=300, cwd=repo)
        assert done.returncode == 0, done.stderr
        prints.add(done.stdout.strip())
    assert len(prints) == 1, prints
