"""kan_config across schema versions and families: configs resaved by plain transformers, schema version 1,
newer and missing versions."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import kallm
import kallm.checkpoints.load
from kallm.testing.checkpoints import TOKENIZER_CASE, copy_checkpoint
from kallm.testing.compare import logits_of
from kallm.testing.models import tiny_model


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
