"""The shape of the code: imports flow one way (no cycles, no import hidden in a function to dodge one),
no source file over 400 lines, and the repository stands alone (no reference to files outside it)."""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "backsmooth"
MAX_LINES = 400


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, modules: set[str]) -> tuple[set[str], list[str]]:
    """(backsmooth modules imported at module level, imports found inside functions)."""
    tree = ast.parse(path.read_text())
    top, nested = set(), []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("backsmooth"):
            names = {f"{node.module}.{a.name}" for a in node.names} | {node.module}
        elif isinstance(node, ast.Import):
            names = {a.name for a in node.names if a.name.startswith("backsmooth")}
        else:
            continue
        found = {n for n in names if n in modules}
        if not found:
            continue
        if node.col_offset == 0:
            top |= found
        else:
            nested.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    return top, nested


def test_no_import_cycles_and_no_function_level_imports():
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph, nested = {}, []
    for name, path in files.items():
        graph[name], inner = _imports(path, set(files))
        graph[name].discard(name)
        nested += inner
    assert nested == [], f"imports inside functions: {nested}"
    state: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for child in sorted(graph[node]):
            if state.get(child) == 1:
                raise AssertionError(f"import cycle: {' -> '.join(stack[stack.index(child):] + [child])}")
            if child not in state:
                visit(child, stack + [child])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])


def test_no_source_file_over_the_limit():
    long = {str(p.relative_to(ROOT)): n for p in PACKAGE.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert long == {}


def test_the_repository_stands_alone():
    """No citation of the design notes the project grew from, and no path outside the repository."""
    outside = re.compile(r"DESIGN(\.md| section)|\.\./shared|/work/shared")
    texts = [*PACKAGE.rglob("*.py"), ROOT / "README.md", *(ROOT / "docs").glob("*.md"), *(ROOT / "docs").rglob("*.md")]
    hits = [f"{p.relative_to(ROOT)}:{i}" for p in set(texts) for i, line in enumerate(p.read_text().splitlines(), 1)
            if outside.search(line)]
    assert hits == []
