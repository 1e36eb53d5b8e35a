"""``kallm.heal``: bring a retrofitted model back to its original by distillation, cheaply.

Two stages share one budget (wall-clock minutes and/or end-to-end steps):

1. Block-local. The original model reads the healing text once; forward hooks record, for
   every retrofitted block, the input of its feedforward and the original MLP's output
   (teacher forcing: later blocks see the original's hidden states). Each new feedforward is
   trained with Adam on those pairs. No LM head, no attention, no backward through blocks.
2. End-to-end. KL(original || retrofit) on next-token distributions (plus optional
   cross-entropy). The blocks before the first retrofitted one are identical in both
   models, so they run once per batch, in the teacher: the student's prefix blocks are
   replaced, for the duration of its forward, by stand-ins that return the teacher's hidden
   state, and backward runs through the tail only.

A plain loop on accelerate (DDP under ``accelerate launch``/``torchrun``, bf16/fp16) rather
than transformers' Trainer: the budget is wall-clock time that must end every process at
the same step, the learning rate and the progressive blend follow the share of that budget
spent, and the local stage is no model forward at all. See docs/healing.md.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..checkpoints.save import check_output_folder, replacing_checkpoint, resume_checkpoint, save_checkpoint
from ..core.retrofit_config import read_retrofit_config, retrofitted_blocks
from ..surgery.calibration import default_calibration, original_feedforward, record_feedforwards
from ..surgery.checks import causal_lm_parts
from ..surgery.fit import outlier_rows
from ..surgery.trainable import POLICIES, set_trainable
from ..train.options import check_values, option
from ..values import Number, non_negative_float, non_negative_int, positive_float, positive_int
from ..values import seed as seed_range

logger = logging.getLogger("kallm")

METRICS_FILE = "metrics.jsonl"
REPORT_FILE = "heal_report.json"
CURVE_FILE = "heal_curve.png"
CHECKPOINT_PREFIX = "checkpoint-"
#: a heal checkpoint's state, written last: a checkpoint without it was cut off while saving
STATE_FILE = "heal_state.json"
#: rows of each block's recorded pairs kept apart to choose the best local weights
LOCAL_HELD_OUT = 0.1
#: with a time budget, recording stops after this share of the local stage's time (training gets the rest)
LOCAL_RECORDING_SHARE = 0.5
RECORDING_BATCH = 8
_TEXT_SUFFIXES = (".txt", ".text", ".raw", ".md")
_NO_LIMIT = 2**31 - 1


@dataclass
class HealConfig:
    """Settings of ``kallm.heal`` (``kallm heal`` flags map one to one)."""

    output_dir: str | None = option(None, "folder for metrics.jsonl, the curve, checkpoints and the healed model "
                                          "(None writes nothing)")
    minutes: float | None = option(None, "wall-clock budget of both stages (data preparation and callbacks not "
                                         "counted)", positive_float)
    max_steps: int | None = option(None, "end-to-end optimizer steps; with --minutes too, whichever ends first",
                                   positive_int)
    trainable: str = option("retrofitted", "which parameters train end to end (a kallm.set_trainable policy)",
                            choices=POLICIES)
    learning_rate: float = option(3e-4, "peak learning rate of the end-to-end stage", positive_float, aliases=["--lr"])
    warmup: float = option(0.05, "warmup as a share of the end-to-end stage; then cosine decay to zero at its end",
                           Number(float, 0, 1, high_open=True))
    batch_size: int = option(4, "sequences per step and process", positive_int)
    max_length: int = option(256, "tokens per sequence", Number(int, 2))
    temperature: float = option(1.0, "softmax temperature of both distributions in the KL", positive_float)
    ce_weight: float = option(0.0, "loss = KL * T^2 + ce_weight * next-token cross-entropy", non_negative_float)
    max_grad_norm: float = option(1.0, "gradient clipping norm (0: none)", non_negative_float)
    progressive: bool = option(False, "blend each retrofitted feedforward as (1 - a) * original + a * new, a "
                                      "rising 0 -> 1")
    progressive_fraction: float = option(0.5, "share of the end-to-end stage over which a reaches 1",
                                         Number(float, 0, 1, low_open=True))
    local_fraction: float = option(0.25, "share of --minutes the block-local stage may use (0 skips it)",
                                   Number(float, 0, 1, high_open=True))
    local_passes: float = option(4.0, "passes over the recorded pairs in the block-local stage (it stops at its "
                                      "time share too)", non_negative_float)
    local_tokens: int = option(32768, "tokens recorded for the block-local stage, from randomly drawn sequences "
                                      "(8 x hidden_size bytes per token and block)", positive_int)
    local_learning_rate: float = option(1e-3, "peak learning rate of the block-local stage", positive_float,
                                        aliases=["--local-lr"])
    local_batch_rows: int = option(512, "rows per step of the block-local stage", positive_int)
    generate_tokens: int = option(8192, "tokens of text the original model writes when no data is given",
                                   positive_int)
    split: str = option("train", "split of a hub dataset")
    limit: int | None = option(None, "use the first N rows of the data only", positive_int)
    cache_dir: str | None = option(None, "keep the prefix hidden states of each sequence here (safetensors) and "
                                         "reuse them in later epochs")
    bf16: bool = option(False, "bfloat16 autocast")
    fp16: bool = option(False, "float16 autocast with gradient scaling (GPU)")
    save_steps: int = option(0, "end-to-end steps between checkpoints (0: none)", non_negative_int)
    logging_steps: int = option(1, "end-to-end steps between points of the curve in metrics.jsonl", positive_int)
    #: resume from this checkpoint folder, or True for the latest one in output_dir (``--resume [CHECKPOINT]``)
    resume: str | bool | None = None
    seed: int = option(0, "seed of the data order and the block-local stage's held-out rows", seed_range)
    #: a progress bar (``--quiet`` turns it off)
    progress_bar: bool = True
    #: write the healed model and tokenizer to output_dir (metrics, report and curve are written regardless)
    save_model: bool = True

    def __post_init__(self):
        check_values(self)  # every number's range, as declared on its field
        checks = [
            (self.minutes is not None or self.max_steps is not None,
             "heal needs a budget: minutes= (wall clock) and/or max_steps= (end-to-end steps)"),
            (self.trainable in POLICIES, f"trainable must be one of {', '.join(POLICIES)}, got {self.trainable!r}"),
            (not (self.bf16 and self.fp16), "choose at most one of bf16 and fp16"),
            (not (self.save_steps or self.resume) or self.output_dir, "checkpoints and resume need output_dir"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)


@dataclass
class HealReport:
    """What ``heal`` returns (also written to ``output_dir/heal_report.json``)."""

    #: one point per logged step: stage, step, seconds, tokens, kl/ce (end to end) or error (local)
    curve: list[dict]
    #: per retrofitted block: held-out relative error of its feedforward before and after the local stage,
    #: over ordinary tokens (``before``/``after``) and over all tokens
    local: dict
    steps: int
    #: wall-clock seconds of both stages, callbacks excluded
    seconds: float
    local_seconds: float
    #: tokens the end-to-end stage trained on (all processes)
    tokens: int
    tokens_per_second: float
    #: sequences and tokens of healing data, and where they came from
    data: dict
    trainable_parameters: int
    shared_prefix: bool
    world_size: int
    output_dir: str | None = None
    config: dict = field(default_factory=dict)


def heal(model, teacher, tokenizer, data=None, config: HealConfig | None = None,
         callbacks: Sequence[Callable[[nn.Module, dict], None]] = (), **settings) -> HealReport:
    """Heal the retrofitted ``model`` in place towards ``teacher`` (the original model).

    ``data``: a list of texts, a list of chat rows (``{"messages": [...]}``), a path (``.txt``
    text, or chat data ``kallm train`` reads: ``.jsonl``/``.json``/``.parquet``, a folder, a
    hub dataset id), a ``datasets.Dataset`` with a ``text`` or ``messages`` column, or None:
    text the original model writes itself. Settings are ``HealConfig`` fields, as ``config``
    or keywords (``minutes=10``, ``max_steps=200``, ``trainable="tail"``, ...).

    ``callbacks`` are called as ``callback(model, point)`` after every local and end-to-end
    step; their time does not count against the budget. Bad input raises before anything
    changes. Returns a ``HealReport`` holding the healing curve.
    """
    if config is not None and settings:
        raise TypeError("pass settings either as config= or as keywords, not both")
    config = config or HealConfig(**settings)
    if config.output_dir:
        check_output_folder(config.output_dir, (model, teacher))
    resume = resume_checkpoint(config.resume, config.output_dir, CHECKPOINT_PREFIX, STATE_FILE)
    layout = _Layout(model, teacher, config.trainable, config.progressive)
    if tokenizer.pad_token_id is None and tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has neither a pad nor an eos token; set tokenizer.pad_token")
    sequences, data_stats = healing_sequences(data, tokenizer, config, teacher)
    return _Healer(model, teacher, tokenizer, layout, sequences, data_stats, config, list(callbacks), resume).run()


# ------------------------------------------------------------------------------------ checks and layout


class _Layout:
    """Where the prefix ends, what trains, and whether the prefix can be shared.

    Checks (changing nothing) that ``model`` is retrofitted and that ``teacher`` matches it
    outside the retrofitted feedforwards, except for parameters the policy trains.
    """

    def __init__(self, model, teacher, policy: str, progressive: bool = False):
        if teacher is model:
            raise ValueError("the teacher must be a separate model (the original, un-retrofitted one)")
        self.blocks = retrofitted_blocks(model)
        if not self.blocks:
            raise ValueError("the model has no retrofitted block; call kallm.retrofit first (heal brings a "
                             "retrofitted model back to its original)")
        if retrofitted_blocks(teacher):
            raise ValueError(f"the teacher is itself retrofitted (blocks {retrofitted_blocks(teacher)}); pass the "
                             f"original model the student was retrofitted from")
        student_type, self.adapter, self.student_blocks = causal_lm_parts(model, "heal")
        teacher_type, _, self.teacher_blocks = causal_lm_parts(teacher, "heal")
        if teacher_type != student_type:
            raise ValueError(f"the teacher is a {teacher_type} model but the student a {student_type} "
                             f"one; pass the original model the student was retrofitted from")
        if len(self.student_blocks) != len(self.teacher_blocks):
            raise ValueError(f"the teacher has {len(self.teacher_blocks)} blocks, the student "
                             f"{len(self.student_blocks)}; pass the original model the student was retrofitted from")
        if progressive and read_retrofit_config(model.config).form == "glu":
            raise ValueError("progressive=True blends each new feedforward in from the original, but form='glu' "
                             "starts exactly at the original already: heal it without progressive")
        self.first = min(self.blocks)
        self.trained = _trained_names(model, policy)
        self._check_teacher_matches(model, teacher)
        upstream = {id(tensor) for tensor in self.prefix_tensors(model, self.student_blocks).values()}
        self.shared_prefix = self.first > 0 and not any(
            id(p) in upstream for name, p in model.named_parameters() if name in self.trained)

    def feedforward_prefixes(self) -> tuple[str, ...]:
        names = (self.adapter.mlp_attribute, *self.adapter.bypassed_attributes)
        return tuple(f"{self.adapter.blocks_path}.{i}.{name}." for i in self.blocks for name in names)

    def _check_teacher_matches(self, model, teacher):
        replaced = self.feedforward_prefixes()
        student = {n: p for n, p in model.named_parameters() if not n.startswith(replaced)}
        original = {n: p for n, p in teacher.named_parameters() if not n.startswith(replaced)}
        problems = [f"{n} is missing in the teacher" for n in student if n not in original]
        problems += [f"{n} is missing in the student" for n in original if n not in student]
        for name, parameter in student.items():
            if name in original and name not in self.trained:
                other = original[name]
                if other.shape != parameter.shape or not torch.equal(other.detach().to(parameter.device),
                                                                     parameter.detach()):
                    problems.append(f"{name} differs")
        if problems:
            more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
            raise ValueError(f"the teacher does not match the student outside the retrofitted blocks: "
                             f"{'; '.join(problems[:3])}{more}. Pass the original model the student was "
                             f"retrofitted from (parameters the trainable policy trains may differ)")

    def prefix_tensors(self, model, blocks) -> dict[str, torch.Tensor]:
        """The parameters and buffers of ``model`` (whose decoder blocks are ``blocks``) that act before the first
        retrofitted block (embeddings, prefix blocks, rotary tables), by name."""
        downstream = [*blocks[self.first:], model.get_submodule(self.adapter.final_norm_path)]
        output = model.get_output_embeddings()
        if output is not None and output.weight is not model.get_input_embeddings().weight:
            downstream.append(output)
        excluded = {id(t) for module in downstream for t in (*module.parameters(), *module.buffers())}
        tensors = {**dict(model.named_parameters()), **dict(model.named_buffers())}
        return {name: t for name, t in tensors.items() if id(t) not in excluded}

    def prefix_digest(self, teacher) -> str:
        """A hash of the teacher's prefix weights, which compute the shared prefix states."""
        digest = hashlib.sha256()
        for name, tensor in sorted(self.prefix_tensors(teacher, self.teacher_blocks).items()):
            data = tensor.detach().cpu().contiguous().reshape(-1)
            digest.update(f"{name}|{data.dtype}|{tuple(tensor.shape)}|".encode())
            digest.update(data.view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()


def _trained_names(model, policy: str) -> set[str]:
    """Names of the parameters ``set_trainable(model, policy)`` would train; the flags are left as they were."""
    flags = {p: p.requires_grad for p in model.parameters()}
    try:
        set_trainable(model, policy)
        return {name for name, p in model.named_parameters() if p.requires_grad}
    finally:
        for parameter, flag in flags.items():
            parameter.requires_grad_(flag)


# ------------------------------------------------------------------------------------------------ data


def healing_sequences(data, tokenizer, config: HealConfig, teacher=None) -> tuple[list[torch.Tensor], dict]:
    """The healing data as 1-D token id tensors of at most ``config.max_length`` tokens, and what it holds.

    Plain text is joined (an eos token between texts) and cut into pieces of ``max_length``;
    chat rows are rendered with the chat template, and long conversations cut into such pieces.
    ``data=None`` generates ``config.generate_tokens`` tokens with ``teacher``.
    """
    from datasets import Dataset

    if data is None:
        if teacher is None:
            raise ValueError("data=None generates healing text with the teacher, which is missing")
        return _generated(teacher, tokenizer, config)
    if isinstance(data, (str, os.PathLike)):
        path = Path(data)
        if path.suffix.lower() in _TEXT_SUFFIXES:
            if not path.is_file():
                raise FileNotFoundError(f"text file not found: {data}")
            return _from_texts([path.read_text(encoding="utf-8")], tokenizer, config.max_length, "text file")
        return _from_chat(str(data), tokenizer, config)
    if isinstance(data, Dataset):
        if "messages" in data.column_names:
            return _from_chat(data, tokenizer, config)
        if "text" in data.column_names:
            rows = data if config.limit is None else data.select(range(min(config.limit, len(data))))
            return _from_texts(list(rows["text"]), tokenizer, config.max_length, "dataset text")
        raise ValueError(f"the dataset has neither a 'text' nor a 'messages' column (columns: "
                         f"{', '.join(data.column_names)})")
    if isinstance(data, (list, tuple)):
        if not data:
            raise ValueError("data is empty: give at least one text or chat row")
        if all(isinstance(row, str) for row in data):
            return _from_texts(list(data), tokenizer, config.max_length, "texts")
        if all(isinstance(row, dict) for row in data):
            return _from_chat(list(data), tokenizer, config)
        raise TypeError("a data list must hold only texts (str) or only chat rows ({'messages': [...]})")
    raise TypeError(f"data must be a list of texts or chat rows, a path, a hub dataset id or a datasets.Dataset, "
                    f"got {type(data).__name__}")


def _from_texts(texts: list[str], tokenizer, max_length: int, source: str):
    separator = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    ids: list[int] = []
    for text in texts:
        if text.strip():
            ids += tokenizer(text, add_special_tokens=False)["input_ids"] + separator
    sequences = [torch.tensor(ids[s:s + max_length]) for s in range(0, len(ids), max_length)]
    return _checked(sequences, source)


def _from_chat(source, tokenizer, config: HealConfig):
    from ..data.chat import prepare_chat_dataset

    # Healing matches every token, so a long conversation is cut into pieces rather than truncated.
    dataset, _ = prepare_chat_dataset(source, tokenizer, max_length=_NO_LIMIT, split=config.split, limit=config.limit)
    step = config.max_length
    return _checked([torch.tensor(ids[s:s + step]) for ids in dataset["input_ids"] for s in range(0, len(ids), step)],
                    "chat")


def _generated(teacher, tokenizer, config: HealConfig):
    """Conversations the original model writes itself (fit init's generator, new seeds per batch)."""
    sequences: list[torch.Tensor] = []
    bar = tqdm(total=config.generate_tokens, desc="kallm heal: generating text", unit="tok",
               disable=not config.progress_bar)
    while sum(s.numel() for s in sequences) < config.generate_tokens:
        batch = default_calibration(teacher, tokenizer, max_new_tokens=config.max_length // 2 or 1,
                                    seed=config.seed + len(sequences))
        sequences += [s[:config.max_length] for s in batch]
        bar.update(sum(s.numel() for s in batch))
    bar.close()
    return _checked(sequences, "generated")


def _checked(sequences: list[torch.Tensor], source: str):
    sequences = [s.long() for s in sequences if s.numel() >= 2]
    if not sequences:
        raise ValueError(f"the healing data ({source}) tokenizes to nothing: no sequence of 2 tokens or more")
    return sequences, {"source": source, "sequences": len(sequences), "tokens": sum(s.numel() for s in sequences)}


# ----------------------------------------------------------------------------------------- shared prefix


@contextlib.contextmanager
def prefix_replaced(blocks, count: int, hidden: Callable[[], torch.Tensor]):
    """Within the block, ``blocks[:count]`` do no work: each returns ``hidden()``.

    Decoder blocks (transformers 5) return their hidden states as a tensor, so the first
    real block receives ``hidden()`` whatever the family's loop passes around it.
    """
    saved = [block.__dict__.get("forward") for block in blocks[:count]]
    for block in blocks[:count]:
        block.forward = lambda *args, **kwargs: hidden()
    try:
        yield
    finally:
        for block, forward in zip(blocks[:count], saved):
            if forward is None:
                del block.forward
            else:
                block.forward = forward


def shared_prefix_logits(student, teacher, blocks_path: str, first: int, inputs: dict,
                         cached: torch.Tensor | None = None, student_forward: Callable | None = None,
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(student_logits, teacher_logits, prefix_hidden)`` with the blocks before ``first`` run once, in the
    teacher (or not at all when ``cached`` holds their output). Only the student's part has gradients.
    ``student_forward`` calls the student (default: ``student`` itself; a DDP wrapper of it, say)."""
    teacher_blocks, student_blocks = teacher.get_submodule(blocks_path), student.get_submodule(blocks_path)
    student_forward = student_forward or student
    captured = {"hidden": cached}
    replaced = prefix_replaced(teacher_blocks, first, lambda: cached) if cached is not None \
        else contextlib.nullcontext()

    def capture(module, args, output):
        captured["hidden"] = output

    hook = teacher_blocks[first - 1].register_forward_hook(capture)
    try:
        with torch.no_grad(), replaced:
            teacher_logits = teacher(**inputs, use_cache=False).logits
    finally:
        hook.remove()
    with prefix_replaced(student_blocks, first, lambda: captured["hidden"]):
        student_logits = student_forward(**inputs, use_cache=False).logits
    return student_logits, teacher_logits, captured["hidden"]


def distillation_loss(student_logits, teacher_logits, input_ids, attention_mask, temperature: float = 1.0,
                      ce_weight: float = 0.0) -> tuple[torch.Tensor, float, float]:
    """``(loss, kl, ce)``: per-token mean KL(teacher_T || student_T) * T^2 over real tokens, plus
    ``ce_weight`` times the next-token cross-entropy.

    The logits are (batch, length, vocabulary), so every pass over them costs as much as the LM head:
    each log-softmax is taken once, on the whole padded batch (no masked copies), and the
    cross-entropy, when it only is logged, reuses the student's log-probabilities at T = 1.
    """
    t = temperature
    student_logits, teacher_logits = student_logits.float(), teacher_logits.float()
    student_logp = F.log_softmax(student_logits / t if t != 1 else student_logits, -1)
    with torch.no_grad():
        teacher_logp = F.log_softmax(teacher_logits / t if t != 1 else teacher_logits, -1)
    real = attention_mask.float()
    per_token = (teacher_logp.exp() * (teacher_logp - student_logp)).sum(-1)
    kl = (per_token * real).sum() / real.sum().clamp_min(1) * (t * t)
    targets = real[:, 1:] * real[:, :-1]
    # Without ce_weight the cross-entropy is only logged: no graph, and at T = 1 no second log-softmax.
    with contextlib.nullcontext() if ce_weight else torch.no_grad():
        next_logp = student_logp[:, :-1] if t == 1 else F.log_softmax(student_logits[:, :-1], -1)
        nll = -next_logp.gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    ce = (nll * targets).sum() / targets.sum().clamp_min(1)
    loss = kl + ce_weight * ce if ce_weight else kl
    return loss, float(kl.detach()), float(ce.detach())


# ---------------------------------------------------------------------------------------------- healing


class _Clock:
    """Seconds since start, without the time spent in callbacks, plus what a resumed run had used."""

    def __init__(self, offset: float = 0.0):
        self.start, self.paused, self.offset = time.perf_counter(), 0.0, offset

    def __call__(self) -> float:
        return time.perf_counter() - self.start - self.paused + self.offset

    @contextlib.contextmanager
    def pause(self):
        began = time.perf_counter()
        try:
            yield
        finally:
            self.paused += time.perf_counter() - began


class _Healer:
    def __init__(self, model, teacher, tokenizer, layout: _Layout, sequences, data_stats, config: HealConfig,
                 callbacks, resume: Path | None):
        from accelerate import Accelerator

        self.model, self.teacher, self.tokenizer, self.layout = model, teacher, tokenizer, layout
        self.sequences, self.data_stats, self.config = sequences, data_stats, config
        self.callbacks, self.resume = callbacks, resume
        # Mixed precision by plain autocast: accelerate fixes its precision once per process, and heal may be
        # called again in the same process with other settings.
        self.accelerator = Accelerator(cpu=not _accelerator_available())
        self.autocast_dtype = torch.bfloat16 if config.bf16 else torch.float16 if config.fp16 else None
        self.device = self.accelerator.device
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.budget = config.minutes * 60 if config.minutes is not None else None
        self.curve: list[dict] = []
        self.local: dict = {}
        self.state = {"step": 0, "tokens": 0, "local_seconds": 0.0}
        self.out = Path(config.output_dir) if config.output_dir else None

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process

    # --------------------------------------------------------------------------------------- driver

    def run(self) -> HealReport:
        model, config = self.model, self.config
        model.to(self.device)
        self.teacher.to(self.device).eval().requires_grad_(False)
        was_training, use_cache = model.training, model.config.use_cache
        model.eval()  # no dropout: healing matches a function
        model.config.use_cache = False
        offset = self._load_state() if self.resume else 0.0
        self.clock = _Clock(offset)
        if self.out is not None and self.main:
            self.out.mkdir(parents=True, exist_ok=True)
            self._rewrite_metrics()
        try:
            if self.resume is None and config.local_passes > 0 and (self.budget is None or config.local_fraction):
                self._local_stage()
            trainable = set_trainable(model, config.trainable)
            self._end_to_end(trainable)
        finally:
            model.train(was_training)
            model.config.use_cache = use_cache
        return self._finish(trainable)

    # -------------------------------------------------------------------------------- block-local stage

    def _local_stage(self):
        config, layout = self.config, self.layout
        budget = self.budget * config.local_fraction if self.budget is not None else None
        rows, total = [], 0
        order = torch.randperm(len(self.sequences), generator=torch.Generator().manual_seed(config.seed))
        for sequence in (self.sequences[i] for i in order.tolist()):  # a sample of every source in the data
            if total >= config.local_tokens:
                break
            rows.append(sequence[:config.local_tokens - total])
            total += rows[-1].numel()
        records = self._record(rows, budget * LOCAL_RECORDING_SHARE if budget is not None else None)
        feedforwards = {i: original_feedforward(layout.student_blocks[i], layout.adapter) for i in layout.blocks}
        generator = torch.Generator().manual_seed(config.seed)
        splits, optimizers, best = {}, {}, {}
        for index, (x, y) in records.items():
            order = torch.randperm(len(x), generator=generator)
            held = max(1, int(len(x) * LOCAL_HELD_OUT))
            splits[index] = (x[order[held:]], y[order[held:]], x[order[:held]], y[order[:held]])
            optimizers[index] = torch.optim.Adam(feedforwards[index].parameters(), lr=config.local_learning_rate)
            error, error_all = _local_errors(feedforwards[index], *splits[index][2:])
            best[index] = (error, _copy_state(feedforwards[index]))
            self.local[index] = {"before": error, "before_all_tokens": error_all}
        del records
        train_rows = min(len(s[0]) for s in splits.values())
        steps_per_pass = max(1, math.ceil(train_rows / config.local_batch_rows))
        total_steps = max(1, math.ceil(config.local_passes * steps_per_pass))
        bar = tqdm(total=total_steps, desc="kallm heal: local stage", unit="step",
                   disable=not (config.progress_bar and self.main))
        step, started = 0, self.clock()
        for feedforward in feedforwards.values():
            feedforward.requires_grad_(True)
        while True:
            progress = step / total_steps
            if budget is not None:  # recording took its share of the budget too
                progress = max(progress, (self.clock() - started) / max(budget - started, 1e-9))
            if progress >= 1:
                break
            scale = 0.5 * (1 + math.cos(math.pi * progress))
            for index, feedforward in feedforwards.items():
                x, y = splits[index][:2]
                rows_at = torch.randint(len(x), (config.local_batch_rows,), generator=generator)
                loss = _relative_loss(feedforward, x[rows_at], y[rows_at])
                for group in optimizers[index].param_groups:
                    group["lr"] = config.local_learning_rate * scale
                optimizers[index].zero_grad(set_to_none=True)
                loss.backward()
                optimizers[index].step()
            step += 1
            bar.update(1)
            if step % steps_per_pass == 0:
                self._local_point(step, self._keep_best(feedforwards, splits, best), bar)
        if step % steps_per_pass:
            self._local_point(step, self._keep_best(feedforwards, splits, best), bar)
        bar.close()
        for index, feedforward in feedforwards.items():
            error, state = best[index]
            feedforward.load_state_dict(state)
            self.local[index].update(after=error, after_all_tokens=_local_errors(feedforward, *splits[index][2:])[1])
            if self.accelerator.num_processes > 1:  # every process trained alike; make it exact
                from accelerate.utils import broadcast

                for parameter in feedforward.parameters():
                    parameter.data.copy_(broadcast(parameter.data.clone()))
        self.state["local_seconds"] = self.clock()
        logger.info("kallm heal: local stage %.0f s, held-out error per block: %s", self.state["local_seconds"],
                    ", ".join(f"{i}: {e['before']:.3f} -> {e['after']:.3f}" for i, e in self.local.items()))

    def _record(self, rows: list[torch.Tensor], deadline: float | None) -> dict:
        """``record_feedforwards`` on the original, a few sequences at a time, until ``deadline`` (clock seconds)."""
        layout, parts = self.layout, []
        bar = tqdm(total=sum(r.numel() for r in rows), desc="kallm heal: recording", unit="tok",
                   disable=not (self.config.progress_bar and self.main))
        for start in range(0, len(rows), RECORDING_BATCH):
            if parts and deadline is not None and self.clock() >= deadline:
                break
            chunk = rows[start:start + RECORDING_BATCH]
            parts.append(record_feedforwards(self.teacher, layout.adapter, layout.blocks, chunk, progress=False))
            bar.update(sum(r.numel() for r in chunk))
        bar.close()
        return {i: (torch.cat([p[i][0] for p in parts]), torch.cat([p[i][1] for p in parts])) for i in layout.blocks}

    def _local_point(self, step: int, errors: dict[int, float], bar):
        point = {"stage": "local", "step": step, "seconds": self.clock(), "tokens": 0,
                 "error": sum(errors.values()) / len(errors)}
        bar.set_postfix(error=f"{point['error']:.3f}")
        self._log(point)

    @staticmethod
    def _keep_best(feedforwards, splits, best) -> dict[int, float]:
        errors = {}
        for index, feedforward in feedforwards.items():
            errors[index] = _local_errors(feedforward, *splits[index][2:])[0]
            if errors[index] < best[index][0]:
                best[index] = (errors[index], _copy_state(feedforward))
        return errors

    # ------------------------------------------------------------------------------ end-to-end stage

    def _end_to_end(self, trainable: int):
        config, model, accelerator = self.config, self.model, self.accelerator
        parameters = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.Adam(parameters, lr=config.learning_rate)
        if self.resume is not None:
            optimizer.load_state_dict(torch.load(self.resume / "optimizer.pt", map_location="cpu",
                                                 weights_only=True))
        wrapped = accelerator.prepare_model(model)
        scaler = torch.amp.GradScaler(self.device.type, enabled=config.fp16)  # float16 gradients need scaling
        start = self.state["local_seconds"]
        budget = self.budget - start if self.budget is not None else None
        cache = _PrefixCache(config.cache_dir, self) if config.cache_dir and self.layout.shared_prefix else None
        blend = _Blend(self.layout, self.teacher) if config.progressive else None
        world = accelerator.num_processes
        bar = tqdm(total=1000, desc="kallm heal: end to end", disable=not (config.progress_bar and self.main),
                   bar_format="{l_bar}{bar}| {postfix}")
        sums = {"kl": 0.0, "ce": 0.0, "count": 0}
        try:
            while True:
                elapsed = self._synchronized(self.clock() - start)
                progress = self._progress(self.state["step"], elapsed, budget)
                if progress >= 1:
                    break
                lr = config.learning_rate * _schedule(progress, config.warmup)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                if blend is not None:
                    blend.alpha = min(1.0, progress / config.progressive_fraction)
                rows = self._rows(self.state["step"])
                inputs = self._batch(rows)
                with torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None):
                    student_logits, teacher_logits = self._logits(wrapped, inputs, rows, cache)
                    loss, kl, ce = distillation_loss(student_logits, teacher_logits, inputs["input_ids"],
                                                     inputs["attention_mask"], config.temperature, config.ce_weight)
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                if config.max_grad_norm:
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(parameters, config.max_grad_norm)
                scaler.step(optimizer)
                scaler.update()
                del student_logits, teacher_logits, loss
                self.state["step"] += 1
                self.state["tokens"] += int(inputs["attention_mask"].sum()) * world
                sums["kl"] += kl
                sums["ce"] += ce
                sums["count"] += 1
                seconds = self.clock()
                bar.n = int(1000 * self._progress(self.state["step"], seconds - start, budget))
                bar.set_postfix_str(f"step {self.state['step']}, kl {kl:.3f}, {self._time_left(seconds)}")
                if self.state["step"] % config.logging_steps == 0:
                    point = {"stage": "end_to_end", "step": self.state["step"], "seconds": seconds,
                             "tokens": self.state["tokens"], "kl": sums["kl"] / sums["count"],
                             "ce": sums["ce"] / sums["count"], "lr": lr}
                    if blend is not None:
                        point["alpha"] = blend.alpha
                    sums = {"kl": 0.0, "ce": 0.0, "count": 0}
                    self._log(point)
                if config.save_steps and self.state["step"] % config.save_steps == 0:
                    self._save_checkpoint(optimizer)
        finally:
            bar.close()
            if blend is not None:
                blend.remove()
        accelerator.wait_for_everyone()

    def _progress(self, step: int, elapsed: float, budget: float | None) -> float:
        shares = []
        if self.config.max_steps is not None:
            shares.append(step / self.config.max_steps)
        if budget is not None:
            shares.append(elapsed / budget if budget > 0 else 1.0)
        return max(shares)

    def _time_left(self, seconds: float) -> str:
        if self.budget is None:
            return f"{seconds:.0f} s elapsed"
        return f"{seconds:.0f} s elapsed, {max(self.budget - seconds, 0):.0f} s left"

    def _synchronized(self, value: float) -> float:
        """The main process's value, so that every process stops at the same step."""
        if self.accelerator.num_processes == 1:
            return value
        from accelerate.utils import broadcast

        return float(broadcast(torch.tensor([value], dtype=torch.float64, device=self.device))[0])

    def _rows(self, step: int) -> list[int]:
        """This process's sequences for ``step``: a fixed function of the step (seeded epochs), so resuming
        and several processes see the same order as one uninterrupted run."""
        world, rank = self.accelerator.num_processes, self.accelerator.process_index
        per_step, count = self.config.batch_size * world, len(self.sequences)
        rows = []
        for position in range(step * per_step + rank, (step + 1) * per_step, world):
            epoch, offset = divmod(position, count)
            rows.append(int(self._permutation(epoch)[offset]))
        return rows

    def _permutation(self, epoch: int) -> torch.Tensor:
        if getattr(self, "_epoch", None) != epoch:
            self._epoch = epoch
            self._order = torch.randperm(len(self.sequences),
                                         generator=torch.Generator().manual_seed(self.config.seed + epoch))
        return self._order

    def _batch(self, rows: list[int]) -> dict[str, torch.Tensor]:
        width = max(self.sequences[r].numel() for r in rows)
        ids = torch.full((len(rows), width), self.pad, dtype=torch.long)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        for k, r in enumerate(rows):
            ids[k, :self.sequences[r].numel()] = self.sequences[r]
            mask[k, :self.sequences[r].numel()] = 1
        return {"input_ids": ids.to(self.device), "attention_mask": mask.to(self.device)}

    def _logits(self, wrapped, inputs, rows, cache):
        if not self.layout.shared_prefix:
            with torch.no_grad():
                teacher_logits = self.teacher(**inputs, use_cache=False).logits
            return wrapped(**inputs, use_cache=False).logits, teacher_logits
        cached = cache.load(rows, inputs["attention_mask"]) if cache is not None else None
        student_logits, teacher_logits, hidden = shared_prefix_logits(
            self.model, self.teacher, self.layout.adapter.blocks_path, self.layout.first, inputs, cached, wrapped)
        if cache is not None and cached is None:
            cache.store(rows, hidden, inputs["attention_mask"])
        return student_logits, teacher_logits

    # ------------------------------------------------------------------------------------- bookkeeping

    def _log(self, point: dict):
        self.curve.append(point)
        if self.out is not None and self.main:
            with (self.out / METRICS_FILE).open("a", encoding="utf-8") as file:
                file.write(json.dumps(point) + "\n")
        with self.clock.pause():
            for callback in self.callbacks:
                callback(self.model, point)

    def _rewrite_metrics(self):
        (self.out / METRICS_FILE).write_text("".join(json.dumps(p) + "\n" for p in self.curve), encoding="utf-8")

    def _save_checkpoint(self, optimizer):
        folder = self.out / f"{CHECKPOINT_PREFIX}{self.state['step']}"
        if self.main:
            from safetensors.torch import save_file

            with replacing_checkpoint(folder, self.model) as staging:
                trained = {n: p.detach().cpu().contiguous() for n, p in self.model.named_parameters()
                           if p.requires_grad}
                save_file(trained, str(staging / "trainable.safetensors"))
                torch.save(optimizer.state_dict(), staging / "optimizer.pt")
                state = {**self.state, "seconds": self.clock(), "curve": self.curve, "local": self.local}
                (staging / STATE_FILE).write_text(json.dumps(state), encoding="utf-8")
        self.accelerator.wait_for_everyone()

    def _load_state(self) -> float:
        from safetensors.torch import load_file

        saved = json.loads((self.resume / STATE_FILE).read_text(encoding="utf-8"))
        weights = load_file(str(self.resume / "trainable.safetensors"))
        parameters = dict(self.model.named_parameters())
        unknown = sorted(set(weights) - set(parameters))
        if unknown:
            raise ValueError(f"checkpoint {self.resume} holds parameters this model lacks: {', '.join(unknown[:3])}")
        with torch.no_grad():
            for name, value in weights.items():
                parameters[name].copy_(value)
        self.state = {key: saved[key] for key in self.state}
        self.curve, self.local = saved["curve"], {int(k): v for k, v in saved["local"].items()}
        return saved["seconds"]

    def _finish(self, trainable: int) -> HealReport:
        seconds = self.clock()
        e2e_seconds = max(seconds - self.state["local_seconds"], 1e-9)
        report = HealReport(
            curve=self.curve, local=self.local, steps=self.state["step"], seconds=seconds,
            local_seconds=self.state["local_seconds"], tokens=self.state["tokens"],
            tokens_per_second=self.state["tokens"] / e2e_seconds, data=self.data_stats,
            trainable_parameters=trainable, shared_prefix=self.layout.shared_prefix,
            world_size=self.accelerator.num_processes, output_dir=str(self.out) if self.out else None,
            config=asdict(self.config),
        )
        if self.out is not None and self.main:
            (self.out / REPORT_FILE).write_text(json.dumps(asdict(report), indent=2), encoding="utf-8")
            plot_curve(report.curve, self.out / CURVE_FILE)
            if self.config.save_model:  # last: a diverged run's report and curve say what happened
                save_checkpoint(self.model, self.tokenizer, self.out)
        self.accelerator.wait_for_everyone()
        return report


def _accelerator_available() -> bool:
    accelerator = getattr(torch, "accelerator", None)
    return accelerator.is_available() if accelerator is not None else torch.cuda.is_available()


def _schedule(progress: float, warmup: float) -> float:
    """Learning-rate factor: linear warmup over ``warmup`` of the stage, then cosine to zero."""
    if progress < warmup:
        return (progress + 1e-3) / warmup
    return 0.5 * (1 + math.cos(math.pi * (progress - warmup) / (1 - warmup)))


def _relative_loss(feedforward, x, y) -> torch.Tensor:
    """Mean over rows of ``||f(x) - y||^2 / (||y||^2 + median ||y||^2)``: every token counts, the rare
    massive-activation rows no more than the rest."""
    dtype = next(feedforward.parameters()).dtype
    prediction = feedforward(x.to(dtype)).float()
    energy = y.pow(2).sum(-1)
    return ((prediction - y).pow(2).sum(-1) / (energy + energy.median())).mean()


@torch.no_grad()
def _local_errors(feedforward, x, y) -> tuple[float, float]:
    """Held-out ``||f(x) - y|| / ||y||`` over ordinary tokens (the massive-activation rows left out, as
    fit init reports it), and over all tokens."""
    dtype = next(feedforward.parameters()).dtype
    prediction = torch.cat([feedforward(x[s:s + 4096].to(dtype)).float() for s in range(0, len(x), 4096)])
    ordinary = ~outlier_rows(y)
    error = (prediction - y).norm(dim=-1)
    return (float(error[ordinary].norm() / y[ordinary].norm().clamp_min(1e-12)),
            float(error.norm() / y.norm().clamp_min(1e-12)))


def _copy_state(module: nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


class _Blend:
    """Progressive replacement: each retrofitted feedforward's output becomes
    ``(1 - alpha) * original(x) + alpha * new(x)`` through a forward hook, the original being the
    teacher's module (frozen, shared, never part of the student's parameters)."""

    def __init__(self, layout: _Layout, teacher):
        self.alpha = 0.0
        names = (layout.adapter.mlp_attribute, *layout.adapter.bypassed_attributes)
        self.hooks = []
        for index in layout.blocks:
            original = original_feedforward(layout.teacher_blocks[index], layout.adapter)
            # OPT spreads its feedforward over fc1, activation, fc2: the blend sits after fc1, whose input is
            # the feedforward's, and the bypassed modules are identities in the student.
            module = getattr(layout.student_blocks[index], names[0])
            self.hooks.append(module.register_forward_hook(self._hook(original)))

    def _hook(self, original):
        def hook(module, args, output):
            if self.alpha >= 1:
                return output
            with torch.no_grad():
                reference = original(args[0])
            return (1 - self.alpha) * reference + self.alpha * output

        return hook

    def remove(self):
        for hook in self.hooks:
            hook.remove()


class _PrefixCache:
    """The prefix hidden states of each healing sequence on disk, one safetensors file per sequence
    (``hidden_size`` times the dtype's bytes per token: 2,304 bytes for SmolLM2-135M in float32).
    Filled during the first epoch; later epochs read them and skip the prefix entirely."""

    def __init__(self, folder: str, healer: _Healer):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        digest = hashlib.sha256()
        for sequence in healer.sequences:
            digest.update(sequence.numpy().tobytes() + b"|")
        # the states depend on the teacher's prefix weights, not on its name: another teacher of the same name
        # and shapes must not reuse them
        key = {"prefix_weights": healer.layout.prefix_digest(healer.teacher), "first_block": healer.layout.first,
               "autocast": str(healer.autocast_dtype), "data": digest.hexdigest()}
        key_file = self.folder / "cache_key.json"
        if key_file.is_file() and json.loads(key_file.read_text(encoding="utf-8")) != key:
            raise ValueError(f"cache_dir {folder} holds prefix states of other data or another model; "
                             f"use an empty folder")
        if healer.main:
            key_file.write_text(json.dumps(key), encoding="utf-8")
        self.device = healer.device

    def _file(self, row: int) -> Path:
        return self.folder / f"row-{row:08d}.safetensors"

    def load(self, rows: list[int], mask: torch.Tensor) -> torch.Tensor | None:
        from safetensors.torch import load_file

        if not all(self._file(r).is_file() for r in rows):
            return None
        states = [load_file(str(self._file(r)))["hidden"] for r in rows]
        hidden = torch.zeros(len(rows), mask.shape[1], states[0].shape[-1], dtype=states[0].dtype)
        for k, state in enumerate(states):
            hidden[k, :len(state)] = state
        return hidden.to(self.device)

    def store(self, rows: list[int], hidden: torch.Tensor, mask: torch.Tensor):
        from safetensors.torch import save_file

        for k, row in enumerate(rows):
            target = self._file(row)
            if not target.is_file():
                partial = target.with_suffix(f".{os.getpid()}.tmp")
                save_file({"hidden": hidden[k, :int(mask[k].sum())].detach().cpu().contiguous()}, str(partial))
                os.replace(partial, target)


def plot_curve(curve: list[dict], path: str | os.PathLike) -> Path | None:
    """A PNG of the end-to-end KL against minutes (and the local stage's held-out error); None without points."""
    points = [p for p in curve if p["stage"] == "end_to_end"]
    local = [p for p in curve if p["stage"] == "local"]
    if not points and not local:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4))
    if points:
        axis.plot([p["seconds"] / 60 for p in points], [p["kl"] for p in points], label="KL to the original")
    if local:
        axis.plot([p["seconds"] / 60 for p in local], [p["error"] for p in local], "o-",
                  label="local stage: held-out block error")
    axis.set_xlabel("minutes")
    if all(value > 0 for line in axis.get_lines() for value in line.get_ydata()):
        axis.set_yscale("log")
    axis.set_title("kallm heal")
    axis.legend()
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return Path(path)
