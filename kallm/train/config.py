"""The settings of ``kallm.train.train`` (``TrainConfig``, whose fields are ``kallm train``'s flags), how they relate
to transformers' ``TrainingArguments``, and what a run returns (``TrainResult``)."""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import transformers
from transformers import TrainingArguments

from ..data.chat import TRUNCATION
from ..finetune.kan_adapter import MERGE_REFUSAL
from ..finetune.lora import LORA_TARGETS
from ..surgery.trainable import POLICIES
from ..values import Number, fraction, non_negative_float, path_or_hub_id, positive_float, positive_int
from ..values import seed as seed_range
from .options import check_values, option, renamed_fields

RESULT_FILE = "train_result.json"
#: where ``merge=True`` saves the model with the trained adapter merged into it, inside output_dir
MERGED_FOLDER = "merged"
SCHEDULERS = ("cosine", "linear", "constant", "constant_with_warmup")
#: the adapters ``adapter_rank`` trains: PEFT's LoRA, or kallm's KAN adapter
ADAPTER_TYPES = ("lora", "kan")
#: the adapter fields were named after LoRA, though they set the KAN adapter too: old name -> name now
RENAMED_FIELDS = {"lora_rank": "adapter_rank", "lora_alpha": "adapter_alpha", "lora_dropout": "adapter_dropout",
                  "lora_targets": "adapter_targets"}


