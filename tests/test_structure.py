"""The package's import graph, read from the source (nothing is imported): no cycles, and
function-local imports only where they keep a heavy optional dependency out of a module that does
not need it. Function-local imports count as edges, so a cycle cannot hide behind them."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "src"
# What a module may import inside a function: packages that are heavy or optional (an extra).
HEAVY = {"torch", "jax", "jaxlib", "optax", "transformers", "tokenizers", "datasets", "matplotlib",
         "gguf", "fastapi", "starlette", "uvicorn"}
# Framework subpackages: a framework-free module reaches them only lazily (torch and JAX are extras
# of each other, and `minillm prepare` must not pay for importing either).
FRAMEWORK = ("minillm.torch", "minillm.jax", "minillm.interop", "minillm.serve")


def _modules() -> dict[str, Path]:
    mods = {}
    for path in (SRC / "minillm").rglob("*.py"):
        parts = path.relative_to(SRC).with_suffix("").parts
        mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return mods


def _imports(name: str, path: Path) -> list[tuple[list[str], bool]]:
    """For every import statement: (what it may import, inside a function?). `from m import n`
    gives [m, m.n]: n may be a submodule or a name defined in m."""
    tree, found = ast.parse(path.read_text()), []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            local = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            if isinstance(child, ast.Import):
                found.extend(([a.name], in_function) for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                package = name if path.name == "__init__.py" else name.rpartition(".")[0]
                base = package.split(".")[: len(package.split(".")) - child.level + 1] if child.level else []
                module = ".".join(base + ([child.module] if child.module else []))
                found.append(([module] + [f"{module}.{a.name}" for a in child.names], in_function))
            visit(child, local)

    visit(tree, False)
    return found


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for m, path in mods.items():
        for targets, _ in _imports(m, path):
            for target in targets:
                while target and target not in mods:  # a name defined in a module: the module
                    target = target.rpartition(".")[0]
                if target and target != m and not m.startswith(target + "."):  # not a package's own __init__
                    graph[m].add(target)
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph as a path [a, b, ..., a], or None (depth-first search, three colours)."""
    colour, stack = dict.fromkeys(graph, 0), []

    def visit(v: str) -> list[str] | None:
        colour[v] = 1
        stack.append(v)
        for w in sorted(graph[v]):
            if colour[w] == 1:
                return stack[stack.index(w):] + [w]
            if colour[w] == 0 and (found := visit(w)):
                return found
        colour[v] = 2
        stack.pop()
        return None

    for v in sorted(graph):
        if colour[v] == 0 and (found := visit(v)):
            return found
    return None


def test_cycle_finder_finds_a_planted_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_relative_imports_resolve_to_modules(tmp_path):
    def imports(text: str) -> list[tuple[list[str], bool]]:
        return _imports("minillm.torch.model", _write(tmp_path, text))

    assert imports("from .layers import x") == [(["minillm.torch.layers", "minillm.torch.layers.x"], False)]
    assert imports("from .. import config") == [(["minillm", "minillm.config"], False)]
    assert imports("def f():\n import minillm.config") == [(["minillm.config"], True)]


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "m.py"
    path.write_text(text)
    return path


def test_no_import_cycle_inside_the_package():
    graph = _graph()
    assert len(graph) > 30 and graph["minillm.torch.model"]  # the graph was really read
    cycle = _cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


@pytest.mark.parametrize("module", sorted(_modules()))
def test_function_local_imports_only_for_heavy_dependencies(module):
    """Framework-free modules import torch, JAX, transformers, matplotlib (and minillm's framework
    packages) lazily; everything else, and everything inside torch/ and jax/, at the top."""
    path = _modules()[module]
    framework_free = not module.startswith(FRAMEWORK)
    bad = []
    for (target, *_), local in _imports(module, path):
        heavy = target.split(".")[0] in HEAVY or (framework_free and target.startswith(FRAMEWORK))
        if local and not heavy:
            bad.append(target)
    assert not bad, f"{path}: function-local imports of {sorted(set(bad))}; move them to the top of the file"
