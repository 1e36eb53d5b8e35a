"""Fused Triton kernels of the KAN op for the three-term recurrence bases (cheby1, cheby2, legendre, ...).

On a GPU the plain op (``kan_function.py``) is bound by memory traffic: it writes the feature matrix
``F`` (``K`` times the layer input) in forward, again in backward, and ``dL/dF`` beside it. These
kernels never write either:

- forward: ``y = F @ W.T + b`` where each ``F`` tile is generated in registers from the loaded ``x``
  tile (input map ``t = tanh(scale * x + shift)`` and the recurrence ``P_1 .. P_K``) inside the GEMM's
  loop, so the memory traffic is that of an ``nn.Linear`` on ``x``;
- grad of the input: ``dL/dF = dL/dy @ W`` is accumulated for all ``K`` feature blocks of an input tile
  at once, and its epilogue applies ``sum_k dL/dP_k * P_k'(t)``, the input map's derivative and the
  scale, and reduces the grads of scale and shift over the tile's rows;
- grad of the weight: ``dL/dW = dL/dy^T @ F`` with ``F`` regenerated from ``x`` as the B operand, and
  the bias grad (the column sums of ``dL/dy``) reduced on the way.

A basis qualifies when it is a ``RecurrenceBasis`` whose features are the recurrence given by its
``first`` and ``step`` (no override of ``values`` and its kin, no learnable parameters) and its degree
is at most ``MAX_KERNEL_DEGREE``. Its coefficients reach the kernels as a small tensor, so one compiled
kernel per degree serves every such basis.

The op is registered as the torch custom ops ``kallm::kan_recurrence_forward`` and
``kallm::kan_recurrence_backward`` (with fake implementations and autograd), so ``torch.compile``
traces a model that uses it without breaking the graph.

Precision matches the plain op: the input map and the recurrence run in float32 (float64 for float64
inputs), features are rounded to the weight's dtype for the matrix multiply, which accumulates in
float32; float32 weights use TF32 exactly when ``torch.backends.cuda.matmul.allow_tf32`` is set.

Triton runs these kernels on CPU tensors under its interpreter (``TRITON_INTERPRET=1``): that is how
kallm's tests check them on machines without a GPU. This module imports Triton, so the rest of the core
imports it lazily and only for tensors on a GPU; Triton is never needed to load or run kallm.
"""

import os

import torch
import triton
import triton.language as tl

from .bases import RecurrenceBasis

#: the largest degree with a kernel: the backward kernels hold all ``K`` feature blocks of a tile at
#: once, which stops paying (registers) long before the bases' own limit.
MAX_KERNEL_DEGREE = 8
#: rows per program of the grad-input kernel; fixed (not autotuned) because the partial sums of the
#: scale and shift grads are laid out by it.
GRAD_INPUT_BLOCK_M = 64
_INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"
#: ``KALLM_TRITON_AUTOTUNE=0`` gives each kernel one tile instead of timing several on first use (which
#: compiles each candidate): quicker for runs over many shapes, such as the tests.
_AUTOTUNE = os.environ.get("KALLM_TRITON_AUTOTUNE", "1") != "0"


def kernel_recurrence(basis, basis_params) -> list[float] | None:
    """``[p0, a0, b0, a1, b1, c1, ...]`` of ``basis`` if the kernels compute it, else None."""
    if basis_params or not isinstance(basis, RecurrenceBasis) or basis.degree > MAX_KERNEL_DEGREE:
        return None
    # A subclass that redefines its features is no longer the recurrence its first/step describe.
    if any(getattr(type(basis), name) is not getattr(RecurrenceBasis, name)
           for name in ("values", "write_values", "input_gradient")):
        return None
    coefficients = list(basis.first())
    for n in range(1, basis.degree):
        coefficients += basis.step(n)
    return [float(c) for c in coefficients]


# ------------------------------------------------------------------------------------------ kernels


def _configs(tiles, interpreter_tile):
    if _INTERPRETING:  # the interpreter cannot time configs, and runs fastest with few, large tiles
        return [triton.Config(interpreter_tile, num_warps=4, num_stages=1)]
    if not _AUTOTUNE:
        return [triton.Config(tiles[1], num_warps=4, num_stages=3)]
    return [triton.Config(tile, num_warps=warps, num_stages=3) for tile in tiles for warps in (4, 8)]


