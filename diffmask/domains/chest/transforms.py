"""Chest-film augmentation: what hospitals burn into their X-ray films.

Used through ``data/augment=strong``'s ``extra`` transforms.
"""

from __future__ import annotations

import numpy as np
import torch
from monai.transforms import MapTransform, RandomizableTransform

__all__ = ["RandBurnInd"]


class RandBurnInd(RandomizableTransform, MapTransform):
    """What hospitals burn into their films: white markers and lettering, and black borders.

    With probability ``prob``: 1-3 bright rectangles (a side marker "R", a "PA ERECT" label:
    3-12 % of the side, grey 0.85-1.0) in the upper corners and along the upper edge, where
    films carry them, and with probability 0.5 black bands (up to ``max_border`` of the side) on
    1-3 sides (collimation, scanned film edges). Labels are unchanged: a marker covers anatomy
    that is still there, and the bands are narrow enough to fall on background.

    Args:
        keys: image keys ((1, H, W) float in [0, 1]).
        prob: probability of burning anything in.
        max_border: widest black band, as a share of the side.
    """

    def __init__(self, keys=("image",), prob: float = 0.3, max_border: float = 0.08):
        MapTransform.__init__(self, keys)
        RandomizableTransform.__init__(self, prob)
        if not 0 <= max_border < 0.5:
            raise ValueError(f"max_border: expected a share of the side in [0, 0.5), got {max_border}")
        self.max_border = max_border

    def __call__(self, data):
        d = dict(data)
        self.randomize(None)
        if not self._do_transform:
            return d
        r = self.R
        for key in self.key_iterator(d):
            img = d[key]
            out = img.clone() if isinstance(img, torch.Tensor) else np.array(img, copy=True)
            h, w = out.shape[-2:]
            for _ in range(r.randint(1, 4)):
                mh, mw = (max(1, int(r.uniform(0.03, 0.12) * n)) for n in (h, w))
                y = int(r.uniform(0.0, 0.25) * h)
                x = int(r.choice([r.uniform(0.0, 0.2), r.uniform(0.7, 0.95)]) * w)
                out[..., y:y + mh, x:x + mw] = float(r.uniform(0.85, 1.0))
            if r.rand() < 0.5 and self.max_border > 0:
                for side in r.choice(4, size=r.randint(1, 4), replace=False):  # top, bottom, left, right
                    n = h if side < 2 else w
                    k = max(1, int(r.uniform(0.02, self.max_border) * n))
                    band = slice(0, k) if side % 2 == 0 else slice(n - k, n)
                    if side < 2:
                        out[..., band, :] = 0.0
                    else:
                        out[..., :, band] = 0.0
            d[key] = out
        return d
