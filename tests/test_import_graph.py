"""The modules of ``octseg.tasks`` and ``octseg.flows`` import each other without a cycle, through public names,
in the direction of the layers (flows -> tasks -> unet), counting imports inside functions too."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"tasks": "octseg.tasks", "flows": "octseg.flows", "unet": "octseg.unet"}


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = [PACKAGES[rel.parts[0]], *rel.parts[1:]]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for folder in PACKAGES for p in (ROOT / folder).rglob("*.py")}


def imports(module: str) -> list[tuple[str, list[str], int]]:
    """(imported octseg module, names taken from it, line) for every import statement of ``module``."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(a.name, [], node.lineno) for a in node.names if a.name.startswith("octseg.")]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            if base.startswith("octseg."):
                found.append((base, [a.name for a in node.names], node.lineno))
    return found


def edges() -> dict[str, set[str]]:
    """Module -> the octseg modules it imports (``from pkg import module`` is an edge to that module)."""
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    for module in MODULES:
        for target, names, _ in imports(module):
            submodules = {f"{target}.{n}" for n in names if f"{target}.{n}" in MODULES}
            graph[module] |= submodules or ({target} if target in MODULES else set())
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = 2
        path.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_graph_is_built_from_the_real_tree() -> None:
    graph = edges()
    assert "octseg.tasks.readers.registry" in graph["octseg.tasks.ingest.source"]
    assert "octseg.tasks.readers.dicom" in graph["octseg.tasks.readers.registry"]  # from pkg import module
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_no_import_cycle_in_tasks_and_flows() -> None:
    assert find_cycle(edges()) is None


def test_no_module_imports_another_modules_underscore_names() -> None:
    private = [f"{MODULES[m].relative_to(ROOT)}:{line} imports {n} from {target}"
               for m in MODULES for target, names, line in imports(m)
               for n in names if n.startswith("_") and not n.startswith("__")]
    assert private == []


def test_layers_point_down() -> None:
    """flows -> tasks -> unet: tasks never import flows; unet imports neither."""
    upward = [f"{m} imports {target}" for m in MODULES for target, _, _ in imports(m)
              if (m.startswith("octseg.tasks") and target.startswith("octseg.flows"))
              or (m.startswith("octseg.unet") and target.startswith(("octseg.tasks", "octseg.flows")))]
    assert upward == []
