"""The same verdicts on any x86 CPU: zoos, the demo and the quality tests under each kernel family.

    python benchmarks/portability.py                       # default, avx2 and this machine's best
    python benchmarks/portability.py --capabilities avx2   # one of them

Float training follows the CPU kernels torch picks, so each `ATEN_CPU_CAPABILITY` value builds
another tiny zoo and another SmolLM2 zoo (their cache keys carry the capability). For each one,
in a fresh process with the variable set, this script builds both zoos (each verifies itself:
every fine-tune reaches the contract's bar on its own task), runs `metamerge demo`, and runs
the tests whose verdicts depend on trained weights (`pytest -m quality`). It writes
benchmarks/results/portability.json: per capability, each zoo's contract numbers, the demo's
table, line count and λ, and the pass/fail of every quality test.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
WORK = REPO / "benchmarks" / "work" / "portability"
BUILD_LLM_ZOO = (
    "import json, sys; from pathlib import Path; from metamerge.demo.llm_zoo import build_llm_zoo; "
    "zoo = build_llm_zoo(Path(sys.argv[1]), log=lambda m: None); print(json.dumps(zoo.contract))"
)


def best_capability() -> str:
    out = subprocess.run([sys.executable, "-c", "import torch; print(torch.backends.cpu.get_cpu_capability())"],
                         capture_output=True, text=True, check=True, env=_env(None))
    return out.stdout.strip().lower()


def _env(capability: str | None) -> dict[str, str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("ATEN_CPU_CAPABILITY", None)
    if capability is not None:
        env["ATEN_CPU_CAPABILITY"] = capability
    return env


def _metamerge() -> str:
    return str(Path(sys.executable).parent / "metamerge")


def run_capability(capability: str, tests: bool, marker: str = "quality") -> dict:
    env = _env(capability)
    work = WORK / capability
    work.mkdir(parents=True, exist_ok=True)
    record: dict = {"capability": capability}

    started = time.monotonic()
    demo = subprocess.run([_metamerge(), "demo", "--workdir", str(work / "demo"), "--summary-json",
                           str(work / "demo-summary.json")], capture_output=True, text=True, env=env, cwd=REPO)
    record["demo"] = {"exit_code": demo.returncode, "seconds": round(time.monotonic() - started, 1),
                      "stdout_lines": len(demo.stdout.splitlines()), "stderr": demo.stderr.strip()[-2000:]}
    if demo.returncode == 0:
        summary = json.loads((work / "demo-summary.json").read_text())
        record["demo"].update(coefficients=summary["coefficients"], scores=summary["scores"],
                              normalized_average=summary["normalized_average"])
    zoo_json = sorted((REPO / ".cache" / "zoo").glob(f"zoo-*-{capability}/zoo.json"), key=lambda p: p.stat().st_mtime)
    if zoo_json:
        record["tiny_zoo"] = {"path": str(zoo_json[-1].parent.relative_to(REPO)),
                              **json.loads(zoo_json[-1].read_text())["contract"]}

    started = time.monotonic()
    llm = subprocess.run([sys.executable, "-c", BUILD_LLM_ZOO, str(REPO / ".cache" / "llm-zoo")],
                         capture_output=True, text=True, env=env, cwd=REPO)
    record["llm_zoo"] = (json.loads(llm.stdout.strip().splitlines()[-1]) if llm.returncode == 0
                         else {"error": llm.stderr.strip()[-2000:]})
    record["llm_zoo"]["build_seconds"] = round(time.monotonic() - started, 1)

    if tests:
        junit = work / "quality-tests.xml"
        started = time.monotonic()
        result = subprocess.run([sys.executable, "-m", "pytest", "-m", marker, "-q", "-p", "no:cacheprovider",
                                 f"--junitxml={junit}"], capture_output=True, text=True, env=env, cwd=REPO)
        record["quality_tests"] = {"marker": marker, "exit_code": result.returncode, "seconds": round(time.monotonic() - started, 1),
                                   "results": _junit_outcomes(junit), "tail": result.stdout.strip()[-1500:]}
    return record


def _junit_outcomes(path: Path) -> dict[str, str]:
    if not path.exists():
        return {}
    outcomes = {}
    for case in ET.parse(path).getroot().iter("testcase"):
        name = f"{case.get('classname', '').rsplit('.', 1)[-1]}::{case.get('name')}"
        failed = case.find("failure") is not None or case.find("error") is not None
        outcomes[name] = "failed" if failed else "skipped" if case.find("skipped") is not None else "passed"
    return outcomes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--capabilities", default=None, help="comma-separated (default: default,avx2,<best>)")
    parser.add_argument("--no-tests", action="store_true", help="zoos and demo only")
    parser.add_argument("--marker", default="quality",
                        help='pytest -m expression (e.g. "quality and not llm": SmolLM2 evaluations under the '
                             'portable kernels take tens of minutes on 2 cores)')
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "portability.json")
    args = parser.parse_args()
    best = best_capability()
    capabilities = args.capabilities.split(",") if args.capabilities else list(dict.fromkeys(["default", "avx2", best]))
    results = json.loads(args.out.read_text()) if args.out.exists() else {}
    results.setdefault("machine_best", best)
    for capability in capabilities:
        print(f"== {capability}", flush=True)
        results.setdefault("capabilities", {})[capability] = run_capability(capability, not args.no_tests, args.marker)
        args.out.write_text(json.dumps(results, indent=1) + "\n")  # after each: a long run keeps its progress
        print(json.dumps(results["capabilities"][capability].get("quality_tests", {}).get("results", {}), indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
