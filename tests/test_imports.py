"""The library's modules import each other without a cycle (any relative import counts: at the top, inside a
function or under ``TYPE_CHECKING``); a package importing its own submodules is not a cycle."""
import ast

from .notebook_code import ROOT


def _imports() -> dict[str, set[str]]:
    graph = {}
    for path in (ROOT / "moe_lab").rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        module = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        package = module if parts[-1] == "__init__" else module.rsplit(".", 1)[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + [node.module or ""])
                targets |= {base.rstrip(".")} | {f"{base.rstrip('.')}.{alias.name}" for alias in node.names}
        graph[module] = targets
    return {m: {t for t in targets if t in graph and not t.startswith(m + ".") and not m.startswith(t + ".")
                and t != m} for m, targets in graph.items()}


def test_no_import_cycle_in_the_library():
    graph, state, cycles = _imports(), {}, []

    def visit(module, path):
        state[module] = "open"
        for target in sorted(graph[module]):
            if state.get(target) == "open":
                cycles.append(" -> ".join(path[path.index(target):] + [target]))
            elif target not in state:
                visit(target, path + [target])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert graph["moe_lab.train"] >= {"moe_lab.hooks", "moe_lab.model"}  # the graph is read
    assert not cycles, "import cycles: " + "; ".join(cycles)
