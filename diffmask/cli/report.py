"""diffmask-report <sweep dir>: results table (markdown + CSV, mean ± sd over seeds) and plots.

Runs are grouped by their effective settings (``<run>/.hydra/config.yaml`` less seeds and run-only
settings such as logger, paths or data.num_workers); the table names each condition by the settings
that vary across the folder. Copies of a run (same condition and seeds) count once, with a warning.

Why argparse, not Hydra: it reads the finished run folders of a sweep (and their saved
``.hydra/config.yaml``) and composes no config of its own; a Hydra app would also make a run folder
of its own inside the logs it tables.
"""

from __future__ import annotations

import argparse
import logging

from diffmask.evaluation.report import write_report


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="diffmask-report", description=__doc__)
    parser.add_argument("sweep_dir", help="folder with the runs' metrics.json files (searched recursively)")
    parser.add_argument("--out", default=None, help="output folder (default: the sweep folder)")
    parser.add_argument("--test-set", default=None,
                        help="only plot this test set's mIoU (default: one pair of plots per test set)")
    parser.add_argument("--wandb-project", default=None,
                        help="also log table + plots to this W&B project, in the sweep's group "
                             "(its runs' run_group), W&B's files under --out")
    parser.add_argument("--skip-bad", action="store_true",
                        help="leave out corrupt metrics.json files (listed in the log and report.md) "
                             "instead of stopping")
    parser.add_argument("--ignore", action="append", default=[], metavar="KEY",
                        help="leave this setting (a dotted key or prefix, '*' for one key) "
                             "out of the conditions, "
                             "e.g. --ignore data.prompt; repeatable")
    return parser


def main(argv: list[str] | None = None) -> None:
    """The ``diffmask-report`` entry point: write the table and plots, print where.

    Args:
        argv: the arguments (None: the command line's).
    """
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    written = write_report(args.sweep_dir, args.out, args.test_set, args.wandb_project,
                           skip_bad=args.skip_bad, ignore=args.ignore)
    for kind, path in written.items():
        print(f"{kind}: {path}")


if __name__ == "__main__":
    main()
