"""``kallm.heal``: bring a retrofitted model back to its original by distillation, cheaply.

Two stages share one budget (wall-clock minutes and/or end-to-end steps):

1. Block-local (``kallm.healing.local``): each new feedforward learns, on its own, the original MLP's outputs
   for the inputs it saw. No LM head, no attention, no backward through blocks.
2. End-to-end (this module). KL(original || retrofit) on next-token distributions (plus optional
   cross-entropy). The blocks before the first retrofitted one are identical in both
   models, so they run once per batch, in the teacher (``kallm.healing.prefix``): the student's prefix blocks
   are replaced, for the duration of its forward, by stand-ins that return the teacher's hidden
   state, and backward runs through the tail only.

A plain loop on accelerate (DDP under ``accelerate launch``/``torchrun``, bf16/fp16) rather
than transformers' Trainer: the budget is wall-clock time that must end every process at
the same step, the learning rate and the progressive blend follow the share of that budget
spent, and the local stage is no model forward at all. See docs/healing.md.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from ..checkpoints.save import check_output_folder, replacing_checkpoint, resume_checkpoint, save_checkpoint
from ..data.padding import pad_sequences
from ..surgery.calibration import original_feedforward
from ..surgery.trainable import set_trainable
from ..train.losses import distillation_loss
from ..train.runs import METRICS_FILE, accelerator_available, append_metrics, write_metrics
from .config import CHECKPOINT_PREFIX, CURVE_FILE, REPORT_FILE, STATE_FILE, HealConfig, HealReport
from .data import healing_sequences
from .local import LocalStage
from .plot import plot_curve
from .prefix import Layout, PrefixCache, shared_prefix_logits

logger = logging.getLogger("kallm")


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
    layout = Layout(model, teacher, config.trainable, config.progressive)
    if tokenizer.pad_token_id is None and tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has neither a pad nor an eos token; set tokenizer.pad_token")
    sequences, data_stats = healing_sequences(data, tokenizer, config, teacher)
    return _Healer(model, teacher, tokenizer, layout, sequences, data_stats, config, list(callbacks), resume).run()


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
    """One ``heal`` run: the student and its teacher, the healing sequences, the settings, and what the run has
    done so far (``state``: end-to-end steps and tokens, the local stage's seconds; ``curve``: every logged
    point; ``local``: the local stage's errors per block), which a checkpoint saves and a resumed run reloads.
    ``run`` drives the two stages and returns the ``HealReport``."""

    def __init__(self, model, teacher, tokenizer, layout: Layout, sequences, data_stats, config: HealConfig,
                 callbacks, resume: Path | None):
        from accelerate import Accelerator

        self.model, self.teacher, self.tokenizer, self.layout = model, teacher, tokenizer, layout
        self.sequences, self.data_stats, self.config = sequences, data_stats, config
        self.callbacks, self.resume = callbacks, resume
        # Mixed precision by plain autocast: accelerate fixes its precision once per process, and heal may be
        # called again in the same process with other settings.
        self.accelerator = Accelerator(cpu=not accelerator_available())
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
            write_metrics(self.out / METRICS_FILE, self.curve)
        try:
            if self.resume is None and config.local_passes > 0 and (self.budget is None or config.local_fraction):
                self._local_stage()
            trainable = set_trainable(model, config.trainable)
            self._end_to_end()
        finally:
            model.train(was_training)
            model.config.use_cache = use_cache
        return self._finish(trainable)

    def _local_stage(self):
        self.local = LocalStage(self).run()
        self.state["local_seconds"] = self.clock()
        logger.info("kallm heal: local stage %.0f s, held-out error per block: %s", self.state["local_seconds"],
                    ", ".join(f"{i}: {e['before']:.3f} -> {e['after']:.3f}" for i, e in self.local.items()))

    # ------------------------------------------------------------------------------ end-to-end stage

    def _end_to_end(self):
        """Distillation steps until the budget left after the local stage is spent (or ``max_steps`` taken)."""
        config, accelerator = self.config, self.accelerator
        parameters = [p for p in self.model.parameters() if p.requires_grad]
        optimizer = torch.optim.Adam(parameters, lr=config.learning_rate)
        if self.resume is not None:
            optimizer.load_state_dict(torch.load(self.resume / "optimizer.pt", map_location="cpu",
                                                 weights_only=True))
        wrapped = accelerator.prepare_model(self.model)
        scaler = torch.amp.GradScaler(self.device.type, enabled=config.fp16)  # float16 gradients need scaling
        start = self.state["local_seconds"]
        budget = self.budget - start if self.budget is not None else None
        cache = PrefixCache(config.cache_dir, self.sequences, self.layout, self.teacher, self.autocast_dtype,
                            self.device, self.main) if config.cache_dir and self.layout.shared_prefix else None
        blend = _Blend(self.layout, self.teacher) if config.progressive else None
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
                if blend is not None:
                    blend.alpha = min(1.0, progress / config.progressive_fraction)
                kl, ce = self._step(wrapped, optimizer, scaler, lr, cache)
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
                    self.log(point)
                if config.save_steps and self.state["step"] % config.save_steps == 0:
                    self._save_checkpoint(optimizer)
        finally:
            bar.close()
            if blend is not None:
                blend.remove()
        accelerator.wait_for_everyone()

    def _step(self, wrapped, optimizer, scaler, lr: float, cache: PrefixCache | None) -> tuple[float, float]:
        """One optimizer step at learning rate ``lr`` on this step's batch; returns its KL and cross-entropy."""
        config = self.config
        for group in optimizer.param_groups:
            group["lr"] = lr
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
            parameters = [p for group in optimizer.param_groups for p in group["params"]]
            torch.nn.utils.clip_grad_norm_(parameters, config.max_grad_norm)
        scaler.step(optimizer)
        scaler.update()
        self.state["step"] += 1
        self.state["tokens"] += int(inputs["attention_mask"].sum()) * self.accelerator.num_processes
        return kl, ce

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
        ids, mask = pad_sequences([self.sequences[r] for r in rows], self.pad)
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

    def log(self, point: dict):
        """Add ``point`` to the curve and the metrics file, and call the callbacks (off the clock)."""
        self.curve.append(point)
        if self.out is not None and self.main:
            append_metrics(self.out / METRICS_FILE, point)
        with self.clock.pause():
            for callback in self.callbacks:
                callback(self.model, point)

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


def _schedule(progress: float, warmup: float) -> float:
    """Learning-rate factor: linear warmup over ``warmup`` of the stage, then cosine to zero."""
    if progress < warmup:
        return (progress + 1e-3) / warmup
    return 0.5 * (1 + math.cos(math.pi * (progress - warmup) / (1 - warmup)))


class _Blend:
    """Progressive replacement: each retrofitted feedforward's output becomes
    ``(1 - alpha) * original(x) + alpha * new(x)`` through a forward hook, the original being the
    teacher's module (frozen, shared, never part of the student's parameters)."""

    def __init__(self, layout: Layout, teacher):
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
