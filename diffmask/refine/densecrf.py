"""Fully connected CRF (Krähenbühl & Koltun) over attention probabilities, guided by the image.

The appearance (bilateral) kernel compares pixel colours: a colour image is used as it is (RGB),
a grey one is repeated to three equal channels (pydensecrf takes (H, W, 3) uint8).

Defaults are AffinityNet's: Gaussian sxy 3 / compat 3, bilateral sxy 80 / srgb 13 / compat 10,
10 mean-field iterations. Those kernel widths were tuned on ~500 px VOC images; with
``reference_size`` (e.g. 512) the spatial widths (``*_sxy``) are read as pixels *at that size*
and scaled by ``S / reference_size`` for an S-pixel image, so an 80 px kernel keeps covering
the same share of a 128 or 256 px image instead of a third of it. ``pydensecrf`` (from the
``pydensecrf2`` wheel) is imported inside the function so that importing diffmask does not need the
compiled extension.

:class:`ParallelRefiner` maps any picklable sample refiner over worker processes, so CPU-bound
CRF inference runs beside the GPU instead of stalling it.
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import numpy as np
import torch

from diffmask.refine.background import add_background
from diffmask.refine.chain import require_keys
from diffmask.refine.threshold import IGNORE_INDEX

__all__ = ["densecrf_refine", "DenseCRFRefiner", "ParallelRefiner"]


def _to_uint8_rgb(image: np.ndarray | torch.Tensor) -> np.ndarray:
    img = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    if img.ndim == 3 and img.shape[0] in (1, 3) and img.shape[-1] not in (1, 3):
        img = np.moveaxis(img, 0, -1)  # (C, H, W) -> (H, W, C)
    if img.ndim == 2:
        img = img[..., None]
    if img.ndim != 3 or img.shape[-1] not in (1, 3):
        raise ValueError(f"image: expected (H, W), (H, W, 1|3) or (1|3, H, W), got shape {img.shape}")
    if img.dtype != np.uint8:
        if img.min() < 0 or img.max() > 1:
            raise ValueError("image: expected uint8 or floats in [0, 1]")
        img = np.round(img * 255).astype(np.uint8)
    if img.shape[-1] == 1:
        img = np.repeat(img, 3, axis=-1)
    return np.ascontiguousarray(img)


def densecrf_refine(
    image: np.ndarray | torch.Tensor,
    probs: np.ndarray | torch.Tensor,
    gaussian_sxy: float = 3.0,
    gaussian_compat: float = 3.0,
    bilateral_sxy: float = 80.0,
    bilateral_srgb: float = 13.0,
    bilateral_compat: float = 10.0,
    iterations: int = 10,
    reference_size: int | None = None,
    prior: np.ndarray | None = None,
    prior_weight: float = 0.0,
    ignore_index: int = IGNORE_INDEX,
) -> np.ndarray:
    """Refine per-pixel class probabilities with a dense CRF.

    Args:
        image: (H, W) grey or (H, W, 3) RGB uint8 (or floats in [0, 1]; also (1|3, H, W)): the
            guidance; RGB colours enter the appearance kernel as they are, grey is repeated.
        probs: (K+1, H, W) non-negative class scores, background first; normalised per pixel
            here, and used as unaries (-log p).
        gaussian_sxy, gaussian_compat: smoothness kernel.
        bilateral_sxy, bilateral_srgb, bilateral_compat: appearance kernel.
        iterations: mean-field iterations.
        reference_size: image side the ``*_sxy`` widths are given for; they are scaled by
            ``max(H, W) / reference_size`` (None: used as pixels of this image, unscaled).
        prior: optional (H, W) label map of an earlier refinement step (values 0..K, or
            ``ignore_index`` for unsure pixels); mixed into the unaries with ``prior_weight``.
        prior_weight: w in [0, 1): unary probabilities ``(1 - w) p + w onehot(prior)`` (unsure
            pixels keep ``p``); 0 ignores the prior (the CRF sees the attention alone).
        ignore_index: the prior's "unsure" value.

    Returns:
        (K+1, H, W) float32 posterior probabilities (argmax over axis 0 gives the label map).

    Raises:
        ValueError: shapes disagree, fewer than 2 labels, or negative/NaN scores.
    """
    import pydensecrf.densecrf as dcrf  # compiled extension: imported on use

    rgb = _to_uint8_rgb(image)
    p = probs.detach().cpu().numpy() if isinstance(probs, torch.Tensor) else np.asarray(probs)
    p = p.astype(np.float32)
    if p.ndim != 3 or p.shape[0] < 2:
        raise ValueError(f"probs: expected (K+1, H, W) with background first, got shape {p.shape}")
    if p.shape[1:] != rgb.shape[:2]:
        raise ValueError(f"probs: spatial shape {p.shape[1:]} differs from the image {rgb.shape[:2]}")
    if not np.isfinite(p).all() or p.min() < 0:
        raise ValueError("probs: expected finite, non-negative scores")
    if iterations < 1:
        raise ValueError(f"iterations: expected >= 1, got {iterations}")
    if reference_size is not None and reference_size < 1:
        raise ValueError(f"reference_size: expected None or a positive image side, got {reference_size}")
    if not 0.0 <= prior_weight < 1.0:
        raise ValueError(f"prior_weight: expected a weight in [0, 1), got {prior_weight}")
    n, h, w = p.shape
    scale = 1.0 if reference_size is None else max(h, w) / float(reference_size)
    p = np.clip(p, 1e-6, None)
    p /= p.sum(axis=0, keepdims=True)
    if prior is not None and prior_weight > 0:
        prior = np.asarray(prior)
        if prior.shape != (h, w):
            raise ValueError(f"prior: expected an (H, W) = {(h, w)} label map, got shape {prior.shape}")
        sure = prior != ignore_index
        if (prior[sure] >= n).any():
            raise ValueError(f"prior: label values must be < {n} (or {ignore_index} = unsure), "
                             f"got {int(prior[sure].max())}")
        onehot = np.zeros_like(p)
        ys, xs = np.nonzero(sure)
        onehot[prior[sure].astype(np.int64), ys, xs] = 1.0
        p = np.where(sure[None], (1.0 - prior_weight) * p + prior_weight * onehot, p)
        p = np.clip(p, 1e-6, None)
    crf = dcrf.DenseCRF2D(w, h, n)
    crf.setUnaryEnergy(np.ascontiguousarray(-np.log(p).reshape(n, -1)))
    crf.addPairwiseGaussian(sxy=gaussian_sxy * scale, compat=gaussian_compat)
    crf.addPairwiseBilateral(sxy=bilateral_sxy * scale, srgb=bilateral_srgb, rgbim=rgb,
                             compat=bilateral_compat)
    q = np.asarray(crf.inference(int(iterations)), dtype=np.float32)
    return q.reshape(n, h, w)


class DenseCRFRefiner:
    """Keyed wrapper of :func:`densecrf_refine` for a sample dict (chainable).

    Reads ``sample[image_key]`` and the class maps ``sample[probs_key]`` (K, H, W) in [0, 1];
    adds a background score (see :func:`diffmask.refine.background.add_background`), runs the
    CRF and writes ``sample[label_key]`` (H, W) uint8 (0 background, ``ignore_index`` where the
    posterior's max is below ``ignore_below``) and ``sample[posterior_key]`` (K+1, H, W).
    With ``reference_size`` the ``*_sxy`` widths scale with the image (see the module docstring).
    With ``prior_weight`` > 0 it refines the label map an earlier step left in
    ``sample[label_key]`` (e.g. threshold's): that map is mixed into the unaries, so the CRF
    moves its boundaries to image edges instead of re-deciding every pixel from attention alone.
    First in a chain (no earlier label) it uses the attention alone.

    Examples::

        crf = DenseCRFRefiner(background=0.45, iterations=10)
        sample = crf({"image": img_uint8, "class_maps": maps})
    """

    def __init__(
        self,
        gaussian_sxy: float = 3.0,
        gaussian_compat: float = 3.0,
        bilateral_sxy: float = 80.0,
        bilateral_srgb: float = 13.0,
        bilateral_compat: float = 10.0,
        iterations: int = 10,
        reference_size: int | None = None,
        prior_weight: float = 0.0,
        background: float | str = "complement",
        background_power: float = 1.0,
        ignore_below: float | None = None,
        ignore_index: int = IGNORE_INDEX,
        image_key: str = "image",
        probs_key: str = "class_maps",
        label_key: str = "label",
        posterior_key: str = "crf_posterior",
    ):
        for field, value in (
            ("gaussian_sxy", gaussian_sxy),
            ("bilateral_sxy", bilateral_sxy),
            ("bilateral_srgb", bilateral_srgb),
        ):
            if value <= 0:
                raise ValueError(f"{field}: expected > 0, got {value}")
        if iterations < 1:
            raise ValueError(f"iterations: expected >= 1, got {iterations}")
        if reference_size is not None and reference_size < 1:
            raise ValueError(f"reference_size: expected None or a positive image side, got {reference_size}")
        if not 0.0 <= prior_weight < 1.0:
            raise ValueError(f"prior_weight: expected a weight in [0, 1), got {prior_weight}")
        if ignore_below is not None and not 0 < ignore_below < 1:
            raise ValueError(f"ignore_below: expected None or a probability in (0, 1), got {ignore_below}")
        add_background(np.zeros((1, 1, 1), np.float32), background, background_power)  # validates both
        self.params = dict(
            gaussian_sxy=float(gaussian_sxy),
            gaussian_compat=float(gaussian_compat),
            bilateral_sxy=float(bilateral_sxy),
            bilateral_srgb=float(bilateral_srgb),
            bilateral_compat=float(bilateral_compat),
            iterations=int(iterations),
            reference_size=None if reference_size is None else int(reference_size),
            prior_weight=float(prior_weight),
            ignore_index=int(ignore_index),
        )
        self.background = background
        self.background_power = float(background_power)
        self.ignore_below = ignore_below
        self.ignore_index = int(ignore_index)
        self.image_key = image_key
        self.probs_key = probs_key
        self.label_key = label_key
        self.posterior_key = posterior_key

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        require_keys(sample, (self.image_key, self.probs_key), "DenseCRFRefiner")
        maps = sample[self.probs_key]
        maps = maps.detach().cpu().numpy() if isinstance(maps, torch.Tensor) else np.asarray(maps, np.float32)
        scores = add_background(maps.astype(np.float32), self.background, self.background_power)
        prior = sample.get(self.label_key) if self.params["prior_weight"] > 0 else None
        if prior is not None:
            prior = prior.detach().cpu().numpy() if isinstance(prior, torch.Tensor) else np.asarray(prior)
        posterior = densecrf_refine(sample[self.image_key], scores, prior=prior, **self.params)
        label = posterior.argmax(axis=0).astype(np.uint8)
        if self.ignore_below is not None:
            label[posterior.max(axis=0) < self.ignore_below] = self.ignore_index
        out = dict(sample)
        out[self.label_key] = label
        out[self.posterior_key] = posterior
        return out


def _to_numpy(sample: dict[str, Any]) -> dict[str, Any]:
    # tensors are sent as numpy so workers never touch torch's thread pools or CUDA
    return {k: (v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else v) for k, v in sample.items()}


class ParallelRefiner:
    """Run a picklable sample refiner (e.g. :class:`DenseCRFRefiner`) in worker processes.

    Results come back in input order. Use as a context manager (or call :meth:`close`) so the
    pool is created once and reused across batches.

    Args:
        refiner: a picklable callable ``dict -> dict``.
        num_workers: worker processes; 0 runs in this process.
        mp_context: ``"spawn"`` (safe after CUDA was initialised) or ``"fork"`` / ``"forkserver"``.
        chunksize: samples per task sent to a worker.

    Examples::

        with ParallelRefiner(DenseCRFRefiner(), num_workers=4) as pool:
            refined = list(pool.map(samples))
    """

    def __init__(
        self,
        refiner: Callable[[dict[str, Any]], dict[str, Any]],
        num_workers: int = 2,
        mp_context: str = "spawn",
        chunksize: int = 1,
    ):
        if num_workers < 0:
            raise ValueError(f"num_workers: expected >= 0, got {num_workers}")
        if mp_context not in multiprocessing.get_all_start_methods():
            raise ValueError(
                f"mp_context: expected one of {multiprocessing.get_all_start_methods()}, got {mp_context!r}"
            )
        if chunksize < 1:
            raise ValueError(f"chunksize: expected >= 1, got {chunksize}")
        self.refiner = refiner
        self.num_workers = int(num_workers)
        self.mp_context = mp_context
        self.chunksize = int(chunksize)
        self._pool: ProcessPoolExecutor | None = None

    def map(self, samples: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        """Refine each sample; yields results in input order."""
        if self.num_workers == 0:
            for sample in samples:
                yield self.refiner(_to_numpy(sample))
            return
        if self._pool is None:
            self._pool = ProcessPoolExecutor(
                max_workers=self.num_workers, mp_context=multiprocessing.get_context(self.mp_context)
            )
        yield from self._pool.map(self.refiner, (_to_numpy(s) for s in samples), chunksize=self.chunksize)

    def close(self) -> None:
        """Shut the worker pool down (it is made again on the next :meth:`map`)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def __enter__(self) -> ParallelRefiner:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