_FORWARD_TILES = [
    {"BLOCK_M": 64, "BLOCK_O": 64, "BLOCK_K": 32},
    {"BLOCK_M": 128, "BLOCK_O": 64, "BLOCK_K": 32},
    {"BLOCK_M": 128, "BLOCK_O": 128, "BLOCK_K": 32},
    {"BLOCK_M": 64, "BLOCK_O": 128, "BLOCK_K": 64},
]
_GRAD_INPUT_TILES = [
    {"BLOCK_O": 32, "BLOCK_K": 16},
    {"BLOCK_O": 64, "BLOCK_K": 32},
    {"BLOCK_O": 32, "BLOCK_K": 64},
    {"BLOCK_O": 64, "BLOCK_K": 64},
]
_GRAD_WEIGHT_TILES = [
    {"BLOCK_M": 32, "BLOCK_O": 64, "BLOCK_K": 16},
    {"BLOCK_M": 64, "BLOCK_O": 64, "BLOCK_K": 32},
    {"BLOCK_M": 32, "BLOCK_O": 128, "BLOCK_K": 32},
    {"BLOCK_M": 64, "BLOCK_O": 128, "BLOCK_K": 64},
]


@triton.jit
def _input_map(x, scale_ptr, shift_ptr, channels, channel_ok, HAS_AFFINE: tl.constexpr):
    """``t = tanh(scale * x + shift)`` (``tanh(x)`` without the affine map) in the dtype of ``x``."""
    u = x
    if HAS_AFFINE:
        scale = tl.load(scale_ptr + channels, mask=channel_ok, other=1.0).to(x.dtype)
        shift = tl.load(shift_ptr + channels, mask=channel_ok, other=0.0).to(x.dtype)
        u = x * scale[None, :] + shift[None, :]
    # tanh(u) = 1 - 2 / (exp(2u) + 1): saturates cleanly to +-1 where exp overflows or vanishes.
    return 1.0 - 2.0 / (tl.exp(2.0 * u) + 1.0)


@triton.jit
def _step(coefficients_ptr, n: tl.constexpr, t, current, lower):
    """``P_{n+1} = (a_n t + b_n) P_n - c_n P_{n-1}``."""
    a = tl.load(coefficients_ptr + 3 * n)
    b = tl.load(coefficients_ptr + 3 * n + 1)
    c = tl.load(coefficients_ptr + 3 * n + 2)
    return (a * t + b) * current - c * lower


@triton.jit
def _features_by_column(t, column_degree, coefficients_ptr, DEGREE: tl.constexpr):
    """``P_{k+1}(t)`` in every column whose feature index ``column_degree`` is ``k`` (0 elsewhere)."""
    lower = tl.load(coefficients_ptr) + 0.0 * t
    current = tl.load(coefficients_ptr + 1) * t + tl.load(coefficients_ptr + 2)
    features = tl.where(column_degree == 0, current, 0.0)
    for n in tl.static_range(1, DEGREE):
        lower, current = current, _step(coefficients_ptr, n, t, current, lower)
        features = tl.where(column_degree == n, current, features)
    return features


