"""Generation: sample a trained diffusion model into a synthetic dataset folder.

    diffmask-generate input_dir=artifacts/diffusion/px128 num_samples=1000 trainer=gpu
    diffmask-generate input_dir=artifacts/diffusion/px128 trainer=ddp trainer.devices=4
    diffmask-generate input_dir=artifacts/diffusion/px128 init_images=train strength=0.5   # SDEdit variations

Writes ``images/<id>.png`` + ``manifest.jsonl`` + ``stage.json`` to
``${paths.artifact_dir}/synthesis/<name>``; a rerun resumes where it stopped, and a rerun of a
complete stage with a larger ``num_samples`` (nothing else changed) adds the missing samples. With
``synthesis=attention_masks`` also ``masks/<id>.png`` (threshold/CRF), ``attn/<id>.npz`` (class
maps) and, when ``affinity`` is in ``synthesis.refine``, a second pass that fits AffinityNet on
the written images + masks and writes ``masks_affinity/`` (see
:mod:`diffmask.synthesis.affinity_pass`). ``init_images=train`` starts each sample from a real
training image noised to ``strength`` of the schedule instead of pure noise
(:mod:`diffmask.synthesis.variations`).

``data.channels`` must be the channels the model (and a ControlNet) was fitted on (a named error
otherwise); a colour model writes RGB PNGs, and ``stage.json`` records ``channels``.

``logger=wandb`` logs the finished set to W&B: a grid of
its first pairs (image with its mask as an overlay) and its counts, in the run's group
(:mod:`diffmask.evaluation.wandb_logging`).
"""

from __future__ import annotations

import functools
import logging
import time
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from diffmask.artifacts import StageDir
from diffmask.attention.store import CrossAttentionStore
from diffmask.cli.common import seed_run, skip_complete_stage, stage_task
from diffmask.config import CONFIG_PATH, RUN_ONLY_SETTINGS
from diffmask.control.conditions import ConditionBuilder
from diffmask.control.module import load_controlled
from diffmask.data.manifest import read_manifest
from diffmask.data.sources import ManifestSource
from diffmask.diffusion.sampler import DiffusionSampler
from diffmask.evaluation.fidelity import (
    format_fidelity,
    label_fidelity,
    record_label_fidelity,
    served_intensity,
    set_intensity,
)
from diffmask.evaluation.wandb_logging import log_synthesis
from diffmask.prompts.builder import prompt_builder_from_dict
from diffmask.refine.mask_maker import AttentionMaskMaker
from diffmask.refine.threshold import ThresholdRefiner
from diffmask.synthesis import (
    draw_requests,
    generate_samples,
    read_done_rows,
    read_dropped,
    requests_from_prompts,
)
from diffmask.synthesis.affinity_pass import refine_with_affinity
from diffmask.synthesis.controlled import SOURCES as CONTROL_SOURCES
from diffmask.synthesis.controlled import ConditionDataset, controlled_requests
from diffmask.synthesis.quality import class_presence_record
from diffmask.synthesis.variations import VariationDataset, variation_requests
from diffmask.synthesis.writer import set_channels

log = logging.getLogger("diffmask.generate")


