"""Layering of megatron_save's subpackages, checked on the source with ``ast`` (nothing of ours is imported).

Every import counts: top-level ones, lazy ones inside functions, ``if TYPE_CHECKING:`` ones, relative ones
(``from . import x``, resolved against the importing module), both ``import x.y`` and ``from x import y``, and
``importlib.import_module("megatron_save....")`` with a literal name. Each module maps to its subpackage
(``megatron_save.<subpackage>....``), and each subpackage has its own rank in ``LAYERS``, lowest first. The test
fails, naming the module, the line and the imported module, on

(a) an import of a higher layer,
(b) any cycle between subpackages (with one rank each, a cycle always holds an upward import too; it is named
    separately so a cycle reads as one),
(c) ``algorithms`` importing anything of ours (it is pure tensor code).

Inside ``trainers/`` the stage trainers are peers: an import of one stage trainer by another fails too (what two
stages share belongs in ``trainers/common.py`` or lower); nothing else inside a subpackage is checked.

A second test names every ``from megatron_save.x import name`` of the package whose module x no longer exists or
no longer binds ``name``: where a definition moved down a layer, the importers still to update.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

PACKAGE = "megatron_save"
PACKAGE_DIR = Path(__file__).resolve().parents[2] / PACKAGE

ROOT = PACKAGE
"""The package's own ``__init__``: every import of ours runs it first, so it sits below everything and imports
nothing of ours."""

LAYERS = (
    ROOT,
    "algorithms",  # pure tensor functions; imports nothing of ours
    "config",  # typed configs and their loading
    "utils",  # rank-0 logger, metrics, small tensor helpers
    "distributed",  # torchrun init, process groups, the CPU compatibility layer
    "data",  # datasets, chat templates, batch building
    "models",  # per-family architecture facts, layer specs, builders, scalar heads, forward passes
    "planning",  # per-GPU memory plans of a layout from HF config numbers (pure arithmetic, imports nothing of ours)
    "checkpoint",  # HF <-> Megatron weight mappings, distributed checkpoints, training-state persistence
    "testing",  # test fixtures (tiny HF models and their files): above models and checkpoint, below the rest
    "rollout",  # generation engines and weight sync
    "trainers",  # stage 1, 2 and 3 trainers, SFT
    "evaluation",  # RM benchmarks, policy export
    "testbed",  # the gold-reward testbed
    "__main__",  # the command-line entry point, on top of everything
)
"""Subpackages, lowest first; a module may import only its own subpackage or a lower one."""

RANK = {name: rank for rank, name in enumerate(LAYERS)}

PURE = ("algorithms",)
"""Subpackages that may import nothing of ours outside themselves (not even the root package)."""

STAGE_TRAINERS = ("sft", "stage1_bt", "stage2_value", "stage3")
"""Modules (or packages) of ``trainers/`` that are peers: none should import another."""


@dataclass(frozen=True)
class Import:
    """One import statement's edge: ``module`` (line ``line``) imports ``target``."""

    module: str
    line: int
    target: str

    def __str__(self) -> str:
        return f"{self.module} (line {self.line}) imports {self.target}"


def module_name(path: Path, package_dir: Path) -> str:
    """Dotted name of a source file under ``package_dir`` (``__init__.py`` names its package)."""
    parts = [package_dir.name, *path.relative_to(package_dir).with_suffix("").parts]
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def read_package(package_dir: Path = PACKAGE_DIR) -> dict[str, tuple[str, bool]]:
    """Module name -> (source, is a package) for every ``.py`` file under ``package_dir``."""
    return {module_name(path, package_dir): (path.read_text(), path.name == "__init__.py")
            for path in sorted(package_dir.rglob("*.py"))}


def _resolve_relative(module: str, is_package: bool, level: int, name: str | None) -> str:
    base = module.split(".") if is_package else module.split(".")[:-1]
    if level > 1:
        base = base[: len(base) - (level - 1)]
    return ".".join(base + ([name] if name else []))


def _literal_import_module(node: ast.AST) -> str | None:
    """The module name of an ``importlib.import_module("literal")`` (or ``import_module(...)``) call."""
    if not isinstance(node, ast.Call) or not node.args:
        return None
    func = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", None)
    argument = node.args[0]
    if func == "import_module" and isinstance(argument, ast.Constant) and isinstance(argument.value, str):
        return argument.value
    return None


