"""kallm.retrofit, set_trainable and summary on tiny random models of every supported family,
plus the research parameter counts on a model of SmolLM2-135M's exact shape."""

from __future__ import annotations

import copy
import importlib
import json
import os
import re
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
import transformers
from torch import nn
from transformers import AutoModelForCausalLM, GgufConfig

import kallm
from kallm.core.layers import KANFeedForward, count_parameters
from kallm.core.modeling_kallm import install_kan_feedforwards
from kallm.surgery.architectures import ARCHITECTURES
from kallm.testing.compare import assert_unchanged, snapshot
from kallm.testing.models import TINY_CONFIGS, tiny_model

FAMILIES = sorted(TINY_CONFIGS)
REPO = Path(__file__).resolve().parents[1]


def token_ids(batch=2, length=6, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, 128, (batch, length), generator=generator)


def feedforward_prefixes(model_type, layers):
    architecture = ARCHITECTURES[model_type]
    return tuple(
        f"{architecture.blocks_path}.{i}.{name}."
        for i in layers for name in (architecture.mlp_attribute, *architecture.bypassed_attributes)
    )


# ------------------------------------------------------------------------------------ every family


@pytest.mark.parametrize("model_type", FAMILIES)
def test_retrofit_replaces_only_the_chosen_feedforwards(model_type):
    model = tiny_model(model_type)
    base_class = type(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}

    assert kallm.retrofit(model, last_n=2) is model

    assert isinstance(model, base_class) and type(model) is not base_class
    assert type(model).__name__.startswith("KA")
    kan_config = model.config.kan_config
    assert kan_config["blocks"] == [1, 2]
    assert kan_config["base_model_type"] == model_type
    architecture = ARCHITECTURES[model_type]
    blocks = model.get_submodule(architecture.blocks_path)
    assert not isinstance(getattr(blocks[0], architecture.mlp_attribute), KANFeedForward)
    for index in (1, 2):
        assert isinstance(getattr(blocks[index], architecture.mlp_attribute), KANFeedForward)
        for name in architecture.bypassed_attributes:
            assert isinstance(getattr(blocks[index], name), nn.Identity)

    prefixes = feedforward_prefixes(model_type, [1, 2])
    after = model.state_dict()
    kept = {k for k in before if not k.startswith(prefixes)}
    assert kept == {k for k in after if not k.startswith(prefixes)}
    assert any(k.startswith(prefixes) for k in after)
    for key in kept:
        assert torch.equal(before[key], after[key]), key

    ids = token_ids()
    logits = model(ids).logits
    assert logits.shape == (2, 6, 128) and torch.isfinite(logits).all()
    generated = model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert generated.shape[0] == 2 and 7 <= generated.shape[1] <= 9
    assert torch.equal(generated[:, :6], ids)


@pytest.mark.parametrize("model_type", FAMILIES)
def test_linear_restart_keeps_shapes_and_class(model_type):
    model = tiny_model(model_type)
    base_class = type(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}

    kallm.retrofit(model, last_n=2, kind="linear")

    assert type(model) is base_class
    # the restart's typed config, kept in the family's own config
    assert model.config.kan_config["kind"] == "linear" and model.config.kan_config["blocks"] == [1, 2]
    assert kallm.surgery.retrofitted_blocks(model) == [1, 2]
    after = model.state_dict()
    assert {k: v.shape for k, v in after.items()} == {k: v.shape for k, v in before.items()}
    prefixes = feedforward_prefixes(model_type, [1, 2])
    restarted = [k for k in before if k.startswith(prefixes) and k.endswith("weight")]
    assert restarted
    for key in before:
        if key.startswith(prefixes):
            if key.endswith("weight"):
                assert not torch.equal(before[key], after[key]), key
                assert abs(after[key].std().item() - 0.02) < 0.005, key
            else:
                assert torch.count_nonzero(after[key]) == 0, key
        else:
            assert torch.equal(before[key], after[key]), key
    assert torch.isfinite(model(token_ids()).logits).all()


def _greedy_without_cache(model, prompt, steps):
    sequence, step_logits = prompt, []
    for _ in range(steps):
        logits = model(sequence, use_cache=False).logits[:, -1]
        step_logits.append(logits)
        sequence = torch.cat([sequence, logits.argmax(-1, keepdim=True)], dim=-1)
    return sequence, step_logits


@pytest.mark.parametrize("model_type", FAMILIES)
def test_generate_with_cache_equals_full_forward(model_type):
    model = kallm.retrofit(tiny_model(model_type), last_n=2)
    model.generation_config.eos_token_id = None  # always run all steps
    prompt = token_ids(batch=1, length=5)

    with torch.no_grad():
        out = model.generate(
            prompt, max_new_tokens=4, do_sample=False, use_cache=True, pad_token_id=0,
            return_dict_in_generate=True, output_logits=True,
        )
        expected, expected_logits = _greedy_without_cache(model, prompt, 4)

    assert torch.equal(out.sequences, expected)
    for cached, full in zip(out.logits, expected_logits):
        torch.testing.assert_close(cached, full, rtol=1e-4, atol=1e-5)


