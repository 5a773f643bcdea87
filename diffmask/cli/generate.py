"""Generation: sample a trained diffusion model into a synthetic dataset folder.

    diffmask-generate input_dir=artifacts/diffusion/px128 num_samples=1000 trainer=gpu
    diffmask-generate input_dir=artifacts/diffusion/px128 trainer=ddp trainer.devices=4

Writes ``images/<id>.png`` + ``manifest.jsonl`` + ``stage.json`` to
``${paths.artifact_dir}/synthesis/<name>``; a rerun resumes where it stopped.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from diffmask.artifacts import StageDir
from diffmask.cli.common import CONFIG_PATH, stage_task
from diffmask.diffusion.sampler import DiffusionSampler
from diffmask.synthesis import draw_requests, generate_samples, requests_from_prompts

log = logging.getLogger("diffmask.generate")


@stage_task
def run(cfg: DictConfig) -> dict[str, Any]:
    """Generate the samples described by ``cfg``; returns counts."""
    stage = StageDir(cfg.output_dir)
    if stage.is_complete() and not cfg.force:
        log.info("%s is complete; skipping (force=true to redo)", stage.path)
        return {}
    model_stage = StageDir(cfg.input_dir)
    model_stage.info()  # a clear error when the diffusion stage has not finished
    sampler = DiffusionSampler.from_pretrained(model_stage.path, scheduler=cfg.scheduler)
    if sampler.prompt_builder is None:
        raise ValueError(f"input_dir: {model_stage.path}/diffmask.json has no prompt_builder; export it with the fit stage")
    if cfg.prompt_list:
        requests = requests_from_prompts(list(cfg.prompt_list), cfg.num_per_prompt, cfg.seed)
    else:
        real = hydra.utils.instantiate(cfg.data.real)
        metas = [real.load(sid).meta for sid in real.ids("train")]
        requests = draw_requests(cfg.num_samples, cfg.seed, sampler.prompt_builder, metas)
    mask_maker = hydra.utils.instantiate(cfg.mask_maker) if cfg.get("mask_maker") else None

    work = stage.begin(resume=True)
    start = time.time()
    counts = generate_samples(
        hydra.utils.instantiate(cfg.trainer, _partial_=True),
        sampler,
        requests,
        work,
        class_names=sampler.prompt_builder.class_names,
        batch_size=cfg.batch_size,
        num_inference_steps=cfg.steps,
        guidance_scale=cfg.guidance_scale,
        eta=cfg.eta,
        mask_maker=mask_maker,
        num_workers=cfg.num_workers,
    )
    seconds = time.time() - start
    if counts["rows"] < 0:  # not rank 0
        return counts
    if counts["rows"] != len(requests):
        raise RuntimeError(f"{work}: {counts['rows']} manifest rows for {len(requests)} requests; rerun to resume")
    info = {**counts, "requested": len(requests), "seconds": round(seconds, 1),
            "images_per_s": counts["written"] / seconds if seconds > 0 else None}
    stage.commit(config=OmegaConf.to_container(cfg, resolve=True), inputs={"diffusion": str(model_stage.path)},
                 counts=info)
    log.info("%d samples in %s (%d new, %.1f s)", counts["rows"], stage.path, counts["written"], seconds)
    return info


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="generate")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
