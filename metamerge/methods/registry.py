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
)}


@dataclass(frozen=True)
class MethodSpec:
    name: str
    formula: str  # markdown, for the method table
    reference: str  # the paper, for the report's citation
    defaults: dict[str, Any]  # parameters it accepts and their defaults (None: derived, see `param`)
    build_plan: Callable[[Method], MergePlan]
    compare_variants: tuple[str, ...] = ()  # `compare`'s default labels for this method

    @property
    def random(self) -> bool:
        """Drops weights at random: a seed is required."""
        return "seed" in self.defaults


def _dare_scale(method: Method) -> float:
    """DARE's λ: 1 under TIES' election (its disjoint mean keeps the scale), else Task Arithmetic's 0.3."""
    return 1.0 if method.param("combine") == "ties" else 0.3


def _dare_plan(method: Method) -> MergePlan:
    ties = method.param("combine") == "ties"
    return MergePlan(
        sparsify="random", density=method.param("density"), seed=method.param("seed"),
        consensus="ties" if ties else "none", weighting="constant",
        weight=1.0 if ties else method.param("scale"),
        scale=method.param("scale") if ties else 1.0, normalize=ties,
    )


TASK_ARITHMETIC = "Ilharco et al., Editing Models with Task Arithmetic, ICLR 2023 (arXiv 2212.04089)"
TIES = "Yadav et al., TIES-Merging, NeurIPS 2023 (arXiv 2306.01708)"
DARE = "Yu et al., Language Models are Super Mario (DARE), ICML 2024 (arXiv 2311.03099)"
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
    MethodSpec("metagpt+ties", "TIES trim + sign election, then Σ λ_t m_t τ_t with MetaGPT λ computed on the trimmed τ", f"{METAGPT}; {TIES}",
               {"density": 0.2, "granularity": "model"},
               lambda m: MergePlan(sparsify="magnitude", density=m.param("density"), consensus="ties",
                                   weighting="metagpt", granularity=m.param("granularity")), ("metagpt+ties",)),
    MethodSpec("metagpt+dare", "DARE drop-and-rescale, then MetaGPT λ computed on the sparsified τ", f"{METAGPT}; {DARE}",
               {"density": 0.55, "granularity": "model", "seed": None},
               lambda m: MergePlan(sparsify="random", density=m.param("density"), seed=m.param("seed"),
                                   weighting="metagpt", granularity=m.param("granularity")), ("metagpt+dare",)),
)}

# derived defaults: a parameter whose default depends on another one (and how the docs say it)
DERIVED_DEFAULTS: dict[tuple[str, str], Callable[[Method], Any]] = {("dare", "scale"): _dare_scale}
DERIVED_DOCS: dict[tuple[str, str], str] = {("dare", "scale"): "0.3 (linear) / 1.0 (ties)"}


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