@triton.autotune(configs=_configs(_FORWARD_TILES, _FORWARD_TILES[0]), key=["n_in", "n_out", "DEGREE"])
@triton.jit
def _forward_kernel(
    x_ptr, w_ptr, bias_ptr, scale_ptr, shift_ptr, coefficients_ptr, y_ptr,
    rows, n_in, n_out,
    stride_xm, stride_xk, stride_wo, stride_wk, stride_ym, stride_yo,
    HAS_BIAS: tl.constexpr, HAS_AFFINE: tl.constexpr, DEGREE: tl.constexpr, MATH: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_K: tl.constexpr,
):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_o = tl.program_id(1) * BLOCK_O + tl.arange(0, BLOCK_O)
    row_ok, out_ok = offs_m < rows, offs_o < n_out
    acc = tl.zeros((BLOCK_M, BLOCK_O), dtype=MATH)
    for k0 in range(0, n_in, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        channel_ok = offs_k < n_in
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                    mask=row_ok[:, None] & channel_ok[None, :], other=0.0).to(MATH)
        t = _input_map(x, scale_ptr, shift_ptr, offs_k, channel_ok, HAS_AFFINE)
        # Columns past n_in hold features of a padded x; their weights load as zero.
        w_ok = channel_ok[:, None] & out_ok[None, :]
        w_tile = w_ptr + offs_k[:, None] * stride_wk + offs_o[None, :] * stride_wo
        lower = tl.load(coefficients_ptr) + 0.0 * t
        current = tl.load(coefficients_ptr + 1) * t + tl.load(coefficients_ptr + 2)
        for n in tl.static_range(DEGREE):
            if n > 0:
                lower, current = current, _step(coefficients_ptr, n, t, current, lower)
            w = tl.load(w_tile + n * n_in * stride_wk, mask=w_ok, other=0.0)
            acc = tl.dot(current.to(w.dtype), w, acc, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_o, mask=out_ok, other=0.0).to(MATH)[None, :]
    tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_o[None, :] * stride_yo,
             acc.to(y_ptr.dtype.element_ty), mask=row_ok[:, None] & out_ok[None, :])


@triton.autotune(configs=_configs(_GRAD_INPUT_TILES, _GRAD_INPUT_TILES[1]), key=["n_in", "n_out", "DEGREE"])
@triton.jit
def _grad_input_kernel(
    grad_y_ptr, w_ptr, x_ptr, scale_ptr, shift_ptr, coefficients_ptr, grad_x_ptr, scale_part_ptr, shift_part_ptr,
    rows, n_in, n_out,
    stride_gm, stride_go, stride_wo, stride_wk, stride_xm, stride_xk, stride_dm, stride_dk,
    HAS_AFFINE: tl.constexpr, NEED_MAP_GRADS: tl.constexpr, DEGREE: tl.constexpr, DEGREE_P2: tl.constexpr,
    MATH: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    row_ok, channel_ok = offs_m < rows, offs_k < n_in
    # One column per (feature k, channel i) of this tile: dL/dP_k for all k accumulate in one GEMM.
    columns = tl.arange(0, DEGREE_P2 * BLOCK_K)
    column_degree = columns // BLOCK_K
    column_channel = tl.program_id(1) * BLOCK_K + columns % BLOCK_K
    column_ok = (column_degree < DEGREE) & (column_channel < n_in)
    w_columns = (column_degree * n_in + column_channel) * stride_wk
    acc = tl.zeros((BLOCK_M, DEGREE_P2 * BLOCK_K), dtype=MATH)
    for o0 in range(0, n_out, BLOCK_O):
        offs_o = o0 + tl.arange(0, BLOCK_O)
        out_ok = offs_o < n_out
        grad_y = tl.load(grad_y_ptr + offs_m[:, None] * stride_gm + offs_o[None, :] * stride_go,
                         mask=row_ok[:, None] & out_ok[None, :], other=0.0)
        w = tl.load(w_ptr + offs_o[:, None] * stride_wo + w_columns[None, :],
                    mask=out_ok[:, None] & column_ok[None, :], other=0.0)
        acc = tl.dot(grad_y, w, acc, input_precision=PRECISION)
    grad_features = tl.reshape(acc, (BLOCK_M, DEGREE_P2, BLOCK_K))
    feature_index = tl.arange(0, DEGREE_P2)[None, :, None]

    x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                mask=row_ok[:, None] & channel_ok[None, :], other=0.0).to(MATH)
    t = _input_map(x, scale_ptr, shift_ptr, offs_k, channel_ok, HAS_AFFINE)
    # dL/dt = sum_k dL/dP_k P_k'(t), with P'_1 = a0 and P'_{n+1} = a_n P_n + (a_n t + b_n) P'_n - c_n P'_{n-1}.
    lower = tl.load(coefficients_ptr) + 0.0 * t
    current = tl.load(coefficients_ptr + 1) * t + tl.load(coefficients_ptr + 2)
    lower_slope = 0.0 * t
    slope = tl.load(coefficients_ptr + 1) + 0.0 * t
    grad_t = tl.sum(tl.where(feature_index == 0, grad_features, 0.0), axis=1) * slope
    for n in tl.static_range(1, DEGREE):
        a = tl.load(coefficients_ptr + 3 * n)
        b = tl.load(coefficients_ptr + 3 * n + 1)
        c = tl.load(coefficients_ptr + 3 * n + 2)
        lower_slope, slope = slope, a * current + (a * t + b) * slope - c * lower_slope
        lower, current = current, (a * t + b) * current - c * lower
        grad_t += tl.sum(tl.where(feature_index == n, grad_features, 0.0), axis=1) * slope
    grad_u = grad_t * (1.0 - t * t)
    grad_x = grad_u
    if HAS_AFFINE:
        grad_x = grad_u * tl.load(scale_ptr + offs_k, mask=channel_ok, other=0.0).to(MATH)[None, :]
        if NEED_MAP_GRADS:
            # Rows past ``rows`` have a zero dL/dy, hence a zero grad_u: they add nothing.
            tl.store(scale_part_ptr + pid_m * n_in + offs_k, tl.sum(grad_u * x, axis=0), mask=channel_ok)
            tl.store(shift_part_ptr + pid_m * n_in + offs_k, tl.sum(grad_u, axis=0), mask=channel_ok)
    tl.store(grad_x_ptr + offs_m[:, None] * stride_dm + offs_k[None, :] * stride_dk,
             grad_x.to(grad_x_ptr.dtype.element_ty), mask=row_ok[:, None] & channel_ok[None, :])