def _training_step(model, ids, seed):
    torch.manual_seed(seed)  # same dropout masks with and without checkpointing
    model.zero_grad()
    loss = model(ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("model_type", FAMILIES)
def test_gradient_checkpointing(model_type):
    model = kallm.retrofit(tiny_model(model_type), last_n=2).train()
    kan = next(m for m in model.modules() if isinstance(m, KANFeedForward))
    calls = []
    # a pre-hook: the recompute stops early, right after the last tensor the backward needs
    kan.register_forward_pre_hook(lambda *_: calls.append(1))
    ids = token_ids()

    plain_loss, plain_grads = _training_step(model, ids, seed=3)
    assert len(calls) == 1
    with warnings.catch_warnings():  # newer transformers call it activation checkpointing; the old name still works
        warnings.simplefilter("ignore", FutureWarning)
        model.gradient_checkpointing_enable()
    assert any(getattr(module, "gradient_checkpointing", False) for module in model.modules())
    checkpointed_loss, checkpointed_grads = _training_step(model, ids, seed=3)

    assert len(calls) == 3, "checkpointing recomputes the block in the backward pass"
    torch.testing.assert_close(checkpointed_loss, plain_loss)
    kan_names = {n for n, p in model.named_parameters() if any(p is q for q in kan.parameters())}
    assert kan_names <= checkpointed_grads.keys()
    assert checkpointed_grads.keys() == plain_grads.keys()
    for name, grad in plain_grads.items():
        torch.testing.assert_close(checkpointed_grads[name], grad, rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------------------------ options


def test_last_n_and_layers_select_blocks():
    assert kallm.retrofit(tiny_model("llama"), last_n=1).config.kan_config["blocks"] == [2]
    assert kallm.retrofit(tiny_model("llama"), last_n=3).config.kan_config["blocks"] == [0, 1, 2]
    # explicit layers win over last_n; negative indices count from the end
    assert kallm.retrofit(tiny_model("llama"), last_n=1, layers=[-1, 0]).config.kan_config["blocks"] == [0, 2]
    assert kallm.retrofit(tiny_model("llama"), layers=(1,)).config.kan_config["blocks"] == [1]


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"last_n": 0}, ValueError, "last_n must be an integer between 1 and 3"),
        ({"last_n": 4}, ValueError, "last_n must be an integer between 1 and 3"),
        ({"last_n": True}, ValueError, "last_n must be an integer"),
        ({"last_n": None}, ValueError, "last_n must be an integer"),
        ({"layers": [3]}, ValueError, "block index 3 is out of range for a model with 3 blocks"),
        ({"layers": [-4]}, ValueError, "block index -4 is out of range"),
        ({"layers": [1.0]}, TypeError, "block indices must be integers, got 1.0"),
        ({"layers": [True]}, TypeError, "block indices must be integers, got True"),
        ({"layers": [2, -1]}, ValueError, "blocks lists a block twice"),
        ({"layers": 2}, TypeError, "blocks must be a list of block indices"),
        ({"layers": []}, ValueError, "no decoder block selected"),
        ({"kind": "mlp"}, ValueError, "unknown kind 'mlp'; valid choices: kan, linear"),
        ({"basis": "chebyshev"}, ValueError, "unknown basis 'chebyshev'"),
        ({"degree": 0}, ValueError, "degree must be an integer >= 1"),
        ({"intermediate_size": 0}, ValueError, "intermediate_size must be a positive integer"),
        ({"alpha": 0.5}, ValueError, "basis 'cheby2' does not take options ['alpha']"),
        ({"input_map": "relu"}, ValueError, "unknown input_map 'relu'; valid choices: affine, tanh"),
        ({"width": torch.tensor(1.0), "basis": "rbf"}, TypeError, "layer options must be plain JSON values"),
        ({"dtype": torch.float16}, ValueError, "retrofit does not take ['dtype']: KAN feedforwards get the device"),
        ({"device": "cpu"}, ValueError, "retrofit does not take ['device']"),
        ({"filter_fn": lambda module, name: False}, ValueError, "no decoder block selected"),
    ],
)
def test_bad_arguments_are_refused_without_touching_the_model(kwargs, error, message):
    model = tiny_model("llama")
    before = snapshot(model)
    with pytest.raises(error, match=re.escape(message)):
        kallm.retrofit(model, **{"last_n": 2, **kwargs})
    assert_unchanged(model, before)


def test_default_intermediate_size_halves_the_feedforward_parameters():
    model = kallm.retrofit(tiny_model("llama"), last_n=1)
    kan_config = model.config.kan_config
    size = kan_config["intermediate_size"]
    replaced = 3 * 32 * 64  # gate, up, down projections of the tiny Llama
    assert KANFeedForward.count_parameters(32, size) <= replaced // 2 < KANFeedForward.count_parameters(32, size + 1)
    kan = model.model.layers[2].mlp
    assert kan.intermediate_size == size
    assert sum(p.numel() for p in kan.parameters()) == KANFeedForward.count_parameters(32, size)


def test_intermediate_size_override():
    model = kallm.retrofit(tiny_model("llama"), last_n=2, intermediate_size=40)
    assert model.config.kan_config["intermediate_size"] == 40
    for index in (1, 2):
        kan = model.model.layers[index].mlp
        assert kan.intermediate_size == 40
        assert [tuple(layer.weight.shape) for layer in kan.layers] == [(40, 2 * 32), (32, 2 * 40)]


def test_filter_fn_sees_feedforward_and_name():
    seen = []

    def keep_middle(module, name):
        seen.append((type(module).__name__, name))
        return name == "model.layers.1.mlp"

    model = kallm.retrofit(tiny_model("llama"), last_n=3, filter_fn=keep_middle)
    assert seen == [("LlamaMLP", f"model.layers.{i}.mlp") for i in range(3)]
    assert model.config.kan_config["blocks"] == [1]

    opt_names = []
    kallm.retrofit(tiny_model("opt"), last_n=1, filter_fn=lambda module, name: opt_names.append(name) or True)
    assert opt_names == ["model.decoder.layers.2.fc1"]


