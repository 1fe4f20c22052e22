"""sha256 of every merged file, for every method, on the benchmark family.

    python benchmarks/merge_digests.py [--size small] [--out benchmarks/results/merge_digests.json]
    python benchmarks/merge_digests.py --check benchmarks/results/merge_digests.json

A refactor must not change a single merged byte. This drives the `metamerge merge` command
(a stable interface, whatever the modules behind it are called) on the synthetic Llama-shaped
family of merge_throughput.py, once per method and variant, and records the sha256 of each
file of each output. `--check` compares a fresh run with a committed record and exits 1 on
the first difference, naming the method and the file.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import yaml
from merge_throughput import SIZES, build_family

ROOT = Path(__file__).resolve().parent
METHODS: dict[str, dict] = {
    "average": {"name": "average"},
    "task_arithmetic": {"name": "task_arithmetic"},
    "metagpt": {"name": "metagpt"},
    "metagpt:layer": {"name": "metagpt", "granularity": "layer"},
    "metagpt:tensor": {"name": "metagpt", "granularity": "tensor"},
    "ties": {"name": "ties"},
    "dare": {"name": "dare", "seed": 7},
    "dare:ties": {"name": "dare", "combine": "ties", "seed": 7},
    "metagpt+ties": {"name": "metagpt+ties"},
    "metagpt+dare": {"name": "metagpt+dare", "seed": 7},
    "metagpt+ties:disjoint=sum": {"name": "metagpt+ties", "disjoint": "sum"},
    "metagpt+dare:combine=linear": {"name": "metagpt+dare", "combine": "linear", "seed": 7},
    "breadcrumbs": {"name": "breadcrumbs"},
    "della": {"name": "della", "seed": 7},
    "iso_c": {"name": "iso_c"},
}
DTYPES = ("auto", "bfloat16")


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(8 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def merged_digests(work: Path, base: Path, finetunes: list[Path], method: dict, dtype: str) -> dict[str, str]:
    recipe = {"name": "digests", "base": str(base), "method": method,
              "finetunes": [{"ref": str(p), "name": p.name} for p in finetunes],
              "merge": {"dtype": dtype, "shard_size_mb": 8}, "workdir": str(work / "wd")}
    recipe_path = work / "recipe.yaml"
    recipe_path.write_text(yaml.safe_dump(recipe))
    out = work / "out"
    shutil.rmtree(out, ignore_errors=True)
    cli = Path(sys.executable).with_name("metamerge")
    subprocess.run([str(cli), "merge", str(recipe_path), "--out", str(out)], check=True,
                   stdout=subprocess.DEVNULL)
    return {p.name: sha256(p) for p in sorted(out.iterdir()) if p.is_file() and not p.name.startswith(".metamerge")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="small", choices=sorted(SIZES))
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "merge_digests.json")
    parser.add_argument("--check", type=Path, help="compare with this record instead of writing one")
    args = parser.parse_args()
    work = ROOT / "work" / f"digests-{args.size}"
    base, finetunes = build_family(work, SIZES[args.size])
    record = {"size": args.size, "digests": {}}
    for label, method in METHODS.items():
        for dtype in DTYPES:
            key = f"{label} dtype={dtype}"
            record["digests"][key] = merged_digests(work, base, finetunes, method, dtype)
            print(key, "ok", flush=True)
    if args.check:
        expected = json.loads(args.check.read_text())["digests"]
        for key, files in expected.items():
            for name, digest in files.items():
                got = record["digests"].get(key, {}).get(name)
                if got != digest:
                    print(f"DIFFERENT: {key} {name}: {got} != {digest}")
                    raise SystemExit(1)
        print(f"identical: {sum(len(f) for f in expected.values())} files over {len(expected)} merges")
        return
    args.out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
