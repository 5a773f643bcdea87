"""Codebook stage: the visual codebook of the real images' patches (issue 17).

    diffmask-fit-codebook codebook.autoencoder_dir=artifacts/autoencoder/ae64 data.size=64 name=cb64

K-means (``codebook.size`` codes) over the patch features (``codebook.patch`` px windows) of the
project autoencoder's posterior mean, on every real training image (no labels). Writes
``codebook.json`` (size, patch, grid, usage: counts, dead codes, perplexity on the training and test
images), ``codebook.pt`` (codes and feature standardisation), ``codes.json`` (each training
image's code grid) and ``stage.json`` to ``${paths.artifact_dir}/codebook/<name>``. Then
``diffmask-fit-diffusion diffusion.clues=codebook diffusion.codebook_dir=<that folder>``.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from diffmask.artifacts import StageDir, atomic_write_json
from diffmask.autoencoder import load_autoencoder
from diffmask.cli.common import seed_run, skip_complete_stage, stage_task, write_metrics
from diffmask.codebook import VisualCodebook, codebook_usage
from diffmask.config import CONFIG_PATH
from diffmask.data.dataset import SegmentationDataset

log = logging.getLogger("diffmask.fit_codebook")


def _images(source, ids: list[str], size: int, intensity: str, channels: int = 1) -> torch.Tensor:
    dataset = SegmentationDataset(source, ids, size, intensity=intensity, channels=channels)
    return torch.stack([dataset[i]["image"] for i in range(len(ids))])


def _assign(book: VisualCodebook, images: torch.Tensor, batch_size: int = 32) -> torch.Tensor:
    return torch.cat([book.assign(images[i:i + batch_size]) for i in range(0, len(images), batch_size)])


@stage_task
def run(cfg: DictConfig) -> dict[str, Any]:
    """Build the codebook described by ``cfg``; returns its usage figures."""
    stage = StageDir(cfg.output_dir)
    if skip_complete_stage(stage, cfg):
        return {}
    seed_run(cfg)
    datamodule = hydra.utils.instantiate(cfg.data)
    if not cfg.codebook.autoencoder_dir:
        raise ValueError("codebook.autoencoder_dir: expected a diffmask-fit-autoencoder stage folder (the patch encoder)")
    ae_dir = str(cfg.codebook.autoencoder_dir)
    vae = load_autoencoder(ae_dir, resolution=datamodule.size, channels=datamodule.channels)
    ids = list(datamodule.real_train_ids)
    images = _images(datamodule.real, ids, datamodule.size, datamodule.intensity, datamodule.channels)
    work = stage.begin()
    start = time.time()
    book = VisualCodebook.fit(vae, images, int(cfg.codebook.size), int(cfg.codebook.patch),
                              iters=int(cfg.codebook.iters), seed=int(cfg.seed), autoencoder_dir=ae_dir)
    fit_seconds = time.time() - start
    codes = _assign(book, images)
    usage = {"train": codebook_usage(codes.numpy(), book.size)}
    for name, source in {datamodule.real.name: datamodule.real, **datamodule.extra_test_sets}.items():
        test_ids = source.ids(datamodule.splits["test"]) if source is datamodule.real else source.ids("test")
        usage[f"test/{name}"] = codebook_usage(_assign(book, _images(source, test_ids, datamodule.size,
                                                                      datamodule.intensity, datamodule.channels)
                                                       ).numpy(), book.size)
    summary = {k: {"n_dead": u["n_dead"], "perplexity": round(u["perplexity"], 2)} for k, u in usage.items()}
    book.save(work, extra={"intensity": datamodule.intensity, "channels": datamodule.channels,
                           "real": datamodule.real.name, "usage": summary,
                           "dead_codes": usage["train"]["dead_codes"], "counts": usage["train"]["counts"]})
    atomic_write_json(work / "codes.json", {sid: c.tolist() for sid, c in zip(ids, codes, strict=True)})
    counts = {"size": book.size, "patch": book.patch, "grid": book.grid, "n_images": len(ids),
              "n_dead": usage["train"]["n_dead"], "perplexity": round(usage["train"]["perplexity"], 2),
              "fit_seconds": round(fit_seconds, 1)}
    stage.commit(config=OmegaConf.to_container(cfg, resolve=True), inputs={"autoencoder_dir": ae_dir}, counts=counts,
                 extra={"usage": summary, "intensity": datamodule.intensity, "channels": datamodule.channels})
    metrics = {f"codebook/{k}/{m}": v for k, u in summary.items() for m, v in u.items()}
    write_metrics(Path(cfg.paths.output_dir) / "metrics.json", metrics, extra={"codebook_dir": str(stage.path), **counts})
    for k, u in summary.items():
        log.info("codebook %s: %s: %d dead codes of %d, perplexity %.1f", stage.path, k, u["n_dead"], book.size,
                 u["perplexity"])
    return metrics


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="fit_codebook")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
