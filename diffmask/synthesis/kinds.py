"""The three kinds of generation run, each from the generate stage's config to a :class:`GenerationPlan`.

* ``prompts``: samples from pure noise, with prompts drawn from the real data's metadata
  (:func:`~diffmask.synthesis.requests.draw_requests`) or listed in ``prompt_list``;
* ``variations`` (``init_images=train``): SDEdit variations of the real training images
  (:mod:`diffmask.synthesis.variations`);
* ``controlled`` (``synthesis.control_dir``): a ControlNet renders condition masks into images
  (:mod:`diffmask.synthesis.controlled`).

:func:`generation_kind` tells which one a config asks for; :func:`plan_generation` builds it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import Dataset

from diffmask.control.conditions import ConditionBuilder
from diffmask.data.sources import ManifestSource, SampleSource
from diffmask.diffusion.sampler import ControlledSampler, Sampler, TextToImageSampler, VariationSampler
from diffmask.evaluation.fidelity import served_intensity, set_intensity
from diffmask.synthesis.controlled import SOURCES as CONTROL_SOURCES
from diffmask.synthesis.controlled import ConditionDataset, controlled_requests
from diffmask.synthesis.requests import GenerationRequest, draw_requests, requests_from_prompts
from diffmask.synthesis.variations import VariationDataset, variation_requests
from diffmask.synthesis.writer import set_channels

__all__ = [
    "KINDS",
    "GenerationPlan",
    "generation_kind",
    "plan_generation",
    "prompted_generation",
    "variation_generation",
    "controlled_generation",
]

log = logging.getLogger("diffmask.generate")  # the generate stage's logger: its messages keep their name

KINDS = ("prompts", "variations", "controlled")


@dataclass
class GenerationPlan:
    """What a generation run samples, and what its ``stage.json`` records of its inputs.

    Attributes:
        kind: ``prompts``, ``variations`` or ``controlled`` (see the module).
        sampler: the sampler of that kind.
        requests: the requests, or a dataset of them with condition or init images.
        class_names: the label classes, background first.
        sample_settings: keyword arguments of
            :func:`~diffmask.synthesis.generate.generate_samples` that only this kind sets
            (``control_scale``, ``strength``).
        inputs: ``stage.json``'s inputs: ``diffusion`` (set by :func:`plan_generation`), and for a
            controlled run ``control`` and ``conditions``.
    """

    kind: str
    sampler: Sampler
    requests: Sequence[GenerationRequest] | Dataset
    class_names: Sequence[str]
    sample_settings: dict[str, float] = field(default_factory=dict)
    inputs: dict[str, str] = field(default_factory=dict)


def generation_kind(cfg: DictConfig) -> str:
    """The kind of run ``cfg`` asks for (one of :data:`KINDS`).

    Args:
        cfg: the generate stage's config.

    Raises:
        ValueError: ``init_images`` together with a ControlNet.
    """
    controlled = bool(cfg.get("synthesis") and cfg.synthesis.get("control_dir"))
    if controlled and cfg.get("init_images"):
        raise ValueError(
            "init_images: not with a ControlNet (synthesis.control_dir): its conditions fix the layout"
        )
    if controlled:
        return "controlled"
    return "variations" if cfg.get("init_images") else "prompts"


def plan_generation(cfg: DictConfig, model_dir: str | os.PathLike, kind: str | None = None) -> GenerationPlan:
    """The plan of the kind of run ``cfg`` asks for.

    Args:
        cfg: the generate stage's config.
        model_dir: the finished diffusion stage folder (``input_dir``).
        kind: one of :data:`KINDS`; None = :func:`generation_kind` of ``cfg``.

    Returns:
        The plan, its ``inputs`` naming ``model_dir`` as ``diffusion``.
    """
    kind = generation_kind(cfg) if kind is None else kind
    makers = {"prompts": prompted_generation, "variations": variation_generation,
              "controlled": controlled_generation}
    if kind not in makers:
        raise ValueError(f"kind: expected one of {list(KINDS)}, got {kind!r}")
    plan = makers[kind](cfg, model_dir)
    plan.inputs = {"diffusion": str(model_dir), **plan.inputs}
    return plan


def _pretrained(sampler_class: type[Sampler], cfg: DictConfig, model_dir: str | os.PathLike) -> Sampler:
    """The exported model's sampler of ``sampler_class``; it must have a prompt builder."""
    sampler = sampler_class.from_pretrained(model_dir, scheduler=cfg.scheduler,
                                            channels=int(cfg.data.channels))
    if sampler.prompt_builder is None:
        raise ValueError(
            f"input_dir: {model_dir}/diffmask.json has no prompt_builder; export it with the fit stage"
        )
    return sampler


