"""LoRA with PEFT on retrofitted models: target names, LoRA on KAN layers, merge, save and load."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import kallm
from kallm.finetune.lora import KANLoraLinear
from kallm.testing.adapters import check_adapter_refused_on_other_kan_blocks
from kallm.testing.compare import logits_of
from kallm.testing.models import tiny_model

peft = pytest.importorskip("peft")

TOKENS = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(0))
KAN_LAYERS = [f"model.layers.{b}.mlp.layers.{i}" for b in (1, 2) for i in (0, 1)]


def _retrofitted(seed=0):
    return kallm.retrofit(tiny_model("llama", seed=seed), layers=[1, 2])


def _with_adapter(which="kan", seed=0, base=None, **options):
    """A retrofitted tiny llama (or ``base``) with a LoRA adapter whose B matrices are nonzero (as after
    training)."""
    base = base if base is not None else _retrofitted(seed)
    model = peft.get_peft_model(base, kallm.lora_config(base, which, r=4, **options))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
    return model.eval()


def test_lora_targets_name_the_kan_layers_and_the_attention_projections():
    model = _retrofitted()
    attention = [f"model.layers.{b}.self_attn.{p}_proj" for b in range(3) for p in "qkvo"]
    assert kallm.lora_targets(model, "kan") == KAN_LAYERS
    assert kallm.lora_targets(model, "attention") == attention
    assert kallm.lora_targets(model) == KAN_LAYERS
    assert kallm.lora_config(model).target_modules == set(KAN_LAYERS)
    assert kallm.lora_targets(model, "all") == attention + KAN_LAYERS
    assert kallm.lora_targets(tiny_model("gpt2"), "attention") == [
        f"transformer.h.{b}.attn.{name}" for b in range(3) for name in ("c_attn", "c_proj")
    ]
    assert kallm.lora_targets(tiny_model("gpt_neox"), "attention")[:2] == [
        "gpt_neox.layers.0.attention.query_key_value", "gpt_neox.layers.0.attention.dense"
    ]
    assert kallm.lora_targets(tiny_model("opt"), "attention")[0] == "model.decoder.layers.0.self_attn.k_proj"


def test_lora_targets_refuses_unknown_choices_and_models_without_kan_layers():
    with pytest.raises(ValueError, match="unknown LoRA targets 'ffn'; valid choices: kan, attention, mlp, all"):
        kallm.lora_targets(_retrofitted(), "ffn")
    for which in ("kan", "all"):
        with pytest.raises(ValueError, match="has no KAN layers to target; retrofit it first"):
            kallm.lora_targets(tiny_model("llama"), which)


def test_once_kallm_is_imported_any_lora_config_takes_kan_layers():
    # without kallm, PEFT refuses KAN targets ("is not supported"): the fresh-process test below shows it
    config = peft.LoraConfig(r=2, target_modules=KAN_LAYERS[:1])
    wrapped = peft.get_peft_model(_retrofitted(), config)
    assert isinstance(wrapped.get_base_model().model.layers[1].mlp.layers[0], KANLoraLinear)
    registered = kallm.with_kan_lora(peft.LoraConfig(r=2, target_modules=KAN_LAYERS[:1]))
    assert registered._custom_modules == {kallm.KANLinear: KANLoraLinear}
    wrapped = peft.get_peft_model(_retrofitted(), registered)
    assert isinstance(wrapped.get_base_model().model.layers[1].mlp.layers[0], KANLoraLinear)


def test_auto_peft_model_and_auto_model_load_a_kan_adapter_from_its_folder(tmp_path):
    _retrofitted().save_pretrained(tmp_path / "base")
    model = _with_adapter("all", base=AutoModelForCausalLM.from_pretrained(tmp_path / "base").eval())
    model.save_pretrained(tmp_path / "adapter")
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"] == str(
        tmp_path / "base")
    loaded = peft.AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter").eval()
    assert isinstance(loaded.get_base_model().model.layers[2].mlp.layers[0], KANLoraLinear)
    torch.testing.assert_close(logits_of(loaded, TOKENS), logits_of(model, TOKENS), rtol=0, atol=0)
    # transformers' own PEFT integration: the adapter folder given to AutoModelForCausalLM
    torch.testing.assert_close(logits_of(AutoModelForCausalLM.from_pretrained(tmp_path / "adapter").eval(), TOKENS),
                               logits_of(model, TOKENS), rtol=0, atol=0)


def test_an_adapter_saved_without_a_task_type_loads_with_kallm_in_the_import_allowlist(tmp_path):
    _retrofitted().save_pretrained(tmp_path / "base")
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base").eval()
    model = peft.get_peft_model(base, peft.LoraConfig(r=2, target_modules=KAN_LAYERS, init_lora_weights=False))
    model.save_pretrained(tmp_path / "adapter")
    with pytest.raises(ValueError, match="'kallm.core.modeling_kallm' which is not in the import allowlist"):
        peft.AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter")
    loaded = peft.AutoPeftModel.from_pretrained(tmp_path / "adapter", import_allowlist=["kallm"]).eval()
    torch.testing.assert_close(logits_of(loaded, TOKENS), logits_of(model.eval(), TOKENS), rtol=0, atol=0)


def test_a_fresh_adapter_leaves_the_model_unchanged():
    reference = logits_of(_retrofitted(), TOKENS)
    model = peft.get_peft_model(_retrofitted(), kallm.lora_config(_retrofitted(), "all", r=4)).eval()
    torch.testing.assert_close(logits_of(model, TOKENS), reference, rtol=0, atol=0)


def test_the_kan_update_is_a_low_rank_change_of_the_coefficient_matrix():
    model = _with_adapter("kan")
    layer = model.get_base_model().model.layers[2].mlp.layers[0]
    base = layer.get_base_layer()
    assert layer.lora_A["default"].weight.shape == (4, base.weight.shape[1])  # K * in basis features
    assert layer.get_delta_weight("default").shape == base.weight.shape
    x = torch.randn(3, 5, base.in_features)
    with torch.no_grad():
        features = kallm.finetune.lora._features(base, x)
        expected = base(x) + layer.lora_B["default"](layer.lora_A["default"](features)) * layer.scaling["default"]
        torch.testing.assert_close(layer(x), expected)


@pytest.mark.parametrize("which", ["kan", "all"])
def test_merge_and_unload_gives_a_plain_kallm_model_with_the_same_logits(which):
    model = _with_adapter(which)
    adapted = logits_of(model, TOKENS)
    assert not torch.allclose(adapted, logits_of(_retrofitted(), TOKENS))
    merged = model.merge_and_unload()
    assert type(merged).__name__ == "KALlamaForCausalLM"
    assert type(merged.model.layers[2].mlp.layers[1]) is kallm.KANLinear
    # KAN layers merge bit for bit; PEFT's own Linear layers merge to float rounding
    tolerance = {"rtol": 0, "atol": 0} if which == "kan" else {}
    torch.testing.assert_close(logits_of(merged, TOKENS), adapted, **tolerance)


def test_unmerge_restores_the_adapter_and_the_base():
    model = _with_adapter("kan")
    adapted, base = logits_of(model, TOKENS), logits_of(_retrofitted(), TOKENS)
    model.merge_adapter()
    torch.testing.assert_close(logits_of(model, TOKENS), adapted, rtol=0, atol=0)
    model.unmerge_adapter()
    torch.testing.assert_close(logits_of(model, TOKENS), adapted)
    with model.disable_adapter():
        torch.testing.assert_close(logits_of(model, TOKENS), base)


def test_an_adapter_saves_and_loads_onto_a_fresh_base(tmp_path):
    model = _with_adapter("all")
    model.save_pretrained(tmp_path)
    loaded = kallm.load_adapter(_retrofitted(), tmp_path)
    torch.testing.assert_close(logits_of(loaded, TOKENS), logits_of(model, TOKENS), rtol=0, atol=0)
    assert kallm.summary(loaded, print_table=False)["trainable"] == 0


def test_an_adapter_trained_on_other_kan_blocks_is_refused_naming_the_blocks_on_each_side(tmp_path):
    model = _with_adapter("all")  # LoRA on the KAN layers of blocks 1 and 2, and on the attention
    model.save_pretrained(tmp_path)
    check_adapter_refused_on_other_kan_blocks(tmp_path, partial(logits_of, ids=TOKENS), logits_of(model, TOKENS))


def test_a_saved_base_and_adapter_reload_from_disk(tmp_path):
    _retrofitted().save_pretrained(tmp_path / "base")  # the base the adapter was trained on, saved before wrapping
    model = _with_adapter("kan")
    model.save_pretrained(tmp_path / "adapter")
    fresh = AutoModelForCausalLM.from_pretrained(tmp_path / "base").eval()
    torch.testing.assert_close(logits_of(fresh, TOKENS), logits_of(_retrofitted(), TOKENS), rtol=0, atol=0)
    loaded = kallm.load_adapter(fresh, tmp_path / "adapter")
    torch.testing.assert_close(logits_of(loaded, TOKENS), logits_of(model, TOKENS), rtol=0, atol=0)


def test_training_moves_only_the_adapters_and_trains_through_the_kan_layers():
    model = _with_adapter("kan").train()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    loss = model(TOKENS, labels=TOKENS).loss
    loss.backward()
    optimizer.step()
    changed = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    assert changed and all("lora_" in name for name in changed)
    assert any("lora_A" in name and "mlp.layers" in name for name in changed)


def test_with_lora_dropout_training_builds_the_features_once_for_both_paths():
    model = _with_adapter("kan", lora_dropout=0.5)
    layer = model.get_base_model().model.layers[1].mlp.layers[1]
    x = torch.randn(2, 4, layer.get_base_layer().in_features)
    with torch.no_grad():
        fused = layer(x)  # eval mode: dropout is off, the update joins the coefficients
        layer.train()
        layer.lora_dropout["default"].eval()  # the dropout path, with dropout itself switched off
        torch.testing.assert_close(layer(x), fused)
        layer.lora_dropout["default"].train()
        assert not torch.allclose(layer(x), fused)


def test_a_rank_above_what_a_layer_allows_is_refused_before_anything_is_wrapped():
    model = _retrofitted()
    with pytest.raises(ValueError, match=r"r=20 is too large for 6 of the 16 targeted layers: .*k_proj allows at most 16"):
        kallm.lora_config(model, "all", r=20)
    with pytest.raises(ValueError, match="rank r must be a positive integer"):
        kallm.lora_config(model, "kan", r=0)
    with pytest.raises(ValueError, match="DoRA .* is not supported on KAN layers"):
        kallm.lora_config(model, "all", r=2, use_dora=True)
    with pytest.raises(TypeError, match="needs a peft.LoraConfig"):
        kallm.with_kan_lora({"r": 2})
    layer = kallm.KANLinear(3, 2, "cheby2", 2)  # 6 basis features, 2 outputs
    wrapped = torch.nn.Sequential(layer)
    config = kallm.with_kan_lora(peft.LoraConfig(r=3, target_modules=["0"]))
    with pytest.raises(ValueError, match="r=3 is larger than a KAN layer of 2 outputs and 6 basis features"):
        peft.get_peft_model(wrapped, config)


def test_lora_bias_merges_into_the_kan_bias():
    model = _with_adapter("kan", lora_bias=True)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name and name.endswith("bias"):
                parameter.normal_(0.0, 0.1)
    adapted = logits_of(model, TOKENS)
    torch.testing.assert_close(logits_of(model.merge_and_unload(), TOKENS), adapted, rtol=0, atol=0)


def test_set_trainable_on_a_peft_model_keeps_the_adapters_training():
    model = _with_adapter("kan")
    adapters = kallm.summary(model, print_table=False)["adapters"]
    assert adapters == sum(p.numel() for name, p in model.named_parameters() if "lora_" in name)
    assert kallm.set_trainable(model, "retrofitted") > adapters
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert all("mlp" in name for name in trainable)
    assert any("lora_A" in name for name in trainable) and any("base_layer" in name for name in trainable)
    kallm.set_trainable(model, "all")
    assert all(p.requires_grad for p in model.parameters())
    summary = kallm.summary(model, print_table=False)
    assert summary["model"] == "PeftModelForCausalLM" and summary["trainable"] == summary["total"]


# With kallm blocked: loads a retrofitted base with the checkpoint's own code and puts adapters on it with plain
# PEFT (attention: PeftModel and AutoPeftModelForCausalLM; KAN: refused), and loads the merged KAN checkpoint.
# A KAN adapter (kallm's PEFT method) is refused too. Then imports kallm and loads the KAN-layer LoRA adapter and the
# KAN adapter with plain PEFT onto the remote-code base, and through AutoPeftModelForCausalLM. Prints the logits.
REMOTE_CODE_SCRIPT = r"""
import importlib.abc, json, sys

