"""diffmask-evaluate-synthesis: FID / KID and anatomical accuracy of a generated set, without hub weights.

    diffmask-evaluate-synthesis artifacts/synthesis/default --model logs/train/runs/<real-only run>

Features: the bottleneck of a segmentation network trained on real images (the run given), so the
figures compare runs of this project, not published Inception FIDs. Anatomical accuracy: the same
network segments each image; its cardiothoracic ratio is compared with the heart size the image's
prompt asked for (see :mod:`diffmask.evaluation.synthesis_quality`). The set and the real images are
read with the run's ``data.channels`` (grey or colour); a set of the other kind is an error.

Why argparse, not Hydra: it reads a finished generated set and a finished training run (whose saved
config gives the data settings) and composes no config; it writes one JSON file, no run folder.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from diffmask.artifacts import atomic_write_json
from diffmask.evaluation.synthesis_quality import synthesis_quality


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="diffmask-evaluate-synthesis", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("synthetic_dir", help="the generated set (manifest.jsonl, images/)")
    parser.add_argument("--model", required=True, help="a diffmask-train run folder trained on real images")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--attribute", default="sex",
                        help="metadata field judged by a classifier trained on the real images ('' = skip)")
    parser.add_argument("--out", default=None,
                        help="write the result as JSON here (default: <set>/synthesis_quality.json)")
    return parser


def main(argv: list[str] | None = None) -> None:
    """The ``diffmask-evaluate-synthesis`` entry point: write the scores as JSON and print them.

    Args:
        argv: the arguments (None: the command line's).
    """
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    result = synthesis_quality(args.synthetic_dir, args.model, batch_size=args.batch_size, device=args.device,
                               attribute=args.attribute or None)
    out = Path(args.out) if args.out else Path(args.synthetic_dir) / "synthesis_quality.json"
    atomic_write_json(out, result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
