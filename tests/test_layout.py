"""The layout's rules, checked statically over every module of the project (docs/design.md §1).

No import cycles (counting imports inside functions: those are how cycles hide), the core never
imports the orchestration side or Prefect, no core module grows past about 300 lines, nothing
generic is installed at the top level of site-packages, and the method table in the docs is
the registry's.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from metamerge.methods.registry import METHODS

ROOT = Path(__file__).resolve().parent.parent
# installed name -> folder: the top-level packages, and pyproject.toml's package-dir mapping
_SETUPTOOLS = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
PACKAGES = {name: ROOT / name for name in _SETUPTOOLS["packages"] if "." not in name}
PACKAGES |= {name: ROOT / folder for name, folder in _SETUPTOOLS["package-dir"].items()}
CORE_MAX_LINES = 300


def project_modules() -> dict[str, Path]:
    modules = {}
    for package, folder in PACKAGES.items():
        for path in folder.glob("*.py") if package != "metamerge" else folder.rglob("*.py"):
            parts = path.relative_to(folder).with_suffix("").parts
            name = ".".join((package, *parts)).removesuffix(".__init__")
            modules[name] = path
    return modules


def _is_type_checking(node: ast.If) -> bool:
    return isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"


def imports_of(path: Path, modules: dict[str, Path]) -> set[str]:
    """Project modules imported anywhere in the file (functions included, TYPE_CHECKING blocks not)."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name in modules)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            submodules = {f"{node.module}.{a.name}" for a in node.names} & set(modules)
            found.update(submodules)
            if node.module in modules and len(submodules) < len(node.names):
                found.add(node.module)  # names defined in the module (or package __init__) itself
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text()))
    return found


