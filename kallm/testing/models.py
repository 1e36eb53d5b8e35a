"""Tiny random causal LMs of every family kallm supports: 3 blocks, 32 wide, 128 token ids."""

from __future__ import annotations

import torch
import transformers

from .tokenizers import make_tiny_tokenizer

_COMMON = dict(vocab_size=128, num_hidden_layers=3, max_position_embeddings=64, bos_token_id=1, eos_token_id=2)

TINY_CONFIGS = {
    "llama": lambda: transformers.LlamaConfig(
        **_COMMON, hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
        tie_word_embeddings=True,
    ),
    "mistral": lambda: transformers.MistralConfig(
        **_COMMON, hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2
    ),
    "qwen2": lambda: transformers.Qwen2Config(
        **_COMMON, hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
        tie_word_embeddings=True,
    ),
    "qwen3": lambda: transformers.Qwen3Config(
        **_COMMON, hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=8
    ),
    "gemma": lambda: transformers.GemmaConfig(
        **_COMMON, hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=8
    ),
    "gemma2": lambda: transformers.Gemma2Config(
        **_COMMON, hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
        sliding_window=16,
    ),
    "phi3": lambda: transformers.Phi3Config(
        **_COMMON, hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
        pad_token_id=0,
    ),
    "gpt2": lambda: transformers.GPT2Config(
        vocab_size=128, n_embd=32, n_layer=3, n_head=4, n_positions=64, bos_token_id=1, eos_token_id=2
    ),
    "gpt_neox": lambda: transformers.GPTNeoXConfig(
        **_COMMON, hidden_size=32, intermediate_size=64, num_attention_heads=4
    ),
    "opt": lambda: transformers.OPTConfig(
        **_COMMON, hidden_size=32, ffn_dim=64, num_attention_heads=4, word_embed_proj_dim=32, pad_token_id=1
    ),
}


def tiny_model(model_type: str, seed: int = 0):
    """A randomly initialised 3-block causal LM of ``model_type`` in float32, eval mode."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(TINY_CONFIGS[model_type]())
    return model.eval()


def chat_model(family: str):
    """A tiny random model whose vocabulary is :func:`make_tiny_tokenizer`'s, so every id it emits decodes; large
    weights make its replies varied instead of one repeated token."""
    model = tiny_model(family)
    model.resize_token_embeddings(len(make_tiny_tokenizer()))
    torch.manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() > 1:
                parameter.normal_(0, 0.3)
    return model
