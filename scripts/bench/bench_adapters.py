"""KAN adapter against LoRA at (nearly) the same number of trainable parameters: held-out chat loss after equal steps.

Both adapter types sit on the same targets of the same base model (default: the attention projections of the last
5 blocks of the plain SmolLM2-135M-Instruct, so that backpropagation stops there), train for the same number of steps on the same chat data with kallm.train (same
batches, schedule and seed), and are scored by kallm.eval.chat_loss on held-out conversations. Each adapter type
runs at every learning rate of --lrs and every seed of --seeds; the table gives each run and the best learning
rate of each type (lowest mean loss over the seeds). The base model's loss without any adapter is the reference.
Equal steps make the result independent of how loaded the CPU is; only the times depend on it.

    python scripts/bench/bench_adapters.py [--model smollm2-135m-instruct] [--last-blocks 5] [--lora-rank 8]
        [--kan-rank 8] [--steps 30] [--lrs 1e-3 3e-3] [--seeds 0]
        [--json docs/results/bench_adapters.json] [--markdown docs/results/bench_adapters.md]
"""

from __future__ import annotations

import copy
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from peft import get_peft_model
from skeleton import (
    add_chat_data_flags,
    add_report_flags,
    argument_parser,
    check_chat_data,
    load_average,
    parse_arguments,
    write_report,
)

import kallm
from kallm.eval.chat_loss import chat_loss
from kallm.finetune.lora import LORA_TARGETS
from kallm.surgery.checks import causal_lm_parts
from kallm.train import TrainConfig, train
from kallm.train.config import ADAPTER_TYPES


def adapter_config(model, kind: str, args):
    """The ``kind`` adapter's PEFT config for the --targets of the last --last-blocks blocks."""
    if kind == "lora":
        config = kallm.lora_config(model, args.targets, r=args.lora_rank, lora_alpha=args.alpha)
    else:
        config = kallm.kan_adapter_config(model, args.targets, r=args.kan_rank, alpha=args.alpha,
                                          basis=args.kan_basis, degree=args.kan_degree)
    _, adapter, blocks = causal_lm_parts(model, "bench_adapters")
    kept = [f"{adapter.blocks_path}.{index}." for index in range(len(blocks))][-args.last_blocks:]
    config.target_modules = {name for name in config.target_modules if name.startswith(tuple(kept))}
    return config