@pytest.mark.parametrize(
    "options",
    [
        {"basis": "gegenbauer", "alpha": 0.5},
        {"basis": "cheby2", "input_map": "tanh"},
        {"basis": "cheby2+rbf", "degree": 3, "width": 0.5},
        {"basis": "cheby2>legendre"},
        {"basis": "bspline", "degree": 3, "grid_size": 4},
        {"basis": "rational", "denominator_degree": 2},
    ],
)
def test_layer_options_reach_every_kan_layer(options):
    model = kallm.retrofit(tiny_model("llama"), last_n=2, **options)
    kan_config = model.config.kan_config
    layer_options = {k: v for k, v in options.items() if k not in ("basis", "degree")}
    assert kan_config["basis"] == options["basis"]
    assert kan_config["degree"] == options.get("degree", 2)
    assert kan_config["input_map"] == options.get("input_map", "affine")
    assert kan_config["basis_options"] == {k: v for k, v in layer_options.items() if k != "input_map"}
    expected = KANFeedForward(32, kan_config["intermediate_size"], options["basis"], options.get("degree", 2),
                              **layer_options)
    for index in (1, 2):
        kan = model.model.layers[index].mlp
        assert [layer.extra_repr() for layer in kan.layers] == [layer.extra_repr() for layer in expected.layers]
    assert torch.isfinite(model(token_ids()).logits).all()


def test_tanh_input_map_has_no_input_parameters():
    model = kallm.retrofit(tiny_model("llama"), last_n=1, input_map="tanh")
    assert all(layer.input_scale is None for layer in model.model.layers[2].mlp.layers)


def test_sequential_basis_uses_one_basis_per_stage():
    model = kallm.retrofit(tiny_model("llama"), last_n=1, basis="cheby2>legendre")
    first, second = model.model.layers[2].mlp.layers
    assert first.basis.name == "cheby2" and second.basis.name == "legendre"


# ------------------------------------------------------------------------------------ extending and refusing


def test_extending_a_retrofitted_model_keeps_existing_blocks():
    model = kallm.retrofit(tiny_model("llama"), layers=[2], intermediate_size=30)
    kept = model.model.layers[2].mlp
    kept_weights = {n: p.clone() for n, p in kept.named_parameters()}
    kan_class = type(model)

    kallm.retrofit(model, layers=[0])

    assert type(model) is kan_class
    assert model.config.kan_config["blocks"] == [0, 2]
    assert model.config.kan_config["intermediate_size"] == 30  # inherited, so the blocks stay alike
    assert model.model.layers[2].mlp is kept
    for name, param in kept.named_parameters():
        assert torch.equal(param, kept_weights[name])
    assert isinstance(model.model.layers[0].mlp, KANFeedForward)
    assert model.model.layers[0].mlp.intermediate_size == 30
    assert not isinstance(model.model.layers[1].mlp, KANFeedForward)
    assert torch.isfinite(model(token_ids()).logits).all()


@pytest.mark.parametrize(
    ("second_call", "message"),
    [
        ({"layers": [1, 2]}, "blocks [2] are already KAN feedforwards (retrofitted: [2]); choose other blocks"),
        ({"layers": [0], "degree": 3}, "already retrofitted with other KAN settings (degree: 2 -> 3)"),
        ({"layers": [0], "basis": "legendre"}, "basis: 'cheby2' -> 'legendre'"),
        ({"layers": [0], "intermediate_size": 12}, "intermediate_size: 22 -> 12"),
        ({"layers": [0], "input_map": "tanh"}, "input_map: 'affine' -> 'tanh'"),
        ({"layers": [0], "kind": "linear"}, "already has KAN feedforwards in blocks [2]"),
    ],
)
def test_inconsistent_extension_is_refused_without_half_state(second_call, message):
    model = kallm.retrofit(tiny_model("llama"), layers=[2])
    before = snapshot(model)
    with pytest.raises(ValueError, match=re.escape(message)):
        kallm.retrofit(model, **second_call)
    assert_unchanged(model, before)


def test_linear_restart_refuses_mixing_arms_and_overlaps():
    model = kallm.retrofit(tiny_model("llama"), layers=[2], kind="linear")
    before = snapshot(model)
    with pytest.raises(ValueError, match=re.escape("blocks [2] of this model were linear-restarted")):
        kallm.retrofit(model, layers=[0])
    assert_unchanged(model, before)
    with pytest.raises(ValueError, match=re.escape("blocks [2] were already linear-restarted")):
        kallm.retrofit(model, layers=[2], kind="linear")
    assert_unchanged(model, before)

    kallm.retrofit(model, layers=[0], kind="linear")
    assert kallm.surgery.retrofitted_layers(model) == [0, 2]


