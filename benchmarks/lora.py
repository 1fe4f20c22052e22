"""LoRA adapters as merge inputs: extraction and merge straight from adapters vs materializing them first.

    python benchmarks/lora.py [--size small|default|large] [--adapters 8] [--rank 16]

On the benchmark family's base (benchmarks/merge_throughput.py), writes N PEFT adapters of
rank r on every attention and MLP projection (adapter_config.json + adapter_model.safetensors,
exactly as peft saves them). Each measurement runs in its own process (wall time, peak RSS):
  * extract_adapters: MetaGPT's ‖τ‖² of all N adapters from r×r products (+ one base read);
  * materialize: what users do today, peft's merge_and_unload() per adapter, saved to disk;
  * extract_materialized: the same statistics from the N materialized checkpoints;
  * merge_adapters / merge_materialized: the MetaGPT merge from the adapters / from the copies.
The outputs of both merges are compared tensor by tensor. Results: benchmarks/results/lora.json.
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
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))

from benchmarks.merge_throughput import SIZES, llama_config, llama_tensors, write_model  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def write_adapter(folder: Path, base: dict, rank: int, seed: int) -> None:
    """A PEFT LoRA adapter of `base`'s shapes (random A, small B: a trained adapter's magnitudes)."""
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, value in base.items():
        module = name.removesuffix(".weight")
        if value.ndim != 2 or module.rsplit(".", 1)[-1] not in TARGETS:
            continue
        out_features, in_features = value.shape
        key = f"base_model.model.{module}"
        tensors[f"{key}.lora_A.weight"] = torch.randn(rank, in_features, generator=gen) / in_features ** 0.5
        tensors[f"{key}.lora_B.weight"] = torch.randn(out_features, rank, generator=gen) * 0.002
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": TARGETS, "use_rslora": False,
        "fan_in_fan_out": False, "bias": "none", "modules_to_save": None, "base_model_name_or_path": None,
        "task_type": "CAUSAL_LM"}))


def build(work: Path, dims: dict, n: int, rank: int) -> tuple[Path, list[Path]]:
    root = work / ("lora-" + "-".join(f"{k}{v}" for k, v in sorted(dims.items())) + f"-n{n}-r{rank}")
    if not (root / "done").exists():
        shutil.rmtree(root, ignore_errors=True)
        base = llama_tensors(**dims, seed=0)
        write_model(root / "base", base, llama_config(**dims))
        for i in range(n):
            write_adapter(root / f"adapter{i}", base, rank, seed=100 + i)
        (root / "done").write_text("ok")
    return root / "base", [root / f"adapter{i}" for i in range(n)]


def run_child(code: str) -> dict:
    """Runs `code` in a fresh process; returns its printed JSON plus wall seconds and peak RSS (MB)."""
    prelude = f"import sys, json, time; sys.path.insert(0, {str(ROOT.parent)!r}); from pathlib import Path\n"
    epilogue = ("\nrss = [int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM')][0]\n"
                "print(json.dumps({**RESULT, 'peak_rss_mb': round(rss / 1024, 1)}))\n")
    started = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", prelude + code + epilogue], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-3000:])
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["process_s"] = round(time.perf_counter() - started, 2)
    return result


def extract_code(base: Path, models: list[Path]) -> str:
    return (f"from metamerge.engine.taskvectors import extract_stats\nt = time.perf_counter()\n"
            f"stats = [extract_stats(Path({str(base)!r}), Path(p), f'ft{{i}}') for i, p in enumerate({[str(m) for m in models]!r})]\n"
            "RESULT = {'seconds': round(time.perf_counter() - t, 2), 'sq_norms': [s.total_sq_norm for s in stats]}\n")


def materialize_code(base: Path, adapters: list[Path], out: Path) -> str:
    return ("import torch\nfrom transformers import AutoModelForCausalLM\nfrom peft import PeftModel\n"
            "t = time.perf_counter()\n"
            f"for i, a in enumerate({[str(a) for a in adapters]!r}):\n"
            f"    model = AutoModelForCausalLM.from_pretrained({str(base)!r}, dtype=torch.float32)\n"
            "    merged = PeftModel.from_pretrained(model, a).merge_and_unload()\n"
            f"    merged.save_pretrained(Path({str(out)!r}) / f'full{{i}}', safe_serialization=True)\n"
            "    del model, merged\n"
            "RESULT = {'seconds': round(time.perf_counter() - t, 2)}\n")


def merge_code(base: Path, models: list[Path], out: Path) -> str:
    return ("from metamerge.engine.coefficients import solve_metagpt\nfrom metamerge.engine.merge import merge_checkpoints\n"
            "from metamerge.engine.taskvectors import extract_stats\nfrom metamerge.methods.registry import plan_for\n"
            "from metamerge.recipe import Method\n"
            f"models = [Path(p) for p in {[str(m) for m in models]!r}]\nbase = Path({str(base)!r})\n"
            "labels = [f'ft{i}' for i in range(len(models))]\n"
            "c = solve_metagpt(labels, {l: extract_stats(base, m, l).sq_norms for l, m in zip(labels, models)})\n"
            "t = time.perf_counter()\n"
            f"merge_checkpoints(base, list(zip(labels, models)), c, plan_for(Method(name='metagpt')), Path({str(out)!r}),"
            " dtype='float32', device='cpu')\n"
            "RESULT = {'seconds': round(time.perf_counter() - t, 2), 'lambda': c.model_level()}\n")


def max_difference(a: Path, b: Path) -> float:
    from metamerge.engine.checkpoint import CheckpointReader

    ra, rb = CheckpointReader(a), CheckpointReader(b)
    return max(float((ra.read(n) - rb.read(n)).abs().max()) for n in ra.names if ra.info(n).is_float)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="default")
    parser.add_argument("--adapters", type=int, default=8)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--work", type=Path, default=ROOT / "work")
    args = parser.parse_args()
    dims = SIZES[args.size]
    base, adapters = build(args.work, dims, args.adapters, args.rank)
    scratch = args.work / "lora-scratch"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    results: dict = {"size": args.size, "dims": dims, "adapters": args.adapters, "rank": args.rank,
                     "threads": os.cpu_count(), "base_bytes": sum(f.stat().st_size for f in base.glob("*.safetensors")),
                     "adapter_bytes": sum((a / "adapter_model.safetensors").stat().st_size for a in adapters)}
    results["extract_adapters"] = run_child(extract_code(base, adapters))
    results["materialize"] = run_child(materialize_code(base, adapters, scratch))
    full = [scratch / f"full{i}" for i in range(len(adapters))]
    results["extract_materialized"] = run_child(extract_code(base, full))
    results["merge_adapters"] = run_child(merge_code(base, adapters, scratch / "merged-adapters"))
    results["merge_materialized"] = run_child(merge_code(base, full, scratch / "merged-full"))
    a, m = results["extract_adapters"], results["extract_materialized"]
    results["sq_norm_max_relative_difference"] = max(abs(x - y) / y for x, y in zip(a.pop("sq_norms"), m.pop("sq_norms"), strict=True))
    results["merged_max_abs_difference"] = max_difference(scratch / "merged-adapters", scratch / "merged-full")
    results["extraction_speedup"] = round((results["materialize"]["seconds"] + m["seconds"]) / a["seconds"], 1)
    results["extraction_time_share"] = round(a["seconds"] / (results["materialize"]["seconds"] + m["seconds"]), 3)
    results["machine"] = os.uname().machine
    out = ROOT / "results" / "lora.json"
    out.write_text(json.dumps(results, indent=1) + "\n")
    print(json.dumps(results, indent=1))
    shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
