"""The fused KAN op: input map, basis features and one matrix multiply.

``kan_linear(x, weight, bias, scale, shift, basis, basis_params)`` computes

    t = tanh(scale * x + shift)            (or tanh(x) when scale/shift are None)
    F = [phi_1(t) | phi_2(t) | ... | phi_K(t)]      shape (N, K * in), blocked by feature
    y = F @ weight.T + bias                weight: (out, K * in)

The basis writes its features straight into the blocks of one preallocated ``F``, so
the weights are used as stored: no per-call permute, copy or concatenation.

Memory: autograd on the textbook formulation keeps ``t``, every recurrence step and the
stacked features alive until backward, several times the layer input at degree 2. This
op saves only ``x`` (plus the parameters, which exist anyway) and recomputes ``t``,
``F`` and ``dF/dt`` in backward, so its activation memory equals an ``nn.Linear`` fed
the same input. The recompute is elementwise work, cheap next to the matrix multiplies.
Bases with closed-form derivatives are differentiated without autograd; the others (and
bases with learnable parameters) by a local autograd pass over the recomputed features.

Precision: the input map and basis math run in float32 whatever the input dtype (float64
stays float64); the matrix multiplies run in the autocast dtype when autocast is on (else
the weight dtype) and accumulate in float32 inside the GEMM.

Part of kallm's portable core: plain torch, sibling imports only.
"""

from __future__ import annotations

import importlib

import torch

from .bases import Basis


def _math_dtype(x):
    return torch.promote_types(x.dtype, torch.float32)


def _compute_dtype(x, weight):
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return weight.dtype


def _input_map(xm, scale, shift):
    """``t = tanh(scale * x + shift)``, or ``tanh(x)`` without scale and shift."""
    if xm.device.type != "cpu":
        return torch.tanh(xm) if scale is None else torch.addcmul(shift.to(xm.dtype), xm, scale.to(xm.dtype)).tanh_()
    # On CPU torch.tanh costs several times torch.sigmoid, so use tanh(u) = 2 sigmoid(2u) - 1.
    if scale is None:
        u2 = xm * 2.0
    else:
        u2 = torch.addcmul(shift.to(xm.dtype) * 2.0, xm, scale.to(xm.dtype) * 2.0)
    return u2.sigmoid_().mul_(2.0).sub_(1.0)


