"""The real SmolLM2-135M-Instruct: retrofit its last 5 blocks, save it with its tokenizer,
reload it in fresh processes (with kallm, and without kallm through trust_remote_code)."""

from __future__ import annotations

import copy
import json

import pytest
import torch

import kallm
from kallm.core.layers import KANFeedForward
from kallm.testing.processes import CODE_FILES, run_fresh_processes

pytestmark = [pytest.mark.integration, pytest.mark.all_threads]

NEW_TOKENS = 8


def test_real_smollm2_retrofit_save_and_reload(smollm2, tmp_path):
    base, tokenizer = smollm2
    model = kallm.retrofit(copy.deepcopy(base), last_n=5, basis="cheby2", degree=2).eval()

    kan_config = model.config.kan_config
    assert kan_config["blocks"] == [25, 26, 27, 28, 29]
    assert kan_config["base_model"] == "smollm2-135m-instruct"
    assert sum(isinstance(m, KANFeedForward) for m in model.modules()) == 5
    base_state, state = base.state_dict(), model.state_dict()
    kept = [k for k in base_state if not any(k.startswith(f"model.layers.{i}.mlp.") for i in range(25, 30))]
    assert len(kept) == len(base_state) - 5 * 3
    for key in kept:
        assert torch.equal(state[key], base_state[key]), key
    # the research arms on the real weights
    assert kallm.set_trainable(model, "tail+embeddings") == 39_371_298
    linear = kallm.retrofit(copy.deepcopy(base), last_n=5, kind="linear")
    assert kallm.set_trainable(linear, "tail+embeddings") == 46_012_608
    del linear
    model.requires_grad_(True)

    folder = tmp_path / "smollm2-kan"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    assert {"model.safetensors", "config.json", "README.md", "tokenizer.json", *CODE_FILES} <= {
        p.name for p in folder.iterdir()
    }
    assert not list(folder.glob("*.bin"))

    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model(ids).logits
        expected_tokens = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False)[0, ids.shape[1]:].tolist()
    reference = tmp_path / "reference.pt"
    kan_state = {k: v for k, v in state.items() if ".mlp.layers." in k}
    torch.save({"ids": ids, "logits": logits, "kan_state": kan_state}, reference)

    requests = {
        key: {"block_kallm": key == "without_kallm", "models": {"smollm2": [str(folder), str(reference)]},
              "generate": NEW_TOKENS}
        for key in ("with_kallm", "without_kallm")
    }
    for key, results in run_fresh_processes(requests, tmp_path / "fresh").items():
        result = results["models"]["smollm2"]
        assert result["class"] == "KALlamaForCausalLM"
        assert result["module"].startswith("transformers_modules." if key == "without_kallm" else "kallm.")
        assert result["max_abs_diff"] == 0.0
        assert result["kan_tensors_equal"]
        assert result["tied"]
        # untrained KAN blocks: the reply is not sensible yet, but generation works end to end
        assert result["new_tokens"] == expected_tokens
        assert 1 <= len(result["new_tokens"]) <= NEW_TOKENS
        assert isinstance(result["reply"], str)


def test_real_smollm2_shrinks_to_a_mini_model_that_agrees_on_kept_tokens(smollm2, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base, tokenizer = smollm2
    texts = ["Wall St. Bears Claw Back Into the Black (Reuters)", "Olympic champion wins gold in Athens",
             "New chip doubles laptop battery life", "Oil prices hit a record as supply fears grow"]
    messages = [{"role": "user", "content": texts[0]}]
    # a rendered conversation keeps the chat template's own tokens ("user", "assistant", newlines)
    chat = tokenizer.apply_chat_template(messages, tokenize=False)
    small, small_tokenizer = kallm.shrink(base, tokenizer, num_blocks=3, vocab_from=[*texts, chat])
    assert small.config.num_hidden_layers == 3 and small.config.tie_word_embeddings
    assert kallm.core.layers.count_parameters(small) < kallm.core.layers.count_parameters(base) / 10
    # the 256 byte symbols, the 17 added tokens and the texts' tokens with what they are merged from
    assert 256 + 17 < len(small_tokenizer) < 1000
    small.save_pretrained(tmp_path)
    small_tokenizer.save_pretrained(tmp_path)
    loaded_tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    vocab = tokenizer.get_vocab()
    kept_ids = [vocab[token] for token, _ in sorted(loaded_tokenizer.get_vocab().items(), key=lambda item: item[1])]
    for text in texts:
        assert [kept_ids[i] for i in loaded_tokenizer(text)["input_ids"]] == tokenizer(text)["input_ids"]
    assert [kept_ids[i] for i in loaded_tokenizer.apply_chat_template(messages, tokenize=True)["input_ids"]] == \
        tokenizer.apply_chat_template(messages, tokenize=True)["input_ids"]
    assert loaded_tokenizer.decode(loaded_tokenizer("Zürich 🙂")["input_ids"]) == "Zürich 🙂"
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.tensor([loaded_tokenizer(texts[1])["input_ids"]])
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, small.eval()(ids).logits)


def test_real_smollm2_from_gguf_through_transformers_retrofits_saves_and_reloads(smollm2, tmp_path):
    """transformers tags a GGUF load as quantized (GgufConfig) even when it unpacked every weight to float, as it
    does on CPU; those float weights retrofit as kallm.load_model's do, and the tag is not saved."""
    from transformers import AutoModelForCausalLM

    folder, gguf_file = kallm.checkpoints.load.resolve_model("smollm2-135m-instruct")
    direct = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, dtype=torch.float32)
    assert direct.config.quantization_config.quant_method == "gguf"
    assert {p.dtype for p in direct.parameters()} == {torch.float32}
    ids = torch.tensor([[1, 9690, 198, 2683, 314, 260]])
    for model in (direct, copy.deepcopy(smollm2[0])):
        torch.manual_seed(0)
        retrofitted = kallm.retrofit(model, last_n=2).eval()
        assert retrofitted.config.kan_config["blocks"] == [28, 29]
        assert getattr(retrofitted.config, "quantization_config", None) is None
        assert getattr(retrofitted, "hf_quantizer", None) is None
    torch.testing.assert_close(retrofitted.state_dict(), direct.state_dict(), rtol=0, atol=0)
    direct.save_pretrained(tmp_path)
    assert "quantization_config" not in json.loads((tmp_path / "config.json").read_text())
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(reloaded) is type(direct)
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, direct(ids).logits)
