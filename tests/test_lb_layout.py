"""lb's layout, as issue 29 set it: no module over 450 lines, and no import
circle among lb's modules, counting the imports made for annotations only
(``if TYPE_CHECKING:``): a circle there is a circle in the design."""

from __future__ import annotations

import ast
from pathlib import Path

LB = Path(__file__).resolve().parent.parent / "lb"
MAX_LINES = 450


def lb_imports(path: Path) -> set[str]:
    """The lb modules ``path`` imports, wherever the import statement is."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1 and node.module:
                found.add(node.module.split(".")[0])
            elif node.level == 1:
                found.update(alias.name for alias in node.names)
            elif node.module and node.module.startswith("lb."):
                found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names if a.name.startswith("lb."))
    return found


def graph() -> dict[str, set[str]]:
    modules = {p.stem: p for p in LB.glob("*.py")}
    return {name: lb_imports(path) & modules.keys() for name, path in modules.items()}


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_circle_among_lb_modules() -> None:
    cycle = find_cycle(graph())
    assert cycle is None, " -> ".join(cycle or [])


def test_the_cycle_finder_finds_one() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_no_lb_module_over_450_lines() -> None:
    sizes = {p.name: len(p.read_text().splitlines()) for p in LB.glob("*.py")}
    assert {name: n for name, n in sizes.items() if n > MAX_LINES} == {}
