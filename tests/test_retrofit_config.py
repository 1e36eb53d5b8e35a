"""kallm.RetrofitConfig: the typed kan_config, retrofit with a config object, per-block settings,
blocks="auto", the validated linear restart and the deprecated "layers" names."""

from __future__ import annotations

import copy
import json
import re
import warnings
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import kallm
from kallm import RetrofitConfig
from kallm.core.layers import KANFeedForward
from kallm.surgery.architectures import Architecture
from kallm.testing.compare import assert_unchanged, snapshot
from kallm.testing.models import tiny_model

REPO = Path(__file__).resolve().parents[1]


def token_ids(seed=0, rows=16, length=48):
    return torch.randint(5, 128, (rows, length), generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------ the dataclass


def test_a_completed_config_round_trips_through_json():
    model = kallm.retrofit(tiny_model("llama"), blocks={0: {"degree": 3}, -1: {"basis": "legendre"}})
    stored = model.config.kan_config
    assert stored["blocks"] == [0, 2] and set(stored["block_settings"]) == {"0", "2"}  # JSON object keys
    assert json.loads(json.dumps(stored)) == stored
    config = RetrofitConfig.from_dict(stored)
    assert config.block_settings[2] == {"basis": "legendre"} and config.settings(2)["degree"] == 2
    assert config.settings(0)["degree"] == 3 and config.to_dict() == stored


@pytest.mark.parametrize(
    ("fields", "error", "message"),
    [
        ({"degree": "2"}, ValueError, "kan_config.degree must be a positive integer, got '2'"),
        ({"degree": 0}, ValueError, "degree must be an integer >= 1"),
        ({"basis": "bogus"}, ValueError, "unknown basis 'bogus'"),
        ({"kind": "mlp"}, ValueError, "unknown kind 'mlp'; valid choices: kan, linear"),
        ({"init": "zeros"}, ValueError, "unknown init 'zeros'; valid choices: random, fit"),
        ({"bias": 1}, ValueError, "kan_config.bias must be true or false, got 1"),
        ({"input_map": "relu"}, ValueError, "unknown input_map 'relu'"),
        ({"basis_options": {"input_map": "tanh"}}, ValueError, "basis_options may not hold ['input_map']"),
        ({"basis_options": {"alpha": torch.tensor(1.0)}, "basis": "gegenbauer"}, TypeError, "plain JSON values"),
        ({"blocks": "all"}, TypeError, "blocks must be a list of block indices, a dict of block index -> settings"),
        ({"blocks": "auto"}, ValueError, "blocks='auto' needs num_blocks"),
        ({"blocks": "auto", "num_blocks": 2, "block_settings": {1: {"degree": 3}}}, ValueError,
         "blocks='auto' chooses the blocks itself"),
        ({"blocks": [1], "num_blocks": 1}, ValueError, "num_blocks=1 is only used with blocks='auto'"),
        ({"blocks": {1: {"activation": "gelu"}}}, ValueError,
         "kan_config.block_settings[1] has unknown settings ['activation']"),
        ({"blocks": {1: {"degree": 0}}}, ValueError, "options of block 1 do not build a KAN feedforward"),
        ({"blocks": {1: {"intermediate_size": -1}}}, ValueError,
         "kan_config.block_settings[1].intermediate_size must be a positive integer"),
        ({"last_n": "5"}, ValueError, "last_n must be an integer"),
    ],
)
def test_the_config_checks_every_field_when_it_is_built(fields, error, message):
    with pytest.raises(error, match=re.escape(message)):
        RetrofitConfig(**fields)


# ------------------------------------------------------------------------------------ retrofit(model, config)


def test_a_config_object_does_what_the_keywords_do_and_keywords_override_it():
    by_keywords = kallm.retrofit(tiny_model("llama"), blocks=[1, 2], basis="legendre", degree=3, input_map="tanh")
    config = RetrofitConfig(blocks=[1, 2], basis="legendre", degree=3, input_map="tanh")
    by_config = kallm.retrofit(tiny_model("llama"), config)
    assert by_config.config.kan_config == by_keywords.config.kan_config
    assert config.blocks == [1, 2] and not config.is_complete  # the caller's object is not changed
    overridden = kallm.retrofit(tiny_model("llama"), config, blocks=[0], degree=2, init="random")
    assert overridden.config.kan_config["blocks"] == [0] and overridden.config.kan_config["degree"] == 2
    with pytest.raises(TypeError, match="config must be a kallm.RetrofitConfig, got dict"):
        kallm.retrofit(tiny_model("llama"), {"blocks": [1]})
    with pytest.raises(ValueError, match=r"retrofit fills in \['hidden_size'\] itself"):
        kallm.retrofit(tiny_model("llama"), hidden_size=16)


def test_layers_is_a_deprecated_name_of_blocks():
    with pytest.warns(FutureWarning, match=r"retrofit\(layers=...\) is deprecated"):
        model = kallm.retrofit(tiny_model("llama"), layers=[-1])
    assert model.config.kan_config["blocks"] == [2]
    with pytest.raises(ValueError, match="give blocks= or its deprecated name layers=, not both"):
        kallm.retrofit(tiny_model("llama"), layers=[1], blocks=[2])
    with pytest.warns(FutureWarning, match="use retrofitted_blocks"):
        assert kallm.surgery.retrofitted_layers(model) == [2]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        kallm.retrofit(tiny_model("llama"), blocks=[1], layers=None)  # the CLI's unset --layers


def test_filter_fn_narrows_blocks_and_drops_their_settings():
    model = kallm.retrofit(tiny_model("llama"), blocks={0: {"degree": 3}, 1: {"degree": 4}},
                           filter_fn=lambda module, name: name != "model.layers.1.mlp")
    assert model.config.kan_config["blocks"] == [0]
    assert model.config.kan_config["block_settings"] == {"0": {"degree": 3, "intermediate_size": 15}}
    assert not isinstance(model.model.layers[1].mlp, KANFeedForward)


# ------------------------------------------------------------------------------------ per-block settings


def test_each_block_gets_its_own_settings_and_sizes():
    model = kallm.retrofit(tiny_model("llama"), blocks={0: {"degree": 3, "basis": "legendre"},
                                                       1: {"intermediate_size": 12}, 2: {}})
    kan_config = model.config.kan_config
    shared = kan_config["intermediate_size"]
    # a block with its own basis or degree gets its own default size (half its MLP's parameters)
    own = kan_config["block_settings"]["0"]["intermediate_size"]
    assert KANFeedForward.count_parameters(32, own, "legendre", 3) <= 3 * 32 * 64 // 2
    assert KANFeedForward.count_parameters(32, own + 1, "legendre", 3) > 3 * 32 * 64 // 2
    layers = [model.model.layers[i].mlp.layers for i in range(3)]
    assert [(layer.basis.name, layer.basis.degree, layer.out_features) for layer in layers[0]][0] == \
           ("legendre", 3, own)
    assert layers[1][0].out_features == 12 and layers[2][0].out_features == shared
    assert kan_config["block_settings"].keys() == {"0", "1"}  # block 2 has no settings of its own


def test_an_extension_may_bring_its_own_settings_and_records_mixed_inits():
    model = kallm.retrofit(tiny_model("llama"), blocks=[2])
    kallm.retrofit(model, blocks={0: {"degree": 3}}, init="fit", calibration=token_ids())
    kan_config = model.config.kan_config
    assert kan_config["blocks"] == [0, 2] and kan_config["block_settings"]["0"]["degree"] == 3
    assert kan_config["init"] is None  # the blocks started differently
    assert model.model.layers[0].mlp.layers[0].basis.degree == 3


def test_per_block_settings_save_and_reload(tmp_path):
    rational = {"basis": "rational", "basis_options": {"denominator_degree": 2}}
    model = kallm.retrofit(tiny_model("gpt2"), blocks={0: rational, 2: {"degree": 4, "input_map": "tanh"}})
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert loaded.config.kan_config == model.config.kan_config
    ids = token_ids(rows=2, length=6)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    assert loaded.transformer.h[0].mlp.layers[0].basis.name == "rational"
    assert loaded.transformer.h[2].mlp.layers[0].input_scale is None
    card = (tmp_path / "README.md").read_text()
    assert "| block 2's own settings | {'degree': 4, 'input_map': 'tanh'" in card


# ------------------------------------------------------------------------------------ blocks="auto"


def test_auto_keeps_the_blocks_with_the_lowest_fit_error_and_records_why():
    original = tiny_model("llama")
    model = kallm.retrofit(copy.deepcopy(original), blocks="auto", num_blocks=2, init="fit",
                           calibration=token_ids())
    report = model.kallm_fit_report
    selection = model.config.kan_config["selection"]
    errors = report["ordinary_token_error"]
    ranked = sorted(errors, key=lambda index: (errors[index], index))
    assert selection["candidates"] == [0, 1, 2] and selection["chosen"] == sorted(ranked[:2])
    assert model.config.kan_config["blocks"] == sorted(ranked[:2]) and report["selection"] == selection
    assert selection["ordinary_token_error"] == {str(i): round(errors[i], 6) for i in errors}
    assert selection["ranked_by"] == "ordinary_token_error" and selection["num_blocks"] == 2
    # the block left out has its original MLP back, weights untouched
    left_out = ranked[2]
    assert type(model.model.layers[left_out].mlp).__name__ == "LlamaMLP"
    for name, tensor in original.model.layers[left_out].mlp.state_dict().items():
        assert torch.equal(model.model.layers[left_out].mlp.state_dict()[name], tensor)
    # the choice survives a save: the config lists exactly the KAN blocks
    assert kallm.surgery.retrofitted_blocks(model) == sorted(ranked[:2])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"blocks": "auto", "num_blocks": 1}, "blocks='auto' ranks the blocks by the error of fit init"),
        ({"blocks": "auto", "num_blocks": 4, "init": "fit"}, "num_blocks=4 but only 3 candidate blocks"),
        ({"blocks": "auto", "num_blocks": 1, "init": "fit", "kind": "linear"}, "init='fit' fits KAN feedforwards"),
    ],
)
def test_auto_refusals_leave_the_model_as_it_was(kwargs, message):
    model = tiny_model("llama")
    before = snapshot(model)
    calibration = token_ids() if kwargs.get("init") == "fit" else None
    with pytest.raises(ValueError, match=re.escape(message)):
        kallm.retrofit(model, calibration=calibration, **kwargs)
    assert_unchanged(model, before)


