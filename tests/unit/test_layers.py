"""The package keeps its shape: cli -> http -> engine -> models -> kernels, nothing imports upward, no cycles.

Every import counts, wherever it is written (module top, inside a function, under TYPE_CHECKING): each is a
dependency a reader has to follow. The shared leaves (the package's __init__, config, errors, protocol, data) may be
imported from any layer and import only each other.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LAYERS = ["embedserve.cli", "embedserve.http", "embedserve.engine", "embedserve.models", "embedserve.kernels"]
LEAVES = ["embedserve", "embedserve.config", "embedserve.errors", "embedserve.protocol", "embedserve.data"]


def modules() -> dict[str, Path]:
    """Module name -> file, as installed (the top-level kernels/ is embedserve.kernels)."""
    found = {}
    for base, prefix in ((ROOT / "embedserve", "embedserve"), (ROOT / "kernels", "embedserve.kernels")):
        for path in base.rglob("*.py"):
            parts = list(path.relative_to(base).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join([prefix, *parts])] = path
    return found


def imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The package's modules that ``name`` imports."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package, up level - 1
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            # `from package import module` names the module; `from module import name` the module
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:  # `import a.b.c` of a name inside a module
                target = target.rpartition(".")[0]
            if target and target != name:
                out.add(target)
    return out


def rank(module: str) -> int:
    if module in LEAVES or any(module.startswith(leaf + ".") for leaf in LEAVES[1:]):
        return len(LAYERS)
    if module == "embedserve.__main__":
        return 0
    for i, layer in enumerate(LAYERS):
        if module == layer or module.startswith(layer + "."):
            return i
    raise AssertionError(f"{module} belongs to no layer: add it to LAYERS or LEAVES")


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports(name, path, known) for name, path in known.items()}


def test_nothing_imports_upward():
    upward = [f"{a} -> {b}" for a, targets in sorted(graph().items()) for b in sorted(targets) if rank(a) > rank(b)]
    assert not upward, "imports against http -> engine -> models -> kernels:\n" + "\n".join(upward)


def test_no_import_cycles():
    edges = graph()
    cycles, state = [], {}  # state: 1 on the current path, 2 done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(path[path.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for start in sorted(edges):
        if start not in state:
            visit(start, [start])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_the_walk_sees_the_imports_it_must():
    # The checks above are only as good as the graph: known edges of each kind are in it.
    edges = graph()
    assert "embedserve.engine.fleet" in edges["embedserve.http.app"]  # inside a function
    assert "embedserve.kernels.attention" in edges["embedserve.models.llama"]  # kernels/ mapped under embedserve
    assert "embedserve.engine.cpu" in edges["embedserve.engine.loading"]  # `from package import module as x`
    assert rank("embedserve.http.routes") < rank("embedserve.engine.front") < rank("embedserve.models.bert")


def engine_uses(path: Path) -> set[str]:
    """The attributes a module reads off a name ``engine`` or an attribute ``.engine`` (``svc.engine``; not
    ``config.engine``, the configuration's section)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Attribute):
            v = node.value
            if isinstance(v, ast.Name) and v.id == "engine":
                found.add(node.attr)
            elif isinstance(v, ast.Attribute) and v.attr == "engine" and not (
                    isinstance(v.value, ast.Name) and v.value.id == "config"):
                found.add(node.attr)
    return found


def test_the_http_layer_uses_only_the_declared_engine_interface():
    from embedserve.engine.interface import ServedEngine

    declared = {n for n in vars(ServedEngine) if not n.startswith("_")} | set(ServedEngine.__annotations__)
    http = sorted((ROOT / "embedserve" / "http").glob("*.py"))
    used = {path.stem: engine_uses(path) - declared for path in http}
    assert not any(used.values()), {k: v for k, v in used.items() if v}
    # The walk sees what it must: the routes read the info and call embed.
    assert {"info", "embed"} <= engine_uses(ROOT / "embedserve" / "http" / "routes.py")
