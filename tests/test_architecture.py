"""Which package may import which, and the shape of the trainer: mftcoder's layers, read from the source with ast.

The layers, from the bottom: errors, config, data, models and losses, training, then the top layer
that nothing below imports: the top-level modules (cli, run_config, merge, generate, plotting) and the
top-level packages in TOP_PACKAGES (evaluate). A layer imports only itself and
those below it, and no two files import each other, however indirectly."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

PACKAGE = Path(__file__).resolve().parent.parent / "mftcoder"


def mftcoder_imports(path: Path) -> set[str]:
    """The mftcoder modules a file imports, at any depth of its code (TYPE_CHECKING blocks included)."""
    package = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts[:-1])
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module
            found.add(module)
            # `from mftcoder.training import checkpoint` imports the module checkpoint.
            found |= {f"{module}.{alias.name}" for alias in node.names if _is_module(f"{module}.{alias.name}")}
    return {name for name in found if name == "mftcoder" or name.startswith("mftcoder.")}


def _is_module(name: str) -> bool:
    path = PACKAGE.parent.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")


def import_graph() -> dict[str, set[str]]:
    """Every mftcoder module and the mftcoder modules it imports (packages' __init__ left out: they hold no code)."""
    return {
        module_name(path): {name for name in mftcoder_imports(path) if _is_module(name) and not _is_package(name)}
        for path in sorted(PACKAGE.rglob("*.py"))
        if path.name != "__init__.py"
    }


def _is_package(name: str) -> bool:
    return PACKAGE.parent.joinpath(*name.split("."), "__init__.py").is_file()


LAYERS = {
    "config": ("config",),
    "data": ("data", "config"),
    "models": ("models", "data", "config"),
    "losses": ("losses", "config"),
    "training": ("training", "losses", "models", "data", "config"),
}


# Packages of the top layer: they may import anything (the top-level modules too); nothing below imports them.
TOP_PACKAGES = ("evaluate",)


def layer_violations(graph: dict[str, set[str]]) -> list[str]:
    """Imports from a package into one it may not import (errors, at the bottom, is open to all)."""
    problems = []
    for module, imports in sorted(graph.items()):
        parts = module.split(".")
        if len(parts) == 2 or parts[1] in TOP_PACKAGES:  # a top-level module or package: the top layer
            continue
        for name in sorted(imports):
            target = name.split(".")
            if target[1] != "errors" and (len(target) == 2 or target[1] not in LAYERS[parts[1]]):
                problems.append(f"{module} imports {name}")
    return problems


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import cycles between files (each found once, from its first module in sorted order)."""
    found, seen = [], set()

    def visit(path: list[str]) -> None:
        for nxt in sorted(graph.get(path[-1], ())):
            if nxt == path[0]:
                cycle = frozenset(path)
                if cycle not in seen:
                    seen.add(cycle)
                    found.append([*path, nxt])
            elif nxt not in path and nxt > path[0]:
                visit([*path, nxt])

    for start in sorted(graph):
        visit([start])
    return found


def test_config_imports_only_itself_and_errors():
    allowed = ("mftcoder.config", "mftcoder.errors")
    outside = {
        f"{path.relative_to(PACKAGE.parent)}: {name}"
        for path in sorted((PACKAGE / "config").rglob("*.py"))
        for name in mftcoder_imports(path)
        if not any(name == layer or name.startswith(f"{layer}.") for layer in allowed)
    }
    assert not outside, "mftcoder.config must not import the layers above it"


def test_each_layer_imports_only_itself_and_the_layers_below():
    assert layer_violations(import_graph()) == []


def test_no_two_files_import_each_other():
    assert cycles(import_graph()) == []


def test_the_checks_catch_an_upward_import_and_a_cycle():
    graph = {
        "mftcoder.data.dataset": {"mftcoder.models.loading", "mftcoder.data.batching", "mftcoder.errors"},
        "mftcoder.data.batching": {"mftcoder.data.dataset", "mftcoder.config.schema"},
        "mftcoder.training.trainer": {"mftcoder.merge", "mftcoder.losses.modes"},
        "mftcoder.losses.modes": {"mftcoder.data.sample"},
        "mftcoder.merge": {"mftcoder.models.loading"},
        "mftcoder.evaluate.humaneval": {"mftcoder.generate", "mftcoder.training.evaluation"},
        "mftcoder.training.evaluation": {"mftcoder.evaluate.pass_at_k"},
    }
    assert layer_violations(graph) == [
        "mftcoder.data.dataset imports mftcoder.models.loading",
        "mftcoder.losses.modes imports mftcoder.data.sample",
        "mftcoder.training.evaluation imports mftcoder.evaluate.pass_at_k",
        "mftcoder.training.trainer imports mftcoder.merge",
    ]
    assert cycles(graph) == [["mftcoder.data.batching", "mftcoder.data.dataset", "mftcoder.data.batching"]]


def test_the_trainer_creates_its_attributes_in_init_or_setup():
    """The run's state is built in one place; the loop's methods only read and update it."""
    tree = ast.parse((PACKAGE / "training" / "trainer.py").read_text(encoding="utf-8"))
    (trainer,) = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Trainer"]
    created = {
        f"{method.name}: self.{target.attr}"
        for method in trainer.body
        if isinstance(method, ast.FunctionDef) and method.name not in ("__init__", "setup")
        for node in ast.walk(method)
        if isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign))
        for target in (node.targets if isinstance(node, ast.Assign) else [node.target])
        if isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name) and target.value.id == "self"
    }
    assert created == set()
