"""Training a sequence classifier: plain AdamW over every trainable parameter, with per-role learning rates and an
optional score along the way (``kallm sweep``'s loop; chat models train through ``trainer``)."""

from __future__ import annotations

import time

import torch

from ..data.classification import batch
from .parameter_groups import parameter_groups


def train_classifier(model, train, pad_id: int, settings: dict, seed: int, score=None) -> dict:
    """Plain AdamW training, every parameter, on batches drawn in a seeded order; returns timings and losses.

    ``warmup_steps``: the learning rate rises linearly to ``learning_rate`` over that many steps, then stays.
    ``learning_rate_scales``: ``{role: scale}`` by parameter role (``kallm.parameter_groups``), e.g. slower basis
    coefficients.
    ``eval_every``: ``score(model)`` (dev accuracy) after every that many steps and after the last, as
    ``curve``: ``[[step, accuracy], ...]``; scoring time is not training time."""
    steps, batch_size = settings.get("steps", 100), settings.get("batch_size", 16)
    groups = parameter_groups(model, settings.get("learning_rate", 1e-3), settings.get("learning_rate_scales"))
    optimizer = torch.optim.AdamW(groups, weight_decay=settings.get("weight_decay", 0.0))
    warmup = settings.get("warmup_steps", 0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / (warmup + 1)))
    every = settings.get("eval_every") if score is not None else None
    generator = torch.Generator().manual_seed(seed)
    order = []
    losses, curve, seconds = [], [], 0.0
    for step in range(1, steps + 1):
        started = time.perf_counter()
        model.train()
        if len(order) < batch_size:
            order += torch.randperm(len(train), generator=generator).tolist()
        chosen, order = order[:batch_size], order[batch_size:]
        input_ids, attention, labels = batch([train[i] for i in chosen], pad_id)
        loss = model(input_ids=input_ids, attention_mask=attention, labels=labels).loss
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(round(loss.item(), 4))
        seconds += time.perf_counter() - started
        if every and (step % every == 0 or step == steps):
            curve.append([step, score(model)])
    record = {"train_seconds": round(seconds, 2), "seconds_per_step": round(seconds / steps, 4), "losses": losses}
    if every:
        record["curve"] = curve
    return record