@pytest.mark.parametrize("old, new", [
    ("kallm.surgery.ArchitectureAdapter", "kallm.surgery.architectures.Architecture"),
    ("kallm.surgery.ADAPTERS", "kallm.surgery.architectures.ARCHITECTURES"),
    ("kallm.surgery.architectures.ArchitectureAdapter", "kallm.surgery.architectures.Architecture"),
    ("kallm.surgery.architectures.ADAPTERS", "kallm.surgery.architectures.ARCHITECTURES"),
    ("kallm.surgery.architectures.adapter_for", "kallm.surgery.architectures.architecture_for"),
    ("kallm.surgery.architectures.ADDING_AN_ADAPTER_DOC", "kallm.surgery.architectures.ADDING_AN_ARCHITECTURE_DOC"),
    ("kallm.surgery.lora_config", "kallm.finetune.lora_config"),  # moved, same name
])
def test_old_names_still_import_for_one_release_with_a_warning_naming_the_new_one(old, new):
    old_module, _, old_name = old.rpartition(".")
    new_module, _, new_name = new.rpartition(".")
    with pytest.warns(FutureWarning, match=rf"^{re.escape(old)} is now {re.escape(new)}; the old path is kept") as seen:
        value = getattr(importlib.import_module(old_module), old_name)
    assert value is getattr(importlib.import_module(new_module), new_name)
    assert seen[0].filename == __file__  # the warning points at the code that uses the old name
    with pytest.raises(AttributeError, match=rf"module '{re.escape(old_module)}' has no attribute 'never_defined'"):
        importlib.import_module(old_module).never_defined  # noqa: B018 (the access is the test)


def test_an_old_name_imports_with_from_import_too():
    with pytest.warns(FutureWarning, match="adapter_for is now kallm.surgery.architectures.architecture_for"):
        from kallm.surgery.architectures import adapter_for
    assert adapter_for("llama") is ARCHITECTURES["llama"]


def test_unsupported_architecture_names_supported_ones_and_the_doc():
    config = transformers.BloomConfig(vocab_size=64, hidden_size=16, n_layer=2, n_head=2)
    model = transformers.AutoModelForCausalLM.from_config(config)
    before = snapshot(model)
    with pytest.raises(ValueError) as info:
        kallm.retrofit(model)
    message = str(info.value)
    assert "'bloom'" in message
    for model_type in FAMILIES:
        assert model_type in message
    assert "docs/adding-an-architecture.md" in message
    assert (REPO / "docs" / "adding-an-architecture.md").is_file()
    assert_unchanged(model, before)
    assert sorted(kallm.supported_model_types()) == FAMILIES


def test_retrofit_needs_a_causal_lm():
    with pytest.raises(TypeError, match="retrofit needs a transformers causal LM, got Linear"):
        kallm.retrofit(nn.Linear(4, 4))


def test_retrofit_keeps_dtype_of_the_model():
    model = tiny_model("qwen2").to(torch.bfloat16)
    kallm.retrofit(model, last_n=1)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert torch.isfinite(model(token_ids()).logits.float()).all()


# ------------------------------------------------------------------------------------ trainable policies


def _trainable_names(model):
    return {name for name, param in model.named_parameters() if param.requires_grad}


@pytest.mark.parametrize("kind", ["kan", "linear"])
def test_trainable_policies_pick_the_right_parameters(kind):
    model = kallm.retrofit(tiny_model("llama"), last_n=1, kind=kind)
    all_names = {name for name, _ in model.named_parameters()}

    count = kallm.set_trainable(model, "retrofitted")
    assert _trainable_names(model) == {n for n in all_names if n.startswith("model.layers.2.mlp.")}
    assert count == sum(p.numel() for p in model.model.layers[2].mlp.parameters())

    count = kallm.set_trainable(model, "tail")
    assert _trainable_names(model) == {n for n in all_names if n.startswith("model.layers.2.")}
    assert count == sum(p.numel() for p in model.model.layers[2].parameters())

    count = kallm.set_trainable(model, "tail+embeddings")
    assert _trainable_names(model) == {
        n for n in all_names if n.startswith("model.layers.2.") or n in ("model.embed_tokens.weight", "model.norm.weight")
    }
    assert model.lm_head.weight.requires_grad  # tied with the embeddings

    count = kallm.set_trainable(model, "all")
    assert _trainable_names(model) == all_names
    assert count == sum(p.numel() for p in model.parameters())


def test_trainable_policies_follow_each_architecture():
    opt = kallm.retrofit(tiny_model("opt"), last_n=1, kind="linear")
    kallm.set_trainable(opt, "retrofitted")
    assert _trainable_names(opt) == {f"model.decoder.layers.2.{m}.{p}" for m in ("fc1", "fc2") for p in ("weight", "bias")}
    gpt2 = kallm.retrofit(tiny_model("gpt2"), last_n=1)
    kallm.set_trainable(gpt2, "tail+embeddings")
    names = _trainable_names(gpt2)
    assert {"transformer.ln_f.weight", "transformer.ln_f.bias", "transformer.wte.weight"} <= names
    assert "transformer.wpe.weight" not in names and not any(n.startswith("transformer.h.1.") for n in names)


def test_set_trainable_errors():
    model = kallm.retrofit(tiny_model("llama"), last_n=1)
    with pytest.raises(ValueError, match=re.escape("unknown trainable policy 'head'; valid choices: retrofitted, "
                                                  "functions, tail, tail+embeddings, all")):
        kallm.set_trainable(model, "head")
    plain = tiny_model("llama")
    with pytest.raises(ValueError, match="needs a retrofitted model; call kallm.retrofit first"):
        kallm.set_trainable(plain, "tail")
    assert kallm.set_trainable(plain, "all") == sum(p.numel() for p in plain.parameters())


