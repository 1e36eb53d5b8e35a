"""Saved folders whose weights and kan_config disagree, or whose kan_config is corrupted, are refused naming
the problem; weights without recorded settings and sharded weights still load."""

from __future__ import annotations

import json

import pytest
import safetensors.torch
import torch
from transformers import AutoModelForCausalLM

from kallm.core.retrofit_config import RetrofitConfig
from kallm.testing.checkpoints import copy_checkpoint
from kallm.testing.compare import logits_of
from kallm.testing.processes import CODE_FILES


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


def test_a_folder_saved_before_the_model_card_had_its_own_module_loads_and_resaves_the_whole_code(saved, tmp_path):
    """A folder saved by an earlier kallm holds the code files of its day (no model_card.py): kallm loads it with its
    own classes, whatever code lies beside the weights, and saving it again writes today's files."""
    folder = copy_checkpoint(saved, tmp_path)
    (folder / "model_card.py").unlink()
    loaded = AutoModelForCausalLM.from_pretrained(folder)
    assert type(loaded).__module__ == "kallm.core.modeling_kallm"
    expected = torch.load(saved["llama"][2])
    assert torch.equal(logits_of(loaded, expected["ids"]), expected["logits"])
    loaded.save_pretrained(tmp_path / "resaved")
    assert {path.name for path in (tmp_path / "resaved").glob("*.py")} == set(CODE_FILES)


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
