"""Held-out chat loss: assistant tokens only, batching-invariant, bad rows counted."""

from __future__ import annotations

import json
import math

import pytest
import torch

from kallm.eval.chat_loss import chat_loss
from kallm.testing.models import tiny_model

CONVERSATIONS = [
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
     {"role": "assistant", "content": "4"}, {"role": "user", "content": "3+3?"},
     {"role": "assistant", "content": "It is 6."}],
    [{"role": "user", "content": "Name a color"}, {"role": "assistant", "content": "Blue"}],
]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def reference_nll(model, tokenizer, messages) -> tuple[float, int]:
    """Summed NLL of the assistant replies (their text, end-of-turn marker and newline), from
    a ChatML rendering built by hand."""
    ids, scored = [], []
    for message in messages:
        header = tokenizer(f"<|im_start|>{message['role']}\n", add_special_tokens=False).input_ids
        body = tokenizer(f"{message['content']}<|im_end|>\n", add_special_tokens=False).input_ids
        ids += header
        scored += [False] * len(header)
        ids += body
        scored += [message["role"] == "assistant"] * len(body)
    with torch.no_grad():
        logprobs = model(torch.tensor([ids])).logits[0].log_softmax(-1)
    positions = [t for t in range(1, len(ids)) if scored[t]]
    return -sum(float(logprobs[t - 1, ids[t]]) for t in positions), len(positions)


def test_loss_is_the_mean_over_assistant_tokens(tmp_path, tiny_tokenizer):
    model = tiny_model("llama")
    data = write_jsonl(tmp_path / "held_out.jsonl", [{"messages": m} for m in CONVERSATIONS])
    result = chat_loss(model, tiny_tokenizer, str(data), batch_size=2)
    totals = [reference_nll(model, tiny_tokenizer, m) for m in CONVERSATIONS]
    expected = sum(nll for nll, _ in totals) / sum(count for _, count in totals)
    assert result["tokens"] == sum(count for _, count in totals)
    assert result["loss"] == pytest.approx(expected, rel=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(expected), rel=1e-5)
    assert result["conversations"] == 3 and result["skipped"] == {} and result["truncated"] == 0
    assert chat_loss(model, tiny_tokenizer, str(data), batch_size=1)["loss"] == pytest.approx(result["loss"], rel=1e-5)


def test_bad_rows_are_counted_and_long_ones_truncated(tiny_tokenizer):
    model = tiny_model("llama")
    rows = [{"messages": CONVERSATIONS[0]}, {"text": "no messages"},
            {"messages": [{"role": "robot", "content": "beep"}]}, {"messages": []},
            {"messages": [{"role": "user", "content": "x" * 30}, {"role": "assistant", "content": "y" * 30}]}]
    result = chat_loss(model, tiny_tokenizer, rows, max_length=56, limit=5)
    assert result["conversations"] == 2 and result["truncated"] == 1
    assert result["skipped"] == {"no_messages": 1, "unknown_role": 1, "empty": 1}
    assert chat_loss(model, tiny_tokenizer, rows, max_length=56, limit=1)["conversations"] == 1


def test_errors(tmp_path, tiny_tokenizer):
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="holds no valid conversation"):
        chat_loss(model, tiny_tokenizer, [{"text": "nothing"}])
    with pytest.raises(FileNotFoundError):
        chat_loss(model, tiny_tokenizer, str(tmp_path / "missing.jsonl"))
    with pytest.raises(ValueError, match="batch_size"):
        chat_loss(model, tiny_tokenizer, [{"messages": CONVERSATIONS[0]}], batch_size=0)


def test_shared_held_out_conversations(data_dir, tiny_tokenizer):
    result = chat_loss(tiny_model("llama"), tiny_tokenizer, str(data_dir / "chat" / "oasst_en100" / "best_path.jsonl"),
                       max_length=400, limit=4, batch_size=4)
    assert result["conversations"] == 4 and result["tokens"] > 0
    # A random 128-way model is about as unsure as a uniform guess.
    assert abs(result["loss"] - math.log(128)) < 1.0
