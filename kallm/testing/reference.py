"""The textbook KAN formulation, for checking and benchmarking kallm's fused op.

Each layer stacks the basis values of every input into an ``(N, in, K)`` tensor and
contracts it with an ``(in, out, K)`` coefficient tensor by ``einsum``; plain autograd
differentiates it. That is the formulation most KAN code uses: easy to read and to
trust, but autograd keeps ``t``, every recurrence step and the stacked features alive
until backward. kallm's tests compare the fused op against it and
``scripts/bench/bench_layers.py`` measures both.

Not part of the portable core: checkpoints never need it.
"""

from __future__ import annotations

import torch
from torch import nn

from ..core.bases import Basis
from ..core.layers import KANFeedForward, KANLinear


def reference_kan_linear(x, coefficients, bias, scale, shift, basis: Basis, basis_params=()):
    """``y = einsum("nik,iok->no", stack_k(phi_k(t)), coefficients) + bias`` with plain autograd.

    ``x`` is ``(N, in)``; ``coefficients`` is ``(in, out, K)``; ``t = tanh(scale * x + shift)``,
    or ``tanh(x)`` when ``scale`` is None. Everything runs in the dtype of ``x``.
    """
    t = torch.tanh(x if scale is None else x * scale + shift)
    features = torch.stack(basis.values(t, list(basis_params)), dim=-1)
    y = torch.einsum("nik,iok->no", features, coefficients)
    return y if bias is None else y + bias


def weight_to_coefficients(weight: torch.Tensor, in_features: int) -> torch.Tensor:
    """The fused op's ``(out, K * in)`` weight, blocked by feature, as ``(in, out, K)``."""
    out_features = weight.shape[0]
    return weight.reshape(out_features, -1, in_features).permute(2, 0, 1)


def coefficients_to_weight(coefficients: torch.Tensor) -> torch.Tensor:
    """Inverse of ``weight_to_coefficients``."""
    in_features, out_features, _ = coefficients.shape
    return coefficients.permute(1, 2, 0).reshape(out_features, -1)


class ReferenceKANLinear(nn.Module):
    """A copy of ``layer`` (same parameter values) computed the textbook way."""

    def __init__(self, layer: KANLinear):
        super().__init__()
        self.basis = layer.basis
        self.in_features, self.out_features = layer.in_features, layer.out_features
        self.coefficients = nn.Parameter(weight_to_coefficients(layer.weight.detach(), layer.in_features).clone())
        self.bias = _copy(layer.bias)
        self.input_scale = _copy(layer.input_scale)
        self.input_shift = _copy(layer.input_shift)
        self.basis_parameters = nn.ParameterList([_copy(p) for p in layer.basis_parameters])
        self.base, self.base_weight = layer.base, _copy(layer.base_weight)

    def forward(self, x):
        leading = x.shape[:-1]
        flat = x.reshape(-1, self.in_features)
        y = reference_kan_linear(
            flat, self.coefficients, self.bias, self.input_scale, self.input_shift, self.basis,
            list(self.basis_parameters),
        )
        if self.base_weight is not None:
            y = y + nn.functional.linear(nn.functional.silu(flat) if self.base == "silu" else flat, self.base_weight)
        return y.reshape(*leading, self.out_features)


class ReferenceKANFeedForward(nn.Module):
    """A copy of ``feedforward`` (same parameter values) computed the textbook way."""

    def __init__(self, feedforward: KANFeedForward):
        super().__init__()
        self.layers = nn.ModuleList(ReferenceKANLinear(layer) for layer in feedforward.layers)
        self.gate = ReferenceKANLinear(feedforward.gate) if getattr(feedforward, "gate", None) is not None else None

    def forward(self, hidden_states):
        first, *rest = self.layers
        out = first(hidden_states)
        if self.gate is not None:
            out = nn.functional.silu(self.gate(hidden_states)) * out
        for layer in rest:
            out = layer(out)
        return out


def _copy(parameter):
    return None if parameter is None else nn.Parameter(parameter.detach().clone())
