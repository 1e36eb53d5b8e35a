"""KANLinear / KANFeedForward and the fused op: reference equality, gradients, precision,
memory, initialisation, parameter counts, user bases and bad input."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import kallm
from kallm.core import bases
from kallm.core.bases import Basis, make_basis, register_basis
from kallm.core.kan_function import kan_linear
from kallm.core.layers import KANFeedForward, KANLinear, intermediate_size_for_budget
from kallm.testing.reference import ReferenceKANFeedForward, ReferenceKANLinear, coefficients_to_weight

BUILTIN = kallm.list_bases()
SPECS = BUILTIN + ["cheby2+rbf", "bspline+rational"]
F64 = torch.float64


@pytest.fixture
def registry(monkeypatch):
    """A private copy of the registry, so that registrations in a test do not leak."""
    monkeypatch.setattr(bases, "_REGISTRY", dict(bases._REGISTRY))


@torch.no_grad()
def _randomise(module, seed=0):
    """Move input maps, biases and basis parameters away from their (trivial) initial values."""
    generator = torch.Generator().manual_seed(seed)
    for name, param in module.named_parameters():
        if not name.endswith("weight"):
            noise = torch.rand(param.shape, generator=generator, dtype=F64).to(param.dtype) - 0.5
            param.add_(noise)
    return module


def _layer_grads(layer):
    grads = {"weight": layer.weight.grad, "bias": layer.bias.grad if layer.bias is not None else None}
    if layer.input_scale is not None:
        grads.update(input_scale=layer.input_scale.grad, input_shift=layer.input_shift.grad)
    grads.update({f"basis_parameters.{i}": p.grad for i, p in enumerate(layer.basis_parameters)})
    return grads


def _reference_grads(reference):
    grads = {"weight": coefficients_to_weight(reference.coefficients.grad),
             "bias": reference.bias.grad if reference.bias is not None else None}
    if reference.input_scale is not None:
        grads.update(input_scale=reference.input_scale.grad, input_shift=reference.input_shift.grad)
    grads.update({f"basis_parameters.{i}": p.grad for i, p in enumerate(reference.basis_parameters)})
    return grads


def _assert_matches_reference(module, reference, layers, reference_layers, shape):
    x = torch.randn(*shape, dtype=F64, generator=torch.Generator().manual_seed(1), requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    y, y_ref = module(x), reference(x_ref)
    torch.testing.assert_close(y, y_ref, rtol=1e-6, atol=1e-12)
    grad = torch.randn_like(y)
    y.backward(grad)
    y_ref.backward(grad)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-6, atol=1e-12)
    for layer, reference_layer in zip(layers, reference_layers, strict=True):
        grads, expected = _layer_grads(layer), _reference_grads(reference_layer)
        assert grads.keys() == expected.keys()
        for name in grads:
            assert (grads[name] is None) == (expected[name] is None), name
            if grads[name] is not None:
                torch.testing.assert_close(grads[name], expected[name], rtol=1e-6, atol=1e-12, msg=name)


# ------------------------------------------------------------------- correctness


@pytest.mark.parametrize("spec", SPECS)
def test_layer_matches_textbook_formulation(spec):
    layer = _randomise(KANLinear(5, 4, spec, degree=3, dtype=F64))
    reference = ReferenceKANLinear(layer)
    _assert_matches_reference(layer, reference, [layer], [reference], (2, 3, 5))


@pytest.mark.parametrize("input_map,bias", [("tanh", True), ("affine", False), ("tanh", False)])
def test_layer_variants_match_textbook_formulation(input_map, bias):
    layer = _randomise(KANLinear(5, 4, "cheby2", degree=4, input_map=input_map, bias=bias, dtype=F64))
    reference = ReferenceKANLinear(layer)
    _assert_matches_reference(layer, reference, [layer], [reference], (7, 5))


@pytest.mark.parametrize("spec", ["cheby2>legendre", "cheby2+rbf>rational>bspline"])
def test_feedforward_specs_match_textbook_formulation(spec):
    ff = KANFeedForward(6, 5, spec, degree=3).to(F64)
    _randomise(ff)
    reference = ReferenceKANFeedForward(ff)
    _assert_matches_reference(ff, reference, ff.layers, reference.layers, (3, 4, 6))


@pytest.mark.parametrize("spec", SPECS)
def test_gradcheck(spec):
    basis = make_basis(spec, 3)
    generator = torch.Generator().manual_seed(0)

    def rand(*shape, low=-1.0, high=1.0):
        value = torch.rand(*shape, generator=generator, dtype=F64) * (high - low) + low
        return value.requires_grad_()

    k = basis.num_features
    params = [rand(*shape, low=-0.5, high=0.5) for shape in basis.parameter_shapes(2)]
    inputs = (rand(3, 2, low=-2, high=2), rand(2, k * 2), rand(2), rand(2, low=0.5, high=1.5), rand(2), *params)
    assert torch.autograd.gradcheck(lambda x, w, b, s, h, *p: kan_linear(x, w, b, s, h, basis, p), inputs)
    # the plain tanh map without bias
    assert torch.autograd.gradcheck(lambda x, w, *p: kan_linear(x, w, None, None, None, basis, p),
                                    (inputs[0], inputs[1], *params))


def test_only_the_requested_gradients_are_computed():
    layer = _randomise(KANLinear(4, 3, "cheby2", dtype=F64))
    x = torch.randn(5, 4, dtype=F64)
    layer.weight.requires_grad_(False)
    layer(x).sum().backward()
    assert layer.weight.grad is None and layer.bias.grad is not None and layer.input_scale.grad is not None
    reference = ReferenceKANLinear(layer)
    reference(x).sum().backward()
    torch.testing.assert_close(layer.input_scale.grad, reference.input_scale.grad)
    # only the bias trains: nothing else is computed, and the bias gradient is still right
    layer.zero_grad()
    layer.input_scale.requires_grad_(False)
    layer.input_shift.requires_grad_(False)
    layer(x).sum().backward()
    assert layer.input_scale.grad is None and torch.equal(layer.bias.grad, torch.full((3,), 5.0, dtype=F64))


def test_torch_compile_matches_eager():
    torch.manual_seed(0)
    ff = KANFeedForward(8, 6)
    x = torch.randn(2, 3, 8, requires_grad=True)
    compiled = torch.compile(ff, fullgraph=True)
    y = compiled(x)
    y.square().sum().backward()
    compiled_grads = [x.grad] + [p.grad for p in ff.parameters()]
    x.grad = None
    ff.zero_grad()
    y_eager = ff(x)
    y_eager.square().sum().backward()
    torch.testing.assert_close(y, y_eager, rtol=1e-5, atol=1e-6)
    for got, expected in zip(compiled_grads, [x.grad] + [p.grad for p in ff.parameters()], strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)


def test_torch_compile_falls_back_for_bases_differentiated_by_autograd():
    torch.manual_seed(0)
    ff = _randomise(KANFeedForward(8, 6, "rational"))
    x = torch.randn(5, 8)
    compiled = torch.compile(ff, backend="aot_eager")
    y = compiled(x)
    y.sum().backward()
    grad = ff.layers[0].basis_parameters[0].grad.clone()
    ff.zero_grad()
    ff(x).sum().backward()
    torch.testing.assert_close(y, ff(x))
    torch.testing.assert_close(grad, ff.layers[0].basis_parameters[0].grad)


# ------------------------------------------------------------------- precision


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs_and_weights(dtype):
    torch.manual_seed(0)
    ff = KANFeedForward(32, 24)
    x = torch.randn(4, 6, 32)
    expected = ff(x)
    half = copy.deepcopy(ff).to(dtype)
    x_half = x.to(dtype).requires_grad_()
    y = half(x_half)
    assert y.dtype == dtype
    assert (y.float() - expected).norm() / expected.norm() < 0.03
    y.float().square().sum().backward()
    assert x_half.grad.dtype == dtype and torch.isfinite(x_half.grad).all()
    for name, param in half.named_parameters():
        assert param.grad.dtype == dtype and torch.isfinite(param.grad).all(), name


def test_autocast_bf16_is_close_to_float32():
    torch.manual_seed(0)
    ff = KANFeedForward(32, 24, "cheby2+rbf")
    x = torch.randn(4, 6, 32, requires_grad=True)
    expected = ff(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = ff(x)
    assert y.dtype == torch.bfloat16
    assert (y.float() - expected).norm() / expected.norm() < 0.03
    y.float().sum().backward()
    assert x.grad.dtype == torch.float32 and torch.isfinite(x.grad).all()
    assert all(p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all() for p in ff.parameters())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("spec", SPECS)
def test_huge_inputs_stay_finite(spec, dtype):
    torch.manual_seed(0)
    ff = _randomise(KANFeedForward(6, 5, spec)).to(dtype)
    x = torch.tensor([[1e4, -1e4, 9999.0, -3e3, 0.0, 1e-3]] * 3, dtype=dtype)
    x[1] = x[1].flip(0)
    x.requires_grad_()
    y = ff(x)
    assert torch.isfinite(y).all()
    y.float().sum().backward()
    assert torch.isfinite(x.grad).all()
    for name, param in ff.named_parameters():
        assert torch.isfinite(param.grad).all(), name


# ------------------------------------------------------------------- tokens are independent


def test_each_token_depends_only_on_itself():
    torch.manual_seed(0)
    ff = _randomise(KANFeedForward(8, 6, "cheby2+rbf>legendre")).to(F64)
    x = torch.randn(3, 5, 8, dtype=F64, requires_grad=True)
    y = ff(x)
    for b in range(3):
        for t in range(5):
            torch.testing.assert_close(ff(x[b, t]), y[b, t], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ff(x[:, :2]), y[:, :2], rtol=1e-12, atol=1e-12)  # a prefix, as with a KV cache
    (grad,) = torch.autograd.grad(y[1, 2].sum(), x)
    others = torch.ones(3, 5, dtype=torch.bool)
    others[1, 2] = False
    assert grad[others].abs().max() == 0 and grad[1, 2].abs().max() > 0


def test_any_leading_shape_and_empty_batches():
    ff = KANFeedForward(8, 6)
    assert ff(torch.randn(2, 3, 4, 8)).shape == (2, 3, 4, 8)
    assert ff(torch.randn(8)).shape == (8,)
    x = torch.zeros(0, 8, requires_grad=True)
    y = ff(x)
    y.sum().backward()
    assert y.shape == (0, 8) and x.grad.shape == (0, 8)


# ------------------------------------------------------------------- memory


def _saved_bytes(model, x):
    """Bytes autograd keeps for backward in one forward pass, parameters excluded."""
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(x)
    return sum(storages.values())


@pytest.mark.parametrize("spec", ["cheby2", "bspline", "rational", "cheby2+rbf"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layer_saves_as_much_as_nn_linear(spec, dtype):
    x = torch.randn(64, 16, dtype=dtype, requires_grad=True)
    linear_bytes = _saved_bytes(nn.Linear(16, 8, dtype=dtype), x)
    assert linear_bytes == x.numel() * x.element_size()
    assert _saved_bytes(KANLinear(16, 8, spec, dtype=dtype), x) == linear_bytes


def test_feedforward_saves_only_its_layer_inputs_and_the_textbook_several_times_more():
    ff = KANFeedForward(48, 40)
    x = torch.randn(128, 48, requires_grad=True)
    saved = _saved_bytes(ff, x)
    assert saved == 4 * (48 + 40) * 128
    assert _saved_bytes(ReferenceKANFeedForward(ff), x) >= 4 * saved


# ------------------------------------------------------------------- init and parameter counts


@pytest.mark.parametrize("spec", SPECS)
def test_initialisation_preserves_variance(spec):
    torch.manual_seed(0)
    # many outputs: features with a large mean give each output a random offset
    layer = KANLinear(256, 1024, spec)
    x = torch.randn(256, 256)
    with torch.no_grad():
        ratio = layer(x).var() / x.var()
    assert 0.85 < ratio < 1.15


def test_reset_parameters_looks_up_torch_nn_init_when_called(monkeypatch):
    layer = KANLinear(4, 3)
    monkeypatch.setattr(torch.nn.init, "normal_", lambda tensor, mean=0.0, std=1.0: tensor.fill_(7.0))
    layer.reset_parameters()
    assert (layer.weight == 7.0).all()
    assert (layer.bias == 0).all() and (layer.input_scale == 1).all() and (layer.input_shift == 0).all()


@pytest.mark.parametrize("input_map", ["affine", "tanh"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("spec", SPECS)
def test_parameter_count_formula_matches_the_module(spec, input_map, bias):
    layer = KANLinear(7, 5, spec, 3, input_map=input_map, bias=bias)
    assert KANLinear.count_parameters(7, 5, spec, 3, input_map, bias) == sum(p.numel() for p in layer.parameters())
    ff = KANFeedForward(7, 5, f"{spec}>{spec}>cheby1", 3, input_map=input_map, bias=bias)
    assert KANFeedForward.count_parameters(7, 5, f"{spec}>{spec}>cheby1", 3, input_map=input_map, bias=bias) == sum(
        p.numel() for p in ff.parameters()
    )


def test_parameter_count_takes_the_constructor_arguments():
    options = dict(input_map="tanh", bias=False, dtype=F64, device="cpu", grid_size=3)
    ff = KANFeedForward(7, 5, "bspline>cheby2", 2, **options)
    assert KANFeedForward.count_parameters(7, 5, "bspline>cheby2", 2, **options) == sum(
        p.numel() for p in ff.parameters()
    )


@pytest.mark.parametrize("spec,options,features,extra", [
    ("cheby2", {}, 3, 0),  # P_0 folded: degree features, not degree + 1
    ("hermite", {}, 3, 0),
    ("bspline", {"grid_size": 4}, 4 + 3, 0),
    ("rbf", {}, 3, 0),
    ("rational", {}, 3 + 1, 3 * 7),  # numerator t^0..t^3 over Q; denominator b_1..b_3 per input
    ("rational", {"denominator_degree": 2}, 3 + 1, 2 * 7),
    ("cheby2+bspline", {"grid_size": 2}, 3 + 2 + 3, 0),
])
def test_parameter_formulas(spec, options, features, extra):
    in_features, out_features = 7, 5
    expected = out_features * in_features * features + out_features + 2 * in_features + extra
    assert KANLinear.count_parameters(in_features, out_features, spec, 3, **options) == expected
    assert sum(p.numel() for p in KANLinear(in_features, out_features, spec, 3, **options).parameters()) == expected


@pytest.mark.parametrize("spec", ["cheby2", "bspline", "rational", "cheby2+rbf", "cheby2>legendre>cheby1"])
def test_budget_helper_returns_the_largest_size_that_fits(spec):
    for budget in [10_000, 123_457, 1_000_000]:
        size = intermediate_size_for_budget(64, budget, spec, 2)
        assert KANFeedForward.count_parameters(64, size, spec, 2) <= budget
        assert KANFeedForward.count_parameters(64, size + 1, spec, 2) > budget
    exact = KANFeedForward.count_parameters(64, 37, spec, 2)
    assert intermediate_size_for_budget(64, exact, spec, 2) == 37


def test_budget_helper_sizes_half_of_smollm2s_mlp():
    mlp_parameters = 3 * 576 * 1536
    size = intermediate_size_for_budget(576, mlp_parameters // 2)
    assert size == 574 and KANFeedForward.count_parameters(576, 574) == 2 * 576 * 574 * 2 + 576 + 574 + 2 * (576 + 574)


def test_budget_helper_rejects_a_budget_that_is_too_small():
    smallest = KANFeedForward.count_parameters(64, 1)
    assert intermediate_size_for_budget(64, smallest) == 1
    with pytest.raises(ValueError, match=f"budget of {smallest - 1} is too small.*has {smallest}"):
        intermediate_size_for_budget(64, smallest - 1)
    with pytest.raises(TypeError, match="budget must be an integer"):
        intermediate_size_for_budget(64, 1e6)


# ------------------------------------------------------------------- structure


def test_state_dict_keys_are_stable():
    ff = KANFeedForward(6, 5, "rational>cheby2")
    assert list(ff.state_dict()) == [
        "layers.0.weight", "layers.0.bias", "layers.0.input_scale", "layers.0.input_shift",
        "layers.0.basis_parameters.0",
        "layers.1.weight", "layers.1.bias", "layers.1.input_scale", "layers.1.input_shift",
    ]
    assert ff.layers[0].weight.shape == (5, 3 * 6) and ff.layers[1].weight.shape == (6, 2 * 5)


def test_sequential_and_parallel_specs_build_the_right_layers():
    ff = KANFeedForward(6, 5, "cheby2+rbf>legendre>bspline", degree=3, grid_size=2)
    assert [(layer.in_features, layer.out_features) for layer in ff.layers] == [(6, 5), (5, 5), (5, 6)]
    assert [layer.basis.describe()["basis"] for layer in ff.layers] == ["cheby2+rbf", "legendre", "bspline"]
    assert [layer.weight.shape[1] for layer in ff.layers] == [6 * 6, 3 * 5, 5 * 5]
    same = KANFeedForward(6, 5, "hermite")
    assert [layer.basis.name for layer in same.layers] == ["hermite", "hermite"]


def test_basis_options_go_to_the_stages_that_take_them():
    ff = KANFeedForward(6, 5, "bspline>cheby2+rbf", 2, grid_size=3, width=0.5, input_map="tanh", bias=False)
    assert [layer.basis.describe() for layer in ff.layers] == [
        {"basis": "bspline", "degree": 2, "grid_size": 3},
        {"basis": "cheby2+rbf", "members": [{"basis": "cheby2", "degree": 2}, {"basis": "rbf", "degree": 2, "width": 0.5}]},
    ]
    assert all(layer.input_map == "tanh" and layer.bias is None for layer in ff.layers)
    with pytest.raises(ValueError, match="options \\['alpha'\\] are not taken by any stage of 'bspline>cheby2'"):
        KANFeedForward(6, 5, "bspline>cheby2", alpha=1.0)


# ------------------------------------------------------------------- user bases


class _Sine(Basis):
    """Only ``values``: differentiated by the op's autograd recompute."""

    def values(self, t, params):
        return [torch.sin(k * t) for k in range(1, self.degree + 1)]


