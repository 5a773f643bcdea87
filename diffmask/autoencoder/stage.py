"""The autoencoder stage: train the latent autoencoder on the real images (no labels needed).

:func:`fit_autoencoder` is what ``diffmask-fit-autoencoder`` runs (:mod:`diffmask.cli.fit_autoencoder`,
which skips a complete stage and seeds the run first): the fit resumes from the stage's checkpoints;
then the export (``AutoencoderKL`` folder with the measured ``scaling_factor``, ``autoencoder.json``),
the test sets' PSNR / SSIM (:func:`evaluate`, ``test_metrics.json``), ``grid.png``, optionally the
training images' reconstructions as a synthetic set (:func:`write_reconstructions`), and
``stage.json`` / ``metrics.json``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig

from diffmask.artifacts import StageDir, atomic_write_bytes, atomic_write_json
from diffmask.autoencoder.module import AutoencoderLitModule, psnr, reconstruct, save_grid, ssim
from diffmask.data.datamodule import SegmentationDataModule
from diffmask.data.manifest import ManifestRow, write_manifest
from diffmask.refine.images import to_uint8_images
from diffmask.stages import commit_fit_stage, resumable_fit

__all__ = [
    "build_autoencoder_fit",
    "evaluate",
    "export_autoencoder",
    "fit_autoencoder",
    "write_reconstructions",
]

# the stage's messages keep the logger name of diffmask-fit-autoencoder
log = logging.getLogger("diffmask.fit_autoencoder")


@torch.no_grad()
def evaluate(
    vae, loaders: list, names: list[str]
) -> tuple[dict[str, dict[str, float]], dict[str, torch.Tensor]]:
    """PSNR / SSIM (mean, std, n) of each test set's reconstructions, and a few (original,
    reconstruction) pairs.

    Args:
        vae: the autoencoder.
        loaders: one loader per test set.
        names: the test sets' names, in ``loaders`` order.
    """
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
        results[name] = {
            "psnr": float(p_all.mean()),
            "psnr_std": float(p_all.std()) if len(p_all) > 1 else 0.0,
            "ssim": float(s_all.mean()),
            "ssim_std": float(s_all.std()) if len(s_all) > 1 else 0.0,
            "n": len(p_all),
        }
        examples[name] = torch.stack([torch.cat(originals), torch.cat(recons)])
    return results, examples


@torch.no_grad()
def write_reconstructions(vae, datamodule: SegmentationDataModule, folder: Path, batch_size: int = 16) -> int:
    """The real training images' reconstructions + their masks as a manifest set in ``folder``.

    Args:
        vae: the autoencoder.
        datamodule: the fit's data (its selected real training images).
        folder: the set's folder.
        batch_size: images per autoencoder call.

    Returns:
        The number of samples written.
    """
    from diffmask.synthesis.writer import _png_bytes  # noqa: PLC0415

    ids = list(datamodule.real_train_ids)
    dataset = datamodule.real_dataset(ids)
    rows = []
    for start in range(0, len(ids), batch_size):
        items = [dataset[i] for i in range(start, min(start + batch_size, len(ids)))]
        images = torch.stack([it["image"] for it in items])
        recon = to_uint8_images(reconstruct(vae, images))  # (B, S, S) grey or (B, S, S, 3) RGB
        for item, r in zip(items, recon, strict=True):
            sid = str(item["id"])
            atomic_write_bytes(folder / "images" / f"{sid}.png", _png_bytes(r))
            atomic_write_bytes(folder / "masks" / f"{sid}.png", _png_bytes(item["label"][0].numpy()))
            rows.append(
                ManifestRow(
                    id=sid,
                    file_name=f"images/{sid}.png",
                    sem_seg_file_name=f"masks/{sid}.png",
                    source="synthetic",
                    meta=dict(item["meta"]),
                    pair_id=sid,
                )
            )
    write_manifest(folder, rows)
    return len(rows)


def build_autoencoder_fit(cfg: DictConfig) -> tuple[SegmentationDataModule, AutoencoderLitModule]:
    """The data (set up, so bad data fails first) and the module; a ValueError when their channels differ.

    Args:
        cfg: the ``fit_autoencoder`` config.
    """
    datamodule = hydra.utils.instantiate(cfg.data)
    datamodule.setup("fit")
    model = hydra.utils.instantiate(cfg.autoencoder)
    if int(model.vae.config.in_channels) != datamodule.channels:
        raise ValueError(
            f"autoencoder.vae.in_channels={model.vae.config.in_channels}, "
            f"but data.channels={datamodule.channels}; "
            "the autoencoder reads the data's images as they are (set both from data.channels)"
        )
    return datamodule, model


def export_autoencoder(
    cfg: DictConfig, model: AutoencoderLitModule, datamodule: SegmentationDataModule, work: Path
) -> tuple[dict[str, dict[str, float]], int]:
    """Write the autoencoder, its test scores, ``grid.png`` and (``reconstructions=true``) the
    reconstructions set into ``work``.

    Args:
        cfg: the ``fit_autoencoder`` config (``grid_images``, ``reconstructions``).
        model: the fitted module.
        datamodule: its data.
        work: the stage's work folder.

    Returns:
        The per-test-set scores and the number of reconstructions written.
    """
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
        atomic_write_json(
            recon_dir / "stage.json",
            {
                "status": "complete",
                "intensity": datamodule.intensity,
                "channels": datamodule.channels,
                "counts": {"n_samples": n_recon},
            },
        )
    return results, n_recon


def fit_autoencoder(cfg: DictConfig, stage: StageDir) -> dict[str, Any]:
    """Fit the autoencoder described by ``cfg`` and export it into ``stage``.

    Args:
        cfg: the ``fit_autoencoder`` config (seeded already).
        stage: the stage folder (of ``cfg.output_dir``).

    Returns:
        The final ``train/*`` and ``val/*`` metrics (with the test scores).
    """
    datamodule, model = build_autoencoder_fit(cfg)
    work = stage.begin(resume=True)
    trainer, metrics, fit_seconds = resumable_fit(cfg, model, datamodule, work)
    if not trainer.is_global_zero:
        return metrics
    results, n_recon = export_autoencoder(cfg, model, datamodule, work)
    test = {
        f"test/{name}/{k}": v for name, r in results.items() for k, v in r.items() if k in ("psnr", "ssim")
    }
    counts = {
        "n_real_train": len(datamodule.real_train_ids),
        "resolution": model.resolution,
        "factor": model.factor,
        "scaling_factor": float(model.vae.config.scaling_factor),
        "n_reconstructions": n_recon,
        "channels": datamodule.channels,
    }
    commit_fit_stage(cfg, stage, work, trainer, metrics, fit_seconds, datamodule,
                     "autoencoder_dir", counts,
                     extra={"test": results, "intensity": datamodule.intensity,
                            "channels": datamodule.channels},
                     extra_metrics=test)
    for name, r in results.items():
        log.info(
            "autoencoder %s: PSNR %.2f dB, SSIM %.4f on %d %s test images",
            stage.path,
            r["psnr"],
            r["ssim"],
            r["n"],
            name,
        )
    return metrics
