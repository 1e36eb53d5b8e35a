"""The base branch of a KAN layer (``base="silu"`` or ``"linear"``): what it computes, its gradients and saved
memory, its init and parameter count, the retrofit setting and config, and what takes a model that has it
(fit init, convert, quantize, delta checkpoints, plot, the CLI). Saving and loading, with kallm and in fresh
processes without it, is a case of kallm.testing.checkpoints (``llama-base-branches``)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

import kallm
from kallm.cli import main
from kallm.core.kan_function import kan_linear
from kallm.core.layers import KANFeedForward, KANLinear, intermediate_size_for_budget
from kallm.eval.plot import edge_functions, strongest_edges
from kallm.testing.compare import assert_unchanged, block_errors, check_compiles_as_one_graph, logits_of, snapshot
from kallm.testing.data import token_ids
from kallm.testing.models import tiny_model
from kallm.testing.tokenizers import make_tiny_tokenizer

BRANCHES = {"silu": F.silu, "linear": lambda x: x}
IDS = torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(3))


def kan_layers(model):
    return [m for m in model.modules() if isinstance(m, KANLinear)]


# ------------------------------------------------------------------------------------------------- the layer


def test_without_a_branch_the_layer_is_todays_fused_op_with_todays_parameters():
    torch.manual_seed(0)
    layer = KANLinear(6, 5, "legendre", 3)
    assert [name for name, _ in layer.named_parameters()] == ["weight", "bias", "input_scale", "input_shift"]
    assert layer.base is None and layer.base_weight is None and "base" not in repr(layer)
    x = torch.randn(4, 6)
    expected = kan_linear(x, layer.weight, layer.bias, layer.input_scale, layer.input_shift, layer.basis)
    assert torch.equal(layer(x), expected)


@pytest.mark.parametrize("base", BRANCHES)
def test_the_branch_adds_its_matrix_times_the_function_of_the_raw_input(base):
    layer = KANLinear(6, 5, base=base)
    with torch.no_grad():
        layer.input_scale.uniform_(0.5, 2.0)
    x = 3 * torch.randn(2, 4, 6)
    without = copy.deepcopy(layer)
    without.base_weight = None
    expected = without(x) + F.linear(BRANCHES[base](x), layer.base_weight)
    torch.testing.assert_close(layer(x), expected)
    assert layer(x).shape == (2, 4, 5) and f"base={base}" in repr(layer)


@pytest.mark.parametrize("base", BRANCHES)
def test_the_textbook_reference_copies_the_branch(base):
    from kallm.testing.reference import ReferenceKANLinear

    layer = KANLinear(6, 5, "legendre", 3, base=base)
    x = torch.randn(3, 6)
    torch.testing.assert_close(ReferenceKANLinear(layer)(x), layer(x))


@pytest.mark.parametrize("base", BRANCHES)
def test_gradients_reach_the_branch_and_the_input_exactly(base):
    layer = KANLinear(5, 3, base=base, dtype=torch.float64)
    x = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    weight = layer.base_weight.detach().clone().requires_grad_()

    def with_branch_weight(inputs, branch_weight):
        return torch.func.functional_call(layer, {"base_weight": branch_weight}, (inputs,))

    assert torch.autograd.gradcheck(with_branch_weight, (x, weight))
    layer(x).square().sum().backward()
    assert layer.base_weight.grad is not None and layer.base_weight.grad.abs().sum() > 0


@pytest.mark.parametrize("base", BRANCHES)
def test_backward_keeps_only_the_layer_input_like_the_layer_without_a_branch(base):
    """The fused op saves x; the branch saves the same x (and its weight), never silu(x) or a copy."""

    def activation_bytes(layer, x):
        saved = {}

        def pack(tensor):
            if tensor.shape[0] == x.shape[0]:  # per-token tensors; parameters are there anyway
                saved[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            layer(x)
        return sum(saved.values())

    x = torch.randn(64, 16, requires_grad=True)
    plain = activation_bytes(KANLinear(16, 8), x)
    assert plain == x.numel() * 4
    assert activation_bytes(KANLinear(16, 8, base=base), x) == plain
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert activation_bytes(KANLinear(16, 8, base=base), x) == plain


@pytest.mark.parametrize("base", BRANCHES)
def test_the_init_stays_variance_preserving_and_shares_the_variance_with_the_basis(base):
    torch.manual_seed(0)
    plain = KANLinear(256, 256)
    torch.manual_seed(0)
    layer = KANLinear(256, 256, base=base)
    torch.testing.assert_close(layer.weight, plain.weight / math.sqrt(2))  # the same draw, half the variance
    x = torch.randn(4096, 256, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        branch = F.linear(BRANCHES[base](x), layer.base_weight)
        assert 0.85 < float(layer(x).var()) < 1.15
        assert 0.4 < float(branch.var()) < 0.6


def test_a_feedforward_with_branches_compiles_as_one_graph_and_matches_eager():
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = KANFeedForward(16, 24, "cheby2", base="silu")
    x = torch.randn(2, 5, 16, requires_grad=True)
    check_compiles_as_one_graph(model, x)


def test_parameter_counts_include_the_branch_and_match_the_built_modules():
    for base in (None, *BRANCHES):
        layer = KANLinear(12, 7, "rational", 3, base=base)
        assert KANLinear.count_parameters(12, 7, "rational", 3, base=base) == sum(p.numel() for p in layer.parameters())
        ff = KANFeedForward(10, 6, "cheby2>legendre", 2, base=base, bias=False)
        assert KANFeedForward.count_parameters(10, 6, "cheby2>legendre", 2, base=base, bias=False) == \
            sum(p.numel() for p in ff.parameters())
    assert KANLinear.count_parameters(12, 7, base="silu") - KANLinear.count_parameters(12, 7) == 12 * 7
    # the budget pays for the branch out of the intermediate size
    budget = 40_000
    with_branch = intermediate_size_for_budget(64, budget, base="silu")
    assert with_branch < intermediate_size_for_budget(64, budget)
    assert KANFeedForward.count_parameters(64, with_branch, base="silu") <= budget
    assert KANFeedForward.count_parameters(64, with_branch + 1, base="silu") > budget


def test_an_unknown_branch_is_refused_naming_the_choices():
    for bad in ("relu", "", True, ["silu"]):
        with pytest.raises(ValueError, match=r"unknown base .*; valid choices: None \(no base branch\), 'silu', "
                                             r"'linear'"):
            KANLinear(4, 3, base=bad)
        with pytest.raises(ValueError, match="unknown base"):
            KANLinear.count_parameters(4, 3, base=bad)


# ------------------------------------------------------------------------------------- retrofit and its config


def test_retrofit_builds_branches_everywhere_or_per_block_and_counts_them():
    model = kallm.retrofit(tiny_model("llama"), blocks={1: {"base": "linear"}, 2: {}}, base="silu")
    kan = model.config.kan_config
    assert kan["base"] == "silu" and kan["block_settings"] == {"1": {"base": "linear"}}
    assert kan["schema_version"] == 4
    layers = {block: model.model.layers[block].mlp.layers for block in (1, 2)}
    assert {layer.base for layer in layers[1]} == {"linear"} and {layer.base for layer in layers[2]} == {"silu"}
    report = kallm.summary(model, print_table=False)
    assert report["kan"] == sum(p.numel() for block in layers.values() for p in block.parameters())
    config = kallm.RetrofitConfig.from_dict(kan)
    for block in (1, 2):  # the default intermediate size keeps each feedforward within half the MLP it replaced
        mlp = tiny_model("llama").model.layers[block].mlp
        arguments = config.feedforward_arguments(block)
        assert KANFeedForward.count_parameters(**arguments) <= sum(p.numel() for p in mlp.parameters()) // 2
        assert KANFeedForward.count_parameters(**{**arguments, "intermediate_size": arguments["intermediate_size"]
                                                  + 1}) > sum(p.numel() for p in mlp.parameters()) // 2


def test_the_default_retrofit_keeps_the_research_form():
    model = kallm.retrofit(tiny_model("llama"), last_n=2, basis="cheby2", degree=2)
    assert model.config.kan_config["base"] is None
    assert all(layer.base_weight is None for layer in kan_layers(model))
    assert not any("base_weight" in name for name in model.state_dict())


@pytest.mark.parametrize("version", [2, 3])
def test_configs_saved_before_the_branch_load_without_one(version):
    kan = kallm.retrofit(tiny_model("llama"), last_n=1).config.kan_config
    older = {key: value for key, value in kan.items() if key != "base"}
    if version == 2:
        older = {key: value for key, value in older.items() if key not in ("form", "function_groups", "mlp_layout")}
    older["schema_version"] = version
    assert kallm.RetrofitConfig.from_dict(older).to_dict() == kan
    with pytest.raises(ValueError, match=r"unknown keys \['base'\] for schema_version 3; they came with version 4"):
        kallm.RetrofitConfig.from_dict({**kan, "schema_version": 3})


@pytest.mark.parametrize("fields, message", [
    ({"base": "gelu"}, r"unknown kan_config.base 'gelu'; valid choices: None \(no base branch\), 'silu', 'linear'"),
    ({"blocks": {2: {"base": "tanh"}}}, r"unknown kan_config.block_settings\[2\].base 'tanh'; valid choices"),
    ({"form": "glu", "base": "silu"}, r"form='glu' keeps the MLP's own projections, so the KAN feedforward "
                                      r"settings \['base'\] do not apply"),
    ({"kind": "linear", "base": "linear"}, r"kind='linear' restarts the MLPs in their own shape, so KAN settings "
                                           r"do not apply; got base='linear'"),
    ({"basis_options": {"base": "silu"}}, r"basis_options may not hold \['base'\]: they are settings of their own"),
])
def test_bad_branch_settings_are_refused_before_the_model_changes(fields, message):
    model = tiny_model("llama")
    before = snapshot(model)
    with pytest.raises(ValueError, match=message):
        kallm.retrofit(model, last_n=2, **fields)
    assert_unchanged(model, before)


def test_extending_a_retrofit_with_another_branch_is_refused():
    model = kallm.retrofit(tiny_model("llama"), blocks=[2], base="silu")
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"other KAN settings \(base: 'silu' -> None\)"):
        kallm.retrofit(model, blocks=[1])
    assert_unchanged(model, before)
    assert kallm.retrofit(model, blocks=[1], base="silu").config.kan_config["blocks"] == [1, 2]


# ------------------------------------------------------------------------------------- what takes a retrofit


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_fit_init_solves_the_branch_with_the_basis_and_fits_no_worse(family):
    """At the same intermediate size the branch's columns join the least-squares problem, so the fit can only
    improve on the calibration rows; on held-out tokens it improves too on these models."""
    original = tiny_model(family)
    size = kallm.retrofit(copy.deepcopy(original), last_n=2).config.kan_config["intermediate_size"]
    held_out = token_ids(1, rows=4)
    errors, held = {}, {}
    for base in (None, "silu", "linear"):
        model = kallm.retrofit(copy.deepcopy(original), last_n=2, init="fit", calibration=token_ids(0), base=base,
                               intermediate_size=size)
        errors[base] = model.kallm_fit_report["relative_error"]
        held[base] = block_errors(model, original, held_out)
        if base is not None:
            assert all(layer.base_weight.abs().sum() > 0 for layer in kan_layers(model))
    print({base: {block: round(error, 4) for block, error in e.items()} for base, e in errors.items()})
    for base in BRANCHES:
        for block in (1, 2):
            assert errors[base][block] <= errors[None][block] + 1e-4, errors
            assert held[base][block] <= held[None][block] + 1e-3, held


def test_convert_carries_the_branch_unchanged():
    model = kallm.retrofit(tiny_model("llama"), last_n=2, base="silu")
    for layer in kan_layers(model):
        with torch.no_grad():
            layer.bias.uniform_(-0.5, 0.5)
    expected = logits_of(model, IDS)
    branches = [layer.base_weight.clone() for layer in kan_layers(model)]
    kallm.convert(model, "legendre", degree=3)
    assert model.kallm_conversion_report.exact
    assert all(layer.basis.name == "legendre" and layer.base == "silu" for layer in kan_layers(model))
    assert all(torch.equal(layer.base_weight, before) for layer, before in zip(kan_layers(model), branches))
    torch.testing.assert_close(logits_of(model, IDS), expected, rtol=1e-4, atol=1e-4)
    assert model.config.kan_config["base"] == "silu"


def test_quantize_keeps_the_branch_in_float_and_computes_what_the_dequantized_weights_give():
    pytest.importorskip("torchao", reason="torchao is not installed (pip install 'kallm[quant]')")
    from kallm.core.kan_function import _is_quantized

    model = kallm.retrofit(tiny_model("llama"), last_n=2, base="silu")
    floats = [copy.deepcopy(layer) for layer in kan_layers(model)]
    kallm.quantize(model)
    layers = kan_layers(model)
    assert all(_is_quantized(layer.weight) and type(layer.base_weight) is torch.nn.Parameter for layer in layers)
    x = torch.randn(16, layers[0].in_features, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y, y_float = layers[0](x), floats[0](x)
        assert (y - y_float).norm() < 0.01 * y_float.norm()
        floats[0].weight.copy_(layers[0].weight.dequantize())
        torch.testing.assert_close(y, floats[0](x), rtol=1e-5, atol=1e-5)


def test_a_delta_checkpoint_holds_the_branch_and_rebuilds_the_model(tmp_path):
    base = tiny_model("llama")
    model = kallm.retrofit(copy.deepcopy(base), last_n=2, base="linear")
    manifest = kallm.save_delta(model, tmp_path / "delta", base=base)
    assert sum("base_weight" in name for name in manifest["changed_tensors"]) == 4
    loaded, _ = kallm.load_delta(tmp_path / "delta", base=base)
    assert torch.equal(logits_of(loaded, IDS), logits_of(model, IDS))


def test_plot_draws_the_edge_function_with_its_branch():
    layer = KANLinear(8, 4, "cheby2", 3, base="silu", dtype=torch.float64)
    with torch.no_grad():
        layer.input_scale.uniform_(0.5, 2.0)
        layer.base_weight.mul_(5)
    edges = [(0, 1), (5, 3)]
    x, y = edge_functions(layer, edges)
    for row, (i, o) in enumerate(edges):
        inputs = torch.zeros(x.shape[1], 8, dtype=torch.float64)
        inputs[:, i] = x[row]
        with torch.no_grad():
            out = layer(inputs)[:, o]
        torch.testing.assert_close(out - out[0], y[row] - y[row][0])
    with torch.no_grad():
        layer.weight.zero_()
        layer.base_weight.zero_()
        layer.base_weight[2, 6] = 1.0
    assert strongest_edges(layer, 1) == [(6, 2)]


def test_the_cli_retrofits_with_a_branch_and_refuses_an_unknown_one(tmp_path, capsys):
    folder = tmp_path / "base"
    tiny_model("llama").save_pretrained(folder)
    make_tiny_tokenizer().save_pretrained(folder)
    out = tmp_path / "kan"
    assert main(["retrofit", "--model", str(folder), "--out", str(out), "--last-n", "1", "--base", "silu"]) == 0
    loaded = AutoModelForCausalLM.from_pretrained(out)
    assert loaded.config.kan_config["base"] == "silu" and all(layer.base == "silu" for layer in kan_layers(loaded))
    assert "| base branch | `silu`" in (out / "README.md").read_text()
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(["retrofit", "--model", str(folder), "--out", str(tmp_path / "never"), "--base", "relu"])
    assert exit_info.value.code == 2
    assert "kallm retrofit: error: argument --base: invalid choice: 'relu' (choose from 'silu', 'linear')" in capsys.readouterr().err
    assert not (tmp_path / "never").exists()


@pytest.mark.integration  # slow: exports and runs in onnxruntime
def test_onnx_export_of_a_model_with_branches_matches_pytorch(tmp_path):
    from kallm.export.onnx import ONNX_PACKAGES, check_onnx

    for package in ONNX_PACKAGES:
        pytest.importorskip(package, reason=f"{package} is not installed (pip install 'kallm[onnx]')")
    model = kallm.retrofit(tiny_model("llama"), blocks={1: {"base": "linear"}, 2: {}}, base="silu")
    folder = kallm.export_onnx(model, tmp_path / "onnx")
    check = check_onnx(model, folder, IDS[:1], new_tokens=2)
    assert check.tokens_match and check.max_logit_diff < 1e-4


def test_lora_on_layers_with_branches_adapts_the_coefficients_and_keeps_the_branch():
    import peft

    model = kallm.retrofit(tiny_model("llama"), last_n=2, base="silu")
    expected = logits_of(model, IDS)
    model = peft.get_peft_model(model, kallm.lora_config(model, "kan", r=4, lora_dropout=0.5)).eval()
    torch.testing.assert_close(logits_of(model, IDS), expected, rtol=0, atol=0)  # a fresh adapter changes nothing
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.1, generator=torch.Generator().manual_seed(1))
    adapted = logits_of(model, IDS)
    layer = model.get_base_model().model.layers[2].mlp.layers[0]
    x = torch.randn(2, 4, layer.get_base_layer().in_features)
    with torch.no_grad():
        eval_output = layer(x)
        layer.train()
        layer.lora_dropout["default"].eval()  # the training path, with dropout itself off
        torch.testing.assert_close(layer(x), eval_output)
        layer.eval()
    merged = model.merge_and_unload()
    assert all(layer.base == "silu" for layer in kan_layers(merged))
    torch.testing.assert_close(logits_of(merged, IDS), adapted, rtol=0, atol=0)
