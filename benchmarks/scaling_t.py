"""How a merge scales with the number of fine-tunes T: time linear in T, memory within O(T × chunk).

    python benchmarks/scaling_t.py [--size default] [--counts 2,4,8,16] [--repeats 2]

On the benchmark family (benchmarks/merge_throughput.py) with 16 fine-tunes, for each T:
  * io_floor_s: read base + T fine-tunes once and write one model (the least any merge does);
  * task_arithmetic_s / metagpt_s: our merge in-process (MetaGPT with its norm pass), best of N;
  * peak_rss_mb: a task-arithmetic merge in a child process (VmHWM);
  * rss_bound_mb: the documented bound R0 + 2·(T+2)·chunk + T·block + 2·stack: two alternating
    workspaces of T+1 input rows and one result row, chunk = 32 MB of float32
    (metamerge.engine.checkpoint.CHUNK_ELEMENTS), the linear kernel's τ scratch of T rows of
    one block (kernels.LINEAR_BLOCK floats, 0.25 MB each), the reader's and the writer's
    thread stacks (8 MB each, Linux's default), and R0 the process's RSS before merging.
Results: benchmarks/results/scaling_t.json and the plot benchmarks/results/scaling_t.png.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))

from benchmarks.merge_throughput import (  # noqa: E402
    SIZES,
    drop_page_cache_hint,
    io_floor,
    llama_config,
    llama_tensors,
    ours,
    write_model,
)
from metamerge.methods.kernels import LINEAR_BLOCK  # noqa: E402

CHUNK_MB = (1 << 23) * 4 / 2**20
THREAD_STACK_MB = 8.0
BLOCK_MB = LINEAR_BLOCK * 4 / 2**20  # one row of the linear kernel's τ scratch


def build(work: Path, dims: dict, count: int) -> tuple[Path, list[Path]]:
    root = work / ("scale-" + "-".join(f"{k}{v}" for k, v in sorted(dims.items())) + f"-t{count}")
    if not (root / "done").exists():
        shutil.rmtree(root, ignore_errors=True)
        config = llama_config(**dims)
        base = llama_tensors(**dims, seed=0)
        write_model(root / "base", base, config)
        for i in range(count):
            write_model(root / f"ft{i}", llama_tensors(**dims, seed=i + 1, base=base), config)
        (root / "done").write_text("ok")
    return root / "base", [root / f"ft{i}" for i in range(count)]


def peak_rss(base: Path, fts: list[Path], out: Path, work: Path) -> tuple[float, float]:
    """(RSS before the merge, peak RSS) in MB, of a child process that merges with task arithmetic."""
    code = (f"import sys; sys.path.insert(0, {str(ROOT.parent)!r})\n"
            "from pathlib import Path\nfrom benchmarks.merge_throughput import ours\n"
            # everything the merge imports, so that R0 is the process before merging, not before importing
            "import metamerge.engine.merge, metamerge.pipeline.extract, metamerge.pipeline.inputs, "
            "metamerge.pipeline.solve, metamerge.recipe, metamerge.methods.registry\n"
            # and the compiled linear pass, loaded by one tiny call (numba, LLVM and the machine code
            # from numba's cache: about 110 MB of code, the same at any T, not the merge's data)
            "import torch\nfrom metamerge.methods.native import linear_kernels, use_compiled\n"
            "if use_compiled(): linear_kernels().linear_merge([torch.zeros(1)] * 2, torch.ones(1), torch.empty(1))\n"
            "def rss(key): return [int(l.split()[1]) for l in open('/proc/self/status') if l.startswith(key)][0] / 1024\n"
            "before = rss('VmRSS')\n"
            f"ours(Path({str(base)!r}), [Path(p) for p in {[str(p) for p in fts]!r}], 'task_arithmetic', "
            f"Path({str(out)!r}), Path({str(work)!r}))\n"
            "print(before, rss('VmHWM'))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    before, peak = done.stdout.strip().splitlines()[-1].split()
    shutil.rmtree(out, ignore_errors=True)
    return float(before), float(peak)


def derived(row: dict) -> dict:
    """The verdicts the README quotes: within the memory bound, time per GB of inputs, ratio to the floor."""
    gigabytes = row["input_mb"] / 1024
    return {"within_bound": row["peak_rss_mb"] <= row["rss_bound_mb"],
            "ratio_to_io_floor": round(row["task_arithmetic_s"] / row["io_floor_s"], 2),
            "task_arithmetic_s_per_gb": round(row["task_arithmetic_s"] / gigabytes, 3),
            "metagpt_s_per_gb": round(row["metagpt_s"] / gigabytes, 3)}


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = [r["T"] for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    lines = {left: [("io_floor_s", "k--o", "I/O floor"), ("task_arithmetic_s", "-o", "task arithmetic"),
                    ("metagpt_s", "-o", "MetaGPT (norm pass + merge)")],
             right: [("peak_rss_mb", "-o", "peak RSS (task arithmetic)"),
                     ("rss_bound_mb", "k--", "bound R0 + 2(T+2)·32 MB + T·0.25 MB + 2 stacks")]}
    titles = {left: ("seconds", "time: linear in T"), right: ("MB", "memory: O(T × chunk), not O(T × model)")}
    for axis, series in lines.items():
        for key, style, label in series:
            axis.plot(counts, [r[key] for r in rows], style, label=label)
        axis.set_xlabel("fine-tunes T")
        axis.set_ylabel(titles[axis][0])
        axis.set_title(titles[axis][1])
        axis.set_xticks(counts)
        axis.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="default")
    parser.add_argument("--counts", default="2,4,8,16")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--work", type=Path, default=ROOT / "work")
    args = parser.parse_args()
    counts = [int(c) for c in args.counts.split(",")]
    dims = SIZES[args.size]
    base, all_fts = build(args.work, dims, max(counts))
    model_mb = sum(f.stat().st_size for f in base.glob("*.safetensors")) / 2**20
    rows = []
    for count in counts:
        fts = all_fts[:count]
        drop_page_cache_hint([base, *fts])
        out = args.work / "scale-out"
        row: dict = {"T": count, "input_mb": round(model_mb * (count + 1), 1)}
        row["io_floor_s"] = round(min(io_floor([base, *fts], out) for _ in range(args.repeats)), 3)
        for method in ("task_arithmetic", "metagpt"):
            times = []
            for _ in range(args.repeats):
                times.append(ours(base, fts, method, out / method, args.work))
                shutil.rmtree(out / method, ignore_errors=True)
            row[f"{method}_s"] = round(min(times), 3)
        before, peak = peak_rss(base, fts, out / "rss", args.work)
        row["rss_before_mb"], row["peak_rss_mb"] = round(before, 1), round(peak, 1)
        row["rss_bound_mb"] = round(before + 2 * (count + 2) * CHUNK_MB + count * BLOCK_MB + 2 * THREAD_STACK_MB, 1)
        row["task_arithmetic_per_ft_s"] = round(row["task_arithmetic_s"] / count, 3)
        row.update(derived(row))
        rows.append(row)
        print(json.dumps(row))
    result = {"size": args.size, "dims": dims, "model_mb": round(model_mb, 1), "threads": os.cpu_count(),
              "chunk_mb": CHUNK_MB, "rows": rows}
    (ROOT / "results" / "scaling_t.json").write_text(json.dumps(result, indent=1) + "\n")
    plot(rows, ROOT / "results" / "scaling_t.png")


if __name__ == "__main__":
    main()
