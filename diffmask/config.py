"""Where the configs are, and what every stage's config needs.

What they need is the ``${len:...}`` resolver (:func:`register_resolvers`) and the run-only
settings (:data:`RUN_ONLY_SETTINGS`).

The configs live in ``conf/`` at the top of the checkout; ``diffmask/conf`` points there, so that an
editable install reads the checkout's files and a wheel (``pip install .``) carries a copy of them
inside the package. Either way :data:`CONFIG_PATH` is the folder Hydra composes from.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

__all__ = ["CONFIG_PATH", "RUN_ONLY_SETTINGS", "register_resolvers"]

CONFIG_PATH = str(Path(__file__).resolve().parent / "conf")

# settings that do not change a stage's result: where logs go, how it is shown, how it is parallelised
RUN_ONLY_SETTINGS = (
    "force", "paths", "hydra", "logger", "trainer", "tags", "data.num_workers", "num_workers", "ckpt_path",
)


def register_resolvers() -> None:
    """Register the OmegaConf resolver the configs use: ``${len:<list>}``, the length of a list."""
    if not OmegaConf.has_resolver("len"):
        OmegaConf.register_new_resolver("len", lambda x: len(x))


register_resolvers()
