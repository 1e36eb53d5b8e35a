"""The fused Triton kernels of the KAN op (kallm/core/triton_kan.py) against the plain op, their dispatch and
their torch.compile support.

Without a GPU the kernels run on CPU tensors in Triton's interpreter (TRITON_INTERPRET=1, which conftest.py
sets before Triton is imported); with one, on the GPU (scripts/gpu_check.sh). The interpreter of Triton 3.9 multiplies
bfloat16 tiles as raw 16-bit integers in ``tl.dot``, so bfloat16 is checked on a GPU only; float32, float64
and float16 are checked everywhere.
"""

from __future__ import annotations

import importlib.util
import os
import sys

import pytest
import torch

from kallm.core import kan_function
from kallm.core.bases import Chebyshev2, RecurrenceBasis, make_basis
from kallm.core.layers import KANFeedForward, KANLinear
from kallm.testing.compare import check_compiles_as_one_graph

HAS_TRITON = importlib.util.find_spec("triton") is not None
needs_triton = pytest.mark.skipif(
    not HAS_TRITON, reason="Triton is not installed (the dev extra installs it; its interpreter runs these kernels)"
)
DEVICE = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"
ON_INTERPRETER = DEVICE == "cpu"
F64 = torch.float64


@pytest.fixture
def triton_kan():
    from kallm.core import triton_kan

    return triton_kan


@pytest.fixture
def fused_on_cpu(monkeypatch):
    """Let ``kan_linear`` dispatch CPU tensors to the kernels (run by the interpreter)."""
    monkeypatch.setattr(kan_function, "FUSED_DEVICE_TYPES", ("cuda", "cpu"))


def _inputs(rows, n_in, n_out, degree, dtype, affine=True, bias=True, seed=0):
    generator = torch.Generator().manual_seed(seed)

    def make(*shape, scale=1.0, offset=0.0):
        value = torch.rand(shape, generator=generator, dtype=F64) * 2 - 1
        return (value * scale + offset).to(device=DEVICE, dtype=dtype).requires_grad_()

    x = make(rows, n_in, scale=2.0)
    weight = make(n_out, degree * n_in, scale=1.0 / n_in)
    return {
        "x": x, "weight": weight,
        "bias": make(n_out) if bias else None,
        "scale": make(n_in, scale=0.5, offset=1.0) if affine else None,
        "shift": make(n_in, scale=0.3) if affine else None,
        "grad_y": (torch.rand(rows, n_out, generator=generator, dtype=F64) - 0.5).to(device=DEVICE, dtype=dtype),
    }


def _run(op, inputs, basis):
    """The output and the grads of every input that requires one."""
    args = [inputs[name] for name in ("x", "weight", "bias", "scale", "shift")]
    y = op(*args, basis)
    wanted = [a for a in args if a is not None and a.requires_grad]
    return [y, *torch.autograd.grad(y, wanted, inputs["grad_y"])]


def _fused(triton_kan):
    def op(x, weight, bias, scale, shift, basis):
        return triton_kan.fused_kan_linear(x, weight, bias, scale, shift, triton_kan.kernel_recurrence(basis, []))

    return op


def _plain(x, weight, bias, scale, shift, basis):
    return kan_function.KANLinearFunction.apply(x, weight, bias, scale, shift, basis)


def _assert_close(actual, expected, tolerance, what):
    for name, a, e in zip(["y", *what], actual, expected):
        scale = e.abs().max().item() + 1e-12
        error = (a.double() - e.double()).abs().max().item() / scale
        assert error <= tolerance, f"{name}: relative error {error:.2e} above {tolerance:.0e}"


GRAD_NAMES = ["grad_x", "grad_weight", "grad_bias", "grad_scale", "grad_shift"]
# The generic recurrence is represented by jacobi (non-zero offsets b_n) and laguerre (negative slopes).
BASES = [("cheby2", 2, {}), ("cheby1", 3, {}), ("legendre", 4, {}), ("jacobi", 3, {"alpha": 0.5, "beta": 1.5}),
         ("laguerre", 2, {})]


