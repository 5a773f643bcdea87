"""Chest X-rays: everything in diffmask that is specific to chest radiographs (JSRT/SCR).

Only the chest datasets (``data=jsrt|phantom|auto``, whose facts are ``conf/data/base/chest.yaml``)
and the chest features (``prompts=anatomy_pathology``, ``data/augment=strong``'s ``extra``, the CTR check
of ``diffmask-evaluate-synthesis``) use this package. The generic packages (data, prompts, labels,
the stages) take class names and prompts from the dataset config; where they serve a chest feature
(a burn-in augmentation, an anatomy-pathology model's saved builder) they import it on use.

* :mod:`~diffmask.domains.chest.labels` — :data:`CHEST_CLASS_NAMES` (SCR, patient's side);
* :mod:`~diffmask.domains.chest.prompt` — :data:`CHEST_PROMPT`, :data:`SEX_WORDS` (JSRT's sex
  values as words, the one mapping), :func:`chest_prompt_builder`;
* :mod:`~diffmask.domains.chest.sources` — :class:`JSRTSource`, :class:`PhantomSource`,
  :func:`draw_phantom`, :func:`auto_source`;
* :mod:`~diffmask.domains.chest.anatomy` — mask measures (cardiothoracic ratio, lung volume and
  symmetry, heart position), findings, the anatomy-pathology reports, the CTR error;
* :mod:`~diffmask.domains.chest.transforms` — :class:`RandBurnInd` (film markers; loaded on first
  use, it needs MONAI).
"""

from diffmask.domains.chest.anatomy import (
    AnatomyPathologyPrompts,
    FindingRules,
    FindingsSource,
    MaskMeasures,
    anatomy_report,
    ctr_error,
    derive_findings,
    measure_mask,
)
from diffmask.domains.chest.labels import CHEST_CLASS_NAMES
from diffmask.domains.chest.prompt import CHEST_PROMPT, SEX_WORDS, chest_prompt_builder
from diffmask.domains.chest.sources import JSRTSource, PhantomSource, auto_source, draw_phantom

__all__ = [
    "CHEST_CLASS_NAMES",
    "CHEST_PROMPT",
    "SEX_WORDS",
    "chest_prompt_builder",
    "JSRTSource",
    "PhantomSource",
    "auto_source",
    "draw_phantom",
    "AnatomyPathologyPrompts",
    "FindingRules",
    "FindingsSource",
    "MaskMeasures",
    "anatomy_report",
    "ctr_error",
    "derive_findings",
    "measure_mask",
    "RandBurnInd",
]


def __getattr__(name: str):
    if name == "RandBurnInd":  # MONAI only when asked for
        from diffmask.domains.chest.transforms import RandBurnInd

        return RandBurnInd
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