@renamed_fields(RENAMED_FIELDS)
@dataclass
class TrainConfig:
    """Settings of a training run. ``kallm train`` reads its flags from these fields (through transformers'
    ``HfArgumentParser``): ``--max-steps`` (or ``--max_steps``) for ``max_steps``, plus the short names given as
    aliases. Any other ``TrainingArguments`` field goes in ``training_arguments``."""

    output_dir: str = option("kallm-train", "folder for checkpoints, metrics.jsonl and the final model",
                             aliases=["--out"])
    trainable: str | None = option(None, "which parameters train (a kallm.set_trainable policy); default: "
                                         "tail+embeddings, or with --adapter-rank the adapter alone (a policy "
                                         "then names the model weights that train besides it)", choices=POLICIES)
    max_steps: int = option(-1, "optimizer steps; -1 trains for --epochs over the data", Number(int, 1, also=(-1,)))
    epochs: float = option(1.0, "passes over the data when --max-steps is -1", positive_float)
    learning_rate: float = option(1e-4, "peak learning rate", positive_float, aliases=["--lr"])
    lr_scheduler: str = option("cosine", "learning-rate schedule after warmup", aliases=["--scheduler"],
                               choices=SCHEDULERS)
    warmup: float = option(0.03, "warmup steps, or a fraction of all steps when below 1", non_negative_float)
    weight_decay: float = option(0.0, "AdamW weight decay", non_negative_float)
    max_grad_norm: float = option(1.0, "gradient clipping norm (0: none)", non_negative_float)
    batch_size: int = option(8, "sequences per device and step; the effective batch is batch size x gradient "
                                "accumulation x processes", positive_int)
    grad_accum: int = option(1, "gradient accumulation steps", positive_int)
    max_length: int = option(1024, "tokens per sequence", Number(int, 2))
    truncation: str = option("truncate", "what happens to conversations longer than --max-length: truncate "
                                         "them, or skip them", choices=TRUNCATION)
    packing: bool = option(False, "pack several conversations into each sequence of --max-length tokens")
    group_by_length: bool = option(False, "batch conversations of similar length together (less padding; no "
                                          "effect with --packing)")
    split: str = option("train", "split of a hub dataset")
    limit: int | None = option(None, "train on the first N conversations only", positive_int)
    eval_data: str | None = option(None, "held-out chat data scored during training (eval_loss): a file, folder "
                                         "or hub dataset id like --data", path_or_hub_id)
    eval_split: str = option("test", "split of a hub dataset given as --eval-data")
    eval_fraction: float = option(0.0, "share of the training conversations held out for evaluation instead of "
                                       "--eval-data (0: none)", Number(float, 0, 1, high_open=True))
    early_stopping_patience: int | None = option(None, "stop after this many evaluations without a lower "
                                                       "eval_loss, and keep the best checkpoint (needs "
                                                       "evaluation data)", positive_int)
    distill_alpha: float = option(0.5, "with a teacher: weight of the KL term; 1 - alpha weighs cross-entropy",
                                  fraction)
    distill_temperature: float = option(2.0, "with a teacher: softmax temperature of both distributions",
                                        positive_float)
    bf16: bool = option(False, "bfloat16 mixed precision")
    fp16: bool = option(False, "float16 mixed precision (GPU)")
    gradient_checkpointing: bool = option(False, "recompute activations in backward to save memory")
    save_steps: int = option(500, "steps between checkpoints (and evaluations, unless --eval_steps says)", positive_int)
    save_total_limit: int | None = option(2, "checkpoints kept, oldest deleted first (None keeps all)", positive_int)
    logging_steps: int = option(10, "steps between log lines in metrics.jsonl", positive_int)
    seed: int = option(42, "random seed of initialisation, data order and dropout", seed_range)
    #: resume from this checkpoint folder, or True for the latest one in output_dir (``--resume [CHECKPOINT]``)
    resume: str | bool | None = None
    num_proc: int | None = option(None, "processes for tokenization (datasets.map)", positive_int)
    #: a progress bar (``--quiet`` turns it off)
    progress_bar: bool = True
    #: other ``TrainingArguments`` fields, passed through: report_to, eval_strategy, optim, torch_compile,
    #: deepspeed, fsdp, push_to_hub, ... (``kallm train --training-args FILE`` or the flags of ``PASS_THROUGH``)
    training_arguments: dict = field(default_factory=dict)
    adapter_rank: int | None = option(None, "train a PEFT adapter of this rank (LoRA, or see --adapter) instead of "
                                            "the model's weights; --out receives the adapter (see kallm.lora_config)",
                                      positive_int, metavar="RANK")
    adapter: str = option("lora", "with --adapter-rank: the adapter type, LoRA's low-rank update or a KAN adapter (a "
                                  "small KAN between a down- and an up-projection; kallm.kan_adapter_config); a KAN "
                                  "adapter cannot be merged", choices=ADAPTER_TYPES)
    adapter_alpha: float = option(16.0, "adapter scaling numerator: updates are scaled by alpha / rank",
                                  positive_float)
    adapter_dropout: float = option(0.0, "dropout on the adapter's input", Number(float, 0, 1, high_open=True))
    adapter_targets: str | None = option(None, "layers that take the adapter: KAN layers, attention projections, "
                                               "MLP projections (mlp) or KAN layers and attention (all) "
                                               "(kallm.lora_targets); default: all on a model with KAN layers, "
                                               "attention on any other", choices=LORA_TARGETS)
    merge: bool = option(False, "with an adapter, also save the model with the adapter merged into it to "
                                "OUT/merged")
    degree_stages: list[int] | None = option(None, "train in stages of rising KAN degree (e.g. 1 2 3): max_steps "
                                                   "split evenly, the KAN layers converted exactly between stages "
                                                   "(kallm.train.curriculum)", positive_int, metavar="DEGREE")

    def __post_init__(self):
        check_values(self)  # every number's range, as declared on its field
        checks = [
            (self.trainable is None or self.trainable in POLICIES,
             f"trainable must be one of {', '.join(POLICIES)}, got {self.trainable!r}"),
            (self.truncation in TRUNCATION, f"truncation must be one of {', '.join(TRUNCATION)}, "
                                            f"got {self.truncation!r}"),
            (self.lr_scheduler in SCHEDULERS, f"lr_scheduler must be one of {', '.join(SCHEDULERS)}, "
                                              f"got {self.lr_scheduler!r}"),
            (not (self.bf16 and self.fp16), "choose at most one of bf16 and fp16"),
            (not (self.eval_data and self.eval_fraction), "give eval_data or eval_fraction, not both"),
            (self.early_stopping_patience is None or self.eval_data or self.eval_fraction,
             "early stopping compares evaluations: give eval_data or eval_fraction too"),
            (self.adapter_targets is None or self.adapter_targets in LORA_TARGETS,
             f"adapter_targets must be one of {', '.join(LORA_TARGETS)}, got {self.adapter_targets!r}"),
            (self.adapter in ADAPTER_TYPES, f"adapter must be one of {', '.join(ADAPTER_TYPES)}, got {self.adapter!r}"),
            (self.adapter == "lora" or self.adapter_rank is not None, f"adapter={self.adapter!r} needs adapter_rank, "
                                                                      f"the adapter's rank"),
            (not self.merge or self.adapter_rank is not None, "merge needs an adapter to merge: set adapter_rank"),
            (not (self.merge and self.adapter == "kan"), f"merge: {MERGE_REFUSAL}"),
        ]
        if self.degree_stages is not None:
            stages = self.degree_stages
            checks += [
                (isinstance(stages, (list, tuple)) and len(stages) >= 1
                 and all(isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in stages)
                 and list(stages) == sorted(set(stages)),
                 f"degree_stages must be increasing degrees >= 1, such as [1, 2, 3]; got {stages!r}"),
                (self.max_steps >= len(stages) if isinstance(stages, (list, tuple)) else True,
                 f"degree_stages needs max_steps (at least one step per stage; they are split evenly), got "
                 f"{self.max_steps}"),
                (self.resume in (None, False), "degree_stages cannot resume a run; start it again"),
                (self.adapter_rank is None, "degree_stages changes the KAN layers' shapes, which an adapter on them "
                                            "cannot follow; train without adapter_rank"),
            ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        check_training_arguments(self.training_arguments)


#: ``TrainingArguments`` fields that kallm derives from ``TrainConfig`` (field -> the setting to use instead)
DERIVED_ARGUMENTS = {
    "output_dir": "output_dir", "max_steps": "max_steps", "num_train_epochs": "epochs",
    "learning_rate": "learning_rate", "lr_scheduler_type": "lr_scheduler", "warmup_steps": "warmup",
    "weight_decay": "weight_decay", "max_grad_norm": "max_grad_norm", "per_device_train_batch_size": "batch_size",
    "gradient_accumulation_steps": "grad_accum", "train_sampling_strategy": "group_by_length", "bf16": "bf16",
    "fp16": "fp16", "activation_checkpointing": "gradient_checkpointing", "save_steps": "save_steps",
    "save_total_limit": "save_total_limit", "logging_steps": "logging_steps", "seed": "seed", "data_seed": "seed",
    "disable_tqdm": "progress_bar", "resume_from_checkpoint": "resume",
}
#: ``TrainingArguments`` fields ``kallm train`` offers as flags of their own (with transformers' help text);
#: every other one can be set in a ``--training-args`` file
PASS_THROUGH = ("report_to", "eval_strategy", "eval_steps", "per_device_eval_batch_size", "optim", "torch_compile",
                "deepspeed", "fsdp", "fsdp_config", "push_to_hub", "hub_model_id", "hub_private_repo")


def check_training_arguments(values: dict) -> None:
    """Refuse ``TrainingArguments`` fields that do not exist, or that a ``TrainConfig`` setting governs."""
    if not isinstance(values, dict):
        raise TypeError(f"training_arguments must be a dict of TrainingArguments fields, got {type(values).__name__}")
    known = {f.name for f in fields(TrainingArguments) if f.init}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"training_arguments: {', '.join(unknown)} {'is' if len(unknown) == 1 else 'are'} not "
                         f"TrainingArguments fields (transformers {transformers.__version__})")
    governed = sorted(set(values) & set(DERIVED_ARGUMENTS))
    if governed:
        raise ValueError("training_arguments: " + "; ".join(
            f"{name} is kallm's setting {DERIVED_ARGUMENTS[name]!r}, set it there" for name in governed))


@dataclass
class TrainResult:
    """What ``train`` returns (also written to ``output_dir/train_result.json``)."""

    output_dir: str
    #: transformers' final train metrics (train_loss, train_runtime, ...) and the last logged loss
    metrics: dict
    #: ``DataStats.as_dict()``: rows kept, skipped by reason, truncated, tokens
    data: dict
    trainable_parameters: int
    global_step: int
    world_size: int
    metrics_file: str
    log_history: list[dict] = field(default_factory=list)
    #: with ``merge=True``: the folder of the merged model (output_dir holds the adapter)
    merged_dir: str | None = None
    #: with ``degree_stages``: per stage its ``degree``, ``output_dir``, ``global_step`` and ``last_logged_loss``
    stages: list[dict] = field(default_factory=list)
