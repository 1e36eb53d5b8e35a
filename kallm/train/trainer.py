"""``kallm.train.train``: fine-tune (or heal) a model on chat data with transformers' Trainer.

Runs as is on one device and under ``accelerate launch`` / ``torchrun`` on several (DDP,
or FSDP through an accelerate config): transformers' Trainer reads the launcher's
environment.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
import transformers
from peft import PeftModel, get_peft_model
from transformers import EarlyStoppingCallback, TrainerCallback, TrainingArguments
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from ..checkpoints.save import (
    check_finite,
    check_output_folder,
    replacing_checkpoint,
    resume_checkpoint,
    save_checkpoint,
)
from ..core.layers import count_parameters, is_kan_linear
from ..data.chat import TRUNCATION, ChatCollator, prepare_chat_dataset
from ..finetune.kan_adapter import MERGE_REFUSAL, kan_adapter_config
from ..finetune.lora import LORA_TARGETS, lora_config
from ..inference import eval_mode, model_device
from ..surgery.trainable import POLICIES, set_trainable
from ..values import Number, fraction, non_negative_float, path_or_hub_id, positive_float, positive_int
from ..values import seed as seed_range
from .chat_trainer import ChatTrainer
from .distill import DistillationTrainer
from .options import check_values, option

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
RESULT_FILE = "train_result.json"
#: where ``merge=True`` saves the model with the trained adapter merged into it, inside output_dir
MERGED_FOLDER = "merged"
SCHEDULERS = ("cosine", "linear", "constant", "constant_with_warmup")
#: the adapters ``lora_rank`` trains: PEFT's LoRA, or kallm's KAN adapter
ADAPTER_TYPES = ("lora", "kan")


@dataclass
class TrainConfig:
    """Settings of a training run. ``kallm train`` reads its flags from these fields (through transformers'
    ``HfArgumentParser``): ``--max-steps`` (or ``--max_steps``) for ``max_steps``, plus the short names given as
    aliases. Any other ``TrainingArguments`` field goes in ``training_arguments``."""

    output_dir: str = option("kallm-train", "folder for checkpoints, metrics.jsonl and the final model",
                             aliases=["--out"])
    trainable: str | None = option(None, "which parameters train (a kallm.set_trainable policy); default: "
                                         "tail+embeddings, or with --lora the adapter alone (a policy then names "
                                         "the model weights that train besides it)", choices=POLICIES)
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
    lora_rank: int | None = option(None, "train a PEFT adapter of this rank (LoRA, or see --adapter) instead of the "
                                         "model's weights; --out receives the adapter (see kallm.lora_config)", positive_int,
                                   aliases=["--lora"], metavar="RANK")
    adapter: str = option("lora", "with --lora: the adapter type, LoRA's low-rank update or a KAN adapter (a small "
                                  "KAN between a down- and an up-projection; kallm.kan_adapter_config); a KAN "
                                  "adapter cannot be merged", choices=ADAPTER_TYPES)
    lora_alpha: float = option(16.0, "adapter scaling numerator: updates are scaled by alpha / rank", positive_float)
    lora_dropout: float = option(0.0, "dropout on the adapter's input", Number(float, 0, 1, high_open=True))
    lora_targets: str | None = option(None, "layers that take the adapter: KAN layers, attention projections, "
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
            (self.lora_targets is None or self.lora_targets in LORA_TARGETS,
             f"lora_targets must be one of {', '.join(LORA_TARGETS)}, got {self.lora_targets!r}"),
            (self.adapter in ADAPTER_TYPES, f"adapter must be one of {', '.join(ADAPTER_TYPES)}, got {self.adapter!r}"),
            (self.adapter == "lora" or self.lora_rank is not None, f"adapter={self.adapter!r} needs lora_rank, the "
                                                                   f"adapter's rank"),
            (not self.merge or self.lora_rank is not None, "merge needs an adapter to merge: set lora_rank"),
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
                (self.lora_rank is None, "degree_stages changes the KAN layers' shapes, which a LoRA adapter on them "
                                         "cannot follow; train without lora_rank"),
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


class FiniteCheckpointsCallback(TrainerCallback):
    """Stops the run before the Trainer saves a checkpoint of weights holding NaN or infinity, so that the latest
    checkpoint stays the last good one (kallm's own saves check through ``replacing_checkpoint``)."""

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if control.should_save:  # set by the Trainer's flow callback, which runs first
            check_finite(model, f"save {PREFIX_CHECKPOINT_DIR}-{state.global_step}")


class MetricsFileCallback(TrainerCallback):
    """Appends every log event (loss, learning rate, ...) as one JSON line to a file.

    On resume, lines logged after the resumed checkpoint's step are dropped first, so the
    file reads like one uninterrupted run.
    """

    def __init__(self, path: str | os.PathLike, resume_step: int = 0):
        self.path = Path(path)
        self.resume_step = resume_step

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        kept = []
        if self.resume_step > 0 and self.path.is_file():
            for line in self.path.read_text(encoding="utf-8").splitlines():
                if line.strip() and json.loads(line).get("step", 0) <= self.resume_step:
                    kept.append(line + "\n")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text("".join(kept), encoding="utf-8")

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        record = {"step": state.global_step, "epoch": state.epoch, **logs}
        with self.path.open("a", encoding="utf-8") as file:
            file.write(json.dumps(record) + "\n")


def training_arguments(config: TrainConfig, evaluates: bool = False) -> TrainingArguments:
    """transformers' ``TrainingArguments`` for ``config``: the fields kallm derives from its settings
    (``DERIVED_ARGUMENTS``), kallm's defaults for a few others, then ``config.training_arguments`` as given.
    ``evaluates``: there is evaluation data (evaluated every ``save_steps`` unless said otherwise)."""
    derived = dict(
        output_dir=config.output_dir,
        max_steps=config.max_steps,
        num_train_epochs=config.epochs,
        learning_rate=config.learning_rate,
        lr_scheduler_type=config.lr_scheduler,
        warmup_steps=config.warmup,
        weight_decay=config.weight_decay,
        max_grad_norm=config.max_grad_norm,
        per_device_train_batch_size=config.batch_size,
        gradient_accumulation_steps=config.grad_accum,
        train_sampling_strategy="group_by_length" if config.group_by_length and not config.packing else "random",
        bf16=config.bf16,
        fp16=config.fp16,
        activation_checkpointing=config.gradient_checkpointing,
        save_steps=config.save_steps,
        save_total_limit=config.save_total_limit,
        logging_steps=config.logging_steps,
        seed=config.seed,
        data_seed=config.seed,
        disable_tqdm=not config.progress_bar,
    )
    defaults = dict(
        length_column_name="length",
        # Said explicitly, CPU-only machines get gloo data parallelism under torchrun and bf16 autocast.
        use_cpu=not _accelerator_available(),
        save_strategy="steps",
        remove_unused_columns=False,
        ddp_find_unused_parameters=False,  # every trainable parameter takes part in the forward pass
        dataloader_pin_memory=torch.cuda.is_available(),
        report_to="none",  # logging integrations only when asked for (report_to="tensorboard", "wandb", ...)
    )
    if evaluates:
        defaults.update(eval_strategy="steps", eval_steps=config.save_steps, prediction_loss_only=True,
                        per_device_eval_batch_size=config.batch_size)
    if config.early_stopping_patience is not None:
        defaults.update(load_best_model_at_end=True, metric_for_best_model="eval_loss", greater_is_better=False)
    return TrainingArguments(**derived, **{**defaults, **config.training_arguments})


def train(model, tokenizer, data, config: TrainConfig | None = None, teacher=None,
          callbacks: list[TrainerCallback] | None = None, schedule: tuple[int, int] | None = None) -> TrainResult:
    """Train ``model`` on the chat dataset ``data``; returns a ``TrainResult``.

    ``data``: a local JSONL/JSON/parquet file or folder, a hub dataset id, a
    ``datasets.Dataset`` or a list of rows, each with a ``messages`` list (see
    ``kallm.data.chat``). Only assistant tokens are targets. Trainable parameters follow
    ``kallm.set_trainable(model, config.trainable)``. With ``teacher`` (usually the original,
    un-retrofitted model), the loss mixes in a KL divergence to the teacher's next-token
    distribution (``config.distill_alpha``, ``config.distill_temperature``).

    With ``config.lora_rank``, ``model`` is wrapped in place with a PEFT LoRA adapter
    (``kallm.lora_config(model, config.lora_targets, ...)``), or with ``config.adapter="kan"`` a KAN adapter
    (``kallm.kan_adapter_config``), and only the adapter trains, plus the model
    weights that ``config.trainable`` names if set; a ``PeftModel`` passed in trains the same way. The
    adapter is what ``output_dir`` then receives (``kallm.load_adapter`` or ``AutoPeftModelForCausalLM``
    reload it); ``config.merge`` also merges it into the model and saves that to ``output_dir/merged``.

    ``schedule``: ``(steps before this run, steps of the whole schedule)`` when this run is one part of a longer
    one (a degree curriculum's stage): the learning rate continues that schedule instead of starting its own.

    Checkpoints go to ``output_dir/checkpoint-N`` every ``save_steps``; the final model and
    the tokenizer to ``output_dir`` (``kallm.load_model(output_dir)`` reloads them), the log
    to ``output_dir/metrics.jsonl`` and a summary to ``output_dir/train_result.json``.
    """
    config = config or TrainConfig()
    check_output_folder(config.output_dir, (model, teacher))
    if config.degree_stages:
        from .curriculum import train_in_degree_stages

        return train_in_degree_stages(model, tokenizer, data, config, teacher=teacher, callbacks=callbacks)
    # transformers' Trainer writes a checkpoint's trainer_state.json last
    resume = resume_checkpoint(config.resume, config.output_dir, f"{PREFIX_CHECKPOINT_DIR}-", TRAINER_STATE_NAME)
    if teacher is not None:
        _check_teacher(model, teacher)
    if tokenizer.pad_token_id is None:
        raise ValueError("the tokenizer has no pad token; set tokenizer.pad_token (e.g. to its eos token)")
    evaluates = bool(config.eval_data or config.eval_fraction)
    args = training_arguments(config, evaluates)  # bad TrainingArguments fail before the model changes
    model = _with_adapter(model, config)
    policy = config.trainable or (None if isinstance(model, PeftModel) else "tail+embeddings")
    trainable = set_trainable(model, policy) if policy else count_parameters(model, trainable_only=True)
    if config.packing:
        check_packing_support(model)

    with args.main_process_first(desc="preparing the training data"):
        dataset, stats = prepare_chat_dataset(
            data, tokenizer, max_length=config.max_length, truncation=config.truncation, packing=config.packing,
            split=config.split, limit=config.limit, num_proc=config.num_proc,
        )
        eval_dataset = None
        if config.eval_data:
            eval_dataset, _ = prepare_chat_dataset(config.eval_data, tokenizer, max_length=config.max_length,
                                                   split=config.eval_split, num_proc=config.num_proc)
        elif config.eval_fraction:
            dataset, eval_dataset = _hold_out(dataset, config.eval_fraction, config.seed)
    metrics_file = Path(config.output_dir) / METRICS_FILE
    trainer_class, extra = ChatTrainer, {}
    if teacher is not None:
        trainer_class = DistillationTrainer
        extra = dict(teacher=teacher, alpha=config.distill_alpha, temperature=config.distill_temperature)
    callbacks = [MetricsFileCallback(metrics_file, _checkpoint_step(resume)), FiniteCheckpointsCallback(),
                 *(callbacks or [])]
    if config.early_stopping_patience is not None:
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=config.early_stopping_patience))
    trainer = trainer_class(
        model=model, args=args, train_dataset=dataset, eval_dataset=eval_dataset,
        data_collator=ChatCollator(tokenizer.pad_token_id), processing_class=tokenizer, callbacks=callbacks,
        data_source=data, data_split=config.split, eval_source=config.eval_data or (data if evaluates else None),
        eval_split=config.eval_split if config.eval_data else config.split, schedule=schedule, **extra,
    )
    if trainer.is_world_process_zero():
        logger.info("training %s trainable parameters (%s) on %s", f"{trainable:,}", policy or "the adapter",
                    stats.describe())
    use_cache, model.config.use_cache = model.config.use_cache, False  # a KV cache would hide packed sequences
    try:
        output = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    finally:
        model.config.use_cache = use_cache
        _release_from_accelerate(model)
    if trainer.is_world_process_zero():
        with replacing_checkpoint(config.output_dir, model) as staging:
            trainer.save_model(str(staging))
            trainer.write_model_card(staging)
    else:
        trainer.save_model(config.output_dir)  # takes part in gathering sharded weights; writes nothing
    merged_dir = None
    if config.merge:
        merged_dir = str(Path(config.output_dir) / MERGED_FOLDER)
        merged = model.merge_and_unload()
        if trainer.is_world_process_zero():
            save_checkpoint(merged, tokenizer, merged_dir)
    if args.push_to_hub:
        trainer.push_to_hub()  # the final model, with kallm's card (Trainer pushed checkpoints as it saved them)

    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    metrics = dict(output.metrics)
    if losses:
        metrics["last_logged_loss"] = losses[-1]
    result = TrainResult(
        output_dir=config.output_dir, metrics=metrics, data=stats.as_dict(), trainable_parameters=trainable,
        global_step=trainer.state.global_step, world_size=args.world_size, metrics_file=str(metrics_file),
        log_history=list(trainer.state.log_history), merged_dir=merged_dir,
    )
    if trainer.is_world_process_zero():
        summary = {**asdict(result), "config": {**asdict(config), "trainable": policy}}
        summary.pop("log_history")
        (Path(config.output_dir) / RESULT_FILE).write_text(json.dumps(summary, indent=2), encoding="utf-8")
    return result


