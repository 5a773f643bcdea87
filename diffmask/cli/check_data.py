"""Check a dataset folder before training: ``diffmask-check-data data=busi`` or
``diffmask-check-data <folder>``.

    diffmask-check-data /data/busi 'data.class_names=[background,lesion]' 'data.optional_classes=[lesion]'

Prints a summary and every problem (:mod:`diffmask.data.check`); exits 1 on any error, 0 otherwise.
``out=<file>`` also writes the report as JSON. A first argument without ``=`` is the folder.
"""

from __future__ import annotations

import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from diffmask.artifacts import atomic_write_json
from diffmask.config import CONFIG_PATH
from diffmask.data.check import check_folder, positional_folder

__all__ = ["main", "run"]


def run(cfg: DictConfig) -> int:
    """Check ``cfg.folder`` (or ``cfg.data.real.root``), print the summary, write ``cfg.out``.

    Args:
        cfg: the ``check_data`` config.

    Returns:
        The exit code: 1 on a config error or a problem in the folder, else 0.
    """
    data = cfg.data
    folder = cfg.get("folder") or (data.get("real") or {}).get("root")
    if not folder:
        choice = HydraConfig.get().runtime.choices.get("data") if HydraConfig.initialized() else None
        print(f"error: data={choice} has no data.real.root (a folder of images/ and masks/); "
              "pass a folder: diffmask-check-data <folder> or folder=<folder>", file=sys.stderr)
        return 1
    splits = cfg.get("splits") or [data.get(f"{s}_split", s) for s in ("train", "val", "test")]
    try:
        report = check_folder(folder, list(data.class_names), channels=int(data.get("channels", 1)),
                              optional_classes=list(data.get("optional_classes") or []), splits=list(splits),
                              train_split=data.get("train_split", "train"),
                              test_split=data.get("test_split", "test"))
    except ValueError as e:  # a config error
        print(f"error: {e}", file=sys.stderr)
        return 1
    if cfg.get("out"):
        atomic_write_json(cfg.out, report.to_dict())
    print(report.summary())
    return 0 if report.ok else 1


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="check_data")
def _app(cfg: DictConfig) -> None:
    sys.exit(run(cfg))


def main() -> None:
    """The ``diffmask-check-data`` entry point: a first argument without ``=`` becomes ``folder=<it>``."""
    sys.argv[1:] = positional_folder(sys.argv[1:])
    _app()


if __name__ == "__main__":
    main()
