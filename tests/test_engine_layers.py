"""engine/ is the serving core and fleet/ builds on it, never the reverse: no module under calm_cli/engine
imports calm_cli.fleet (at any depth: inside functions and type-checking blocks too), and engine's own
modules import one another without a cycle. Read from the source with ast, so nothing is imported."""

from __future__ import annotations

import ast
import importlib.util
from graphlib import TopologicalSorter
from pathlib import Path

import pytest

import calm_cli.engine

ENGINE = Path(calm_cli.engine.__file__).parent


def imported(source: str, module: str, is_package: bool = False) -> set[str]:
    """Every module name `source` (the code of `module`) may import, relative imports resolved.

    `from a import b` counts as importing both `a` and `a.b`, since b may be a module (`from calm_cli import
    fleet`)."""
    package = module if is_package else module.rpartition(".")[0]
    names: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = importlib.util.resolve_name("." * node.level + (node.module or ""), package) if node.level \
                else node.module
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def is_fleet(name: str) -> bool:
    return name == "calm_cli.fleet" or name.startswith("calm_cli.fleet.")


def engine_imports() -> dict[str, set[str]]:
    """Each module under calm_cli/engine -> the modules it may import."""
    graph = {}
    for path in sorted(ENGINE.rglob("*.py")):
        parts = path.relative_to(ENGINE.parent.parent).with_suffix("").parts
        package = parts[-1] == "__init__"
        module = ".".join(parts[:-1] if package else parts)
        graph[module] = imported(path.read_text(encoding="utf-8"), module, package)
    return graph


@pytest.mark.parametrize("source", [
    "import calm_cli.fleet.lock",
    "import calm_cli.fleet as f",
    "from calm_cli.fleet import lock",
    "from calm_cli.fleet.gguf_tokenizer import build_tokenizer",
    "from calm_cli import fleet",
    "from .. import fleet",
    "from ..fleet.store import Store",
    "def load():\n    from calm_cli.fleet.store import Store\n",
    "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from calm_cli.fleet.lock import ModelSpec\n",
])
def test_the_check_sees_every_way_of_importing_fleet(source: str) -> None:
    assert any(is_fleet(n) for n in imported(source, "calm_cli.engine.example"))


@pytest.mark.parametrize("source", [
    "from calm_cli.engine.session import FUSED_GRAPH",
    "from . import kv",
    "from calm_cli import settings",
    "import calm_cli.fleetwood",
])
def test_the_check_lets_other_imports_pass(source: str) -> None:
    assert not any(is_fleet(n) for n in imported(source, "calm_cli.engine.example"))


def test_engine_never_imports_fleet() -> None:
    imports = engine_imports()
    assert "calm_cli.engine.decoder" in imports and "calm_cli.engine.tokenizer" in imports
    wrong = sorted(f"{module} imports {name}" for module, names in imports.items() for name in names if is_fleet(name))
    assert not wrong, f"engine/ must not import fleet/: {wrong}"


def test_engine_modules_import_each_other_without_a_cycle() -> None:
    imports = engine_imports()
    graph = {module: {n for n in names if n in imports and n != module} for module, names in imports.items()}
    assert graph["calm_cli.engine.complete"] >= {"calm_cli.engine.decode", "calm_cli.engine.textstream"}
    order = list(TopologicalSorter(graph).static_order())  # raises graphlib.CycleError naming the cycle
    assert order.index("calm_cli.engine.decoder") < order.index("calm_cli.engine.kv") \
        < order.index("calm_cli.engine.decode") < order.index("calm_cli.engine.complete")
