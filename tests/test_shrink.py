"""kallm.shrink: blocks and vocabulary cut, tensors copied bit for bit, a tokenizer that produces the kept ids."""

from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

import kallm
from kallm.testing.models import TINY_CONFIGS, tiny_model
from kallm.testing.tokenizers import make_tiny_tokenizer

TEXTS = ["the cat sat on the mat", "a dog ran", "Hello, world!"]


def byte_level_tokenizer():
    """A small GPT2-style byte-level BPE (like SmolLM2's), trained offline on a few sentences."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    corpus = ["the cat sat on the mat", "the dog sat on the log", "cats and dogs", "hello world", "the theme"] * 20
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   pad_token="<|im_end|>")


def original_ids_of(kept_ids, new_ids):
    return [kept_ids[i] for i in new_ids]


@pytest.mark.parametrize("family", sorted(TINY_CONFIGS))
def test_shrink_cuts_blocks_and_vocabulary_and_copies_the_rest(family):
    model, tokenizer = tiny_model(family), make_tiny_tokenizer()
    small, small_tokenizer = kallm.shrink(model, tokenizer, num_blocks=2, vocab_from=TEXTS)
    blocks_only, _ = kallm.shrink(model, tokenizer, num_blocks=2)
    assert small.config.num_hidden_layers == blocks_only.config.num_hidden_layers == 2
    assert small.config.kallm_shrunk_from == {"blocks": [0, 1], "num_blocks": 3, "vocab_size": 128}

    # every block tensor, bit for bit
    original = model.state_dict()
    for name, tensor in blocks_only.state_dict().items():
        assert torch.equal(tensor, original[name]), name
    # on text of the kept vocabulary, the small model is the blocks-only one restricted to the kept ids
    for text in TEXTS:
        new_ids = small_tokenizer(text)["input_ids"]
        old_ids = tokenizer(text)["input_ids"]
        kept_ids = _kept_ids(tokenizer, small_tokenizer)
        assert original_ids_of(kept_ids, new_ids) == old_ids
        with torch.no_grad():
            small_logits = small(torch.tensor([new_ids])).logits
            reference = blocks_only(torch.tensor([old_ids])).logits[..., kept_ids]
        torch.testing.assert_close(small_logits, reference, rtol=0, atol=1e-5)
    assert small.config.vocab_size == len(small_tokenizer) < 128
    assert small.get_input_embeddings().weight.shape[0] == len(small_tokenizer)
    assert small.config.eos_token_id == small_tokenizer.convert_tokens_to_ids("<|im_end|>")


def _kept_ids(tokenizer, small_tokenizer):
    """Original id of every new id, through the token strings."""
    vocab = tokenizer.get_vocab()
    return [vocab[token] for token, _ in sorted(small_tokenizer.get_vocab().items(), key=lambda item: item[1])]


def test_shrink_keeps_listed_blocks_renumbered_and_the_originals_untouched():
    model = tiny_model("llama")
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    small, _ = kallm.shrink(model, make_tiny_tokenizer(), blocks=[2, 0])
    assert small.config.kallm_shrunk_from["blocks"] == [0, 2]
    assert torch.equal(small.model.layers[1].mlp.up_proj.weight, model.model.layers[2].mlp.up_proj.weight)
    assert small.model.layers[1].self_attn.layer_idx == 1
    assert all(torch.equal(tensor, before[name]) for name, tensor in model.state_dict().items())
    assert small.model.layers[0].mlp.up_proj.weight.data_ptr() != model.model.layers[0].mlp.up_proj.weight.data_ptr()


def test_untied_head_is_cut_with_the_embeddings():
    model = tiny_model("mistral")  # tie_word_embeddings False
    assert not model.config.tie_word_embeddings
    small, small_tokenizer = kallm.shrink(model, make_tiny_tokenizer(), vocab_from=TEXTS)
    kept_ids = _kept_ids(make_tiny_tokenizer(), small_tokenizer)
    assert torch.equal(small.lm_head.weight, model.lm_head.weight[kept_ids])
    assert small.lm_head.weight.data_ptr() != small.model.embed_tokens.weight.data_ptr()


def test_byte_level_tokenizer_keeps_bytes_so_any_text_tokenizes_and_round_trips():
    tokenizer = byte_level_tokenizer()
    model = tiny_model("llama")
    model.resize_token_embeddings(len(tokenizer))
    texts = ["the cat sat", "hello"]
    small, small_tokenizer = kallm.shrink(model, tokenizer, num_blocks=1, vocab_from=texts)
    kept_ids = _kept_ids(tokenizer, small_tokenizer)
    for text in texts:
        assert original_ids_of(kept_ids, small_tokenizer(text)["input_ids"]) == tokenizer(text)["input_ids"]
    # "the" needs "th" (or "t" + "he") even though only "the" occurs: the merges leading to a kept token stay
    assert len(small_tokenizer) < len(tokenizer)
    unseen = "dogs & ünïcödé 😀"
    ids = small_tokenizer(unseen)["input_ids"]
    assert max(ids) < len(small_tokenizer)
    assert small_tokenizer.decode(ids) == unseen
    assert len(ids) > len(tokenizer(unseen)["input_ids"])  # costs more tokens, loses nothing


def test_max_tokens_keeps_the_most_frequent_tokens():
    tokenizer = make_tiny_tokenizer()
    texts = ["aaaabbbccd"]
    _, small_tokenizer = kallm.shrink(tiny_model("llama"), tokenizer, vocab_from=texts, max_tokens=2)
    kept = set(small_tokenizer.get_vocab())
    assert {"a", "b"} <= kept and not {"c", "d", " "} & kept
    assert set(tokenizer.all_special_tokens) <= kept
    assert small_tokenizer.decode(small_tokenizer("abcd")["input_ids"]) == "ab<unk><unk>"


@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_the_pair_saves_and_loads_with_auto_classes(family, tmp_path):
    # (a folder whose config says qwen2 gets transformers' own Qwen2Tokenizer from AutoTokenizer, trimmed or not)
    model, tokenizer = tiny_model(family), make_tiny_tokenizer()
    small, small_tokenizer = kallm.shrink(model, tokenizer, num_blocks=2, vocab_from=TEXTS)
    small.save_pretrained(tmp_path)
    small_tokenizer.save_pretrained(tmp_path)
    loaded_tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    for text in [*TEXTS, "zebra? QQ"]:
        assert loaded_tokenizer(text)["input_ids"] == small_tokenizer(text)["input_ids"]
    assert loaded_tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == \
        tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    ids = torch.tensor([small_tokenizer(TEXTS[0])["input_ids"]])
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, small.eval()(ids).logits)
    assert loaded.config.kallm_shrunk_from["blocks"] == [0, 1]


@pytest.mark.parametrize("arguments, message", [
    ({"num_blocks": 0}, "num_blocks must be an integer between 1 and 3"),
    ({"num_blocks": 4}, "num_blocks must be an integer between 1 and 3"),
    ({"blocks": [0, 3]}, "block index 3 is out of range for a model with 3 blocks"),
    ({"blocks": [1, -2]}, "blocks must list distinct blocks"),
    ({"blocks": [0], "num_blocks": 1}, "not both"),
    ({"vocab_from": ["", ""]}, "tokenize to no tokens at all"),
    ({"vocab_from": "one string"}, "a list of texts, not one string"),
    ({"max_tokens": 5}, "pass vocab_from too"),
    ({"vocab_from": TEXTS, "max_tokens": 0}, "max_tokens must be a positive integer"),
])
def test_bad_arguments_are_refused_before_any_work(arguments, message):
    with pytest.raises((ValueError, TypeError), match=message):
        kallm.shrink(tiny_model("llama"), make_tiny_tokenizer(), **arguments)


def test_tokenizers_shrink_cannot_rebuild_are_refused():
    no_fallback = Tokenizer(models.BPE(vocab={"a": 0, "b": 1, "<s>": 2}, merges=[]))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=no_fallback, eos_token="<s>")
    with pytest.raises(ValueError, match="no fallback for text outside the kept vocabulary"):
        kallm.shrink(tiny_model("llama"), tokenizer, vocab_from=["ab"])
    word_level = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel({"a": 0, "<unk>": 1}, unk_token="<unk>")), unk_token="<unk>"
    )
    with pytest.raises(ValueError, match="BPE tokenizers only; this one is 'WordLevel'"):
        kallm.shrink(tiny_model("llama"), word_level, vocab_from=["a"])


def test_the_special_tokens_of_the_generation_config_are_kept_though_no_text_uses_them():
    model, tokenizer = tiny_model("llama"), make_tiny_tokenizer()
    model.generation_config.eos_token_id = [model.config.eos_token_id, 60]  # a second stop token
    model.generation_config.pad_token_id = 61
    small, small_tokenizer = kallm.shrink(model, tokenizer, vocab_from=["the cat"])
    kept = small_tokenizer.convert_ids_to_tokens(
        small.generation_config.eos_token_id + [small.generation_config.pad_token_id])
    assert kept == tokenizer.convert_ids_to_tokens([model.config.eos_token_id, 60, 61])
    assert small.config.vocab_size < model.config.vocab_size


def test_a_retrofitted_model_is_refused():
    model = kallm.retrofit(tiny_model("llama"), last_n=1)
    with pytest.raises(ValueError, match="already retrofitted; shrink the model it came from"):
        kallm.shrink(model, make_tiny_tokenizer(), num_blocks=2)


def test_a_shrunk_model_retrofits_trains_and_generates():
    small, small_tokenizer = kallm.shrink(tiny_model("llama"), make_tiny_tokenizer(), num_blocks=2, vocab_from=TEXTS)
    kallm.retrofit(small, last_n=2)
    ids = torch.tensor([small_tokenizer(TEXTS[0])["input_ids"]])
    loss = small.train()(ids, labels=ids).loss
    loss.backward()
    assert torch.isfinite(loss)
    out = small.eval().generate(ids, max_new_tokens=3, do_sample=False)
    assert out.max() < len(small_tokenizer)
