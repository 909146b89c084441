"""Print the import graph between qsparse_compiler's layers and check that it has no cycle.

    python tools/import_graph.py [PACKAGE_DIR]        # default: qsparse_compiler/ next to this folder

A layer is a top-level subpackage or module of the package (``formats``, ``ops``, ``compiler``, ``config``, ``cli``,
...); ``qsparse_compiler/__init__.py`` is the public facade above all of them. Every ``import`` is read from the
source (no code runs), at module level and inside functions alike: an import deferred into a function still makes
its layer depend on the other one. For each layer the output lists the layers it imports (how many import
statements, how many of them inside functions), then:
- cycles: groups of layers that reach each other (strongly connected components);
- upward imports: a layer importing one that ``LAYERS`` puts above it;
- old paths: a module importing an old import path kept for users (``qsparse_compiler/_moved.py``).
Exit status 1 when any of the three is non-empty. Layers not in ``LAYERS`` (an older layout) are shown, not ranked.
"""

from __future__ import annotations

import argparse
import ast
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

PACKAGE = "qsparse_compiler"
FACADE = "(package)"
# Lowest first: a layer may import only layers before it. Layers on one line do not import each other.
LAYERS = [
    "formats",  # int4 storage format, block layout type, patterns and the pattern-spec registry; imports nothing here
    "kernels",  # Triton kernels
    "ops",  # qsparse:: ops (schema, fake, reference, CUDA kernel), the per-forward context the ops read
    "config",  # the backend's validated options
    "plan",  # a calibrated plan: schema, storage, what regional compilation asks of it
    "runtime",  # packed-weight and LoRA stores, residual-cache state, qs.optimize's pipeline driver
    "compiler",  # the torch.compile backend and its graph passes
    "calibration",  # produces plans
    "eval",  # fidelity, synthetic video, reference and tiny models
    "cli",
    FACADE,
]


@dataclass
class Edge:
    statements: int = 0
    in_function: int = 0
    examples: list[str] = field(default_factory=list)  # "file:line -> module"


@dataclass
class ImportGraph:
    edges: dict[tuple[str, str], Edge]
    layers: set[str]
    old_path_imports: list[str]

    def imports_of(self, layer: str) -> dict[str, Edge]:
        return {dst: edge for (src, dst), edge in sorted(self.edges.items()) if src == layer}

    def cycles(self) -> list[list[str]]:
        """Strongly connected components of more than one layer (Tarjan), each sorted."""
        succ: dict[str, list[str]] = defaultdict(list)
        for src, dst in self.edges:
            succ[src].append(dst)
        index: dict[str, int] = {}
        low: dict[str, int] = {}
        stack: list[str] = []
        on_stack: set[str] = set()
        found: list[list[str]] = []

        def visit(node: str) -> None:
            index[node] = low[node] = len(index)
            stack.append(node)
            on_stack.add(node)
            for nxt in succ[node]:
                if nxt not in index:
                    visit(nxt)
                    low[node] = min(low[node], low[nxt])
                elif nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
            if low[node] == index[node]:
                component = []
                while True:
                    top = stack.pop()
                    on_stack.discard(top)
                    component.append(top)
                    if top == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))

        for node in sorted(self.layers):
            if node not in index:
                visit(node)
        return sorted(found)

    def upward(self) -> list[tuple[str, str, Edge]]:
        """Imports from a ranked layer to a ranked layer above it."""
        rank = {layer: i for i, layer in enumerate(LAYERS)}
        return [(src, dst, edge) for (src, dst), edge in sorted(self.edges.items())
                if src in rank and dst in rank and rank[dst] > rank[src]]


def _module_name(path: Path, root: Path) -> tuple[str, bool]:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    is_package = parts[-1] == "__init__"
    if is_package:
        parts = parts[:-1]
    return ".".join(parts), is_package


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    base = module.split(".") if is_package else module.split(".")[:-1]
    if node.level > 1:
        base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else FACADE


