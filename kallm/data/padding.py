"""Token sequences of different lengths as one batch: ids padded to the longest, and the attention mask."""

from __future__ import annotations

import torch

SIDES = ("right", "left")


def pad_sequences(sequences, pad_id: int, side: str = "right") -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)``, both ``(len(sequences), longest)`` long tensors, of token sequences (lists or
    1-d tensors). ``side="right"`` pads after each sequence (a classifier reads its last real token, a causal LM
    its targets from the start); ``side="left"`` before it, so that every sequence ends at the last column (where
    generation and scoring continue)."""
    if side not in SIDES:
        raise ValueError(f"side must be one of {', '.join(SIDES)}, got {side!r}")
    sequences = [torch.as_tensor(sequence, dtype=torch.long) for sequence in sequences]
    width = max(sequence.numel() for sequence in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, sequence in enumerate(sequences):
        columns = slice(0, sequence.numel()) if side == "right" else slice(width - sequence.numel(), width)
        input_ids[row, columns] = sequence
        attention_mask[row, columns] = 1
    return input_ids, attention_mask
