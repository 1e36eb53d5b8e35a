"""``kallm sweep CONFIG.yaml``: many KAN variants of a shrunk mini model on a classification task, over seeds
(``kallm.recipes.sweep``)."""

from __future__ import annotations

import argparse

from ..recipes.runs import check_unique_seeds
from ..recipes.sweep import SweepConfig, load_sweep, run_sweep
from ..values import existing_path
from ..values import seed as seed_range


def select(config: SweepConfig, arms: str | None, seeds: list[int] | None) -> SweepConfig:
    """The config narrowed to ``--arms a,b`` and ``--seeds 0,1`` (names and seeds the config holds)."""
    if arms:
        chosen = [name.strip() for name in arms.split(",") if name.strip()]
        unknown = [name for name in chosen if name not in config.arms]
        if unknown:
            raise ValueError(f"--arms: {unknown} are not arms of {config.name}; its arms: {', '.join(config.arms)}")
        config.arms = {name: config.arms[name] for name in chosen}
    if seeds:
        config.seeds = seeds
    return config


def seed_list(text: str) -> list[int]:
    """``--seeds 0,1,2``: distinct seeds, comma-separated."""
    try:
        seeds = [seed_range(part.strip()) for part in text.split(",")]
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"takes integers in [0, {seed_range.high}] separated by commas, e.g. 0,1; "
                                         f"got {text!r}") from None
    try:
        check_unique_seeds(seeds, "seeds")
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return seeds


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", type=existing_path, help="YAML sweep config (see configs/sweep-agnews.yaml)")
    parser.add_argument("--arms", help="run only these arms, comma-separated")
    parser.add_argument("--seeds", type=seed_list, help="run only these seeds, comma-separated, e.g. 0 or 0,1")
    parser.add_argument("--out", help="override the config's output folder")
    parser.add_argument("--save-models", action="store_true",
                        help="save every trained arm to OUT/models/ARM/seedN (model + trimmed tokenizer)")
    parser.add_argument("--restart", action="store_true",
                        help="run every arm again, ignoring the runs OUT/runs.json already holds")


def run(args) -> int:
    config = select(load_sweep(args.config), args.arms, args.seeds)
    if args.out:
        config.out = args.out
    run_sweep(config, restart=args.restart, save_models=args.save_models)
    return 0
