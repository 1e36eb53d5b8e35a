"""``kallm eval``: BIG-Bench Hard, perplexity and held-out chat loss of a model."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from ..values import Number, existing_path, non_negative_int, path_or_hub_id, positive_int

DTYPES = ("auto", "float32", "bfloat16", "float16")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..checkpoints.load import DEFAULT_MODEL
    from ..eval.bbh import DEFAULT_HUB_DATASET, MODES
    from ..eval.evaluate import DEFAULT_TEXT, TASKS

    parser.add_argument("--model", default=DEFAULT_MODEL, type=path_or_hub_id,
                        help=f"hub id, folder (kallm checkpoints included), .gguf file or bundled name "
                             f"(default {DEFAULT_MODEL})")
    parser.add_argument("--tasks", help=f"kallm's evaluations, comma-separated, from: {', '.join(TASKS)} "
                                        f"(default: bbh,perplexity, or none with --harness)")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--bbh-dir", type=existing_path, help="local folder of BBH task JSON files (<task>.json); it must exist")
    source.add_argument("--bbh-dataset",
                        help=f"hub dataset id of BBH, used when --bbh-dir is not given (default {DEFAULT_HUB_DATASET})")
    parser.add_argument("--bbh-tasks", help="comma-separated BBH task names (default: every task present)")
    parser.add_argument("--limit", type=positive_int, help="first N examples of each BBH task")
    parser.add_argument("--mode", choices=MODES, default="generate",
                        help="generate: greedy reply, extracted answer (the research's way); "
                             "loglik: most likely of the closed answer set (cheaper; skips free-form tasks)")
    parser.add_argument("--batch-size", type=positive_int, default=8, help="examples (or windows) scored at once")
    parser.add_argument("--max-new-tokens", type=positive_int, default=256, help="reply length cap in generate mode")
    parser.add_argument("--text", default=DEFAULT_TEXT, type=path_or_hub_id,
                        help=f"perplexity text: a file or hub_id[:config] (default {DEFAULT_TEXT})")
    parser.add_argument("--max-length", type=Number(int, 2), default=512, help="perplexity window in tokens")
    parser.add_argument("--max-tokens", type=Number(int, 2), help="score at most this many tokens of the perplexity text")
    parser.add_argument("--chat-data", type=path_or_hub_id, help="held-out conversations for chat_loss (JSONL/JSON/parquet or hub id)")
    parser.add_argument("--chat-limit", type=positive_int, help="first N conversations of --chat-data")
    parser.add_argument("--out", help="folder for results.json, results.md and bbh_examples.jsonl")
    parser.add_argument("--card", action="store_true",
                        help="also add the results to the model card (README.md model-index) of --model, a local "
                             "kallm checkpoint folder")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    parser.add_argument("--dtype", choices=DTYPES, default="auto",
                        help="weights dtype (default: bfloat16 on GPU, float32 on CPU)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    harness = parser.add_argument_group("lm-evaluation-harness (pip install 'kallm[harness]')")
    harness.add_argument("--harness", metavar="TASKS",
                         help="also run these lm-evaluation-harness tasks (comma-separated) on the model kallm "
                              "loaded; its results join the report")
    harness.add_argument("--harness-include", metavar="FOLDER", type=existing_path,
                         help="folder of lm-evaluation-harness task YAMLs (local data files work offline)")
    harness.add_argument("--harness-fewshot", type=non_negative_int, help="few-shot examples per prompt (default: the task's)")
    harness.add_argument("--harness-limit", type=positive_int, help="first N examples of each harness task")
    harness.add_argument("--harness-no-chat-template", dest="harness_chat_template", action="store_false",
                         default=argparse.SUPPRESS,
                         help="give the harness's prompts as plain text instead of through the chat template")


def run(args) -> int:
    import torch

    from ..checkpoints.load import load_model
    from ..eval.bbh import load_bbh
    from ..eval.evaluate import evaluate, parse_tasks, to_markdown, write_results

    # Bad task names, folders or BBH selections fail before the model loads.
    tasks = parse_tasks(args.tasks) if args.tasks or not args.harness else []
    if args.harness:
        from ..eval.harness import check_harness_tasks

        check_harness_tasks(args.harness, args.harness_include)
    if args.card and not (Path(args.model) / "config.json").is_file():
        raise ValueError(f"--card writes into the model card of a local checkpoint folder; {args.model} is none")
    bbh_source = None
    if "bbh" in tasks:
        bbh_source = load_bbh(args.bbh_dir, args.bbh_tasks, args.limit, dataset=args.bbh_dataset)
    device = args.device if args.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu"
    dtype = args.dtype if args.dtype != "auto" else "bfloat16" if device.startswith("cuda") else "float32"
    model, tokenizer = load_model(args.model, dtype=getattr(torch, dtype))
    if args.card and not getattr(model.config, "kan_config", None):
        raise ValueError(f"--card writes kallm's model card, and {args.model} is no retrofitted kallm checkpoint")
    model.to(device)
    results = evaluate(
        model, tokenizer, tasks, bbh_source=bbh_source, bbh_tasks=args.bbh_tasks,
        limit=args.limit, mode=args.mode, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
        text=args.text, max_length=args.max_length, max_tokens=args.max_tokens, chat_data=args.chat_data,
        chat_limit=args.chat_limit, progress=not args.quiet,
    ) if tasks else {}
    if args.harness:
        from ..eval.harness import evaluate_harness

        started = time.perf_counter()
        results["harness"] = evaluate_harness(
            model, tokenizer, args.harness, include=args.harness_include, limit=args.harness_limit,
            num_fewshot=args.harness_fewshot, batch_size=args.batch_size,
            chat_template=getattr(args, "harness_chat_template", True),
        )
        results["harness"]["seconds"] = round(time.perf_counter() - started, 1)
    results["model"] = args.model
    print(to_markdown(results))
    if args.out:
        paths = write_results(results, args.out)
        print("wrote " + ", ".join(str(path) for path in paths.values()))
    if args.card:
        from ..core.model_card import write_model_card
        from ..eval.evaluate import card_results

        write_model_card(model, args.model, eval_results=card_results(results))
        print(f"added the results to {Path(args.model) / 'README.md'}")
    return 0