def _targets(module: str, is_package: bool, node: ast.AST, known: set[str]) -> list[str]:
    """The package modules an import statement loads (``from . import ops`` loads the module ``ops``)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names if alias.name.split(".")[0] == PACKAGE]
    if not isinstance(node, ast.ImportFrom):
        return []
    target = _resolve(module, is_package, node) if node.level else (node.module or "")
    if target.split(".")[0] != PACKAGE:
        return []
    submodules = [f"{target}.{alias.name}" for alias in node.names if f"{target}.{alias.name}" in known]
    return submodules or [target]


def _function_imports(tree: ast.AST) -> set[int]:
    """ids of the import statements that sit inside a function."""
    inside: set[int] = set()
    for func in ast.walk(tree):
        if isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            inside.update(id(n) for n in ast.walk(func) if isinstance(n, (ast.Import, ast.ImportFrom)))
    return inside


def _old_paths(root: Path) -> set[str]:
    """The old import paths ``_moved.MOVED`` lists, and ``_moved`` itself (none in a layout without it)."""
    moved = root / "_moved.py"
    if not moved.exists():
        return set()
    for node in ast.walk(ast.parse(moved.read_text())):
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "MOVED" for t in node.targets):
            return set(ast.literal_eval(node.value)) | {f"{PACKAGE}._moved"}
    return set()


def _is_old(module: str, old_paths: set[str]) -> bool:
    return any(module == old or module.startswith(old + ".") for old in old_paths)


def build(root: Path) -> ImportGraph:
    """The layer graph of the package in ``root`` (its ``__init__.py`` folder)."""
    files = sorted(root.rglob("*.py"))
    modules = {path: _module_name(path, root) for path in files}
    known = {name for name, _ in modules.values()}
    old_paths = _old_paths(root)
    edges: dict[tuple[str, str], Edge] = defaultdict(Edge)
    layers: set[str] = set()
    old_path_imports = []
    for path, (module, is_package) in modules.items():
        source_layer = _layer(module)
        if _is_old(module, old_paths):
            continue
        layers.add(source_layer)
        tree = ast.parse(path.read_text(), filename=str(path))
        inside = _function_imports(tree)
        for node in ast.walk(tree):
            for target in _targets(module, is_package, node, known):
                where = f"{path.relative_to(root.parent)}:{node.lineno} -> {target}"
                if _is_old(target, old_paths):
                    old_path_imports.append(where)
                    continue
                target_layer = _layer(target)
                if target_layer == source_layer:
                    continue
                layers.add(target_layer)
                edge = edges[(source_layer, target_layer)]
                edge.statements += 1
                edge.in_function += id(node) in inside
                edge.examples.append(where)
    return ImportGraph(dict(edges), layers, sorted(old_path_imports))


def render(graph: ImportGraph) -> str:
    ranked = [layer for layer in LAYERS if layer in graph.layers]
    order = ranked + sorted(graph.layers - set(ranked))
    total = sum(edge.statements for edge in graph.edges.values())
    deferred = sum(edge.in_function for edge in graph.edges.values())
    lines = [f"{PACKAGE} layers, lowest first ({total} imports across layers, {deferred} of them inside functions)"]
    for layer in order:
        imports = graph.imports_of(layer)
        listed = ", ".join(
            f"{dst} ({edge.statements}" + (f", {edge.in_function} in functions)" if edge.in_function else ")")
            for dst, edge in sorted(imports.items(), key=lambda item: order.index(item[0]))
        )
        lines.append(f"  {layer:<12} -> {listed or '-'}")
    cycles = graph.cycles()
    lines.append(f"cycles: {len(cycles)}")
    lines += [f"  {' <-> '.join(cycle)}" for cycle in cycles]
    upward = graph.upward()
    lines.append(f"upward imports: {len(upward)}")
    for src, dst, edge in upward:
        lines += [f"  {src} -> {dst}: {where}" for where in edge.examples]
    lines.append(f"imports of old paths: {len(graph.old_path_imports)}")
    lines += [f"  {where}" for where in graph.old_path_imports]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("package_dir", nargs="?", type=Path,
                        default=Path(__file__).resolve().parent.parent / PACKAGE)
    args = parser.parse_args(argv)
    graph = build(args.package_dir)
    print(render(graph))
    return 1 if graph.cycles() or graph.upward() or graph.old_path_imports else 0


if __name__ == "__main__":
    sys.exit(main())
