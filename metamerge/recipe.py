"""The merge recipe: one YAML file that says what to merge, how, how to judge it, where to put it.

Every key is validated up front so a nightly run fails in the first second with a message
naming the offending key, instead of an hour later inside the merge.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from metamerge.errors import RecipeError
from metamerge.methods.registry import METHODS, PARAMETERS, MethodSpec, default_of

# the method names and parameter bounds come from the registry (one entry per method)
MethodName = Literal[tuple(METHODS)]  # type: ignore[valid-type]
Granularity = Literal[PARAMETERS["granularity"].choices]  # type: ignore[valid-type]
CombineMode = Literal[PARAMETERS["combine"].choices]  # type: ignore[valid-type]
DisjointMode = Literal[PARAMETERS["disjoint"].choices]  # type: ignore[valid-type]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class FineTune(_Strict):
    ref: str = Field(min_length=1)
    name: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_.-]+$")
    tasks: tuple[str, ...] = Field(default=(), description="lm-eval tasks this fine-tune is for")

    @property
    def label(self) -> str:
        return self.name or Path(self.ref.rstrip("/").split("@")[0]).name


class Method(_Strict):
    name: MethodName
    scale: float | None = Field(default=None, alias="lambda", **PARAMETERS["scale"].bounds)
    granularity: Granularity | None = None
    density: float | None = Field(default=None, **PARAMETERS["density"].bounds)
    combine: CombineMode | None = None
    seed: int | None = None
    gamma: float | None = Field(default=None, **PARAMETERS["gamma"].bounds)
    epsilon: float | None = Field(default=None, **PARAMETERS["epsilon"].bounds)
    disjoint: DisjointMode | None = None

    @model_validator(mode="after")
    def _check_parameters(self) -> Method:
        spec = METHODS[self.name]
        given = {k for k in PARAMETERS if getattr(self, k) is not None}
        for key in sorted(given - set(spec.defaults)):
            raise ValueError(f"'{PARAMETERS[key].spelled}' does not apply to method '{self.name}'")
        if spec.random and self.seed is None:
            raise ValueError(f"method '{self.name}' drops weights at random: set 'seed' so runs are reproducible")
        if spec.check is not None and (problem := spec.check(self)) is not None:
            raise ValueError(problem)
        return self

    def param(self, key: str) -> Any:
        value = getattr(self, key)
        return value if value is not None else default_of(self, key)

    @property
    def spec(self) -> MethodSpec:
        return METHODS[self.name]


class MergeOptions(_Strict):
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    shard_size_mb: int = Field(default=2000, ge=1)
    vocab: Literal["base"] = "base"
    # ‖τ_t‖/‖θ₀‖ above this fails the run: weights that do not descend from the base give ≥ 1
    max_relative_norm: float | None = Field(default=0.8, gt=0, description="null disables the check")


class Evaluation(_Strict):
    tasks_dir: str | None = None
    limit: int | None = Field(default=None, ge=1)
    batch_size: int = Field(default=16, ge=1)
    device: Literal["cpu", "cuda", "auto"] = "cpu"


class Publish(_Strict):
    target: str = Field(min_length=1, description="s3://bucket/prefix or a local folder")
    endpoint_url: str | None = None


class Gate(_Strict):
    """Refuse to publish a merge that is not good enough (docs/design.md §6)."""

    min_avg_norm: float | None = Field(default=None, ge=0, description="minimum normalized average")
    no_regression: bool = Field(default=False, description="not below the last published merge of this name")
    tolerance: float = Field(default=0.0, ge=0, le=1, description="allowed drop below the last published merge")

    @model_validator(mode="after")
    def _something_to_check(self) -> Gate:
        if self.min_avg_norm is None and not self.no_regression:
            raise ValueError("set 'min_avg_norm' and/or 'no_regression: true'")
        return self


class DaskCluster(_Strict):
    """A LocalCluster started for the run (one machine; for many, give a scheduler `address`)."""

    n_workers: int = Field(default=2, ge=1)
    threads_per_worker: int = Field(default=1, ge=1)
    memory_limit: str | int | None = Field(default="auto", description="per worker: bytes, '16GiB' or 'auto'")
    processes: bool = True
    resources: dict[str, float] | None = Field(default=None, description="per worker, e.g. {GPU: 1} on a GPU machine")


class Runner(_Strict):
    """Where tasks run: in the flow's process (local) or on a Dask cluster (docs/design.md §9)."""

    kind: Literal["local", "dask"] = "local"
    address: str | None = Field(default=None, pattern=r"^[a-z]+://.+", description="scheduler, e.g. tcp://host:8786")
    cluster: DaskCluster | None = None
    storage: str | None = Field(default=None, pattern=r"^s3://[^/]{3,}",
                                description="shared intermediates (stats, shards, merged model); default <results>/shared")
    inputs: Literal["ranged", "download"] = Field(
        default="ranged", description="s3:// inputs on workers: read by byte range in place (default) or downloaded whole")
    gpu_resource: str = Field(
        default="GPU", min_length=1, description="Dask worker resource that marks a GPU worker (default GPU): evaluations go there")

    @model_validator(mode="after")
    def _check_kind(self) -> Runner:
        if self.kind == "local":
            for key in ("address", "cluster", "storage", "inputs", "gpu_resource"):
                if getattr(self, key) != type(self).model_fields[key].default:
                    raise ValueError(f"'{key}' applies only to kind 'dask'")
        if self.address is not None and self.cluster is not None:
            raise ValueError("give either 'address' (an existing scheduler) or 'cluster' (a LocalCluster), not both")
        return self