@needs_triton
@pytest.mark.parametrize("name,degree,options", BASES, ids=[b[0] for b in BASES])
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_forward_and_every_grad_match_the_plain_op(triton_kan, name, degree, options, dtype):
    # Sizes that leave partial tiles in every dimension of every kernel.
    basis = make_basis(name, degree, **options)
    inputs = _inputs(70, 45, 67, degree, dtype)
    tolerance = 2e-5 if dtype == torch.float32 else 1e-12
    _assert_close(_run(_fused(triton_kan), inputs, basis), _run(_plain, inputs, basis), tolerance, GRAD_NAMES)


@needs_triton
@pytest.mark.parametrize("dtype", [
    torch.float16,
    pytest.param(torch.bfloat16, marks=pytest.mark.skipif(
        ON_INTERPRETER, reason="Triton 3.9's interpreter runs tl.dot on bfloat16 as raw integers; checked on a GPU")),
])
def test_half_precision_inputs_accumulate_in_float32(triton_kan, dtype):
    basis = make_basis("cheby2", 2)
    inputs = _inputs(33, 21, 19, 2, dtype)
    exact = {k: None if v is None else v.detach().to(F64).requires_grad_(v.requires_grad) for k, v in inputs.items()}
    # Rounding the features and the results to 8 (bfloat16) or 11 (float16) bits is all the error there is.
    tolerance = 2e-2 if dtype == torch.bfloat16 else 4e-3
    _assert_close(_run(_fused(triton_kan), inputs, basis), _run(_plain, exact, basis), tolerance, GRAD_NAMES)


@needs_triton
def test_odd_hidden_sizes_of_the_research_model(triton_kan):
    # 576 -> 574 -> 576 is the KAN feedforward at half the parameters of SmolLM2's MLP; its second layer has
    # 574 inputs and 2 * 574 = 1148 weight columns, neither a multiple of any tile. The GPU also runs its
    # 576 outputs; the interpreter, few rows and outputs to stay quick.
    basis = make_basis("cheby2", 2)
    inputs = _inputs(3, 574, 37, 2, torch.float32) if ON_INTERPRETER else _inputs(1000, 574, 576, 2, torch.float32)
    _assert_close(_run(_fused(triton_kan), inputs, basis), _run(_plain, inputs, basis), 2e-5, GRAD_NAMES)


@needs_triton
def test_tanh_input_map_without_bias_and_non_contiguous_tensors(triton_kan):
    basis = make_basis("legendre", 2)
    inputs = _inputs(29, 18, 22, 2, torch.float32, affine=False, bias=False)
    wide = torch.randn(18, 2 * 29, device=DEVICE)
    inputs["x"] = wide[:, ::2].t().requires_grad_()  # strides (2, 58)
    inputs["grad_y"] = torch.randn(22, 29, device=DEVICE).t()
    assert not inputs["x"].is_contiguous() and not inputs["grad_y"].is_contiguous()
    expected = _run(_plain, {k: v.contiguous() if k == "x" else v for k, v in inputs.items()}, basis)
    _assert_close(_run(_fused(triton_kan), inputs, basis), expected, 2e-5, ["grad_x", "grad_weight"])


@needs_triton
@pytest.mark.parametrize("frozen", ["x", "weights", "map"])
def test_only_the_grads_asked_for(triton_kan, frozen):
    basis = make_basis("cheby2", 3)
    inputs = _inputs(20, 17, 15, 3, torch.float32)
    names = {"x": ["x"], "weights": ["weight", "bias"], "map": ["scale", "shift"]}[frozen]
    for name in names:
        inputs[name].requires_grad_(False)
    what = [g for g, n in zip(GRAD_NAMES, ["x", "weight", "bias", "scale", "shift"]) if n not in names]
    _assert_close(_run(_fused(triton_kan), inputs, basis), _run(_plain, inputs, basis), 2e-5, what)


