"""What kallm's two training loops share: ``train`` (transformers' Trainer) and ``heal`` (a loop of its own on
accelerate) check a teacher, find the device and keep a metrics file the same way."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

import torch

#: one JSON object per logged step, in every run's output folder
METRICS_FILE = "metrics.jsonl"


def accelerator_available() -> bool:
    """Whether torch sees an accelerator (torch >= 2.6 asks for CUDA, XPU, MPS, ...; older torch for CUDA)."""
    accelerator = getattr(torch, "accelerator", None)
    return accelerator.is_available() if accelerator is not None else torch.cuda.is_available()


def check_teacher(model, teacher) -> None:
    """Refuse a teacher that is the student itself, or whose vocabulary differs from the student's: distillation
    compares the two models' next-token distributions token by token."""
    if teacher is model:
        raise ValueError("the teacher must be a separate model (e.g. the original, un-retrofitted one)")
    student_vocab = model.get_output_embeddings().weight.shape[0]
    teacher_vocab = teacher.get_output_embeddings().weight.shape[0]
    if student_vocab != teacher_vocab:
        raise ValueError(f"the teacher's vocabulary ({teacher_vocab} tokens) differs from the student's "
                         f"({student_vocab}); distillation needs the same tokenizer")


def write_metrics(path: str | os.PathLike, records: Iterable[dict]) -> None:
    """``path`` holding ``records`` only, one JSON line each (a new run, or a resumed one cut back to its
    checkpoint)."""
    Path(path).write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")


def append_metrics(path: str | os.PathLike, record: dict) -> None:
    with Path(path).open("a", encoding="utf-8") as file:
        file.write(json.dumps(record) + "\n")