class Recipe(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    base: str = Field(min_length=1)
    finetunes: tuple[FineTune, ...] = Field(min_length=1)
    method: Method = Method(name="metagpt")
    # best of several: each candidate is merged and scored, the best by normalized average is gated and published
    candidates: tuple[Method, ...] = ()
    merge: MergeOptions = MergeOptions()
    evaluation: Evaluation | None = None
    publish: Publish | None = None
    gate: Gate | None = None
    endpoint_url: str | None = Field(default=None, description="S3 endpoint for s3:// refs (and publishing)")
    results: str | None = Field(default=None, pattern=r"^s3://[^/]{3,}", description="Prefect result storage (s3://bucket/prefix)")
    workdir: str = ".metamerge"
    runner: Runner = Runner()

    @field_validator("runner", mode="before")
    @classmethod
    def _runner_as_string(cls, value: Any) -> Any:
        return {"kind": value} if isinstance(value, str) else value

    @property
    def shared_storage(self) -> str | None:
        """s3:// location of intermediates every Dask worker can reach (None: local files only)."""
        if self.runner.kind != "dask":
            return None
        if self.runner.storage:
            return self.runner.storage
        return f"{self.results.rstrip('/')}/shared" if self.results else None

    @field_validator("finetunes", "method", "candidates", mode="before")
    @classmethod
    def _strings_as_mappings(cls, value: Any, info: ValidationInfo) -> Any:
        """`finetunes: [path, ...]`, `method: ties` and `candidates: [metagpt, ties]` are short forms."""
        key = "ref" if info.field_name == "finetunes" else "name"
        if isinstance(value, list):
            return [{key: v} if isinstance(v, str) else v for v in value]
        return {key: value} if isinstance(value, str) and info.field_name == "method" else value

    @model_validator(mode="after")
    def _unique_labels(self) -> Recipe:
        labels = [ft.label for ft in self.finetunes]
        dupes = sorted({x for x in labels if labels.count(x) > 1})
        if dupes:
            raise ValueError(f"fine-tune names must be unique; repeated: {', '.join(dupes)}")
        if self.candidates:
            if len(self.candidates) < 2:
                raise ValueError("candidates: name at least two methods (or use 'method' for one)")
            if "method" in self.model_fields_set:
                raise ValueError("give either 'method' or 'candidates' (the best candidate becomes the method)")
            if self.evaluation is None:
                raise ValueError("candidates are chosen by their scores: add an 'evaluation' section")
            specs = [c.model_dump(mode="json", exclude_none=True) for c in self.candidates]
            if any(specs.count(spec) > 1 for spec in specs):
                raise ValueError("candidates: each candidate must differ from the others")
        if self.gate is not None and self.evaluation is None:
            raise ValueError("gate: a quality gate needs an 'evaluation' section to score the merge")
        if self.gate is not None and self.gate.no_regression and self.publish is None:
            raise ValueError("gate.no_regression compares with the last publish: add a 'publish' section")
        if self.evaluation is not None:
            missing = [ft.label for ft in self.finetunes if not ft.tasks]
            if missing:
                raise ValueError(f"evaluation needs 'tasks' on every fine-tune; missing on: {', '.join(missing)}")
        return self

    def fingerprint(self) -> str:
        """Hash of the validated recipe: two spellings of the same recipe hash the same."""
        payload = json.dumps(self.model_dump(mode="json", by_alias=True), sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()

    def resolve_paths(self, base_dir: Path) -> Recipe:
        """Relative local paths in a recipe are relative to the recipe file, not to the cwd."""

        def fix(ref: str) -> str:
            if "://" in ref or Path(ref).is_absolute():
                return ref
            return str((base_dir / ref).resolve())

        update: dict[str, Any] = {
            "base": fix(self.base),
            "finetunes": tuple(ft.model_copy(update={"ref": fix(ft.ref)}) for ft in self.finetunes),
            "workdir": fix(self.workdir),
        }
        if self.evaluation and self.evaluation.tasks_dir:
            update["evaluation"] = self.evaluation.model_copy(update={"tasks_dir": fix(self.evaluation.tasks_dir)})
        if self.publish and "://" not in self.publish.target:
            update["publish"] = self.publish.model_copy(update={"target": fix(self.publish.target)})
        return self.model_copy(update=update)


def _format_errors(source: str, exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"] if p != "__root__") or "(top level)"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        parts.append(f"{loc}: {msg}")
    return f"invalid recipe {source}: " + "; ".join(parts)


def parse_recipe(data: Any, source: str = "<recipe>") -> Recipe:
    if not isinstance(data, dict):
        raise RecipeError(f"invalid recipe {source}: expected a mapping at the top level, got {type(data).__name__}")
    try:
        return Recipe.model_validate(data)
    except ValidationError as exc:
        raise RecipeError(_format_errors(source, exc)) from None


def load_recipe(path: str | Path) -> Recipe:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise RecipeError(f"cannot read recipe {path}: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise RecipeError(f"invalid recipe {path}:{where} not valid YAML ({getattr(exc, 'problem', exc)})") from None
    return parse_recipe(data, str(path)).resolve_paths(path.parent.resolve())


def load_any(recipe: str | Path | dict[str, Any] | Recipe) -> Recipe:
    """A path (CLI, deployments), a mapping (event triggers, API calls; relative to the cwd) or a Recipe."""
    if isinstance(recipe, Recipe):
        return recipe
    if isinstance(recipe, dict):
        return parse_recipe(recipe, "<parameters>").resolve_paths(Path.cwd())
    return load_recipe(recipe)


def recipe_to_yaml(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.model_dump(mode="json", by_alias=True, exclude_none=True), sort_keys=False)