@needs_triton
def test_gradcheck_in_float64(triton_kan):
    basis = make_basis("legendre", 3)
    inputs = _inputs(6, 5, 4, 3, F64)
    args = [inputs[name] for name in ("x", "weight", "bias", "scale", "shift")]
    recurrence = triton_kan.kernel_recurrence(basis, [])
    assert torch.autograd.gradcheck(lambda *a: triton_kan.fused_kan_linear(*a, recurrence), args, fast_mode=True)


@needs_triton
def test_autocast_runs_the_matrix_multiplies_in_the_autocast_dtype(triton_kan, fused_on_cpu):
    # float16 autocast: the interpreter cannot multiply bfloat16 (see the module docstring).
    torch.manual_seed(0)
    layer = KANLinear(24, 20, "cheby2").to(DEVICE)
    x = torch.randn(9, 24, device=DEVICE, requires_grad=True)
    with torch.autocast(DEVICE, dtype=torch.float16):
        y = layer(x)
    assert y.dtype == torch.float16
    y.float().square().sum().backward()
    assert layer.weight.grad.dtype == torch.float32 and x.grad.dtype == torch.float32
    fused_grads = [x.grad.clone(), layer.weight.grad.clone(), layer.input_scale.grad.clone()]
    x.grad = None
    layer.zero_grad()
    with torch.autocast(DEVICE, dtype=torch.float16):
        expected = _plain(x, layer.weight, layer.bias, layer.input_scale, layer.input_shift, layer.basis)
    expected.float().square().sum().backward()
    _assert_close([y, *fused_grads], [expected, x.grad, layer.weight.grad, layer.input_scale.grad], 1e-2,
                  ["grad_x", "grad_weight", "grad_scale"])


@needs_triton
def test_bad_shapes_are_refused_naming_them(triton_kan):
    recurrence = triton_kan.kernel_recurrence(make_basis("cheby2", 2), [])
    x, weight = torch.randn(4, 6, device=DEVICE), torch.randn(5, 6, device=DEVICE)
    with pytest.raises(ValueError, match=r"weight \(out, 2 \* in\).*got x \(4, 6\) and weight \(5, 6\)"):
        triton_kan.fused_kan_linear(x, weight, None, None, None, recurrence)


@needs_triton
def test_which_bases_have_a_kernel(triton_kan):
    assert triton_kan.kernel_recurrence(make_basis("cheby2", 3), []) == [1.0, 2.0, 0.0, 2.0, 0.0, 1.0, 2.0, 0.0, 1.0]
    for spec, degree in [("rbf", 3), ("bspline", 2), ("rational", 2), ("cheby2+legendre", 2),
                         ("cheby2", triton_kan.MAX_KERNEL_DEGREE + 1)]:
        basis = make_basis(spec, degree)
        assert triton_kan.kernel_recurrence(basis, [torch.zeros(1)] * len(basis.parameter_shapes(1))) is None, spec

    class Redefined(Chebyshev2):  # features that are no longer the recurrence of first/step
        def values(self, t, params):
            return [v * 2 for v in super().values(t, params)]

    assert triton_kan.kernel_recurrence(Redefined(2), []) is None

    class Scaled(RecurrenceBasis):  # a user's recurrence: the kernels compute it from first/step
        def first(self):
            return 1.0, 3.0, 0.5

        def step(self, n):
            return 1.5, -0.5, 0.25

    assert triton_kan.kernel_recurrence(Scaled(2), []) == [1.0, 3.0, 0.5, 1.5, -0.5, 0.25]


@needs_triton
def test_kan_linear_dispatches_kernel_bases_to_the_fused_op(triton_kan, fused_on_cpu, monkeypatch):
    calls = []
    fused = triton_kan.fused_kan_linear
    monkeypatch.setattr(triton_kan, "fused_kan_linear", lambda *a: calls.append(a[-1]) or fused(*a))
    x = torch.randn(7, 10, device=DEVICE)
    for spec, expect_fused in [("cheby2", True), ("legendre", True), ("rbf", False), ("cheby2+rbf", False)]:
        layer = KANLinear(10, 6, spec).to(DEVICE)
        before = len(calls)
        y = layer(x)
        assert (len(calls) > before) == expect_fused, spec
        torch.testing.assert_close(y, _plain(x, layer.weight, layer.bias, layer.input_scale, layer.input_shift,
                                             layer.basis), rtol=2e-5, atol=1e-5)