class _Wave(Basis):
    """A learnable frequency per input channel."""

    def parameter_shapes(self, in_features):
        return [(in_features,)]

    def initial_parameters(self, in_features):
        return [torch.ones(in_features)]

    def values(self, t, params):
        (frequency,) = params
        return [torch.cos(k * frequency * t) - 1 for k in range(1, self.degree + 1)]


class _Power(Basis):
    """Closed-form derivatives, one of them a plain number: skips autograd in backward."""

    has_derivatives = True

    def values(self, t, params):
        return [t ** k for k in range(1, self.degree + 1)]

    def derivatives(self, t, values):
        return [1.0] + [k * values[k - 2] for k in range(2, self.degree + 1)]


@pytest.mark.parametrize("factory", [_Sine, _Wave, _Power])
def test_user_basis_works_end_to_end(registry, factory):
    register_basis("user", factory)
    assert "user" in kallm.list_bases()
    layer = _randomise(KANLinear(5, 4, "user", 3, dtype=F64))
    reference = ReferenceKANLinear(layer)
    _assert_matches_reference(layer, reference, [layer], [reference], (6, 5))
    params = [p.detach().clone().requires_grad_() for p in layer.parameters()]
    x = torch.randn(4, 5, dtype=F64, requires_grad=True)
    w, b, s, h, *basis_params = params
    assert torch.autograd.gradcheck(lambda *a: kan_linear(*a[:5], layer.basis, a[5:]), (x, w, b, s, h, *basis_params))
    ff = KANFeedForward(6, 5, "user>cheby2+user", 2)
    y = ff(torch.randn(3, 6))
    y.sum().backward()
    assert all(p.grad is not None for p in ff.parameters())


