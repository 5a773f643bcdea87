"""The codebook stage: the visual codebook of the real images' patches (issue 17).

:func:`fit_codebook` is what ``diffmask-fit-codebook`` runs (:mod:`diffmask.cli.fit_codebook`, which
skips a complete stage and seeds the run first): k-means over the patch features of the project
autoencoder's posterior mean on every selected real training image, then its usage on the training
and test images (:func:`codebook_usages`); writes ``codebook.json``, ``codebook.pt``, ``codes.json``
and ``stage.json`` into the stage folder and ``metrics.json`` into the run dir.
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
from diffmask.codebook.codebook import VisualCodebook, codebook_usage
from diffmask.data.datamodule import SegmentationDataModule
from diffmask.data.dataset import SegmentationDataset
from diffmask.stages import write_metrics

__all__ = ["codebook_usages", "fit_codebook", "stack_images"]

# the stage's messages keep the logger name of diffmask-fit-codebook
log = logging.getLogger("diffmask.fit_codebook")


def stack_images(dataset: SegmentationDataset) -> torch.Tensor:
    """Every image of ``dataset`` as one (N, C, S, S) tensor.

    Args:
        dataset: the images, served as the datamodule serves them.
    """
    return torch.stack([dataset[i]["image"] for i in range(len(dataset))])


def _assign(book: VisualCodebook, images: torch.Tensor, batch_size: int = 32) -> torch.Tensor:
    return torch.cat([book.assign(images[i : i + batch_size]) for i in range(0, len(images), batch_size)])


def codebook_usages(
    book: VisualCodebook, codes: torch.Tensor, datamodule: SegmentationDataModule
) -> dict[str, dict]:
    """Usage (counts, dead codes, perplexity) of the training images' ``codes`` and of each test set's.

    Args:
        book: the fitted codebook.
        codes: the training images' code grids.
        datamodule: the data (its test sets: the real test split, then the extra sets' ``test`` rows).
    """
    usage = {"train": codebook_usage(codes.numpy(), book.size)}
    for name, source in datamodule.test_sources().items():
        if source is datamodule.real:
            dataset = datamodule.real_dataset(datamodule.real_ids("test"))
        else:
            dataset = SegmentationDataset(
                source,
                source.ids("test"),
                datamodule.size,
                intensity=datamodule.intensity,
                resize=datamodule.resize,
                channels=datamodule.channels,
            )
        usage[f"test/{name}"] = codebook_usage(_assign(book, stack_images(dataset)).numpy(), book.size)
    return usage


def fit_codebook(cfg: DictConfig, stage: StageDir) -> dict[str, Any]:
    """Build the codebook described by ``cfg`` into ``stage``.

    Args:
        cfg: the ``fit_codebook`` config (seeded already).
        stage: the stage folder (of ``cfg.output_dir``).

    Returns:
        The usage figures (``codebook/<set>/n_dead``, ``codebook/<set>/perplexity``).
    """
    datamodule = hydra.utils.instantiate(cfg.data)
    datamodule.setup("fit")
    if not cfg.codebook.autoencoder_dir:
        raise ValueError(
            "codebook.autoencoder_dir: expected a diffmask-fit-autoencoder stage folder (the patch encoder)"
        )
    ae_dir = str(cfg.codebook.autoencoder_dir)
    vae = load_autoencoder(ae_dir, resolution=datamodule.size, channels=datamodule.channels)
    ids = list(datamodule.real_train_ids)
    images = stack_images(datamodule.real_dataset(ids))
    work = stage.begin()
    start = time.time()
    book = VisualCodebook.fit(
        vae,
        images,
        int(cfg.codebook.size),
        int(cfg.codebook.patch),
        iters=int(cfg.codebook.iters),
        seed=int(cfg.seed),
        autoencoder_dir=ae_dir,
    )
    fit_seconds = time.time() - start
    codes = _assign(book, images)
    usage = codebook_usages(book, codes, datamodule)
    summary = {k: {"n_dead": u["n_dead"], "perplexity": round(u["perplexity"], 2)} for k, u in usage.items()}
    data = {"intensity": datamodule.intensity, "channels": datamodule.channels}
    book.save(
        work,
        extra={
            **data,
            "real": datamodule.real.name,
            "usage": summary,
            "dead_codes": usage["train"]["dead_codes"],
            "counts": usage["train"]["counts"],
        },
    )
    atomic_write_json(work / "codes.json", {sid: c.tolist() for sid, c in zip(ids, codes, strict=True)})
    counts = {
        "size": book.size,
        "patch": book.patch,
        "grid": book.grid,
        "n_images": len(ids),
        "n_dead": usage["train"]["n_dead"],
        "perplexity": round(usage["train"]["perplexity"], 2),
        "fit_seconds": round(fit_seconds, 1),
    }
    stage.commit(
        config=OmegaConf.to_container(cfg, resolve=True),
        inputs={"autoencoder_dir": ae_dir},
        counts=counts,
        extra={"usage": summary, **data},
    )
    metrics = {f"codebook/{k}/{m}": v for k, u in summary.items() for m, v in u.items()}
    write_metrics(
        Path(cfg.paths.output_dir) / "metrics.json",
        metrics,
        extra={"codebook_dir": str(stage.path), **counts},
    )
    for k, u in summary.items():
        log.info(
            "codebook %s: %s: %d dead codes of %d, perplexity %.1f",
            stage.path,
            k,
            u["n_dead"],
            book.size,
            u["perplexity"],
        )
    return metrics
