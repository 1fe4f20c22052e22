"""Merge wall time split by output shard on a Dask LocalCluster (1 worker against 2), and the
bytes each worker moves when the inputs are in S3: read by range against downloaded whole.

    python benchmarks/scaleout.py [--size small|default|large] [--shard-mb 100] [--repeats 2] [--bytes-only]

Same checkpoints as benchmarks/merge_throughput.py (a base + 3 fine-tunes, its builder). For
each method it times, best of N, warm page cache:
  * local_s: the single-process engine (`merge_checkpoints`), the baseline;
  * dask_s[w]: one `merge_shard` task per output shard on a LocalCluster of w worker
    processes (1 thread each), then `finalize_merge` (index, aux files, verification);
and checks that every run's files are byte-equal to the local run's. Prefect is left out on
purpose: it adds about 2 s per task (measured in tests/test_dask_scaleout.py), which is noise
for 70B shards but would hide the engine's scaling on these small ones.
Bytes per worker (`bytes_per_worker`): the same checkpoints uploaded to a local S3 server (moto,
127.0.0.1), one shard task per output shard on w workers, each worker with its own cache folder:
  * ranged: every task reads its tensors' byte ranges (metamerge/io/ranged.py), nothing stored;
  * download: what every worker did before ranged reads (and does with `runner.inputs: download`):
    it downloads each input whole, once, into its cache, then merges from disk.
Bytes are counted on the worker (bytes fetched by range; bytes of the downloaded files), with the
peak RSS of each worker process, and the outputs are checked byte-equal to the local engine's.
Results go to benchmarks/results/scaleout.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from dataclasses import fields
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))

from benchmarks.merge_throughput import LABELS, SIZES, build_family, drop_page_cache_hint  # noqa: E402

METHODS = {
    "task_arithmetic": {"weighting": "constant", "weight": 0.3},
    "ties": {"sparsify": "magnitude", "density": 0.2, "consensus": "ties", "weighting": "constant", "normalize": True},
}


def _one_thread() -> None:
    import torch

    torch.set_num_threads(1)


def _shard_task(base: str, fts: list, method: str, out: str, index: int, shard_mb: float) -> dict:
    """Runs on a worker: the core engine only."""
    from dataclasses import asdict

    from metamerge.engine.coefficients import solve_constant
    from metamerge.engine.shards import merge_shard_file
    from metamerge.methods.plan import MergePlan

    plan = MergePlan(**METHODS[method])
    coefficients = solve_constant(LABELS, plan.weight, method)
    report = merge_shard_file(Path(base), [(label, Path(p)) for label, p in fts], coefficients, plan, Path(out), index,
                         device="cpu", shard_size_mb=shard_mb)
    return {**asdict(report), "pid": os.getpid()}


def _s3_shard_task(refs: dict, endpoint: str, method: str, out: str, index: int, shard_mb: float, mode: str,
                   cache: str) -> dict:
    """Runs on a worker: inputs from S3, by range or downloaded into this worker's own cache folder."""
    from dataclasses import asdict

    from metamerge.engine.coefficients import solve_constant
    from metamerge.engine.shards import merge_shard_file
    from metamerge.io.ranged import FETCHED
    from metamerge.methods.plan import MergePlan
    from metamerge.refs.s3 import list_s3_model, resolve_s3

    plan = MergePlan(**METHODS[method])
    # the peak RSS of this task alone: a worker forked from this benchmark starts with its high-water mark
    Path("/proc/self/clear_refs").write_text("5")
    started, fetched = time.perf_counter(), FETCHED.bytes
    folder = Path(cache) / f"worker-{os.getpid()}"
    downloaded = 0
    if mode == "ranged":
        sources = {name: list_s3_model(ref, endpoint)[0] for name, ref in refs.items()}
    else:
        sources = {}
        for name, ref in refs.items():
            had = (folder / "remote").exists() and any((folder / "remote").iterdir())
            before = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) if had else 0
            sources[name] = resolve_s3(ref, folder, endpoint).path
            downloaded += sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) - before
    report = merge_shard_file(sources["base"], [(label, sources[label]) for label in LABELS],
                              solve_constant(LABELS, plan.weight, method), plan, Path(out), index, device="cpu",
                              shard_size_mb=shard_mb)
    return {**asdict(report), "pid": os.getpid(), "moved": FETCHED.bytes - fetched + downloaded,
            "task_s": time.perf_counter() - started,
            "peak_rss_mb": _peak_rss_kb() / 1024}


