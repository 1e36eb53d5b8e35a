"""Perplexity of a causal LM on plain text (sliding windows, no overlap by default)."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from ..data.chat import IGNORE_INDEX
from ..inference import eval_mode, masked_nll, model_device


def load_text(source: str, split: str = "test", column: str = "text") -> str:
    """Text from a local file, or from a hub dataset given as ``"name"`` or ``"name:config"``
    (the ``column`` of ``split``, one row per line)."""
    path = Path(source)
    if path.is_file():
        return path.read_text(encoding="utf-8")
    if path.suffix or source.startswith((".", "/", "~")):
        raise FileNotFoundError(f"text file not found: {source}")
    from datasets import load_dataset

    name, _, config = source.partition(":")
    dataset = load_dataset(name, config or None, split=split)
    if column not in dataset.column_names:
        raise ValueError(f"{source} has no column {column!r}; columns: {', '.join(dataset.column_names)}")
    # Rows such as WikiText's already end with their newline; joining them with another
    # would change the text being scored.
    return "".join(row if row.endswith("\n") else row + "\n" for row in dataset[column])


@torch.no_grad()
def perplexity(model, tokenizer, text: str, max_length: int = 512, stride: int | None = None,
               max_tokens: int | None = None, batch_size: int = 4, progress: bool = False) -> dict:
    """Token-level perplexity of ``text``.

    The text is tokenized once and cut into windows of ``max_length`` tokens that start
    every ``stride`` tokens. The default stride, ``max_length - 1``, makes consecutive
    windows share one token, so every token but the first is scored exactly once; a smaller
    stride gives each scored token more context (a sliding window), each token being scored
    once, in the window where it has the most context. ``max_tokens`` caps the tokens
    scored, for quick runs; ``progress`` shows a progress bar. Returns ``{"perplexity", "nll", "tokens"}``.
    """
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2, got {max_length}")
    stride = stride or max_length - 1
    if not 1 <= stride < max_length:
        raise ValueError(f"stride must be between 1 and max_length - 1 = {max_length - 1}, got {stride}")
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[0]
    if max_tokens is not None:
        ids = ids[: max_tokens + 1]
    if ids.numel() < 2:
        raise ValueError("the text has fewer than 2 tokens; nothing to score")
    device = model_device(model)
    windows = []  # (start, end, first scored position within the window)
    scored_until = 0
    for start in range(0, ids.numel() - 1, stride):
        end = min(start + max_length, ids.numel())
        windows.append((start, end, max(scored_until - start, 0)))
        scored_until = end
        if end == ids.numel():
            break
    with eval_mode(model):
        total_nll, total_tokens = _score_windows(model, ids, windows, batch_size, tokenizer.pad_token_id or 0, device,
                                                 progress)
    mean = total_nll / total_tokens
    return {"perplexity": math.exp(mean), "nll": mean, "tokens": total_tokens}


def _score_windows(model, ids, windows, batch_size, pad, device, progress) -> tuple[float, int]:
    from tqdm.auto import tqdm

    total_nll, total_tokens = 0.0, 0
    for i in tqdm(range(0, len(windows), batch_size), disable=not progress, desc="perplexity", unit="batch"):
        batch = windows[i : i + batch_size]
        width = max(end - start for start, end, _ in batch)
        input_ids = torch.full((len(batch), width), pad, dtype=torch.long)
        labels = torch.full_like(input_ids, IGNORE_INDEX)
        attention = torch.zeros_like(input_ids)
        for row, (start, end, skip) in enumerate(batch):
            input_ids[row, : end - start] = ids[start:end]
            attention[row, : end - start] = 1
            labels[row, max(skip, 1) : end - start] = ids[start + max(skip, 1) : end]
        logits = model(input_ids=input_ids.to(device), attention_mask=attention.to(device)).logits
        nll, tokens = masked_nll(logits, labels)
        total_nll += float(nll)
        total_tokens += tokens
    return total_nll, total_tokens
