"""Merge throughput against the raw I/O floor on synthetic Llama-shaped checkpoints.

    python benchmarks/merge_throughput.py [--size small|default|large] [--repeats 3]

Builds a base and 3 fine-tunes (default: hidden 768, 12 layers, vocab 32000, fp32, about
0.5 GB each), then measures, best of N in the same process:
  * io_floor_s: read every input tensor once with safetensors and write one output of the
    same size (the least any merge must do);
  * ours_s per method: the streaming engine, in-process;
  * peak RSS of a merge (child process) at two depths, to show it does not grow with layers.
Results go to benchmarks/results/merge_throughput.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parent
SIZES = {
    "small": {"hidden": 256, "layers": 4, "vocab": 8000, "intermediate": 688},
    "default": {"hidden": 768, "layers": 12, "vocab": 32000, "intermediate": 2048},
    "large": {"hidden": 1024, "layers": 24, "vocab": 32000, "intermediate": 2816},
}
LABELS = ["ft0", "ft1", "ft2"]


def llama_tensors(hidden: int, layers: int, vocab: int, intermediate: int, seed: int, base=None):
    gen = torch.Generator().manual_seed(seed)
    shapes = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            shapes[f"{p}self_attn.{proj}.weight"] = (hidden, hidden)
        shapes[f"{p}mlp.gate_proj.weight"] = (intermediate, hidden)
        shapes[f"{p}mlp.up_proj.weight"] = (intermediate, hidden)
        shapes[f"{p}mlp.down_proj.weight"] = (hidden, intermediate)
        shapes[f"{p}input_layernorm.weight"] = (hidden,)
        shapes[f"{p}post_attention_layernorm.weight"] = (hidden,)
    shapes["model.norm.weight"] = (hidden,)
    shapes["lm_head.weight"] = (vocab, hidden)
    out = {}
    for name, shape in shapes.items():
        if base is None:
            out[name] = torch.randn(shape, generator=gen) * 0.02
        else:
            out[name] = base[name] + torch.randn(shape, generator=gen) * 0.002
    return out


def write_model(folder: Path, tensors: dict, shard_bytes: int = 1 << 30) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    shard, size, shards = {}, 0, []
    for name, t in tensors.items():
        if shard and size + t.numel() * 4 > shard_bytes:
            shards.append(shard)
            shard, size = {}, 0
        shard[name] = t
        size += t.numel() * 4
    shards.append(shard)
    weight_map = {}
    for i, part in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(part, str(folder / fname))
        weight_map.update({k: fname for k in part})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "torch_dtype": "float32"}))


def build_family(work: Path, dims: dict) -> tuple[Path, list[Path]]:
    key = "-".join(f"{k}{v}" for k, v in sorted(dims.items()))
    root = work / f"family-{key}"
    if not (root / "done").exists():
        shutil.rmtree(root, ignore_errors=True)
        base = llama_tensors(**dims, seed=0)
        write_model(root / "base", base)
        for i, label in enumerate(LABELS):
            write_model(root / label, llama_tensors(**dims, seed=i + 1, base=base))
        (root / "done").write_text("ok")
    return root / "base", [root / label for label in LABELS]


def drop_page_cache_hint(paths: list[Path]) -> None:
    """Warm cache for every measurement alike: read all inputs once before timing."""
    for folder in paths:
        for f in folder.glob("*.safetensors"):
            with open(f, "rb") as fh:
                while fh.read(64 << 20):
                    pass


def io_floor(inputs: list[Path], out_dir: Path) -> float:
    """Read every input tensor once, write one output of the base's size. Nothing else."""
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir(parents=True)
    started = time.perf_counter()
    with open(out_dir / "out.bin", "wb") as out:
        for folder in inputs:
            for f in sorted(folder.glob("*.safetensors")):
                handle = safe_open(str(f), framework="pt")
                for name in handle.keys():  # noqa: SIM118
                    # clone(): safetensors may hand back a lazily mapped tensor; make the read real
                    t = handle.get_tensor(name).clone()
                    if folder == inputs[0]:
                        out.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
        out.flush()
        os.fsync(out.fileno())
    return time.perf_counter() - started


def ours(base: Path, fts: list[Path], method: str, out_dir: Path, work: Path) -> float:
    from metamerge import stages
    from metamerge.recipe import parse_recipe

    recipe = parse_recipe({
        "name": f"bench-{method}", "base": str(base), "method": {"name": method},
        "finetunes": [{"ref": str(p), "name": p.name} for p in fts],
        "merge": {"device": "cpu", "shard_size_mb": 1000}, "workdir": str(work / "wd"),
    })
    from metamerge.merge import merge_checkpoints
    from metamerge.methods import plan_for

    plan = plan_for(recipe.method)
    rb = stages.resolve(str(base), work / "wd")
    rfs = [stages.resolve(str(p), work / "wd") for p in fts]
    started = time.perf_counter()
    stats = [stages.extract(rb, f, f.path.name, plan, "base", work / "wd") for f in rfs] if plan.needs_norms else []
    coefficients = stages.solve([p.name for p in fts], stats, plan, method)
    merge_checkpoints(base, [(p.name, p) for p in fts], coefficients, plan, out_dir, device="cpu", shard_size_mb=1000)
    elapsed = time.perf_counter() - started
    shutil.rmtree(work / "wd" / "stats", ignore_errors=True)  # time extraction every repeat
    return elapsed


def peak_rss_mb_of_merge(base: Path, fts: list[Path], out_dir: Path, work: Path) -> float:
    code = (
        f"import sys, resource; sys.path.insert(0, {str(ROOT.parent)!r})\n"
        "from benchmarks.merge_throughput import ours\nfrom pathlib import Path\n"
        f"ours(Path({str(base)!r}), [Path(p) for p in {[str(p) for p in fts]!r}], 'task_arithmetic', "
        f"Path({str(out_dir)!r}), Path({str(work)!r}))\n"
        "print([l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')][0])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1]) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="default")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--methods", default="task_arithmetic,metagpt,ties")
    parser.add_argument("--work", type=Path, default=ROOT / "work")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    dims = SIZES[args.size]
    base, fts = build_family(args.work, dims)
    drop_page_cache_hint([base, *fts])
    out = args.work / "out"
    results: dict = {"size": args.size, "dims": dims, "threads": torch.get_num_threads(),
                     "input_bytes": sum(f.stat().st_size for d in [base, *fts] for f in d.glob("*.safetensors"))}
    results["io_floor_s"] = min(io_floor([base, *fts], out) for _ in range(args.repeats))
    results["ours_s"] = {}
    for method in args.methods.split(","):
        results["ours_s"][method] = min(ours(base, fts, method, out / method, args.work) for _ in range(args.repeats))
        shutil.rmtree(out / method, ignore_errors=True)
    results["ratio_to_io_floor"] = {m: round(s / results["io_floor_s"], 3) for m, s in results["ours_s"].items()}
    deep = dict(dims, layers=dims["layers"] * 4)
    base_deep, fts_deep = build_family(args.work, deep)
    results["peak_rss_mb"] = {
        f"ours_{dims['layers']}_layers": peak_rss_mb_of_merge(base, fts, out / "rss", args.work),
        f"ours_{deep['layers']}_layers": peak_rss_mb_of_merge(base_deep, fts_deep, out / "rss", args.work),
    }
    (ROOT / "results").mkdir(exist_ok=True)
    (ROOT / "results" / "merge_throughput.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
