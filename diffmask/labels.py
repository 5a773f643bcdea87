"""Label conventions shared by every stage.

SCR masks use patient's side: label 1 (left lung) lies on the image's *right* in a PA view.
Never flip an image horizontally without swapping labels 1 and 2.
"""

from __future__ import annotations

__all__ = ["DEFAULT_CLASS_NAMES", "class_word", "validate_class_names"]

# index = label value in the mask PNGs; index 0 is always background
DEFAULT_CLASS_NAMES: tuple[str, ...] = ("background", "left_lung", "right_lung", "heart")


def class_word(name: str) -> str:
    """The words used for a class in prompts: ``left_lung`` -> ``left lung``."""
    return name.replace("_", " ")


def validate_class_names(class_names: list[str] | tuple[str, ...], field: str = "class_names") -> tuple[str, ...]:
    """Check a class list: at least background + one class, background first, no duplicates."""
    names = tuple(str(n) for n in class_names)
    if len(names) < 2:
        raise ValueError(f"{field}: expected background plus at least one class, got {list(names)}")
    if names[0] != "background":
        raise ValueError(f"{field}: the first class must be 'background' (label 0), got {names[0]!r}")
    if len(set(names)) != len(names):
        raise ValueError(f"{field}: duplicate class names in {list(names)}")
    return names
