"""The package's layers import one way: no import cycle between its subpackages and modules.

A layer is a top-level module (`softprompt_jax/losses.py`) or a subpackage
(`softprompt_jax/train/`, `tasks/` installed as `softprompt_jax.tasks`). Every import
counts, including those inside functions, since a lazy import is still a dependency.
"""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import REPO_ROOT

PACKAGE = "softprompt_jax"
SOURCES = {PACKAGE: REPO_ROOT / PACKAGE, f"{PACKAGE}.tasks": REPO_ROOT / "tasks"}


def _layer_of_file(package: str, root: Path, file: Path) -> str:
    """`softprompt_jax.train` for `softprompt_jax/train/x.py`, `softprompt_jax` for its init."""
    parts = file.relative_to(root).with_suffix("").parts
    module = ".".join([package, *parts]).removesuffix(".__init__")
    return _layer_of_module(module)


def _layer_of_module(module: str) -> str:
    return ".".join(module.split(".")[:2])


def _imported_modules(tree: ast.AST) -> set[str]:
    modules = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from softprompt_jax import storage` imports the module softprompt_jax.storage.
            modules.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {m for m in modules if m == PACKAGE or m.startswith(PACKAGE + ".")}


def layer_graph() -> dict[str, set[str]]:
    """Layer -> the other layers it imports."""
    graph: dict[str, set[str]] = {}
    for package, root in SOURCES.items():
        for file in sorted(root.rglob("*.py")):
            layer = _layer_of_file(package, root, file)
            imported = {_layer_of_module(m) for m in _imported_modules(ast.parse(file.read_text()))}
            graph.setdefault(layer, set()).update(imported - {layer})
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as `[a, b, ..., a]`, or None (depth-first search)."""
    state: dict[str, str] = {}  # "open" while on the current path, "done" after
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        path.append(node)
        for child in sorted(graph.get(node, ())):
            if state.get(child) == "open":
                return path[path.index(child) :] + [child]
            if child not in state and (cycle := visit(child)):
                return cycle
        state[node] = "done"
        path.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycle_between_layers():
    graph = layer_graph()
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle between layers: " + " -> ".join(cycle)


def test_the_model_and_the_prompt_code_know_nothing_above_them():
    graph = layer_graph()
    layers = lambda *names: {f"{PACKAGE}.{name}" for name in names}
    utilities = layers("storage", "errors")
    assert graph[f"{PACKAGE}.model"] <= utilities
    beside_model = layers("model", "partitioning") | utilities
    assert graph[f"{PACKAGE}.partitioning"] <= beside_model
    assert graph[f"{PACKAGE}.checkpoints"] <= beside_model
    prompt_layer = beside_model | layers("checkpoints")
    assert graph[f"{PACKAGE}.prompt_bank"] <= prompt_layer
    assert graph[f"{PACKAGE}.prompts"] <= prompt_layer | layers("prompt_bank")


def test_the_cycle_finder_finds_a_cycle_through_a_function_level_import():
    source = "def f():\n    from softprompt_jax.train import trainer\n"
    graph = {
        f"{PACKAGE}.inference": {_layer_of_module(m) for m in _imported_modules(ast.parse(source))},
        f"{PACKAGE}.train": {f"{PACKAGE}.inference"},
    }
    assert find_cycle(graph) == [
        f"{PACKAGE}.inference",
        f"{PACKAGE}.train",
        f"{PACKAGE}.inference",
    ]


def test_train_reaches_the_model_only_through_its_config():
    """Method knowledge (prefix layouts, is_prefix) lives beside the methods, not in model/."""
    reached = set()
    for file in sorted((REPO_ROOT / PACKAGE / "train").rglob("*.py")):
        modules = _imported_modules(ast.parse(file.read_text()))
        reached |= {m for m in modules if m.startswith(f"{PACKAGE}.model")}
    assert reached <= {f"{PACKAGE}.model.T5Config", f"{PACKAGE}.model.config.T5Config"}
