"""A phantom of any modality: blobs on a textured background, grey or colour, no files needed.

:class:`ShapesSource` stands in for a dataset that is not a chest X-ray (ultrasound lesions,
dermoscopy, organs in CT/MRI slices), so tests and demos of such data run anywhere:

* with three classes (``background, organ, lesion``): a large organ ellipse in every image and,
  in most images, a small lesion inside it;
* with two classes (``background, lesion``): a lesion blob on a textured background;
* the last class (the lesion) is absent from a share of the images (``absent_share``), whose
  metadata then says ``finding: normal`` (``finding: lesion`` otherwise), as breast ultrasound's
  normal images have empty masks;
* ``channels=3`` draws colour (a skin-toned background, a brown lesion, a reddish organ, as in
  dermoscopy or endoscopy), ``channels=1`` grey.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from diffmask.data.sources import DrawnSource, Sample
from diffmask.labels import validate_class_names

__all__ = ["ShapesSource", "draw_shapes"]

# RGB colours in [0, 1]: background (textured), organ, lesion; grey uses their luminance
_COLOURS = {"background": (0.80, 0.62, 0.52), "organ": (0.75, 0.30, 0.30), "lesion": (0.35, 0.20, 0.12)}
_GREY = {"background": 0.45, "organ": 0.70, "lesion": 0.18}


class ShapesSource(DrawnSource):
    """Procedurally drawn blobs with 2 or 3 classes, grey or colour; deterministic per (seed, id).

    Args:
        size: image side in pixels (>= 16).
        class_names: ``[background, <lesion>]`` or ``[background, <organ>, <lesion>]`` (any names:
            the last is the lesion, the middle one the organ).
        channels: 1 (grey) or 3 (colour).
        num_train, num_val, num_test: split sizes.
        absent_share: the share of images without a lesion (their mask has no lesion pixel).
        seed: base seed.

    Examples::

        src = ShapesSource(64, ["background", "organ", "lesion"])
        sample = src.load(src.ids("train")[0])  # image (64, 64) uint8, label values 0..2
    """

    def __init__(
        self,
        size: int = 64,
        class_names: Sequence[str] = ("background", "organ", "lesion"),
        channels: int = 1,
        num_train: int = 48,
        num_val: int = 12,
        num_test: int = 12,
        absent_share: float = 0.25,
        seed: int = 0,
    ):
        if size < 16:
            raise ValueError(f"size: expected at least 16 pixels, got {size}")
        self.class_names = validate_class_names(class_names)
        if len(self.class_names) not in (2, 3):
            raise ValueError(f"class_names: the shapes phantom draws 2 or 3 classes, got {list(class_names)}")
        if channels not in (1, 3):
            raise ValueError(f"channels: expected 1 (grey) or 3 (colour), got {channels}")
        if not 0.0 <= absent_share < 1.0:
            raise ValueError(f"absent_share: expected a share in [0, 1), got {absent_share}")
        self._organ = len(self.class_names) == 3
        super().__init__("shapes", {"train": num_train, "val": num_val, "test": num_test}, seed)
        self.size = int(size)
        self.channels = int(channels)
        self.absent_share = float(absent_share)

    def load(self, sample_id: str) -> Sample:
        """Draw the sample ``sample_id`` (the same pixels on every call)."""
        rng = self.sample_rng(sample_id, 17)
        lesion = bool(rng.random() >= self.absent_share)
        image, label = draw_shapes(self.size, rng, organ=self._organ, lesion=lesion,
                                   colour=self.channels == 3)
        meta = {"finding": "lesion" if lesion else "normal"}
        return Sample(id=sample_id, image=image, label=label, meta=meta)


def draw_shapes(
    size: int, rng: np.random.Generator, organ: bool = True, lesion: bool = True, colour: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Draw one shapes image.

    Args:
        size: image side.
        rng: the random draws (shape, place, texture, noise).
        organ: draw the organ ellipse (label 1) and put the lesion inside it (label 2).
        lesion: draw the lesion (label 1 without an organ, else 2).
        colour: RGB output instead of grey.

    Returns:
        ``(image, label)``: uint8 (S, S) grey or (S, S, 3) colour, and uint8 (S, S) labels.
    """
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    label = np.zeros((size, size), np.uint8)
    lesion_value = 2 if organ else 1
    cy, cx = 0.5 + rng.normal(0, 0.04), 0.5 + rng.normal(0, 0.04)
    if organ:
        ry, rx = rng.uniform(0.25, 0.34), rng.uniform(0.28, 0.38)
        label[((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0] = 1
    if lesion:
        r = rng.uniform(0.07, 0.13) if organ else rng.uniform(0.12, 0.22)
        ly, lx = cy + rng.uniform(-0.1, 0.1), cx + rng.uniform(-0.1, 0.1)
        wobble = 1.0 + 0.15 * np.sin(np.arctan2(yy - ly, xx - lx) * 3 + rng.uniform(0, 2 * np.pi))
        label[np.hypot(yy - ly, xx - lx) <= r * wobble] = lesion_value
    names = ["background", "organ", "lesion"] if organ else ["background", "lesion"]
    # a smooth texture (sum of a few random waves) plus speckle noise
    texture = sum(np.sin(2 * np.pi * (rng.uniform(1, 4) * xx + rng.uniform(1, 4) * yy) + rng.uniform(0, 6.3))
                  for _ in range(3)) / 3.0
    if colour:
        img = np.zeros((size, size, 3), np.float32)
        for value, name in enumerate(names):
            img[label == value] = _COLOURS[name]
        img = img + 0.08 * texture[..., None] + rng.normal(0, 0.03, img.shape).astype(np.float32)
    else:
        img = np.zeros((size, size), np.float32)
        for value, name in enumerate(names):
            img[label == value] = _GREY[name]
        img = img + 0.08 * texture + rng.normal(0, 0.04, img.shape).astype(np.float32)
    return (np.clip(img, 0, 1) * 255).astype(np.uint8), label
