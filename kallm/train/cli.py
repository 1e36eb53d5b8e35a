"""``kallm train``: train (heal) a model on chat data; runs under ``accelerate launch`` and
``torchrun`` too (``torchrun --nproc_per_node 2 -m kallm.cli train ...``)."""

from __future__ import annotations

import argparse
import os
from dataclasses import fields


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..surgery.lora import LORA_TARGETS
    from ..surgery.trainable import POLICIES
    from .data import TRUNCATION
    from .trainer import SCHEDULERS, TrainConfig

    default = {f.name: f.default for f in fields(TrainConfig)}
    parser.add_argument("--model", required=True,
                        help="model to train: a kallm checkpoint folder (from kallm retrofit), hub id, .gguf file "
                             "or bundled name")
    parser.add_argument("--data", required=True,
                        help="chat data with a 'messages' column: .jsonl/.json/.parquet file, folder or glob, "
                             "or hub dataset id[:config] (e.g. HuggingFaceTB/smol-smoltalk)")
    parser.add_argument("--out", default=default["output_dir"],
                        help="folder for checkpoints, metrics.jsonl and the final model (default %(default)s)")
    parser.add_argument("--trainable", choices=POLICIES, default=default["trainable"],
                        help="which parameters train (default: tail+embeddings; with --lora the adapter alone, "
                             "and a policy names the model weights that train besides it)")
    length = parser.add_argument_group("length of training")
    length.add_argument("--max-steps", type=int, default=default["max_steps"],
                        help="optimizer steps (default: --epochs over the data)")
    length.add_argument("--epochs", type=float, default=default["epochs"])
    length.add_argument("--limit", type=int, help="use the first N conversations only")
    length.add_argument("--split", default=default["split"], help="split of a hub dataset (default %(default)s)")
    optim = parser.add_argument_group("optimization")
    optim.add_argument("--lr", type=float, default=default["learning_rate"], help="peak learning rate")
    optim.add_argument("--scheduler", choices=SCHEDULERS, default=default["lr_scheduler"])
    optim.add_argument("--warmup", type=float, default=default["warmup"],
                       help="warmup steps, or a fraction of all steps if below 1 (default %(default)s)")
    optim.add_argument("--weight-decay", type=float, default=default["weight_decay"])
    optim.add_argument("--batch-size", type=int, default=default["batch_size"], help="per device")
    optim.add_argument("--grad-accum", type=int, default=default["grad_accum"],
                       help="gradient accumulation steps")
    optim.add_argument("--seed", type=int, default=default["seed"])
    batching = parser.add_argument_group("sequences")
    batching.add_argument("--max-length", type=int, default=default["max_length"], help="tokens per sequence")
    batching.add_argument("--truncation", choices=TRUNCATION, default=default["truncation"],
                          help="what to do with conversations longer than --max-length")
    batching.add_argument("--packing", action="store_true", help="pack several conversations per sequence")
    batching.add_argument("--group-by-length", action="store_true",
                          help="batch conversations of similar length together")
    batching.add_argument("--num-proc", type=int, help="processes for tokenization")
    distill = parser.add_argument_group("distillation")
    distill.add_argument("--distill", action="store_true",
                         help="mix in a KL divergence to a teacher (default teacher: the model the checkpoint "
                              "was retrofitted from)")
    distill.add_argument("--teacher", help="teacher model (hub id, folder, .gguf or bundled name)")
    distill.add_argument("--distill-alpha", type=float, default=default["distill_alpha"],
                         help="weight of the KL term; 1 - alpha weighs cross-entropy (default %(default)s)")
    distill.add_argument("--distill-temperature", type=float, default=default["distill_temperature"])
    lora = parser.add_argument_group("LoRA adapter (docs/peft.md)")
    lora.add_argument("--lora", type=int, metavar="RANK", default=default["lora_rank"],
                      help="train a LoRA adapter of this rank instead of the model's weights; --out receives the "
                           "adapter")
    lora.add_argument("--lora-alpha", type=float, default=default["lora_alpha"],
                      help="LoRA scaling numerator: updates are scaled by alpha / rank (default %(default)s)")
    lora.add_argument("--lora-dropout", type=float, default=default["lora_dropout"],
                      help="dropout on the adapter's input (default %(default)s)")
    lora.add_argument("--lora-targets", choices=LORA_TARGETS, default=default["lora_targets"],
                      help="layers that take the adapter: KAN layers, attention projections or both (default: all "
                           "on a retrofitted model, attention on a plain one)")
    lora.add_argument("--merge", action="store_true",
                      help="also save the model with the trained adapter merged into it, to OUT/merged")
    curriculum = parser.add_argument_group("degree curriculum (docs/transfer.md)")
    curriculum.add_argument("--degree-stages", type=int, nargs="+", metavar="DEGREE", default=default["degree_stages"],
                            help="train in stages of rising KAN degree (e.g. 1 2 3), --max-steps split evenly, the "
                                 "KAN layers converted exactly between stages")
    hardware = parser.add_argument_group("precision and memory")
    precision = hardware.add_mutually_exclusive_group()
    precision.add_argument("--bf16", action="store_true", help="bfloat16 mixed precision")
    precision.add_argument("--fp16", action="store_true", help="float16 mixed precision (GPU)")
    hardware.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations")
    saving = parser.add_argument_group("checkpoints and logs")
    saving.add_argument("--save-steps", type=int, default=default["save_steps"])
    saving.add_argument("--save-total-limit", type=int, default=default["save_total_limit"],
                        help="checkpoints kept (default %(default)s)")
    saving.add_argument("--logging-steps", type=int, default=default["logging_steps"])
    saving.add_argument("--resume", nargs="?", const=True, default=None, metavar="CHECKPOINT",
                        help="resume from CHECKPOINT, or without a value from the latest one in --out")
    saving.add_argument("--quiet", action="store_true", help="no progress bar")