@triton.autotune(configs=_configs(_GRAD_WEIGHT_TILES, _GRAD_WEIGHT_TILES[1]), key=["n_in", "n_out", "DEGREE"])
@triton.jit
def _grad_weight_kernel(
    grad_y_ptr, x_ptr, scale_ptr, shift_ptr, coefficients_ptr, grad_w_ptr, grad_bias_ptr,
    rows, n_in, n_out,
    stride_gm, stride_go, stride_xm, stride_xk, stride_dwo, stride_dwk,
    NEED_BIAS_GRAD: tl.constexpr, HAS_AFFINE: tl.constexpr, DEGREE: tl.constexpr, DEGREE_P2: tl.constexpr,
    MATH: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_K: tl.constexpr,
):
    offs_o = tl.program_id(0) * BLOCK_O + tl.arange(0, BLOCK_O)
    out_ok = offs_o < n_out
    # One column per (feature k, channel i) of this tile, as in the grad-input kernel.
    columns = tl.arange(0, DEGREE_P2 * BLOCK_K)
    column_degree = columns // BLOCK_K
    column_channel = tl.program_id(1) * BLOCK_K + columns % BLOCK_K
    column_ok = (column_degree < DEGREE) & (column_channel < n_in)
    acc = tl.zeros((BLOCK_O, DEGREE_P2 * BLOCK_K), dtype=MATH)
    bias_acc = tl.zeros((BLOCK_O,), dtype=MATH)
    for m0 in range(0, rows, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        row_ok = offs_m < rows
        grad_y_t = tl.load(grad_y_ptr + offs_o[:, None] * stride_go + offs_m[None, :] * stride_gm,
                           mask=out_ok[:, None] & row_ok[None, :], other=0.0)
        # Each channel's x is loaded once per feature column; the repeats come from cache.
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + column_channel[None, :] * stride_xk,
                    mask=row_ok[:, None] & column_ok[None, :], other=0.0).to(MATH)
        t = _input_map(x, scale_ptr, shift_ptr, column_channel, column_ok, HAS_AFFINE)
        features = _features_by_column(t, column_degree[None, :], coefficients_ptr, DEGREE)
        # Padded rows would hold features of x = 0; their dL/dy is zero, so they add nothing.
        acc = tl.dot(grad_y_t, features.to(grad_y_t.dtype), acc, input_precision=PRECISION)
        if NEED_BIAS_GRAD:
            bias_acc += tl.sum(grad_y_t.to(MATH), axis=1)
    tl.store(grad_w_ptr + offs_o[:, None] * stride_dwo + ((column_degree * n_in + column_channel) * stride_dwk)[None, :],
             acc.to(grad_w_ptr.dtype.element_ty), mask=out_ok[:, None] & column_ok[None, :])
    if NEED_BIAS_GRAD:
        if tl.program_id(1) == 0:
            tl.store(grad_bias_ptr + offs_o, bias_acc.to(grad_bias_ptr.dtype.element_ty), mask=out_ok)


