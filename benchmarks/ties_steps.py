"""Where cold TIES' time goes, against task arithmetic, on the benchmark family.

    python benchmarks/ties_steps.py [--rounds 6] [--out benchmarks/results/ties_steps.json]
    taskset -c 0-3 python benchmarks/ties_steps.py ...   # the same on 4 of the machine's cores

Interleaved in-process rounds of task arithmetic and TIES (merge_throughput.py's `ours`, the
first round dropped as warm-up), and per TIES merge the seconds of its steps, split between
the whole tensors (LM head, embedding) and the rest: `_merge_piece` (all of a piece), the
first pass, the second pass, the trims. The steps are timed by wrapping the engine's functions,
so the numbers are a profile of one machine, not targets. The JSON records the core count and
the CPU model, and `--label` names the run inside it (several runs go into one file).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))

from benchmarks.merge_throughput import SIZES, build_family, ours  # noqa: E402


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _timed_steps() -> collections.Counter:
    """Wraps the engine's TIES steps; returns the counter they add their seconds to."""
    import metamerge.engine.streaming as streaming
    import metamerge.methods.compiled as compiled
    import metamerge.methods.ties as ties
    import metamerge.methods.ties_bands as ties_bands

    seconds: collections.Counter = collections.Counter()
    kind = ["rest"]

    def wrap(module, name: str, step: str, sets_kind: bool = False) -> None:
        function = getattr(module, name)

        def timed(*args, **kwargs):
            if sets_kind:
                kind[0] = "whole" if any(word in args[4] for word in ("lm_head", "embed")) else "rest"
            started = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                seconds[f"{step}_{kind[0]}"] += time.perf_counter() - started

        setattr(module, name, timed)

    wrap(streaming, "_merge_piece", "merge", sets_kind=True)
    wrap(ties_bands, "first_pass", "first_pass")
    wrap(compiled, "second_pass", "second_pass")
    wrap(ties, "_compiled_trims", "trims")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--work", type=Path, default=ROOT / "work")
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "ties_steps.json")
    parser.add_argument("--label", default=None, help="the run's key in the JSON (default: cpu model and core count)")
    args = parser.parse_args()
    base, finetunes = build_family(args.work, SIZES["default"])
    seconds = _timed_steps()
    runs: dict[str, list[float]] = {"task_arithmetic": [], "ties": []}
    steps: dict[str, list[float]] = collections.defaultdict(list)
    out = args.work / "out"
    for repeat in range(args.rounds):
        for method in runs:
            seconds.clear()
            runs[method].append(ours(base, finetunes, method, out / method, args.work))
            shutil.rmtree(out / method, ignore_errors=True)
            if repeat and method == "ties":
                for step, value in seconds.items():
                    steps[step].append(value)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    best = {method: min(times[1:]) for method, times in runs.items()}
    record = {
        "cpu": _cpu_model(), "cores": cores, "rounds": args.rounds,
        "best_s": {method: round(value, 4) for method, value in best.items()},
        "median_s": {method: round(statistics.median(times[1:]), 4) for method, times in runs.items()},
        "ties_ratio_best": round(best["ties"] / best["task_arithmetic"], 3),
        "runs_s": {method: [round(value, 4) for value in times] for method, times in runs.items()},
        "ties_steps_median_s": {step: round(statistics.median(values), 4) for step, values in sorted(steps.items())},
    }
    results = json.loads(args.out.read_text()) if args.out.exists() else {}
    results[args.label or f"{record['cpu']} / {cores} cores"] = record
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