def import_graph() -> dict[str, set[str]]:
    modules = project_modules()
    return {name: imports_of(path, modules) - {name} for name, path in modules.items()}


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected component with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in graph.get(node, ()):
            if succ not in index:
                connect(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return cycles


def test_the_cycle_finder_finds_a_planted_cycle():
    planted = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycles(planted) == [["a", "b", "c"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles_among_the_projects_modules():
    graph = import_graph()
    assert len(graph) > 60 and "metamerge_prefect.flows.merge_flow" in graph  # the mapped folders were read
    assert "metamerge.pipeline.keys" in graph["metamerge_prefect.tasks.caching"]
    assert find_cycles(graph) == []


def test_the_core_never_imports_the_orchestration_side_or_prefect():
    modules = project_modules()
    for name, path in modules.items():
        if not name.startswith("metamerge."):
            continue
        orchestration = {m for m in imports_of(path, modules) if m.startswith("metamerge_prefect")}
        assert not orchestration, f"{name} imports {orchestration}"
        text = path.read_text()
        assert "import prefect" not in text and "from prefect" not in text, name


def test_core_modules_stay_small():
    sizes = {name: len(path.read_text().splitlines()) for name, path in project_modules().items()
             if name.startswith("metamerge.")}
    too_big = {name: lines for name, lines in sizes.items() if lines > CORE_MAX_LINES}
    assert not too_big, f"split these (one job per module): {too_big}"


def _fresh_python(code: str) -> str:
    """Runs `code` in a new interpreter outside the checkout (what an installed user gets); its stdout."""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/")
    assert result.returncode == 0, result.stderr + result.stdout
    return result.stdout


def test_core_modules_import_without_prefect():
    code = (
        "import sys, importlib, pkgutil, metamerge\n"
        "names = [m.name for m in pkgutil.walk_packages(metamerge.__path__, 'metamerge.')]\n"
        "for name in names:\n"
        "    importlib.import_module(name)\n"
        "bad = sorted(k for k in sys.modules if k == 'prefect' or k.startswith('prefect.'))\n"
        "print(len(names), bad)\n"
        "assert len(names) > 40 and not bad, bad\n"
    )
    _fresh_python(code)


def test_merge_modules_import_without_numba():
    """numba and LLVM (about 130 MB, a second of start-up) load only when a compiled kernel first runs."""
    code = (
        "import sys\n"
        "import metamerge.pipeline.extract, metamerge.pipeline.merge, metamerge.engine.merge\n"
        "import metamerge.methods.norms, metamerge.methods.ties, metamerge_prefect.cli\n"
        "bad = sorted(k for k in sys.modules if k in ('numba', 'llvmlite'))\n"
        "assert not bad, bad\n"
    )
    _fresh_python(code)


def test_a_local_merge_needs_no_s3_client(tmp_path):
    """boto3 loads only where a model or a publish is in S3: a GPU host or a laptop merging local
    folders needs neither the package nor its start-up. The merge in a process that cannot import
    boto3 writes the bytes of one that can."""
    from metamerge.engine.coefficients import solve_constant
    from metamerge.engine.merge import merge_checkpoints
    from metamerge.methods.plan import MergePlan
    from tests.helpers import random_family

    base_dir, ft_dirs, _, _ = random_family(tmp_path)
    labels = [f"ft{i}" for i in range(len(ft_dirs))]
    merge_checkpoints(base_dir, list(zip(labels, ft_dirs, strict=True)), solve_constant(labels, 0.3, "task_arithmetic"),
                      MergePlan(weighting="constant", weight=0.3), tmp_path / "with_boto3")
    code = (
        "import sys\n"
        "sys.modules.update({'boto3': None, 'botocore': None})  # import boto3 now raises ImportError\n"
        "from pathlib import Path\n"
        "from metamerge.engine.coefficients import solve_constant\n"
        "from metamerge.engine.merge import merge_checkpoints\n"
        "from metamerge.methods.plan import MergePlan\n"
        f"labels = {labels!r}\n"
        f"merge_checkpoints(Path({str(base_dir)!r}), list(zip(labels, [Path(p) for p in {[str(d) for d in ft_dirs]!r}])),\n"
        "                  solve_constant(labels, 0.3, 'task_arithmetic'), MergePlan(weighting='constant', weight=0.3),\n"
        f"                  Path({str(tmp_path / 'without_boto3')!r}))\n"
    )
    _fresh_python(code)
    written = sorted(p.name for p in (tmp_path / "with_boto3").glob("*.safetensors"))
    assert written
    for name in written:
        assert (tmp_path / "without_boto3" / name).read_bytes() == (tmp_path / "with_boto3" / name).read_bytes()


def test_installing_puts_no_generic_top_level_name_in_site_packages():
    """`tasks`, `flows` and `deployments` exist only as metamerge_prefect's subpackages once installed."""
    code = (
        "import importlib.util, json\n"
        "print(json.dumps({n: importlib.util.find_spec(n) is not None for n in "
        "('tasks', 'flows', 'deployments', 'metamerge_prefect.flows.merge_flow', 'metamerge_prefect.tasks.merge')}))\n"
    )
    assert _fresh_python(code).strip() == ('{"tasks": false, "flows": false, "deployments": false, '
                                     '"metamerge_prefect.flows.merge_flow": true, "metamerge_prefect.tasks.merge": true}')


def test_the_docs_method_table_is_the_registrys():
    from metamerge.methods.registry import method_table

    text = (ROOT / "docs" / "recipes.md").read_text()
    assert method_table() in text, "regenerate the table in docs/recipes.md from metamerge.methods.registry.method_table()"


@pytest.mark.parametrize("name", list(METHODS))
def test_every_registry_entry_validates_plans_and_cites(name):
    from metamerge.evaluation.compare import DEFAULT_METHODS
    from metamerge.methods.registry import plan_for
    from metamerge.recipe import Method

    spec = METHODS[name]
    method = Method.model_validate({"name": name, **({"seed": 1} if spec.random else {})})
    plan = plan_for(method)
    assert plan.needs_norms == (name.startswith("metagpt"))
    assert "arXiv" in spec.reference
    assert name in {label.partition(":")[0] for label in DEFAULT_METHODS}
