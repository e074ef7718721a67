"""The package's layers (DESIGN.md): each imports only downward, nothing imports in a circle.

Every import statement counts, including the ones inside functions (a lazy import still ties two modules together).
"""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1] / "patient"

# Rank of each top-level part of the package; a module may import its own part and parts of lower rank only.
LAYERS = {
    "_version": 0, "_files": 0,  # leaves every layer may use
    "models": 1, "data": 1, "optim": 1,  # the ground floor: none of the three imports another
    "io": 2,
    "engine": 3,
    "runtime": 4,
    "export": 5, "bench": 5,  # side by side: neither imports the other
    "cli": 6,
    "": 7,  # patient/__init__.py: the public front, imported by nobody inside the package
}


def _modules() -> dict[str, pathlib.Path]:
    mods = {}
    for path in ROOT.rglob("*.py"):
        parts = ["patient", *path.relative_to(ROOT).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = path
    return mods


def import_graph() -> dict[str, set[str]]:
    """{module: modules of patient it imports}. `from X import a` counts as importing X.a when that is a module."""
    mods = _modules()
    edges: dict[str, set[str]] = {m: set() for m in mods}
    for name, path in mods.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    module = ".".join(base + ([node.module] if node.module else []))
                else:
                    module = node.module
                subs = [f"{module}.{a.name}" for a in node.names if f"{module}.{a.name}" in mods]
                targets = subs if len(subs) == len(node.names) else [module, *subs]
            edges[name] |= {t for t in targets if t in mods and t != name}
    return edges


def _part(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_every_part_of_the_package_has_a_layer():
    assert {_part(m) for m in _modules()} <= set(LAYERS)


def test_imports_go_downward_only():
    bad = []
    for src, targets in import_graph().items():
        for dst in targets:
            a, b = _part(src), _part(dst)
            if a != b and LAYERS[b] >= LAYERS[a]:
                bad.append(f"{src} -> {dst} ({a or 'patient'} is layer {LAYERS[a]}, {b or 'patient'} is {LAYERS[b]})")
    assert not bad, "upward or sideways imports:\n" + "\n".join(sorted(bad))


def test_no_import_cycles():
    graph = import_graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles = []

    def visit(node, path):
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(path[path.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


@pytest.mark.parametrize("limit", [500])
def test_no_module_is_over_the_line_limit(limit):
    long = {str(p.relative_to(ROOT)): n for p in ROOT.rglob("*.py") if (n := len(p.read_text().splitlines())) > limit}
    assert not long, f"modules over {limit} lines (split them): {long}"
