"""How a generation run labels its samples: the ``synthesis`` group's mask maker, quality filter
and affinity pass (shared by the generate and remask stages)."""

from __future__ import annotations

from typing import Any

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

__all__ = ["build_synthesis", "affinity_device"]


def build_synthesis(syn: DictConfig | None) -> tuple[Any, Any, dict[str, Any] | None]:
    """(mask_maker, quality_filter, affinity pass settings) from the ``synthesis`` group.

    The affinity settings are keyword arguments of
    :func:`~diffmask.synthesis.affinity_pass.refine_with_affinity` (``refiner``, ``train_steps``,
    ``batch_size``, ``ignore_margin``); None when ``affinity`` is not in ``synthesis.refine``.

    Args:
        syn: the ``synthesis`` group (None or no ``mask_maker``: images only).

    Returns:
        (mask maker or None, quality filter or None, affinity settings or None).

    Raises:
        ValueError: an inconsistent ``refine`` list, refinement without a mask maker, or an affinity
            pass without class maps on disk or without its refiner node.
    """
    if not syn or not syn.get("mask_maker"):
        if syn and (syn.get("refine") or syn.get("filter_masks") or syn.get("save_class_maps")):
            raise ValueError(
                "synthesis: refine/filter_masks/save_class_maps need a mask_maker (synthesis=attention_masks)"
            )
        return None, None, None
    steps = [str(s) for s in (syn.get("refine") or [])]
    if not steps:
        raise ValueError(
            "synthesis.refine: expected raw, or at least one step of threshold, densecrf, affinity"
        )
    if "raw" in steps and steps != ["raw"]:
        raise ValueError(f"synthesis.refine: raw (unrefined attention masks) stands alone, got {steps}")
    chain_steps = [s for s in steps if s != "affinity"]
    if "affinity" in steps and steps[-1] != "affinity":
        raise ValueError(
            f"synthesis.refine: affinity must come last (it refines the written masks), got {steps}"
        )
    if not chain_steps:
        raise ValueError("synthesis.refine: affinity needs seeds from threshold and/or densecrf before it")
    node = OmegaConf.to_container(syn.mask_maker, resolve=True)
    if isinstance(node.get("refiner"), dict) and "use" in node["refiner"]:
        configured = [k for k, v in (node["refiner"].get("steps") or {}).items() if v is not None]
        unknown = [s for s in chain_steps if s not in configured]
        if unknown:
            raise ValueError(
                f"synthesis.refine: steps {unknown} are not configured in synthesis.mask_maker.refiner.steps "
                f"{configured} (affinity is the second pass)"
            )
        node["refiner"]["use"] = chain_steps
    mask_maker = hydra.utils.instantiate(node)
    quality_filter = hydra.utils.instantiate(syn.quality_filter) if syn.get("filter_masks") else None
    affinity = None
    if "affinity" in steps:
        if not syn.get("save_class_maps"):
            raise ValueError(
                "synthesis.refine: the affinity pass needs synthesis.save_class_maps=true "
                "(class maps on disk)"
            )
        settings = syn.get("affinity") or {}
        if not settings.get("refiner"):
            raise ValueError(
                "synthesis.affinity.refiner: expected an AffinityRefiner node (conf/refine/affinity.yaml)"
            )
        affinity = {
            "refiner": hydra.utils.instantiate(settings.refiner),
            "train_steps": int(settings.get("train_steps", 500)),
            "batch_size": int(settings.get("batch_size", 8)),
            "ignore_margin": int(settings.get("ignore_margin", 3)),
        }
    return mask_maker, quality_filter, affinity


def affinity_device(accelerator: str | None) -> str:
    """Where the affinity pass runs: the GPU when the accelerator setting allows one and it exists.

    Args:
        accelerator: the trainer's ``accelerator`` setting (None = not set).
    """
    if accelerator in ("gpu", "cuda", "auto", None) and torch.cuda.is_available():
        return "cuda"
    return "cpu"
