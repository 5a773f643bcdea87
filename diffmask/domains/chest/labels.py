"""SCR label conventions of the chest X-ray datasets (JSRT/SCR, the phantom).

SCR masks use patient's side: label 1 (left lung) lies on the image's *right* in a PA view.
Never flip an image horizontally without swapping labels 1 and 2 (``data.augment.flip_swap=[[1, 2]]``).
``conf/data/base/chest.yaml`` holds the same class names for the configs.
"""

from __future__ import annotations

__all__ = ["CHEST_CLASS_NAMES"]

# index = label value in the mask PNGs; index 0 is background
CHEST_CLASS_NAMES: tuple[str, ...] = ("background", "left_lung", "right_lung", "heart")
