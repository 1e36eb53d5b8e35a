"""kallm.convert: exact changes of basis and degree, reported lossy projections, refusals."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

import kallm
from kallm.core.bases import RecurrenceBasis, make_basis
from kallm.testing.compare import logits_of
from kallm.testing.models import tiny_model

POLYNOMIALS = [name for name in kallm.list_bases() if isinstance(make_basis(name, 2), RecurrenceBasis)]
TOKENS = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(0))


def _retrofitted(basis="cheby2", degree=2, **options):
    model = kallm.retrofit(tiny_model("llama"), layers=[1, 2], basis=basis, degree=degree, **options)
    with torch.no_grad():  # a trained-looking layer: nonzero bias, moved input map
        for module in model.modules():
            if isinstance(module, kallm.KANLinear):
                module.bias.normal_(0.0, 0.1)
                module.input_scale.uniform_(0.5, 2.0)
                module.input_shift.normal_(0.0, 0.3)
    return model


def test_the_polynomial_bases_are_the_recurrence_families():
    assert sorted(POLYNOMIALS) == sorted(
        ["cheby1", "cheby2", "legendre", "jacobi", "gegenbauer", "hermite", "laguerre", "fibonacci", "lucas", "bessel"]
    )


@pytest.mark.parametrize("source", POLYNOMIALS)
def test_polynomial_conversions_at_equal_and_higher_degree_keep_the_logits(source):
    model = _retrofitted(source)
    reference = logits_of(model, TOKENS)
    for target in POLYNOMIALS:
        for degree in (2, 3):
            converted = kallm.convert(copy.deepcopy(model), basis=target, degree=degree)
            torch.testing.assert_close(logits_of(converted, TOKENS),
                                       reference, msg=f"{source} -> {target} at degree {degree}")
            assert converted.kallm_conversion_report.exact
            kan_config = converted.config.kan_config
            assert (kan_config["basis"], kan_config["degree"]) == (target, degree)
            layer = converted.model.layers[2].mlp.layers[1]
            assert (layer.basis.name, layer.basis.degree) == (target, degree)


def test_basis_options_of_the_target_reach_the_layers_and_the_config(tmp_path):
    model = _retrofitted("gegenbauer", alpha=0.7)
    reference = logits_of(model, TOKENS)
    converted = kallm.convert(model, basis="jacobi", degree=3, alpha=0.5, beta=2.0)
    torch.testing.assert_close(logits_of(converted, TOKENS), reference)
    assert converted.config.kan_config["basis_options"] == {"alpha": 0.5, "beta": 2.0}
    assert converted.model.layers[1].mlp.layers[0].basis.describe() == {
        "basis": "jacobi", "degree": 3, "alpha": 0.5, "beta": 2.0
    }


def test_a_converted_model_saves_and_reloads_identically(tmp_path):
    model = kallm.convert(_retrofitted("cheby2"), basis="legendre", degree=4)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.config.kan_config["basis"] == "legendre" and loaded.config.kan_config["degree"] == 4
    torch.testing.assert_close(logits_of(loaded, TOKENS), logits_of(model, TOKENS), rtol=0, atol=0)


def test_a_layer_is_converted_into_a_new_layer_and_keeps_its_input_map():
    torch.manual_seed(0)
    layer = kallm.KANLinear(6, 5, "hermite", 3)
    with torch.no_grad():
        layer.bias.normal_()
        layer.input_scale.uniform_(0.5, 2.0)
    x = torch.randn(7, 6)
    converted = kallm.convert(layer, basis="cheby1", degree=5)
    assert converted is not layer and (converted.basis.name, converted.basis.degree) == ("cheby1", 5)
    assert layer.basis.name == "hermite"
    torch.testing.assert_close(converted.input_scale, layer.input_scale, rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(converted(x), layer(x))


def test_polynomials_inside_bsplines_of_a_higher_order_are_exact_too():
    model = _retrofitted("legendre", degree=2)
    converted = kallm.convert(copy.deepcopy(model), basis="bspline", degree=3, grid_size=4)
    report = converted.kallm_conversion_report
    assert report.exact and report.max_relative_error < 1e-12
    torch.testing.assert_close(logits_of(converted, TOKENS), logits_of(model, TOKENS))


def test_a_lossy_conversion_is_refused_with_its_error_and_changes_nothing():
    model = _retrofitted("cheby2", degree=3)
    reference, kan_config = logits_of(model, TOKENS), copy.deepcopy(model.config.kan_config)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"lossy.*relative error \d.*allow_lossy=True"):
        kallm.convert(model, basis="legendre", degree=2)
    assert model.config.kan_config == kan_config
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    torch.testing.assert_close(logits_of(model, TOKENS), reference, rtol=0, atol=0)


@pytest.mark.parametrize(("basis", "degree"), [("legendre", 2), ("rbf", 6), ("bspline", 1)])
def test_an_allowed_lossy_conversion_warns_and_reports_its_error(basis, degree):
    model = _retrofitted("cheby2", degree=3)
    reference = logits_of(model, TOKENS)
    with pytest.warns(UserWarning, match="lossy KAN conversion"):
        converted = kallm.convert(model, basis=basis, degree=degree, allow_lossy=True)
    report = converted.kallm_conversion_report
    assert not report.exact and 1e-6 < report.max_relative_error < 1
    assert set(report.layers) == {f"model.layers.{b}.mlp.layers.{i}" for b in (1, 2) for i in (0, 1)}
    assert not torch.allclose(logits_of(converted, TOKENS), reference)
    assert converted.config.kan_config["basis"] == basis


def test_learned_rational_denominators_make_a_conversion_lossy():
    layer = kallm.KANLinear(4, 3, "rational", 2)
    with torch.no_grad():
        layer.basis_parameters[0].normal_(0.0, 0.5)
    with pytest.raises(ValueError, match="lossy"):
        kallm.convert(layer, basis="cheby2", degree=4)
    identical = kallm.convert(layer, basis="rational", degree=2)
    x = torch.randn(5, 4)
    with torch.no_grad():
        torch.testing.assert_close(identical(x), layer(x), rtol=0, atol=0)


def test_without_a_bias_the_constants_cannot_move_so_a_basis_change_is_lossy():
    layer = kallm.KANLinear(4, 3, "cheby1", 2, bias=False)
    with pytest.raises(ValueError, match="lossy"):
        kallm.convert(layer, basis="legendre")
    # cheby1 degree 2 contains t and 2t^2 - 1: degree 3 of the same family still holds both
    x = torch.randn(5, 4)
    with torch.no_grad():
        torch.testing.assert_close(kallm.convert(layer, basis="cheby1", degree=3)(x), layer(x))


def test_a_three_stage_feedforward_keeps_three_stages():
    model = _retrofitted("cheby2>legendre>cheby1")
    reference = logits_of(model, TOKENS)
    converted = kallm.convert(model, basis="hermite", degree=3)
    assert converted.config.kan_config["basis"] == "hermite>hermite>hermite"
    torch.testing.assert_close(logits_of(converted, TOKENS), reference)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"basis": "chebyshev"}, "unknown basis 'chebyshev'"),
        ({"basis": "legendre", "degree": 0}, "degree must be an integer >= 1"),
        ({"basis": "legendre", "width": 2.0}, "does not take options"),
        ({"basis": "legendre", "input_map": "tanh"}, "keeps each layer's"),
        ({"basis": "cheby2>legendre"}, "chained spec"),
    ],
)
def test_bad_arguments_are_refused_before_anything_changes(arguments, message):
    model = _retrofitted()
    kan_config = copy.deepcopy(model.config.kan_config)
    with pytest.raises(ValueError, match=message):
        kallm.convert(model, **arguments)
    assert model.config.kan_config == kan_config


def test_a_model_without_kan_layers_is_refused():
    with pytest.raises(ValueError, match="holds no KAN layers.*kallm.retrofit"):
        kallm.convert(tiny_model("llama"), basis="legendre")
    with pytest.raises(TypeError, match="needs a KANLinear"):
        kallm.convert("model", basis="legendre")