# ------------------------------------------------------------------- bad input


@pytest.mark.parametrize("build", [
    lambda: KANLinear(4, 3, "chebyshev"),
    lambda: KANLinear(4, 3, "cheby2+foo"),
    lambda: KANFeedForward(4, 3, "cheby2>foo"),
])
def test_unknown_basis_lists_the_valid_choices(build):
    with pytest.raises(ValueError, match="unknown basis '(chebyshev|foo)'") as error:
        build()
    assert all(name in str(error.value) for name in BUILTIN)


@pytest.mark.parametrize("degree", [0, -2, 2.0])
def test_degree_below_one_is_rejected(degree):
    with pytest.raises(ValueError, match="degree must be an integer >= 1"):
        KANLinear(4, 3, degree=degree)
    with pytest.raises(ValueError, match="degree must be an integer >= 1"):
        KANFeedForward(4, 3, degree=degree)


@pytest.mark.parametrize("size", [0, -1, 2.5, True])
def test_non_positive_sizes_are_rejected(size):
    for build, name in [(lambda: KANLinear(size, 3), "in_features"), (lambda: KANLinear(3, size), "out_features"),
                        (lambda: KANFeedForward(size, 3), "hidden_size"),
                        (lambda: KANFeedForward(3, size), "intermediate_size"),
                        (lambda: intermediate_size_for_budget(size, 10_000), "hidden_size")]:
        with pytest.raises(ValueError, match=f"{name} must be a positive integer"):
            build()


