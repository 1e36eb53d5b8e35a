"""``kallm.train.train``: fine-tune (or heal) a model on chat data with transformers' Trainer.

Runs as is on one device and under ``accelerate launch`` / ``torchrun`` on several (DDP,
or FSDP through an accelerate config): transformers' Trainer reads the launcher's
environment.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict
from pathlib import Path

import torch
from peft import PeftModel, get_peft_model
from transformers import EarlyStoppingCallback, TrainerCallback, TrainingArguments
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .._imports import moved_name
from ..checkpoints.save import (
    check_finite,
    check_output_folder,
    replacing_checkpoint,
    resume_checkpoint,
    save_checkpoint,
)
from ..core.layers import count_parameters, is_kan_linear
from ..data.chat import ChatCollator, prepare_chat_dataset
from ..finetune.kan_adapter import kan_adapter_config
from ..finetune.lora import lora_config
from ..inference import eval_mode, model_device
from ..surgery.trainable import set_trainable
from .chat_trainer import ChatTrainer
from .config import MERGED_FOLDER, RESULT_FILE, TrainConfig, TrainResult
from .curriculum import train_in_degree_stages
from .distill import DistillationTrainer
from .runs import METRICS_FILE, accelerator_available, append_metrics, check_teacher, write_metrics

logger = logging.getLogger(__name__)


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
            records = map(json.loads, filter(str.strip, self.path.read_text(encoding="utf-8").splitlines()))
            kept = [record for record in records if record.get("step", 0) <= self.resume_step]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_metrics(self.path, kept)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        append_metrics(self.path, {"step": state.global_step, "epoch": state.epoch, **logs})


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
        use_cpu=not accelerator_available(),
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

    With ``config.adapter_rank``, ``model`` is wrapped in place with a PEFT LoRA adapter
    (``kallm.lora_config(model, config.adapter_targets, ...)``), or with ``config.adapter="kan"`` a KAN adapter
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
    if config.degree_stages:  # each stage is a run of this function
        return train_in_degree_stages(model, tokenizer, data, config, train, teacher=teacher, callbacks=callbacks)
    # transformers' Trainer writes a checkpoint's trainer_state.json last
    resume = resume_checkpoint(config.resume, config.output_dir, f"{PREFIX_CHECKPOINT_DIR}-", TRAINER_STATE_NAME)
    if teacher is not None:
        check_teacher(model, teacher)
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
    """``model`` wrapped with the adapter (LoRA or KAN) ``config`` asks for (or as it is without ``adapter_rank``);
    every check runs before the model changes."""
    if config.adapter_rank is None:
        return model
    if isinstance(model, PeftModel):
        raise ValueError("the model already carries PEFT adapters; train it without adapter_rank (its adapters "
                         "train), or pass the model without them")
    targets = config.adapter_targets or ("all" if any(map(is_kan_linear, model.modules())) else "attention")
    if config.adapter == "kan":
        adapter = kan_adapter_config(model, targets, r=config.adapter_rank, alpha=config.adapter_alpha,
                                     dropout=config.adapter_dropout)
    else:
        adapter = lora_config(model, targets, r=config.adapter_rank, lora_alpha=config.adapter_alpha,
                              lora_dropout=config.adapter_dropout)
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


def _checkpoint_step(checkpoint: str | None) -> int:
    if checkpoint is None:
        return 0
    state = Path(checkpoint) / "trainer_state.json"
    return json.loads(state.read_text(encoding="utf-8"))["global_step"] if state.is_file() else 0


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


def __getattr__(name: str):
    return moved_name(__name__, name)