def test_parameter_groups_split_the_trainable_parameters_by_role_at_scaled_learning_rates():
    model = kallm.retrofit(tiny_model("llama"), last_n=1, basis="rational", base="linear", form="gated")
    kallm.set_trainable(model, "tail")
    groups = kallm.parameter_groups(model, 1e-3, {"base": 0.1, "coefficients": 2.0})
    by_role = {group["role"]: group for group in groups}
    assert set(by_role) == {"coefficients", "base", "bias", "input_maps", "basis", "other"}
    names = {id(p): name for name, p in model.named_parameters()}
    role_names = {role: {names[id(p)] for p in group["params"]} for role, group in by_role.items()}
    assert role_names["base"] == {f"model.layers.2.mlp.{part}.base_weight" for part in ("gate", "layers.0", "layers.1")}
    assert "model.layers.2.mlp.gate.weight" in role_names["coefficients"]
    assert "model.layers.2.mlp.layers.1.input_shift" in role_names["input_maps"]
    assert "model.layers.2.mlp.gate.basis_parameters.0" in role_names["basis"]
    assert "model.layers.2.self_attn.q_proj.weight" in role_names["other"]
    assert (by_role["base"]["lr"], by_role["coefficients"]["lr"], by_role["other"]["lr"]) == (1e-4, 2e-3, 1e-3)
    # every trainable parameter once, frozen ones never
    listed = [id(p) for group in groups for p in group["params"]]
    assert sorted(listed) == sorted(id(p) for p in model.parameters() if p.requires_grad)
    torch.optim.AdamW(groups)  # torch takes them as they are
    glu = kallm.retrofit(tiny_model("llama"), last_n=1, form="glu")
    glu_roles = {g["role"] for g in kallm.parameter_groups(glu, 1.0)}
    assert {"coefficients", "input_maps", "other"} <= glu_roles