# ------------------------------------------------------------------------------------ the linear restart


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"basis": "bogus"}, "unknown basis 'bogus'"),
        ({"degree": -3}, "degree must be an integer >= 1"),
        ({"degree": 3}, "kind='linear' restarts the MLPs in their own shape, so KAN settings do not apply; "
                        "got degree=3"),
        ({"intermediate_size": 40}, "KAN settings do not apply; got intermediate_size=40"),
        ({"blocks": {1: {"degree": 3}}}, "KAN settings do not apply; got per-block settings"),
        ({"alpha": 0.5}, "basis 'cheby2' does not take options ['alpha']"),
    ],
)
def test_the_linear_restart_is_validated_like_everything_else(kwargs, message):
    model = tiny_model("llama")
    before = snapshot(model)
    with pytest.raises(ValueError, match=re.escape(message)):
        kallm.retrofit(model, **{"last_n": 1, "kind": "linear", **kwargs})
    assert_unchanged(model, before)


def test_a_restart_saved_by_older_kallm_still_loads_and_counts(tmp_path):
    model = tiny_model("llama")
    model.config.kallm_restarted_layers = [1]  # how kallm recorded a restart before RetrofitConfig
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert kallm.surgery.retrofitted_blocks(reloaded) == [1]
    rows = kallm.summary(reloaded, print_table=False)["blocks"]
    assert [row["feedforward"] for row in rows] == ["original", "linear restart", "original"]
    with pytest.raises(ValueError, match=re.escape("blocks [1] of this model were linear-restarted")):
        kallm.retrofit(reloaded, blocks=[0])
    # extending it writes today's record and drops the old attribute
    kallm.retrofit(reloaded, blocks=[0], kind="linear")
    assert reloaded.config.kan_config["kind"] == "linear" and reloaded.config.kan_config["blocks"] == [0, 1]
    assert not hasattr(reloaded.config, "kallm_restarted_layers")


# ------------------------------------------------------------------------------------ docs


def test_the_adapter_in_adding_an_architecture_builds():
    text = (REPO / "docs" / "adding-an-architecture.md").read_text()
    example = re.search(r'"falcon": (Architecture\(.*?\n\)),', text, re.S).group(1)
    architecture = eval(example, {"Architecture": Architecture})  # the doc's own snippet
    assert architecture.blocks_path == "transformer.h"
    assert not hasattr(architecture, "intermediate_size")
