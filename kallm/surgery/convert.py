"""``kallm.convert``: move trained KAN layers to another basis or degree.

A KAN layer's edge function is ``f_oi(t) = sum_k w_oik phi_k(t)`` plus the layer bias, with ``t``
in [-1, 1] (the input map's range). Every kallm polynomial basis (``RecurrenceBasis``) has ``P_n``
of degree exactly ``n``, so together with the constant (the bias) degree ``d`` spans all
polynomials of degree <= d, whatever the family. Writing each source feature in the target basis,
``phi_k = sum_j m_kj psi_j + c_k``, is therefore exact when the target is a polynomial basis of
the same or a higher degree: the coefficients become ``w M`` and the constants go into the bias.
``M`` and ``c`` come from a square float64 solve on Chebyshev nodes.

Anything else (a lower degree, bspline, rbf, rational, parallel targets, a layer without bias) is
a least-squares projection of the features onto the target span on dense Chebyshev nodes of [-1, 1];
its error is measured and reported. A projection whose error is float64 rounding is exact too (a
polynomial lies in the span of B-splines of a higher order); any other runs only with
``allow_lossy=True``.

The functions of a ``form="glu"`` retrofit (``ChannelFunctions``: ``bias + sum_k c_k phi_k(t)`` per channel or
group) convert the same way: each is one edge function with its own bias.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass, field

import torch
from torch import nn

from ..core.bases import _REGISTRY, Basis, ParallelBasis, RecurrenceBasis, make_basis
from ..core.function_layers import ChannelFunctions, is_channel_functions
from ..core.layers import LAYER_OPTIONS, KANLinear, is_kan_linear
from ..core.retrofit_config import RetrofitConfig

#: nodes per target feature for least-squares projections: enough to see the error between nodes
LOSSY_NODES_PER_FEATURE = 16
LOSSY_MINIMUM_NODES = 256
#: a projection whose relative error stays below this (float64 rounding) is exact: the source functions lie in the
#: target span (polynomials in B-splines of a higher order, in rational functions whose denominator is still 1, ...)
EXACT_TOLERANCE = 1e-10


@dataclass
class ConversionReport:
    """What ``kallm.convert`` did: the source settings (of the first converted layer) and the target
    ones, whether it was exact, and for each layer converted by projection the error of its edge
    functions on [-1, 1]: ``relative_error`` is ``rms(f_new - f_old) / rms(f_old)`` over every edge
    and node, ``max_error`` the largest gap."""

    source: dict
    target: dict
    exact: bool
    layers: dict[str, dict[str, float]] = field(default_factory=dict)

    @property
    def max_relative_error(self) -> float:
        return max((layer["relative_error"] for layer in self.layers.values()), default=0.0)

    def __str__(self) -> str:
        kind = "exact" if self.exact else f"lossy (largest relative error {self.max_relative_error:.3g})"
        return f"conversion {_describe(self.source)} -> {_describe(self.target)}: {kind}, {len(self.layers)} layers"


def convert(module: nn.Module, basis: str, degree: int | None = None, allow_lossy: bool = False, **basis_options):
    """Re-express the KAN layers of ``module`` in ``basis`` at ``degree`` (default: the current one).

    ``module`` is a ``KANLinear`` or ``ChannelFunctions`` (a new one is returned), or any module holding them, such
    as a retrofitted model (of either form) or a ``KANFeedForward``, converted in place and returned; a model's
    ``config.kan_config`` follows. Input maps, biases and base branches keep their meaning (a base branch's
    matrix is carried over unchanged: it multiplies ``silu(x)`` or ``x``, not the basis); ``basis_options`` are
    the target basis' options (``alpha=...``).

    Polynomial to polynomial at the same or a higher degree is exact (equal outputs up to float
    rounding). Other conversions are least-squares projections; one whose measured error is float64
    rounding counts as exact, any other raises, naming its error, unless ``allow_lossy=True``, and
    then warns. The report is ``converted.kallm_conversion_report``. Nothing is changed when
    anything is refused.
    """
    if isinstance(basis, str) and ">" in basis:
        raise ValueError(
            f"convert takes one basis for every KAN layer, got the chained spec {basis!r}; convert to one basis"
        )
    targets = _kan_layers(module)
    layer_options = {k: v for k, v in basis_options.items() if k in LAYER_OPTIONS}
    if layer_options:
        raise ValueError(
            f"convert keeps each layer's {sorted(layer_options)}; pass only basis options (alpha, beta, grid_size, ...)"
        )
    if degree is None:
        degree = targets[0][1].basis.degree
    target_basis = make_basis(basis, degree, **basis_options)  # bad names and options fail here
    converted, errors = {}, {}
    for name, layer in targets:
        convert_one = _convert_layer if is_kan_linear(layer) else _convert_functions
        converted[name], errors[name] = convert_one(layer, basis, degree, basis_options)
    lossy = {name: error for name, error in errors.items() if error and error["relative_error"] > EXACT_TOLERANCE}
    report = ConversionReport(
        source=targets[0][1].basis.describe(),
        target=target_basis.describe(),
        exact=not lossy,
        layers={name: error for name, error in errors.items() if error is not None},
    )
    if lossy:
        worst = max(lossy, key=lambda name: lossy[name]["relative_error"])
        detail = (
            f"{report}; worst layer {worst or 'the layer'}: relative error {lossy[worst]['relative_error']:.3g}, "
            f"largest gap {lossy[worst]['max_error']:.3g} on [-1, 1]"
        )
        if not allow_lossy:
            raise ValueError(
                f"this conversion is lossy, a least-squares projection rather than an exact change of coefficients "
                f"({detail}); polynomial bases ({_polynomial_names()}) convert exactly to a polynomial basis of the "
                f"same or a higher degree in layers with a bias. Pass allow_lossy=True to accept the error"
            )
        warnings.warn(f"lossy KAN conversion: {detail}", stacklevel=2)

    if "" in converted:  # a single layer
        result = converted[""]
    else:
        for name, layer in converted.items():
            parent_name, _, child = name.rpartition(".")
            setattr(module.get_submodule(parent_name), child, layer)
        _update_kan_config(module, basis, degree, basis_options)
        result = module
    result.kallm_conversion_report = report
    return result


def _kan_layers(module) -> list[tuple[str, KANLinear | ChannelFunctions]]:
    if not isinstance(module, nn.Module):
        raise TypeError(f"convert needs a KANLinear or a model holding KAN layers, got {type(module).__name__}")
    layers = [(name, m) for name, m in module.named_modules() if is_kan_linear(m) or is_channel_functions(m)]
    if not layers:
        raise ValueError(
            f"{type(module).__name__} holds no KAN layers (KANLinear) nor the functions of form='glu' "
            f"(ChannelFunctions), so there is nothing to convert; retrofit the model first (kallm.retrofit)"
        )
    return layers


@torch.no_grad()
def _convert_layer(layer, basis: str, degree: int, basis_options: dict):
    """The layer re-expressed in the target basis, and None (exact) or its error."""
    weight = layer.weight
    new = KANLinear(
        layer.in_features, layer.out_features, basis, degree, input_map=layer.input_map,
        bias=layer.bias is not None, base=getattr(layer, "base", None), device=weight.device, dtype=weight.dtype,
        **basis_options,
    )
    if layer.input_scale is not None:
        new.input_scale.copy_(layer.input_scale)
        new.input_shift.copy_(layer.input_shift)
    if new.base_weight is not None:
        new.base_weight.copy_(layer.base_weight)
    if new.basis.describe() == layer.basis.describe():
        new.load_state_dict(layer.state_dict())
        return new, None
    has_bias = layer.bias is not None
    exact, source, target, solution = _change_of_basis(layer, new, layer.in_features, has_bias)
    old_weight = weight.to(torch.float64).view(layer.out_features, layer.basis.num_features, layer.in_features)
    count = new.basis.num_features
    new.weight.copy_(torch.einsum("oki,ijk->oji", old_weight, solution[:, :count]).reshape_as(new.weight))
    if has_bias:
        new.bias.copy_(layer.bias.to(torch.float64) + torch.einsum("oki,ik->o", old_weight, solution[:, count]))
    return new, None if exact else _projection_error(old_weight, source, target, solution)


@torch.no_grad()
def _convert_functions(functions, basis: str, degree: int, basis_options: dict):
    """``ChannelFunctions`` re-expressed in the target basis, and None (exact) or its error: each function is one
    edge (``in`` = its groups, one output each) whose bias takes the constant terms."""
    coefficients = functions.coefficients
    new = ChannelFunctions(functions.channels, basis, degree, functions.groups, device=coefficients.device,
                           dtype=coefficients.dtype, **basis_options)
    new.input_scale.copy_(functions.input_scale)
    if new.basis.describe() == functions.basis.describe():
        new.load_state_dict(functions.state_dict())
        return new, None
    exact, source, target, solution = _change_of_basis(functions, new, functions.groups, has_bias=True)
    old_weight = coefficients.to(torch.float64).unsqueeze(0)  # (1, K, groups)
    count = new.basis.num_features
    new.coefficients.copy_(torch.einsum("oki,ijk->oji", old_weight, solution[:, :count])[0])
    new.bias.copy_(functions.bias.to(torch.float64) + torch.einsum("ki,ik->i", old_weight[0], solution[:, count]))
    return new, None if exact else _projection_error(old_weight, source, target, solution)


def _change_of_basis(old, new, in_features: int, has_bias: bool):
    """How ``old``'s features are written in ``new``'s (and a constant, with ``has_bias``) on each input channel:
    ``(exact, source (in, N, K), target (in, N, K' [+1]), solution (in, K' [+1], K))``, solved on Chebyshev nodes."""
    exact = (has_bias and _is_polynomial(old.basis) and isinstance(new.basis, RecurrenceBasis)
             and new.basis.degree >= old.basis.degree)
    target_count = new.basis.num_features + has_bias
    node_count = target_count if exact else max(LOSSY_MINIMUM_NODES, LOSSY_NODES_PER_FEATURE * target_count)
    device = next(old.parameters()).device
    nodes = _chebyshev_nodes(node_count, device)
    source = _feature_table(old.basis, old.basis_parameters, nodes, in_features)
    target = _feature_table(new.basis, new.basis_parameters, nodes, in_features)
    if has_bias:
        target = torch.cat([target, torch.ones_like(target[..., :1])], dim=-1)
    if exact:
        solution = torch.linalg.solve(target, source)
    else:
        solution = torch.linalg.lstsq(target, source, driver="gelsd" if nodes.device.type == "cpu" else None).solution
    return exact, source, target, solution


def _projection_error(old_weight, source, target, solution) -> dict[str, float]:
    """The edge functions' error: ``sum_k w_oik (phi_k - projected phi_k)`` at every node."""
    residual = source - target @ solution  # (in, N, K)
    gap = torch.einsum("oki,ink->oin", old_weight, residual)
    edges = torch.einsum("oki,ink->oin", old_weight, source)
    rms_edges = edges.pow(2).mean().sqrt().clamp_min(torch.finfo(torch.float64).tiny)
    return {
        "relative_error": float(gap.pow(2).mean().sqrt() / rms_edges),
        "max_error": float(gap.abs().max()),
    }


