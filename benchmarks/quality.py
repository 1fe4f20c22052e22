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


def main() -> None:
    from metamerge.demo.contract import cpu_capability
    from metamerge.evaluation.compare import DEFAULT_METHODS
    from metamerge_prefect.cli import demo_recipe, llm_comparison, prepare_environment, run_comparison

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--zoo", choices=("tiny", "llm"), default="tiny")
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS))
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    parser.add_argument("--work", type=Path, default=REPO / "benchmarks" / "work" / "quality")
    args = parser.parse_args()

    prepare_environment(REPO)
    started = time.monotonic()
    methods = [m for m in args.methods.split(",") if m]
    work = (args.work / args.zoo).resolve()
    if args.zoo == "llm":
        comparison, paths = llm_comparison(REPO / ".cache" / "llm-zoo", work, methods, args.out, "quality_llm")
    else:
        from metamerge.demo.zoo import build_zoo

        recipe = demo_recipe(build_zoo(REPO / ".cache" / "zoo"), None, work, name="zoo")
        comparison = run_comparison(recipe, methods)
        paths = comparison.write(args.out, "quality", title=f"tiny zoo ({cpu_capability()} kernels): merge methods compared")
    print(comparison.to_markdown())
    print(f"best by avg_norm: {comparison.best_method()}; {time.monotonic() - started:.0f}s; wrote "
          + ", ".join(str(p.relative_to(REPO)) for p in paths.values()))


if __name__ == "__main__":
    main()
