"""Run sample refiners (threshold, DenseCRF, random walk, ...) one after another, in config order."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

__all__ = ["RefinementChain", "require_keys"]

Refiner = Callable[[dict[str, Any]], dict[str, Any]]


def require_keys(sample: Mapping[str, Any], keys: Sequence[str], refiner: str) -> None:
    """The sample-refiner contract: a clear error when ``sample`` lacks one of ``keys``.

    Raises:
        KeyError: naming the refiner, the missing key and the keys the sample has.
    """
    for key in keys:
        if key not in sample:
            raise KeyError(f"{refiner}: sample has no {key!r} (keys: {sorted(sample)})")


class RefinementChain:
    """Apply refiners in order; each reads and extends the sample dict.

    Args:
        steps: refiners as a mapping ``name -> refiner`` (config order is kept; a ``None``
            value drops that step, so ``refine.steps.densecrf=null`` disables it) or a list.
        use: optional names of the steps to run, in this order (e.g. ``["threshold",
            "densecrf"]``); None runs every non-None step in mapping order.

    Examples::

        chain = RefinementChain({"threshold": ThresholdRefiner(ignore_band=0.1),
                                 "densecrf": DenseCRFRefiner()})
        sample = chain({"image": img, "class_maps": maps})
    """

    def __init__(self, steps: Mapping[str, Refiner | None] | Sequence[Refiner],
                 use: Sequence[str] | None = None):
        items = (
            list(steps.items())
            if isinstance(steps, Mapping)
            else [(f"step{i}", s) for i, s in enumerate(steps)]
        )
        if use is not None:
            if isinstance(use, str):
                use = [use]
            named = dict(items)
            unknown = [n for n in use if n not in named]
            if unknown:
                raise ValueError(f"use: steps {unknown} are not configured; configured steps: {list(named)}")
            off = [n for n in use if named[n] is None]
            if off:
                raise ValueError(f"use: steps {off} are set to null in steps")
            items = [(n, named[n]) for n in use]
        self.steps: list[tuple[str, Refiner]] = [(name, step) for name, step in items if step is not None]
        for name, step in self.steps:
            if not callable(step):
                raise ValueError(
                    f"steps.{name}: expected a callable refiner (dict -> dict), got {type(step).__name__}"
                )

    @property
    def names(self) -> list[str]:
        """The names of the steps run, in order."""
        return [name for name, _ in self.steps]

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        for _, step in self.steps:
            sample = step(sample)
        return sample