@stage_task
def run(cfg: DictConfig) -> dict[str, Any]:
    """Generate the samples described by ``cfg``; returns counts."""
    seed_run(cfg)  # requests and the affinity pass draw from it
    stage = StageDir(cfg.output_dir)
    controlled = bool(cfg.get("synthesis") and cfg.synthesis.get("control_dir"))
    if controlled and cfg.get("init_images"):
        raise ValueError("init_images: not with a ControlNet (synthesis.control_dir): its conditions fix the layout")
    if not cfg.get("force") and not controlled and stage.is_complete() and _only_more_samples(stage, cfg):
        # requests are prefix-stable: the first num_samples of a larger run are the same samples
        log.info("%s: extending from %d to %d samples (the ones on disk are kept; the set stays readable until done)",
                 stage.path, stage.info()["config"]["num_samples"], cfg.num_samples)
        if not stage.tmp_path.exists():
            stage.reopen()
        else:  # an interrupted extension, resumed below, if it holds the complete set's samples
            have = {*read_done_rows(stage.tmp_path), *read_dropped(stage.tmp_path)}
            lost = [r.id for r in read_manifest(stage.path) if r.id not in have]
            if lost:
                raise ValueError(
                    f"{stage.tmp_path}: this work folder lacks {len(lost)} samples of the complete set "
                    f"(e.g. {lost[:3]}), so it is not an interrupted extension; delete it to grow {stage.path}"
                )
    elif skip_complete_stage(stage, cfg):
        return {}
    model_stage = StageDir(cfg.input_dir)
    model_stage.info()  # a clear error when the diffusion stage has not finished
    if controlled:
        sampler, requests = controlled_generation(cfg, model_stage.path)
    else:
        sampler = DiffusionSampler.from_pretrained(model_stage.path, scheduler=cfg.scheduler,
                                                   channels=int(cfg.data.channels))
    if sampler.prompt_builder is None and not controlled:
        raise ValueError(f"input_dir: {model_stage.path}/diffmask.json has no prompt_builder; export it with the fit stage")
    class_names = sampler.prompt_builder.class_names if sampler.prompt_builder else tuple(cfg.data.class_names)
    if not controlled and cfg.get("init_images"):
        requests = variation_dataset(cfg, sampler)
    elif not controlled and cfg.prompt_list:
        requests = requests_from_prompts(list(cfg.prompt_list), cfg.num_per_prompt, cfg.seed)
    elif not controlled:
        real = hydra.utils.instantiate(cfg.data.real)
        metas = [real.load(sid).meta for sid in real.ids("train")]
        retriever = hydra.utils.instantiate(cfg.prompts) if cfg.get("prompts") else None  # prompts=retrieval
        requests = draw_requests(cfg.num_samples, cfg.seed, sampler.prompt_builder, metas, retriever=retriever,
                                 findings=OmegaConf.to_container(cfg.findings) if cfg.get("findings") else {})
    mask_maker, quality_filter, affinity = build_synthesis(cfg.synthesis)
    if not controlled and cfg.prompt_list and mask_maker is not None:
        for i, prompt in enumerate(cfg.prompt_list):  # attention masks read every class word
            try:
                sampler.prompt_builder.locate(str(prompt))
            except ValueError as err:
                raise ValueError(f"prompt_list[{i}]: {err}; attention masks need every class word "
                                 "(or synthesis=none for images only)") from None
    if controlled and cfg.synthesis.get("capture_attention"):
        # DiffMask's attention masks of the controlled images, scored against their condition masks
        mask_maker = AttentionMaskMaker(functools.partial(CrossAttentionStore), ThresholdRefiner(), class_names=class_names)

    work = stage.begin(resume=True)
    start = time.time()
    counts = generate_samples(
        hydra.utils.instantiate(cfg.trainer, _partial_=True),
        sampler,
        requests,
        work,
        class_names=class_names,
        batch_size=cfg.batch_size,
        num_inference_steps=cfg.steps,
        guidance_scale=cfg.guidance_scale,
        eta=cfg.eta,
        mask_maker=mask_maker,
        num_workers=cfg.num_workers,
        save_class_maps=bool(cfg.synthesis.get("save_class_maps") or (controlled and mask_maker is not None)),
        quality_filter=quality_filter,
        control_scale=float(cfg.synthesis.get("control_scale", 1.0)) if controlled else 1.0,
        strength=float(cfg.strength) if cfg.get("init_images") else 1.0,
    )
    if mask_maker is not None:
        mask_maker.close()
    if counts["rows"] < 0:  # not rank 0: rank 0 runs the affinity pass and commits
        return counts
    if counts["rows"] + counts["dropped_total"] != len(requests):
        raise RuntimeError(
            f"{work}: {counts['rows']} manifest rows + {counts['dropped_total']} dropped for {len(requests)} "
            "requests; rerun to resume"
        )
    if affinity is not None:
        counts.update(refine_with_affinity(
            work, class_names=class_names,
            device=affinity_device(cfg.trainer.get("accelerator")), seed=cfg.seed,
            channels=sampler.components.channels, **affinity,
        ))
    seconds = time.time() - start
    # every rank's new samples (``written`` is rank 0's alone under DDP): all in the folder now, less those at start
    made = counts["rows"] + counts["dropped_total"] - counts["skipped"]
    info = {**counts, "made": made, "requested": len(requests), "seconds": round(seconds, 1),
            "images_per_s": made / seconds if seconds > 0 else None}
    presence = class_presence_record(work, class_names, cfg.synthesis.get("min_class_presence"),
                                     optional_classes=list(cfg.data.get("optional_classes") or []))
    if controlled and mask_maker is not None:
        presence["attention_agreement"] = attention_agreement_record(work, class_names)
    inputs = {"diffusion": str(model_stage.path)}
    if controlled:
        inputs["control"] = str(cfg.synthesis.control_dir)
        if cfg.synthesis.get("condition_dir"):
            inputs["conditions"] = str(cfg.synthesis.condition_dir)
    stage.commit(config=OmegaConf.to_container(cfg, resolve=True), inputs=inputs,
                 counts=info, extra={"intensity": sampler.components.intensity,
                                     "channels": sampler.components.channels, **presence})
    log.info("%d samples in %s (%d new, %.1f s)", counts["rows"], stage.path, counts["written"], seconds)
    if cfg.get("fidelity_model"):
        # label fidelity: a segmentation model trained on real images, scored against the set's masks
        result = label_fidelity(stage.path, cfg.fidelity_model, class_names,
                                device=affinity_device(cfg.trainer.get("accelerator")))
        record_label_fidelity(stage.path, result)
        log.info("label fidelity (%s): %s", cfg.fidelity_model, format_fidelity(result))
        info["label_fidelity_miou"] = result["miou"]
    # logger=wandb: a W&B run (job type generate) with a grid of the set's first pairs and its counts
    if log_synthesis(cfg, stage.path, class_names, info):
        log.info("the first synthetic pairs and the counts logged to W&B")
    return info


