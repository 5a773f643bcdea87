"""diffmask-compare: is recipe A better than recipe B on each test set? A paired bootstrap interval.

    diffmask-compare --a logs/train/multiruns/mix17/* --b logs/train/multiruns/real173/* \
        --name-a "17 real + synthetic" --name-b "173 real" --out compare.md

Each side is one or more run folders (searched for ``per_image.csv``; several seeds are averaged
per image). See :mod:`diffmask.evaluation.paired` for the method.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from diffmask.artifacts import atomic_write_text
from diffmask.evaluation.paired import compare_recipes, comparison_markdown, comparison_rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="diffmask-compare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--a", nargs="+", required=True, help="recipe A: run folders (or per_image.csv files)")
    parser.add_argument("--b", nargs="+", required=True, help="recipe B: run folders (or per_image.csv files)")
    parser.add_argument("--name-a", default="A")
    parser.add_argument("--name-b", default="B")
    parser.add_argument("--test-set", action="append", default=None, help="only these test sets (repeatable)")
    parser.add_argument("--n-boot", type=int, default=10000, help="bootstrap draws (default 10000)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--metric", choices=("iou", "dice"), default="iou",
                        help="the per-image score compared (default iou; dice: the ultrasound literature's)")
    parser.add_argument("--out", default=None, help="also write the table here (.md) and beside it as .json")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.n_boot < 100:
        parser.error(f"--n-boot: expected at least 100 draws, got {args.n_boot}")
    results = compare_recipes(args.a, args.b, args.test_set, args.n_boot, args.seed, metric=args.metric)
    table = comparison_markdown(results, args.name_a, args.name_b)
    print(table, end="")
    if args.out:
        out = Path(args.out)
        atomic_write_text(out, f"# {args.name_a} vs {args.name_b}\n\npaired bootstrap over test images, "
                               f"{args.n_boot} draws, per-image {args.metric}; runs averaged per image\n\n" + table)
        atomic_write_text(out.with_suffix(".json"), json.dumps(
            {"a": args.a, "b": args.b, "name_a": args.name_a, "name_b": args.name_b, "metric": args.metric,
             "results": comparison_rows(results)}, indent=2) + "\n")
        print(f"written: {out}")


if __name__ == "__main__":
    main()
