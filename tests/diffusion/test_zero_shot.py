"""Zero-shot class: a class held out of the attention alignment gets no loss and no gradient."""

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from diffmask.config import CONFIG_PATH
from diffmask.diffusion import AttentionAlignment, attention_alignment_loss, class_token_index
from diffmask.diffusion.alignment import downsample_label

HEART = 3


def _label(with_heart: bool = True) -> torch.Tensor:
    """(2, 1, 8, 8): left lung on the image's right, right lung on its left, heart in between."""
    label = torch.zeros(2, 1, 8, 8, dtype=torch.long)
    label[:, :, 1:7, 5:8] = 1
    label[:, :, 1:7, 0:3] = 2
    if with_heart:
        label[:, :, 4:8, 3:5] = HEART
    return label


def _maps(requires_grad: bool = True) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    # (B, K*M, h, w) with K=3 classes, M=2 tokens (heart's phrase is one token: its second is a pad)
    probs = torch.softmax(torch.randn(2, 8, 4, 4), dim=1)[:, :6]
    small = torch.softmax(torch.randn(2, 8, 2, 2), dim=1)[:, :6]
    return {
        "l4": probs.clone().requires_grad_(requires_grad),
        "l2": small.clone().requires_grad_(requires_grad),
    }


def _weight() -> torch.Tensor:
    _, weight = class_token_index([[[1, 2], [4, 5], [7]]] * 2)
    return weight


def test_held_out_class_gets_zero_gradient_and_its_mask_is_not_read():
    maps, weight = _maps(), _weight()
    loss, n = attention_alignment_loss(maps, weight, _label(), classes=[1, 2])
    assert n == 2
    loss.backward()
    for fmap in maps.values():
        grad = fmap.grad.view(2, 3, 2, *fmap.shape[-2:])
        assert grad[:, :2].abs().sum() > 0  # the lungs are aligned
        assert torch.count_nonzero(grad[:, 2]) == 0  # the heart's attention is untouched
    # the loss does not depend on the heart's mask: erase it (heart pixels become background)
    no_heart, _ = attention_alignment_loss(_maps(False), weight, _label(with_heart=False), classes=[1, 2])
    assert torch.allclose(loss.detach(), no_heart)
    # ...whereas aligning every class does read it and does pull on the heart's attention
    maps = _maps()
    full, _ = attention_alignment_loss(maps, weight, _label())
    full.backward()
    full_no_heart, _ = attention_alignment_loss(_maps(False), weight, _label(with_heart=False))
    assert not torch.allclose(full.detach(), full_no_heart)
    assert maps["l4"].grad.view(2, 3, 2, 4, 4)[:, 2].abs().sum() > 0


def test_aligning_every_class_by_name_is_the_plain_loss():
    maps, weight, label = _maps(False), _weight(), _label()
    plain, _ = attention_alignment_loss(maps, weight, label)
    listed, _ = attention_alignment_loss(maps, weight, label, classes=[3, 1, 2])
    assert torch.allclose(plain, listed)
    # written out for one layer: cross-entropy of [1 - sum a_k, a_k] against the area fractions
    fmap = maps["l4"].view(2, 3, 2, 4, 4)
    per_class = (fmap * weight[..., None, None]).sum(2)
    probs = torch.cat([(1 - per_class.sum(1, keepdim=True)).clamp_min(0), per_class], 1)
    target = downsample_label(label, 4, (4, 4))
    expected = -(target * torch.log(probs + 1e-6)).sum(1).mean()
    only_l4, _ = attention_alignment_loss(maps, weight, label, resolutions=[4])
    assert torch.allclose(only_l4, expected)


def test_module_resolves_held_out_classes_and_ignores_the_heart_mask(make_module, phantom_dm):
    module = make_module(align=AttentionAlignment(label_fraction=1.0, classes=["left_lung", "right_lung"]))
    assert module.align_class_values == [1, 2]
    phantom_dm.setup("fit")
    batch = next(iter(phantom_dm.train_dataloader()))
    assert (batch["label"] == HEART).any()
    module.train()
    losses = []
    for label in (batch["label"], torch.where(batch["label"] == HEART, 0, batch["label"])):
        torch.manual_seed(0)
        out = module.denoising_loss(
            {**batch, "label": label}, train=False, generator=torch.Generator().manual_seed(0), align_all=True
        )
        losses.append(out["align_loss"].detach())
    assert torch.isfinite(losses[0]) and torch.allclose(losses[0], losses[1])
    # with every class aligned the heart's mask matters
    full = make_module(align=AttentionAlignment(label_fraction=1.0))
    full.load_state_dict(module.state_dict())
    full_losses = [
        full.denoising_loss(
            {**batch, "label": label}, train=False, generator=torch.Generator().manual_seed(0), align_all=True
        )["align_loss"].detach()
        for label in (batch["label"], torch.where(batch["label"] == HEART, 0, batch["label"]))
    ]
    assert not torch.allclose(full_losses[0], full_losses[1])


def test_held_out_classes_are_validated(make_module):
    with pytest.raises(ValueError, match="align.classes"):
        make_module(align=AttentionAlignment(label_fraction=0.1, classes=["lungs"]))
    with pytest.raises(ValueError, match="align.classes"):
        AttentionAlignment(label_fraction=0.1, classes=["background", "heart"])
    with pytest.raises(ValueError, match="align.classes"):
        AttentionAlignment(label_fraction=0.1, classes=[])
    with pytest.raises(ValueError, match="classes: expected distinct foreground label values in 1..3"):
        attention_alignment_loss(_maps(False), _weight(), _label(), classes=[0, 1])


def test_config_override_holds_the_heart_out():
    with initialize_config_dir(config_dir=CONFIG_PATH, version_base="1.3"):
        cfg = compose("fit_diffusion", overrides=[
            "diffusion.align.label_fraction=0.1", "diffusion.align.classes=[left_lung,right_lung]",
        ])
    align = instantiate(cfg.diffusion.align)
    assert align.classes == ["left_lung", "right_lung"]
    assert align.class_values(cfg.data.class_names) == [1, 2]
    with initialize_config_dir(config_dir=CONFIG_PATH, version_base="1.3"):
        default = compose("fit_diffusion", overrides=["diffusion=pretrained"])
    assert instantiate(default.diffusion.align).class_values(default.data.class_names) is None
