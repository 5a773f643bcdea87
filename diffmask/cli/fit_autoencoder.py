"""Autoencoder stage: train the latent autoencoder on the real images (no labels needed).

    diffmask-fit-autoencoder data=auto data.size=128 name=ae128
    diffmask-fit-autoencoder data.size=128 autoencoder=f8 name=ae128f8

Writes a plain ``AutoencoderKL`` folder (loadable by ``AutoencoderKL.from_pretrained``, with the
measured ``scaling_factor``), ``autoencoder.json``, ``test_metrics.json`` (PSNR / SSIM per test
set), ``grid.png`` and ``stage.json`` to ``${paths.artifact_dir}/autoencoder/<name>``;
``metrics.json`` into the run dir. Resumable. With ``reconstructions=true`` the training images'
reconstructions and their masks become a set (``<stage>/reconstructions``) for
``diffmask-train data.synthetic_dir=...`` (what the round trip costs a segmenter).
Colour data (``data.channels=3``) gives a colour autoencoder (RGB in and out; ``grid.png`` and the
reconstructions are RGB PNGs); ``autoencoder.json`` and ``stage.json`` record the channels.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig

from diffmask.artifacts import StageDir, atomic_write_bytes, atomic_write_json
from diffmask.autoencoder.module import psnr, reconstruct, save_grid, ssim
from diffmask.cli.common import commit_fit_stage, resumable_fit, seed_run, skip_complete_stage, stage_task
from diffmask.config import CONFIG_PATH
from diffmask.data.manifest import ManifestRow, write_manifest
from diffmask.refine.images import to_uint8_images

log = logging.getLogger("diffmask.fit_autoencoder")


@torch.no_grad()
def evaluate(vae, loaders: list, names: list[str]) -> tuple[dict[str, dict[str, float]], dict[str, torch.Tensor]]:
    """PSNR / SSIM (mean, std, n) of each test set's reconstructions and a few (original, reconstruction) pairs."""
    results, examples = {}, {}
    for name, loader in zip(names, loaders, strict=True):
        p, s, originals, recons = [], [], [], []
        for batch in loader:
            image = batch["image"]
            recon = reconstruct(vae, image)
            p.append(psnr(recon, image))
            s.append(ssim(recon, image))
            if sum(len(o) for o in originals) < 16:
                originals.append(image)
                recons.append(recon)
        p_all, s_all = torch.cat(p), torch.cat(s)
        results[name] = {"psnr": float(p_all.mean()), "psnr_std": float(p_all.std()) if len(p_all) > 1 else 0.0,
                         "ssim": float(s_all.mean()), "ssim_std": float(s_all.std()) if len(s_all) > 1 else 0.0,
                         "n": len(p_all)}
        examples[name] = torch.stack([torch.cat(originals), torch.cat(recons)])
    return results, examples


@torch.no_grad()
def write_reconstructions(vae, datamodule, folder: Path, batch_size: int = 16) -> int:
    """The real training images' reconstructions + their masks as a manifest set in ``folder``."""
    from diffmask.data.dataset import SegmentationDataset  # noqa: PLC0415
    from diffmask.synthesis.writer import _png_bytes  # noqa: PLC0415

    ids = list(datamodule.real_train_ids)
    dataset = SegmentationDataset(datamodule.real, ids, datamodule.size, intensity=datamodule.intensity,
                                  channels=datamodule.channels)
    rows = []
    for start in range(0, len(ids), batch_size):
        items = [dataset[i] for i in range(start, min(start + batch_size, len(ids)))]
        images = torch.stack([it["image"] for it in items])
        recon = to_uint8_images(reconstruct(vae, images))  # (B, S, S) grey or (B, S, S, 3) RGB
        for item, r in zip(items, recon, strict=True):
            sid = str(item["id"])
            atomic_write_bytes(folder / "images" / f"{sid}.png", _png_bytes(r))
            atomic_write_bytes(folder / "masks" / f"{sid}.png", _png_bytes(item["label"][0].numpy()))
            rows.append(ManifestRow(id=sid, file_name=f"images/{sid}.png", sem_seg_file_name=f"masks/{sid}.png",
                                    source="synthetic", meta=dict(item["meta"]), pair_id=sid))
    write_manifest(folder, rows)
    return len(rows)


@stage_task
def run(cfg: DictConfig) -> dict[str, Any]:
    """Fit the autoencoder described by ``cfg`` and export it; returns the final metrics."""
    stage = StageDir(cfg.output_dir)
    if skip_complete_stage(stage, cfg):
        return {}
    seed_run(cfg)
    datamodule = hydra.utils.instantiate(cfg.data)
    model = hydra.utils.instantiate(cfg.autoencoder)
    if int(model.vae.config.in_channels) != datamodule.channels:
        raise ValueError(
            f"autoencoder.vae.in_channels={model.vae.config.in_channels}, but data.channels={datamodule.channels}; "
            "the autoencoder reads the data's images as they are (set both from data.channels)"
        )

    work = stage.begin(resume=True)
    trainer, metrics, fit_seconds = resumable_fit(cfg, model, datamodule, work)
    if not trainer.is_global_zero:
        return metrics
    model.eval()
    stats = model.latent_statistics(datamodule.train_dataloader())
    model.export(work, stats, extra={"intensity": datamodule.intensity, "real": datamodule.real.name})
    results, examples = evaluate(model.vae, datamodule.test_dataloader(), list(datamodule.test_set_names))
    atomic_write_json(work / "test_metrics.json", results)
    first = next(iter(examples.values()))
    save_grid(work / "grid.png", [first[0][: cfg.grid_images], first[1][: cfg.grid_images]])
    n_recon = 0
    if cfg.reconstructions:
        recon_dir = work / "reconstructions"
        n_recon = write_reconstructions(model.vae, datamodule, recon_dir)
        # a set's stage.json: the datamodule reads the intensity its images were made with
        atomic_write_json(recon_dir / "stage.json", {"status": "complete", "intensity": datamodule.intensity,
                                                     "channels": datamodule.channels,
                                                     "counts": {"n_samples": n_recon}})
    test = {f"test/{name}/{k}": v for name, r in results.items() for k, v in r.items() if k in ("psnr", "ssim")}
    counts = {
        "n_real_train": len(datamodule.real_train_ids),
        "resolution": model.resolution,
        "factor": model.factor,
        "scaling_factor": float(model.vae.config.scaling_factor),
        "n_reconstructions": n_recon,
        "channels": datamodule.channels,
    }
    commit_fit_stage(cfg, stage, work, trainer, metrics, fit_seconds, datamodule, "autoencoder_dir", counts,
                     extra={"test": results, "intensity": datamodule.intensity, "channels": datamodule.channels},
                     extra_metrics=test)
    for name, r in results.items():
        log.info("autoencoder %s: PSNR %.2f dB, SSIM %.4f on %d %s test images", stage.path, r["psnr"], r["ssim"],
                 r["n"], name)
    return metrics


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="fit_autoencoder")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
