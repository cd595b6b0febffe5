"""The house rules of spotsafe/, checked on every run of the suite (docs/design.md, "The package map").

A newcomer should read the package in an afternoon; these rules keep it so:
no import circle (imports inside functions count), no module over 800 lines, no function
over 100, no private name imported from another module, and at most six blocks of six or
more repeated lines. The package layers (what may import what) are import-linter's contract
in pyproject.toml, run here too.
"""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
import sys
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "spotsafe"

MAX_MODULE_LINES = 800
MAX_FUNCTION_LINES = 100
DUPLICATE_MIN_LINES = 6
MAX_DUPLICATE_BLOCKS = 6


@dataclass
class Module:
    name: str
    path: Path
    tree: ast.Module
    lines: int
    imports: set[str] = field(default_factory=set)


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Module]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        text = path.read_text()
        found[_module_name(path)] = Module(_module_name(path), path, ast.parse(text, str(path)), len(text.splitlines()))
    return found


def _owner(name: str, modules: dict[str, Module]) -> str:
    """The module that ``name`` (a module, or a name inside one) belongs to."""
    while name not in modules and "." in name:
        name = name.rsplit(".", 1)[0]
    return name


def _imported(module: Module, modules: dict[str, Module]) -> Iterator[tuple[str, str | None]]:
    """(module imported, name taken from it or None) for every spotsafe import, function bodies included."""
    package = module.name if module.path.name == "__init__.py" else module.name.rpartition(".")[0]
    for node in ast.walk(module.tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "spotsafe":
                    yield _owner(alias.name, modules), None
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            if base.split(".")[0] != "spotsafe":
                continue
            for alias in node.names:
                full = f"{base}.{alias.name}"
                if full in modules:
                    yield full, None
                else:
                    yield _owner(base, modules), alias.name


@pytest.fixture(scope="module")
def modules() -> dict[str, Module]:
    found = _modules()
    for module in found.values():
        module.imports = {target for target, _ in _imported(module, found) if target != module.name}
    return found


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in graph:
                    continue
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_the_checker_finds_a_cycle() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_circle(modules: dict[str, Module]) -> None:
    graph = {name: module.imports for name, module in modules.items()}
    assert _cycles(graph) == []


def test_no_module_over_800_lines(modules: dict[str, Module]) -> None:
    big = {name: m.lines for name, m in modules.items() if m.lines > MAX_MODULE_LINES}
    assert big == {}


def test_no_function_over_100_lines(modules: dict[str, Module]) -> None:
    long = {
        f"{name}:{node.lineno} {node.name}": (node.end_lineno or node.lineno) - node.lineno + 1
        for name, m in modules.items()
        for node in ast.walk(m.tree)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        and (node.end_lineno or node.lineno) - node.lineno + 1 > MAX_FUNCTION_LINES
    }
    assert long == {}


def test_no_private_name_imported_across_modules(modules: dict[str, Module]) -> None:
    private = sorted(
        f"{m.name} imports {target}.{name}"
        for m in modules.values()
        for target, name in _imported(m, modules)
        if name is not None and name.startswith("_") and not name.startswith("__") and target != m.name
    )
    assert private == []


def test_package_inits_only_document(modules: dict[str, Module]) -> None:
    """No re-exports: a name is imported from the module that defines it (the top package's lazy API aside)."""
    exporting = sorted(
        m.name
        for m in modules.values()
        if m.path.name == "__init__.py"
        and m.name != "spotsafe"
        and any(not isinstance(node, ast.Expr | ast.ImportFrom) or _is_reexport(node) for node in m.tree.body)
    )
    assert exporting == []


def _is_reexport(node: ast.stmt) -> bool:
    return isinstance(node, ast.ImportFrom) and node.module != "__future__"


# -- repeated code ---------------------------------------------------------------------------
_THIN = re.compile(r"^[\W_]*(\w+[\W_]*){0,2}$")  # a line of at most two words: `else:`, `return None`, `),`


def _code_lines(path: Path) -> list[tuple[int, str]]:
    """(line number, text with white space folded) of the lines that count.

    Not blanks, comments, imports, docstrings or function signatures (a keyword-only parameter list
    that a public class repeats on purpose is a declaration, not logic written twice).
    """
    text = path.read_text()
    docstring_lines: set[int] = set()  # and signatures: declarations, not logic
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            docstring_lines.update(range(node.lineno, node.body[0].lineno))
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr):
            value = body[0].value
            if isinstance(value, ast.Constant) and isinstance(value.value, str):
                docstring_lines.update(range(body[0].lineno, (body[0].end_lineno or body[0].lineno) + 1))
    kept = []
    for number, line in enumerate(text.splitlines(), 1):
        folded = " ".join(line.split())
        if not folded or folded.startswith("#") or number in docstring_lines:
            continue
        if folded.startswith(("import ", "from ")):
            continue
        kept.append((number, folded))
    return kept


