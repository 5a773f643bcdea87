"""Imports only run downwards: the layers of docs/ARCHITECTURE.md, checked on every module of the package.

A module may import from its own layer or a lower one, never from a higher one (checked with ``ast``; imports
inside functions count too).
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "diffmask"
# lowest first; a module's layer is the first rule its dotted name matches
LAYERS = (
    ("foundations", ("diffmask", "diffmask.artifacts", "diffmask.config", "diffmask.labels",
                     "diffmask.seeds")),
    ("building blocks", ("diffmask.data", "diffmask.prompts", "diffmask.attention")),
    ("domains", ("diffmask.domains",)),
    ("models and algorithms", ("diffmask.autoencoder", "diffmask.codebook", "diffmask.diffusion",
                               "diffmask.control", "diffmask.refine", "diffmask.synthesis",
                               "diffmask.segmentation", "diffmask.evaluation")),
    ("stage runs", ("diffmask.stages", "*.stage", "*_stage")),
    ("pipeline", ("diffmask.pipeline",)),
    ("entry points", ("diffmask.cli",)),
)


def module_name(path: Path) -> str:
    """The dotted name of a module file of the package."""
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer(name: str) -> int:
    """The layer index of a dotted module name (higher = closer to the user)."""
    found = 0
    for index, (_, rules) in enumerate(LAYERS):
        for rule in rules:
            if rule.startswith("*"):
                hit = name.endswith(rule[1:]) and name.count(".") >= 2
            else:
                hit = name == rule or (rule != "diffmask" and name.startswith(rule + "."))
            if hit:
                found = max(found, index)
    return found


def imports(path: Path) -> list[tuple[int, str]]:
    """(line, dotted module) of every diffmask import in a file, relative imports resolved."""
    here = module_name(path).split(".")
    if path.name != "__init__.py":
        here = here[:-1]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "diffmask"]
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(here[:len(here) - node.level + 1]) if node.level else ""
            module = ".".join(p for p in (base, node.module or "") if p)
            if module.split(".")[0] == "diffmask":
                found.append((node.lineno, module))
    return found


def test_layer_rules_place_known_modules():
    assert LAYERS[layer("diffmask.data.datamodule")][0] == "building blocks"
    assert LAYERS[layer("diffmask.domains.chest.sources")][0] == "domains"
    assert LAYERS[layer("diffmask.segmentation.stage")][0] == "stage runs"
    assert LAYERS[layer("diffmask.refine.remask_stage")][0] == "stage runs"
    assert LAYERS[layer("diffmask.cli.train")][0] == "entry points"
    assert layer("diffmask.config") == 0


def test_imports_only_run_downwards():
    upward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if "conf" in path.relative_to(PACKAGE).parts:
            continue
        source = module_name(path)
        for line, target in imports(path):
            if layer(target) > layer(source):
                upward.append(f"diffmask/{path.relative_to(PACKAGE)}:{line} {source} "
                              f"({LAYERS[layer(source)][0]}) imports {target} ({LAYERS[layer(target)][0]})")
    assert not upward, "imports that run upwards (docs/ARCHITECTURE.md, Layers):\n" + "\n".join(upward)
