"""The chest domain package: chest-only code lives in diffmask.domains.chest and nowhere in the
generic packages, and the chest configs reach it."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest
from hydra.utils import get_object, instantiate
from omegaconf import OmegaConf

import diffmask.data
import diffmask.data.sources
import diffmask.data.transforms
import diffmask.labels
import diffmask.prompts
import diffmask.prompts.builder
from diffmask.config import CONFIG_PATH
from diffmask.domains import chest
from diffmask.domains.chest import CHEST_CLASS_NAMES, SEX_WORDS, PhantomSource, chest_prompt_builder
from diffmask.domains.recorded import prompt_builder_from_dict
from diffmask.prompts import PromptBuilder
from tests.conftest import compose_config

PACKAGE = Path(diffmask.__file__).parent
GENERIC = [
    PACKAGE / "labels.py",
    *sorted((PACKAGE / "data").glob("*.py")),
    *sorted((PACKAGE / "prompts").glob("*.py")),
]
CHEST_NAMES = {
    "DEFAULT_CLASS_NAMES", "CHEST_CLASS_NAMES", "SCR_CLASS_NAMES", "DEFAULT_TEMPLATES", "DEFAULT_MODALITY",
    "DEFAULT_FIELDS", "CHEST_PROMPT", "SEX_WORDS", "JSRTSource", "PhantomSource", "draw_phantom",
    "auto_source", "RandBurnInd", "AnatomyPathologyPrompts", "FindingRules", "FindingsSource", "measure_mask",
    "derive_findings",
}


def _module_level(tree: ast.Module) -> tuple[set[str], list[str]]:
    """Names a module defines or imports at its top level, and the modules it imports there."""
    names, modules = set(), []
    for node in tree.body:
        if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {t.id for t in targets if isinstance(t, ast.Name)}
        elif isinstance(node, ast.ImportFrom):
            modules.append(node.module or "")
            names |= {a.asname or a.name for a in node.names}
        elif isinstance(node, ast.Import):
            modules += [a.name for a in node.names]
    return names, modules


@pytest.mark.parametrize("path", GENERIC, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_generic_modules_neither_define_nor_import_chest_names(path):
    names, modules = _module_level(ast.parse(path.read_text()))
    assert not names & CHEST_NAMES
    # the chest package is imported only where a chest feature is used (inside a function)
    assert not [m for m in modules if m.startswith("diffmask.domains")]


def test_generic_packages_export_no_chest_names():
    for module in (diffmask.data, diffmask.data.sources, diffmask.data.transforms, diffmask.labels,
                   diffmask.prompts, diffmask.prompts.builder):
        assert not [n for n in CHEST_NAMES if hasattr(module, n)], module.__name__
    assert {"CHEST_CLASS_NAMES", "CHEST_PROMPT", "PhantomSource", "RandBurnInd"} <= set(chest.__all__)
    assert chest.RandBurnInd.__module__ == "diffmask.domains.chest.transforms"


def test_the_sex_words_are_defined_once():
    """JSRT's sex values as words: one mapping (diffmask.domains.chest.prompt), no copies elsewhere."""
    copies = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Dict):
                continue
            if {"female", "f"} <= {k.value for k in node.keys if isinstance(k, ast.Constant)}:
                copies.append(str(path.relative_to(PACKAGE)))
    assert copies == ["domains/chest/prompt.py"]
    assert SEX_WORDS["f"] == "female" and chest_prompt_builder().fields["sex"]["words"] == SEX_WORDS


def test_the_generic_builder_needs_a_dataset_prompt():
    with pytest.raises(TypeError):
        PromptBuilder()
    scan = PromptBuilder(["{modality} showing the {classes}"], ["background", "lesion"], "a scan")
    assert scan.build({"sex": "M"}).text == "a scan showing the lesion" and scan.fields == {}


def test_the_chest_config_block_says_what_the_chest_package_says():
    cfg = OmegaConf.load(f"{CONFIG_PATH}/data/base/chest.yaml")
    assert tuple(cfg.class_names) == CHEST_CLASS_NAMES
    from_config = PromptBuilder(**OmegaConf.to_container(cfg.prompt), class_names=list(cfg.class_names))
    assert from_config.to_dict() == chest_prompt_builder().to_dict()


def test_chest_configs_reach_the_chest_package(tmp_path):
    cfg = compose_config("train", ["data=phantom", "data.size=32"], tmp_path)
    source = instantiate(cfg.data.real)
    assert isinstance(source, PhantomSource) and source.class_names == CHEST_CLASS_NAMES
    sample = source.load(source.ids("train")[0])
    assert sample.image.shape == (32, 32) and set(np.unique(sample.label).tolist()) == {0, 1, 2, 3}
    for data in ("jsrt", "auto"):
        target = compose_config("train", [f"data={data}"], tmp_path).data.real._target_
        assert target.startswith("diffmask.domains.chest.") and callable(get_object(target))
    anatomy = OmegaConf.load(f"{CONFIG_PATH}/prompts/anatomy_pathology.yaml")._target_
    assert get_object(anatomy) is chest.AnatomyPathologyPrompts


def test_a_model_saved_before_dataset_prompts_reads_as_the_chest_prompt():
    legacy = {
        "templates": ["a chest x-ray of a {age} {sex}, {finding}, showing the {classes}"],
        "class_names": list(CHEST_CLASS_NAMES),
        "neutral": {
            "sex": "patient",
            "age": "adult",
            "finding": "unspecified finding",
            "diagnosis": "unknown diagnosis",
        },
        "sex_words": {"m": "male", "f": "female"},
        "age_format": "{age} year old",
        "class_joiner": ", ",
        "class_last_joiner": " and ",
        "known_values": None,
    }
    builder = prompt_builder_from_dict(legacy)
    assert builder.modality == "a chest x-ray"
    assert builder.build({"sex": "M", "age": "53", "finding": "lung nodule"}).text == (
        "a chest x-ray of a 53 year old male, lung nodule, showing the left lung, right lung and heart"
    )