def _peak_rss_kb() -> int:
    """VmHWM: the resident high-water mark since the last reset (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def bytes_per_worker(base: Path, fts: list[Path], work: Path, shard_mb: float, worker_counts: list[int]) -> dict:
    """Bytes each worker fetched from S3 for a task-arithmetic merge, ranged against download."""
    from distributed import Client, LocalCluster

    from metamerge.demo.s3server import local_s3_server
    from metamerge.engine.shards import ShardReport, assemble_shard_files, output_shard_files
    from metamerge.io.s3 import s3_client

    method = "task_arithmetic"
    local_run(base, fts, method, work / "local", shard_mb)
    results: dict = {"method": method, "model_bytes": sum(f.stat().st_size for f in base.glob("*.safetensors")),
                     "inputs": 1 + len(fts), "runs": {}}
    with local_s3_server(("bench",)) as endpoint:
        client = s3_client(endpoint)
        refs = {}
        for name, folder in [("base", base), *zip(LABELS, fts, strict=True)]:
            for file in sorted(folder.iterdir()):
                if file.is_file() and file.name != "done":
                    client.upload_file(str(file), "bench", f"{name}/{file.name}")
            refs[name] = f"s3://bench/{name}"
        count = len(output_shard_files(base, "auto", shard_mb))
        names = {f.name for f in fields(ShardReport)}
        for workers in worker_counts:
            with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, memory_limit="6GiB",
                              dashboard_address=None) as cluster, Client(cluster) as dask_client:
                dask_client.run(_one_thread)
                for mode in ("ranged", "download"):
                    staged, out, cache = work / "staged", work / f"s3-{mode}-{workers}", work / f"cache-{mode}-{workers}"
                    for folder in (staged, out, cache):
                        shutil.rmtree(folder, ignore_errors=True)
                    staged.mkdir(parents=True)
                    started = time.perf_counter()
                    futures = [dask_client.submit(_s3_shard_task, refs, endpoint, method, str(staged), i, shard_mb, mode,
                                                  str(cache), pure=False) for i in range(count)]
                    done = dask_client.gather(futures)
                    seconds = time.perf_counter() - started
                    reports = [ShardReport(**{k: v for k, v in r.items() if k in names}) for r in done]
                    assemble_shard_files(base, reports, LABELS, out, shard_size_mb=shard_mb)
                    moved: dict[int, int] = {}
                    rss: dict[int, float] = {}
                    for r in done:
                        moved[r["pid"]] = moved.get(r["pid"], 0) + r["moved"]
                        rss[r["pid"]] = max(rss.get(r["pid"], 0.0), r["peak_rss_mb"])
                    results["runs"].setdefault(mode, {})[str(workers)] = {
                        "bytes_per_worker": sorted(moved.values(), reverse=True), "seconds": round(seconds, 2),
                        "peak_rss_mb_per_worker": [round(v) for v in sorted(rss.values(), reverse=True)],
                        "byte_equal_to_local": files_of(out) == files_of(work / "local")}
                    for folder in (staged, out, cache):
                        shutil.rmtree(folder, ignore_errors=True)
    inputs_bytes = results["inputs"] * results["model_bytes"]
    results["bytes_per_worker_over_inputs"] = {
        mode: {w: round(max(run["bytes_per_worker"]) / inputs_bytes, 3) for w, run in by_workers.items()}
        for mode, by_workers in results["runs"].items()}
    shutil.rmtree(work / "local", ignore_errors=True)
    return results


def local_run(base: Path, fts: list[Path], method: str, out: Path, shard_mb: float) -> float:
    from metamerge.engine.coefficients import solve_constant
    from metamerge.engine.merge import merge_checkpoints
    from metamerge.methods.plan import MergePlan

    shutil.rmtree(out, ignore_errors=True)
    plan = MergePlan(**METHODS[method])
    started = time.perf_counter()
    merge_checkpoints(base, list(zip(LABELS, fts, strict=True)), solve_constant(LABELS, plan.weight, method), plan, out,
                      device="cpu", shard_size_mb=shard_mb)
    return time.perf_counter() - started


def dask_run(client, base: Path, fts: list[Path], method: str, out: Path, staged: Path, shard_mb: float) -> tuple[float, int]:
    from metamerge.engine.shards import ShardReport, assemble_shard_files, output_shard_files

    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(staged, ignore_errors=True)
    staged.mkdir(parents=True)
    started = time.perf_counter()
    count = len(output_shard_files(base, "auto", shard_mb))
    pairs = [(label, str(p)) for label, p in zip(LABELS, fts, strict=True)]
    futures = [client.submit(_shard_task, str(base), pairs, method, str(staged), i, shard_mb, pure=False)
               for i in range(count)]
    results = client.gather(futures)
    names = {f.name for f in fields(ShardReport)}
    reports = [ShardReport(**{k: v for k, v in r.items() if k in names}) for r in results]
    assemble_shard_files(base, reports, LABELS, out, shard_size_mb=shard_mb)
    elapsed = time.perf_counter() - started
    return elapsed, len({r["pid"] for r in results})


def files_of(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="default")
    parser.add_argument("--shard-mb", type=float, default=100)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--workers", default="1,2")
    parser.add_argument("--work", type=Path, default=ROOT / "work")
    parser.add_argument("--bytes-workers", default="1,2,4")
    parser.add_argument("--bytes-only", action="store_true", help="only the bytes-per-worker runs (keep the timings)")
    args = parser.parse_args()

    import torch
    from distributed import Client, LocalCluster

    from metamerge.engine.shards import output_shard_files

    dims = SIZES[args.size]
    base, fts = build_family(args.work, dims)
    drop_page_cache_hint([base, *fts])
    out = args.work / "scaleout"
    torch.set_num_threads(1)
    moved = bytes_per_worker(base, fts, out, args.shard_mb, [int(w) for w in args.bytes_workers.split(",")])
    target = ROOT / "results" / "scaleout.json"
    if args.bytes_only:
        results = json.loads(target.read_text()) if target.exists() else {}
        results["bytes_per_worker"] = moved
        target.write_text(json.dumps(results, indent=2))
        print(json.dumps(moved, indent=2))
        return
    results: dict = {
        "size": args.size, "dims": dims, "shard_mb": args.shard_mb,
        "shards": len(output_shard_files(base, "auto", args.shard_mb)),
        "input_bytes": sum(f.stat().st_size for d in [base, *fts] for f in d.glob("*.safetensors")),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "torch": torch.__version__},
        "note": "2-core machine shared with other work; timings are noisy. Each Dask worker is one process with "
                "1 torch thread; local_s is the single-process engine with 1 torch thread (local_2threads_s: 2).",
        "local_s": {}, "local_2threads_s": {}, "dask_s": {}, "speedup_2_vs_1_workers": {}, "byte_equal_to_local": {},
    }
    for method in METHODS:
        torch.set_num_threads(1)
        results["local_s"][method] = min(local_run(base, fts, method, out / "local", args.shard_mb) for _ in range(args.repeats))
        torch.set_num_threads(2)
        results["local_2threads_s"][method] = min(
            local_run(base, fts, method, out / "local2", args.shard_mb) for _ in range(args.repeats))
        shutil.rmtree(out / "local2", ignore_errors=True)
    torch.set_num_threads(1)
    for workers in [int(w) for w in args.workers.split(",")]:
        with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, memory_limit="6GiB",
                          dashboard_address=None) as cluster, Client(cluster) as client:
            client.run(_one_thread)
            for method in METHODS:
                runs = []
                for _ in range(args.repeats):
                    seconds, used = dask_run(client, base, fts, method, out / f"dask-{workers}", out / "staged", args.shard_mb)
                    runs.append(seconds)
                results["dask_s"].setdefault(method, {})[str(workers)] = min(runs)
                results.setdefault("workers_used", {}).setdefault(method, {})[str(workers)] = used
                local_run(base, fts, method, out / "local", args.shard_mb)
                results["byte_equal_to_local"].setdefault(method, {})[str(workers)] = (
                    files_of(out / f"dask-{workers}") == files_of(out / "local"))
    for method, by_workers in results["dask_s"].items():
        if "1" in by_workers and "2" in by_workers:
            results["speedup_2_vs_1_workers"][method] = round(by_workers["1"] / by_workers["2"], 2)
    results["bytes_per_worker"] = moved
    shutil.rmtree(out, ignore_errors=True)
    (ROOT / "results").mkdir(exist_ok=True)
    (ROOT / "results" / "scaleout.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