def _matmul(a, b, bias=None):
    """``bias + a @ b``, written with a row stride that is a multiple of 64 bytes.

    BLAS libraries run markedly slower (about 1.3x for the MKL GEMMs of a KAN feedforward
    at hidden size 576) when output rows start at unaligned addresses, as they do for
    widths such as 574 or 1148. The result may be a view into a slightly wider buffer.
    """
    rows, cols = a.shape[0], b.shape[1]
    align = max(1, 64 // a.element_size())
    if cols % align == 0 or torch.compiler.is_compiling():
        return a @ b if bias is None else torch.addmm(bias, a, b)
    out = a.new_empty(rows, -(-cols // align) * align)[:, :cols]
    return torch.mm(a, b, out=out) if bias is None else torch.addmm(bias, a, b, out=out)


def _feature_buffer(t, count):
    """An ``(N, count * in)`` buffer and its ``count`` blocks, each an ``(N, in)`` view."""
    rows, width = t.shape
    buffer = t.new_empty(rows, count * width)
    return buffer, list(buffer.view(rows, count, width).unbind(1))


def _features(basis, t, params):
    """``F`` and its blocks ``phi_k(t)``."""
    if torch.compiler.is_compiling():
        # The compiler fuses the concatenation by itself and cannot trace writes into views.
        values = basis.values(t, params)
        return torch.cat(values, dim=-1), values
    features, blocks = _feature_buffer(t, basis.num_features)
    basis.write_values(t, params, blocks)
    return features, blocks


class KANLinearFunction(torch.autograd.Function):
    # Shapes: N rows (tokens), I = in_features, O = out_features, K = basis.num_features.
    # x (N, I); weight (O, K*I), column k*I + i holds feature k of input i; bias (O,); scale, shift (I,).

    @staticmethod
    def forward(ctx, x, weight, bias, scale, shift, basis: Basis, *basis_params):
        compute_dtype = _compute_dtype(x, weight)
        with torch.autocast(x.device.type, enabled=False):
            math_dtype = _math_dtype(x)
            t = _input_map(x.to(math_dtype), scale, shift)  # (N, I)
            features, _ = _features(basis, t, [p.to(math_dtype) for p in basis_params])  # F: (N, K*I)
            del t
            b = None if bias is None else bias.to(compute_dtype)
            # (N, K*I) @ (K*I, O) + (O,) -> y: (N, O)
            y = _matmul(features.to(compute_dtype), weight.to(compute_dtype).t(), b).contiguous()
        ctx.basis = basis
        ctx.compute_dtype = compute_dtype
        ctx.save_for_backward(x, weight, bias, scale, shift, *basis_params)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, weight, bias, scale, shift, *basis_params = ctx.saved_tensors
        basis, dtype = ctx.basis, ctx.compute_dtype
        needs = ctx.needs_input_grad
        need_t = needs[0] or (scale is not None and (needs[3] or needs[4]))
        need_params = any(needs[6:])
        grad_x = grad_weight = grad_bias = grad_scale = grad_shift = None
        param_grads = [None] * len(basis_params)

        with torch.autocast(x.device.type, enabled=False):
            grad_y = grad_y.to(dtype)  # dL/dy: (N, O)
            math_dtype = _math_dtype(x)
            if bias is not None and needs[2]:
                grad_bias = grad_y.to(math_dtype).sum(0).to(bias.dtype)  # sum over rows: (N, O) -> (O,)
            if not (need_t or need_params or needs[1]):
                return (grad_x, grad_weight, grad_bias, grad_scale, grad_shift, None, *param_grads)

            xm = x.to(math_dtype)  # (N, I)
            t = _input_map(xm, scale, shift)  # recomputed, (N, I)
            grad_blocks = None
            if need_t or need_params:
                # dL/dF = dL/dy @ weight: (N, O) @ (O, K*I) -> (N, K*I)
                grad_features = _matmul(grad_y, weight.to(dtype)).to(math_dtype)
                # (N, K*I) viewed as (N, K, I), split along K: K blocks dL/dphi_k, each an (N, I) view
                grad_blocks = list(grad_features.view(t.shape[0], basis.num_features, t.shape[1]).unbind(1))

            grad_t = None
            if basis.has_derivatives and not basis_params:
                features, blocks = _features(basis, t, [])  # F recomputed: (N, K*I); blocks: K views (N, I)
                if need_t:
                    # dL/dt = sum_k dL/dphi_k * phi_k'(t), elementwise over (N, I) -> (N, I)
                    grad_t = basis.input_gradient(t, blocks, grad_blocks)
            else:
                features, grad_t, param_grads = _autograd_recompute(
                    basis, t, basis_params, grad_blocks, need_t, needs[6:]
                )

            if needs[1]:
                # dL/dweight = dL/dy^T @ F: (O, N) @ (N, K*I) -> (O, K*I), the weight's own layout
                grad_weight = _matmul(grad_y.t(), features.to(dtype)).to(weight.dtype).contiguous()
            if grad_t is not None:
                # through t = tanh(u), u = scale * x + shift: dL/du = dL/dt * (1 - t^2), (N, I)
                grad_u = torch.ops.aten.tanh_backward(grad_t, t)
                if scale is None:
                    grad_x = grad_u.to(x.dtype) if needs[0] else None
                else:
                    if needs[0]:
                        grad_x = (grad_u * scale.to(math_dtype)).to(x.dtype)  # (N, I) * (I,) -> (N, I)
                    if needs[3]:
                        # sum over rows of dL/du * x: (N, I), (N, I) -> (I,)
                        grad_scale = torch.linalg.vecdot(grad_u, xm, dim=0).to(scale.dtype)
                    if needs[4]:
                        grad_shift = grad_u.sum(0).to(shift.dtype)  # (N, I) -> (I,)
        return (grad_x, grad_weight, grad_bias, grad_scale, grad_shift, None, *param_grads)


def _autograd_recompute(basis, t, basis_params, grad_blocks, need_t, needs_params):
    """The features, and the gradients with respect to ``t`` and each basis parameter (None
    where not needed), by a local autograd pass over the recomputed basis values."""
    with torch.enable_grad():
        t_leaf = t.detach().requires_grad_(need_t)  # (N, I)
        params = [p.detach().to(t.dtype).requires_grad_(n) for p, n in zip(basis_params, needs_params)]
        values = basis.values(t_leaf, params)  # K tensors phi_k(t), each (N, I)
    if len(values) != basis.num_features:
        raise ValueError(
            f"basis {basis.name!r} returned {len(values)} features but its num_features is {basis.num_features}"
        )
    features = torch.cat([value.detach() for value in values], dim=-1)  # K x (N, I) -> F: (N, K*I)

    inputs = [t_leaf] * need_t + [p for p in params if p.requires_grad]
    if not inputs:
        return features, None, [None] * len(params)
    # Features that do not depend on t or the parameters (a constant) contribute nothing.
    pairs = [(value, grad) for value, grad in zip(values, grad_blocks) if value.requires_grad]
    grads = [None] * len(inputs)
    if pairs:
        # vector-Jacobian product: each phi_k (N, I) paired with its dL/dphi_k block (N, I); the gradients
        # come back shaped like the inputs: t (N, I), each parameter its own shape
        outputs, grad_outputs = zip(*pairs)
        grads = torch.autograd.grad(outputs, inputs, grad_outputs, allow_unused=True)
    grads = [torch.zeros_like(i) if g is None else g for g, i in zip(grads, inputs)]
    grad_t = grads.pop(0) if need_t else None
    param_grads = [grads.pop(0).to(orig.dtype) if p.requires_grad else None for p, orig in zip(params, basis_params)]
    return features, grad_t, param_grads


#: what a KAN layer's base branch applies to its input before its matrix: ``silu(x)``, or ``x`` itself
BASE_BRANCHES = ("silu", "linear")


def _branch_input(x, activation):
    """``silu(x)`` in the math dtype, or ``x`` itself."""
    return torch.nn.functional.silu(x.to(_math_dtype(x))) if activation == "silu" else x


class BaseBranchFunction(torch.autograd.Function):
    """``silu(x) @ weight.T`` (or ``x @ weight.T``) saving only ``x`` and the weight for backward.

    Plain autograd on ``F.linear(F.silu(x), weight)`` would also keep ``silu(x)`` (and, under autocast, a
    low-precision copy of the input) alive until backward. ``x`` is the tensor the fused op saves anyway, so the
    branch adds no activation memory; backward recomputes ``silu(x)``, one elementwise pass.
    """

    @staticmethod
    def forward(ctx, x, weight, activation: str):
        compute_dtype = _compute_dtype(x, weight)
        with torch.autocast(x.device.type, enabled=False):
            # (N, I) @ (I, O) -> (N, O)
            y = _matmul(_branch_input(x, activation).to(compute_dtype), weight.to(compute_dtype).t()).contiguous()
        ctx.activation, ctx.compute_dtype = activation, compute_dtype
        ctx.save_for_backward(x, weight)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, weight = ctx.saved_tensors
        dtype, activation = ctx.compute_dtype, ctx.activation
        grad_x = grad_weight = None
        with torch.autocast(x.device.type, enabled=False):
            grad_y = grad_y.to(dtype)  # (N, O)
            if ctx.needs_input_grad[1]:
                # dL/dweight = dL/dy^T @ silu(x): (O, N) @ (N, I) -> (O, I)
                grad_weight = _matmul(grad_y.t(), _branch_input(x, activation).to(dtype)).to(weight.dtype)
            if ctx.needs_input_grad[0]:
                grad_input = _matmul(grad_y, weight.to(dtype))  # dL/dsilu(x): (N, O) @ (O, I) -> (N, I)
                if activation == "silu":
                    math_dtype = _math_dtype(x)
                    grad_input = torch.ops.aten.silu_backward(grad_input.to(math_dtype), x.to(math_dtype))
                grad_x = grad_input.to(x.dtype)
        return grad_x, grad_weight, None


def base_branch(x, weight, activation: str):
    """A KAN layer's base branch on ``x`` ``(N, in)``: ``silu(x) @ weight.T``, or ``x @ weight.T`` for
    ``"linear"``; the same dtype rules as ``kan_linear`` (math in float32, the multiply in the autocast or weight
    dtype), so the two parts add up in one dtype."""
    if _needs_autograd(x, weight):
        if _is_quantized(weight):
            raise RuntimeError(f"this base branch's weight is quantized ({type(weight).__name__}), which serves "
                               f"inference only: run it under torch.no_grad() or torch.inference_mode()")
        return BaseBranchFunction.apply(x, weight, activation)
    compute_dtype = _compute_dtype(x, weight)
    with torch.autocast(x.device.type, enabled=False):
        inputs = _branch_input(x, activation).to(compute_dtype)
        return torch.nn.functional.linear(inputs, weight if _is_quantized(weight) else weight.to(compute_dtype))


#: devices whose tensors take the Triton kernels of ``triton_kan.py`` when Triton is importable and the
#: basis has a kernel (kallm's tests add "cpu" to run them under Triton's interpreter).
FUSED_DEVICE_TYPES = ("cuda",)
#: the ``triton_kan`` module once looked for: ``[module]``, or ``[None]`` where it cannot be imported
_triton_kernels = []


# torch.compile runs this while tracing and keeps the answer, rather than tracing an import.
@torch.compiler.assume_constant_result
def _have_fused_kernels() -> bool:
    """Whether ``triton_kan`` imports: not where Triton is missing, nor in the copy of the core saved next to
    a checkpoint (which does not ship it). Imported on first use so that the core never needs Triton."""
    if not _triton_kernels:
        try:
            # Not a ``from .`` import: the code saved next to a checkpoint would then have to ship it.
            _triton_kernels.append(importlib.import_module(".triton_kan", __package__))
        except ImportError:
            _triton_kernels.append(None)
    return _triton_kernels[0] is not None


def kan_linear(x, weight, bias, scale, shift, basis: Basis, basis_params=()):
    """Functional form of the fused op; ``x`` is ``(N, in)`` (flatten leading dims first).

    On a GPU with Triton installed, the recurrence bases (cheby1, cheby2, legendre, ...) run the
    kernels of ``triton_kan.py``, which never write the feature matrix. Elsewhere, when no gradient can flow
    (under ``torch.no_grad``/``inference_mode``, or nothing requires one) it runs ``_kan_linear_inference``, the
    same computation without the autograd function around it; else ``KANLinearFunction``.
    """
    if x.device.type in FUSED_DEVICE_TYPES and not _is_quantized(weight) and _have_fused_kernels():
        kernels = _triton_kernels[0]
        recurrence = kernels.kernel_recurrence(basis, basis_params)
        if recurrence is not None:
            return kernels.fused_kan_linear(x, weight, bias, scale, shift, recurrence)
    if _needs_autograd(x, weight, bias, scale, shift, basis_params):
        if _is_quantized(weight):
            raise RuntimeError(
                f"this KAN layer's weight is quantized ({type(weight).__name__}), which serves inference only: run "
                f"it under torch.no_grad() or torch.inference_mode(), with inputs that do not require gradients"
            )
        return KANLinearFunction.apply(x, weight, bias, scale, shift, basis, *basis_params)
    return _kan_linear_inference(x, weight, bias, scale, shift, basis, basis_params)


def _is_quantized(weight):
    """Whether ``weight`` is a tensor subclass such as torchao's quantized weights (a Parameter of one reports
    the subclass as its type), which implement ``F.linear`` but not the ops of the fused multiply."""
    return type(weight) not in (torch.Tensor, torch.nn.Parameter)


def _needs_autograd(*tensors):
    if not torch.is_grad_enabled():
        return False
    return any(
        t.requires_grad for group in tensors for t in (group if isinstance(group, (list, tuple)) else [group])
        if t is not None
    )


def _kan_linear_inference(x, weight, bias, scale, shift, basis: Basis, basis_params=()):
    """The forward of ``KANLinearFunction`` for decoding: no autograd node, no saved tensors, no context
    managers or dtype casts that would change nothing. Same dtype rules, so the same result.

    At the token counts decoding uses (1 to a few dozen rows) the matrix multiply reads the whole weight
    matrix for very little arithmetic, and each extra tensor operation costs microseconds of dispatch,
    comparable to the multiply itself; hence every step here is one operation where it can be."""
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        compute_dtype = torch.get_autocast_dtype(device_type)
        with torch.autocast(device_type, enabled=False):
            return _inference_forward(x, weight, bias, scale, shift, basis, basis_params, compute_dtype)
    return _inference_forward(x, weight, bias, scale, shift, basis, basis_params, weight.dtype)


def _inference_forward(x, weight, bias, scale, shift, basis, basis_params, compute_dtype):
    math_dtype = _math_dtype(x)
    t = _inference_input_map(x if x.dtype == math_dtype else x.to(math_dtype), scale, shift)
    params = [p if p.dtype == math_dtype else p.to(math_dtype) for p in basis_params]
    features, _ = _features(basis, t, params)
    if features.dtype != compute_dtype:
        features = features.to(compute_dtype)
    if bias is not None and bias.dtype != compute_dtype:
        bias = bias.to(compute_dtype)
    if _is_quantized(weight):
        return torch.nn.functional.linear(features, weight, bias)
    if weight.dtype != compute_dtype:
        weight = weight.to(compute_dtype)
    if features.shape[0] == 1:  # a single output row has no row stride to align
        return features @ weight.t() if bias is None else torch.addmm(bias, features, weight.t())
    return _matmul(features, weight.t(), bias).contiguous()


#: up to this many input elements, ``torch.tanh`` on CPU is cheaper than the three operations of ``_input_map``'s
#: sigmoid form: its per-element cost is higher but each operation costs microseconds of dispatch.
_CPU_DIRECT_TANH_MAX = 8192


def _inference_input_map(xm, scale, shift):
    """``_input_map`` with fewer operations for the few rows of a decoding step (the same function; the two
    forms differ by float rounding)."""
    if xm.device.type == "cpu" and xm.numel() > _CPU_DIRECT_TANH_MAX:
        return _input_map(xm, scale, shift)
    # addcmul promotes lower-precision parameters to the math dtype, as _input_map's casts do
    return torch.tanh(xm) if scale is None else torch.addcmul(shift, xm, scale).tanh_()