class BlockKallm(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "kallm" or name.startswith("kallm."):
            raise ImportError("kallm is blocked in this process")

blocker = BlockKallm()
sys.meta_path.insert(0, blocker)
import torch
from peft import AutoPeftModelForCausalLM, PeftModel
from transformers import AutoModelForCausalLM

base, attention_adapter, kan_adapter, merged, kan_type_adapter = sys.argv[1:6]
tokens = torch.tensor(json.loads(sys.argv[6]))

def load(folder):
    return AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()

def logits(model):
    with torch.no_grad():
        return model.eval()(tokens).logits.tolist()

result = {"attention": logits(PeftModel.from_pretrained(load(base), attention_adapter)),
          "auto_attention": logits(AutoPeftModelForCausalLM.from_pretrained(attention_adapter, trust_remote_code=True)),
          "merged": logits(load(merged))}
try:
    PeftModel.from_pretrained(load(base), kan_adapter)
    result["kan_without_kallm"] = "loaded"
except ValueError as error:
    result["kan_without_kallm"] = str(error)
try:
    PeftModel.from_pretrained(load(base), kan_type_adapter)
    result["kan_type_without_kallm"] = "loaded"
except Exception as error:
    result["kan_type_without_kallm"] = f"{type(error).__name__}: {error}"
model = load(base)
sys.meta_path.remove(blocker)
import kallm

result["remote_class"] = type(model).__module__
result["kan"] = logits(PeftModel.from_pretrained(model, kan_adapter))
result["auto_kan"] = logits(AutoPeftModelForCausalLM.from_pretrained(kan_adapter, trust_remote_code=True))
result["kan_type"] = logits(PeftModel.from_pretrained(load(base), kan_type_adapter))
result["auto_kan_type"] = logits(AutoPeftModelForCausalLM.from_pretrained(kan_type_adapter, trust_remote_code=True))
print("RESULTS " + json.dumps(result))
"""


def test_trust_remote_code_users_get_attention_lora_from_peft_and_kan_lora_from_kallm(tmp_path):
    _retrofitted().save_pretrained(tmp_path / "base")
    attention, kan = (_with_adapter(which, base=AutoModelForCausalLM.from_pretrained(tmp_path / "base").eval())
                      for which in ("attention", "kan"))
    attention.save_pretrained(tmp_path / "attention")
    kan.save_pretrained(tmp_path / "kan")
    kan_logits = logits_of(kan, TOKENS)
    kan.merge_and_unload().save_pretrained(tmp_path / "merged")
    kan_type = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(tmp_path / "base").eval(),
                                   kallm.KANAdapterConfig(task_type="CAUSAL_LM", r=4, target_modules=KAN_LAYERS))
    with torch.no_grad():
        for name, parameter in kan_type.named_parameters():
            if "kan_adapter_up" in name:
                parameter.normal_(0, 0.1)
    kan_type.save_pretrained(tmp_path / "kan_type")
    kan_type_logits = logits_of(kan_type.eval(), TOKENS)
    env = {name: value for name, value in os.environ.items() if name != "PYTHONPATH"}
    env.update(PYTHONPATH=str(Path(kallm.__file__).parent.parent), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1",
               HF_MODULES_CACHE=str(tmp_path / "hf_modules"))
    arguments = [str(tmp_path / name) for name in ("base", "attention", "kan", "merged", "kan_type")] + [json.dumps(TOKENS.tolist())]
    process = subprocess.run([sys.executable, "-c", REMOTE_CODE_SCRIPT, *arguments], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=600)
    assert process.returncode == 0, process.stderr[-4000:]
    result = json.loads(next(line for line in process.stdout.splitlines() if line.startswith("RESULTS "))[8:])
    assert result["remote_class"].startswith("transformers_modules.")
    for key in ("attention", "auto_attention"):
        torch.testing.assert_close(torch.tensor(result[key]), logits_of(attention, TOKENS), rtol=0, atol=0)
    assert "is not supported" in result["kan_without_kallm"]
    for key in ("merged", "kan", "auto_kan"):
        torch.testing.assert_close(torch.tensor(result[key]), kan_logits, rtol=0, atol=0)
    assert result["kan_type_without_kallm"].startswith("KeyError: 'KAN_ADAPTER'")  # PEFT does not know the type
    for key in ("kan_type", "auto_kan_type"):
        torch.testing.assert_close(torch.tensor(result[key]), kan_type_logits, rtol=0, atol=0)


PEFT_AFTER_KALLM = """
import sys
import kallm
assert "peft" not in sys.modules, "import kallm imported peft"
from peft.tuners.lora import LoraModel
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
print(getattr(LoraModel._create_new_module, "kallm_knows_kan_layers", False), PEFT_TYPE_TO_CONFIG_MAPPING["KAN_ADAPTER"].__name__)
"""


def test_import_kallm_registers_the_kan_lora_layer_and_the_kan_adapter_when_peft_loads_later():
    env = {**os.environ, "PYTHONPATH": str(Path(kallm.__file__).parent.parent), "OMP_NUM_THREADS": "1"}
    process = subprocess.run([sys.executable, "-c", PEFT_AFTER_KALLM], env=env, capture_output=True, text=True,
                             timeout=300)
    assert process.returncode == 0, process.stderr[-2000:]
    assert process.stdout.split()[-2:] == ["True", "KANAdapterConfig"]
