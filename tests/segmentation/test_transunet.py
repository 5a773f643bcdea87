"""TransUNet behaviour, and the backbone configs in conf/segmentation/ building their nets."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import OmegaConf

from diffmask.segmentation.transunet import TransUNet

CONF_DIR = Path(__file__).resolve().parents[2] / "conf" / "segmentation"
NUM_CLASSES = 4  # background, left lung, right lung, heart


def tiny_transunet(img_size: int | tuple[int, int] = 32, dropout: float = 0.0) -> TransUNet:
    return TransUNet(
        in_channels=1,
        out_channels=NUM_CLASSES,
        img_size=img_size,
        base_channels=8,
        hidden_size=32,
        num_layers=2,
        num_heads=4,
        mlp_dim=64,
        dropout=dropout,
    )


def test_output_shape_matches_input_and_classes():
    net = tiny_transunet(img_size=(32, 48))
    logits = net(torch.rand(3, 1, 32, 48))
    assert logits.shape == (3, NUM_CLASSES, 32, 48)
    assert torch.isfinite(logits).all()


def test_other_input_size_interpolates_position_embeddings():
    net = tiny_transunet(img_size=32).eval()
    with torch.no_grad():
        assert net(torch.rand(2, 1, 64, 48)).shape == (2, NUM_CLASSES, 64, 48)
        # at the training size the learned embeddings are used as they are
        assert net._position_embedding((2, 2)) is net.pos_embed
        assert net._position_embedding((4, 3)).shape == (1, 12, 32)


def test_input_not_multiple_of_16_is_rejected():
    net = tiny_transunet(img_size=32)
    with pytest.raises(ValueError, match="multiples of 16"):
        net(torch.rand(1, 1, 40, 32))
    with pytest.raises(ValueError, match=r"\(B, 1, H, W\)"):
        net(torch.rand(1, 3, 32, 32))


def test_eval_mode_is_deterministic_with_dropout():
    # MONAI's flash-attention path would apply attention dropout in eval too; this net must not.
    net = tiny_transunet(img_size=32, dropout=0.5).eval()
    x = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(net(x), net(x))


def test_few_steps_on_a_fixed_batch_lower_the_loss():
    torch.manual_seed(0)
    # blocky label maps (8x8 cells of random classes) and images that show them through noise
    labels = torch.randint(0, NUM_CLASSES, (4, 4, 4)).repeat_interleave(8, 1).repeat_interleave(8, 2)
    images = (labels.unsqueeze(1) / (NUM_CLASSES - 1) + 0.1 * torch.randn(4, 1, 32, 32)).clamp(0, 1)
    net = tiny_transunet(img_size=32)
    optimizer = torch.optim.AdamW(net.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        loss = F.cross_entropy(net(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0], losses
    assert all(p.grad is not None for p in net.parameters() if p.requires_grad)


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"img_size": 40}, "img_size"),
        ({"img_size": (32, 8)}, "img_size"),
        ({"img_size": "32"}, "img_size"),
        ({"in_channels": 0}, "in_channels"),
        ({"out_channels": 0}, "out_channels"),
        ({"base_channels": 1}, "base_channels"),
        ({"hidden_size": 30, "num_heads": 4}, "hidden_size"),
        ({"num_heads": 0}, "num_heads"),
        ({"num_layers": -1}, "num_layers"),
        ({"mlp_dim": 0}, "mlp_dim"),
        ({"dropout": 1.0}, "dropout"),
        ({"dropout": -0.1}, "dropout"),
    ],
)
def test_bad_arguments_raise_value_error_naming_them(kwargs, argument):
    args = {
        "in_channels": 1,
        "out_channels": NUM_CLASSES,
        "img_size": 32,
        "base_channels": 8,
        "hidden_size": 32,
        "num_layers": 1,
        "num_heads": 4,
        "mlp_dim": 64,
        "dropout": 0.0,
    }
    args.update(kwargs)
    with pytest.raises(ValueError, match=argument):
        TransUNet(**args)


def net_config(name: str, size: int) -> dict:
    """The `net` node of conf/segmentation/<name>.yaml with its interpolations made concrete."""
    cfg = OmegaConf.to_container(OmegaConf.load(CONF_DIR / f"{name}.yaml"), resolve=False)
    # the whole group entry must build the LitModule around the net
    assert cfg["_target_"] == "diffmask.segmentation.SegmentationLitModule"
    assert cfg["optimizer"]["_partial_"] and cfg["scheduler"]["_partial_"]
    assert isinstance(cfg["optimizer"]["lr"], float)  # `1e-3` must not load as a string
    assert cfg["class_names"] == "${data.class_names}"
    net = cfg["net"]
    assert net["in_channels"] == "${data.channels}"  # grey or colour, from the dataset config
    net["in_channels"] = 1
    assert net["out_channels"] == "${len:${data.class_names}}"
    net["out_channels"] = NUM_CLASSES
    if "img_size" in net:
        assert net["img_size"] == "${data.size}"
        net["img_size"] = size
    return net


@pytest.mark.parametrize("name", ["transunet", "swinunetr", "unetr", "attention_unet"])
def test_config_builds_net_giving_logits_per_class(name):
    torch.manual_seed(0)
    net = instantiate(net_config(name, size=64)).eval()
    with torch.no_grad():
        logits = net(torch.rand(2, 1, 64, 64))
    assert logits.shape == (2, NUM_CLASSES, 64, 64)
    assert torch.isfinite(logits).all()