@pytest.mark.parametrize("scales, message", [
    ({"embeddings": 0.1}, "unknown parameter roles ['embeddings'] in learning rate scales; valid roles: coefficients, "
                          "base, bias, input_maps, basis, other"),
    ({"base": -1.0}, "learning rate scales must be finite numbers >= 0"),
    ({"base": "slow"}, "learning rate scales must be finite numbers >= 0"),
    ({"base": float("nan")}, "learning rate scales must be finite numbers >= 0"),
])
def test_parameter_groups_refuse_unknown_roles_and_bad_scales(scales, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        kallm.parameter_groups(tiny_model("llama"), 1e-3, scales)


def test_summary_returns_and_prints_the_table(capsys):
    model = kallm.retrofit(tiny_model("llama"), last_n=2)
    trainable = kallm.set_trainable(model, "retrofitted")
    result = kallm.summary(model)

    kan_total = sum(p.numel() for m in model.modules() if isinstance(m, KANFeedForward) for p in m.parameters())
    assert result["model"] == "KALlamaForCausalLM"
    assert result["total"] == sum(p.numel() for p in model.parameters())
    assert result["trainable"] == trainable == kan_total
    assert result["kan"] == kan_total
    assert [row["feedforward"] for row in result["blocks"]] == ["original", "kan", "kan"]
    for row, block in zip(result["blocks"], model.model.layers):
        assert row["parameters"] == sum(p.numel() for p in block.parameters())
    assert result["blocks"][0]["trainable"] == 0

    printed = capsys.readouterr().out
    assert f"KALlamaForCausalLM: {result['total']:,} parameters, {trainable:,} trainable" in printed
    assert "| block | feedforward | parameters | trainable |" in printed
    assert f"| 1 | kan | {result['blocks'][1]['parameters']:,} | {result['blocks'][1]['trainable']:,} |" in printed

    kallm.summary(model, print_table=False)
    assert capsys.readouterr().out == ""
    restarted = kallm.summary(kallm.retrofit(tiny_model("llama"), last_n=1, kind="linear"), print_table=False)
    assert [row["feedforward"] for row in restarted["blocks"]] == ["original", "original", "linear restart"]
    assert restarted["kan"] == 0


def test_a_saved_linear_restart_still_knows_its_restarted_blocks(tmp_path):
    model = kallm.retrofit(tiny_model("llama"), layers=[1], kind="linear")
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert type(reloaded).__name__ == "LlamaForCausalLM"
    assert reloaded.config.kan_config == model.config.kan_config and reloaded.config.kan_config["blocks"] == [1]
    rows = kallm.summary(reloaded, print_table=False)["blocks"]
    assert [row["feedforward"] for row in rows] == ["original", "linear restart", "original"]
    kallm.set_trainable(reloaded, "retrofitted")
    trainable = {name for name, p in reloaded.named_parameters() if p.requires_grad}
    assert trainable and all(name.startswith("model.layers.1.mlp.") for name in trainable)
    with pytest.raises(ValueError, match=re.escape("blocks [1] were already linear-restarted")):
        kallm.retrofit(reloaded, layers=[1], kind="linear")


# ------------------------------------------------------------------------------------ research counts


def smollm2_shaped_model():
    """SmolLM2-135M's exact shape on the meta device: counts do not depend on weight values
    (tests/test_real_model.py checks them on the real weights)."""
    config = transformers.LlamaConfig(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
        num_key_value_heads=3, tie_word_embeddings=True, max_position_embeddings=2048,
    )
    with torch.device("meta"):
        return transformers.LlamaForCausalLM(config)


# Per block of SmolLM2-135M: attention 576 * (576 + 192 + 192 + 576), MLP 3 * 576 * 1536, two norms.
ATTENTION, MLP, NORMS = 884_736, 2_654_208, 1_152
EMBEDDINGS, FINAL_NORM, TOTAL = 49_152 * 576, 576, 134_515_008
# KAN feedforward at the default size 574: 2 * 576 * 574 * 2 coefficients, biases, affine input maps.
KAN_FEEDFORWARD = 2 * 576 * 574 * 2 + (574 + 576) + 2 * (576 + 574)


def test_research_parameter_counts_of_smollm2_shape():
    base = smollm2_shaped_model()
    assert sum(p.numel() for p in base.parameters()) == TOTAL
    linear = kallm.retrofit(copy.deepcopy(base), last_n=5, kind="linear")
    glu = kallm.retrofit(copy.deepcopy(base), last_n=5, form="glu")
    kan = kallm.retrofit(base, last_n=5)
    assert {p.device.type for p in kan.parameters()} == {"meta"}
    assert kan.config.kan_config["blocks"] == [25, 26, 27, 28, 29]
    assert kan.config.kan_config["intermediate_size"] == 574
    assert KAN_FEEDFORWARD == 1_325_946

    expected_linear = {
        "retrofitted": 5 * MLP,
        "tail": 5 * (ATTENTION + MLP + NORMS),
        "tail+embeddings": 5 * (ATTENTION + MLP + NORMS) + EMBEDDINGS + FINAL_NORM,
        "all": TOTAL,
    }
    expected_kan = {
        "retrofitted": 5 * KAN_FEEDFORWARD,
        "tail": 5 * (ATTENTION + KAN_FEEDFORWARD + NORMS),
        "tail+embeddings": 5 * (ATTENTION + KAN_FEEDFORWARD + NORMS) + EMBEDDINGS + FINAL_NORM,
        "all": TOTAL - 5 * MLP + 5 * KAN_FEEDFORWARD,
    }
    assert set(kallm.surgery.POLICIES) == {*expected_kan, "functions"}
    for policy in expected_kan:
        assert kallm.set_trainable(linear, policy) == expected_linear[policy], policy
        assert kallm.set_trainable(kan, policy) == expected_kan[policy], policy
    # form="glu": gate and up functions per channel, each 2 coefficients, a bias and an input scale
    assert kallm.set_trainable(glu, "functions") == 5 * 2 * 1536 * 4 == 61_440
    assert kallm.set_trainable(glu, "retrofitted") == 5 * MLP + 61_440
    assert kallm.summary(glu, print_table=False)["function_overhead"] == pytest.approx(61_440 / (5 * MLP))

    # the research setup: linear restart vs KAN, trainable = last 5 blocks + embeddings + final norm
    assert kallm.set_trainable(linear, "tail+embeddings") == 46_012_608
    research_kan = kallm.set_trainable(kan, "tail+embeddings")
    assert research_kan == 39_371_298
    assert 38_500_000 <= research_kan <= 40_000_000

    result = kallm.summary(kan, print_table=False)
    assert result["trainable"] == research_kan
    assert result["kan"] == 5 * KAN_FEEDFORWARD
    assert result["total"] == expected_kan["all"]
    assert [row["feedforward"] for row in result["blocks"]] == ["original"] * 25 + ["kan"] * 5


def test_retrofit_of_a_kan_class_without_kan_blocks_yet():
    values = TINY_CONFIGS["llama"]().to_dict()
    values = {k: v for k, v in values.items() if k not in ("model_type", "architectures")}
    config = kallm.core.configuration_kallm.KALlamaConfig(**values, kan_config=None)
    model = transformers.AutoModelForCausalLM.from_config(config)
    assert not any(isinstance(m, KANFeedForward) for m in model.modules())
    kallm.retrofit(model, last_n=1)
    assert type(model).__name__ == "KALlamaForCausalLM"
    assert model.config.kan_config["blocks"] == [2] and model.config.kan_config["base_model_type"] == "llama"
    assert isinstance(model.model.layers[2].mlp, KANFeedForward)


# ------------------------------------------------------------------------------------ what retrofit refuses

# Loads a saved retrofitted model with the checkpoint's own code BEFORE kallm is imported, so that
# its classes are not kallm's, then uses kallm on it and prints what it saw as JSON.
REMOTE_CODE_SCRIPT = textwrap.dedent("""
    import json, sys
    import torch
    from transformers import AutoModelForCausalLM

    folder, out = sys.argv[1:3]
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
    import kallm
    from kallm.core.layers import KANFeedForward

    result = {"foreign_class": not isinstance(model.model.layers[2].mlp, KANFeedForward)}
    trained = {name: p.clone() for name, p in model.model.layers[2].mlp.named_parameters()}
    table = kallm.summary(model, print_table=False)
    result["labels"] = [row["feedforward"] for row in table["blocks"]]
    result["kan"] = table["kan"]
    result["trainable"] = kallm.set_trainable(model, "retrofitted")
    try:
        kallm.retrofit(model, last_n=3)
        result["last_n=3"] = "accepted"
    except ValueError as error:
        result["last_n=3"] = str(error)
    kallm.retrofit(model, layers=[0])
    result["layers"] = model.config.kan_config["blocks"]
    ids = torch.arange(3, 11)[None]
    with torch.no_grad():
        logits = model(ids).logits
    model.save_pretrained(out)
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    with torch.no_grad():
        result["reloaded_logits_equal"] = torch.equal(reloaded(ids).logits, logits)
    result["trained_block_kept"] = all(
        torch.equal(p, trained[name]) for name, p in reloaded.model.layers[2].mlp.named_parameters()
    )
    print(json.dumps(result))
""")


def test_a_model_loaded_with_its_own_code_before_kallm_is_recognised(tmp_path):
    model = kallm.retrofit(tiny_model("llama"), layers=[2])
    model.save_pretrained(tmp_path / "trained")
    kan_parameters = sum(p.numel() for p in model.model.layers[2].mlp.parameters())
    # a fresh interpreter, and a modules cache of its own for the checkpoint's code
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_MODULES_CACHE": str(tmp_path / "hf" / "modules"),
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(
        [sys.executable, "-c", REMOTE_CODE_SCRIPT, str(tmp_path / "trained"), str(tmp_path / "extended")],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["foreign_class"]
    assert result["labels"] == ["original", "original", "kan"]
    assert result["kan"] == result["trainable"] == kan_parameters
    assert "blocks [2] are already KAN feedforwards" in result["last_n=3"]
    assert result["layers"] == [0, 2]
    assert result["reloaded_logits_equal"] and result["trained_block_kept"]


def test_a_config_that_disagrees_with_the_blocks_is_refused():
    model = kallm.retrofit(tiny_model("llama"), layers=[2])
    model.config.kan_config["blocks"] = [1]
    before = snapshot(model)
    with pytest.raises(ValueError, match=re.escape("lists KAN feedforwards in blocks [1], but blocks [2] hold them")):
        kallm.retrofit(model, layers=[0])
    assert_unchanged(model, before)


def _offloaded_tiny_llama(folder):
    tiny_model("llama").save_pretrained(folder / "base")
    device_map = {name: "cpu" for name in ("model.embed_tokens", "model.layers.0", "model.layers.1", "model.norm",
                                           "model.rotary_emb", "lm_head")}
    return AutoModelForCausalLM.from_pretrained(
        folder / "base", device_map={**device_map, "model.layers.2": "disk"}, offload_folder=str(folder / "offload")
    )


@pytest.mark.parametrize("kind", ["kan", "linear"])
def test_offloaded_weights_are_refused(tmp_path, kind):
    model = _offloaded_tiny_llama(tmp_path)
    mlp, config = model.model.layers[2].mlp, copy.deepcopy(model.config.to_dict())
    with pytest.raises(ValueError, match="on the meta device") as info:
        kallm.retrofit(model, last_n=1, kind=kind)
    message = str(info.value)
    assert message.startswith("9 of this model's tensors are on the meta device (model.layers.2.self_attn.q_proj.weight")
    assert "decoder blocks [2]" in message
    assert "without device_map offload" in message
    assert type(model) is transformers.LlamaForCausalLM and model.config.to_dict() == config
    assert model.model.layers[2].mlp is mlp
    assert torch.isfinite(model(token_ids()).logits).all()


def test_a_shape_only_model_is_accepted_but_not_fitted():
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(TINY_CONFIGS["llama"]())
    before = snapshot(model)
    with pytest.raises(ValueError, match="all its weights are on the meta device"):
        kallm.retrofit(model, last_n=1, init="fit", calibration=token_ids(length=64))
    assert_unchanged(model, before)
    kallm.retrofit(model, last_n=1)
    assert {p.device.type for p in model.parameters()} == {"meta"}


class Linear8bitLt(nn.Linear):
    """Stands for bitsandbytes' 8-bit layer, which cannot run on CPU."""


def _int8_weight(model):
    proj = model.model.layers[2].mlp.down_proj
    proj.weight = nn.Parameter(torch.zeros_like(proj.weight, dtype=torch.int8), requires_grad=False)


def _bitsandbytes_layer(model):
    model.model.layers[2].mlp.up_proj = Linear8bitLt(32, 64, bias=False)


def _quantization_config(model):
    model.config.quantization_config = {"quant_method": "bitsandbytes", "load_in_8bit": True}


def _quantizer(model):
    model.hf_quantizer = object()


class GgufLinear(nn.Linear):
    """Stands for the layer in which transformers keeps a GGUF file's weights packed."""


def _gguf_packed(model):
    model.config.quantization_config = {"quant_method": "gguf", "dequantize": False}
    model.model.layers[2].mlp.up_proj = GgufLinear(32, 64, bias=False)


@pytest.mark.parametrize(
    ("quantize", "message"),
    [
        (_int8_weight, "model.layers.2.mlp.down_proj.weight (torch.int8) hold non-float (quantized) weights"),
        (_bitsandbytes_layer, "model.layers.2.mlp.up_proj is a quantized layer (Linear8bitLt)"),
        (_quantization_config, "this model is quantized (quantization_config, method 'bitsandbytes')"),
        (_quantizer, "this model is quantized"),
        (_gguf_packed, "this model is quantized (quantization_config, method 'gguf')"),
    ],
)
@pytest.mark.parametrize("kind", ["kan", "linear"])
def test_quantized_weights_are_refused(quantize, message, kind):
    model = tiny_model("llama")
    quantize(model)
    before = snapshot(model)
    with pytest.raises(ValueError, match=re.escape(message)) as info:
        kallm.retrofit(model, last_n=1, kind=kind)
    assert "load the model unquantized" in str(info.value) and "model.dequantize()" in str(info.value)
    assert_unchanged(model, before)
    assert getattr(model, "hf_quantizer", None) is not None or "quantization_config" not in before["config"] or (
        model.config.quantization_config == before["config"]["quantization_config"]
    )


@pytest.mark.parametrize("kind", ["kan", "linear"])
def test_a_gguf_load_unpacked_to_float_is_retrofitted_and_loses_its_quantization_tag(kind, tmp_path):
    """transformers tags every GGUF load as quantized, also one whose weights it unpacked to float."""
    model = tiny_model("llama")
    model.config.quantization_config = GgufConfig(dequantize=False)  # as on CPU: the flag stays, the weights are float
    kallm.retrofit(model, last_n=1, kind=kind)
    assert getattr(model.config, "quantization_config", None) is None
    model.save_pretrained(tmp_path)
    assert "quantization_config" not in json.loads((tmp_path / "config.json").read_text())


def test_only_the_blocks_to_retrofit_must_hold_float_weights():
    model = tiny_model("llama")
    proj = model.model.layers[0].mlp.down_proj
    proj.weight = nn.Parameter(torch.zeros_like(proj.weight, dtype=torch.int8), requires_grad=False)
    kallm.retrofit(model, layers=[2])
    assert model.config.kan_config["blocks"] == [2]


def test_kan_layers_take_the_models_compute_dtype():
    model = kallm.retrofit(tiny_model("llama").to(torch.bfloat16), layers=[2])
    # an MLP whose first tensor is stored as integers, and one with no tensors at all
    model.model.layers[0].mlp.gate_proj.weight = nn.Parameter(
        torch.zeros(64, 32, dtype=torch.int8), requires_grad=False
    )
    model.model.layers[1].mlp = nn.SiLU()
    install_kan_feedforwards(model, model.config.kan_config, blocks=[0, 1])
    for index in (0, 1):
        assert {p.dtype for p in model.model.layers[index].mlp.parameters()} == {torch.bfloat16}
    assert torch.isfinite(model(token_ids()).logits.float()).all()


def _peft_wrapped(model):
    peft = pytest.importorskip("peft")
    return peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))


