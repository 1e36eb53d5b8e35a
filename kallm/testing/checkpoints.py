"""Saved retrofitted checkpoints to test loading on: every family and the options that change the module tree,
each with the logits and KAN tensors it must load back to, and copies edited as a damaged or hand-edited folder
would be."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import safetensors.torch
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from ..core.layers import KANFeedForward
from ..surgery import retrofit
from .compare import logits_of
from .models import TINY_CONFIGS, tiny_model

# name -> (family, retrofit options); every family plus bases and options that change the module tree
CASES = {family: (family, {"last_n": 2}) for family in sorted(TINY_CONFIGS)}
CASES.update({
    "llama-parallel-then-legendre": ("llama", {"last_n": 2, "basis": "cheby2+rbf>legendre"}),
    "gpt2-rational": ("gpt2", {"blocks": [0, 2], "basis": "rational", "denominator_degree": 2}),
    "llama-per-block": ("llama", {"blocks": {1: {"basis": "legendre", "degree": 3}, 2: {"intermediate_size": 12}}}),
    "qwen2-gegenbauer-tanh": ("qwen2", {"last_n": 1, "basis": "gegenbauer", "alpha": 0.5, "input_map": "tanh"}),
    "llama-base-branches": ("llama", {"blocks": {1: {"base": "linear"}, 2: {}}, "base": "silu"}),
    "qwen2-gated": ("qwen2", {"last_n": 2, "form": "gated", "base": "linear"}),
})
TOKENIZER_CASE = "llama"


def word_tokenizer():
    """A word-level tokenizer over the tiny models' 128 ids, built offline."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i + 3 for i in range(125)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def reference_ids():
    """The ids every saved case's reference logits are computed on."""
    return torch.randint(3, 128, (2, 7), generator=torch.Generator().manual_seed(5))


@torch.no_grad()
def perturb_kan(model):
    """Move every KAN tensor away from its initial value, so a re-initialisation would show."""
    generator = torch.Generator().manual_seed(11)
    for module in model.modules():
        if isinstance(module, KANFeedForward):
            for param in module.parameters():
                param.add_(0.1 * torch.randn(param.shape, generator=generator))


def kan_state(model):
    """Copies of the tensors of every feedforward (KAN or not), by state-dict key."""
    return {k: v.clone() for k, v in model.state_dict().items() if ".mlp." in k or ".fc1." in k}


def save_cases(root: Path) -> dict:
    """Every case of CASES retrofitted, perturbed and saved under ``root``, and copies of the llama case that every
    load path must refuse: name -> (folder, model, reference file), model and reference None for the refused."""
    result = {}
    for name, (family, options) in CASES.items():
        model = retrofit(tiny_model(family), **options)
        perturb_kan(model)
        folder = root / name
        model.save_pretrained(folder)
        if name == TOKENIZER_CASE:
            word_tokenizer().save_pretrained(folder)
        ids = reference_ids()
        reference = root / f"{name}.reference.pt"
        torch.save({"ids": ids, "logits": logits_of(model, ids), "kan_state": kan_state(model)}, reference)
        result[name] = (folder, model, reference)
    newer = root / "llama-newer-schema"
    shutil.copytree(result["llama"][0], newer)
    config = json.loads((newer / "config.json").read_text())
    config["kan_config"]["schema_version"] = 99
    (newer / "config.json").write_text(json.dumps(config))
    result["llama-newer-schema"] = (newer, None, None)
    for name, edit_config, edit_weights in [
        ("llama-kan-weight-dropped", None, "model.layers.2.mlp.layers.0.weight"),
        ("llama-bogus-blocks-path", {"blocks_path": "model.blocks"}, None),
        ("llama-basis-edited", {"basis": "legendre"}, None),  # as many features as cheby2: the tensors fit
    ]:
        folder = root / name
        shutil.copytree(result["llama"][0], folder)
        if edit_config:
            config = json.loads((folder / "config.json").read_text())
            config["kan_config"].update(edit_config)
            (folder / "config.json").write_text(json.dumps(config))
        if edit_weights:
            weights = safetensors.torch.load_file(folder / "model.safetensors")
            del weights[edit_weights]
            safetensors.torch.save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
        result[name] = (folder, None, None)
    return result


def copy_checkpoint(saved, tmp_path, name="llama", edit_config=None, edit_weights=None):
    """A copy of a saved case with its kan_config and/or its weights edited in place."""
    folder = tmp_path / f"{name}-edited"
    shutil.copytree(saved[name][0], folder)
    if edit_config is not None:
        config = json.loads((folder / "config.json").read_text())
        edit_config(config)
        (folder / "config.json").write_text(json.dumps(config))
    if edit_weights is not None:
        weights = safetensors.torch.load_file(folder / "model.safetensors")
        edit_weights(weights)
        safetensors.torch.save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    return folder
