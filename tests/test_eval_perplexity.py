"""Perplexity on plain text: window bookkeeping against per-token brute force, text loading."""

from __future__ import annotations

import math

import pytest
import torch

from kallm.eval.perplexity import load_text, perplexity
from kallm.testing.models import tiny_model

TEXT = "The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs."


def token_ids(tokenizer, text=TEXT):
    return tokenizer(text, add_special_tokens=False).input_ids


def brute_force_nll(model, ids, context_start) -> tuple[float, int]:
    """Mean NLL with token t predicted from ids[context_start(t):t], one forward per token."""
    total = 0.0
    with torch.no_grad():
        for t in range(1, len(ids)):
            window = torch.tensor([ids[context_start(t) : t + 1]])
            total -= float(model(window).logits[0, -2].log_softmax(-1)[ids[t]])
    return total / (len(ids) - 1), len(ids) - 1


def test_single_window_is_the_plain_causal_lm_loss(tiny_tokenizer):
    model = tiny_model("llama")
    ids = token_ids(tiny_tokenizer)
    result = perplexity(model, tiny_tokenizer, TEXT, max_length=len(ids))
    with torch.no_grad():
        loss = model(torch.tensor([ids]), labels=torch.tensor([ids])).loss
    assert result["tokens"] == len(ids) - 1
    assert result["nll"] == pytest.approx(float(loss), rel=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(float(loss)), rel=1e-5)


@pytest.mark.parametrize("max_length, stride", [(16, None), (16, 5), (9, 1), (12, 11)])
def test_windows_score_every_token_once_with_the_right_context(tiny_tokenizer, max_length, stride):
    model = tiny_model("llama")
    text = TEXT[:40]
    ids = token_ids(tiny_tokenizer, text)
    step = stride or max_length - 1

    def context_start(t):
        # The window that scores t is the first one reaching t; t is scored there with
        # everything before it in that window as context.
        start = 0
        while start + max_length <= t:
            start += step
        return start

    expected, count = brute_force_nll(model, ids, context_start)
    result = perplexity(model, tiny_tokenizer, text, max_length=max_length, stride=stride, batch_size=3)
    assert result["tokens"] == count == len(ids) - 1
    assert result["nll"] == pytest.approx(expected, rel=1e-4)


def test_max_tokens_and_batch_size(tiny_tokenizer):
    model = tiny_model("gpt2")
    capped = perplexity(model, tiny_tokenizer, TEXT, max_length=16, max_tokens=30)
    assert capped["tokens"] == 30
    assert capped == pytest.approx(perplexity(model, tiny_tokenizer, TEXT[:31], max_length=16, batch_size=1))
    one = perplexity(model, tiny_tokenizer, TEXT, max_length=20, batch_size=1)
    many = perplexity(model, tiny_tokenizer, TEXT, max_length=20, batch_size=8)
    assert one["nll"] == pytest.approx(many["nll"], rel=1e-5) and one["tokens"] == many["tokens"]


def test_perplexity_errors_and_mode_restored(tiny_tokenizer):
    model = tiny_model("llama").train()
    with pytest.raises(ValueError, match="max_length must be >= 2"):
        perplexity(model, tiny_tokenizer, TEXT, max_length=1)
    with pytest.raises(ValueError, match="stride must be between 1 and max_length - 1 = 15"):
        perplexity(model, tiny_tokenizer, TEXT, max_length=16, stride=16)
    with pytest.raises(ValueError, match="fewer than 2 tokens"):
        perplexity(model, tiny_tokenizer, "x", max_length=16)
    perplexity(model, tiny_tokenizer, TEXT, max_length=16)
    assert model.training


def test_load_text_local_file_and_errors(tmp_path):
    file = tmp_path / "wiki.test.raw"
    file.write_text(" = Title = \n text .\n", encoding="utf-8")
    assert load_text(str(file)) == " = Title = \n text .\n"
    with pytest.raises(FileNotFoundError, match="text file not found"):
        load_text(str(tmp_path / "missing.txt"))


def test_load_text_from_a_hub_dataset(monkeypatch):
    import datasets

    class Rows:
        column_names = ["text"]

        def __getitem__(self, column):
            return ["", " = Title = \n", " line one .\n", "no newline"]

    calls = []
    monkeypatch.setattr(datasets, "load_dataset", lambda name, config, split: calls.append((name, config, split))
                        or Rows())
    assert load_text("Salesforce/wikitext:wikitext-2-raw-v1") == "\n = Title = \n line one .\nno newline\n"
    assert calls == [("Salesforce/wikitext", "wikitext-2-raw-v1", "test")]
    with pytest.raises(ValueError, match="no column 'content'; columns: text"):
        load_text("someone/texts", column="content")


def test_shared_wikitext_file_loads(data_dir):
    text = load_text(str(data_dir / "text" / "wikitext2" / "wiki.test.raw"))
    assert "Robert Boulter" in text and len(text) > 1_000_000


@pytest.mark.integration
@pytest.mark.all_threads  # the real model gains from every core
def test_real_model_perplexity_on_wikitext(smollm2, data_dir):
    model, tokenizer = smollm2
    text = load_text(str(data_dir / "text" / "wikitext2" / "wiki.test.raw"))
    result = perplexity(model, tokenizer, text, max_length=512, max_tokens=1022, batch_size=2)
    assert result["tokens"] == 1022
    # The full test set scores about 27 with 512-token windows; a 1k-token slice is in that range.
    assert 10 < result["perplexity"] < 60
