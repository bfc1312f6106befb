"""The package's import layers, read from the source with `ast`, and the registries that tie layers together.

Layers, lowest first (imports may only point down, or stay within a layer):

    core      tsm/__init__.py intervals spec routing router experts inject grads objectives errors images
    models    tsm/models/
    services  tsm/data.py sampling.py io.py config.py optimizers.py comfyui.py rundir.py metrics/
    recipes   tsm/recipes/
    bench     tsm/bench/
    cli       tsm/cli.py

Inside services the order is what the modules import today: ``data`` imports ``config`` and ``io``; ``io``,
``config`` and ``sampling`` import no other service; ``optimizers`` and ``rundir`` import ``config``. Inside recipes, a
method never imports another method: only ``base`` (what they share) and ``run`` (the loop, which finds
methods through the registry).
"""

from __future__ import annotations

import ast
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

import tsm

ROOT = Path(tsm.__file__).parent  # .../tsm
LAYERS = ("core", "models", "services", "recipes", "bench", "cli")
CORE = (
    "intervals",
    "spec",
    "routing",
    "router",
    "experts",
    "inject",
    "grads",
    "objectives",
    "errors",
    "images",
)
SERVICES = (
    "data",
    "sampling",
    "io",
    "config",
    "optimizers",
    "comfyui",
    "rundir",
    "metrics",
    "metrics.folder",
    "metrics.inception",
    "metrics.bvqa",
    "metrics.clipscore",
    "metrics.fid",
)
# within services: a module may import only services of a lower rank (the order of today's imports)
SERVICES_RANK = {
    "tsm.io": 0,
    "tsm.config": 0,
    "tsm.sampling": 0,
    "tsm.data": 1,
    "tsm.optimizers": 1,
    "tsm.comfyui": 1,
    "tsm.rundir": 1,
    # tsm/metrics/: folder reads data's caption conventions; the metrics import folder (and fid, inception)
    "tsm.metrics": 2,
    "tsm.metrics.folder": 2,
    "tsm.metrics.inception": 0,
    "tsm.metrics.bvqa": 3,
    "tsm.metrics.clipscore": 3,
    "tsm.metrics.fid": 3,
}
# the package's own __init__ is the public facade: it re-exports tsm.io's save/load/export_lora (a service
# that itself imports core modules only, checked below), so `tsm.save(...)` works after `import tsm`
KNOWN_UPWARD = {("tsm/__init__.py", "tsm.io")}


@dataclass(frozen=True)
class Import:
    file: str  # relative to the repository root, e.g. "tsm/data.py"
    line: int
    source: str  # the importing module, e.g. "tsm.data"
    module: str  # the imported tsm module, e.g. "tsm.config"

    def __str__(self) -> str:
        return f"{self.file}:{self.line} -> {self.module}"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_module(name: str) -> bool:
    """Whether ``name`` (tsm.x.y) is a module or package of the source tree."""
    rel = Path(*name.split("."))
    return (ROOT.parent / rel).with_suffix(".py").is_file() or (ROOT.parent / rel / "__init__.py").is_file()


