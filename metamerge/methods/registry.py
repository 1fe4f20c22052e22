"""The method registry: one entry per merge method, and everything else derived from it.

An entry names the method, says which recipe parameters it takes (with defaults; bounds live
in PARAMETERS, shared by every method that takes the parameter), how it becomes a MergePlan,
and which paper it comes from. Recipe validation, the merge plan, `compare`'s default list,
the method table of docs/recipes.md and the report's citation all read this table, so adding
a method is one entry here (plus its test), as in mergekit's `merge_methods/registry.py`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from metamerge.methods.plan import MergePlan

if TYPE_CHECKING:
    from metamerge.recipe import Method


@dataclass(frozen=True)
class Parameter:
    """A method parameter as a recipe spells it, with the bounds every method shares."""

    key: str  # the attribute on recipe.Method
    spelled: str  # the key in YAML
    bounds: dict[str, float] = field(default_factory=dict)  # pydantic Field constraints
    choices: tuple[str, ...] = ()  # the allowed values of a categorical parameter
    doc: str = ""


PARAMETERS: dict[str, Parameter] = {p.key: p for p in (
    Parameter("scale", "lambda", {"gt": 0, "le": 10}, doc="scale of the summed task vectors"),
    Parameter("granularity", "granularity", choices=("model", "layer", "tensor"),
              doc="one λ per model (the paper), per transformer block or per tensor"),
    Parameter("density", "density", {"gt": 0, "le": 1}, doc="share of each task vector that is kept"),
    Parameter("combine", "combine", choices=("linear", "ties"), doc="linear sum, or TIES' sign election after the drop"),
    Parameter("seed", "seed", doc="seed of the random drop (required: runs must be reproducible)"),
    Parameter("gamma", "gamma", {"ge": 0, "lt": 1}, doc="share of the largest |τ| dropped as outliers"),
    Parameter("epsilon", "epsilon", {"gt": 0, "lt": 0.5}, doc="keep probabilities span density ± epsilon by rank"),
    Parameter("disjoint", "disjoint", choices=("mean", "sum"),
              doc="after the election: λ-weighted mean of the agreeing entries, or their λ-weighted sum"),
)}


@dataclass(frozen=True)
class MethodSpec:
    name: str
    formula: str  # markdown, for the method table
    reference: str  # the paper, for the report's citation
    defaults: dict[str, Any]  # parameters it accepts and their defaults (None: derived, see `param`)
    build_plan: Callable[[Method], MergePlan]
    compare_variants: tuple[str, ...] = ()  # `compare`'s default labels for this method
    check: Callable[[Method], str | None] | None = None  # a rule across parameters: the error, or None

    @property
    def random(self) -> bool:
        """Drops weights at random: a seed is required."""
        return "seed" in self.defaults


def _dare_scale(method: Method) -> float:
    """λ of a sparsified merge: 1 under TIES' election (its disjoint mean keeps the scale), else Task Arithmetic's 0.3."""
    return 1.0 if method.param("combine") == "ties" else 0.3


def _sparse_plan(method: Method, sparsify: str, **extra: Any) -> MergePlan:
    """DARE, Breadcrumbs and DELLA: a sparsified task arithmetic (linear: λ per task) or, with
    `combine: ties`, TIES' election and disjoint mean, times λ."""
    ties = method.param("combine") == "ties"
    return MergePlan(
        sparsify=sparsify, density=method.param("density"), consensus="ties" if ties else "none",
        weighting="constant", weight=1.0 if ties else method.param("scale"),
        scale=method.param("scale") if ties else 1.0, normalize=ties, **extra,
    )


def _dare_plan(method: Method) -> MergePlan:
    return _sparse_plan(method, "random", seed=method.param("seed"))


def _della_check(method: Method) -> str | None:
    density, epsilon = method.param("density"), method.param("epsilon")
    if not (density - epsilon > 0 and density + epsilon <= 1):
        return f"della needs 0 < density − epsilon and density + epsilon ≤ 1 (density {density}, epsilon {epsilon})"
    return None


def _metagpt_sparse_plan(method: Method, sparsify: str, **extra: Any) -> MergePlan:
    """MetaGPT's λ on the sparsified task vectors; after TIES' election, a λ-weighted disjoint mean
    (mergekit's TIES with weights) unless `disjoint: sum`."""
    elect = sparsify == "magnitude" or method.param("combine") == "ties"
    return MergePlan(sparsify=sparsify, density=method.param("density"), consensus="ties" if elect else "none",
                     weighting="metagpt", granularity=method.param("granularity"),
                     normalize=elect and method.param("disjoint") == "mean", **extra)


TASK_ARITHMETIC = "Ilharco et al., Editing Models with Task Arithmetic, ICLR 2023 (arXiv 2212.04089)"
TIES = "Yadav et al., TIES-Merging, NeurIPS 2023 (arXiv 2306.01708)"
DARE = "Yu et al., Language Models are Super Mario (DARE), ICML 2024 (arXiv 2311.03099)"
BREADCRUMBS = "Davari & Belilovsky, Model Breadcrumbs, ECCV 2024 (arXiv 2312.06795)"
DELLA = "Deep et al., DELLA-Merging, 2024 (arXiv 2406.11617)"
ISO_C = "Marczak et al., No Task Left Behind: Isotropic Model Merging (Iso-C), ICML 2025 (arXiv 2502.04959)"
METAGPT = "Zhou et al., MetaGPT: Merging LLMs Using Model Exclusive Task Arithmetic, EMNLP 2024 (arXiv 2406.11385)"

