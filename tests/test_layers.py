"""The core's layers, read from the code with `ast`: no import runs from a lower layer up to a higher one, and no two
modules import each other, directly or around a longer circle (imports inside functions count too)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# top to bottom; a module may import from its own layer and the ones below it
LAYERS = ["run", "plugins", "evaluate", "train", "data", "store", "ground"]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> str:
    parts = module.split(".")
    if parts[0] in ("methods", "protocols"):
        return "plugins"
    assert parts[0] == "benchmark", module
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and parts[1] in LAYERS) else "ground"


def imports_in(source: str, me: str, is_package: bool, known: set[str]) -> set[str]:
    """The project modules that module `me` (source text `source`) imports; `from a.b import c` counts as a.b.c when
    that is a module, else a.b."""
    package = me if is_package else me.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for name in names:
            while name and name not in known:  # `import benchmark.run.cli` names the module itself
                name = name.rpartition(".")[0]
            if name and name != me:
                found.add(name)
    return found


def graph() -> dict[str, set[str]]:
    files = [p for d in ("benchmark", "methods", "protocols") for p in (ROOT / d).rglob("*.py")]
    known = {module_name(p) for p in files}
    return {module_name(p): imports_in(p.read_text(), module_name(p), p.name == "__init__.py", known) for p in files}


def test_layers_are_where_the_layout_says() -> None:
    g = graph()
    layers = {m: layer_of(m) for m in g}
    assert set(layers.values()) == set(LAYERS), layers
    for ground in ("benchmark.config", "benchmark.registry", "benchmark.errors", "benchmark.backbones", "benchmark.device"):
        assert layers[ground] == "ground"
    assert layers["benchmark.run.cli"] == "run" and layers["benchmark.store.io"] == "store"


def upward(g: dict[str, set[str]]) -> list[str]:
    rank = {name: i for i, name in enumerate(LAYERS)}
    return sorted(f"{m} ({layer_of(m)}) imports {d} ({layer_of(d)})" for m, deps in g.items() for d in deps
                  if rank[layer_of(d)] < rank[layer_of(m)])


def circles(g: dict[str, set[str]]) -> list[str]:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    stack: list[str] = []
    found: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for d in sorted(g.get(m, ())):
            if state.get(d) == 1:
                found.append(" -> ".join(stack[stack.index(d):] + [d]))
            elif d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in sorted(g):
        if m not in state:
            visit(m)
    return found


def test_no_import_runs_up_a_layer() -> None:
    bad = upward(graph())
    assert not bad, "\n".join(bad)


def test_no_import_circle() -> None:
    """The plugin packages' `__init__` is left out as a target: importing a package's own plugins is its job."""
    g = {m: {d for d in deps if d not in ("methods", "protocols")} for m, deps in graph().items()}
    bad = circles(g)
    assert not bad, "\n".join(bad)


def test_the_checks_can_fail() -> None:
    """An upward import in a store module is seen, also inside a function, and so is a circle of two."""
    known = set(graph())
    for source, target in [("from benchmark.run.cli import main\n", "benchmark.run.cli"),
                           ("def f():\n    from benchmark.train import pretrain\n", "benchmark.train.pretrain"),
                           ("from ..data.sets import Splits\n", "benchmark.data.sets")]:
        deps = imports_in(source, "benchmark.store.io", False, known)
        assert deps == {target}
        assert upward({"benchmark.store.io": deps}), source
    assert circles({"benchmark.data.sets": {"benchmark.data.voc"}, "benchmark.data.voc": {"benchmark.data.sets"}})