# ----------------------------------------------------------------------------------------- launchers

_coefficient_tensors: dict = {}


def _coefficients(recurrence, device, dtype):
    """The recurrence as a device tensor, made once per (basis, device, dtype)."""
    key = (tuple(recurrence), device, dtype)
    if key not in _coefficient_tensors:
        _coefficient_tensors[key] = torch.tensor(recurrence, dtype=dtype, device=device)
    return _coefficient_tensors[key]


def _math(x, weight):
    """The kernels' math and accumulation dtype: float64 when either operand is float64, else float32."""
    wide = torch.float64 in (x.dtype, weight.dtype)
    return (torch.float64, tl.float64) if wide else (torch.float32, tl.float32)


def _precision(weight):
    if weight.dtype == torch.float32 and weight.device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def _degree(recurrence):
    return (len(recurrence) - 3) // 3 + 1


def _check(x, weight, recurrence):
    degree = _degree(recurrence)
    if x.dim() != 2 or weight.dim() != 2 or weight.shape[1] != degree * x.shape[1]:
        raise ValueError(
            f"the fused KAN op needs x (N, in) and weight (out, {degree} * in) for a degree-{degree} basis, "
            f"got x {tuple(x.shape)} and weight {tuple(weight.shape)}"
        )
    return degree


def _forward(x, weight, bias, scale, shift, recurrence):
    degree = _check(x, weight, recurrence)
    rows, n_in = x.shape
    n_out = weight.shape[0]
    math_dtype, math_tl = _math(x, weight)
    y = torch.empty(rows, n_out, device=x.device, dtype=weight.dtype)
    if rows == 0:
        return y
    coefficients = _coefficients(recurrence, x.device, math_dtype)

    def grid(meta):
        return triton.cdiv(rows, meta["BLOCK_M"]), triton.cdiv(n_out, meta["BLOCK_O"])

    _forward_kernel[grid](
        x, weight, bias, scale, shift, coefficients, y, rows, n_in, n_out,
        *x.stride(), *weight.stride(), *y.stride(),
        HAS_BIAS=bias is not None, HAS_AFFINE=scale is not None, DEGREE=degree, MATH=math_tl,
        PRECISION=_precision(weight),
    )
    return y


def _backward(grad_y, x, weight, scale, shift, recurrence, need_input, need_weight, need_map, need_bias):
    """``(grad_x, grad_weight, grad_bias, grad_scale, grad_shift)``, empty tensors for those not asked."""
    degree = _check(x, weight, recurrence)
    rows, n_in = x.shape
    n_out = weight.shape[0]
    math_dtype, math_tl = _math(x, weight)
    coefficients = _coefficients(recurrence, x.device, math_dtype)
    degree_p2 = triton.next_power_of_2(degree)
    precision = _precision(weight)
    affine = scale is not None
    # A custom op's outputs may not alias one another: each grad not asked for is its own empty tensor.
    grad_x, grad_weight, grad_bias, grad_scale, grad_shift = (x.new_empty(0) for _ in range(5))

    if need_input or (need_map and affine):
        grad_x = torch.empty_like(x, memory_format=torch.contiguous_format)
        blocks_m = triton.cdiv(rows, GRAD_INPUT_BLOCK_M)
        need_map = need_map and affine
        parts = torch.zeros(2, blocks_m if need_map else 0, n_in, device=x.device, dtype=math_dtype)
        if rows:

            def grid(meta):
                return blocks_m, triton.cdiv(n_in, meta["BLOCK_K"])

            _grad_input_kernel[grid](
                grad_y, weight, x, scale, shift, coefficients, grad_x, parts[0], parts[1], rows, n_in, n_out,
                *grad_y.stride(), *weight.stride(), *x.stride(), *grad_x.stride(),
                HAS_AFFINE=affine, NEED_MAP_GRADS=need_map, DEGREE=degree, DEGREE_P2=degree_p2, MATH=math_tl,
                PRECISION=precision, BLOCK_M=GRAD_INPUT_BLOCK_M,
            )
        if need_map:
            grad_scale, grad_shift = (part.sum(0).to(scale.dtype) for part in parts)
        if not need_input:
            grad_x = x.new_empty(0)

    if need_weight or need_bias:
        grad_weight = torch.zeros_like(weight, memory_format=torch.contiguous_format) if rows == 0 else \
            torch.empty_like(weight, memory_format=torch.contiguous_format)
        grad_bias = torch.zeros(n_out, device=x.device, dtype=weight.dtype)
        if rows:

            def grid(meta):
                return triton.cdiv(n_out, meta["BLOCK_O"]), triton.cdiv(n_in, meta["BLOCK_K"])

            _grad_weight_kernel[grid](
                grad_y, x, scale, shift, coefficients, grad_weight, grad_bias, rows, n_in, n_out,
                *grad_y.stride(), *x.stride(), *grad_weight.stride(),
                NEED_BIAS_GRAD=need_bias, HAS_AFFINE=affine, DEGREE=degree, DEGREE_P2=degree_p2, MATH=math_tl,
                PRECISION=precision,
            )
        grad_weight = grad_weight if need_weight else x.new_empty(0)
        grad_bias = grad_bias if need_bias else x.new_empty(0)
    return grad_x, grad_weight, grad_bias, grad_scale, grad_shift


