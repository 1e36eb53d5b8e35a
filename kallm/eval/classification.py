"""Accuracy of a sequence classifier on labelled rows."""

from __future__ import annotations

import torch

from ..data.classification import batch


@torch.inference_mode()
def accuracy(model, dev, pad_id: int, batch_size: int) -> float:
    model.eval()
    correct = 0
    for start in range(0, len(dev), batch_size):
        input_ids, attention, labels = batch(dev[start:start + batch_size], pad_id)
        correct += (model(input_ids=input_ids, attention_mask=attention).logits.argmax(-1) == labels).sum().item()
    return correct / len(dev)