def _hold_out(dataset, fraction: float, seed: int):
    """``(training rows, held-out rows)``: a seeded random ``fraction`` of ``dataset`` held out, at least one row
    each."""
    if len(dataset) < 2:
        raise ValueError(f"eval_fraction needs at least 2 conversations to split, the data has {len(dataset)}")
    held_out = min(max(1, round(len(dataset) * fraction)), len(dataset) - 1)
    split = dataset.train_test_split(test_size=held_out, seed=seed)
    return split["train"], split["test"]


def _with_adapter(model, config: TrainConfig):
    """``model`` wrapped with the adapter (LoRA or KAN) ``config`` asks for (or as it is without ``lora_rank``);
    every check runs before the model changes."""
    if config.lora_rank is None:
        return model
    if isinstance(model, PeftModel):
        raise ValueError("the model already carries PEFT adapters; train it without lora_rank (its adapters "
                         "train), or pass the model without them")
    targets = config.lora_targets or ("all" if any(map(is_kan_linear, model.modules())) else "attention")
    if config.adapter == "kan":
        adapter = kan_adapter_config(model, targets, r=config.lora_rank, alpha=config.lora_alpha,
                                     dropout=config.lora_dropout)
    else:
        adapter = lora_config(model, targets, r=config.lora_rank, lora_alpha=config.lora_alpha,
                              lora_dropout=config.lora_dropout)
    return get_peft_model(model, adapter)


