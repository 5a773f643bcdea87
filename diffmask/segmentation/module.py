"""The segmentation stage: any backbone, Dice+CE loss, per-class IoU/Dice on val and test."""

from __future__ import annotations

from collections.abc import Callable

import pytorch_lightning as pl
import torch
from monai.losses import DiceCELoss

from diffmask.evaluation.metrics import SegmentationScores
from diffmask.labels import validate_class_names

__all__ = ["SegmentationLitModule"]


def _drop_unused_cross_attention_norms(net: torch.nn.Module) -> torch.nn.Module:
    """MONAI's ``TransformerBlock`` always builds a ``norm_cross_attn`` LayerNorm, used only with
    cross-attention; in UNETR & co. it never gets a gradient and plain DDP fails on it."""
    from monai.networks.blocks import TransformerBlock  # noqa: PLC0415

    for module in net.modules():
        if isinstance(module, TransformerBlock) and not getattr(module, "with_cross_attention", False):
            if isinstance(getattr(module, "norm_cross_attn", None), torch.nn.LayerNorm):
                module.norm_cross_attn = torch.nn.Identity()
    return net


class SegmentationLitModule(pl.LightningModule):
    """Trains a segmentation network on batches ``{"image": (B,1,H,W), "label": (B,1,H,W)}``.

    Logged keys: ``train/loss``, ``val/loss``, ``val/miou``, ``val/iou_<class>``, and per test set
    ``test/<set>/iou_<class>``, ``test/<set>/dice_<class>``, ``test/<set>/miou``, ``test/<set>/mdice``
    (set names come from the datamodule's ``test_set_names``).

    Args:
        net: backbone mapping (B, C_in, H, W) to logits (B, num_classes, H, W).
        class_names: class names, background first; ``len(class_names)`` = number of outputs.
        optimizer: partial optimizer factory taking the parameters.
        scheduler: optional partial LR-scheduler factory taking the optimizer (stepped per epoch).
        lambda_dice: weight of the Dice term.
        lambda_ce: weight of the cross-entropy term.

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
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["net"], logger=False)
        self.net = _drop_unused_cross_attention_norms(net)
        self.class_names = validate_class_names(class_names)
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.loss_fn = DiceCELoss(to_onehot_y=True, softmax=True, lambda_dice=lambda_dice, lambda_ce=lambda_ce)
        self.val_scores = SegmentationScores(self.class_names)
        self.test_scores = torch.nn.ModuleList()
        self.test_set_names: list[str] = []

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.net(image)

    def setup(self, stage: str) -> None:
        if stage == "test":
            dm = getattr(self.trainer, "datamodule", None)
            names = list(getattr(dm, "test_set_names", None) or ["test"])
            if names != self.test_set_names:
                self.test_set_names = names
                self.test_scores = torch.nn.ModuleList(SegmentationScores(self.class_names) for _ in names)

    def _check_logits(self, logits: torch.Tensor) -> None:
        if logits.shape[1] != len(self.class_names):
            raise ValueError(
                f"net outputs {logits.shape[1]} channels but class_names has {len(self.class_names)} "
                f"classes ({list(self.class_names)}); set the backbone's out_channels"
            )

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        logits = self(batch["image"])
        self._check_logits(logits)
        loss = self.loss_fn(logits, batch["label"])
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=logits.shape[0])
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        logits = self(batch["image"])
        loss = self.loss_fn(logits, batch["label"])
        self.val_scores.update(logits.argmax(1), batch["label"][:, 0])
        self.log("val/loss", loss, on_epoch=True, sync_dist=True, batch_size=logits.shape[0])

    def on_validation_epoch_end(self) -> None:
        scores = self.val_scores.compute()
        miou = scores.pop("miou")
        self.log_dict({f"val/{k}": v for k, v in scores.items()})
        self.log("val/miou", miou, prog_bar=True)
        self.val_scores.reset()

    def test_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        logits = self(batch["image"])
        self.test_scores[dataloader_idx].update(logits.argmax(1), batch["label"][:, 0])

    def on_test_epoch_end(self) -> None:
        for name, scores in zip(self.test_set_names, self.test_scores, strict=True):
            values = scores.compute()
            # add_dataloader_idx=False keeps flat keys like test/jsrt/miou
            self.log_dict({f"test/{name}/{k}": v for k, v in values.items()}, add_dataloader_idx=False)
            scores.reset()

    def predict_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return self(batch["image"]).argmax(1).to(torch.uint8)

    def configure_optimizers(self):
        optimizer = self.optimizer_factory(params=self.parameters())
        if self.scheduler_factory is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": self.scheduler_factory(optimizer=optimizer)}}
