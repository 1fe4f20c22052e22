"""Merge throughput against the raw I/O floor on synthetic Llama-shaped checkpoints.

    python benchmarks/merge_throughput.py [--size small|default|large] [--repeats 3]

Builds a base and 3 fine-tunes (default: hidden 768, 12 layers, vocab 32000, fp32, about
0.5 GB each), then measures, best of N in the same process:
  * io_floor_s: read every input tensor once with safetensors and write one output of the
    same size (the least any merge must do);
  * ours_s per method: the streaming engine, in-process (floor and methods measured in
    interleaved rounds; runs_s keeps every repeat);
  * TIES with remembered trims (engine/thresholds.py): "ties_remembered", every fine-tune's
    trims known (a nightly re-merge), and "ties_new_finetune", the last fine-tune's not (a new
    fine-tune joined: only the base and it are read for its count);
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


def write_model(folder: Path, tensors: dict, config: dict, shard_bytes: int = 1 << 30) -> None:
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
    (folder / "config.json").write_text(json.dumps(config))


def llama_config(hidden: int, layers: int, vocab: int, intermediate: int) -> dict:
    """A real LlamaForCausalLM config: mergekit reads the architecture from it."""
    from transformers import LlamaConfig

    config = LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, vocab_size=vocab, intermediate_size=intermediate,
                         num_attention_heads=max(1, hidden // 64), num_key_value_heads=max(1, hidden // 64),
                         tie_word_embeddings=False, architectures=["LlamaForCausalLM"])
    data = config.to_dict()
    data["torch_dtype"] = "float32"
    return data


def build_family(work: Path, dims: dict) -> tuple[Path, list[Path]]:
    key = "v2-" + "-".join(f"{k}{v}" for k, v in sorted(dims.items()))
    root = work / f"family-{key}"
    if not (root / "done").exists():
        shutil.rmtree(root, ignore_errors=True)
        config = llama_config(**dims)
        base = llama_tensors(**dims, seed=0)
        write_model(root / "base", base, config)
        for i, label in enumerate(LABELS):
            write_model(root / label, llama_tensors(**dims, seed=i + 1, base=base), config)
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


def io_read(inputs: list[Path]) -> float:
    """Read every input tensor once, write nothing: what a norm pass must do at least."""
    started = time.perf_counter()
    for folder in inputs:
        for f in sorted(folder.glob("*.safetensors")):
            handle = safe_open(str(f), framework="pt")
            for name in handle.keys():  # noqa: SIM118
                handle.get_tensor(name).clone()
    return time.perf_counter() - started


def ours(base: Path, fts: list[Path], method: str, out_dir: Path, work: Path, device: str = "cpu",
         remembered: str = "none") -> float:
    """Seconds of one in-process merge. `remembered`: TIES trims from earlier merges, "all" or
    "all_but_last" (that fine-tune's file is removed first), "none"."""
    from metamerge.pipeline.extract import extract_together
    from metamerge.pipeline.inputs import resolve
    from metamerge.pipeline.solve import solve
    from metamerge.recipe import parse_recipe

    recipe = parse_recipe({
        "name": f"bench-{method}", "base": str(base), "method": {"name": method},
        "finetunes": [{"ref": str(p), "name": p.name} for p in fts],
        "merge": {"device": device, "shard_size_mb": 1000}, "workdir": str(work / "wd"),
    })
    from metamerge.engine.merge import merge_checkpoints
    from metamerge.methods.registry import plan_for

    plan = plan_for(recipe.method)
    shutil.rmtree(out_dir, ignore_errors=True)  # each repeat merges afresh (metamerge never overwrites)
    rb = resolve(str(base), work / "wd")
    rfs = [resolve(str(p), work / "wd") for p in fts]
    thresholds = None
    if remembered != "none":
        from metamerge.engine.thresholds import ThresholdCache

        keys = [f"bench-{p.name}" for p in fts]
        if remembered == "all_but_last":
            (work / "wd" / "trims" / f"{keys[-1]}.json").unlink(missing_ok=True)
        thresholds = ThresholdCache(work / "wd" / "trims", keys)
    started = time.perf_counter()
    stats = extract_together(rb, rfs, [f.path.name for f in rfs], plan, "base", work / "wd") if plan.needs_norms else []
    coefficients = solve([p.name for p in fts], stats, plan, method)
    merge_checkpoints(base, [(p.name, p) for p in fts], coefficients, plan, out_dir, device=device, shard_size_mb=1000,
                      thresholds=thresholds)
    if device == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - started
    shutil.rmtree(work / "wd" / "stats", ignore_errors=True)  # time extraction every repeat
    return elapsed


def run_process(cmd: list[str], env: dict | None = None) -> tuple[float, float]:
    """Wall seconds and peak RSS (MB, VmHWM polled from /proc) of a whole process."""
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    peak_kb = 0
    while proc.poll() is None:
        try:
            for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM"):
                    peak_kb = max(peak_kb, int(line.split()[1]))
        except (OSError, ValueError):
            pass
        time.sleep(0.02)
    elapsed = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[0]} failed: {proc.stderr.read().decode()[-2000:]}")
    return elapsed, peak_kb / 1024


