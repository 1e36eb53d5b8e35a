"""The ``kallm`` command line: one subcommand per stage of the workflow, each in a module of its own here."""

from __future__ import annotations

import argparse
import importlib
import os
import socket
import sys

from .. import __version__

# subcommand -> (module with add_arguments/run, help)
COMMANDS = {
    "retrofit": ("kallm.cli.retrofit", "replace the MLPs of the last N blocks with KAN feedforwards and save"),
    "inspect": ("kallm.cli.inspect", "print the parameter table of a saved model"),
    "train": ("kallm.cli.train", "train (heal) a retrofitted model on chat data"),
    "heal": ("kallm.cli.heal", "bring a retrofitted model back to its original by distillation, cheaply"),
    "eval": ("kallm.cli.eval", "evaluate on BIG-Bench Hard, perplexity, chat loss"),
    "experiment": ("kallm.cli.experiment", "run a research recipe from a YAML config"),
    "sweep": ("kallm.cli.sweep", "compare many KAN variants of a shrunk mini model on a classification task"),
    "plot": ("kallm.cli.plot", "draw the learned functions of a KAN layer"),
    "demo": ("kallm.cli.demo", "the main job: retrofit, heal, evaluate, save, reload, reply"),
    "export": ("kallm.cli.export", "export a model to ONNX (with its KV cache) and check it against PyTorch"),
}


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default, unless its help already says it or there is no value to show."""

    def _get_help_string(self, action):
        help_text = action.help or ""
        if not action.option_strings or "default" in help_text or action.default in (None, False, argparse.SUPPRESS):
            return help_text
        return help_text + " (default: %(default)s)"


def build_parser(commands=None) -> argparse.ArgumentParser:
    """The ``kallm`` parser. Only the subcommands named in ``commands`` (all when None) get their options, so
    that ``kallm --help`` and ``kallm CMD`` import nothing but what they need."""
    parser = argparse.ArgumentParser(prog="kallm", description="Retrofit causal LMs with KAN feedforwards.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module_name, help_text) in COMMANDS.items():
        sub = subparsers.add_parser(name, help=help_text, description=help_text, formatter_class=HelpFormatter)
        if commands is None or name in commands:
            module = importlib.import_module(module_name)
            module.add_arguments(sub)
            sub.set_defaults(run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    # The command is the first word that is not an option: the top-level parser only takes --help and --version.
    command = next((word for word in argv if not word.startswith("-")), None)
    args = build_parser(commands=[command]).parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except (ValueError, OSError) as error:
        # Failures a user can act on (bad input, a missing or damaged file, no network) read as one line;
        # anything else is a bug and keeps its traceback.
        print(f"kallm {args.command}: error: {describe_failure(error)}", file=sys.stderr)
        return 2


def describe_failure(error: BaseException) -> str:
    """The one line ``kallm`` prints for an expected failure."""
    if not _is_network_failure(error):
        return str(error)
    from ..checkpoints.load import DEFAULT_MODEL

    first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    if os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE"):
        reason = "HF_HUB_OFFLINE is set and the files are not in the local cache"
    else:
        reason = "the Hugging Face Hub cannot be reached"
    return (f"{reason} ({first_line}). To work offline, use local files: a model folder, a .gguf file or the "
            f"bundled {DEFAULT_MODEL}, and local data files; hub files downloaded before load from the cache with "
            f"HF_HUB_OFFLINE=1")


def _is_network_failure(error: BaseException) -> bool:
    from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled

    network_errors = (ConnectionError, TimeoutError, socket.gaierror, LocalEntryNotFoundError, OfflineModeIsEnabled)
    try:
        import requests

        network_errors += (requests.exceptions.ConnectionError, requests.exceptions.Timeout)
    except ImportError:
        pass
    seen = set()
    while error is not None and id(error) not in seen:  # the network error is often the cause of another
        if isinstance(error, network_errors):
            return True
        seen.add(id(error))
        error = error.__cause__ or (None if error.__suppress_context__ else error.__context__)
    return False

