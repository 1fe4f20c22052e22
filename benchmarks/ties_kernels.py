"""TIES' kernels alone on one 1.57 M-entry projection (2048 × 768, base + 3 fine-tunes, in memory):
median milliseconds of each step against task arithmetic's one pass, on this machine's cores.

    python benchmarks/ties_kernels.py          # taskset -c 0-1 ... for two of the cores

What a merge adds (loading and writing threads, pages mapped from files) is not here: this is
the floor of each step, to compare machines and to find the per-piece fixed costs.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from metamerge.methods import compiled, ties, ties_bands  # noqa: E402
from metamerge.methods.linear_kernels import linear_merge  # noqa: E402


def _median_ms(step, repeats: int = 200) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        step()
        times.append(time.perf_counter() - started)
    return 1e3 * statistics.median(times[20:])


def main() -> None:
    torch.manual_seed(0)
    n = 2048 * 768
    base = torch.randn(n) * 0.02
    rows = [base] + [base + torch.randn(n) * 0.002 for _ in range(3)]
    k = int(0.2 * n)
    lo, hi = ties._brackets(rows, k, True)
    _, _, above, bands = ties_bands.first_pass(rows, lo, hi)
    sizes = bands.sizes().tolist()
    packed, _ = bands.collect()
    band = packed[: sizes[0]].copy()
    floors, cuts = ties._floors_and_cuts(ties._compiled_trims(rows, k, above, bands))
    out, weights = torch.empty(n), torch.ones(3, 1)
    print(f"torch threads {torch.get_num_threads()}, numpy {np.__version__}, band sizes {sizes}")
    steps = {
        "first pass": lambda: ties_bands.first_pass(rows, lo, hi),
        "trims (all three)": lambda: ties_bands.trims(rows, k, above, bands),
        "  bands packed": bands.collect,
        "  one band's partition": lambda: np.partition(band, sizes[0] - (k - above[0])),
        "second pass": lambda: compiled.second_pass(rows, floors, cuts, weights, 1.0, True, out, counting=False),
        "task arithmetic's pass": lambda: linear_merge(rows, weights * 0.3, out),
        "brackets (compiled sample)": lambda: ties._brackets(rows, k, True),
    }
    for name, step in steps.items():
        print(f"{name:28s} {_median_ms(step):.3f} ms")


if __name__ == "__main__":
    main()
