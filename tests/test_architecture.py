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


MAX_TOP_LEVEL = 12


def _layers() -> dict[str, int]:
    """The layer of each top-level module or package, read from the diagram in docs/extending.md."""
    text = (ROOT / "docs" / "extending.md").read_text()
    block = text.split("## How the code is layered", 1)[1].split("\n\n")[2]
    layers: dict[str, int] = {}
    for depth, line in enumerate(block.strip().splitlines()):
        for name in line.strip().removeprefix("->").split(","):
            layers[name.strip()] = depth
    return layers


def _unit(module: str) -> str:
    """The top-level module or package a module belongs to (backsmooth.training.state -> training)."""
    return module.split(".")[1]


def test_the_layering_diagram_matches_the_imports():
    layers = _layers()
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py") if p != PACKAGE / "__init__.py"}
    units = {_unit(name) for name in files}
    assert units == set(layers), f"diagram and package differ: {sorted(units ^ set(layers))}"
    upward = []
    for name, path in files.items():
        for imported in _imports(path, set(files) | {"backsmooth"})[0] - {"backsmooth"}:
            source, target = _unit(name), _unit(imported)
            if source != target and layers[target] >= layers[source]:
                upward.append(f"{name} imports {imported}")
    assert upward == [], f"imports against the diagram in docs/extending.md: {upward}"


def test_few_modules_at_the_top_level():
    top = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(top) <= MAX_TOP_LEVEL, f"{len(top)} modules at the top level of src/backsmooth: {top}"
