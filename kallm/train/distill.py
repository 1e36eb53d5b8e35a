"""Knowledge distillation: a Trainer whose loss mixes cross-entropy with a KL divergence to
a teacher's next-token distribution, over the target (assistant) tokens only."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..data.chat import IGNORE_INDEX
from .chat_trainer import ChatTrainer
from .losses import kl_per_token, softened_log_probabilities


class DistillationTrainer(ChatTrainer):
    """``loss = alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * cross_entropy``.

    ``_T`` marks distributions softened by the temperature ``T``; the KL is the one ``heal`` uses too
    (``kallm.train.losses``). Both terms are sums over target tokens normalised like transformers
    normalises its own loss (by the target count of the whole accumulated, and with several
    processes global, batch), so gradient accumulation and data parallelism give the same
    result as one big batch. The per-token means of both terms
    are logged as ``distill_ce`` and ``distill_kl``.
    """

    def __init__(self, *args, teacher, alpha: float = 0.5, temperature: float = 2.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.teacher = teacher.to(self.args.device).eval().requires_grad_(False)
        self.alpha = alpha
        self.temperature = temperature
        self._sums = {"ce": 0.0, "kl": 0.0, "tokens": 0}

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = dict(inputs)
        labels = inputs.pop("labels")
        outputs = model(**inputs)
        targets = labels[:, 1:]
        mask = targets != IGNORE_INDEX
        student = outputs.logits[:, :-1][mask].float()
        with torch.no_grad():
            teacher = self.teacher(**inputs).logits[:, :-1][mask].float()
        ce = F.cross_entropy(student, targets[mask], reduction="sum")
        t = self.temperature
        kl = kl_per_token(softened_log_probabilities(student, t), softened_log_probabilities(teacher, t)).sum() * (t * t)
        tokens = int(mask.sum())
        if model.training:
            self._sums["ce"] += ce.item()
            self._sums["kl"] += kl.item()
            self._sums["tokens"] += tokens
        loss = self.alpha * kl + (1.0 - self.alpha) * ce
        if num_items_in_batch is None:
            loss = loss / max(tokens, 1)
        else:
            # Same normalisation as transformers applies to a model's own loss in this case.
            loss = loss / num_items_in_batch
            if self.args.average_tokens_across_devices:
                loss = loss * self.accelerator.num_processes
        return (loss, outputs) if return_outputs else loss

    def log(self, logs, *args, **kwargs):
        if "loss" in logs and self._sums["tokens"]:
            logs["distill_ce"] = self._sums["ce"] / self._sums["tokens"]
            logs["distill_kl"] = self._sums["kl"] / self._sums["tokens"]
            self._sums = {"ce": 0.0, "kl": 0.0, "tokens": 0}
        super().log(logs, *args, **kwargs)