def config_from_args(args):
    from .trainer import TrainConfig

    return TrainConfig(
        output_dir=args.out, trainable=args.trainable, max_steps=args.max_steps, epochs=args.epochs,
        learning_rate=args.lr, lr_scheduler=args.scheduler, warmup=args.warmup, weight_decay=args.weight_decay,
        batch_size=args.batch_size, grad_accum=args.grad_accum, max_length=args.max_length,
        truncation=args.truncation, packing=args.packing, group_by_length=args.group_by_length, split=args.split,
        limit=args.limit, distill_alpha=args.distill_alpha, distill_temperature=args.distill_temperature,
        bf16=args.bf16, fp16=args.fp16, gradient_checkpointing=args.gradient_checkpointing,
        save_steps=args.save_steps, save_total_limit=args.save_total_limit, logging_steps=args.logging_steps,
        seed=args.seed, resume=args.resume, num_proc=args.num_proc, progress_bar=not args.quiet,
        lora_rank=args.lora, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
        lora_targets=args.lora_targets, merge=args.merge, degree_stages=args.degree_stages,
    )


def run(args) -> int:
    from ..loading import load_model, recorded_base_model
    from .trainer import train

    config = config_from_args(args)  # bad settings fail before any model loads
    if args.teacher and not args.distill:
        raise ValueError("--teacher is only used with --distill")
    model, tokenizer = load_model(args.model)
    teacher = _load_teacher(args.teacher or recorded_base_model(model, "--distill")) if args.distill else None
    result = train(model, tokenizer, args.data, config, teacher=teacher)
    if int(os.environ.get("RANK", "0")) == 0:
        from .data import DataStats

        stats = DataStats(**result.data)
        loss = result.metrics.get("last_logged_loss")
        print(f"data: {stats.describe()}")
        print(f"trained {result.global_step} steps on {result.world_size} process(es), "
              f"{result.trainable_parameters:,} trainable parameters"
              + (f", last logged loss {loss:.4f}" if loss is not None else ""))
        saved = "adapter" if config.lora_rank else "model"
        print(f"{saved} and tokenizer saved to {result.output_dir}; metrics in {result.metrics_file}")
        if result.merged_dir:
            print(f"model with the adapter merged into it saved to {result.merged_dir}")
    return 0


def _load_teacher(source: str):
    from ..loading import load_model

    return load_model(source)[0]  # float32 weights, GGUF files dequantized, like the student
