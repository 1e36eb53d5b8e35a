"""Small data for tests: token ids, chat conversations, healing texts and BIG-Bench Hard tasks."""

from __future__ import annotations

import json
import random

import torch

#: long, repetitive plain texts that heal and distil on a few hundred tokens
TEXTS = ["the quick brown fox jumps over the lazy dog. " * 12, "hello world, how are you today? " * 16,
         "a stitch in time saves nine; many hands make light work. " * 10]

#: three BIG-Bench Hard tasks of one to three examples, in the form ``write_tasks`` saves
TOY = {
    "boolean_expressions": [{"input": "True and False is", "target": "False"},
                            {"input": "not False is", "target": "True"},
                            {"input": "True or False is", "target": "True"}],
    "hyperbaton": [{"input": "Which?\nOptions:\n(A) red big\n(B) big red", "target": "(B)"},
                   {"input": "Which?\nOptions:\n(A) old car\n(B) car old", "target": "(A)"}],
    "object_counting": [{"input": "I have a cat and a dog. How many?", "target": "2"}],
}


def token_ids(seed=0, rows=16, length=48):
    """``rows`` random sequences of ids the tiny models know, past their special tokens."""
    return torch.randint(5, 128, (rows, length), generator=torch.Generator().manual_seed(seed))


def conversation(*turns):
    """A chat row whose turns alternate user, assistant, user..."""
    roles = ["user", "assistant"]
    return {"messages": [{"role": roles[i % 2], "content": text} for i, text in enumerate(turns)]}


def sums(count=48, seed=0):
    """``count`` one-digit additions as conversations ("3+4=" -> "7"): a task a tiny model learns in a few steps."""
    rng = random.Random(seed)
    return [conversation(f"{a}+{b}=", str(a + b)) for a, b in ((rng.randint(0, 9), rng.randint(0, 9))
                                                                   for _ in range(count))]


def write_tasks(folder, tasks: dict[str, list[dict]]):
    """Save BIG-Bench Hard ``tasks`` (name -> examples) in ``folder`` as the benchmark's files are laid out."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, examples in tasks.items():
        (folder / f"{name}.json").write_text(json.dumps({"canary": "x", "examples": examples}))
    return folder
