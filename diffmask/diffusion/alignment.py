"""Attention alignment: pull each class phrase's cross-attention towards that class's mask.

Trained from scratch, the class words (present in every caption) do not localise (attention-mask
IoU per step with and without it: experiments/masks/README.md); this loss, on a few labelled
images, makes them localise.

The loss, per captured cross-attention layer whose grid side is in ``resolutions``:

* ``a_k(x)`` = head-averaged attention of pixel ``x`` on the tokens of class phrase ``k``
  (summed over the phrase's tokens, so it is that phrase's share of the softmax mass);
* the background bin is everything else, ``a_0 = 1 - sum_k a_k`` (BOS/EOS/padding/other words),
  so ``[a_0, a_1, ..., a_K]`` is a per-pixel distribution over background + classes;
* the target ``m_c(x)`` is the one-hot label map area-averaged to the layer's grid;
* loss = mean over pixels of the cross-entropy ``-sum_c m_c log a_c`` (= KL up to the target's
  entropy), averaged over the layers and the labelled items.

Zero-shot (a held-out class): with ``classes`` = the aligned subset ``A`` (e.g. the lungs), the
distribution is ``[1 - sum_{k in A} a_k, a_k for k in A]`` against ``[1 - sum_{k in A} m_k,
m_k for k in A]``. A held-out class's attention and mask fall into the "rest" bin only through
the aligned classes' complements, so the loss neither reads the held-out mask nor has a gradient
with respect to the held-out phrase's attention (its phrase stays in the prompt). With every
class aligned this is the loss above.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from diffmask.data.datamodule import collate_samples

__all__ = [
    "AttentionAlignment",
    "LabelledBatches",
    "aligned_class_index",
    "attention_alignment_loss",
    "class_token_index",
    "downsample_label",
]


def class_token_index(positions: Sequence[Sequence[Sequence[int]]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Pack ragged class-token positions for :class:`~diffmask.attention.AttentionRecorder`.

    Args:
        positions: per item, per class, the token positions of that class phrase (``[]`` for
            a class the prompt does not name: all pads, weight 0, so its attention is 0).

    Returns:
        ``index`` (B, K*M) long (the recorder's ``token_index``; pads repeat the first
        position) and ``weight`` (B, K, M) float with 1 on real positions, 0 on pads.
    """
    b = len(positions)
    k = len(positions[0])
    m = max(1, max(len(p) for item in positions for p in item))
    index = torch.zeros(b, k, m, dtype=torch.long)
    weight = torch.zeros(b, k, m)
    for i, item in enumerate(positions):
        if len(item) != k:
            raise ValueError(f"positions: item {i} has {len(item)} classes, expected {k}")
        for j, pos in enumerate(item):
            if not pos:
                continue
            index[i, j, :] = pos[0]
            index[i, j, : len(pos)] = torch.as_tensor(pos)
            weight[i, j, : len(pos)] = 1.0
    return index.view(b, k * m), weight


def downsample_label(label: torch.Tensor, num_classes: int, size: tuple[int, int]) -> torch.Tensor:
    """One-hot label maps (B, 1, H, W) int → area-averaged class fractions (B, C, h, w) in [0, 1]."""
    onehot = F.one_hot(label[:, 0].clamp(0, num_classes - 1), num_classes).permute(0, 3, 1, 2).float()
    return F.adaptive_avg_pool2d(onehot, size)


def attention_alignment_loss(
    maps: dict[str, torch.Tensor],
    weight: torch.Tensor,
    label: torch.Tensor,
    resolutions: Sequence[int] | None = None,
    eps: float = 1e-6,
    classes: Sequence[int] | None = None,
) -> tuple[torch.Tensor, int]:
    """Cross-entropy between attention-derived class distributions and downsampled masks.

    Args:
        maps: layer → (B, K*M, h, w) head-averaged attention probabilities of the packed class
            token positions (an ``AttentionRecorder``'s ``maps``).
        weight: (B, K, M) from :func:`class_token_index`.
        label: (B, 1, H, W) int64 label maps with values 0..K (0 = background).
        resolutions: grid sides (h) of the layers to use; None = every layer.
        eps: floor inside the log.
        classes: label values (1..K) of the aligned classes; None = all. The others are held
            out: the loss does not depend on their masks or their attention (zero-shot).

    Returns:
        (loss scalar, number of layers used). The loss is 0 (with grad-free zero) if no layer matches.
    """
    b, k, m = weight.shape
    aligned = aligned_class_index(classes, k)
    losses = []
    for fmap in maps.values():
        h, w = fmap.shape[-2:]
        if resolutions is not None and h not in resolutions:
            continue
        # only the aligned classes' maps are read, so held-out ones get no gradient
        chosen = fmap.view(b, k, m, h, w)[:, aligned]
        per_class = (chosen * weight[:, aligned].to(fmap)[..., None, None]).sum(2)  # (B, A, h, w)
        rest = (1.0 - per_class.sum(1, keepdim=True)).clamp_min(0.0)
        probs = torch.cat([rest, per_class], dim=1).float()
        # the same split of the target: held-out pixels count as "rest" via the aligned complements
        fractions = downsample_label(label, k + 1, (h, w)).to(probs.device)[:, [c + 1 for c in aligned]]
        target = torch.cat([(1.0 - fractions.sum(1, keepdim=True)).clamp_min(0.0), fractions], dim=1)
        losses.append(-(target * torch.log(probs + eps)).sum(1).mean())
    if not losses:
        return label.new_zeros((), dtype=torch.float32), 0
    return torch.stack(losses).mean(), len(losses)


