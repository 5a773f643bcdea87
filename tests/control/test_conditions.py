import numpy as np
import pytest
from scipy import ndimage

from diffmask.control import ConditionBuilder, Deformation
from diffmask.domains.chest import draw_phantom


def _phantom(size=64, seed=0):
    image, label = draw_phantom(size, np.random.default_rng(seed))
    return image.astype(np.float32) / 255.0, label


def test_condition_types_channels_and_contents():
    image, label = _phantom()
    edges = ConditionBuilder("edges", 4)(image, label)
    mask = ConditionBuilder("mask", 4)(image, label)
    both = ConditionBuilder("edges+mask", 4)(image, label)
    assert edges.shape == (1, 64, 64) and mask.shape == (3, 64, 64) and both.shape == (4, 64, 64)
    assert edges.min() >= 0 and edges.max() <= 1 and edges.dtype == np.float32
    for c in range(1, 4):  # one channel per foreground class, exactly its pixels
        assert np.array_equal(mask[c - 1] > 0, label == c)
    assert np.array_equal(both[0], edges[0]) and np.array_equal(both[1:], mask)
    # the mask boundary is in the edge channel at full strength (Scharr magnitude x gain, clipped)
    boundary = ConditionBuilder("edges", 4).boundaries(label)
    inner = ndimage.binary_erosion(label == 1, iterations=2)
    assert boundary[(label == 1) & ~ndimage.binary_erosion(label == 1)].min() > 0.3
    assert boundary[inner].max() == 0
    assert (edges[0] >= boundary - 1e-6).all()


def test_mask_ablation_removes_whole_classes_only_when_fitting():
    image, label = _phantom()
    builder = ConditionBuilder("mask", 4, ablate_prob=0.5)
    # no rng: the whole mask
    assert np.array_equal(builder(image, label), ConditionBuilder("mask", 4)(image, label))
    rng = np.random.default_rng(0)
    seen = set()
    for _ in range(40):
        cond = builder(image, label, rng=rng)
        kept = tuple(bool(cond[c].any()) for c in range(3))
        for c in range(3):  # a class is either whole or gone
            assert np.array_equal(cond[c] > 0, label == c + 1) or not cond[c].any()
        seen.add(kept)
    assert len(seen) > 3  # different classes left out in different draws


def test_bad_condition_input_is_named():
    image, label = _phantom(32)
    with pytest.raises(ValueError, match="control.condition.type: expected one of"):
        ConditionBuilder("hed", 4)
    with pytest.raises(ValueError, match="differ in size"):
        ConditionBuilder("edges", 4)(np.zeros((16, 16)), label, where="x")
    with pytest.raises(ValueError, match=r"sample7: label: label values \[5\] are outside the classes 0..3"):
        ConditionBuilder("mask", 4)(image, np.full_like(label, 5), where="sample7")
    with pytest.raises(ValueError, match="needs the image"):
        ConditionBuilder("edges+mask", 4)(None, label)


def test_deformation_moves_mask_and_edges_together():
    # an image whose only intensity edges are the mask's boundaries
    _, label = _phantom(64, seed=3)
    image = np.array([0.1, 0.5, 0.7, 0.9], np.float32)[label]
    deform = Deformation(elastic_alpha=4.0, elastic_sigma=6.0, rotate=10.0, scale=0.1, translate=0.05)
    rng = np.random.default_rng(1)
    warped_image, warped_label = deform(image, label, rng)
    assert warped_label.dtype == label.dtype and set(np.unique(warped_label)) <= {0, 1, 2, 3}
    assert not np.array_equal(warped_label, label)  # it moved
    builder = ConditionBuilder("edges", 4, edge_sigma=1.0)
    edges = builder.image_edges(warped_image) > 0
    boundary = builder.boundaries(warped_label) > 0.5
    # the warped mask's boundary lies on the warped image's edges (within 2 px)
    near_edges = ndimage.binary_dilation(edges, iterations=2)
    assert near_edges[boundary].mean() > 0.9
    # and a different warp of the mask would not: the test can tell
    _, other_label = deform(image, label, np.random.default_rng(99))
    assert near_edges[builder.boundaries(other_label) > 0.5].mean() < 0.8
    # uint8 pixels stay uint8; the same seed gives the same warp
    u8 = (image * 255).astype(np.uint8)
    a = deform(u8, label, np.random.default_rng(5))
    b = deform(u8, label, np.random.default_rng(5))
    assert a[0].dtype == np.uint8 and np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    with pytest.raises(ValueError, match="synthesis.deform.rotate"):
        Deformation(rotate=-1)


def test_edge_condition_of_a_colour_image_is_that_of_its_luminance():
    from diffmask.control.conditions import luminance
    from tests.autoencoder.colour_data import colour_image

    rgb, label = colour_image(3, size=48)
    rgb = rgb.astype(np.float32) / 255.0
    assert not np.allclose(rgb[..., 0], rgb[..., 1])  # really colour
    for method in ("canny", "sobel"):
        builder = ConditionBuilder("edges", 2, edge_method=method)
        cond = builder(rgb, label)
        assert cond.shape == (1, 48, 48) and cond.dtype == np.float32 and 0 <= cond.min() <= cond.max() <= 1
        grey = luminance(rgb)
        assert grey.shape == (48, 48) and np.allclose(grey, rgb @ np.array([0.299, 0.587, 0.114]))
        assert np.array_equal(cond, builder(grey, label))
    # the disc's rim is an edge; masks are made from labels only, as for grey images
    assert (
        ConditionBuilder("edges", 2, edge_method="sobel")(rgb, np.zeros_like(label))[0][label > 0].max() > 0.3
    )
    assert np.array_equal(ConditionBuilder("mask", 2)(rgb, label), ConditionBuilder("mask", 2)(None, label))
    both = ConditionBuilder("edges+mask", 2).batch(np.stack([rgb, rgb]), np.stack([label, label]))
    assert both.shape == (2, 2, 48, 48)
    with pytest.raises(ValueError, match="differ in size"):
        ConditionBuilder("edges", 2)(rgb[:40], label)
    # a warp moves every channel of a colour image and its label map alike
    warped, warped_label = Deformation()(rgb, label, np.random.default_rng(0))
    assert warped.shape == rgb.shape and warped.dtype == rgb.dtype and warped_label.shape == label.shape
    grey_warp, _ = Deformation()(rgb[..., 1], label, np.random.default_rng(0))
    assert np.allclose(warped[..., 1], grey_warp)
