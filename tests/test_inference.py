"""kallm.inference: evaluation mode, batched chat generation on the model's device, masked NLL."""

from __future__ import annotations

import pytest
import torch

from kallm import inference
from kallm.data.chat import IGNORE_INDEX
from kallm.testing.models import tiny_model
from kallm.testing.tokenizers import make_tiny_tokenizer


def test_eval_mode_restores_the_training_flag_even_when_the_block_fails():
    model = tiny_model("llama").train()
    with inference.eval_mode(model):
        assert not model.training and not any(module.training for module in model.modules())
    assert model.training and all(module.training for module in model.modules())
    with pytest.raises(RuntimeError, match="boom"), inference.eval_mode(model):
        raise RuntimeError("boom")
    assert model.training
    model.eval()
    with inference.eval_mode(model):
        pass
    assert not model.training


def test_generation_moves_the_batch_to_the_models_device(monkeypatch):
    """The demo's former copy left the batch on the CPU, which fails once the model is on an accelerator. Here
    the model claims the meta device: every tensor handed to ``generate`` must be there."""
    model, tokenizer = tiny_model("llama"), make_tiny_tokenizer()
    seen = []

    def fake_generate(**inputs):
        seen.append({name: value.device.type for name, value in inputs.items() if torch.is_tensor(value)})
        rows, width = inputs["input_ids"].shape
        return torch.full((rows, width + 2), tokenizer.eos_token_id, device=inputs["input_ids"].device)

    monkeypatch.setattr(inference, "model_device", lambda _: torch.device("meta"))
    monkeypatch.setattr(model, "generate", fake_generate)
    with pytest.raises(NotImplementedError):  # a meta tensor has no values to bring back ...
        inference.generate_replies(model, tokenizer, ["a", "bb", "ccc"], max_new_tokens=2, batch_size=2)
    assert seen == [{"input_ids": "meta", "attention_mask": "meta"}]  # ... but it went where the model is


def test_generation_is_seeded_and_restores_what_it_changes():
    model, tokenizer = tiny_model("llama").train(), make_tiny_tokenizer()
    tokenizer.padding_side = "right"
    prompts = [inference.chat_prompt(tokenizer, text) for text in ("Hi.", "Tell me a story.", "Why?")]
    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    first = inference.generate(model, tokenizer, prompts, max_new_tokens=6, temperature=0.8, top_p=0.95, seed=1)
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's random stream is untouched
    second = inference.generate(model, tokenizer, prompts, max_new_tokens=6, temperature=0.8, top_p=0.95, seed=1)
    assert all(torch.equal(a[1], b[1]) for a, b in zip(first, second))
    assert model.training and tokenizer.padding_side == "right"
    for prompt, (prompt_ids, reply_ids) in zip(prompts, first):
        assert prompt_ids.tolist() == tokenizer(prompt, add_special_tokens=False).input_ids  # no padding
        assert 0 < len(reply_ids) <= 6
        assert tokenizer.eos_token_id not in reply_ids[:-1].tolist()  # cut at its first stop token
    with pytest.raises(ValueError, match="batch_size and max_new_tokens must be >= 1"):
        inference.generate(model, tokenizer, prompts, max_new_tokens=0)


def test_masked_nll_sums_next_token_losses_over_targets_only():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 5, dtype=torch.bfloat16)
    labels = torch.tensor([[IGNORE_INDEX, 1, 2, IGNORE_INDEX], [3, IGNORE_INDEX, 4, 0]])
    nll, count = inference.masked_nll(logits, labels)
    expected = [-torch.log_softmax(logits[row, position - 1].float(), -1)[labels[row, position]]
                for row in range(2) for position in range(1, 4) if labels[row, position] != IGNORE_INDEX]
    assert count == 4 and nll.dtype == torch.float32
    assert float(nll) == pytest.approx(float(sum(expected)), rel=1e-5)


def test_long_steps_show_progress_bars(capsys, monkeypatch):
    from kallm.eval.perplexity import perplexity
    from kallm.surgery import calibration

    model, tokenizer = tiny_model("llama"), make_tiny_tokenizer()
    monkeypatch.setattr(calibration, "DEFAULT_PROMPTS", ("Hi.",))
    perplexity(model, tokenizer, "quiet text " * 4, max_length=8)
    calibration.default_calibration(model, tokenizer, max_new_tokens=2)
    assert capsys.readouterr().err == ""
    calibration.default_calibration(model, tokenizer, max_new_tokens=2, progress=True)
    perplexity(model, tokenizer, "some text to score " * 4, max_length=8, progress=True)
    shown = capsys.readouterr().err
    assert "kallm fit: generating calibration text" in shown and "perplexity" in shown
