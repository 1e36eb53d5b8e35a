"""``kallm experiment CONFIG.yaml``: a research recipe, several arms over seeds (``kallm.recipes.experiment``)."""

from __future__ import annotations

import argparse

from ..recipes.experiment import load_experiment, run_experiment
from ..values import existing_path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", type=existing_path, help="YAML experiment config (see configs/)")
    parser.add_argument("--out", help="override the config's output folder")
    parser.add_argument("--restart", action="store_true",
                        help="run every arm again, ignoring the runs OUT/runs.json already holds")


def run(args) -> int:
    config = load_experiment(args.config)
    if args.out:
        config.out = args.out
    run_experiment(config, restart=args.restart)
    return 0
