"""Thin Hydra entry points, one per stage; the only modules that import hydra."""
