"""The KAN op's inference path (no autograd function) gives the training path's results, for every basis,
dtype and token count, and is taken exactly when no gradient can flow."""

from __future__ import annotations

import pytest
import torch

import kallm
from kallm.core import kan_function
from kallm.core.kan_function import KANLinearFunction
from kallm.core.layers import KANFeedForward, KANLinear

SPECS = kallm.list_bases() + ["cheby2+rbf", "bspline+rational"]
#: dtype -> (rtol, atol relative to the output's scale): float32/64 differ by rounding of the input map; half
#: precision features may round to a neighbouring value before the half precision matrix multiply
TOLERANCE = {torch.float64: (1e-10, 1e-12), torch.float32: (1e-5, 1e-5), torch.bfloat16: (0, 3e-2),
             torch.float16: (0, 5e-3)}


@torch.no_grad()
def _randomised_layer(spec, in_features, out_features, dtype, seed=0):
    torch.manual_seed(seed)
    layer = KANLinear(in_features, out_features, spec, degree=3)
    for name, param in layer.named_parameters():
        if not name.endswith("weight"):  # move input maps, biases and basis parameters off their initial values
            param.add_(torch.rand_like(param) - 0.5)
    return layer.to(dtype)


def _training_path(layer, x):
    y = KANLinearFunction.apply(x.reshape(-1, layer.in_features), layer.weight, layer.bias, layer.input_scale,
                                layer.input_shift, layer.basis, *layer.basis_parameters)
    return y.reshape(*x.shape[:-1], layer.out_features)


def _refuse_training_path(monkeypatch):
    def refuse(*args):
        raise AssertionError("the autograd function ran where no gradient can flow")

    monkeypatch.setattr(KANLinearFunction, "apply", refuse)


def _assert_same(y, expected, dtype):
    rtol, atol = TOLERANCE[dtype]
    assert y.dtype == expected.dtype and y.shape == expected.shape
    torch.testing.assert_close(y, expected, rtol=rtol, atol=atol * float(expected.abs().max().float()) + 1e-30)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("spec", SPECS)
def test_inference_path_equals_training_path(spec, dtype):
    layer = _randomised_layer(spec, 13, 7, dtype)  # odd sizes: no aligned rows
    for tokens in (1, 8, 64):
        x = torch.randn(2, tokens, 13, generator=torch.Generator().manual_seed(tokens)).to(dtype)
        expected = _training_path(layer, x).detach()
        with torch.no_grad():
            y = layer(x)
        assert y.grad_fn is None and y.is_contiguous()
        _assert_same(y, expected, dtype)


@pytest.mark.parametrize("spec", ["cheby2", "bspline", "rational"])
def test_inference_path_under_autocast(spec):
    layer = _randomised_layer(spec, 13, 7, torch.float32)
    x = torch.randn(1, 8, 13)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = _training_path(layer, x).detach()
        with torch.no_grad():
            y = layer(x)
    assert y.dtype == torch.bfloat16
    _assert_same(y, expected, torch.bfloat16)


def test_inference_path_at_decoding_sizes_of_smollm2():
    """At hidden size 576 the aligned-row buffer is in play (width 574 is not a multiple of 16)."""
    torch.manual_seed(0)
    ff = KANFeedForward(576, 574)
    for tokens in (1, 8, 64, 600):  # 600 tokens: above the direct-tanh limit, the sigmoid form of the input map
        x = torch.randn(1, tokens, 576)
        expected = x
        for layer in ff.layers:
            expected = _training_path(layer, expected).detach()
        with torch.inference_mode():
            y = ff(x)
        _assert_same(y, expected, torch.float32)


def test_inference_path_runs_exactly_when_no_gradient_can_flow(monkeypatch):
    layer = _randomised_layer("cheby2", 5, 3, torch.float32)
    x = torch.randn(4, 5)
    assert layer(x).grad_fn is not None  # parameters require gradients: the training path
    assert layer(x.requires_grad_()).grad_fn is not None
    _refuse_training_path(monkeypatch)
    with torch.no_grad():
        layer(x)
    with torch.inference_mode():
        layer(x.detach())
    layer.requires_grad_(False)
    assert layer(x.detach()).grad_fn is None  # a frozen layer on a plain input needs no graph either


def test_inference_path_works_for_the_op_called_directly(monkeypatch):
    layer = _randomised_layer("legendre", 6, 4, torch.float32)
    x = torch.randn(3, 6)
    expected = _training_path(layer, x).detach()
    _refuse_training_path(monkeypatch)
    with torch.no_grad():
        y = kan_function.kan_linear(x, layer.weight, layer.bias, layer.input_scale, layer.input_shift, layer.basis)
    _assert_same(y, expected, torch.float32)

