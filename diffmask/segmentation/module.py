"""The segmentation stage: any backbone, Dice+CE loss, per-class IoU/Dice on val and test.

With ``merge.alpha`` set (random merging masks, EMIT-Diff; :mod:`diffmask.segmentation.merge`)
each training batch pairs real images with synthetic variants of them (``pair_image``,
``pair_label``, served by the datamodule in paired mode) and the loss is taken on the real and
synthetic predictions merged patch by patch.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from pathlib import Path

import pytorch_lightning as pl
import torch
import torch.nn.functional as F

from diffmask.evaluation.metrics import SegmentationScores, class_counts, dice_from_counts, iou_from_counts
from diffmask.labels import drop_small_components, keep_largest_components, validate_class_names
from diffmask.segmentation.merge import MergeSettings, merge_pair, patch_merge_mask

log = logging.getLogger(__name__)

__all__ = ["DiceCELossWithIgnore", "SegmentationLitModule", "load_net_weights", "resolve_checkpoint"]


def _drop_unused_cross_attention_norms(net: torch.nn.Module) -> torch.nn.Module:
    """MONAI's ``TransformerBlock`` always builds a ``norm_cross_attn`` LayerNorm, used only with
    cross-attention; in UNETR & co. it never gets a gradient and plain DDP fails on it."""
    from monai.networks.blocks import TransformerBlock  # noqa: PLC0415

    for module in net.modules():
        if isinstance(module, TransformerBlock) and not getattr(module, "with_cross_attention", False):
            if isinstance(getattr(module, "norm_cross_attn", None), torch.nn.LayerNorm):
                module.norm_cross_attn = torch.nn.Identity()
    return net


class DiceCELossWithIgnore(torch.nn.Module):
    """Soft Dice + cross-entropy on logits, skipping pixels labelled ``ignore_index``.

    Without ignored pixels it equals MONAI's ``DiceCELoss(to_onehot_y=True, softmax=True)``
    (Dice per image and class, background included, averaged; smoothing 1e-5). Ignored pixels
    (uncertain borders of synthetic masks, unlabelled images) count in neither term.

    Args:
        lambda_dice: weight of the Dice term.
        lambda_ce: weight of the cross-entropy term.
        ignore_index: label value of pixels without a label.
        smooth: additive smoothing of the Dice numerator and denominator.
    """

    def __init__(
        self, lambda_dice: float = 1.0, lambda_ce: float = 1.0, ignore_index: int = 255, smooth: float = 1e-5
    ):
        super().__init__()
        if lambda_dice < 0 or lambda_ce < 0 or lambda_dice + lambda_ce == 0:
            raise ValueError(
                f"lambda_dice/lambda_ce: expected >= 0 and not both 0, got {lambda_dice}, {lambda_ce}"
            )
        self.lambda_dice, self.lambda_ce = float(lambda_dice), float(lambda_ce)
        self.ignore_index = int(ignore_index)
        self.smooth = float(smooth)

    def forward(self, logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        """``logits`` (B, C, H, W); ``label`` (B, 1, H, W) or (B, H, W) class indices."""
        target = label[:, 0] if label.dim() == logits.dim() else label
        target = target.long()
        valid = target != self.ignore_index
        num_classes = logits.shape[1]
        bad = valid & ((target < 0) | (target >= num_classes))
        if bad.any():
            raise ValueError(
                f"label: values {sorted(target[bad].unique().tolist())} "
                f"are not classes 0..{num_classes - 1} "
                f"nor ignore_index {self.ignore_index}"
            )
        loss = logits.new_zeros(())
        if self.lambda_ce:
            # all-ignored batches would give NaN; they contribute nothing
            ce = F.cross_entropy(logits, target, ignore_index=self.ignore_index, reduction="sum")
            loss = loss + self.lambda_ce * ce / valid.sum().clamp(min=1)
        if self.lambda_dice:
            mask = valid.unsqueeze(1).to(logits.dtype)
            probs = logits.softmax(1) * mask
            onehot = F.one_hot(target.where(valid, 0), num_classes).permute(0, 3, 1, 2)
            onehot = onehot.to(logits.dtype) * mask
            dims = (2, 3)
            inter = (probs * onehot).sum(dims)
            denom = probs.sum(dims) + onehot.sum(dims)
            dice = 1.0 - (2.0 * inter + self.smooth) / (denom + self.smooth)
            loss = loss + self.lambda_dice * dice.mean()
        return loss


def resolve_checkpoint(model: str | Path, field: str = "model") -> Path:
    """The checkpoint of ``model``: a ``diffmask-train`` run folder (its ``metrics.json``
    ``best_checkpoint``) or a checkpoint / state-dict file.

    A run folder moved since it was written is still found: a ``best_checkpoint`` that no longer
    exists is looked for under the folder's own ``checkpoints/``.

    Raises:
        FileNotFoundError: naming ``field`` and the folder or file when there is no checkpoint
            (a ``train=false`` run has none).
    """
    path = Path(model)
    if path.is_file():
        return path
    if not path.is_dir():
        raise FileNotFoundError(
            f"{field}: {path} not found; expected a diffmask-train run folder, a checkpoint "
            "(<run>/checkpoints/*.ckpt, also in metrics.json 'best_checkpoint') or a torch state dict"
        )
    metrics = path / "metrics.json"
    best = json.loads(metrics.read_text()).get("best_checkpoint") if metrics.is_file() else None
    if not best:
        raise FileNotFoundError(
            f"{field}: {path}: no checkpoint: a folder without a metrics.json naming a best_checkpoint (a "
            "train=false run has none); expected a finished diffmask-train run folder, "
            "or pass the checkpoint file"
        )
    for candidate in (Path(best), path / "checkpoints" / Path(best).name):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"{field}: {metrics}: best_checkpoint {best} not found (nor under {path / 'checkpoints'})"
    )


def load_net_weights(net: torch.nn.Module, path: str | Path) -> torch.nn.Module:
    """Load a backbone's weights from a ``diffmask-train`` checkpoint or a plain state dict.

    Used to fine-tune a network trained elsewhere (e.g. on synthetic data) on real images:
    only the weights are taken, not the optimizer, schedule or epoch count. ``path`` is a
    checkpoint file, a plain state dict, or a finished run folder (its ``metrics.json``
    ``best_checkpoint``), so a multirun can fine-tune each seed from its own pre-training run:
    ``-m seed=0,1,2 'segmentation.init_weights=<pretrain multirun>/${seed}'``.

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: the file holds no state dict, or its tensors do not fit ``net``.
    """
    path = resolve_checkpoint(path, field="segmentation.init_weights")
    # checkpoints written by diffmask-train hold config objects, hence full unpickling
    obj = torch.load(path, map_location="cpu", weights_only=False)
    state = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"segmentation.init_weights: {path} holds no state dict of tensors")
    if any(k.startswith("net.") for k in state):
        state = {k[len("net."):]: v for k, v in state.items() if k.startswith("net.")}
    own = net.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        raise ValueError(
            f"segmentation.init_weights: {path} does not fit this backbone "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]}, other shapes {wrong[:3]}); "
            "use the same segmentation config as the run that wrote it"
        )
    net.load_state_dict(state)
    log.info("segmentation: backbone starts from the weights in %s", path)
    return net


class SegmentationLitModule(pl.LightningModule):
    """Trains a segmentation network on batches ``{"image": (B,1,H,W), "label": (B,1,H,W)}``.

    Logged keys: ``train/loss``, ``val/loss``, ``val/miou``, ``val/iou_<class>`` (and the other
    :class:`~diffmask.evaluation.metrics.SegmentationScores` keys), and per test set
    ``test/<set>/iou_<class>``, ``test/<set>/dice_<class>``, ``test/<set>/miou``, ``test/<set>/mdice``
    (per-image means) and ``test/<set>/agg_iou_<class>``, ``test/<set>/agg_dice_<class>``,
    ``test/<set>/agg_miou``, ``test/<set>/agg_mdice`` (dataset-level aggregates); set names come
    from the datamodule's ``test_set_names``. Scores follow :mod:`diffmask.evaluation.metrics`: an
    image whose ground truth lacks a class scores 1 on it when the prediction lacks it too, 0
    otherwise; a class that no image of a set labels is not scored on that set.

    After ``trainer.test``, :attr:`per_image` holds one row per test image and set,
    ``{set, id, iou_<class>, dice_<class>}`` for the foreground classes, with the same per-image
    scores; NaN only for a class that the image's set never labels.

    Args:
        net: backbone mapping (B, C_in, H, W) to logits (B, num_classes, H, W).
        class_names: class names, background first; ``len(class_names)`` = number of outputs.
        optimizer: partial optimizer factory taking the parameters.
        scheduler: optional partial LR-scheduler factory taking the optimizer (stepped per epoch).
        lambda_dice: weight of the Dice term.
        lambda_ce: weight of the cross-entropy term.
        ignore_index: label value excluded from the loss and the scores (e.g. the uncertain
            border band of synthetic masks, ``data.synthetic_ignore_margin``).
        init_weights: optional checkpoint to start the backbone from (see
            :func:`load_net_weights`): synthetic pre-training, then real fine-tuning.
        postprocess: ``None`` or ``largest_component``: each class of a prediction keeps only
            its largest connected region (validation, test and predict alike;
            :func:`~diffmask.labels.keep_largest_components`).
        min_region_pixels: predicted regions (8-connected, per class) smaller than this many pixels
            at the working size become background (0: none): a speck on a lesion-free image
            costs that image its whole score (:func:`~diffmask.labels.drop_small_components`).
        merge: random merging masks (EMIT-Diff), ``{alpha, patch}`` as a mapping or a
            :class:`~diffmask.segmentation.merge.MergeSettings`; ``alpha`` null (the default)
            = off. On, training batches must carry ``pair_image`` and ``pair_label`` (the
            datamodule's paired mode, which ``diffmask-train`` turns on with it): both images go
            through the net in one forward pass, and ``train/loss`` is the loss of the two
            predictions and labels merged with a fresh Bernoulli(``alpha``) mask of
            ``patch``-pixel blocks (True = real), drawn from torch's global RNG.

    Examples::

        from functools import partial
        from monai.networks.nets import UNet
        net = UNet(2, 1, 4, channels=(16, 32, 64), strides=(2, 2))
        module = SegmentationLitModule(net, ["background", "left_lung", "right_lung", "heart"],
                                       optimizer=partial(torch.optim.AdamW, lr=1e-3))
    """

    def __init__(
        self,
        net: torch.nn.Module,
        class_names: list[str] | tuple[str, ...],
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[..., torch.optim.lr_scheduler.LRScheduler] | None = None,
        lambda_dice: float = 1.0,
        lambda_ce: float = 1.0,
        ignore_index: int = 255,
        init_weights: str | None = None,
        postprocess: str | None = None,
        merge: MergeSettings | Mapping | None = None,
        min_region_pixels: int = 0,
    ):
        super().__init__()
        self.merge = MergeSettings.from_config(merge)
        if postprocess not in (None, "largest_component"):
            raise ValueError(f"postprocess: expected null or largest_component, got {postprocess!r}")
        self.postprocess = postprocess
        if min_region_pixels < 0:
            raise ValueError(f"min_region_pixels: expected >= 0 pixels, got {min_region_pixels}")
        self.min_region_pixels = int(min_region_pixels)
        self.save_hyperparameters(ignore=["net"], logger=False)
        self.net = _drop_unused_cross_attention_norms(net)
        if init_weights:
            load_net_weights(self.net, init_weights)
        self.class_names = validate_class_names(class_names)
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.loss_fn = DiceCELossWithIgnore(lambda_dice, lambda_ce, ignore_index)
        self.ignore_index = ignore_index
        self.val_scores = SegmentationScores(self.class_names, ignore_index)
        self.test_scores = torch.nn.ModuleList()
        self.test_set_names: list[str] = []
        # after a test: {set, id, iou_<class>, dice_<class>} per test image
        # (NaN: class the set never labels)
        self.per_image: list[dict] = []

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """(B, C_in, H, W) images -> (B, num_classes, H, W) logits of the backbone."""
        return self.net(image)

    def labels(self, logits: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) logits -> (B, H, W) predicted labels, post-processed as configured."""
        pred = logits.argmax(1)
        if self.postprocess == "largest_component":
            kept = keep_largest_components(pred.cpu().numpy(), len(self.class_names))
            pred = torch.from_numpy(kept).to(pred.device)
        if self.min_region_pixels:
            kept = drop_small_components(pred.cpu().numpy(), len(self.class_names), self.min_region_pixels)
            pred = torch.from_numpy(kept).to(pred.device)
        return pred

    def setup(self, stage: str) -> None:
        """Before testing, builds one score accumulator per test set of the datamodule.

        Args:
            stage: Lightning's stage (``fit``, ``validate``, ``test``, ``predict``); only ``test``
                does anything.
        """
        if stage == "test":
            dm = getattr(self.trainer, "datamodule", None)
            names = list(getattr(dm, "test_set_names", None) or ["test"])
            if names != self.test_set_names:
                self.test_set_names = names
                self.test_scores = torch.nn.ModuleList(
                    SegmentationScores(self.class_names, self.ignore_index) for _ in names
                )

    def _check_logits(self, logits: torch.Tensor) -> None:
        if logits.shape[1] != len(self.class_names):
            raise ValueError(
                f"net outputs {logits.shape[1]} channels but class_names has {len(self.class_names)} "
                f"classes ({list(self.class_names)}); set the backbone's out_channels"
            )

    def _merged_logits(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits and labels of a paired batch, merged with a fresh patch mask (``merge`` on)."""
        missing = [k for k in ("pair_image", "pair_label") if k not in batch]
        if missing:
            raise ValueError(
                f"segmentation.merge.alpha={self.merge.alpha:g} needs paired training batches, "
                f"but this one has no "
                f"{', '.join(missing)}: the data must be paired (SegmentationDataModule(paired=True), which "
                "diffmask-train sets when segmentation.merge.alpha is not null, "
                "with a data.synthetic_dir whose "
                "rows carry pair_id)"
            )
        image, pair_image = batch["image"], batch["pair_image"]
        if pair_image.shape != image.shape:
            raise ValueError(
                f"pair_image: expected the shape of image {tuple(image.shape)}, got {tuple(pair_image.shape)}"
            )
        both = self(torch.cat([image, pair_image]))
        self._check_logits(both)
        real_logits, syn_logits = both[: image.shape[0]], both[image.shape[0] :]
        mask = patch_merge_mask(real_logits.shape, self.merge.patch, self.merge.alpha, device=both.device)
        return merge_pair(real_logits, syn_logits, batch["label"], batch["pair_label"], mask)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        """Loss of one training batch (of the merged pair when ``merge`` is on), logged as ``train/loss``.

        Args:
            batch: ``{"image", "label"}``, plus ``pair_image`` and ``pair_label`` with ``merge`` on.
            batch_idx: index of the batch in the epoch (unused).

        Returns:
            The scalar loss.
        """
        if self.merge.enabled:
            logits, label = self._merged_logits(batch)
        else:
            logits, label = self(batch["image"]), batch["label"]
            self._check_logits(logits)
        loss = self.loss_fn(logits, label)
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=logits.shape[0])
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        """Logs ``val/loss`` of one batch and adds its post-processed predictions to the scores.

        Args:
            batch: ``{"image", "label"}``.
            batch_idx: index of the batch in the epoch (unused).
        """
        logits = self(batch["image"])
        loss = self.loss_fn(logits, batch["label"])
        self.val_scores.update(self.labels(logits), batch["label"][:, 0])
        self.log("val/loss", loss, on_epoch=True, sync_dist=True, batch_size=logits.shape[0])

    def on_validation_epoch_end(self) -> None:
        """Logs the epoch's ``val/miou`` and the other ``val/`` scores, then resets them."""
        scores = self.val_scores.compute()
        miou = scores.pop("miou")
        self.log_dict({f"val/{k}": v for k, v in scores.items()})
        self.log("val/miou", miou, prog_bar=True)
        self.val_scores.reset()

    def on_test_epoch_start(self) -> None:
        """Clears :attr:`per_image` of an earlier test."""
        self.per_image = []

    def test_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        """Adds one batch of a test set to its scores and its images' rows to :attr:`per_image`.

        Args:
            batch: ``{"image", "label", "id"}``.
            batch_idx: index of the batch in the set (unused).
            dataloader_idx: which test set, an index into ``test_set_names``.
        """
        logits = self(batch["image"])
        pred, target = self.labels(logits), batch["label"][:, 0]
        self.test_scores[dataloader_idx].update(pred, target)
        # per-image IoU and Dice for paired comparisons of two models on the same images
        # (diffmask-compare)
        counts = class_counts(pred, target, len(self.class_names), self.ignore_index)
        iou, dice = iou_from_counts(counts).cpu().tolist(), dice_from_counts(counts).cpu().tolist()
        for sid, iou_row, dice_row in zip(batch["id"], iou, dice, strict=True):
            self.per_image.append({
                "set": self.test_set_names[dataloader_idx], "id": str(sid),
                **{f"iou_{name}": iou_row[c] for c, name in enumerate(self.class_names) if c > 0},
                **{f"dice_{name}": dice_row[c] for c, name in enumerate(self.class_names) if c > 0},
            })

    def on_test_epoch_end(self) -> None:
        """Logs each set's ``test/<set>/`` scores and completes :attr:`per_image`.

        Rows are gathered over ranks (one per set and id), and a class a set never labels is set
        to NaN on every row of that set.
        """
        # per set: the classes no image of it labels (synced over ranks)
        unlabelled: dict[str, list[str]] = {}
        for name, scores in zip(self.test_set_names, self.test_scores, strict=True):
            values = scores.compute()
            unlabelled[name] = [c for c in self.class_names[1:] if f"iou_{c}" not in values]
            # add_dataloader_idx=False keeps flat keys like test/jsrt/miou
            self.log_dict({f"test/{name}/{k}": v for k, v in values.items()}, add_dataloader_idx=False)
            scores.reset()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            gathered = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(gathered, self.per_image)
            # the distributed sampler pads with repeats: one row per (set, id)
            unique = {(r["set"], r["id"]): r for rows in gathered for r in rows}
            self.per_image = list(unique.values())
        # the set-level rule: a class the set never labels is not scored on any of its images
        for row in self.per_image:
            for c in unlabelled.get(row["set"], ()):
                row[f"iou_{c}"] = row[f"dice_{c}"] = float("nan")

    def predict_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        """Post-processed predicted labels of a batch.

        Args:
            batch: ``{"image"}`` at least.
            batch_idx: index of the batch (unused).

        Returns:
            (B, H, W) ``uint8`` class indices.
        """
        return self.labels(self(batch["image"])).to(torch.uint8)

    def configure_optimizers(self):
        """The optimizer built from the factory, with the per-epoch LR scheduler when one is set."""
        optimizer = self.optimizer_factory(params=self.parameters())
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer=optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler}}
