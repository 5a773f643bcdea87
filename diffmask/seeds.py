"""Seeds as read from a config: checked where they are read, so a bad one names its field."""

from __future__ import annotations

import numbers

__all__ = ["MAX_SEED", "check_seed"]

# numpy's and Lightning's seed range; Lightning silently draws a random seed outside it
MAX_SEED = 2**32 - 1


def check_seed(value, field: str = "seed") -> int:
    """``value`` as an int if it is a whole number in ``0..MAX_SEED``, else a ValueError naming ``field``.

    Examples::

        check_seed(3, "data.seed")    # 3
        check_seed(-5, "data.seed")   # ValueError: data.seed: expected an integer in 0..4294967295, got -5
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not 0 <= int(value) <= MAX_SEED:
        raise ValueError(f"{field}: expected an integer in 0..{MAX_SEED}, got {value!r}")
    return int(value)
