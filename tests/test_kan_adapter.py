"""The KAN adapter (kallm.KANAdapterConfig), a PEFT method: starts as the base, trains, saves and loads like LoRA,
refuses what it cannot do."""

from __future__ import annotations

import json
from functools import partial

import pytest
import torch
from transformers import AutoModelForCausalLM

import kallm
from kallm.finetune.kan_adapter import KANAdapterLayer
from kallm.testing.adapters import check_adapter_refused_on_other_kan_blocks
from kallm.testing.compare import logits_of
from kallm.testing.models import tiny_model

peft = pytest.importorskip("peft")

TOKENS = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(0))


def _retrofitted(seed=0):
    return kallm.retrofit(tiny_model("llama", seed=seed), blocks=[1, 2]).eval()


def _trained_looking(model):
    """``model`` with its zero-initialised up-projections set to nonzero values, as after training."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "kan_adapter_up" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
    return model.eval()


def test_a_fresh_kan_adapter_on_linear_and_kan_layers_leaves_the_logits_unchanged():
    base = _retrofitted()
    reference = logits_of(base, TOKENS)
    config = kallm.kan_adapter_config(base, "all", r=4)
    assert config.peft_type == "KAN_ADAPTER" and config.task_type == "CAUSAL_LM"
    model = peft.get_peft_model(base, config).eval()
    wrapped = model.get_base_model().model
    assert isinstance(wrapped.layers[0].self_attn.q_proj, KANAdapterLayer)  # nn.Linear
    assert isinstance(wrapped.layers[1].mlp.layers[0], KANAdapterLayer)  # KANLinear
    kan = wrapped.layers[1].mlp.layers[0].kan_adapter_kan["default"]
    assert (kan.in_features, kan.out_features, kan.basis.name, kan.basis.degree) == (4, 4, "cheby2", 2)
    assert torch.equal(logits_of(model, TOKENS), reference)
    gpt2 = tiny_model("gpt2").eval()  # Conv1D projections
    expected = logits_of(gpt2, TOKENS)
    adapted = peft.get_peft_model(gpt2, kallm.kan_adapter_config(gpt2, "attention", r=4)).eval()
    assert torch.equal(logits_of(adapted, TOKENS), expected)


def test_training_lowers_the_loss_and_moves_only_the_adapters():
    model = peft.get_peft_model(_retrofitted(), kallm.kan_adapter_config(_retrofitted(), "all", r=4)).train()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert sum(p.numel() for p in trainable) == kallm.summary(model, print_table=False)["adapters"]
    optimizer = torch.optim.Adam(trainable, lr=1e-2)
    losses = []
    for _ in range(8):
        loss = model(TOKENS, labels=TOKENS).loss
        losses.append(loss.item())
        optimizer.zero_grad()
        loss.backward()
        assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
        optimizer.step()
    assert losses[-1] < losses[0] - 0.05
    changed = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    assert changed == {name for name, p in model.named_parameters() if p.requires_grad}
    assert all("kan_adapter_" in name for name in changed)
    assert any("kan_adapter_kan" in name and "mlp.layers" in name for name in changed)  # trains through KAN layers


def test_an_adapter_saves_and_reloads_logit_for_logit(tmp_path):
    _retrofitted().save_pretrained(tmp_path / "base")
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base").eval()
    model = _trained_looking(peft.get_peft_model(base, kallm.kan_adapter_config(base, "all", r=4, dropout=0.1)))
    expected = logits_of(model, TOKENS)
    assert not torch.allclose(expected, logits_of(_retrofitted(), TOKENS))
    model.save_pretrained(tmp_path / "adapter")
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "KAN_ADAPTER" and (saved["r"], saved["basis"], saved["degree"]) == (4, "cheby2", 2)
    fresh = lambda: AutoModelForCausalLM.from_pretrained(tmp_path / "base").eval()  # noqa: E731
    for loaded in (peft.PeftModel.from_pretrained(fresh(), tmp_path / "adapter"),
                   kallm.load_adapter(fresh(), tmp_path / "adapter"),
                   peft.AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter")):
        torch.testing.assert_close(logits_of(loaded.eval(), TOKENS), expected, rtol=0, atol=0)
        assert kallm.summary(loaded, print_table=False)["trainable"] == 0
    # transformers' own PEFT integration: the adapter folder given to AutoModelForCausalLM
    torch.testing.assert_close(logits_of(AutoModelForCausalLM.from_pretrained(tmp_path / "adapter").eval(), TOKENS),
                               expected,
                               rtol=0, atol=0)
    trainable = peft.PeftModel.from_pretrained(fresh(), tmp_path / "adapter", is_trainable=True)
    assert all("kan_adapter_" in name for name, p in trainable.named_parameters() if p.requires_grad)


def test_an_adapter_trained_on_other_kan_blocks_is_refused_naming_the_blocks_on_each_side(tmp_path):
    base = _retrofitted()  # KAN feedforwards in blocks 1 and 2
    model = _trained_looking(peft.get_peft_model(base, kallm.kan_adapter_config(base, "all", r=4)))
    model.save_pretrained(tmp_path)
    check_adapter_refused_on_other_kan_blocks(tmp_path, partial(logits_of, ids=TOKENS), logits_of(model, TOKENS))


def test_merging_is_refused_before_anything_changes_and_unload_gives_the_base_back():
    base = _retrofitted()
    reference = logits_of(base, TOKENS)
    model = _trained_looking(peft.get_peft_model(base, kallm.kan_adapter_config(base, "kan", r=4)))
    adapted = logits_of(model, TOKENS)
    for merge in (model.merge_and_unload, model.merge_adapter):
        with pytest.raises(ValueError, match="a KAN adapter cannot be merged into the model's weights: its KAN layer"):
            merge()
        assert torch.equal(logits_of(model, TOKENS), adapted)
    with model.disable_adapter():
        assert torch.equal(logits_of(model, TOKENS), reference)
    unloaded = model.unload()
    assert not any("kan_adapter" in name for name in unloaded.state_dict())
    assert torch.equal(logits_of(unloaded, TOKENS), reference)


def test_bad_targets_ranks_and_settings_are_refused_before_the_model_changes():
    model = _retrofitted()
    reference = logits_of(model, TOKENS)
    with pytest.raises(ValueError, match="unknown LoRA targets 'ffn'; valid choices: kan, attention, mlp, all"):
        kallm.kan_adapter_config(model, "ffn")
    with pytest.raises(ValueError, match="has no KAN layers to target"):
        kallm.kan_adapter_config(tiny_model("llama"), "kan")
    with pytest.raises(ValueError, match=r"rank r=20 is too large for 6 of the 16 targeted layers: .*k_proj allows "
                                         r"at most 16"):
        kallm.kan_adapter_config(model, "all", r=20)
    for settings, message in ((dict(r=0), "rank r must be a positive integer"),
                              (dict(alpha=0), "alpha must be > 0"),
                              (dict(dropout=1.0), r"dropout must be in \[0, 1\)"),
                              (dict(basis="splines"), "splines"),
                              (dict(degree=0), "degree")):
        with pytest.raises(ValueError, match=message):
            kallm.KANAdapterConfig(target_modules=["q_proj"], **settings)
    # configs built by hand are checked by get_peft_model before it replaces any layer
    for config, error, message in (
        (kallm.KANAdapterConfig(r=20, target_modules=["q_proj", "k_proj"]), ValueError, "allows at most 16"),
        (kallm.KANAdapterConfig(r=2, target_modules=["q_proj", "embed_tokens"]), TypeError,
         r"nn.Linear, Conv1D and KANLinear layers; 1 targeted module\(s\) are none of these: model.embed_tokens "
         r"\(Embedding\)"),
        (kallm.KANAdapterConfig(r=2, target_modules=["no_such_layer"]), ValueError, "no_such_layer"),
    ):
        with pytest.raises(error, match=message):
            peft.get_peft_model(model, config)
        assert not any(isinstance(m, KANAdapterLayer) for m in model.modules())
        assert torch.equal(logits_of(model, TOKENS), reference)


def test_dropout_acts_on_the_adapter_input_in_training_only():
    base = _retrofitted()
    model = _trained_looking(peft.get_peft_model(base, kallm.kan_adapter_config(base, "attention", r=4, dropout=0.5)))
    layer = model.get_base_model().model.layers[0].self_attn.q_proj
    x = torch.randn(2, 3, 32)
    with torch.no_grad():
        evaluated = layer(x)
        layer.train()
        assert not torch.allclose(layer(x), evaluated)
        layer.kan_adapter_dropout["default"].eval()
        torch.testing.assert_close(layer(x), evaluated)
