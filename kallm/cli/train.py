"""``kallm train``: train (heal) a model on chat data; runs under ``accelerate launch`` and
``torchrun`` too (``torchrun --nproc_per_node 2 -m kallm.cli train ...``).

Its options come from ``TrainConfig``'s fields through transformers' ``HfArgumentParser``, each with the help
and default written once, on the field; the ``TrainingArguments`` fields of ``PASS_THROUGH`` get flags with
transformers' own help, and any other one can be set in a ``--training-args`` YAML or JSON file.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import typing
import warnings
from pathlib import Path

from ..values import existing_path, path_or_hub_id

#: the TrainConfig fields set by flags written here rather than generated from the field
MANUAL_FIELDS = ("resume", "progress_bar", "training_arguments")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, type=path_or_hub_id,
                        help="model to train: a kallm checkpoint folder (from kallm retrofit), hub id, .gguf file "
                             "or bundled name")
    parser.add_argument("--data", required=True, type=path_or_hub_id,
                        help="chat data with a 'messages' column: .jsonl/.json/.parquet file, folder or glob, "
                             "or hub dataset id[:config] (e.g. HuggingFaceTB/smol-smoltalk)")
    _add_generated_flags(parser)
    _add_renamed_flags(parser)
    distill = parser.add_argument_group("distillation")
    distill.add_argument("--distill", action="store_true",
                         help="mix in a KL divergence to a teacher (default teacher: the model the checkpoint "
                              "was retrofitted from)")
    distill.add_argument("--teacher", type=path_or_hub_id, help="teacher model (hub id, folder, .gguf or bundled name)")
    runs = parser.add_argument_group("run")
    runs.add_argument("--training-args", metavar="FILE", type=existing_path,
                      help="YAML or JSON file of further TrainingArguments fields (e.g. lr_scheduler_kwargs, "
                           "hub_strategy); the flags above win over it")
    runs.add_argument("--resume", nargs="?", const=True, default=None, metavar="CHECKPOINT", type=existing_path,
                      help="resume from CHECKPOINT, or without a value from the latest one in --out")
    runs.add_argument("--quiet", dest="progress_bar", action="store_false", default=argparse.SUPPRESS,
                      help="no progress bar")


def _add_generated_flags(parser):
    """The flags of ``TrainConfig``'s fields and of the ``PASS_THROUGH`` TrainingArguments fields."""
    from ..train.config import TrainConfig
    from ..train.options import add_flags, flag_fields

    add_flags(parser, flag_fields(TrainConfig, "training", MANUAL_FIELDS), _pass_through_fields())


def _add_renamed_flags(parser):
    """The flags of the previous release's field names (``--lora``, ``--lora-alpha``, ...), hidden, kept for one
    release: ``config_from_args`` moves their values to the field's name now, with a FutureWarning."""
    from ..train.config import RENAMED_FIELDS

    actions = {action.dest: action for action in parser._actions}
    for old, new in RENAMED_FIELDS.items():
        flags = [f"--{old}", f"--{old.replace('_', '-')}"] + (["--lora"] if new == "adapter_rank" else [])
        parser.add_argument(*flags, dest=f"renamed_{old}", type=actions[new].type, choices=actions[new].choices,
                            default=None, help=argparse.SUPPRESS)


def _move_renamed_flags(args) -> None:
    from ..train.config import RENAMED_FIELDS

    for old, new in RENAMED_FIELDS.items():
        value = getattr(args, f"renamed_{old}", None)
        if value is not None:
            flag, now = ("--lora" if new == "adapter_rank" else f"--{old.replace('_', '-')}"), new.replace("_", "-")
            warnings.warn(f"kallm train {flag} is now --{now}; the old flag is kept for this release only",
                          FutureWarning, stacklevel=2)
            setattr(args, new, value)


def _pass_through_fields():
    """The ``PASS_THROUGH`` fields of ``TrainingArguments`` with transformers' help, defaulting to None (not
    given: ``kallm train`` leaves them to ``--training-args`` and kallm's defaults)."""
    from transformers import TrainingArguments

    from ..train.config import PASS_THROUGH
    from ..values import positive_float, positive_int

    hints = typing.get_type_hints(TrainingArguments)
    original = {f.name: f for f in dataclasses.fields(TrainingArguments)}
    flags = dataclasses.make_dataclass("PassThroughFlags", [
        (name, hints[name], dataclasses.field(default=None, metadata={
            **original[name].metadata,
            "help": f"{original[name].metadata.get('help', '')} (TrainingArguments; default: "
                    f"{_default_of(original[name])!r})",
        }))
        for name in PASS_THROUGH
    ])
    flags._argument_group_name = "TrainingArguments fields passed through"
    flags._valid = {"eval_steps": positive_float, "per_device_eval_batch_size": positive_int}
    return flags


def _default_of(field):
    value = field.default if field.default is not dataclasses.MISSING else None
    return getattr(value, "value", value)


def config_from_args(args):
    """``TrainConfig`` from the parsed flags: every field of the same name, and the TrainingArguments fields
    given by flag or in ``--training-args``."""
    from ..train.config import PASS_THROUGH, TrainConfig
    from ..train.options import field_values

    _move_renamed_flags(args)
    training_arguments = _read_training_args(args.training_args) if args.training_args else {}
    training_arguments.update({name: getattr(args, name) for name in PASS_THROUGH if getattr(args, name) is not None})
    return TrainConfig(**{**field_values(args, TrainConfig), "training_arguments": training_arguments})


def _read_training_args(path: str) -> dict:
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"--training-args file not found: {path}")
    text = file.read_text(encoding="utf-8")
    if file.suffix == ".json":
        values = json.loads(text)
    elif file.suffix in (".yaml", ".yml"):
        import yaml

        values = yaml.safe_load(text) or {}
    else:
        raise ValueError(f"--training-args must be a .yaml, .yml or .json file, got {path}")
    if not isinstance(values, dict):
        raise ValueError(f"--training-args {path} must hold a mapping of TrainingArguments fields, "
                         f"got {type(values).__name__}")
    return values


def run(args) -> int:
    from ..checkpoints.load import load_model, recorded_base_model
    from ..train.trainer import train

    config = config_from_args(args)  # bad settings fail before any model loads
    if args.teacher and not args.distill:
        raise ValueError("--teacher is only used with --distill")
    model, tokenizer = load_model(args.model)
    teacher = _load_teacher(args.teacher or recorded_base_model(model, "--distill")) if args.distill else None
    result = train(model, tokenizer, args.data, config, teacher=teacher)
    if int(os.environ.get("RANK", "0")) == 0:
        from ..data.chat import DataStats

        stats = DataStats(**result.data)
        loss = result.metrics.get("last_logged_loss")
        print(f"data: {stats.describe()}")
        print(f"trained {result.global_step} steps on {result.world_size} process(es), "
              f"{result.trainable_parameters:,} trainable parameters"
              + (f", last logged loss {loss:.4f}" if loss is not None else ""))
        saved = "adapter" if config.adapter_rank else "model"
        print(f"{saved} and tokenizer saved to {result.output_dir}; metrics in {result.metrics_file}")
        if result.merged_dir:
            print(f"model with the adapter merged into it saved to {result.merged_dir}")
    return 0


def _load_teacher(source: str):
    from ..checkpoints.load import load_model

    return load_model(source)[0]  # float32 weights, GGUF files dequantized, like the student
