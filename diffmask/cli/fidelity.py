"""diffmask-fidelity: label fidelity of a generated set, scored by a model trained on real images.

    diffmask-fidelity artifacts/synthesis/default --model logs/train/runs/<real-only run>
    diffmask-fidelity artifacts/synthesis/default --model <run> --write    # into the set's stage.json

Prints the per-class IoU between the model's predictions on the generated images and the masks
they were generated from (see :mod:`diffmask.evaluation.fidelity`).

Why argparse, not Hydra: it reads a finished generated set and a finished training run (whose saved
config gives the classes, size and intensity) and composes no config; the flags only override what
the run recorded.
"""

from __future__ import annotations

import argparse
import json
import logging

from diffmask.evaluation.fidelity import FIDELITY_KEY, format_fidelity, label_fidelity, record_label_fidelity


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="diffmask-fidelity", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("synthetic_dir", help="the generated set (manifest.jsonl, images/, masks/)")
    parser.add_argument("--model", required=True,
                        help="a diffmask-train run folder trained on real images "
                             "(or a checkpoint in its checkpoints/)")
    parser.add_argument("--class-names", nargs="+", default=None,
                        help="class names, background first (default: the run's data.class_names)")
    parser.add_argument("--size", type=int, default=None,
                        help="working side in pixels (default: the run's data.size)")
    parser.add_argument("--intensity", default=None,
                        help="input normalisation (default: the run's data.intensity)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cuda (default: cpu)")
    parser.add_argument("--write", action="store_true",
                        help="record the result in the set's stage.json (label_fidelity)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON instead of a table")
    return parser


def main(argv: list[str] | None = None) -> None:
    """The ``diffmask-fidelity`` entry point: print the label fidelity (and record it with ``--write``).

    Args:
        argv: the arguments (None: the command line's).
    """
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    result = label_fidelity(args.synthetic_dir, args.model, args.class_names, size=args.size,
                            intensity=args.intensity, batch_size=args.batch_size, device=args.device)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(format_fidelity(result), end="")
    if args.write:
        print(f"written: {record_label_fidelity(args.synthetic_dir, result)} ({FIDELITY_KEY})")


if __name__ == "__main__":
    main()
