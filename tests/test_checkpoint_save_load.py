"""Saved retrofitted checkpoints: the files written, reload with kallm through every load path and dtype, and
saving a model whose basis a user registered."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import kallm
import kallm.checkpoints.load
from kallm.testing.checkpoints import CASES, TOKENIZER_CASE
from kallm.testing.compare import logits_of
from kallm.testing.models import tiny_model
from kallm.testing.processes import CODE_FILES

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", CASES)
def test_saved_folder_holds_safetensors_config_code_and_card(saved, name):
    folder, model, _ = saved[name]
    files = set(os.listdir(folder))
    expected = {"config.json", "generation_config.json", "model.safetensors", "README.md", *CODE_FILES}
    if name == TOKENIZER_CASE:
        expected |= {"tokenizer.json", "tokenizer_config.json"}
    assert files == expected
    for code_file in CODE_FILES:  # the same self-contained code kallm runs
        assert (folder / code_file).read_bytes() == (REPO / "kallm" / "core" / code_file).read_bytes()

    config = json.loads((folder / "config.json").read_text())
    model_class, config_class = type(model).__name__, type(model.config).__name__
    assert config["auto_map"] == {
        "AutoConfig": f"configuration_kallm.{config_class}",
        "AutoModelForCausalLM": f"modeling_kallm.{model_class}",
        "AutoModelForSequenceClassification": f"modeling_kallm.{model_class.replace('LMHeadModel', 'ForCausalLM')}"
                                              .replace("ForCausalLM", "ForSequenceClassification"),
        "AutoModel": f"modeling_kallm.{model_class.replace('LMHeadModel', 'ForCausalLM').replace('ForCausalLM', 'Model')}",
    }
    assert config["architectures"] == [model_class]
    assert config["model_type"] == type(model.config).model_type
    assert config["kan_config"] == model.config.kan_config
    assert config["kan_config"]["schema_version"] == 4


def test_each_retrofitted_class_names_its_family_and_shares_one_init(saved):
    from kallm.core import KAN_CONFIG_CLASSES, KAN_MODEL_CLASSES

    for base_model_type, config_class in KAN_CONFIG_CLASSES.items():
        assert config_class.base_config_class.model_type == base_model_type
        assert config_class.__mro__[2] is config_class.base_config_class
    assert all("__init__" not in vars(model_class) for model_class in KAN_MODEL_CLASSES.values())
    # the family is a class attribute, not a setting a checkpoint stores
    assert "base_config_class" not in json.loads((saved["llama"][0] / "config.json").read_text())




@pytest.mark.parametrize("name", CASES)
def test_reload_restores_every_tensor_and_identical_logits(saved, name):
    folder, model, reference = saved[name]
    loaded = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert type(loaded) is type(model)
    assert loaded.config.kan_config == model.config.kan_config

    expected = model.state_dict()
    actual = loaded.state_dict()
    assert actual.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(actual[key], value), key

    ref = torch.load(reference)
    assert (logits_of(loaded, ref["ids"]) - ref["logits"]).abs().max().item() == 0.0
    prompt = ref["ids"][:1]
    generate = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(loaded.generate(prompt, **generate), model.generate(prompt, **generate))

    if loaded.config.tie_word_embeddings:
        assert loaded.get_input_embeddings().weight.data_ptr() == loaded.get_output_embeddings().weight.data_ptr()
    else:
        assert loaded.get_input_embeddings().weight.data_ptr() != loaded.get_output_embeddings().weight.data_ptr()


def test_tied_families_are_covered(saved):
    tied = {name for name in CASES if saved[name][1].config.tie_word_embeddings}
    assert {"llama", "qwen2", "gpt2"} <= tied
    assert "mistral" not in tied


def test_autotokenizer_loads_from_the_saved_folder(saved):
    tokenizer = AutoTokenizer.from_pretrained(saved[TOKENIZER_CASE][0])
    assert tokenizer("w1 w5 unknown")["input_ids"] == [4, 8, 0]
    assert tokenizer.eos_token == "</s>"


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_bfloat16_load_path(saved, name):
    folder, model, reference = saved[name]
    loaded = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).eval()
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    state = loaded.state_dict()
    for key, value in model.state_dict().items():
        assert torch.equal(state[key], value.to(torch.bfloat16)), key
    ref = torch.load(reference)
    logits = logits_of(loaded, ref["ids"]).float()
    assert torch.isfinite(logits).all()
    agreement = (logits.argmax(-1) == ref["logits"].argmax(-1)).float().mean()
    assert agreement >= 0.75
    generated = loaded.generate(ref["ids"][:1], max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert generated.shape[1] > ref["ids"].shape[1]


@pytest.mark.parametrize("name", ["llama", "opt"])
def test_device_map_load_path(saved, name):
    folder, _, reference = saved[name]
    loaded = AutoModelForCausalLM.from_pretrained(folder, device_map="cpu").eval()
    assert {p.device.type for p in loaded.parameters()} == {"cpu"}
    ref = torch.load(reference)
    assert (logits_of(loaded, ref["ids"]) - ref["logits"]).abs().max().item() == 0.0


def test_from_config_initialises_kan_layers_by_their_own_rule(saved):
    _, model, _ = saved["llama"]
    fresh = AutoModelForCausalLM.from_config(model.config)
    layer = fresh.model.layers[2].mlp.layers[0]
    expected_std = 1.0 / (layer.in_features * layer.basis.mean_square()) ** 0.5
    assert torch.equal(layer.input_scale, torch.ones_like(layer.input_scale))
    assert abs(layer.weight.mean().item()) < 0.2 * expected_std
    assert abs(layer.weight.std().item() / expected_std - 1.0) < 0.1


class _Sine(kallm.Basis):
    def values(self, t, params):
        return [torch.sin(k * t) for k in range(1, self.degree + 1)]


@pytest.fixture
def registry(monkeypatch):
    """A private copy of the basis registry, so that registrations in a test do not leak."""
    from kallm.core import bases

    monkeypatch.setattr(bases, "_REGISTRY", dict(bases._REGISTRY))
    return bases._REGISTRY


def test_saving_a_user_registered_basis_warns_that_loaders_must_register_it(registry, tmp_path):
    kallm.register_basis("sine", _Sine)
    model = kallm.retrofit(tiny_model("llama"), last_n=1, basis="sine>cheby2")
    with pytest.warns(UserWarning, match="basis 'sine', added with kallm.register_basis; .* whoever loads it must "
                                         "register the same basis first, and trust_remote_code users"):
        model.save_pretrained(tmp_path / "sine")
    assert "It uses basis sine, added with `kallm.register_basis`" in (tmp_path / "sine" / "README.md").read_text()
    assert isinstance(AutoModelForCausalLM.from_pretrained(tmp_path / "sine"), type(model))  # registered: loads
    del registry["sine"]
    with pytest.raises(ValueError, match="unknown basis 'sine'.*must be registered before the checkpoint is loaded"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "sine")


def test_saving_built_in_bases_does_not_warn(saved, tmp_path, recwarn):
    saved["llama-parallel-then-legendre"][1].save_pretrained(tmp_path / "builtin")
    assert not [w for w in recwarn if "register_basis" in str(w.message)]
    assert "register_basis" not in (tmp_path / "builtin" / "README.md").read_text()


def test_a_built_in_name_overwritten_by_a_user_basis_counts_as_the_users(registry, tmp_path):
    kallm.register_basis("legendre", _Sine, overwrite=True)
    model = kallm.retrofit(tiny_model("gpt2"), last_n=1, basis="cheby2+legendre")
    with pytest.warns(UserWarning, match="basis 'legendre', added with kallm.register_basis"):
        model.save_pretrained(tmp_path / "overwritten")
