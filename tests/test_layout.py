"""The package's plan stays true: imports run downward only, no module imports itself back
through a circle, and no module grows past what one reader can hold.

Every import is counted, including those inside functions ("lazy" imports are still arrows)."""

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "covfeat"

# Bottom to top.  A module may import its own package and the packages below it.
LAYERS = ["core", "trust", "store", "imaging", "lungs", "extraction", "head", "probes", "use", "<top>"]
MAX_LINES = 450


def module_name(path: Path) -> str:
    parts = path.relative_to(PKG.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and parts[1] in LAYERS) else "<top>"


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """covfeat modules that ``path`` imports, anywhere in the file (resolved to the module, not
    the name: ``from covfeat.store.reader import open_cache`` is ``covfeat.store.reader``)."""
    me = module_name(path)
    package = me if path.name == "__init__.py" else me.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            names = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in modules else mod for a in node.names]
        else:
            continue
        out |= {n for n in names if n == "covfeat" or n.startswith("covfeat.")}
    return out - {me}


def graph() -> dict[str, set[str]]:
    files = sorted(PKG.rglob("*.py"))
    modules = {module_name(p) for p in files}
    return {module_name(p): imports_of(p, modules) for p in files}


def downward(a: str, b: str) -> bool:
    """May module ``a`` import module ``b``?"""
    la, lb = layer(a), layer(b)
    if b == "covfeat" and la != "<top>":
        return False  # the package's front door is for users, never for covfeat's own modules
    if b.startswith("covfeat.core") and b.count(".") == 1:
        return True  # covfeat.core itself (its __version__)
    return LAYERS.index(lb) <= LAYERS.index(la)


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    found, state, stack = [], {}, []

    def visit(n):
        state[n] = 1
        stack.append(n)
        for m in sorted(g.get(n, ())):
            if state.get(m) == 1:
                found.append(stack[stack.index(m):] + [m])
            elif m in g and not state.get(m):
                visit(m)
        stack.pop()
        state[n] = 2

    for n in sorted(g):
        if not state.get(n):
            visit(n)
    return found


def test_every_import_runs_downward():
    g = graph()
    up = sorted(f"{a} -> {b} ({layer(a)} -> {layer(b)})" for a, bs in g.items() for b in bs if not downward(a, b))
    assert not up, "imports that run back up:\n" + "\n".join(up)


def test_no_import_circle():
    found = cycles(graph())
    assert not found, "import circles:\n" + "\n".join(" -> ".join(c) for c in found)


def test_every_package_is_a_known_layer():
    packages = {p.parent.name for p in PKG.rglob("__init__.py") if p.parent != PKG}
    assert packages <= set(LAYERS), f"packages outside the layer list: {sorted(packages - set(LAYERS))}"


def test_no_module_is_over_the_size_a_reader_can_hold():
    big = {str(p.relative_to(PKG)): n for p in PKG.rglob("*.py") if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not big, f"modules over {MAX_LINES} lines: {big}"


@pytest.mark.parametrize("edges, expect", [
    ({"covfeat.store.a": {"covfeat.head.b"}}, "up"),  # an upward arrow
    ({"covfeat.head.a": {"covfeat.head.b"}, "covfeat.head.b": {"covfeat.head.a"}}, "circle"),  # a circle in a package
    ({"covfeat.head.a": {"covfeat.store.b"}}, "ok"),
])
def test_the_checks_see_what_they_claim(edges, expect):
    """The layout checks themselves: an upward arrow and a circle are both caught."""
    up = [(a, b) for a, bs in edges.items() for b in bs if not downward(a, b)]
    circ = cycles(edges)
    assert (bool(up), bool(circ)) == {"up": (True, False), "circle": (False, True), "ok": (False, False)}[expect]
