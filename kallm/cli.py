"""``kallm`` command line: one subcommand per stage of the workflow."""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> (module with add_arguments/run, help)
COMMANDS = {
    "retrofit": ("kallm.surgery.cli", "replace the MLPs of the last N blocks with KAN feedforwards and save"),
    "inspect": ("kallm.surgery.cli_inspect", "print the parameter table of a saved model"),
    "train": ("kallm.train.cli", "train (heal) a retrofitted model on chat data"),
    "heal": ("kallm.train.cli_heal", "bring a retrofitted model back to its original by distillation, cheaply"),
    "eval": ("kallm.eval.cli", "evaluate on BIG-Bench Hard, perplexity, chat loss"),
    "experiment": ("kallm.experiment", "run a research recipe from a YAML config"),
    "plot": ("kallm.plot", "draw the learned functions of a KAN layer"),
    "demo": ("kallm.demo", "the main job: retrofit, heal, evaluate, save, reload, reply"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kallm", description="Retrofit causal LMs with KAN feedforwards.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module_name, help_text) in COMMANDS.items():
        sub = subparsers.add_parser(name, help=help_text, description=help_text)
        module = importlib.import_module(module_name)
        module.add_arguments(sub)
        sub.set_defaults(run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except (ValueError, FileNotFoundError, TypeError) as error:
        # Bad input reaches users as one readable line, not a traceback.
        print(f"kallm {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