def repeated_blocks(paths: list[Path], root: Path = PACKAGE.parent, min_lines: int = DUPLICATE_MIN_LINES) -> list[str]:
    """Each block of ``min_lines`` or more identical code lines that stands in two places, once per pair.

    A block most of whose lines are thin (at most two words: punctuation, ``else:``, ``return x``)
    is boilerplate and not counted.
    """
    places: dict[tuple[str, ...], list[tuple[Path, int]]] = defaultdict(list)
    lines_of = {path: _code_lines(path) for path in paths}
    for path, lines in lines_of.items():
        for i in range(len(lines) - min_lines + 1):
            window = tuple(text for _, text in lines[i : i + min_lines])
            if sum(1 for text in window if _THIN.match(text)) * 2 >= min_lines:
                continue
            places[window].append((path, i))
    pairs: dict[tuple[Path, Path], set[tuple[int, int]]] = defaultdict(set)
    for spots in places.values():
        for a in range(len(spots)):
            for b in range(a + 1, len(spots)):
                (pa, ia), (pb, ib) = spots[a], spots[b]
                if pa == pb and abs(ia - ib) < min_lines:
                    continue  # a run overlapping itself
                pairs[(pa, pb)].add((ia, ib))
    blocks = []
    for (pa, pb), starts in sorted(pairs.items()):
        previous = None
        for ia, ib in sorted(starts):
            if previous is not None and ia == previous[0] + 1 and ib == previous[1] + 1:
                previous = (ia, ib)
                continue  # the same block, one line further
            previous = (ia, ib)
            blocks.append(
                f"{pa.relative_to(root)}:{lines_of[pa][ia][0]} ~ {pb.relative_to(root)}:{lines_of[pb][ib][0]}"
            )
    return blocks


def test_the_repeat_finder_finds_a_copied_block(tmp_path: Path) -> None:
    body = "\n".join(f"    total = total + value_{i} * {i}" for i in range(7))
    (tmp_path / "a.py").write_text(f"def f(total):\n{body}\n    return total\n")
    (tmp_path / "b.py").write_text(f"import os\n\n\ndef g(total):\n    # a comment\n{body}\n    return os\n")
    thin = "def h(x):\n" + "\n".join("    return x" for _ in range(8)) + "\n"  # boilerplate: not counted
    (tmp_path / "c.py").write_text(thin)
    (tmp_path / "d.py").write_text(thin)
    blocks = repeated_blocks(sorted(tmp_path.glob("*.py")), root=tmp_path)
    assert blocks == ["a.py:2 ~ b.py:6"]


def test_at_most_six_repeated_blocks() -> None:
    blocks = repeated_blocks(sorted(PACKAGE.rglob("*.py")))
    listing = "\n".join(blocks)
    assert len(blocks) <= MAX_DUPLICATE_BLOCKS, f"{listing}"


# -- layers ------------------------------------------------------------------------------------
def test_the_layers_contract_holds() -> None:
    """pyproject.toml's [tool.importlinter] contracts: what each package may import."""
    lint = shutil.which("lint-imports")
    if lint is None:
        pytest.fail("lint-imports is not installed: pip install -e '.[dev]' installs import-linter")
    r = subprocess.run(
        [lint, "--no-cache"], cwd=PACKAGE.parent, capture_output=True, text=True, timeout=120, check=False
    )
    assert r.returncode == 0, f"{r.stdout + r.stderr}"


if __name__ == "__main__":  # a quick look without pytest: python tests/test_house.py
    for block in repeated_blocks(sorted(PACKAGE.rglob("*.py"))):
        print(block)
    sys.exit(0)
