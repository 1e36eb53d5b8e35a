"""The healing data: texts, chat rows, files, datasets, or text the original model writes, as token sequences."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..surgery.calibration import default_calibration
from .config import HealConfig

_TEXT_SUFFIXES = (".txt", ".text", ".raw", ".md")
_NO_LIMIT = 2**31 - 1


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