def prompted_generation(cfg: DictConfig, model_dir: str | os.PathLike) -> GenerationPlan:
    """Samples from pure noise: ``prompt_list`` x ``num_per_prompt``, or ``num_samples`` prompts drawn
    from the real training images' metadata (``prompts=retrieval``: retrieved, ``findings``: weighted).

    Args:
        cfg: the generate stage's config.
        model_dir: the finished diffusion stage folder (``input_dir``).
    """
    sampler = _pretrained(TextToImageSampler, cfg, model_dir)
    if cfg.prompt_list:
        requests = requests_from_prompts(list(cfg.prompt_list), cfg.num_per_prompt, cfg.seed)
    else:
        real = hydra.utils.instantiate(cfg.data.real)
        metas = [real.load(sid).meta for sid in real.ids("train")]
        retriever = hydra.utils.instantiate(cfg.prompts) if cfg.get("prompts") else None  # prompts=retrieval
        findings = OmegaConf.to_container(cfg.findings) if cfg.get("findings") else {}
        requests = draw_requests(cfg.num_samples, cfg.seed, sampler.prompt_builder, metas,
                                 retriever=retriever, findings=findings)
    return GenerationPlan("prompts", sampler, requests, sampler.prompt_builder.class_names)


def variation_generation(cfg: DictConfig, model_dir: str | os.PathLike) -> GenerationPlan:
    """``init_images=train``: variations of the real training images (SDEdit), with their own prompts.

    Args:
        cfg: the generate stage's config.
        model_dir: the finished diffusion stage folder (``input_dir``).

    Raises:
        ValueError: ``init_images`` is not ``train``, a prompt setting is also set, or ``strength``
            is outside (0, 1].
    """
    sampler = _pretrained(VariationSampler, cfg, model_dir)
    if str(cfg.init_images) != "train":
        raise ValueError(
            f"init_images: expected null or train (the real training images), got {cfg.init_images!r}"
        )
    clashes = [k for k in ("prompt_list", "findings", "prompts") if cfg.get(k)]
    if clashes:
        raise ValueError(
            f"init_images: each variation takes its source image's prompt; {clashes[0]} cannot be set with it"
        )
    strength = float(cfg.strength)
    if not 0.0 < strength <= 1.0:
        raise ValueError(
            "strength: expected 0 < strength <= 1 (the share of the schedule run from the image), "
            f"got {strength}"
        )
    real = hydra.utils.instantiate(cfg.data.real)
    requests = variation_requests(cfg.num_samples, cfg.seed, sampler.prompt_builder, real, real.ids("train"))
    log.info("variations of %d %s training images (strength %.2f: %d of %d steps)", len(real.ids("train")),
             real.name, strength, min(round(strength * cfg.steps), cfg.steps), cfg.steps)
    components = sampler.components
    dataset = VariationDataset(requests, real, sampler.resolution, intensity=components.intensity,
                               resize=str(cfg.data.get("resize", "stretch")), channels=components.channels)
    return GenerationPlan("variations", sampler, dataset, sampler.prompt_builder.class_names,
                          sample_settings={"strength": strength})


