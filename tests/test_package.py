"""The helper package's shape: no import cycle, the world-building tools apart, no block of code written twice."""

import ast
import re
from collections import defaultdict
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "compinv_utils"
BUILDING = "compinv_utils.worldbuilding"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every compinv_utils module ``path`` imports, at the top or inside a function."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("compinv_utils")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if not mod.startswith("compinv_utils"):
                continue
            for a in node.names:  # `from . import world` imports the module compinv_utils.world
                sub = f"{mod}.{a.name}"
                out.add(sub if (PACKAGE.parent / (sub.replace(".", "/") + ".py")).exists()
                        or (PACKAGE.parent / sub.replace(".", "/")).is_dir() else mod)
    return out - {name}


def _graph() -> dict[str, set[str]]:
    return {_module_name(p): _imports(p) for p in PACKAGE.rglob("*.py")}


def test_no_helper_imports_the_world_building_tools():
    bad = {m: sorted(i for i in deps if i.startswith(BUILDING))
           for m, deps in _graph().items() if not m.startswith(BUILDING)}
    assert not {m: d for m, d in bad.items() if d}


def test_the_package_has_no_import_cycle():
    graph = _graph()
    # a package's __init__ importing its own modules is not a cycle of ideas; leave those edges out
    graph = {m: {d for d in deps if not (m + ".").startswith(d + ".")} for m, deps in graph.items()}
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        path.append(m)
        for d in sorted(graph.get(m, ())):
            if state.get(d) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(d):] + [d]))
            if d not in state:
                visit(d)
        path.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


def _normalised_lines(path: Path) -> list[tuple[int, str]]:
    """The code lines of ``path`` that carry meaning, stripped: no blanks, comments, docstring-only lines, imports
    or lone brackets."""
    out = []
    for k, line in enumerate(path.read_text().splitlines(), 1):
        s = line.strip()
        if not s or s.startswith(("#", "from ", "import ", '"""', "@")) or re.fullmatch(r"[\)\]\}:,]+", s):
            continue
        out.append((k, s))
    return out


def test_no_block_of_six_lines_is_written_twice():
    seen: dict[tuple[str, ...], tuple[str, int]] = {}
    repeats = []
    for path in sorted(PACKAGE.rglob("*.py")):
        lines = _normalised_lines(path)
        for i in range(len(lines) - 5):
            block = tuple(s for _, s in lines[i:i + 6])
            where = (str(path.relative_to(PACKAGE.parent)), lines[i][0])
            if block in seen and seen[block] != where:
                repeats.append(f"{where[0]}:{where[1]} repeats {seen[block][0]}:{seen[block][1]}")
            seen.setdefault(block, where)
    assert not repeats, "\n".join(repeats)