MERGEKIT_METHODS = {"task_arithmetic": ({"weight": 0.3}, {}), "ties": ({"weight": 1.0, "density": 0.2}, {"normalize": True})}


def mergekit_python(work: Path) -> Path:
    """mergekit in its own virtualenv (never a dependency of the project), same torch pin."""
    venv = work / "mergekit-venv"
    if not (venv / "bin" / "mergekit-yaml").exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        constraints = ROOT.parent / "constraints.txt"
        subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "-c", str(constraints), "mergekit"], check=True)
    return venv / "bin" / "mergekit-yaml"


def mergekit_process(exe: Path, base: Path, fts: list[Path], method: str, out_dir: Path, work: Path) -> tuple[float, float]:
    import yaml

    params, global_params = MERGEKIT_METHODS[method]
    config = {"merge_method": method, "base_model": str(base), "dtype": "float32",
              "models": [{"model": str(p), "parameters": params} for p in fts]}
    if global_params:
        config["parameters"] = global_params
    path = work / f"mergekit-{method}.yml"
    path.write_text(yaml.safe_dump(config))
    shutil.rmtree(out_dir, ignore_errors=True)
    return run_process([str(exe), str(path), str(out_dir), "--lazy-unpickle"])


def ours_process(base: Path, fts: list[Path], method: str, out_dir: Path, work: Path) -> tuple[float, float]:
    import yaml

    recipe = {"name": f"bench-{method}", "base": str(base), "method": {"name": method},
              "finetunes": [{"ref": str(p), "name": p.name} for p in fts],
              "merge": {"device": "cpu", "shard_size_mb": 1000}, "workdir": str(work / "wd-process")}
    path = work / f"ours-{method}.yml"
    path.write_text(yaml.safe_dump(recipe))
    for cached in ("stats", "trims"):  # cold every repeat: against mergekit, TIES selects
        shutil.rmtree(work / "wd-process" / cached, ignore_errors=True)
    shutil.rmtree(out_dir, ignore_errors=True)
    exe = Path(sys.executable).parent / "metamerge"
    return run_process([str(exe), "merge", str(path), "--out", str(out_dir)])