def attention_agreement_record(folder, class_names) -> dict[str, float]:
    """Mean per-class IoU of the controlled images' attention masks with their condition masks
    (the manifest's ``score_<class>``, written by capture_attention)."""
    rows = read_manifest(folder)
    return {name: float(np.mean([r.scores[name] for r in rows if name in r.scores]))
            for name in class_names[1:] if any(name in r.scores for r in rows)}


def controlled_generation(cfg: DictConfig, model_dir) -> tuple[DiffusionSampler, ConditionDataset]:
    """The ControlNet sampler and the condition dataset of ``synthesis=controlled``.

    Raises:
        ValueError: an unknown source, a ControlNet made from another model than ``input_dir``,
            a source without masks, or a condition folder made with another normalisation.
    """
    syn = cfg.synthesis
    source_kind = str(syn.get("source", "real"))
    if source_kind not in CONTROL_SOURCES:
        raise ValueError(f"synthesis.source: expected one of {list(CONTROL_SOURCES)}, got {source_kind!r}")
    components, controlnet, meta = load_controlled(syn.control_dir, model_dir, channels=int(cfg.data.channels))
    builder = prompt_builder_from_dict(components.metadata["prompt_builder"]) if "prompt_builder" in components.metadata else None
    if builder is None and not meta.get("prompt"):
        raise ValueError(
            f"input_dir: {model_dir} has no prompt builder (diffmask.json) and the ControlNet in {syn.control_dir} "
            "was fitted without a fixed prompt (control.prompt); there is nothing to build prompts from"
        )
    sampler = DiffusionSampler(components, int(meta["resolution"]), scheduler=cfg.scheduler, prompt_builder=builder,
                               controlnet=controlnet)
    condition = ConditionBuilder(**meta["condition"])
    intensity = str(meta.get("intensity", components.intensity))
    if source_kind == "folder":
        if not syn.get("condition_dir"):
            raise ValueError("synthesis.condition_dir: source=folder needs a synthesis folder (manifest.jsonl, masks/)")
        folder = Path(syn.condition_dir)
        if set_channels(folder) != components.channels:
            raise ValueError(
                f"synthesis.condition_dir: {folder} holds {set_channels(folder)}-channel images (its stage.json), the "
                f"model generates {components.channels}-channel ones (data.channels); grey and colour are never "
                "converted silently"
            )
        source = ManifestSource(folder, meta.get("class_names") or list(cfg.data.class_names),
                                channels=components.channels)
        ids = source.ids("train")
        no_mask = [r.id for r in source.rows() if not r.sem_seg_file_name]
        if no_mask:
            raise ValueError(
                f"synthesis.condition_dir: {folder} has {len(no_mask)} rows without a mask (sem_seg_file_name), "
                f"e.g. {no_mask[:3]}; conditions need label maps"
            )
        served = served_intensity(set_intensity(folder), intensity, where=f"synthesis.condition_dir {folder}")
    else:
        source = hydra.utils.instantiate(cfg.data.real)
        ids = list(meta.get("labelled_ids") or [])
        if not ids:
            raise ValueError(f"synthesis.control_dir: {syn.control_dir}/control.json names no labelled_ids")
        unknown = sorted(set(ids) - set(source.ids("train")))
        if unknown:
            raise ValueError(
                f"synthesis.control_dir: the ControlNet's labelled images {unknown[:3]} are not in the "
                f"{source.name} source's train split (data.real must be the data it was fitted on)"
            )
        served = intensity
    deformation = hydra.utils.instantiate(syn.deform) if source_kind == "deformed" else None
    requests = controlled_requests(
        source, ids, int(syn.get("augment_ratio", 1)), cfg.seed, builder, deform=deformation is not None,
        use_row_prompts=source_kind == "folder", fixed_prompt=meta.get("prompt"),
    )
    dataset = ConditionDataset(requests, source, condition, sampler.resolution, intensity=served,
                               resize=str(cfg.data.get("resize", "stretch")), deformation=deformation)
    log.info("controlled generation: %d conditions (%s, %s) x %d variants, ControlNet %s (%s)", len(ids), source_kind,
             source.name, int(syn.get("augment_ratio", 1)), syn.control_dir, condition.type)
    return sampler, dataset


