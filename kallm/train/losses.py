"""The distillation loss of both of kallm's training loops: KL(teacher_T || student_T) * T^2 on next-token
distributions softened by the temperature ``T`` (the ``T^2`` keeps the KL's gradient scale independent of
``T``). ``train``'s distillation sums it over target tokens (``DistillationTrainer``), ``heal`` averages it over
real tokens (``distillation_loss``)."""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F


def softened_log_probabilities(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``log_softmax(logits / T)`` over the last dimension, in float32 (no division at T = 1)."""
    logits = logits.float()
    return F.log_softmax(logits / temperature if temperature != 1 else logits, -1)


def kl_per_token(student_logp: torch.Tensor, teacher_logp: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) at every position, from both models' log-probabilities (before the T^2 factor)."""
    return (teacher_logp.exp() * (teacher_logp - student_logp)).sum(-1)


def distillation_loss(student_logits, teacher_logits, input_ids, attention_mask, temperature: float = 1.0,
                      ce_weight: float = 0.0) -> tuple[torch.Tensor, float, float]:
    """``(loss, kl, ce)``: per-token mean KL(teacher_T || student_T) * T^2 over real tokens, plus
    ``ce_weight`` times the next-token cross-entropy.

    The logits are (batch, length, vocabulary), so every pass over them costs as much as the LM head:
    each log-softmax is taken once, on the whole padded batch (no masked copies), and the
    cross-entropy, when it only is logged, reuses the student's log-probabilities at T = 1.
    """
    t = temperature
    student_logp = softened_log_probabilities(student_logits, t)
    with torch.no_grad():
        teacher_logp = softened_log_probabilities(teacher_logits, t)
    real = attention_mask.float()
    kl = (kl_per_token(student_logp, teacher_logp) * real).sum() / real.sum().clamp_min(1) * (t * t)
    targets = real[:, 1:] * real[:, :-1]
    # Without ce_weight the cross-entropy is only logged: no graph, and at T = 1 no second log-softmax.
    with contextlib.nullcontext() if ce_weight else torch.no_grad():
        next_logp = student_logp[:, :-1] if t == 1 else F.log_softmax(student_logits[:, :-1].float(), -1)
        nll = -next_logp.gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    ce = (nll * targets).sum() / targets.sum().clamp_min(1)
    loss = kl + ce_weight * ce if ce_weight else kl
    return loss, float(kl.detach()), float(ce.detach())

