"""The fused KAN op: input map, basis features and one matrix multiply.

``kan_linear(x, weight, bias, scale, shift, basis, basis_params)`` computes

    t = tanh(scale * x + shift)            (or tanh(x) when scale/shift are None)
    F = [phi_1(t) | phi_2(t) | ... | phi_K(t)]      shape (N, K * in), blocked by feature
    y = F @ weight.T + bias                weight: (out, K * in)

Memory: autograd on the textbook formulation keeps ``t``, every recurrence step and the
stacked features alive until backward, several times the layer input at degree 2. This
op saves only ``x`` (plus the parameters, which exist anyway) and recomputes ``t``,
``F`` and ``dF/dt`` in backward, so its activation memory equals an ``nn.Linear`` fed
the same input. The recompute is elementwise work, cheap next to the matrix multiplies.

Precision: the input map and basis math run in float32 whatever the input dtype; the
matrix multiplies run in the autocast dtype when autocast is on (else the weight dtype)
and accumulate in float32 inside the GEMM.

Part of kallm's portable core: plain torch, sibling imports only.
"""

from __future__ import annotations

import torch

from .bases import Basis


def _math_dtype(x):
    """float32 for half inputs, float64 stays float64 (for gradcheck and references)."""
    return torch.promote_types(x.dtype, torch.float32)


def _input_map(xm, scale, shift):
    if scale is None:
        return torch.tanh(xm)
    return torch.tanh(torch.addcmul(shift.to(xm.dtype), xm, scale.to(xm.dtype)))


def _compute_dtype(x, weight):
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return weight.dtype


class KANLinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, scale, shift, basis: Basis, *basis_params):
        compute_dtype = _compute_dtype(x, weight)
        with torch.autocast(x.device.type, enabled=False):
            math_dtype = _math_dtype(x)
            t = _input_map(x.to(math_dtype), scale, shift)
            features = torch.cat(basis.values(t, [p.to(math_dtype) for p in basis_params]), dim=-1)
            w = weight.to(compute_dtype)
            features = features.to(compute_dtype)
            if bias is None:
                y = features @ w.t()
            else:
                y = torch.addmm(bias.to(compute_dtype), features, w.t())
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
        grad_y = grad_y.to(dtype)
        grad_x = grad_weight = grad_bias = grad_scale = grad_shift = None
        param_grads = [None] * len(basis_params)

        with torch.autocast(x.device.type, enabled=False):
            math_dtype = _math_dtype(x)
            xm = x.to(math_dtype)
            t = _input_map(xm, scale, shift)
            grad_t = None
            if basis.has_derivatives and not need_params:
                values, derivatives = basis.values_and_derivatives(t) if need_t else (basis.values(t, []), None)
                features = torch.cat(values, dim=-1).to(dtype)
                if need_t:
                    grad_features = grad_y @ weight.to(dtype)
                    width = t.shape[-1]
                    for k, derivative in enumerate(derivatives):
                        term = grad_features[..., k * width : (k + 1) * width].to(math_dtype) * derivative
                        grad_t = term if grad_t is None else grad_t.add_(term)
            else:
                # Bases without closed-form derivatives (or with learnable parameters):
                # differentiate the elementwise part locally; still nothing was saved.
                with torch.enable_grad():
                    t_leaf = t.detach().requires_grad_(need_t)
                    params = [p.detach().to(math_dtype).requires_grad_(n) for p, n in zip(basis_params, needs[6:])]
                    features_m = torch.cat(basis.values(t_leaf, params), dim=-1)
                features = features_m.detach().to(dtype)
                inputs = ([t_leaf] if need_t else []) + [p for p in params if p.requires_grad]
                if inputs:
                    grad_features = (grad_y @ weight.to(dtype)).to(math_dtype)
                    grads = list(torch.autograd.grad(features_m, inputs, grad_features, allow_unused=True))
                    if need_t:
                        grad_t = grads.pop(0)
                    for i, p in enumerate(params):
                        if p.requires_grad:
                            g = grads.pop(0)
                            param_grads[i] = (torch.zeros_like(p) if g is None else g).to(basis_params[i].dtype)

            if needs[1]:
                flat_grad_y = grad_y.reshape(-1, grad_y.shape[-1])
                grad_weight = (flat_grad_y.t() @ features.reshape(-1, features.shape[-1])).to(weight.dtype)
            if bias is not None and needs[2]:
                grad_bias = grad_y.reshape(-1, grad_y.shape[-1]).to(math_dtype).sum(0).to(bias.dtype)
            if grad_t is not None:
                grad_u = grad_t * (1.0 - t * t)
                if scale is None:
                    grad_x = grad_u.to(x.dtype) if needs[0] else None
                else:
                    if needs[0]:
                        grad_x = (grad_u * scale.to(math_dtype)).to(x.dtype)
                    reduce_dims = tuple(range(grad_u.dim() - 1))
                    if needs[3]:
                        grad_scale = (grad_u * xm).sum(reduce_dims).to(scale.dtype)
                    if needs[4]:
                        grad_shift = grad_u.sum(reduce_dims).to(shift.dtype)
        return (grad_x, grad_weight, grad_bias, grad_scale, grad_shift, None, *param_grads)


def kan_linear(x, weight, bias, scale, shift, basis: Basis, basis_params=()):
    """Functional form of the fused op; ``x`` is ``(N, in)`` (flatten leading dims first)."""
    return KANLinearFunction.apply(x, weight, bias, scale, shift, basis, *basis_params)
