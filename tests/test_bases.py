"""Basis families: values against closed forms, derivatives, the in-place path, options, registry."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from kallm.core import bases
from kallm.core.bases import Basis, list_bases, make_basis, register_basis

BUILTIN = ["cheby1", "cheby2", "legendre", "jacobi", "gegenbauer", "hermite", "laguerre", "bessel",
           "fibonacci", "lucas", "bspline", "rbf", "rational"]
T = torch.linspace(-1.0, 1.0, 201, dtype=torch.float64)


@pytest.fixture
def registry(monkeypatch):
    """A private copy of the registry, so that registrations in a test do not leak."""
    monkeypatch.setattr(bases, "_REGISTRY", dict(bases._REGISTRY))


def _params(basis, in_features, seed=0):
    """Non-trivial basis parameters (the rational denominator starts at zero)."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.rand(shape, generator=generator, dtype=torch.float64) - 0.5
            for shape in basis.parameter_shapes(in_features)]


def test_list_bases_names_every_builtin():
    assert list_bases() == BUILTIN


# ----------------------------------------------------------------- closed forms


def _binom(a, k):
    return math.gamma(a + 1) / (math.gamma(k + 1) * math.gamma(a - k + 1))


def _unit(n):
    return np.eye(n + 1)[n]


def _closed_form(name, n, t, **options):
    """Independent formulas (explicit sums or numpy) for the n-th polynomial of each family."""
    x = t.numpy()
    if name == "cheby1":
        return np.polynomial.chebyshev.chebval(x, _unit(n))
    if name == "cheby2":
        return sum((-1) ** k * math.comb(n - k, k) * (2 * x) ** (n - 2 * k) for k in range(n // 2 + 1))
    if name == "legendre":
        return np.polynomial.legendre.legval(x, _unit(n))
    if name == "hermite":
        return np.polynomial.hermite.hermval(x, _unit(n))
    if name == "laguerre":
        return np.polynomial.laguerre.lagval(x, _unit(n))
    if name == "gegenbauer":
        a = options["alpha"]
        return sum((-1) ** k * math.gamma(n - k + a) / (math.gamma(a) * math.factorial(k) * math.factorial(n - 2 * k))
                   * (2 * x) ** (n - 2 * k) for k in range(n // 2 + 1))
    if name == "jacobi":
        a, b = options["alpha"], options["beta"]
        return sum(_binom(n + a, n - s) * _binom(n + b, s) * ((x - 1) / 2) ** s * ((x + 1) / 2) ** (n - s)
                   for s in range(n + 1))
    if name == "bessel":
        return sum(math.factorial(n + k) / (math.factorial(n - k) * math.factorial(k)) * (x / 2) ** k
                   for k in range(n + 1))
    if name == "fibonacci":  # the n-th by degree is F_{n+1}
        return sum(math.comb(n - k, k) * x ** (n - 2 * k) for k in range(n // 2 + 1))
    if name == "lucas":
        return sum(n / (n - k) * math.comb(n - k, k) * x ** (n - 2 * k) for k in range(n // 2 + 1))
    raise AssertionError(name)


POLYNOMIAL_CASES = [
    ("cheby1", {}), ("cheby2", {}), ("legendre", {}), ("hermite", {}), ("laguerre", {}), ("bessel", {}),
    ("fibonacci", {}), ("lucas", {}), ("gegenbauer", {"alpha": 1.5}), ("gegenbauer", {"alpha": 0.25}),
    ("jacobi", {"alpha": 1.0, "beta": 1.0}), ("jacobi", {"alpha": 0.5, "beta": -0.5}),
]


@pytest.mark.parametrize("name,options", POLYNOMIAL_CASES)
def test_polynomials_match_closed_forms(name, options):
    basis = make_basis(name, 6, **options)
    values = basis.values(T, [])
    assert len(values) == 6 == basis.num_features
    for n, value in enumerate(values, start=1):
        expected = torch.from_numpy(np.asarray(_closed_form(name, n, T, **options), dtype=np.float64))
        torch.testing.assert_close(value, expected.expand_as(T), rtol=1e-10, atol=1e-10)


def test_special_cases_agree_across_families():
    legendre = make_basis("legendre", 5).values(T, [])
    cheby2 = make_basis("cheby2", 5).values(T, [])
    for family, expected in [(make_basis("gegenbauer", 5, alpha=0.5), legendre),
                             (make_basis("gegenbauer", 5, alpha=1.0), cheby2),
                             (make_basis("jacobi", 5, alpha=0.0, beta=0.0), legendre)]:
        for value, reference in zip(family.values(T, []), expected):
            torch.testing.assert_close(value, reference)


def test_bspline_partition_of_unity_and_local_support():
    basis = make_basis("bspline", 3, grid_size=4)
    values = torch.stack(basis.values(T, []))
    assert basis.num_features == 4 + 3 == values.shape[0]
    assert (values >= 0).all()
    torch.testing.assert_close(values.sum(0), torch.ones_like(T))
    # spline j lives on knots j .. j + order + 1, i.e. on order + 1 of the grid's intervals
    spacing = 2.0 / 4
    for j, value in enumerate(values):
        left, right = -1.0 + (j - 3) * spacing, -1.0 + (j + 1) * spacing
        assert (value[(T <= left) | (T >= right)] == 0).all()
        assert (value[(T > left + 1e-9) & (T < right - 1e-9)] > 0).all()


def test_rbf_is_gaussian_on_evenly_spaced_centres():
    basis = make_basis("rbf", 5, width=2.0)
    centres = torch.linspace(-1, 1, 5, dtype=torch.float64)
    w = 2.0 * 0.5
    for value, c in zip(basis.values(T, []), centres):
        torch.testing.assert_close(value, torch.exp(-(((T - c) / w) ** 2)))


def test_rational_denominator_never_reaches_zero():
    basis = make_basis("rational", 3, denominator_degree=4)
    assert basis.num_features == 4
    t = T.unsqueeze(-1)
    big = [torch.tensor([[1e3], [-1e3], [1e3], [-1e3]], dtype=torch.float64)]
    values = basis.values(t, big)
    assert all(torch.isfinite(v).all() for v in values)
    assert values[0].abs().max() <= 1.0  # 1 / Q with Q >= 1
    # with b = 0 it is a plain polynomial: 1, t, t^2, t^3
    plain = basis.values(t, [torch.zeros(4, 1, dtype=torch.float64)])
    for k, value in enumerate(plain):
        torch.testing.assert_close(value, t**k)


# ------------------------------------------------------------ derivatives, in-place path


@pytest.mark.parametrize("name", BUILTIN + ["cheby2+rbf+bspline"])
@pytest.mark.parametrize("degree", [1, 2, 5])
def test_in_place_values_and_input_gradient_match_autograd(name, degree):
    basis = make_basis(name, degree)
    t = T.unsqueeze(-1).expand(-1, 3).contiguous()
    params = _params(basis, 3)
    values = basis.values(t, params)
    # write_values into views of a feature buffer laid out like the fused op's
    buffer = torch.full((t.shape[0], basis.num_features * 3), float("nan"), dtype=torch.float64)
    blocks = list(buffer.view(t.shape[0], basis.num_features, 3).unbind(1))
    basis.write_values(t, params, blocks)
    for block, value in zip(blocks, values, strict=True):
        torch.testing.assert_close(block, value.expand_as(t), rtol=1e-12, atol=1e-12)
    assert basis.has_derivatives == (name != "rational")  # rational has parameters: autograd recompute
    if not basis.has_derivatives:
        return
    grads = [torch.randn(t.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(k))
             for k in range(basis.num_features)]
    grad_t = basis.input_gradient(t, blocks, [g.clone() for g in grads])
    t_leaf = t.clone().requires_grad_()
    loss = sum((value * grad).sum() for value, grad in zip(basis.values(t_leaf, []), grads))
    (expected,) = torch.autograd.grad(loss, t_leaf)
    assert torch.isfinite(grad_t).all()  # also at t = +-1, where cos(n acos t) would not be
    torch.testing.assert_close(grad_t, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", BUILTIN)
def test_no_feature_is_constant(name):
    basis = make_basis(name, 3)
    t = T.unsqueeze(-1)
    for k, value in enumerate(basis.values(t, _params(basis, 1))):
        assert value.std() > 1e-3, f"{name} feature {k} is constant: it should be folded into the bias"


@pytest.mark.parametrize("name", BUILTIN)
def test_defaults_build_and_describe_round_trips(name):
    basis = make_basis(name)
    assert basis.degree == 2
    described = basis.describe()
    assert described["basis"] == name
    rebuilt = make_basis(described.pop("basis"), **described)
    assert rebuilt.describe() == basis.describe()
    assert basis.mean_square() > 0


def test_parallel_spec_concatenates_members():
    basis = make_basis("bspline+cheby2", 3, grid_size=2)
    assert basis.num_features == (2 + 3) + 3
    assert basis.describe()["basis"] == "bspline+cheby2"
    values = basis.values(T, [])
    expected = make_basis("bspline", 3, grid_size=2).values(T, []) + make_basis("cheby2", 3).values(T, [])
    for value, reference in zip(values, expected, strict=True):
        torch.testing.assert_close(value, reference)


# ----------------------------------------------------------------- bad input


@pytest.mark.parametrize("name", BUILTIN + ["cheby2+rbf"])
@pytest.mark.parametrize("degree", [0, -1, 1.5, True, "2"])
def test_degree_below_one_or_not_an_integer_is_rejected(name, degree):
    with pytest.raises(ValueError, match="degree must be an integer >= 1"):
        make_basis(name, degree)


@pytest.mark.parametrize("spec", ["chebyshev", "cheby2+sine", "Cheby2", ""])
def test_unknown_basis_names_the_valid_choices(spec):
    with pytest.raises(ValueError, match="unknown basis") as error:
        make_basis(spec)
    assert all(name in str(error.value) for name in BUILTIN)


def test_basis_must_be_a_string():
    with pytest.raises(TypeError, match="basis must be a string"):
        make_basis(["cheby2"])


@pytest.mark.parametrize("name,options,message", [
    ("cheby2", {"alpha": 1.0}, "does not take options \\['alpha'\\]; valid options: none besides degree"),
    ("jacobi", {"gamma": 1.0}, "valid options: alpha, beta"),
    ("bspline", {"grid": 5}, "valid options: grid_size"),
    ("jacobi", {"alpha": -1.0}, "alpha must be > -1"),
    ("jacobi", {"beta": -2.0}, "beta must be > -1"),
    ("gegenbauer", {"alpha": 0.0}, "alpha must be > -0.5 and != 0"),
    ("gegenbauer", {"alpha": -0.5}, "alpha must be > -0.5 and != 0"),
    ("bspline", {"grid_size": 0}, "grid_size must be an integer >= 1"),
    ("bspline", {"grid_size": 2.5}, "grid_size must be an integer >= 1"),
    ("rbf", {"width": 0.0}, "width must be > 0"),
    ("rational", {"denominator_degree": 0}, "denominator_degree must be an integer >= 1"),
    ("cheby2+rbf", {"grid_size": 3}, "not taken by any basis in 'cheby2\\+rbf'; valid options: width"),
])
def test_bad_basis_options_are_rejected(name, options, message):
    with pytest.raises(ValueError, match=message):
        make_basis(name, 2, **options)


# Every option of every built-in basis, with values of the wrong type (bool is no number) or out of range.
BAD_OPTION_VALUES = {
    "alpha": {"gegenbauer": "> -0.5 and != 0", "jacobi": "> -1"},
    "beta": {"jacobi": "> -1"},
    "width": {"rbf": "> 0"},
    "grid_size": {"bspline": "an integer >= 1 and <= 100"},
    "denominator_degree": {"rational": "an integer >= 1 and <= 100"},
}
REAL_BAD = [float("inf"), float("-inf"), float("nan"), "x", "1.5", True, None, [1.0], -5.0]
INTEGER_BAD = [0, -1, 2.5, 2.0, True, False, "3", float("inf"), 101]  # None: rational's default


@pytest.mark.parametrize("name", BUILTIN)
def test_every_option_of_every_basis_refuses_bad_types_and_ranges(name):
    takes = bases._REGISTRY[name].option_names
    assert set(takes) <= set(BAD_OPTION_VALUES), f"{name} has options this test does not know: {takes}"
    for option in takes:
        valid = BAD_OPTION_VALUES[option][name]
        for value in INTEGER_BAD if "integer" in valid else REAL_BAD:
            with pytest.raises(ValueError) as error:
                make_basis(name, 2, **{option: value})
            message = str(error.value)
            assert f"basis {name!r}: {option} must be {valid}" in message.replace(" (a finite number)", ""), message
            assert f"got {value!r}" in message
    max_degree = bases._REGISTRY[name].max_degree
    for degree in [0, -1, 2.5, 2.0, True, False, "3", float("inf"), None, max_degree + 1]:
        with pytest.raises(ValueError, match=f"basis '{name}': degree must be an integer >= 1 and <= {max_degree}, got"):
            make_basis(name, degree)


def test_numpy_and_other_real_numbers_are_accepted():
    assert make_basis("gegenbauer", 2, alpha=np.float32(0.75)).describe()["alpha"] == 0.75
    basis = make_basis("bspline", np.int64(3), grid_size=np.int64(4))
    assert basis.describe() == {"basis": "bspline", "degree": 3, "grid_size": 4}
    assert type(basis.degree) is int and type(basis.grid_size) is int  # JSON-safe in a kan_config


# The largest degree whose features stay within FEATURE_LIMIT on [-1, 1] (with default options); also in
# docs/layers.md. The others stop at their max_degree (100, bspline 20).
FLOAT32_DEGREE_LIMITS = {"hermite": 33, "bessel": 20}


@pytest.mark.parametrize("name", BUILTIN)
def test_degree_limit_keeps_a_fresh_float32_layer_finite_and_is_refused_beyond(name):
    from kallm.core.layers import KANLinear

    limit = FLOAT32_DEGREE_LIMITS.get(name, bases._REGISTRY[name].max_degree)
    layer = KANLinear(4, 3, name, limit)
    # every point of the domain [-1, 1] and far beyond it (the input map saturates there)
    x = torch.cat([torch.linspace(-1e4, 1e4, 401), torch.linspace(-3.0, 3.0, 399)]).reshape(-1, 4)
    x.requires_grad_()
    y = layer(x)
    y.backward(torch.randn_like(y))
    assert torch.isfinite(y).all() and torch.isfinite(x.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in layer.parameters())
    if name in FLOAT32_DEGREE_LIMITS:
        message = (f"basis '{name}' at degree {limit + 1}: feature {limit + 1} reaches .* above the 1e\\+24 .* "
                   f"float32; the largest degree that stays within it with these options is {limit} ")
    else:
        message = f"degree must be an integer >= 1 and <= {limit}, got {limit + 1}"
    with pytest.raises(ValueError, match=message):
        make_basis(name, limit + 1)


def test_bessel_degree_30_is_refused_instead_of_giving_non_finite_outputs():
    with pytest.raises(ValueError, match="'bessel' at degree 30: .* largest degree .* is 20"):
        make_basis("bessel", 30)


@pytest.mark.parametrize("name,options,message", [
    ("gegenbauer", {"alpha": 1e6}, "largest degree that stays within it with these options is 4"),
    ("gegenbauer", {"alpha": 1e30}, "no degree stays within it with these options; choose smaller option values"),
    ("jacobi", {"alpha": 1e9, "beta": 2.0}, "with these options is 2"),
    ("gegenbauer", {"alpha": 1e-13}, "features nearly vanish .*mean square .* below 1e-24"),
    ("rbf", {"width": 1e-30}, "features nearly vanish"),
])
def test_options_that_overflow_or_vanish_in_float32_are_refused(name, options, message):
    with pytest.raises(ValueError, match=message) as error:
        make_basis(name, 6, **options)
    assert all(f"{key}={value!r}" in str(error.value) for key, value in options.items())


def test_a_user_basis_that_overflows_is_refused(registry):
    class Exploding(Basis):
        def values(self, t, params):
            return [t * 10.0 ** (30 * k) for k in range(1, self.degree + 1)]

    register_basis("exploding", Exploding)
    with pytest.raises(ValueError, match="'exploding' at degree 2: feature 1 reaches 1e\\+30 .* lower the degree"):
        make_basis("exploding", 2)


def test_parallel_spec_passes_options_to_the_members_that_take_them():
    basis = make_basis("bspline+rbf", 2, grid_size=3, width=0.5)
    assert [m.describe() for m in basis.members] == [
        {"basis": "bspline", "degree": 2, "grid_size": 3}, {"basis": "rbf", "degree": 2, "width": 0.5}
    ]


# ----------------------------------------------------------------- registry


class _Sine(Basis):
    def values(self, t, params):
        return [torch.sin(k * t) for k in range(1, self.degree + 1)]


def test_register_basis_makes_a_user_basis_selectable(registry):
    register_basis("sine", _Sine)
    assert list_bases() == BUILTIN + ["sine"]
    basis = make_basis("sine", 3)
    assert basis.name == "sine" and basis.describe() == {"basis": "sine", "degree": 3}
    assert not basis.has_derivatives
    with pytest.raises(ValueError, match="does not take options"):
        make_basis("sine", 3, width=1.0)
    assert make_basis("cheby2+sine", 2).num_features == 4


@pytest.mark.parametrize("name", ["", "a+b", "a>b", "a b", 3, None])
def test_register_basis_rejects_bad_names(registry, name):
    with pytest.raises(ValueError, match="basis name must be a non-empty string"):
        register_basis(name, _Sine)


def test_register_basis_rejects_duplicates_unless_overwriting(registry):
    with pytest.raises(ValueError, match="'cheby2' is already registered; pass overwrite=True"):
        register_basis("cheby2", _Sine)
    register_basis("cheby2", _Sine, overwrite=True)
    assert isinstance(make_basis("cheby2"), _Sine)


def test_register_basis_checks_the_factory(registry):
    with pytest.raises(TypeError, match="must be callable"):
        register_basis("thing", 42)
    register_basis("thing", lambda degree: "not a basis")
    with pytest.raises(TypeError, match="returned str, not a Basis"):
        make_basis("thing")


def test_a_basis_returning_the_wrong_number_of_features_is_reported(registry):
    class Short(_Sine):
        @property
        def num_features(self):
            return self.degree + 1

    register_basis("short", Short)
    basis = make_basis("short", 2)
    blocks = [torch.empty(4) for _ in range(3)]
    with pytest.raises(ValueError, match="returned 2 features but its num_features is 3"):
        basis.write_values(torch.zeros(4), [], blocks)
