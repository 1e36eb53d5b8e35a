"""``form="gated"``: a KAN feedforward whose first layer is gated by a third KAN layer, ``down(silu(gate(x)) *
up(x))``, the product a SwiGLU MLP computes. What it computes and its gradients, its parameter count and default
size, fit init (the MLP's most important channels, exact at full width), what takes a model that has it, and bad
input. Saving and loading, with kallm and in fresh processes without it, is a case of kallm.testing.checkpoints (run by tests/test_checkpoint_*.py and tests/test_remote_code.py)
(``qwen2-gated``)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import kallm
from kallm.cli import main
from kallm.core.layers import KANFeedForward, KANLinear, intermediate_size_for_budget
from kallm.testing.compare import assert_unchanged, block_errors, logits_of, snapshot
from kallm.testing.data import token_ids
from kallm.testing.models import tiny_model
from kallm.testing.reference import ReferenceKANFeedForward
from kallm.testing.tokenizers import make_tiny_tokenizer

IDS = torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(3))


def mlp_parameters(model, index):
    return sum(p.numel() for p in model.model.layers[index].mlp.parameters())


# ------------------------------------------------------------------------------------------------- the module


def test_the_gate_multiplies_the_first_layer_through_silu():
    torch.manual_seed(0)
    feedforward = KANFeedForward(6, 5, "legendre", 3, gated=True, base="silu")
    x = torch.randn(2, 4, 6)
    up, down = feedforward.layers
    expected = down(F.silu(feedforward.gate(x)) * up(x))
    assert torch.equal(feedforward(x), expected)
    assert isinstance(feedforward.gate, KANLinear) and feedforward.gate.basis.name == up.basis.name
    assert (feedforward.gate.in_features, feedforward.gate.out_features) == (6, 5)
    assert KANFeedForward(6, 5).gate is None


def test_a_chained_spec_gates_its_first_stage_with_the_first_stages_basis():
    feedforward = KANFeedForward(6, 5, "cheby2>legendre>cheby1", gated=True)
    x = torch.randn(3, 6)
    first, middle, last = feedforward.layers
    assert feedforward.gate.basis.name == first.basis.name
    torch.testing.assert_close(feedforward(x), last(middle(F.silu(feedforward.gate(x)) * first(x))))


def test_the_textbook_reference_computes_the_gate_too():
    feedforward = KANFeedForward(6, 5, gated=True, base="linear")
    x = torch.randn(4, 6)
    torch.testing.assert_close(ReferenceKANFeedForward(feedforward)(x), feedforward(x))


def test_gradients_reach_every_parameter_and_match_the_reference():
    feedforward = KANFeedForward(5, 4, gated=True, base="linear", dtype=torch.float64)
    reference = ReferenceKANFeedForward(feedforward)
    x = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    feedforward(x).pow(2).sum().backward()
    x_ref = x.detach().clone().requires_grad_()
    reference(x_ref).pow(2).sum().backward()
    for name, parameter in feedforward.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
    torch.testing.assert_close(feedforward.gate.base_weight.grad, reference.gate.base_weight.grad)
    torch.testing.assert_close(feedforward.gate.bias.grad, reference.gate.bias.grad)
    torch.testing.assert_close(x.grad, x_ref.grad)


@pytest.mark.parametrize("options", [{}, {"base": "linear"}, {"basis": "cheby2>legendre"}, {"bias": False}])
def test_parameter_counts_match_the_built_module(options):
    options = {"basis": "cheby2", **options}
    built = KANFeedForward(12, 7, gated=True, **options)
    assert KANFeedForward.count_parameters(12, 7, gated=True, **options) == sum(p.numel() for p in built.parameters())
    plain = KANFeedForward.count_parameters(12, 7, **options)
    assert KANFeedForward.count_parameters(12, 7, gated=True, **options) - plain == sum(
        p.numel() for p in built.gate.parameters())


def test_the_budget_size_counts_the_gate():
    size = intermediate_size_for_budget(576, 2_654_208, "cheby2", 2, base="linear", gated=True)
    assert KANFeedForward.count_parameters(576, size, gated=True, base="linear") <= 2_654_208
    assert KANFeedForward.count_parameters(576, size + 1, gated=True, base="linear") > 2_654_208
    assert size < intermediate_size_for_budget(576, 2_654_208, "cheby2", 2, base="linear")


@pytest.mark.parametrize("gated", [1, "yes", None])
def test_gated_must_be_a_bool(gated):
    with pytest.raises(ValueError, match="gated must be True or False"):
        KANFeedForward(4, 4, gated=gated)
    with pytest.raises(ValueError, match="gated must be True or False"):
        KANFeedForward.count_parameters(4, 4, gated=gated)


# ------------------------------------------------------------------------------------------------- retrofit


def test_retrofit_builds_gated_feedforwards_within_half_the_mlps_parameters_by_default():
    model = tiny_model("llama")
    replaced = mlp_parameters(model, 2)
    kallm.retrofit(model, last_n=1, form="gated")
    feedforward = model.model.layers[2].mlp
    assert isinstance(feedforward, KANFeedForward) and feedforward.gate is not None
    assert model.config.kan_config["form"] == "gated"
    assert mlp_parameters(model, 2) <= replaced // 2
    assert logits_of(model, IDS).isfinite().all()


def test_the_gated_form_trains():
    model = kallm.retrofit(tiny_model("llama"), last_n=2, form="gated", base="linear")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for _ in range(25):
        loss = model(IDS, labels=IDS).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]


@pytest.mark.parametrize("family", ["llama", "phi3"])  # separate gate and up projections, and a fused one
def test_fit_init_at_full_width_starts_exactly_at_the_original(family):
    original = tiny_model(family)
    width = original.config.intermediate_size
    model = kallm.retrofit(copy.deepcopy(original), last_n=2, form="gated", base="linear", init="fit",
                           intermediate_size=width, calibration=token_ids())
    assert max(model.kallm_fit_report["relative_error"].values()) < 1e-5
    torch.testing.assert_close(logits_of(model, IDS), logits_of(original, IDS), atol=1e-4, rtol=0)
    for index in (1, 2):  # the copy lives in the base branches; the basis functions start at zero in gate and up
        feedforward = model.model.layers[index].mlp
        assert not feedforward.gate.weight.any() and not feedforward.layers[0].weight.any()


def test_fit_init_of_a_narrower_form_keeps_the_most_important_channels_and_beats_random_by_far():
    original = tiny_model("llama")
    options = {"last_n": 2, "form": "gated", "base": "linear", "intermediate_size": 16}
    fitted = kallm.retrofit(copy.deepcopy(original), init="fit", calibration=token_ids(), **options)
    random_init = kallm.retrofit(copy.deepcopy(original), **options)
    unseen = token_ids(seed=5, rows=4)
    fitted_errors, random_errors = block_errors(fitted, original, unseen), block_errors(random_init, original, unseen)
    for index in (1, 2):
        assert fitted_errors[index] < 0.7, fitted_errors
        assert fitted_errors[index] < 0.5 * random_errors[index], (fitted_errors, random_errors)
    # the copied rows are rows of the MLP's gate and up projections
    mlp, feedforward = original.model.layers[2].mlp, fitted.model.layers[2].mlp
    gate_rows = feedforward.gate.base_weight
    matches = (gate_rows[:, None, :] == mlp.gate_proj.weight[None]).all(-1)
    assert matches.any(1).all()
    kept = matches.float().argmax(1)
    assert torch.equal(feedforward.layers[0].base_weight, mlp.up_proj.weight[kept])


def test_fit_init_without_the_linear_base_branch_is_refused_before_the_model_changes():
    model = tiny_model("llama")
    before = snapshot(model)
    with pytest.raises(ValueError, match="init='fit' starts form='gated' as the MLP's most important channels, which "
                                         "its layers hold exactly only with base='linear'"):
        kallm.retrofit(model, last_n=1, form="gated", init="fit", calibration=token_ids())
    with pytest.raises(ValueError, match="base='linear'"):
        kallm.retrofit(model, blocks={1: {"base": "silu"}, 2: {}}, form="gated", base="linear", init="fit",
                       calibration=token_ids())
    assert_unchanged(model, before)


@pytest.mark.parametrize("family, reason", [
    ("gpt2", "copies the channels of a gated MLP"),
    ("gemma", "whose gate goes through silu"),
])
def test_fit_init_of_an_mlp_that_is_no_swiglu_is_refused_and_undone(family, reason):
    model = tiny_model(family)
    before = snapshot(model)
    with pytest.raises(ValueError, match=reason):
        kallm.retrofit(model, last_n=1, form="gated", base="linear", init="fit", calibration=token_ids())
    assert_unchanged(model, before)


def test_a_linear_restart_has_no_form():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="form='gated' is a retrofit of kind='kan'"):
        kallm.retrofit(model, last_n=1, form="gated", kind="linear")


def test_convert_quantize_and_lora_reach_the_gate():
    model = kallm.retrofit(tiny_model("llama"), last_n=1, form="gated", base="linear")
    names = kallm.lora_targets(model, "kan")
    assert "model.layers.2.mlp.gate" in names and "model.layers.2.mlp.layers.0" in names
    converted = kallm.convert(copy.deepcopy(model), basis="legendre")
    assert converted.model.layers[2].mlp.gate.basis.name == "legendre"
    torch.testing.assert_close(logits_of(converted, IDS), logits_of(model, IDS), atol=1e-4, rtol=0)
    pytest.importorskip("torchao", reason="torchao is not installed (pip install 'kallm[quant]')")
    from kallm.core.kan_function import _is_quantized

    quantized = kallm.quantize(copy.deepcopy(model))
    assert _is_quantized(quantized.model.layers[2].mlp.gate.weight)
    assert (logits_of(quantized, IDS) - logits_of(model, IDS)).norm() < 0.05 * logits_of(model, IDS).norm()


def test_the_cli_retrofits_the_gated_form(tmp_path):
    source = tmp_path / "tiny"
    tiny_model("llama").save_pretrained(source)
    make_tiny_tokenizer().save_pretrained(source)
    assert main(["retrofit", "--model", str(source), "--out", str(tmp_path / "out"), "--last-n", "1", "--form",
                 "gated", "--base", "linear"]) == 0
    loaded, _ = kallm.load_model(str(tmp_path / "out"))
    assert loaded.model.layers[2].mlp.gate is not None and loaded.config.kan_config["form"] == "gated"


def test_plot_draws_the_gate_as_the_last_stage(tmp_path, capsys):
    model = kallm.retrofit(tiny_model("llama"), last_n=1, form="gated")
    model.save_pretrained(tmp_path / "m")
    make_tiny_tokenizer().save_pretrained(tmp_path / "m")
    assert main(["plot", str(tmp_path / "m"), "--block", "2", "--stage", "2", "--out", str(tmp_path / "g.png"),
                 "--edges", "4"]) == 0
    assert (tmp_path / "g.png").is_file()
    assert main(["plot", str(tmp_path / "m"), "--block", "2", "--stage", "3"]) == 2
    assert "--stage must be between 0 and 2 (stage 2: the gate of form='gated')" in capsys.readouterr().err


def test_a_saved_config_whose_settings_build_no_gated_feedforward_is_refused_naming_the_form():
    from kallm.core.retrofit_config import RetrofitConfig

    with pytest.raises(ValueError, match="do not build a gated KAN feedforward: basis 'cheby2': degree must be"):
        RetrofitConfig(form="gated", degree=0)


def test_fit_init_of_a_three_stage_gated_form_is_refused_before_the_model_changes():
    model = tiny_model("llama")
    before = snapshot(model)
    with pytest.raises(ValueError, match="fit init of form='gated' needs a two-stage basis"):
        kallm.retrofit(model, last_n=1, form="gated", base="linear", init="fit", basis="cheby2>legendre>cheby2",
                       calibration=token_ids())
    with pytest.raises(ValueError, match="fit init of form='gated' needs a two-stage basis"):  # per block too
        kallm.retrofit(model, blocks={1: {"basis": "a>b>c"}, 2: {}}, form="gated", base="linear", init="fit",
                       calibration=token_ids())
    assert_unchanged(model, before)