def layer_of(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "tsm":
        return None
    if len(parts) == 1 or parts[1] in CORE:
        return "core"
    if parts[1] in SERVICES:
        return "services"
    if parts[1] in ("models", "recipes", "bench"):
        return parts[1]
    if parts[1] == "cli":
        return "cli"
    return None


def imports_of(path: Path) -> list[Import]:
    """Every import of a tsm module in ``path``: module level, inside functions and ``if TYPE_CHECKING``,
    ``import x`` and ``from x import y`` (y itself when it is a submodule), relative ones resolved."""
    source = module_name(path)
    package = source if path.name == "__init__.py" else source.rpartition(".")[0]
    file = path.relative_to(ROOT.parent).as_posix()
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base_name = ".".join(base + ([node.module] if node.module else []))
            else:
                base_name = node.module or ""
            # `from tsm import io` imports the module tsm.io; `from tsm import ExpertSpec` the package tsm
            subs = [f"{base_name}.{a.name}" for a in node.names if is_module(f"{base_name}.{a.name}")]
            names = subs if len(subs) == len(node.names) else [base_name, *subs]
        out += [Import(file, node.lineno, source, n) for n in names if n.split(".")[0] == "tsm"]
    return out


def all_files() -> list[Path]:
    return sorted(p for p in ROOT.rglob("*.py") if "__pycache__" not in p.parts)


def all_imports() -> list[Import]:
    return [i for p in all_files() for i in imports_of(p)]


def upward_imports() -> list[Import]:
    rank = {name: k for k, name in enumerate(LAYERS)}
    return [i for i in all_imports() if rank[layer_of(i.module)] > rank[layer_of(i.source)]]


# ---------------------------------------------------------------------------------------------------------
def test_every_module_and_import_has_a_layer():
    unmapped = [module_name(p) for p in all_files() if layer_of(module_name(p)) is None]
    assert not unmapped, f"modules in no layer (add them to LAYERS in this test): {unmapped}"
    dangling = [str(i) for i in all_imports() if layer_of(i.module) is None or not is_module(i.module)]
    assert not dangling, "imports of tsm modules that do not exist:\n" + "\n".join(dangling)


def test_the_scan_sees_function_level_relative_and_plain_imports():
    """The parser itself: the kinds of import statement the layer test relies on finding."""
    found = {(i.file, i.module) for i in all_imports()}
    assert ("tsm/recipes/run.py", "tsm.data") in found  # inside train()
    assert ("tsm/recipes/base.py", "tsm.config") in found  # under `if TYPE_CHECKING`
    assert ("tsm/recipes/run.py", "tsm.recipes") in found  # `import tsm.recipes`
    assert ("tsm/cli.py", "tsm.io") in found  # `from tsm import io`: the submodule
    assert ("tsm/bench/digits.py", "tsm") in found  # `from tsm import ExpertSpec`: the package
    assert layer_of("tsm") == "core" and layer_of("tsm.models.sd3") == "models"


def test_imports_only_point_down():
    bad = [str(i) for i in upward_imports() if (i.file, i.module) not in KNOWN_UPWARD]
    assert not bad, f"upward imports (layers lowest first: {' < '.join(LAYERS)}):\n" + "\n".join(bad)


def test_the_facade_reexports_a_service_that_needs_only_core():
    facade = {i.module for i in upward_imports() if (i.file, i.module) in KNOWN_UPWARD}
    assert facade == {"tsm.io"}
    below = {layer_of(i.module) for i in all_imports() if i.source == "tsm.io" and i.module != "tsm"}
    assert below <= {"core"}, f"tsm.io imports {below}: the facade's re-export would pull in more than core"


def test_services_import_each_other_one_way_only():
    edges = {
        (i.source, i.module)
        for i in all_imports()
        if layer_of(i.source) == layer_of(i.module) == "services" and i.source != i.module
    }
    both_ways = sorted((a, b) for a, b in edges if (b, a) in edges)
    assert not both_ways, f"services importing each other both ways: {both_ways}"
    assert set(SERVICES_RANK) == {f"tsm.{s}" for s in SERVICES}
    wrong = sorted((a, b) for a, b in edges if SERVICES_RANK[b] >= SERVICES_RANK[a])
    assert not wrong, (
        f"services imports against the order {SERVICES_RANK} (lower rank first; change SERVICES_RANK "
        f"only if the new order has no cycle): {wrong}"
    )


def test_no_recipe_imports_another():
    shared = {"tsm.recipes", "tsm.recipes.base", "tsm.recipes.run"}
    bad = [
        str(i)
        for i in all_imports()
        if i.source.startswith("tsm.recipes.")
        and i.module.startswith("tsm.recipes.")
        and i.module not in shared
        and i.module != i.source
    ]
    assert not bad, "a recipe imports another recipe (share code through tsm/recipes/base.py):\n" + "\n".join(
        bad
    )


def test_run_finds_recipes_through_the_registry_only():
    # `import tsm.recipes` (the empty package) is how run.py lists the recipe modules (its __path__)
    bad = [
        str(i)
        for i in imports_of(ROOT / "recipes" / "run.py")
        if i.module.startswith("tsm.recipes") and i.module not in ("tsm.recipes", "tsm.recipes.base")
    ]
    assert not bad, "tsm/recipes/run.py may import tsm.recipes.base only:\n" + "\n".join(bad)


def import_cycles(edges: set[tuple[str, str]]) -> list[list[str]]:
    """The import cycles of a graph (a -> b: a imports b): its strongly connected components of more than one
    module (every module in one reaches every other), and any module that imports itself; each sorted."""
    graph: dict[str, set[str]] = {}
    for a, b in edges:
        graph.setdefault(a, set()).add(b)
        graph.setdefault(b, set())
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    components: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1 or v in graph[v]:
                components.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return components


def test_the_cycle_finder_finds_cycles_and_only_cycles():
    assert import_cycles({("a", "b"), ("b", "c"), ("a", "c")}) == []
    assert import_cycles({("a", "b"), ("b", "a"), ("b", "c")}) == [["a", "b"]]
    assert import_cycles({("z", "y"), ("y", "x"), ("x", "z"), ("x", "w")}) == [["x", "y", "z"]]
    assert import_cycles({("s", "s"), ("s", "t")}) == [["s"]]


def test_bench_modules_import_each_other_one_way_only():
    """No import cycle inside tsm/bench, counting imports inside functions: shared pieces of the digits
    runners live in a lower module (digits_data, digits_common) that imports none of them."""
    edges = {
        (i.source, i.module)
        for i in all_imports()
        if i.source.startswith("tsm.bench.") and i.module.startswith("tsm.bench.")
    }
    assert ("tsm.bench.digits", "tsm.bench.digits_fast") in edges  # the scan sees the function-level import
    cycles = import_cycles(edges)
    listed = "\n".join(" <-> ".join(c) for c in cycles)
    assert not cycles, (
        f"tsm/bench modules importing each other in a circle (move what they share lower):\n{listed}"
    )


# ---------------------------------------------------------------------------------------------------------
# registries
# ---------------------------------------------------------------------------------------------------------
def test_config_families_are_the_family_registry():
    import tsm.config
    import tsm.models

    assert tsm.config.FAMILIES == tuple(tsm.models.FAMILY_CLASSES)
    assert tsm.config.FAMILIES == tsm.models.family_names()


def test_config_methods_are_the_recipe_registry():
    import tsm.config
    from tsm.recipes.run import recipe_class

    recipe_class("lora")  # imports every recipe module, so each @register has run
    assert set(tsm.config.METHODS) == set(recipe_class.__globals__["RECIPES"])


def test_every_family_file_is_imported_and_registered():
    """`import tsm.models` imports every module of the package, and every ``@register`` class in them is
    in the registry: a new family file needs no other edit."""
    import tsm.models

    files = {p.stem for p in (ROOT / "models").glob("*.py") if p.stem != "__init__"}
    assert {f"tsm.models.{f}" for f in files} <= set(sys.modules)
    registered = {(cls.__module__, cls.__qualname__) for cls in tsm.models.FAMILY_CLASSES.values()}
    decorated = set()
    for f in files:
        tree = ast.parse((ROOT / "models" / f"{f}.py").read_text())
        for node in tree.body:
            if isinstance(node, ast.ClassDef) and any(
                ast.unparse(d) in ("register", "registry.register") for d in node.decorator_list
            ):
                decorated.add((f"tsm.models.{f}", node.name))
    assert decorated and decorated <= registered, decorated - registered


def test_a_new_family_registers_itself():
    from tsm.models import FAMILY_CLASSES, Family, family_names, get_family, register

    before = dict(FAMILY_CLASSES)
    try:

        @register
        class ProbeFamily(Family):
            name = "layering_probe"

        assert isinstance(get_family("layering_probe"), ProbeFamily)
        assert family_names()[-1] == "layering_probe"
        with pytest.raises(TypeError, match="two families"):

            @register
            class OtherProbe(Family):
                name = "layering_probe"

    finally:
        FAMILY_CLASSES.pop("layering_probe", None)
    assert FAMILY_CLASSES == before
