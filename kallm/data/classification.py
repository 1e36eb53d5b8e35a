"""Classification data: rows of ``{"text", "label"}`` read from a .jsonl/.csv file or a hub dataset, encoded with a
tokenizer, and padded into batches for a sequence classifier."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import torch

from .padding import pad_sequences


def read_rows(source: str, split: str, text_column: str, label_column: str, limit: int | None) -> list[dict]:
    """``[{"text", "label"}]`` from a local .jsonl/.csv file, or a hub dataset's ``split``."""
    path = Path(source)
    if path.suffix in (".jsonl", ".csv"):
        if not path.is_file():
            raise FileNotFoundError(f"classification data not found: {source}")
        with open(path, encoding="utf-8", newline="") as handle:
            rows = list(csv.DictReader(handle)) if path.suffix == ".csv" else [
                json.loads(line) for line in handle if line.strip()
            ]
    else:
        import datasets

        rows = list(datasets.load_dataset(source, split=split))
    if not rows:
        raise ValueError(f"{source} holds no rows")
    columns = sorted(rows[0])
    missing = [column for column in (text_column, label_column) if column not in rows[0]]
    if missing:
        raise ValueError(f"{source} has no column {missing}; its columns are {columns}. A classification dataset "
                         f"needs a text and an integer label column (data.text_column, data.label_column)")
    result = []
    for number, row in enumerate(rows[:limit], 1):
        label = row[label_column]
        try:
            label = int(label)
        except (TypeError, ValueError):
            raise ValueError(f"{source}, row {number}: label {label!r} is not an integer class index") from None
        if not isinstance(row[text_column], str):
            raise ValueError(f"{source}, row {number}: text {row[text_column]!r} is not a string")
        result.append({"text": row[text_column], "label": label})
    return result


def encode(tokenizer, rows: list[dict], max_length: int) -> list[tuple[list[int], int]]:
    ids = tokenizer([row["text"] for row in rows], truncation=True, max_length=max_length)["input_ids"]
    return [(row_ids, row["label"]) for row_ids, row in zip(ids, rows)]


def batch(examples, pad_id: int):
    """``(input_ids, attention_mask, labels)`` of ``[(ids, label), ...]``, right padded: the classifier reads each
    row's last real token."""
    input_ids, attention = pad_sequences([ids for ids, _ in examples], pad_id)
    return input_ids, attention, torch.tensor([label for _, label in examples])