def imports_of(module: str, source: str, is_package: bool, known: set[str], package: str = PACKAGE) -> list[Import]:
    """Every import of ``package`` by ``module``, anywhere in its source; ``from a import b`` targets ``a.b`` when
    that is one of the ``known`` modules, else ``a``."""

    def ours(name: str | None) -> bool:
        return name is not None and (name == package or name.startswith(package + "."))

    found = []
    for node in ast.walk(ast.parse(source, filename=module)):
        if isinstance(node, ast.Import):
            found += [Import(module, node.lineno, alias.name) for alias in node.names if ours(alias.name)]
        elif isinstance(node, ast.ImportFrom):
            base = _resolve_relative(module, is_package, node.level, node.module) if node.level else node.module
            if ours(base):
                targets = {f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names}
                found += [Import(module, node.lineno, target) for target in sorted(targets)]
        elif ours(_literal_import_module(node)):
            found.append(Import(module, node.lineno, _literal_import_module(node)))
    return found


def subpackage_of(module: str) -> str:
    """``megatron_save.models.builder`` -> ``models``; the root package -> ``megatron_save``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def _cycles(edges: dict[tuple[str, str], list[Import]]) -> list[list[str]]:
    """Strongly connected components with more than one subpackage (Tarjan)."""
    graph: dict[str, set[str]] = {}
    for source, target in edges:
        graph.setdefault(source, set()).add(target)
        graph.setdefault(target, set())
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    components = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for succ in sorted(graph[node]):
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component, key=lambda name: RANK.get(name, len(RANK))))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return components


def layering_violations(modules: dict[str, tuple[str, bool]], package: str = PACKAGE) -> tuple[list[str], list[str]]:
    """(failures, notes) for the modules of ``read_package``: every upward import, cycle between subpackages and
    impure import of a PURE subpackage fails; a stage trainer importing another is listed apart."""
    known = set(modules)
    failures, peers = [], []
    edges: dict[tuple[str, str], list[Import]] = {}
    for module, (source, is_package) in sorted(modules.items()):
        layer = subpackage_of(module)
        if layer not in RANK:
            failures.append(f"{module}: subpackage {layer!r} has no layer; add it to LAYERS in {__name__}")
            continue
        for imp in imports_of(module, source, is_package, known, package):
            target_layer = subpackage_of(imp.target)
            if target_layer == layer:
                if layer == "trainers":
                    own, other = module.split(".")[2:3], imp.target.split(".")[2:3]
                    if own and other and own != other and own[0] in STAGE_TRAINERS and other[0] in STAGE_TRAINERS:
                        peers.append(f"stage trainers are peers: {imp}")
                continue
            edges.setdefault((layer, target_layer), []).append(imp)
            if layer in PURE:
                failures.append(f"{imp}: {layer} imports nothing of ours")
            elif target_layer not in RANK:
                failures.append(f"{imp}: unknown subpackage {target_layer!r}")
            elif RANK[target_layer] > RANK[layer]:
                failures.append(f"{imp}: upward import, {layer} (layer {RANK[layer]}) < {target_layer} "
                                f"(layer {RANK[target_layer]})")
    for component in _cycles(edges):
        members = set(component)
        closing = [str(imp) for (a, b), imps in sorted(edges.items())
                   if a in members and b in members and RANK.get(b, len(RANK)) > RANK.get(a, len(RANK)) for imp in imps]
        failures.append(f"import cycle between subpackages {' <-> '.join(component)}, closed by:\n      "
                        + "\n      ".join(closing))
    return failures, peers


def test_layering():
    modules = read_package()
    assert len({subpackage_of(m) for m in modules}) >= 12, sorted(modules)
    failures, peers = layering_violations(modules)
    assert not failures + peers, ("layering of megatron_save (lowest first: " + ", ".join(LAYERS) + "):\n  "
                                  + "\n  ".join(failures + peers))


def _defined_names(tree: ast.Module) -> set[str] | None:
    """Names a module binds at its top level (inside top-level ``if`` / ``try`` / ``with`` / ``for`` blocks too);
    None when that cannot be known statically (a star import, a module ``__getattr__``)."""
    names: set[str] = set()
    pending = list(tree.body)
    while pending:
        node = pending.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            if any(alias.name == "*" for alias in node.names):
                return None
            names.update(alias.asname or alias.name.split(".")[0] for alias in node.names)
            continue
        for target in ast.walk(node):
            if isinstance(target, ast.Name) and isinstance(target.ctx, ast.Store):
                names.add(target.id)
        for field in ("body", "orelse", "finalbody", "handlers"):
            pending += getattr(node, field, [])
    return None if "__getattr__" in names else names


def stale_imports(modules: dict[str, tuple[str, bool]], package: str = PACKAGE) -> list[str]:
    """Imports of a module of ours that does not exist, and ``from megatron_save.x import name`` where module x binds
    no ``name`` and has no submodule ``name``: what a moved definition leaves behind in the modules that still
    import it from its old place."""
    trees = {module: ast.parse(source, filename=module) for module, (source, _) in modules.items()}
    defined = {module: _defined_names(tree) for module, tree in trees.items()}
    stale = []
    for module, tree in sorted(trees.items()):
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                stale += [f"{module} (line {node.lineno}): no module {alias.name}" for alias in node.names
                          if alias.name.startswith(package + ".") and alias.name not in modules]
            if not isinstance(node, ast.ImportFrom):
                continue
            base = _resolve_relative(module, modules[module][1], node.level, node.module) if node.level else node.module
            if base not in defined:
                if base == package or base.startswith(package + "."):
                    stale.append(f"{module} (line {node.lineno}): no module {base}")
                continue
            if defined[base] is None:
                continue
            for alias in node.names:
                if alias.name not in defined[base] and f"{base}.{alias.name}" not in modules:
                    stale.append(f"{module} (line {node.lineno}): {base} has no {alias.name!r}")
    return stale


def test_imported_names_exist():
    stale = stale_imports(read_package())
    assert not stale, "imports of names their module no longer has (moved?):\n  " + "\n  ".join(stale)


# -- the checker itself -----------------------------------------------------------------------------------------

def _synthetic(files: dict[str, str]) -> dict[str, tuple[str, bool]]:
    """``read_package`` of a package made of ``files`` (path under the repository -> source), without disk."""
    return {module_name(Path(path), Path(PACKAGE)): (source, path.endswith("__init__.py"))
            for path, source in files.items()}


def test_checker_accepts_downward_imports():
    modules = _synthetic({
        "megatron_save/models/__init__.py": "from . import builder\n",
        "megatron_save/models/builder.py": "from megatron_save.utils.tensors import pad_rows\n"
                                           "import megatron_save.config\n",
        "megatron_save/utils/tensors.py": "def pad_rows(): ...\n",
        "megatron_save/config/__init__.py": "",
    })
    assert layering_violations(modules) == ([], [])


@pytest.mark.parametrize("statement", [
    "from megatron_save.checkpoint.hf import family_for\n",
    "import megatron_save.checkpoint.hf\n",
    "from megatron_save import checkpoint\n",
    "from ..checkpoint import hf\n",
    "def build():\n    from megatron_save.checkpoint.hf import family_for\n",
    "import importlib\ndef build():\n    return importlib.import_module('megatron_save.checkpoint')\n",
])
def test_checker_catches_an_upward_import(statement):
    modules = _synthetic({
        "megatron_save/models/builder.py": "import torch\n\n" + statement,
        "megatron_save/checkpoint/__init__.py": "",
        "megatron_save/checkpoint/hf/__init__.py": "from megatron_save.models import builder\n",
    })
    failures, _ = layering_violations(modules)
    upward = [f for f in failures if "upward import" in f]
    assert len(upward) == 1 and upward[0].startswith("megatron_save.models.builder (line "), failures
    assert "imports megatron_save.checkpoint" in upward[0], failures
    assert any("import cycle between subpackages models <-> checkpoint" in f for f in failures), failures


def test_checker_catches_impure_algorithms_and_unknown_subpackages():
    modules = _synthetic({
        "megatron_save/algorithms/save.py": "from megatron_save import __version__\n",
        "megatron_save/extras/thing.py": "",
    })
    failures, _ = layering_violations(modules)
    impure = "megatron_save.algorithms.save (line 1) imports megatron_save: algorithms imports nothing of ours"
    assert impure in failures, failures
    assert any("'extras' has no layer" in f for f in failures), failures


def test_checker_reports_peer_stage_trainers_apart():
    modules = _synthetic({
        "megatron_save/trainers/stage1_bt.py": "from megatron_save.trainers.sft import run\n",
        "megatron_save/trainers/sft.py": "from megatron_save.trainers.optimizer import build\n",
        "megatron_save/trainers/optimizer.py": "",
    })
    failures, notes = layering_violations(modules)
    assert failures == [] and len(notes) == 1 and "megatron_save.trainers.stage1_bt (line 1)" in notes[0], notes


def test_stale_import_checker():
    modules = _synthetic({
        "megatron_save/trainers/optimizer.py": "from megatron_save.models.train_state import TrainState\n",
        "megatron_save/trainers/sft.py": "from megatron_save.trainers.optimizer import TrainState, make\n"
                                        "from megatron_save.data.batching import pad_rows\n",
        "megatron_save/models/train_state.py": "class TrainState: ...\n",
    })
    assert stale_imports(modules) == [
        "megatron_save.trainers.sft (line 1): megatron_save.trainers.optimizer has no 'make'",
        "megatron_save.trainers.sft (line 2): no module megatron_save.data.batching",
    ]


def test_test_modules_have_unique_names():
    """Test directories are not packages, so pytest imports each test file by its basename: two files of one name
    collide ("import file mismatch") whenever one process collects both, as `pytest -m gpu tests` does."""
    names = [path.name for path in (Path(__file__).resolve().parents[1]).rglob("test_*.py")]
    assert sorted({n for n in names if names.count(n) > 1}) == []
