"""The CUDA merge path against the CPU path and the host-to-device copy bound, in one run.

    python benchmarks/gpu_merge.py [--sizes default,large] [--repeats 2]

Needs a CUDA device (run it through the device tool when one is lent). For each size it builds
the synthetic Llama family of benchmarks/merge_throughput.py (base + 3 fine-tunes, fp32), then
measures, best of N, in one process:
  * io_floor_s: read every input once + write one output (as merge_throughput.py);
  * h2d_pageable_s / h2d_pinned_s: copy every input byte from host memory to the GPU, the
    least a GPU merge of these inputs must move over PCIe;
  * ours_s[device][method]: the streaming engine with merge.device cpu and cuda (extraction
    of MetaGPT's norms included), and its input GB/s.
Results go to benchmarks/results/gpu_merge.json, with the GPU's name.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))

from benchmarks.merge_throughput import SIZES, build_family, drop_page_cache_hint, io_floor, ours  # noqa: E402


def h2d_seconds(total_bytes: int, pinned: bool, chunk: int = 256 << 20) -> float:
    """Host→device copy of `total_bytes` in chunks, as a streaming merge moves its inputs."""
    host = torch.empty(chunk, dtype=torch.uint8, pin_memory=pinned)
    dev = torch.empty(chunk, dtype=torch.uint8, device="cuda")
    torch.cuda.synchronize()
    started = time.perf_counter()
    moved = 0
    while moved < total_bytes:
        n = min(chunk, total_bytes - moved)
        dev[:n].copy_(host[:n], non_blocking=pinned)
        moved += n
    torch.cuda.synchronize()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="default,large")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--methods", default="task_arithmetic,metagpt,ties")
    parser.add_argument("--devices", default="cpu,cuda")
    parser.add_argument("--work", type=Path, default=ROOT / "work")
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "gpu_merge.json")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run this where a GPU is present")
    results: dict = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "sizes": {}}
    for size in args.sizes.split(","):
        base, fts = build_family(args.work, SIZES[size])
        drop_page_cache_hint([base, *fts])
        input_bytes = sum(f.stat().st_size for d in [base, *fts] for f in d.glob("*.safetensors"))
        out = args.work / "out"
        row: dict = {"dims": SIZES[size], "input_bytes": input_bytes}
        row["io_floor_s"] = min(io_floor([base, *fts], out / "floor") for _ in range(args.repeats))
        row["h2d_pageable_s"] = min(h2d_seconds(input_bytes, False) for _ in range(args.repeats))
        row["h2d_pinned_s"] = min(h2d_seconds(input_bytes, True) for _ in range(args.repeats))
        devices = args.devices.split(",")
        row["ours_s"] = {device: {} for device in devices}
        for device in devices:
            for method in args.methods.split(","):
                row["ours_s"][device][method] = round(min(
                    ours(base, fts, method, out / f"{device}-{method}", args.work, device=device)
                    for _ in range(args.repeats)), 3)
                shutil.rmtree(out / f"{device}-{method}", ignore_errors=True)
        gb = input_bytes / 1e9
        row["input_gb_per_s"] = {
            "io_floor": round(gb / row["io_floor_s"], 2),
            "h2d_pageable": round(gb / row["h2d_pageable_s"], 2),
            "h2d_pinned": round(gb / row["h2d_pinned_s"], 2),
            **{f"ours_{d}_{m}": round(gb / s, 2) for d, ms in row["ours_s"].items() for m, s in ms.items()},
        }
        results["sizes"][size] = row
        print(json.dumps({size: row}, indent=1), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