def test_wrong_last_dimension_is_rejected():
    with pytest.raises(ValueError, match=r"last dimension is in_features=4, got shape \(2, 5\)"):
        KANLinear(4, 3)(torch.randn(2, 5))
    with pytest.raises(ValueError, match="in_features=8"):
        KANFeedForward(8, 6)(torch.randn(3, 6))


def test_integer_input_is_rejected():
    with pytest.raises(TypeError, match="needs a floating point input, got torch.int64"):
        KANLinear(4, 3)(torch.ones(2, 4, dtype=torch.long))


def test_dtype_mismatch_without_autocast_is_rejected():
    with pytest.raises(TypeError, match="input of dtype torch.bfloat16 but its weights are torch.float32.*autocast"):
        KANLinear(4, 3)(torch.randn(2, 4, dtype=torch.bfloat16))


def test_non_float_parameter_dtype_is_rejected():
    for dtype in [torch.int32, "float32", float]:
        with pytest.raises(TypeError, match="needs a floating point torch.dtype"):
            KANLinear(4, 3, dtype=dtype)


@pytest.mark.parametrize("options,message", [
    ({"bias": "yes"}, "bias must be True or False, got 'yes'"),
    ({"bias": 1}, "bias must be True or False, got 1"),
    ({"bias": None}, "bias must be True or False, got None"),
    ({"input_map": ["tanh"]}, "unknown input_map \\['tanh'\\]; valid choices: affine, tanh"),
    ({"input_map": None}, "unknown input_map None"),
    ({"degree": True}, "degree must be an integer >= 1 and <= 100, got True"),
    ({"degree": 30, "basis": "bessel"}, "largest degree that stays within it with these options is 20"),
    ({"basis": "gegenbauer", "alpha": float("inf")}, "alpha must be > -0.5 and != 0 \\(a finite number\\), got inf"),
    ({"basis": "gegenbauer", "alpha": "x"}, "alpha must be .*, got 'x'"),
    ({"basis": "rational", "denominator_degree": True}, "denominator_degree must be an integer >= 1 and <= 100"),
    ({"basis": "rbf", "width": float("inf")}, "width must be > 0 \\(a finite number\\), got inf"),
    ({"basis": "cheby2>bspline", "grid_size": False}, "grid_size must be an integer"),
])
def test_every_layer_option_is_checked_for_type_and_range(options, message):
    for build in (KANLinear, KANFeedForward, KANLinear.count_parameters, KANFeedForward.count_parameters):
        if build in (KANLinear, KANLinear.count_parameters) and ">" in options.get("basis", ""):
            continue  # stages are a KANFeedForward notion
        with pytest.raises(ValueError, match=message):
            build(4, 3, **options)