def controlled_generation(cfg: DictConfig, model_dir: str | os.PathLike) -> GenerationPlan:
    """``synthesis=controlled``: the ControlNet sampler and the condition dataset.

    Args:
        cfg: the generate stage's config.
        model_dir: the finished diffusion stage folder (``input_dir``).

    Raises:
        ValueError: an unknown source, a ControlNet made from another model than ``input_dir``,
            a source without masks, or a condition folder made with another normalisation.
    """
    syn = cfg.synthesis
    source_kind = str(syn.get("source", "real"))
    if source_kind not in CONTROL_SOURCES:
        raise ValueError(f"synthesis.source: expected one of {list(CONTROL_SOURCES)}, got {source_kind!r}")
    sampler = ControlledSampler.from_pretrained(syn.control_dir, model_dir, scheduler=cfg.scheduler,
                                                channels=int(cfg.data.channels))
    meta, builder = sampler.control_metadata, sampler.prompt_builder
    if builder is None and not meta.get("prompt"):
        raise ValueError(
            f"input_dir: {model_dir} has no prompt builder (diffmask.json) and the ControlNet in "
            f"{syn.control_dir} was fitted without a fixed prompt (control.prompt); there is nothing to "
            "build prompts from"
        )
    condition = ConditionBuilder(**meta["condition"])
    intensity = str(meta.get("intensity", sampler.components.intensity))
    if source_kind == "folder":
        source, ids, served = _folder_conditions(cfg, sampler, intensity)
    else:
        source, ids, served = _real_conditions(cfg, meta), list(meta.get("labelled_ids") or []), intensity
    deformation = hydra.utils.instantiate(syn.deform) if source_kind == "deformed" else None
    requests = controlled_requests(
        source, ids, int(syn.get("augment_ratio", 1)), cfg.seed, builder, deform=deformation is not None,
        use_row_prompts=source_kind == "folder", fixed_prompt=meta.get("prompt"),
    )
    dataset = ConditionDataset(requests, source, condition, sampler.resolution, intensity=served,
                               resize=str(cfg.data.get("resize", "stretch")), deformation=deformation)
    log.info("controlled generation: %d conditions (%s, %s) x %d variants, ControlNet %s (%s)", len(ids),
             source_kind, source.name, int(syn.get("augment_ratio", 1)), syn.control_dir, condition.type)
    inputs = {"control": str(syn.control_dir)}
    if syn.get("condition_dir"):
        inputs["conditions"] = str(syn.condition_dir)
    class_names = builder.class_names if builder else tuple(cfg.data.class_names)
    return GenerationPlan("controlled", sampler, dataset, class_names, inputs=inputs,
                          sample_settings={"control_scale": float(syn.get("control_scale", 1.0))})


def _folder_conditions(cfg: DictConfig, sampler: ControlledSampler,
                       intensity: str) -> tuple[SampleSource, list[str], str]:
    """``source=folder``: (the synthesis folder's rows, their ids, the intensity they are served at)."""
    syn, channels = cfg.synthesis, sampler.components.channels
    if not syn.get("condition_dir"):
        raise ValueError(
            "synthesis.condition_dir: source=folder needs a synthesis folder (manifest.jsonl, masks/)"
        )
    folder = Path(syn.condition_dir)
    if set_channels(folder) != channels:
        raise ValueError(
            f"synthesis.condition_dir: {folder} holds {set_channels(folder)}-channel images "
            f"(its stage.json), the model generates {channels}-channel ones (data.channels); grey and colour "
            "are never converted silently"
        )
    class_names = sampler.control_metadata.get("class_names") or list(cfg.data.class_names)
    source = ManifestSource(folder, class_names, channels=channels)
    ids = source.ids("train")
    no_mask = [r.id for r in source.rows() if not r.sem_seg_file_name]
    if no_mask:
        raise ValueError(
            f"synthesis.condition_dir: {folder} has {len(no_mask)} rows without a mask (sem_seg_file_name), "
            f"e.g. {no_mask[:3]}; conditions need label maps"
        )
    served = served_intensity(set_intensity(folder), intensity, where=f"synthesis.condition_dir {folder}")
    return source, ids, served


def _real_conditions(cfg: DictConfig, meta: dict[str, Any]) -> SampleSource:
    """``source=real|deformed``: the real data source, checked to hold the ControlNet's labelled images."""
    source = hydra.utils.instantiate(cfg.data.real)
    ids = list(meta.get("labelled_ids") or [])
    if not ids:
        raise ValueError(
            f"synthesis.control_dir: {cfg.synthesis.control_dir}/control.json names no labelled_ids"
        )
    unknown = sorted(set(ids) - set(source.ids("train")))
    if unknown:
        raise ValueError(
            f"synthesis.control_dir: the ControlNet's labelled images {unknown[:3]} are not in the "
            f"{source.name} source's train split (data.real must be the data it was fitted on)"
        )
    return source
