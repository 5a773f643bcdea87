"""Mask- and edge-guided synthesis (EMIT-Diff): condition images, deformations, the ControlNet stage."""

from diffmask.control.conditions import CONDITION_TYPES, ConditionBuilder, Deformation
from diffmask.control.module import ControlLitModule, build_controlnet, load_controlled, model_fingerprint

__all__ = [
    "CONDITION_TYPES",
    "ConditionBuilder",
    "Deformation",
    "ControlLitModule",
    "build_controlnet",
    "load_controlled",
    "model_fingerprint",
]
