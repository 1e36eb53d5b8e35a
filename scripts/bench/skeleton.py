"""What every script of scripts/bench/ stands on: its parser and shared flags, the data folder, torch's threads and
the report (a JSON file and a markdown table).

A script here runs as ``python scripts/bench/NAME.py``, so this folder is on its import path and ``import skeleton``
finds this module. Reports go to docs/results/ by default, beside the other measured results; the guides in docs/
link them there.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

from kallm.data.folder import data_folder, require_data_folder
from kallm.recipes.runs import portable_paths

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "docs" / "results"


def argument_parser(doc: str, whole: bool = False) -> argparse.ArgumentParser:
    """A parser described by the first line of the script's docstring ``doc``, or by all of it as written where
    ``whole`` (a docstring that is the script's usage)."""
    if whole:
        return argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    return argparse.ArgumentParser(description=doc.splitlines()[0])


def parse_arguments(parser: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    """``parser``'s arguments, with torch's CPU threads set to ``--threads`` where that is one count (None leaves
    torch's choice; a script measuring several counts sets each itself)."""
    args = parser.parse_args(argv)
    if isinstance(getattr(args, "threads", None), int):
        torch.set_num_threads(args.threads)
    return args


def add_threads_flag(parser: argparse.ArgumentParser, default, **options) -> None:
    """``--threads``: torch's CPU threads (``parse_arguments`` applies a single count)."""
    options.setdefault("help", "torch CPU threads (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=default, **options)


def result_path(name: str) -> str:
    """docs/results/NAME, where a report goes by default."""
    return str(RESULTS / name)


def add_report_flags(parser: argparse.ArgumentParser, name: str | None = None, *, required: bool = False,
                     note: str = "") -> None:
    """``--json`` and ``--markdown``: where ``write_report`` puts the report and its tables. With a ``name`` they
    default to docs/results/NAME.json and .md ('' skips either, ``note`` ends their help); without, nothing is
    written unless they are given (or they are ``required``)."""
    if name is None:
        parser.add_argument("--json", required=required, help="write the settings and results here")
        parser.add_argument("--markdown", required=required, help="write the tables here")
        return
    parser.add_argument("--json", default=result_path(f"{name}.json"), help="'' to skip" + note)
    parser.add_argument("--markdown", default=result_path(f"{name}.md"), help="'' to skip" + note)


def add_output_flag(parser: argparse.ArgumentParser, name: str, writes: str = ".json and .md") -> None:
    """``--output PREFIX``: the report goes to PREFIX.json and PREFIX.md (default docs/results/NAME); '' skips it."""
    parser.add_argument("--output", default=result_path(name), help=f"writes {writes}")


def data_path(*parts: str) -> str | None:
    """``$KALLM_DATA_DIR/<parts>``, a flag's default; None where the data folder is not set (the script then asks
    for the flag)."""
    folder = data_folder()
    return str(folder.joinpath(*parts)) if folder else None


def add_chat_data_flags(parser: argparse.ArgumentParser) -> None:
    """``--train-data`` and ``--eval-data``: the chat data to train on and the held-out chat data, by default from
    the data folder (``check_chat_data`` refuses a run without them)."""
    parser.add_argument("--train-data", default=data_path("chat", "hh_rlhf_helpful", "test.jsonl"),
                        help="chat data to train on (default: $KALLM_DATA_DIR/chat/hh_rlhf_helpful/test.jsonl)")
    parser.add_argument("--eval-data", default=data_path("chat", "oasst_en100", "best_path.jsonl"),
                        help="held-out chat data (default: $KALLM_DATA_DIR/chat/oasst_en100/best_path.jsonl)")


def check_chat_data(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse, as an argument error, a run whose chat data is neither given nor in the data folder."""
    if not args.train_data or not args.eval_data:
        parser.error("set KALLM_DATA_DIR or pass --train-data and --eval-data")


def require_data(purpose: str) -> Path:
    """The data folder; without one, exit with the one-line message that says to set ``$KALLM_DATA_DIR``."""
    try:
        return require_data_folder(purpose)
    except FileNotFoundError as error:
        raise SystemExit(str(error)) from None


def write_report(report: dict, table: str, json_path: str | None, markdown_path: str | None) -> None:
    """Write ``report`` as JSON to ``json_path`` and the markdown ``table`` to ``markdown_path`` (either skipped
    when empty or None; missing folders made). Data under ``${KALLM_DATA_DIR}`` is named so, not by this machine's
    folders."""
    def write(path: str, text: str) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(portable_paths(text), encoding="utf-8")

    if json_path:
        write(json_path, json.dumps(report, indent=2) + "\n")
    if markdown_path:
        write(markdown_path, table)


def write_report_at(prefix: str, report: dict, table: str) -> None:
    """``write_report`` to PREFIX.json and PREFIX.md, as ``--output PREFIX`` promises; nothing for an empty one."""
    if prefix:
        write_report(report, table, f"{prefix}.json", f"{prefix}.md")


def load_average() -> str:
    """The 1, 5 and 15 minute load averages, as the tables quote them (runs on shared cores say how shared)."""
    return " ".join(f"{value:.1f}" for value in os.getloadavg())