def aligned_class_index(classes: Sequence[int] | None, num_classes: int) -> list[int]:
    """0-based positions (among the K foreground classes) of the aligned label values ``classes``."""
    if classes is None:
        return list(range(num_classes))
    values = [int(c) for c in classes]
    if not values or len(set(values)) != len(values) or not all(1 <= c <= num_classes for c in values):
        raise ValueError(
            f"classes: expected distinct foreground label values in 1..{num_classes}, got {list(classes)}"
        )
    return sorted(c - 1 for c in values)


class AttentionAlignment:
    """Settings of the alignment loss (a part of :class:`~diffmask.diffusion.DiffusionLitModule`).

    Args:
        label_fraction: share of the real training split whose masks are used (0 = off, the
            paper's pure method; 0.1 of JSRT's 173 = 17 images). The subset is
            ``select_fraction(real.ids("train"), label_fraction, seed)`` — the same draw the
            segmentation stage makes for ``real_fraction``, so equal fractions mean equal images.
        weight: factor of the alignment loss added to the denoising loss.
        resolutions: attention grid sides used (e.g. [8, 16]); None = every cross-attention layer.
        seed: seed of the draw; None = the datamodule's seed (the segmentation stage's default).
        classes: names of the aligned classes (e.g. ``[left_lung, right_lung]``); None = every
            foreground class. The others are held out (zero-shot): still named in the prompt,
            but their attention gets no alignment loss. Checked against the prompt builder's
            class names by :class:`~diffmask.diffusion.DiffusionLitModule`.
        batch_size: labelled items drawn per training step (per device) from the labelled
            subset, next to the main batch, so every step has an alignment signal (17 of 173
            images would otherwise land in a batch of 8 less than once per step). They share
            the main batch's UNet call; their denoising loss is not counted, so the 17 images
            are not over-represented in what the generator learns to draw.
    """

    def __init__(
        self,
        label_fraction: float = 0.0,
        weight: float = 0.1,
        resolutions: Sequence[int] | None = None,
        seed: int | None = None,
        classes: Sequence[str] | None = None,
        batch_size: int = 4,
    ):
        if not 0.0 <= label_fraction <= 1.0:
            raise ValueError(f"align.label_fraction: expected a fraction in [0, 1], got {label_fraction}")
        if weight < 0:
            raise ValueError(f"align.weight: expected >= 0, got {weight}")
        if resolutions is not None:
            resolutions = [int(r) for r in resolutions]
            if not resolutions or min(resolutions) < 1:
                raise ValueError(
                    f"align.resolutions: expected positive grid sides or null, got {resolutions}"
                )
        if classes is not None:
            if isinstance(classes, str):
                classes = [classes]
            classes = [str(c) for c in classes]
            if not classes or len(set(classes)) != len(classes) or "background" in classes:
                raise ValueError(
                    f"align.classes: expected distinct foreground class names or null (all), got {classes}"
                )
        if int(batch_size) < 1:
            raise ValueError(f"align.batch_size: expected >= 1 labelled items per step, got {batch_size}")
        self.batch_size = int(batch_size)
        self.classes = classes
        self.label_fraction = float(label_fraction)
        self.weight = float(weight)
        self.resolutions = resolutions
        self.seed = seed

    @property
    def enabled(self) -> bool:
        """Whether the alignment loss is on (some labelled images and a positive weight)."""
        return self.label_fraction > 0 and self.weight > 0

    def class_values(self, class_names: Sequence[str]) -> list[int] | None:
        """Label values of the aligned classes given the model's class names (background first).

        Returns:
            None when every class is aligned, else the sorted label values (1..K).

        Raises:
            ValueError: a name in ``classes`` is not a foreground class.
        """
        if self.classes is None:
            return None
        names = list(class_names)
        unknown = [c for c in self.classes if c not in names[1:]]
        if unknown:
            raise ValueError(f"align.classes: {unknown} not among the foreground classes {names[1:]}")
        return sorted(names.index(c) for c in self.classes)


class LabelledBatches:
    """Endless batches of the labelled items: shuffled passes over ``dataset``, seeded.

    Args:
        dataset: items with ``image``, ``label``, ``meta``, ``id`` (a
            :class:`~diffmask.data.SegmentationDataset` over the labelled ids).
        batch_size: items per batch (an item repeats when the dataset is smaller).
        seed: seed of the order (give each DDP rank its own).
    """

    def __init__(self, dataset: torch.utils.data.Dataset, batch_size: int, seed: int = 0):
        if len(dataset) == 0:
            raise ValueError("align: the labelled subset is empty")
        self.dataset = dataset
        self.batch_size = batch_size
        self.generator = torch.Generator().manual_seed(int(seed))
        self._order: list[int] = []

    def next(self) -> dict:
        """The next batch of ``batch_size`` items, collated; a new shuffled pass starts when one runs out."""
        items = []
        while len(items) < self.batch_size:
            if not self._order:
                self._order = torch.randperm(len(self.dataset), generator=self.generator).tolist()
            items.append(self.dataset[self._order.pop()])
        return collate_samples(items)