def run(base, tokenizer, kind: str, lr: float, seed: int, args, work: Path) -> dict:
    torch.manual_seed(seed)  # the adapter's initialisation
    model = get_peft_model(copy.deepcopy(base), adapter_config(base, kind, args))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    config = TrainConfig(
        output_dir=str(work / f"{kind}-{lr}-{seed}"), max_steps=args.steps, batch_size=args.batch_size,
        learning_rate=lr, warmup=args.warmup, max_length=args.max_length, limit=args.train_limit,
        logging_steps=max(1, args.steps // 10), save_steps=10**6, seed=seed, progress_bar=False,
    )
    start = time.perf_counter()
    result = train(model, tokenizer, args.train_data, config)
    seconds = time.perf_counter() - start
    score = chat_loss(model, tokenizer, args.eval_data, max_length=args.max_length, limit=args.eval_limit)
    return {"adapter": kind, "rank": args.lora_rank if kind == "lora" else args.kan_rank, "lr": lr, "seed": seed,
            "trainable_parameters": trainable, "chat_loss": score["loss"], "tokens": score["tokens"],
            "last_train_loss": result.metrics.get("last_logged_loss"), "train_seconds": seconds}


def best_per_adapter(runs: list[dict]) -> list[dict]:
    """For each adapter type, its learning rate with the lowest mean held-out loss over the seeds."""
    best = []
    for kind in ADAPTER_TYPES:
        by_lr = {}
        for row in runs:
            if row["adapter"] == kind:
                by_lr.setdefault(row["lr"], []).append(row["chat_loss"])
        if by_lr:
            lr, losses = min(by_lr.items(), key=lambda item: statistics.mean(item[1]))
            best.append({"adapter": kind, "lr": lr, "mean_chat_loss": statistics.mean(losses),
                         "seed_losses": losses})
    return best


def markdown(report: dict) -> str:
    s = report["settings"]
    counts = {row["adapter"]: row["trainable_parameters"] for row in report["runs"]}
    lines = [
        f"{s['model']} ({s['base']}), adapters on the {s['targets']} targets of the last {s['last_blocks']} blocks; "
        f"LoRA rank {s['lora_rank']} "
        f"({counts.get('lora', 0):,} trainable parameters) against a KAN adapter of rank {s['kan_rank']} "
        f"({s['kan_basis']}, degree {s['kan_degree']}; {counts.get('kan', 0):,} trainable parameters); alpha "
        f"{s['alpha']}; {s['steps']} steps of {s['batch_size']} x {s['max_length']} tokens on {s['train_limit']} "
        f"conversations of {Path(s['train_data']).parent.name}, {s['lr_scheduler']} schedule, warmup {s['warmup']}; "
        f"held-out loss on {s['eval_limit']} conversations of {Path(s['eval_data']).parent.name} "
        f"({report['base_chat_loss']['tokens']:,} assistant tokens). Load average {s['load_average']}.",
        "",
        f"Without an adapter: held-out chat loss {report['base_chat_loss']['loss']:.4f}.",
        "",
        "| adapter | rank | trainable parameters | lr | seed | held-out chat loss | last train loss | train time |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in report["runs"]:
        last = "" if row["last_train_loss"] is None else f"{row['last_train_loss']:.4f}"
        lines.append(f"| {row['adapter']} | {row['rank']} | {row['trainable_parameters']:,} | {row['lr']:g} | "
                     f"{row['seed']} | {row['chat_loss']:.4f} | {last} | {row['train_seconds']:.0f} s |")
    lines += ["", "| adapter | best lr | mean held-out chat loss | per seed |", "|---|---:|---:|---|"]
    for row in report["best"]:
        lines.append(f"| {row['adapter']} | {row['lr']:g} | {row['mean_chat_loss']:.4f} | "
                     f"{', '.join(f'{loss:.4f}' for loss in row['seed_losses'])} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argument_parser(__doc__)
    parser.add_argument("--model", default="smollm2-135m-instruct", help="base model (kallm.load_model name)")
    parser.add_argument("--retrofit-last-n", type=int, default=0,
                        help="retrofit the last N blocks first (default 0: the plain model)")
    parser.add_argument("--targets", default="attention", choices=LORA_TARGETS,
                        help="kallm.lora_targets choice for both adapters (default %(default)s)")
    parser.add_argument("--last-blocks", type=int, default=5,
                        help="only the targets in the last N decoder blocks (default %(default)s)")
    add_chat_data_flags(parser)
    parser.add_argument("--train-limit", type=int, default=400, help="conversations to train on")
    parser.add_argument("--eval-limit", type=int, default=40, help="held-out conversations")
    parser.add_argument("--lora-rank", type=int, default=8)
    parser.add_argument("--kan-rank", type=int, default=8)
    parser.add_argument("--kan-basis", default="cheby2")
    parser.add_argument("--kan-degree", type=int, default=2)
    parser.add_argument("--alpha", type=float, default=16.0, help="both adapters scale their update by alpha / rank")
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps per run (default %(default)s)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--warmup", type=float, default=0.1)
    parser.add_argument("--lrs", type=float, nargs="+", default=[1e-3, 3e-3], help="learning rates to try")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--adapters", nargs="+", default=list(ADAPTER_TYPES), choices=ADAPTER_TYPES)
    add_report_flags(parser)
    args = parse_arguments(parser, argv)
    check_chat_data(parser, args)

    base, tokenizer = kallm.load_model(args.model)
    if args.retrofit_last_n:
        base = kallm.retrofit(base, last_n=args.retrofit_last_n)
    base.eval()
    base_score = chat_loss(base, tokenizer, args.eval_data, max_length=args.max_length, limit=args.eval_limit)
    settings = {**vars(args), "base": f"last {args.retrofit_last_n} blocks retrofitted" if args.retrofit_last_n
                else "plain", "lr_scheduler": TrainConfig().lr_scheduler}
    settings.pop("json"), settings.pop("markdown")
    runs = []
    with tempfile.TemporaryDirectory() as work:
        for seed in args.seeds:  # adapters inside the loops: a run stopped early still compares them
            for lr in args.lrs:
                for kind in args.adapters:
                    runs.append(run(base, tokenizer, kind, lr, seed, args, Path(work)))
                    print(json.dumps(runs[-1]), flush=True)
                    table = report_runs(args, settings, base_score, runs)  # after every run: a slow bench
    print(table)
    return 0


def report_runs(args, settings: dict, base_score: dict, runs: list[dict]) -> str:
    report = {"settings": {**settings, "load_average": load_average()},
              "base_chat_loss": {"loss": base_score["loss"], "tokens": base_score["tokens"]},
              "runs": runs, "best": best_per_adapter(runs)}
    table = markdown(report)
    write_report(report, table, args.json, args.markdown)
    return table


if __name__ == "__main__":
    raise SystemExit(main())
