"""diffmask-compare: is recipe A better than recipe B on each test set? A paired bootstrap interval.

    diffmask-compare --a logs/train/multiruns/mix17/* --b logs/train/multiruns/real173/* \
        --name-a "17 real + synthetic" --name-b "173 real" --out compare.md

Each side is one or more run folders (searched for ``per_image.csv``; several seeds are averaged
per image). See :mod:`diffmask.evaluation.paired` for the method.

Why argparse, not Hydra: it reads finished run folders and composes no config (no model, data or
trainer to instantiate, nothing to sweep), its sides are lists of shell-expanded folders, and the
pipeline's ``compare`` stage and the READMEs call it with these flags.
"""

from __future__ import annotations

import argparse
import logging

from diffmask.evaluation.paired import compare_recipes, comparison_markdown, write_comparison


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="diffmask-compare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--a", nargs="+", required=True,
                        help="recipe A: run folders (or per_image.csv files)")
    parser.add_argument("--b", nargs="+", required=True,
                        help="recipe B: run folders (or per_image.csv files)")
    parser.add_argument("--name-a", default="A")
    parser.add_argument("--name-b", default="B")
    parser.add_argument("--test-set", action="append", default=None, help="only these test sets (repeatable)")
    parser.add_argument("--n-boot", type=int, default=10000, help="bootstrap draws (default 10000)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--metric", choices=("iou", "dice"), default="iou",
                        help="the per-image score compared (default iou; dice: the ultrasound literature's)")
    parser.add_argument("--out", default=None, help="also write the table here (.md) and beside it as .json")
    return parser


def main(argv: list[str] | None = None) -> None:
    """The ``diffmask-compare`` entry point: print the comparison table (and write it with ``--out``).

    Args:
        argv: the arguments (None: the command line's).
    """
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.n_boot < 100:
        parser.error(f"--n-boot: expected at least 100 draws, got {args.n_boot}")
    results = compare_recipes(args.a, args.b, args.test_set, args.n_boot, args.seed, metric=args.metric)
    print(comparison_markdown(results, args.name_a, args.name_b), end="")
    if args.out:
        out = write_comparison(args.out, results, args.a, args.b, args.name_a, args.name_b, args.n_boot,
                               args.metric)
        print(f"written: {out}")


if __name__ == "__main__":
    main()