def _feature_table(basis: Basis, parameters, nodes, in_features) -> torch.Tensor:
    """``phi_k(t_n)`` for each input channel (bases may hold per-channel parameters): ``(in, N, K)``."""
    t = nodes.unsqueeze(1).expand(-1, in_features)
    values = basis.values(t, [p.to(device=nodes.device, dtype=torch.float64) for p in parameters])
    return torch.stack(values, dim=-1).transpose(0, 1)


def _chebyshev_nodes(count: int, device) -> torch.Tensor:
    j = torch.arange(count, dtype=torch.float64, device=device)
    return torch.cos((2 * j + 1) * math.pi / (2 * count))


def _is_polynomial(basis: Basis) -> bool:
    members = basis.members if isinstance(basis, ParallelBasis) else [basis]
    return all(isinstance(member, RecurrenceBasis) for member in members)


def _polynomial_names() -> str:
    return ", ".join(name for name, factory in _REGISTRY.items()
                     if isinstance(factory, type) and issubclass(factory, RecurrenceBasis))


def _update_kan_config(model, basis: str, degree: int, basis_options: dict) -> None:
    config = getattr(model, "config", None)
    kan_config = getattr(config, "kan_config", None)
    if not kan_config:
        return
    recorded = RetrofitConfig.from_dict(kan_config)

    def converted(spec):
        stages = len(spec.split(">"))
        # a three-stage feedforward keeps three stages; one name already means two
        return ">".join([basis] * stages) if stages > 2 else basis

    # every block now has the target basis; blocks keep only their own sizes and layer settings
    block_settings = {}
    for index, own in recorded.block_settings.items():
        kept = {key: value for key, value in own.items() if key not in ("basis", "degree", "basis_options")}
        if "basis" in own:
            kept["basis"] = converted(own["basis"])
        block_settings[index] = kept
    config.kan_config = dataclasses.replace(
        recorded, basis=converted(recorded.basis), degree=degree, basis_options=dict(basis_options),
        block_settings=block_settings,
    ).to_dict()


def _describe(settings: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in settings.items() if k != "members")