def _kan_adapted(model):
    peft = pytest.importorskip("peft")
    return peft.get_peft_model(model, kallm.kan_adapter_config(model, "kan", r=2))


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: transformers.AutoModel.from_config(TINY_CONFIGS["llama"]()),
         "needs a causal LM or a sequence classifier (LlamaForCausalLM or LlamaForSequenceClassification for "
         "model_type 'llama'), got LlamaModel"),
        (lambda: transformers.AutoModel.from_config(TINY_CONFIGS["gpt2"]()), "got GPT2Model"),
        (lambda: transformers.AutoModelForTokenClassification.from_config(TINY_CONFIGS["llama"]()),
         "got LlamaForTokenClassification"),
    ],
)
def test_bare_models_are_refused_everywhere(build, message):
    model = build()
    before = snapshot(model)
    for action, call in [("retrofit", lambda: kallm.retrofit(model, last_n=1)),
                         ("set_trainable", lambda: kallm.set_trainable(model, "tail")),
                         ("summary", lambda: kallm.summary(model, print_table=False))]:
        with pytest.raises(TypeError, match=re.escape(message)) as info:
            call()
        assert str(info.value).startswith(action)
    assert_unchanged(model, before)


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: _peft_wrapped(tiny_model("llama")), "got a model with PEFT adapters (PeftModelForCausalLM)"),
        (lambda: _peft_wrapped(kallm.retrofit(tiny_model("llama"), layers=[2])), "merge_and_unload()"),
        (lambda: _peft_wrapped(kallm.retrofit(tiny_model("llama"), layers=[2])).get_base_model(),
         "got a model with PEFT adapters (model.layers.0.self_attn.q_proj (Linear))"),
        (lambda: _kan_adapted(kallm.retrofit(tiny_model("llama"), layers=[2])).get_base_model(),  # kallm's layers only
         "got a model with PEFT adapters (model.layers.2.mlp.layers.0 (KANAdapterLayer))"),
    ],
)
def test_retrofit_refuses_peft_models_and_set_trainable_and_summary_take_a_peft_model(build, message):
    model = build()
    before = snapshot(model)
    with pytest.raises(TypeError, match=re.escape(message)) as info:
        kallm.retrofit(model, last_n=1)
    assert str(info.value).startswith("retrofit")
    assert_unchanged(model, before)
    if isinstance(model, transformers.PreTrainedModel):  # adapters injected without the PeftModel around them
        with pytest.raises(TypeError, match=re.escape(message)):
            kallm.summary(model, print_table=False)
        return
    assert kallm.summary(model, print_table=False)["adapters"] == 3 * (2 * 32 + 32 * 2 + 2 * 32 + 16 * 2)  # q_proj and v_proj (16 outputs) at r=2
    assert kallm.set_trainable(model, "all") == kallm.summary(model, print_table=False)["total"]