METHODS: dict[str, MethodSpec] = {m.name: m for m in (
    MethodSpec("average", "θ₀ + (1/T) Σ τ_t", "Wortsman et al., Model soups, ICML 2022 (arXiv 2203.05482)", {},
               lambda m: MergePlan(weighting="uniform"), ("average",)),
    MethodSpec("task_arithmetic", "θ₀ + λ Σ τ_t", TASK_ARITHMETIC, {"scale": 0.3},
               lambda m: MergePlan(weighting="constant", weight=m.param("scale")), ("task_arithmetic",)),
    MethodSpec("ties", "trim each τ_t to its top-k magnitudes, elect the sign of Σ τ_t per entry, disjoint mean of agreeing entries, × λ", TIES,
               {"density": 0.2, "scale": 1.0},
               lambda m: MergePlan(sparsify="magnitude", density=m.param("density"), consensus="ties",
                                   weighting="constant", scale=m.param("scale"), normalize=True), ("ties",)),
    MethodSpec("dare", "keep each entry with probability `density`, rescale by 1/density, then linear sum × λ or TIES", DARE,
               {"density": 0.55, "combine": "linear", "scale": None, "seed": None}, _dare_plan, ("dare",)),
    MethodSpec("metagpt", "θ₀ + Σ λ_t τ_t, λ_t = ‖τ_t‖²/Σ‖τ_k‖² over the model (the paper), a transformer block, or a tensor", METAGPT, {"granularity": "model"},
               lambda m: MergePlan(weighting="metagpt", granularity=m.param("granularity")),
               ("metagpt", "metagpt:layer", "metagpt:tensor")),
    MethodSpec("metagpt+ties", "TIES trim + sign election, then the λ-weighted disjoint mean "
               "Σ λ_t m_t τ_t / Σ λ_t m_t (`disjoint: sum`: no division), MetaGPT λ computed on the trimmed τ",
               f"{METAGPT}; {TIES}", {"density": 0.2, "granularity": "model", "disjoint": "mean"},
               lambda m: _metagpt_sparse_plan(m, "magnitude"), ("metagpt+ties",)),
    MethodSpec("metagpt+dare", "DARE drop-and-rescale, TIES' election and the λ-weighted disjoint mean "
               "(`combine: linear`: Σ λ_t τ_t), MetaGPT λ computed on the sparsified τ", f"{METAGPT}; {DARE}",
               {"density": 0.55, "granularity": "model", "combine": "ties", "disjoint": "mean", "seed": None},
               lambda m: _metagpt_sparse_plan(m, "random", seed=m.param("seed")), ("metagpt+dare",)),
    MethodSpec("breadcrumbs", "drop the smallest \\|τ\\| and the largest γ·n (outliers) so that `density` is kept, "
               "then linear sum × λ or TIES", BREADCRUMBS,
               {"density": 0.2, "gamma": 0.01, "combine": "linear", "scale": None},
               lambda m: _sparse_plan(m, "outliers", gamma=m.param("gamma")), ("breadcrumbs",)),
    MethodSpec("della", "keep each entry with probability density ± epsilon by its \\|τ\\| rank in its row, rescale by "
               "1/p, then TIES (or linear sum × λ)", DELLA,
               {"density": 0.55, "epsilon": 0.15, "combine": "ties", "scale": None, "seed": None},
               lambda m: _sparse_plan(m, "ranked", seed=m.param("seed"), epsilon=m.param("epsilon")), ("della",),
               check=_della_check),
    MethodSpec("iso_c", "each weight matrix: α · U diag(mean σ) Vᵀ of Σ τ_t (its spectrum flattened); other "
               "tensors and vocabulary tables: α · mean τ", ISO_C, {"scale": 1.0},
               lambda m: MergePlan(weighting="uniform", spectral="iso", scale=m.param("scale")), ("iso_c",)),
)}

# derived defaults: a parameter whose default depends on another one (and how the docs say it)
DERIVED_DEFAULTS: dict[tuple[str, str], Callable[[Method], Any]] = {
    (name, "scale"): _dare_scale for name in ("dare", "breadcrumbs", "della")}
DERIVED_DOCS: dict[tuple[str, str], str] = {key: "0.3 (linear) / 1.0 (ties)" for key in DERIVED_DEFAULTS}


def method_spec(name: str) -> MethodSpec:
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; choose from {', '.join(METHODS)}") from None


def default_of(method: Method, key: str) -> Any:
    """The default of `key` for this method, derived from other parameters where the entry says so."""
    derive = DERIVED_DEFAULTS.get((method.name, key))
    return derive(method) if derive is not None else METHODS[method.name].defaults.get(key)


def plan_for(method: Method) -> MergePlan:
    """Maps a recipe method onto the three choices (docs/design.md §4)."""
    return method_spec(method.name).build_plan(method)


def compare_defaults() -> tuple[str, ...]:
    """`metamerge compare`'s default methods: every entry's variants, in registry order."""
    return tuple(label for spec in METHODS.values() for label in spec.compare_variants)


def method_table() -> str:
    """The method table of docs/recipes.md (tests keep the two equal)."""
    rows = ["| method | parameters (defaults) | per tensor |", "|---|---|---|"]
    for spec in METHODS.values():
        params = ", ".join(_parameter_doc(spec, key, default) for key, default in spec.defaults.items()) or "—"
        rows.append(f"| `{spec.name}` | {params} | {spec.formula} |")
    return "\n".join(rows)


def _parameter_doc(spec: MethodSpec, key: str, default: Any) -> str:
    param = PARAMETERS[key]
    if key == "seed":
        shown = "(required)"
    elif default is None:
        shown = DERIVED_DOCS[(spec.name, key)]
    else:
        shown = str(default)
    if param.choices:
        shown += " (" + " \\| ".join(param.choices) + ")"
    return f"`{param.spelled}` {shown}"
