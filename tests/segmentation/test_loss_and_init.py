"""The ignore-aware Dice+CE loss and starting a backbone from a checkpoint (fine-tuning)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from monai.losses import DiceCELoss
from monai.networks.nets import UNet

from diffmask.segmentation.module import DiceCELossWithIgnore, load_net_weights


def test_loss_equals_monai_dice_ce_without_ignored_pixels():
    torch.manual_seed(0)
    logits, label = torch.randn(3, 4, 16, 16), torch.randint(0, 4, (3, 1, 16, 16))
    for ld, lc in [(1.0, 1.0), (0.5, 2.0), (1.0, 0.0)]:
        ours = DiceCELossWithIgnore(ld, lc)(logits, label)
        ref = DiceCELoss(to_onehot_y=True, softmax=True, lambda_dice=ld, lambda_ce=lc)(logits, label)
        assert ours.item() == pytest.approx(ref.item(), rel=1e-5)


def test_ignored_pixels_get_no_gradient_and_do_not_change_the_loss():
    torch.manual_seed(1)
    label = torch.randint(0, 4, (2, 1, 16, 16))
    label[:, :, :, :5] = 255
    logits = torch.randn(2, 4, 16, 16, requires_grad=True)
    loss = DiceCELossWithIgnore()(logits, label)
    loss.backward()
    assert torch.isfinite(loss)
    assert logits.grad[..., :5].abs().max() == 0 and logits.grad[..., 5:].abs().max() > 0
    other = logits.detach().clone()
    other[..., :5] = torch.randn(2, 4, 16, 5) * 10
    assert DiceCELossWithIgnore()(other, label).item() == pytest.approx(loss.item(), rel=1e-6)
    # restricted to the labelled columns, it is the plain loss
    plain = DiceCELossWithIgnore()(logits[..., 5:], label[..., 5:])
    assert loss.item() == pytest.approx(plain.item(), rel=1e-5)
    all_ignored = torch.full_like(label, 255)
    assert torch.isfinite(DiceCELossWithIgnore()(logits, all_ignored))


def test_loss_rejects_labels_outside_the_classes():
    with pytest.raises(ValueError, match=r"not classes 0\.\.3"):
        DiceCELossWithIgnore()(torch.randn(1, 4, 8, 8), torch.full((1, 1, 8, 8), 7))


def _net(channels=(4, 8)):
    return UNet(2, 1, 4, channels=channels, strides=(2,), num_res_units=1)


def test_load_net_weights_from_lightning_checkpoint_and_plain_state_dict(tmp_path):
    torch.manual_seed(2)
    src = _net()
    x = torch.rand(2, 1, 16, 16)
    ckpt = tmp_path / "run.ckpt"
    torch.save({"epoch": 3, "state_dict": {f"net.{k}": v for k, v in src.state_dict().items()}}, ckpt)
    plain = tmp_path / "net.pt"
    torch.save(src.state_dict(), plain)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.json").write_text(json.dumps({"metrics": {}, "best_checkpoint": str(ckpt)}))
    src.eval()
    for path in (ckpt, plain, run_dir):
        dst = load_net_weights(_net(), path).eval()
        assert torch.equal(dst(x), src(x))


def test_load_net_weights_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="init_weights: .*missing.ckpt not found"):
        load_net_weights(_net(), tmp_path / "missing.ckpt")
    with pytest.raises(FileNotFoundError, match="without a metrics.json"):
        load_net_weights(_net(), tmp_path)
    other = tmp_path / "other.pt"
    torch.save(_net((4, 16)).state_dict(), other)
    with pytest.raises(ValueError, match="other.pt does not fit this backbone"):
        load_net_weights(_net(), other)
    junk = tmp_path / "junk.pt"
    torch.save({"a": 1}, junk)
    with pytest.raises(ValueError, match="holds no state dict"):
        load_net_weights(_net(), junk)


def test_largest_component_postprocess_removes_fragments_at_a_film_frame():
    from diffmask.labels import keep_largest_components
    from diffmask.segmentation import SegmentationLitModule

    label = np.zeros((2, 16, 16), np.int64)
    label[:, 2:12, 2:6] = 2       # a lung
    label[:, 0:16, 15] = 2        # a strip along the frame
    label[:, 3:9, 9:14] = 1       # the other lung, one region
    label[:, 13:15, 9:11] = 1     # a fragment of it
    label[1, 5, 3] = 0            # a hole does not split a region
    kept = keep_largest_components(label, 4)
    assert (kept[:, :, 15] == 0).all() and (kept[:, 13:15, 9:11] == 0).all()
    assert (kept[:, 3:9, 9:14] == 1).all() and (kept[0, 2:12, 2:6] == 2).all() and kept[1, 5, 3] == 0
    logits = torch.nn.functional.one_hot(torch.from_numpy(label), 4).permute(0, 3, 1, 2).float()
    net = torch.nn.Identity()
    plain = SegmentationLitModule(net, ["background", "left_lung", "right_lung", "heart"], optimizer=None)
    post = SegmentationLitModule(net, ["background", "left_lung", "right_lung", "heart"], optimizer=None,
                                 postprocess="largest_component")
    assert torch.equal(plain.labels(logits), torch.from_numpy(label))
    assert torch.equal(post.labels(logits), torch.from_numpy(kept))
    with pytest.raises(ValueError, match="postprocess: expected null or largest_component"):
        SegmentationLitModule(net, ["background", "heart"], optimizer=None, postprocess="crf")


def test_small_predicted_regions_are_dropped():
    from diffmask.labels import drop_small_components

    label = np.zeros((2, 10, 10), np.uint8)
    label[0, 1:5, 1:5] = 1  # 16 px: kept
    label[0, 8, 8] = 1      # a speck: dropped
    label[1, 0:2, 0:2] = 2  # 4 px of class 2: dropped at min 5
    out = drop_small_components(label, 3, 5)
    assert out[0, 1:5, 1:5].all() and out[0, 8, 8] == 0 and not out[1].any()
    np.testing.assert_array_equal(drop_small_components(label, 3, 0), label)
    from monai.networks.nets import UNet

    from diffmask.segmentation import SegmentationLitModule

    module = SegmentationLitModule(UNet(2, 1, 2, channels=(4, 8), strides=(2,)), ["background", "lesion"],
                                   optimizer=None, min_region_pixels=5)
    logits = torch.zeros(1, 2, 10, 10)
    logits[0, 1, 8, 8] = 1.0  # one pixel predicted as lesion
    assert not module.labels(logits).any()
    with pytest.raises(ValueError, match="min_region_pixels"):
        SegmentationLitModule(UNet(2, 1, 2, channels=(4, 8), strides=(2,)), ["background", "lesion"],
                              optimizer=None, min_region_pixels=-1)