@pytest.mark.parametrize(
    ("source", "recorded"),
    [
        ("HuggingFaceTB/SmolLM2-135M-Instruct", "HuggingFaceTB/SmolLM2-135M-Instruct"),
        ("smollm2-135m-instruct", "smollm2-135m-instruct"),
        ("/home/someone/private/SmolLM2-135M-Instruct.Q4_1.gguf", "SmolLM2-135M-Instruct.Q4_1.gguf"),
        ("", "llama"),
    ],
)
def test_base_model_is_a_public_name(source, recorded):
    model = tiny_model("llama")
    model.config._name_or_path = source
    assert kallm.retrofit(model, last_n=1).config.kan_config["base_model"] == recorded


def test_a_local_base_model_is_recorded_by_its_folder_name_only(tmp_path):
    tiny_model("llama").save_pretrained(tmp_path / "my-base")
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "my-base"))
    kallm.retrofit(model, last_n=1).save_pretrained(tmp_path / "kan")
    assert model.config.kan_config["base_model"] == "my-base"
    assert str(tmp_path) not in (tmp_path / "kan" / "config.json").read_text()


def test_count_parameters_counts_tied_weights_once_like_transformers():
    model = tiny_model("gpt2")
    assert model.lm_head.weight is model.transformer.wte.weight
    model.transformer.wte.requires_grad_(False)
    assert count_parameters(model) == model.num_parameters()
    assert count_parameters(model, trainable_only=True) == model.num_parameters(only_trainable=True)
    assert count_parameters(model) - count_parameters(model, trainable_only=True) == model.lm_head.weight.numel()