def max_abs_diff(ours_dir: Path, theirs_dir: Path) -> float:
    """Same inputs, same method: our output against mergekit's, tensor by tensor."""
    from metamerge.engine.checkpoint import CheckpointReader

    ours_r, theirs_r = CheckpointReader(ours_dir), CheckpointReader(theirs_dir)
    worst = 0.0
    for name in ours_r.names:
        if name in theirs_r:
            diff = (ours_r.read(name).float() - theirs_r.read(name).float()).abs().max()
            worst = max(worst, float(diff))
    return worst


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
    parser.add_argument("--mergekit", action=argparse.BooleanOptionalAction, default=True,
                        help="also time mergekit-yaml (installed into its own venv under --work)")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    dims = SIZES[args.size]
    base, fts = build_family(args.work, dims)
    drop_page_cache_hint([base, *fts])
    out = args.work / "out"
    results: dict = {"size": args.size, "dims": dims, "threads": torch.get_num_threads(),
                     "input_bytes": sum(f.stat().st_size for d in [base, *fts] for f in d.glob("*.safetensors"))}
    # rounds interleave the floor and every method, so that each sees the machine in the same state
    # (on a VM, back-to-back repeats of one merge alternate by up to 0.3 s; the first method measured
    # after the floor's writes had been the slow one); every repeat is kept, the best one is quoted
    methods = args.methods.split(",")
    variants = {m: (m, "none") for m in methods}
    if "ties" in methods:
        variants.update(ties_remembered=("ties", "all"), ties_new_finetune=("ties", "all_but_last"))
        shutil.rmtree(args.work / "wd" / "trims", ignore_errors=True)
        ours(base, fts, "ties", out / "ties", args.work, remembered="all")  # the night before: learns every trim
        shutil.rmtree(out / "ties", ignore_errors=True)
    runs: dict[str, list[float]] = {"io_floor": [], **{name: [] for name in variants}}
    for _ in range(args.repeats):
        runs["io_floor"].append(io_floor([base, *fts], out))
        for name, (method, remembered) in variants.items():
            runs[name].append(ours(base, fts, method, out / name, args.work, remembered=remembered))
            shutil.rmtree(out / name, ignore_errors=True)
    results["io_floor_s"] = min(runs["io_floor"])
    results["ours_s"] = {name: min(runs[name]) for name in variants}
    if "ties" in methods and "task_arithmetic" in methods:
        results["ties_ratio_to_task_arithmetic"] = {
            name: round(results["ours_s"][name] / results["ours_s"]["task_arithmetic"], 3)
            for name in ("ties", "ties_remembered", "ties_new_finetune")}
    results["runs_s"] = {name: [round(t, 3) for t in times] for name, times in runs.items()}
    results["ratio_to_io_floor"] = {m: round(s / results["io_floor_s"], 3) for m, s in results["ours_s"].items()}
    # MetaGPT must read the inputs twice (norm pass, merge pass) and write once: its own floor
    results["read_once_s"] = min(io_read([base, *fts]) for _ in range(args.repeats))
    results["metagpt_floor_s"] = results["io_floor_s"] + results["read_once_s"]
    if "metagpt" in results["ours_s"]:
        results["metagpt_ratio_to_own_floor"] = round(results["ours_s"]["metagpt"] / results["metagpt_floor_s"], 3)
    results["ours_process_s"], results["ours_process_peak_rss_mb"] = {}, {}
    for method in args.methods.split(","):
        runs = [ours_process(base, fts, method, out / f"p-{method}", args.work) for _ in range(args.repeats)]
        results["ours_process_s"][method] = min(r[0] for r in runs)
        results["ours_process_peak_rss_mb"][method] = max(r[1] for r in runs)
        shutil.rmtree(out / f"p-{method}", ignore_errors=True)
    if args.mergekit:
        exe = mergekit_python(args.work)
        results["mergekit_s"], results["mergekit_peak_rss_mb"], results["speedup_vs_mergekit"] = {}, {}, {}
        for method in MERGEKIT_METHODS:
            runs = [mergekit_process(exe, base, fts, method, out / f"mk-{method}", args.work) for _ in range(args.repeats)]
            results["mergekit_s"][method] = min(r[0] for r in runs)
            results["mergekit_peak_rss_mb"][method] = max(r[1] for r in runs)
            if method in results["ours_process_s"]:
                results["speedup_vs_mergekit"][method] = round(results["mergekit_s"][method] / results["ours_process_s"][method], 2)
                ours_process(base, fts, method, out / f"p-{method}", args.work)
                results.setdefault("max_abs_diff_vs_mergekit", {})[method] = max_abs_diff(out / f"p-{method}", out / f"mk-{method}")
                shutil.rmtree(out / f"p-{method}", ignore_errors=True)
            shutil.rmtree(out / f"mk-{method}", ignore_errors=True)
    deep = dict(dims, layers=dims["layers"] * 4)
    base_deep, fts_deep = build_family(args.work, deep)
    results["peak_rss_mb"] = {
        f"ours_{dims['layers']}_layers": peak_rss_mb_of_merge(base, fts, out / "rss", args.work),
        f"ours_{deep['layers']}_layers": peak_rss_mb_of_merge(base_deep, fts_deep, out / "rss", args.work),
        **{f"mergekit_{m}": v for m, v in results.get("mergekit_peak_rss_mb", {}).items()},
    }
    (ROOT / "results").mkdir(exist_ok=True)
    (ROOT / "results" / "merge_throughput.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
