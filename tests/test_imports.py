"""Imports go one way: the top-level scripts import the package `t5dialog`; the package never imports a
top-level module; no cycles inside the package.

Read from the source with `ast`, so the test sees every import, including those inside functions.
"""

import ast
from pathlib import Path

from conftest import ROOT

PACKAGE = "t5dialog"


def top_level_modules() -> set[str]:
    """train, infer, eval, dataset: what a user runs or imports from the project root."""
    return {p.stem for p in ROOT.glob("*.py")}


def package_modules() -> dict[str, Path]:
    """Dotted name -> file of every module in the package (t5dialog.models, t5dialog.serve.server, ...)."""
    return {".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): p
            for p in (ROOT / PACKAGE).rglob("*.py")}


def imports_of(path: Path) -> set[str]:
    """The dotted names a file imports, anywhere in it (``from a import b`` counts as a and a.b)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}: relative import; the package imports itself by its full name"
            found |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
    return found


def graph() -> dict[str, set[str]]:
    modules = package_modules()
    return {name: (imports_of(path) & set(modules)) - {name} for name, path in modules.items()}


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


def test_the_top_level_holds_only_the_scripts_and_the_dataset_module():
    assert top_level_modules() == {"train", "infer", "eval", "dataset"}


def test_the_package_never_imports_a_top_level_module():
    top = top_level_modules()
    bad = {name: sorted({i.split(".")[0] for i in imports_of(path)} & top) for name, path in package_modules().items()}
    assert not {name: mods for name, mods in bad.items() if mods}, f"package modules importing top-level modules: {bad}"


def test_scripts_do_not_import_each_other():
    scripts = {"train", "infer", "eval"}
    bad = {s: sorted({i.split(".")[0] for i in imports_of(ROOT / f"{s}.py")} & (scripts - {s})) for s in scripts}
    assert not any(bad.values()), f"scripts importing scripts: {bad}"


def test_the_download_script_imports_only_the_package():
    assert not {i.split(".")[0] for i in imports_of(ROOT / "data" / "download.py")} & top_level_modules()


def test_there_is_no_import_cycle_in_the_package():
    assert find_cycle(graph()) is None, find_cycle(graph())


def test_the_checks_can_fail():
    """The cycle finder finds a two- and a three-module cycle, and the import reader sees an import inside a function."""
    assert find_cycle({"a": {"b"}, "b": {"a"}}) == ["a", "b", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    assert "dataset" in imports_of(ROOT / "train.py")
    assert {"t5dialog.models"} <= set(graph()["t5dialog.generation"])
