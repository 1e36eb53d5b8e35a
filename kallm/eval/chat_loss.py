"""Held-out chat loss: the mean loss on assistant tokens of ``messages``-format conversations.

Conversations are read, cleaned and tokenized exactly as for training (``kallm.data.chat``):
the model's chat template, and a mask that keeps only the assistant replies, so the number
is directly comparable with the training loss.
"""

from __future__ import annotations

import math

import torch

from ..data.chat import ChatCollator, prepare_chat_dataset
from ..inference import eval_mode, masked_nll, model_device


@torch.no_grad()
def chat_loss(model, tokenizer, source, max_length: int = 1024, batch_size: int = 4, limit: int | None = None,
              split: str = "test", progress: bool = False) -> dict:
    """Mean negative log-likelihood per assistant token over the conversations of ``source``.

    ``source``: a local ``.jsonl``/``.json``/``.parquet`` file or folder, a hub dataset id,
    or a list of ``{"messages": [...]}`` rows. Conversations longer than ``max_length``
    tokens are truncated; unusable rows are skipped and counted. ``limit`` keeps the first
    rows. Returns ``{"loss", "perplexity", "tokens", "conversations", "skipped", "truncated"}``.
    """
    from tqdm.auto import tqdm

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    dataset, stats = prepare_chat_dataset(source, tokenizer, max_length=max_length, split=split, limit=limit)
    rows = sorted(({"input_ids": ids, "labels": labels} for ids, labels in zip(dataset["input_ids"], dataset["labels"])),
                  key=lambda row: -len(row["input_ids"]))
    collate = ChatCollator(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)
    device = model_device(model)
    total_nll, total_tokens = 0.0, 0
    with eval_mode(model):
        for start in tqdm(range(0, len(rows), batch_size), disable=not progress, desc="chat loss", unit="batch"):
            batch = {key: value.to(device) for key, value in collate(rows[start : start + batch_size]).items()}
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            nll, tokens = masked_nll(logits, batch["labels"])
            total_nll += float(nll)
            total_tokens += tokens
    loss = total_nll / total_tokens
    return {"loss": loss, "perplexity": math.exp(loss), "tokens": total_tokens, "conversations": stats.kept,
            "skipped": dict(stats.skipped), "truncated": stats.truncated}
