"""``kallm heal``: bring a retrofitted model back to its original by distillation (block-local stage, then
end to end through the retrofitted tail only); runs under ``torchrun``/``accelerate launch`` too."""

from __future__ import annotations

import argparse
import os
from dataclasses import fields


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..surgery.trainable import POLICIES
    from .heal import HealConfig

    default = {f.name: f.default for f in fields(HealConfig)}
    parser.add_argument("--model", required=True, help="the retrofitted model: a kallm checkpoint folder")
    parser.add_argument("--teacher", help="the original model (default: the model the checkpoint was retrofitted "
                                          "from, as recorded in its config)")
    parser.add_argument("--data", help="healing data: a .txt file, chat data (.jsonl/.json/.parquet, folder, hub "
                                       "dataset id); default: text the original model writes itself")
    parser.add_argument("--out", required=True, help="folder for metrics.jsonl, the curve, checkpoints and the "
                                                     "healed model")
    budget = parser.add_argument_group("budget (give one or both)")
    budget.add_argument("--minutes", type=float, help="wall-clock budget of both stages")
    budget.add_argument("--max-steps", type=int, help="end-to-end optimizer steps")
    e2e = parser.add_argument_group("end-to-end stage")
    e2e.add_argument("--trainable", choices=POLICIES, default=default["trainable"],
                     help="which parameters train (default %(default)s)")
    e2e.add_argument("--lr", type=float, default=default["learning_rate"], help="peak learning rate")
    e2e.add_argument("--warmup", type=float, default=default["warmup"], help="warmup share of the stage")
    e2e.add_argument("--batch-size", type=int, default=default["batch_size"], help="sequences per step and process")
    e2e.add_argument("--max-length", type=int, default=default["max_length"], help="tokens per sequence")
    e2e.add_argument("--temperature", type=float, default=default["temperature"])
    e2e.add_argument("--ce-weight", type=float, default=default["ce_weight"],
                     help="weight of next-token cross-entropy added to the KL")
    e2e.add_argument("--progressive", action="store_true",
                     help="blend original and new feedforwards, (1-a)*MLP + a*KAN with a rising 0 -> 1")
    e2e.add_argument("--progressive-fraction", type=float, default=default["progressive_fraction"])
    local = parser.add_argument_group("block-local stage")
    local.add_argument("--local-fraction", type=float, default=default["local_fraction"],
                       help="share of --minutes it may use (0 skips it; default %(default)s)")
    local.add_argument("--local-passes", type=float, default=default["local_passes"])
    local.add_argument("--local-tokens", type=int, default=default["local_tokens"])
    local.add_argument("--local-lr", type=float, default=default["local_learning_rate"])
    data = parser.add_argument_group("data")
    data.add_argument("--generate-tokens", type=int, default=default["generate_tokens"],
                      help="tokens the original writes when --data is not given")
    data.add_argument("--split", default=default["split"], help="split of a hub dataset")
    data.add_argument("--limit", type=int, help="use the first N rows only")
    data.add_argument("--cache-dir", help="keep prefix hidden states here and reuse them in later epochs")
    hardware = parser.add_argument_group("precision and checkpoints")
    precision = hardware.add_mutually_exclusive_group()
    precision.add_argument("--bf16", action="store_true")
    precision.add_argument("--fp16", action="store_true")
    hardware.add_argument("--save-steps", type=int, default=default["save_steps"], help="0: no checkpoints")
    hardware.add_argument("--logging-steps", type=int, default=default["logging_steps"])
    hardware.add_argument("--resume", nargs="?", const=True, default=None, metavar="CHECKPOINT",
                          help="resume from CHECKPOINT, or without a value from the latest one in --out")
    hardware.add_argument("--seed", type=int, default=default["seed"])
    hardware.add_argument("--quiet", action="store_true", help="no progress bars")


def config_from_args(args):
    from .heal import HealConfig

    return HealConfig(
        output_dir=args.out, minutes=args.minutes, max_steps=args.max_steps, trainable=args.trainable,
        learning_rate=args.lr, warmup=args.warmup, batch_size=args.batch_size, max_length=args.max_length,
        temperature=args.temperature, ce_weight=args.ce_weight, progressive=args.progressive,
        progressive_fraction=args.progressive_fraction, local_fraction=args.local_fraction,
        local_passes=args.local_passes, local_tokens=args.local_tokens, local_learning_rate=args.local_lr,
        generate_tokens=args.generate_tokens, split=args.split, limit=args.limit, cache_dir=args.cache_dir,
        bf16=args.bf16, fp16=args.fp16, save_steps=args.save_steps, logging_steps=args.logging_steps,
        resume=args.resume, seed=args.seed, progress_bar=not args.quiet,
    )


def run(args) -> int:
    from ..loading import load_model, recorded_base_model
    from .heal import CURVE_FILE, heal

    config = config_from_args(args)  # bad settings fail before any model loads
    model, tokenizer = load_model(args.model)
    teacher, _ = load_model(args.teacher or recorded_base_model(model, "kallm heal"))
    report = heal(model, teacher, tokenizer, data=args.data, config=config)
    if int(os.environ.get("RANK", "0")) == 0:
        last = next((p for p in reversed(report.curve) if p["stage"] == "end_to_end"), None)
        print(f"data: {report.data['sequences']} sequences, {report.data['tokens']:,} tokens ({report.data['source']})")
        if report.local:
            print("local stage, held-out error per block: " + ", ".join(
                f"{i}: {e['before']:.3f} -> {e['after']:.3f}" for i, e in report.local.items()))
        print(f"healed {report.steps} end-to-end steps in {report.seconds:.0f} s on {report.world_size} process(es), "
              f"{report.tokens_per_second:,.0f} tokens/s" + (f", last KL {last['kl']:.4f}" if last else ""))
        print(f"model and tokenizer saved to {args.out}; curve in {os.path.join(args.out, CURVE_FILE)}")
    return 0