def _release_from_accelerate(model) -> None:
    """Hand ``model`` back as its checkpoint loads. With bf16/fp16, accelerate replaces its ``forward`` by an
    autocast wrapper (keeping the original as ``_original_forward``) and marks it prepared, so that a later
    training run would neither wrap nor distribute it again. (accelerate's own unwrapping follows
    ``__wrapped__`` past transformers' decorators of ``forward``, so it is not used.)"""
    original = model.__dict__.pop("_original_forward", None)
    if original is not None:
        if getattr(original, "__func__", None) is type(model).forward:
            del model.forward  # the class's method again
        else:
            model.forward = original  # a wrapper set before training (e.g. a device-map hook) stays
    model.__dict__.pop("_is_accelerate_prepared", None)


def _accelerator_available() -> bool:
    accelerator = getattr(torch, "accelerator", None)  # torch >= 2.6: CUDA, XPU, MPS, ...
    return accelerator.is_available() if accelerator is not None else torch.cuda.is_available()


def _checkpoint_step(checkpoint: str | None) -> int:
    if checkpoint is None:
        return 0
    state = Path(checkpoint) / "trainer_state.json"
    return json.loads(state.read_text(encoding="utf-8"))["global_step"] if state.is_file() else 0


def _check_teacher(model, teacher):
    student_vocab = model.get_output_embeddings().weight.shape[0]
    teacher_vocab = teacher.get_output_embeddings().weight.shape[0]
    if student_vocab != teacher_vocab:
        raise ValueError(f"the teacher's vocabulary ({teacher_vocab} tokens) differs from the student's "
                         f"({student_vocab}); distillation needs the same tokenizer")
    if teacher is model:
        raise ValueError("the teacher must be a separate model (e.g. the original, un-retrofitted one)")


@torch.no_grad()
def check_packing_support(model, atol: float = 1e-4):
    """Raise ``ValueError`` unless ``model`` keeps packed sequences apart.

    Packing relies on the model building attention masks from restarting ``position_ids``;
    families that ignore them would let conversations attend to each other. Checked with
    two short random sequences, packed and alone.
    """
    device = model_device(model)
    vocab = model.get_input_embeddings().weight.shape[0]
    generator = torch.Generator().manual_seed(0)
    first = torch.randint(3, vocab, (1, 5), generator=generator).to(device)
    second = torch.randint(3, vocab, (1, 4), generator=generator).to(device)
    positions = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3]], device=device)
    with eval_mode(model):
        packed = model(input_ids=torch.cat([first, second], dim=1), position_ids=positions, use_cache=False).logits
        alone = model(input_ids=second, use_cache=False).logits
    if not torch.allclose(packed[:, 5:].float(), alone.float(), atol=atol, rtol=1e-3):
        kind = getattr(model.config, "model_type", type(model).__name__)
        raise ValueError(f"{kind} models do not separate packed sequences by position_ids; train without "
                         f"packing (group_by_length reduces padding instead)")