@pytest.mark.parametrize("options,message", [
    ({"basis": "jacobi", "gamma": 1.0}, "does not take options \\['gamma'\\]; valid options: alpha, beta"),
    ({"basis": "bspline", "grid_size": 0}, "grid_size must be an integer >= 1"),
    ({"basis": "rbf", "width": -1.0}, "width must be > 0"),
    ({"basis": "cheby2", "grid_size": 3}, "valid options: none besides degree"),
])
def test_bad_basis_options_are_rejected(options, message):
    with pytest.raises(ValueError, match=message):
        KANLinear(4, 3, **options)
    with pytest.raises(ValueError, match=message):
        KANFeedForward(4, 3, **options)


def test_bad_input_map_is_rejected():
    with pytest.raises(ValueError, match="unknown input_map 'sigmoid'; valid choices: affine, tanh"):
        KANLinear(4, 3, input_map="sigmoid")
    with pytest.raises(ValueError, match="unknown input_map"):
        KANLinear.count_parameters(4, 3, input_map="layernorm")


@pytest.mark.parametrize("spec,error,message", [
    ("cheby2>", ValueError, "malformed basis spec 'cheby2>'"),
    (">cheby2", ValueError, "malformed basis spec"),
    (None, TypeError, "basis must be a string"),
])
def test_malformed_specs_are_rejected(spec, error, message):
    with pytest.raises(error, match=message):
        KANFeedForward(4, 3, spec)
