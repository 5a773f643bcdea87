import pytest
import torch

from diffmask.diffusion import AttentionAlignment, attention_alignment_loss, class_token_index
from diffmask.diffusion.alignment import downsample_label


def _label():
    label = torch.zeros(1, 1, 8, 8, dtype=torch.long)
    label[..., :, :4] = 1
    label[..., :4, 4:] = 2
    return label


def test_attention_matching_the_mask_scores_lower_than_uniform_or_swapped():
    label = _label()
    index, weight = class_token_index([[[1], [2, 3]]])  # class 2 spans two tokens
    assert index.tolist() == [[1, 1, 2, 3]] and weight.tolist() == [[[1, 0], [1, 1]]]
    target = downsample_label(label, 3, (4, 4))  # (1, 3, 4, 4)
    good = torch.stack([target[0, 1], target[0, 1], target[0, 2] / 2, target[0, 2] / 2])[None] * 0.9
    uniform = torch.full((1, 4, 4, 4), 0.2)
    swapped = torch.stack([target[0, 2], target[0, 2], target[0, 1] / 2, target[0, 1] / 2])[None] * 0.9
    lg, n = attention_alignment_loss({"a": good}, weight, label)
    lu, _ = attention_alignment_loss({"a": uniform}, weight, label)
    ls, _ = attention_alignment_loss({"a": swapped}, weight, label)
    assert n == 1 and lg < lu < ls


def test_resolution_filter_and_gradients():
    label = _label()
    index, weight = class_token_index([[[1], [2]]])
    maps = {"low": torch.full((1, 2, 2, 2), 0.3, requires_grad=True), "high": torch.full((1, 2, 4, 4), 0.3)}
    loss, n = attention_alignment_loss(maps, weight, label, resolutions=[2])
    assert n == 1
    loss.backward()
    assert maps["low"].grad is not None and maps["low"].grad.abs().sum() > 0
    zero, n = attention_alignment_loss(maps, weight, label, resolutions=[64])
    assert n == 0 and float(zero) == 0.0


def test_alignment_settings_are_validated():
    assert not AttentionAlignment(label_fraction=0.0).enabled
    assert AttentionAlignment(label_fraction=0.1, weight=0.5, resolutions=[8, 16]).enabled
    with pytest.raises(ValueError, match="align.label_fraction"):
        AttentionAlignment(label_fraction=1.5)
    with pytest.raises(ValueError, match="align.weight"):
        AttentionAlignment(label_fraction=0.1, weight=-1)
