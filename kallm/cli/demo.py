"""``kallm demo``: the main job: retrofit, heal, evaluate, save, reload, reply (``kallm.recipes.demo``)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..checkpoints.load import DEFAULT_MODEL
from ..core.retrofit_config import INITS
from ..data.folder import data_folder
from ..recipes.demo import HEAL_MINUTES, QUESTION, run_demo
from ..values import Number, existing_path, non_negative_float, path_or_hub_id, positive_int


def add_arguments(parser: argparse.ArgumentParser) -> None:
    data_dir = data_folder()
    wikitext = Path(data_dir, "text/wikitext2/wiki.test.raw") if data_dir else None
    bbh = Path(data_dir, "bbh/bbh") if data_dir else None
    parser.add_argument("--model", default=DEFAULT_MODEL, type=path_or_hub_id,
                        help="model to retrofit: a hub id, a folder, a .gguf file or a bundled name")
    parser.add_argument("--out", default="runs/demo", help="working folder; the healed model goes to OUT/model")
    parser.add_argument("--last-n", type=positive_int, default=5, help="retrofit the last N decoder blocks")
    parser.add_argument("--basis", default="cheby2", help="KAN basis (kallm.list_bases(), or a composed spec)")
    parser.add_argument("--degree", type=positive_int, default=2, help="degree of the basis")
    parser.add_argument("--init", default="fit", choices=INITS,
                        help="fit (default): start from the MLPs' function, fitted on the generated conversations")
    parser.add_argument("--heal-minutes", type=non_negative_float, default=HEAL_MINUTES,
                        help="wall-clock budget of kallm.heal (0 skips healing; default %(default)s)")
    parser.add_argument("--heal-steps", type=positive_int, help="also stop healing after this many end-to-end steps")
    parser.add_argument("--heal-data", type=path_or_hub_id,
                        help="healing text (.txt) or chat data; default: the generated training conversations, "
                             "plus Tiny Shakespeare and OpenAssistant chats under $KALLM_DATA_DIR if there")
    parser.add_argument("--held-out", type=positive_int, default=8, help="generated conversations kept for evaluation")
    parser.add_argument("--text", default=str(wikitext) if wikitext and wikitext.is_file() else None,
                        type=existing_path,
                        help="text file for perplexity (default: WikiText-2 test under $KALLM_DATA_DIR, if set)")
    parser.add_argument("--text-tokens", type=Number(int, 2), default=2048, help="tokens of --text scored")
    parser.add_argument("--bbh-dir", default=str(bbh) if bbh and bbh.is_dir() else None, type=existing_path,
                        help="BBH task folder (default: $KALLM_DATA_DIR/bbh/bbh, if set)")
    parser.add_argument("--bbh-tasks", default="boolean_expressions,navigate,causal_judgement,hyperbaton,"
                        "formal_fallacies", help="BBH tasks to score (comma-separated)")
    parser.add_argument("--bbh-limit", type=positive_int, default=12, help="examples per BBH task")
    parser.add_argument("--question", default=QUESTION, help="what the reloaded model is asked at the end")
    parser.add_argument("--max-new-tokens", type=positive_int, default=64, help="length of the generated replies")


run = run_demo