# -------------------------------------------------------------------------------------- custom ops


@torch.library.custom_op("kallm::kan_recurrence_forward", mutates_args=())
def kan_recurrence_forward(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, scale: torch.Tensor | None,
    shift: torch.Tensor | None, recurrence: list[float],
) -> torch.Tensor:
    """``y = F(x) @ weight.T + bias`` by the fused forward kernel; ``y`` has the weight's dtype."""
    return _forward(x, weight, bias, scale, shift, recurrence)


@kan_recurrence_forward.register_fake
def _(x, weight, bias, scale, shift, recurrence):
    _check(x, weight, recurrence)
    return x.new_empty(x.shape[0], weight.shape[0], dtype=weight.dtype)


@torch.library.custom_op("kallm::kan_recurrence_backward", mutates_args=())
def kan_recurrence_backward(
    grad_y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None,
    shift: torch.Tensor | None, recurrence: list[float],
    need_input: bool, need_weight: bool, need_map: bool, need_bias: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The grads of the fused op's inputs (see ``_backward``)."""
    return _backward(grad_y, x, weight, scale, shift, recurrence, need_input, need_weight, need_map, need_bias)


@kan_recurrence_backward.register_fake
def _(grad_y, x, weight, scale, shift, recurrence, need_input, need_weight, need_map, need_bias):
    _check(x, weight, recurrence)
    affine = need_map and scale is not None
    return (
        x.new_empty(x.shape) if need_input else x.new_empty(0),
        weight.new_empty(weight.shape) if need_weight else x.new_empty(0),
        weight.new_empty(weight.shape[0]) if need_bias else x.new_empty(0),
        scale.new_empty(scale.shape) if affine else x.new_empty(0),
        shift.new_empty(shift.shape) if affine else x.new_empty(0),
    )


def _setup_context(ctx, inputs, output):
    x, weight, bias, scale, shift, recurrence = inputs
    ctx.save_for_backward(x, weight, scale, shift)
    ctx.recurrence = recurrence


def _backward_formula(ctx, grad_y):
    x, weight, scale, shift = ctx.saved_tensors
    need_x, need_w, need_b, need_scale, need_shift = ctx.needs_input_grad[:5]
    grads = kan_recurrence_backward(
        grad_y.to(weight.dtype), x, weight, scale, shift, ctx.recurrence,
        need_x, need_w, need_scale or need_shift, need_b,
    )
    wanted = (need_x, need_w, need_b, need_scale, need_shift)
    return (*(grad if need else None for grad, need in zip(grads, wanted)), None)


kan_recurrence_forward.register_autograd(_backward_formula, setup_context=_setup_context)


def fused_kan_linear(x, weight, bias, scale, shift, recurrence):
    """``kan_linear`` by the fused kernels; ``recurrence`` from ``kernel_recurrence``.

    Under autocast the weight and bias are cast to the autocast dtype first (outside the custom op, so
    autograd returns their grads in their own dtype), as the plain op does.
    """
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        weight = weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
    elif bias is not None:
        bias = bias.to(weight.dtype)
    return kan_recurrence_forward(x, weight, bias, scale, shift, recurrence)
