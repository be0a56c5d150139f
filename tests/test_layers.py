"""The house is layered: each module imports only from its own or lower layers (lazy imports inside functions
included), there is no import cycle, and no module or function outgrows one concept."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "probflow"

# Lowest first. A module imports from its own layer or below; a package's __init__ sits where its contents do.
LAYERS = {
    0: ["probflow.version", "probflow.schedules", "probflow.grids"],
    1: ["probflow.field", "probflow.models", "probflow.precision"],
    2: ["probflow.method", "probflow.solvers", "probflow.exponential", "probflow.reversible", "probflow.adaptive",
        "probflow.integrate", "probflow.newton"],
    3: ["probflow", "probflow.flows", "probflow.sde", "probflow.calibrate", "probflow.coefficients", "probflow.fit",
        "probflow.likelihood", "probflow.inversion"],
    4: ["probflow.digits", "probflow.files", "probflow.io", "probflow.demo", "probflow.ranks", "probflow.chunks",
        "probflow.distributed", "probflow.bench"],
    5: ["probflow.cli", "probflow.__main__"],
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def layer_of(name: str) -> int:
    """The layer of the longest prefix of `name` listed in LAYERS (the root package only for itself)."""
    best, best_len = None, -1
    for layer, names in LAYERS.items():
        for n in names:
            if (name == n or (n != "probflow" and name.startswith(n + "."))) and len(n) > best_len:
                best, best_len = layer, len(n)
    if best is None:
        raise KeyError(f"{name}: no layer assigned; add it to LAYERS in tests/test_layers.py")
    return best


def imports_of(path: Path, name: str) -> set[str]:
    """Every probflow module `name` imports, at the top or inside functions."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.split(".")[0] == "probflow")
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            if base.split(".")[0] != "probflow":
                continue
            for a in node.names:  # `from probflow import flows` imports the module probflow.flows
                out.add(f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base)
    out.discard(name)
    return out


GRAPH = {name: imports_of(path, name) for name, path in MODULES.items()}


@pytest.mark.parametrize("name", sorted(MODULES))
def test_module_imports_only_from_its_layer_or_below(name):
    mine = layer_of(name)
    higher = sorted(dep for dep in GRAPH[name] if layer_of(dep) > mine)
    assert not higher, f"{name} (layer {mine}) imports from a higher layer: {higher}"


def test_the_import_graph_has_no_cycle():
    # Edges to a package's __init__ count (importing probflow.digits.data runs probflow/digits/__init__.py).
    def deps(n):
        out = set(GRAPH.get(n, ()))
        parts = n.split(".")
        out.update(".".join(parts[:i]) for i in range(2, len(parts)) if ".".join(parts[:i]) in MODULES)
        return {d for d in out if d in MODULES and d != n and not n.startswith(d + ".")}

    state, stack = {}, []

    def visit(n):
        state[n] = "open"
        stack.append(n)
        for d in sorted(deps(n)):
            if state.get(d) == "open":
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(d):] + [d]))
            if d not in state:
                visit(d)
        stack.pop()
        state[n] = "done"

    for n in sorted(MODULES):
        if n not in state:
            visit(n)


def test_the_layer_check_can_fail():
    assert layer_of("probflow.flows") > layer_of("probflow.integrate")
    with pytest.raises(KeyError):
        layer_of("probflow.utils")


@pytest.mark.parametrize("name", sorted(MODULES))
def test_modules_and_functions_stay_small(name):
    text = MODULES[name].read_text(encoding="utf-8")
    assert text.count("\n") <= 520, f"{name}: {text.count(chr(10))} lines; split it by concept"
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            n = node.end_lineno - node.lineno + 1
            assert n <= 90, f"{name}.{node.name}: {n} lines"
