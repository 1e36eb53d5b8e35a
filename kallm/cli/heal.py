"""``kallm heal``: bring a retrofitted model back to its original by distillation (block-local stage, then
end to end through the retrofitted tail only); runs under ``torchrun``/``accelerate launch`` too."""

from __future__ import annotations

import argparse
import os

from ..values import existing_path, path_or_hub_id

#: the HealConfig fields set by flags written here rather than generated from the field
MANUAL_FIELDS = ("output_dir", "resume", "progress_bar", "save_model")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..healing import HealConfig
    from ..train.options import add_flags, flag_fields

    parser.add_argument("--model", required=True, type=path_or_hub_id, help="the retrofitted model: a kallm checkpoint folder")
    parser.add_argument("--teacher", type=path_or_hub_id, help="the original model (default: the model the checkpoint was retrofitted "
                                          "from, as recorded in its config)")
    parser.add_argument("--data", type=path_or_hub_id, help="healing data: a .txt file, chat data (.jsonl/.json/.parquet, folder, hub "
                                       "dataset id); default: text the original model writes itself")
    parser.add_argument("--out", required=True, help="folder for metrics.jsonl, the curve, checkpoints and the "
                                                     "healed model")
    add_flags(parser, flag_fields(HealConfig, "healing", MANUAL_FIELDS))
    runs = parser.add_argument_group("run")
    runs.add_argument("--resume", nargs="?", const=True, default=None, metavar="CHECKPOINT", type=existing_path,
                      help="resume from CHECKPOINT, or without a value from the latest one in --out")
    runs.add_argument("--quiet", action="store_true", help="no progress bars")


def config_from_args(args):
    """``HealConfig`` from the parsed flags: every field of the same name."""
    from ..healing import HealConfig
    from ..train.options import field_values

    return HealConfig(**{**field_values(args, HealConfig), "output_dir": args.out, "progress_bar": not args.quiet})


def run(args) -> int:
    from ..checkpoints.load import load_model, recorded_base_model
    from ..healing import CURVE_FILE, heal

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
