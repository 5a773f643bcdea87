"""The entry points stay thin: short functions, packages that never import an entry point."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "diffmask"
# every entry point
THIN = tuple(sorted(p.stem for p in (PACKAGE / "cli").glob("*.py") if p.stem != "__init__"))
ARGPARSE = ("compare", "report", "fidelity", "evaluate_synthesis")
MAX_LINES = 40


def _functions(path: Path) -> list[tuple[str, int]]:
    tree = ast.parse(path.read_text())
    return [(node.name, node.end_lineno - node.lineno + 1) for node in ast.walk(tree)
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)]


@pytest.mark.parametrize("name", THIN)
def test_entry_point_functions_are_short(name):
    long = [(f, n) for f, n in _functions(PACKAGE / "cli" / f"{name}.py") if n >= MAX_LINES]
    assert not long, (
        f"diffmask/cli/{name}.py: functions of {MAX_LINES}+ lines {long}; move the logic to its package"
    )


def test_no_package_imports_an_entry_point():
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        if "cli" in path.relative_to(PACKAGE).parts:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            if any(n == "diffmask.cli" or n.startswith("diffmask.cli.") for n in names):
                offenders.append(str(path.relative_to(PACKAGE)))
    assert not offenders, f"packages import diffmask.cli (move what they need below it): {offenders}"


@pytest.mark.parametrize("name", ARGPARSE)
def test_argparse_entry_points_say_why(name):
    doc = ast.get_docstring(ast.parse((PACKAGE / "cli" / f"{name}.py").read_text()))
    assert "Why argparse, not Hydra" in doc