@needs_triton
@pytest.mark.parametrize("base", ["silu", "linear"])
def test_a_base_branch_runs_beside_the_fused_op_with_the_plain_ops_results(triton_kan, fused_on_cpu, monkeypatch,
                                                                          base):
    calls = []
    fused = triton_kan.fused_kan_linear
    monkeypatch.setattr(triton_kan, "fused_kan_linear", lambda *a: calls.append(a[-1]) or fused(*a))
    torch.manual_seed(0)
    layer = KANLinear(10, 6, "cheby2", base=base).to(DEVICE)
    x = torch.randn(7, 10, device=DEVICE, requires_grad=True)
    y = layer(x)
    assert calls  # the basis part took the kernels
    y.square().sum().backward()
    fused_grads = [x.grad.clone(), layer.weight.grad.clone(), layer.base_weight.grad.clone()]
    x.grad = None
    layer.zero_grad()
    monkeypatch.setattr(kan_function, "FUSED_DEVICE_TYPES", ())  # now the plain op
    expected = layer(x)
    expected.square().sum().backward()
    _assert_close([y, *fused_grads], [expected, x.grad, layer.weight.grad, layer.base_weight.grad], 1e-5,
                  ["grad_x", "grad_weight", "grad_base_weight"])


@needs_triton
def test_compiled_feedforward_has_one_graph_and_matches_eager(triton_kan, fused_on_cpu, monkeypatch):
    torch._dynamo.reset()
    monkeypatch.setattr(kan_function, "_triton_kernels", [])  # the kernels are first looked for while tracing
    torch.manual_seed(0)
    model = KANFeedForward(16, 24, "cheby2").to(DEVICE)
    x = torch.randn(2, 5, 16, device=DEVICE, requires_grad=True)
    check_compiles_as_one_graph(model, x)


def test_cpu_tensors_never_load_the_kernels(monkeypatch):
    # The plain op serves CPU tensors without looking for Triton at all.
    monkeypatch.setattr(kan_function, "_triton_kernels", [])
    KANLinear(6, 4, "cheby2")(torch.randn(3, 6)).sum().backward()
    assert kan_function._triton_kernels == []


def test_without_triton_the_fused_device_falls_back_to_the_plain_op(monkeypatch):
    # Triton made unimportable; CPU stands in for a GPU as a device type that would take the kernels.
    monkeypatch.setitem(sys.modules, "triton", None)
    monkeypatch.delitem(sys.modules, "kallm.core.triton_kan", raising=False)
    monkeypatch.setattr(kan_function, "_triton_kernels", [])
    monkeypatch.setattr(kan_function, "FUSED_DEVICE_TYPES", ("cuda", "cpu"))
    layer = KANLinear(6, 4, "cheby2")
    x = torch.randn(3, 6)
    torch.testing.assert_close(layer(x), _plain(x, layer.weight, layer.bias, layer.input_scale, layer.input_shift,
                                                layer.basis))
    assert kan_function._triton_kernels == [None] and not kan_function._have_fused_kernels()


def test_the_gpu_check_recipe_is_the_research_recipe_shortened(monkeypatch):
    from pathlib import Path

    from kallm.recipes.experiment import load_experiment

    monkeypatch.setenv("KALLM_DATA_DIR", "/data")
    configs = Path(__file__).resolve().parent.parent / "configs"
    check, research = load_experiment(configs / "gpu-check.yaml"), load_experiment(configs / "research.yaml")
    assert check.retrofit == research.retrofit and check.train["bf16"] and research.train["bf16"]
    assert check.train["trainable"] == research.train["trainable"] and check.train["max_steps"] <= 50
    assert {arm.kind for arm in check.arms} == {"baseline", "linear", "kan"} and check.data.startswith("/data/")