def variation_dataset(cfg: DictConfig, sampler: DiffusionSampler) -> VariationDataset:
    """``init_images=train``: variations of the real training images (SDEdit), with their own prompts."""
    if str(cfg.init_images) != "train":
        raise ValueError(f"init_images: expected null or train (the real training images), got {cfg.init_images!r}")
    clashes = [k for k in ("prompt_list", "findings", "prompts") if cfg.get(k)]
    if clashes:
        raise ValueError(f"init_images: each variation takes its source image's prompt; {clashes[0]} cannot be set with it")
    strength = float(cfg.strength)
    if not 0.0 < strength <= 1.0:
        raise ValueError(f"strength: expected 0 < strength <= 1 (the share of the schedule run from the image), got {strength}")
    real = hydra.utils.instantiate(cfg.data.real)
    requests = variation_requests(cfg.num_samples, cfg.seed, sampler.prompt_builder, real, real.ids("train"))
    log.info("variations of %d %s training images (strength %.2f: %d of %d steps)", len(real.ids("train")),
             real.name, strength, min(round(strength * cfg.steps), cfg.steps), cfg.steps)
    return VariationDataset(requests, real, sampler.resolution, intensity=sampler.components.intensity,
                            resize=str(cfg.data.get("resize", "stretch")), channels=sampler.components.channels)


def _only_more_samples(stage: StageDir, cfg: DictConfig) -> bool:
    """True when ``cfg`` asks a complete stage for more samples and changes nothing else."""
    old = stage.info().get("config", {}).get("num_samples")
    if cfg.prompt_list or not isinstance(old, int) or cfg.num_samples <= old:
        return False
    current = OmegaConf.to_container(cfg, resolve=True)
    changed = [c.split(":", 1)[0] for c in stage.changed_settings(current, ignore=(*RUN_ONLY_SETTINGS, "num_samples"))]
    if set_channels(stage.path) != int(cfg.data.get("channels", 1)):  # a set from before channels were recorded is grey
        return False
    # of the data group, generation reads only the real source (prompt metadata) and the class names
    return not [k for k in changed if not k.startswith("data.") or k.startswith(("data.real.", "data.class_names"))]


def build_synthesis(syn: DictConfig | None) -> tuple[Any, Any, dict[str, Any] | None]:
    """(mask_maker, quality_filter, affinity pass settings) from the ``synthesis`` group.

    The affinity settings are keyword arguments of
    :func:`~diffmask.synthesis.affinity_pass.refine_with_affinity` (``refiner``, ``train_steps``,
    ``batch_size``, ``ignore_margin``); None when ``affinity`` is not in ``synthesis.refine``.
    """
    if not syn or not syn.get("mask_maker"):
        if syn and (syn.get("refine") or syn.get("filter_masks") or syn.get("save_class_maps")):
            raise ValueError("synthesis: refine/filter_masks/save_class_maps need a mask_maker (synthesis=attention_masks)")
        return None, None, None
    steps = [str(s) for s in (syn.get("refine") or [])]
    if not steps:
        raise ValueError("synthesis.refine: expected raw, or at least one step of threshold, densecrf, affinity")
    if "raw" in steps and steps != ["raw"]:
        raise ValueError(f"synthesis.refine: raw (unrefined attention masks) stands alone, got {steps}")
    chain_steps = [s for s in steps if s != "affinity"]
    if "affinity" in steps and steps[-1] != "affinity":
        raise ValueError(f"synthesis.refine: affinity must come last (it refines the written masks), got {steps}")
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
            raise ValueError("synthesis.refine: the affinity pass needs synthesis.save_class_maps=true (class maps on disk)")
        settings = syn.get("affinity") or {}
        if not settings.get("refiner"):
            raise ValueError("synthesis.affinity.refiner: expected an AffinityRefiner node (conf/refine/affinity.yaml)")
        affinity = {
            "refiner": hydra.utils.instantiate(settings.refiner),
            "train_steps": int(settings.get("train_steps", 500)),
            "batch_size": int(settings.get("batch_size", 8)),
            "ignore_margin": int(settings.get("ignore_margin", 3)),
        }
    return mask_maker, quality_filter, affinity


def affinity_device(accelerator: str | None) -> str:
    """Where the affinity pass runs: the GPU when the accelerator setting allows one and it exists."""
    if accelerator in ("gpu", "cuda", "auto", None) and torch.cuda.is_available():
        return "cuda"
    return "cpu"


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="generate")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
