"""The layer rules of docs/architecture.md, checked on every module's imports (those inside functions included).

models < common < client | server < simulations < fedfusion (the CLI). A package imports only packages below it;
client and server never import each other. bench/ and tests/ may import anything.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

#: package -> the project packages it may import (besides itself)
ALLOWED: dict[str, set[str]] = {
    "models": set(),
    "common": {"models"},
    "client": {"models", "common"},
    "server": {"models", "common"},
    "simulations": {"models", "common", "client", "server"},
    "fedfusion": {"models", "common", "client", "server", "simulations"},
}


def import_edges(package: str, root: Path = ROOT) -> list[tuple[str, int, str]]:
    """``(file, line, imported module)`` for every import of a project package in ``package``'s modules."""
    edges = []
    for py in sorted((root / package).rglob("*.py")):
        tree = ast.parse(py.read_text(encoding="utf-8"), filename=str(py))
        for node in ast.walk(tree):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            for name in names:
                if name.split(".")[0] in ALLOWED:
                    edges.append((str(py.relative_to(root)), node.lineno, name))
    return edges


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_imports_only_point_down(package: str) -> None:
    bad = [f"{f}:{line} imports {name}" for f, line, name in import_edges(package)
           if name.split(".")[0] not in ALLOWED[package] | {package}]
    assert not bad, f"{package} may import only {sorted(ALLOWED[package])}:\n" + "\n".join(bad)


def test_the_checker_sees_imports_inside_functions(tmp_path: Path) -> None:
    """The rule would be void if an import hidden in a function body (a lazy import) went unseen."""
    (tmp_path / "client").mkdir()
    (tmp_path / "client" / "sneaky.py").write_text(
        "import json\n\ndef f():\n    from server.strategy import build_strategy\n    import simulations\n"
        "    return build_strategy\n")
    assert import_edges("client", tmp_path) == [("client/sneaky.py", 4, "server.strategy"),
                                                ("client/sneaky.py", 5, "simulations")]


def test_every_project_package_has_a_rule() -> None:
    packages = {p.parent.name for p in ROOT.glob("*/__init__.py")} - {"tests"}
    assert packages == set(ALLOWED), f"packages without a layer rule: {packages ^ set(ALLOWED)}"
