"""Imports go one way: scripts import modules; modules never import scripts; no cycles.

Read from the source with `ast`, so the test sees every import, including
those inside functions.
"""

import ast
from pathlib import Path

from conftest import ROOT

SCRIPTS = {"train", "infer", "eval"}  # data/download.py and bench/*.py are scripts too; nothing imports them


def project_modules() -> dict[str, Path]:
    return {p.stem: p for p in ROOT.glob("*.py")}


def imports_of(path: Path, known: set[str]) -> set[str]:
    """The project modules a file imports, anywhere in it."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found & known


def graph() -> dict[str, set[str]]:
    files = project_modules()
    return {name: imports_of(path, set(files)) - {name} for name, path in files.items()}


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """A cycle as a list of names (first == last), or None."""
    state: dict[str, str] = {}

    def visit(node, path):
        state[node] = "open"
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == "open":
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt, path + [nxt])):
                return cycle
        state[node] = "done"
        return None

    for start in sorted(edges):
        if start not in state and (cycle := visit(start, [start])):
            return cycle
    return None


def test_no_module_imports_a_script():
    bad = {m: sorted(deps & SCRIPTS) for m, deps in graph().items() if m not in SCRIPTS and deps & SCRIPTS}
    assert not bad, f"modules importing scripts: {bad}"


def test_scripts_do_not_import_each_other():
    bad = {s: sorted(deps & SCRIPTS) for s, deps in graph().items() if s in SCRIPTS and deps & SCRIPTS}
    assert not bad, f"scripts importing scripts: {bad}"


def test_download_script_imports_only_modules():
    assert not imports_of(ROOT / "data" / "download.py", set(project_modules())) & SCRIPTS


def test_there_is_no_import_cycle():
    assert find_cycle(graph()) is None, find_cycle(graph())


def test_the_cycle_finder_finds_cycles():
    """The checks above can fail: a two-module and a three-module cycle are found."""
    assert find_cycle({"a": {"b"}, "b": {"a"}}) == ["a", "b", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
